//! `cargo xtask bench [NAME]`: a dispatcher over the registered benchmarks.
//!
//! # The contract every benchmark follows
//!
//! A benchmark measures one of our components **and a peer** (the off-the-shelf tool or
//! the naive approach it replaces) in the same run, on the same machine, so that the
//! result is a ratio that survives slow CI machines rather than an absolute figure that
//! does not. It:
//!
//! 1. prints its figures for humans as it goes (what was measured, how many iterations,
//!    the units);
//! 2. prints, as its **last line on stdout**, exactly one JSON object with the figures and
//!    the ratios against the peer, e.g.
//!    `{"bench":"NAME","ours_ms":12.5,"peer_ms":30.1,"ratio_vs_peer":0.415}`,
//!    so that scripts can take the last line and compare it with earlier runs;
//! 3. returns an error (exit code 1) if it could not measure, never a made-up figure.
//!
//! Register a benchmark by adding a [`Bench`] entry to [`BENCHES`].

use std::process::ExitCode;

/// One registered benchmark.
struct Bench {
    /// The name given on the command line.
    name: &'static str,
    /// One line for the listing.
    about: &'static str,
    /// Runs it; see the contract in the module docs.
    run: fn() -> anyhow::Result<()>,
}

/// The benchmark table.
const BENCHES: &[Bench] = &[
    Bench {
        name: "tunnel",
        about: "TCP throughput through the box's WireGuard tunnel vs the bare veth (iperf3)",
        run: crate::bench_tunnel::run,
    },
    Bench {
        name: "consent",
        about: "consent decisions over the service's socket vs the pure decision function",
        run: crate::bench_consent::run,
    },
    Bench {
        name: "ssmix2",
        about: "SS-MIX2 inventory of a generated storage (files/s, peak RSS) vs a bare walk (find)",
        run: crate::bench_ssmix2::run,
    },
    Bench {
        name: "dicom",
        about: "DICOM ingest (500 small, 4 large multi-frame) files/s, MB/s, peak RSS vs dcmtk storescp",
        run: crate::bench_dicom::run,
    },
];

/// The workspace root and its target directory (`CARGO_TARGET_DIR` if set).
pub(crate) fn target_dir() -> (std::path::PathBuf, std::path::PathBuf) {
    let root = crate::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || root.join("target"),
        |t| root.join(std::path::PathBuf::from(t)),
    );
    (root, target)
}

/// What every debug build of a benchmark names: `tsunagi` and the test network's helpers
/// (`bench tunnel` runs them). One set of packages is one set of features, so the smoke runs
/// in `cargo xtask test` build once between them, not once per feature set.
const DEBUG_BUILD: [&str; 5] = ["-p", "tsunagi", "-p", "hil-tests", "--bins"];

/// Builds `tsunagi` (`--release`, or the debug build for a smoke run or a debug benchmark:
/// a debug build's figures mean nothing, and a smoke run must stay short); returns the
/// binary, the target directory and the profile's name.
pub(crate) fn build_tsunagi(
    smoke: bool,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, &'static str)> {
    use crate::process::{cargo, display, status};
    let (_, target) = target_dir();
    let profile = if smoke { "debug" } else { "release" };
    let mut build = cargo();
    build.args(["build", "--locked"]);
    if smoke {
        build.args(DEBUG_BUILD);
    } else {
        build.args(["-p", "tsunagi", "--release"]);
    }
    if !status(&mut build)?.success() {
        anyhow::bail!("`{}` failed", display(&build));
    }
    Ok((target.join(profile).join("tsunagi"), target, profile))
}

pub(crate) fn run(args: &[&str]) -> anyhow::Result<ExitCode> {
    match args {
        [] => {
            print!("{}", listing());
            Ok(ExitCode::SUCCESS)
        }
        [name] => match BENCHES.iter().find(|b| b.name == *name) {
            Some(bench) => {
                (bench.run)()?;
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("xtask: unknown benchmark `{name}`");
                eprint!("{}", listing());
                Ok(ExitCode::from(crate::EXIT_USAGE))
            }
        },
        _ => {
            eprintln!("usage: cargo xtask bench [NAME]");
            eprint!("{}", listing());
            Ok(ExitCode::from(crate::EXIT_USAGE))
        }
    }
}

/// The names of every registered benchmark.
pub(crate) fn names() -> impl Iterator<Item = &'static str> {
    BENCHES.iter().map(|b| b.name)
}

fn listing() -> String {
    if BENCHES.is_empty() {
        return "available benchmarks: (none yet)\n".to_owned();
    }
    let mut out = String::from("available benchmarks:\n");
    for bench in BENCHES {
        out.push_str(&format!("  {:<24} {}\n", bench.name, bench.about));
    }
    out
}
