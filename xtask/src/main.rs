//! `cargo xtask`: the workspace's developer and CI commands, in Rust rather than shell.
//!
//! Run through the alias in `.cargo/config.toml` (`cargo xtask <command>`):
//!
//! - `test`: installs the system packages and cargo tools the checks need, then runs
//!   fmt, clippy, cargo-deny and the nextest suite, stopping at the first failure. This is
//!   what CI runs (`.ci/run`).
//! - `demo`: builds `tsunagi`, writes a demo config under `target/demo/`, runs the
//!   supervisor in the foreground and stops it cleanly on Ctrl-C or SIGTERM.
//! - `bench [NAME]`: runs a registered benchmark, or lists them.
//! - `image [--check]`: builds the appliance image (cached by input hash), and checks it.
//! - `fuzz [NAME] [--time DURATION]`: builds the fuzz targets in `fuzz/` and runs each (or
//!   NAME) for a while, two at a time; fails on any crash (`docs/fuzzing.md`).
//!
//! Exit codes: 0 success; 1 a step or command failed; 2 usage error (unknown command or
//! benchmark); 3 system packages are missing and we are not root to install them. `demo`
//! otherwise exits with the supervisor's status when the supervisor stops on its own.
#![forbid(unsafe_code)]

mod bench;
mod bench_consent;
mod bench_dicom;
mod bench_dicom_latency;
mod bench_ssmix2;
mod bench_tunnel;
mod demo;
mod dicom_send;
mod fhir_server;
mod fuzz;
mod image;
mod process;
mod release;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test          install what the checks need, then run fmt, clippy, cargo-deny and the tests
  test --stage image  only the image stage: build the image and run the tests that boot it
  demo          build tsunagi and run it with a demo config until Ctrl-C
  bench [NAME]  run the benchmark NAME; without NAME, list the benchmarks
  fhir-server   build helios-hfs into a cache (over an hour) for the FHIR interop stage
  image [--check]  build the appliance image into target/image (cached by input hash)
  release VERSION [--fault never-ready]  build the image of VERSION and publish its signed
                update bundle into the update channel (target/channel, a TUF repository of
                static files); with --fault, a test release whose supervisor is never ready
  fuzz [NAME] [--time DURATION]  build the fuzz targets and run each (or NAME) for 30s
                (or DURATION: 10m, 1h), two at a time; fails on a crash
  help          print this text
";

/// Exit code for a usage error.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let result = match args.as_slice() {
        ["test"] => test::run(test::Stages::All),
        ["test", "--stage", "image"] => test::run(test::Stages::Image),
        // What `test` runs beside its checks and tests (not for a person to call).
        ["test", "--beside"] => test::beside(),
        ["demo"] => demo::run(),
        ["fhir-server"] => fhir_server::run(),
        ["bench", rest @ ..] => bench::run(rest),
        ["image", rest @ ..] => image::run(rest).map(|()| ExitCode::SUCCESS),
        ["release", rest @ ..] => release::run(rest).map(|()| ExitCode::SUCCESS),
        ["fuzz", rest @ ..] => fuzz::run(rest),
        ["help" | "--help" | "-h"] => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        [] => {
            eprint!("{USAGE}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
        [command, ..] => {
            if *command == "test" {
                eprintln!("xtask: `test` takes no arguments but `--stage image`\n");
            } else if matches!(*command, "demo" | "fhir-server") {
                eprintln!("xtask: `{command}` takes no arguments\n");
            } else {
                eprintln!("xtask: unknown command `{command}`\n");
            }
            eprint!("{USAGE}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
    };

    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask lives in `<root>/xtask`.
fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // CARGO_MANIFEST_DIR is an absolute path to `<root>/xtask`, so it has a parent.
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), PathBuf::from)
}
