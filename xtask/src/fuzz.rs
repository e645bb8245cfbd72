//! `cargo xtask fuzz [NAME] [--time DURATION]`: the fuzz targets in `fuzz/` (issue 14).
//!
//! 1. Installs cargo-fuzz if missing (`cargo install cargo-fuzz --locked --version`
//!    [`CARGO_FUZZ_VERSION`]).
//! 2. Builds every target once on the pinned stable toolchain, without sanitizers
//!    (`cargo fuzz build --sanitizer none --debug-assertions`), into `TARGET/fuzz`.
//! 3. Runs every target (or only NAME) for the given time (30 s by default; humantime:
//!    `30s`, `10m`, `1h`), two at a time (CI machines have two cores). Each run reads the
//!    committed corpus `fuzz/corpus/NAME` and writes what it finds to
//!    `TARGET/fuzz/corpus/NAME`, so the committed one is never touched; crashes go to
//!    `TARGET/fuzz/artifacts/NAME/`, the fuzzer's output to `TARGET/fuzz/logs/NAME.log`.
//! 4. Prints executions, time and crashes per target (from libFuzzer's final
//!    `stat::number_of_executed_units` and `Done N runs in S second(s)` lines), and for each
//!    crash its file and the command that reproduces it; fails if any target crashed.
//!
//! Why stable and no sanitizer: `docs/fuzzing.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::process::{cargo, display, status, succeeds_quietly};

/// How long each target runs by default (the CI smoke run).
const DEFAULT_TIME: Duration = Duration::from_secs(30);

/// Targets running at once.
const PARALLEL: usize = 2;

/// libFuzzer's limit on one input's run, in seconds: a slower input is a finding (a hang).
const INPUT_TIMEOUT_SECS: u64 = 10;

/// libFuzzer's memory limit, in MiB: more is a finding (unbounded allocation).
const RSS_LIMIT_MB: u64 = 2048;

/// Extra wall-clock time a run gets before it is killed as stuck (start-up, loading the
/// corpus, a last slow input).
const GRACE: Duration = Duration::from_secs(120);

/// Exit code for a usage error (as in `main`).
const EXIT_USAGE: u8 = 2;

/// The outcome of one target's run.
struct Outcome {
    name: String,
    executions: Option<u64>,
    seconds: Option<u64>,
    crashes: Vec<PathBuf>,
    /// The run failed (crash, leak, timeout, OOM, killed): the log says how.
    failed: bool,
    log: PathBuf,
}

/// The cargo-fuzz that `cargo xtask fuzz` installs when it is missing (pinned, like every
/// tool CI installs, so that a new release cannot change a run).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub(crate) fn run(args: &[&str]) -> anyhow::Result<ExitCode> {
    let (only, time) = match parse_args(args) {
        Ok(v) => v,
        Err(message) => {
            eprintln!("xtask fuzz: {message}");
            eprintln!("usage: cargo xtask fuzz [NAME] [--time DURATION]");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };

    if !succeeds_quietly(cargo().args(["fuzz", "--version"])) {
        let mut install = cargo();
        install
            .args(["install", "cargo-fuzz", "--locked", "--version"])
            .arg(CARGO_FUZZ_VERSION);
        println!("==> {}", display(&install));
        if !status(&mut install)?.success() {
            bail!("`{}` failed", display(&install));
        }
    }

    let (root, target) = crate::bench::target_dir();
    let fuzz_target = target.join("fuzz");
    let mut build = cargo();
    build
        .args(["fuzz", "build", "--sanitizer", "none", "--debug-assertions"])
        .arg("--target-dir")
        .arg(&fuzz_target);
    println!("==> {}", display(&build));
    if !status(&mut build)?.success() {
        bail!("`{}` failed", display(&build));
    }

    let mut names = targets()?;
    if let Some(only) = only {
        if !names.iter().any(|n| n == only) {
            eprintln!(
                "xtask fuzz: no target `{only}`; the targets: {}",
                names.join(", ")
            );
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        names = vec![only.to_owned()];
    }
    let bin_dir = fuzz_target.join(host_triple()?).join("release");

    println!(
        "==> fuzzing {} target(s), {} each, {PARALLEL} at a time",
        names.len(),
        humantime::format_duration(time)
    );
    let outcomes = run_all(&root, &fuzz_target, &bin_dir, &names, time)?;

    println!();
    println!(
        "{:<22} {:>14} {:>8} {:>8}",
        "target", "executions", "seconds", "crashes"
    );
    for o in &outcomes {
        let show = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        println!(
            "{:<22} {:>14} {:>8} {:>8}",
            o.name,
            show(o.executions),
            show(o.seconds),
            if o.failed { o.crashes.len().max(1) } else { 0 }
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failed).collect();
    if failed.is_empty() {
        println!("xtask fuzz: no crashes");
        return Ok(ExitCode::SUCCESS);
    }
    for o in &failed {
        eprintln!("xtask fuzz: `{}` failed (log: {})", o.name, o.log.display());
        for crash in &o.crashes {
            eprintln!("  crash file: {}", crash.display());
            eprintln!(
                "  reproduce:  cargo fuzz run --sanitizer none --debug-assertions --target-dir {} {} {}",
                fuzz_target.display(),
                o.name,
                crash.display()
            );
        }
    }
    Ok(ExitCode::FAILURE)
}

/// `[NAME] [--time DURATION]`, in any order.
fn parse_args<'a>(args: &[&'a str]) -> Result<(Option<&'a str>, Duration), String> {
    let mut only = None;
    let mut time = DEFAULT_TIME;
    let mut rest = args.iter();
    while let Some(&arg) = rest.next() {
        match arg {
            "--time" => {
                let value = rest
                    .next()
                    .ok_or("`--time` needs a duration (30s, 10m, 1h)")?;
                time = humantime::parse_duration(value)
                    .map_err(|e| format!("`--time {value}`: {e}"))?;
                if time < Duration::from_secs(1) {
                    return Err(format!("`--time {value}`: at least one second"));
                }
            }
            _ if arg.starts_with('-') => return Err(format!("unknown option `{arg}`")),
            _ if only.is_none() => only = Some(arg),
            _ => return Err(format!("one target at most (`{arg}`)")),
        }
    }
    Ok((only, time))
}

/// The targets, as `cargo fuzz list` names them.
fn targets() -> anyhow::Result<Vec<String>> {
    let mut list = cargo();
    list.args(["fuzz", "list"]).stderr(Stdio::inherit());
    let output = list
        .output()
        .with_context(|| format!("failed to run `{}`", display(&list)))?;
    if !output.status.success() {
        bail!("`{}` failed", display(&list));
    }
    let names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        bail!("`{}` lists no targets", display(&list));
    }
    Ok(names)
}

/// The host's target triple (cargo-fuzz builds for it, into `TARGET/fuzz/TRIPLE/release`).
fn host_triple() -> anyhow::Result<String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .current_dir(crate::workspace_root())
        .output()
        .context("failed to run `rustc -vV`")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` names no host")
}

/// Runs the targets, [`PARALLEL`] at a time; their outcomes in the order given.
fn run_all(
    root: &Path,
    fuzz_target: &Path,
    bin_dir: &Path,
    names: &[String],
    time: Duration,
) -> anyhow::Result<Vec<Outcome>> {
    let mut waiting = names.iter();
    let mut running: Vec<(String, Child, Instant, PathBuf, PathBuf)> = Vec::new();
    let mut done: Vec<Outcome> = Vec::new();
    loop {
        while running.len() < PARALLEL
            && let Some(name) = waiting.next()
        {
            let scratch = fuzz_target.join("corpus").join(name);
            let artifacts = fuzz_target.join("artifacts").join(name);
            let logs = fuzz_target.join("logs");
            for dir in [&scratch, &artifacts, &logs] {
                fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let log = logs.join(format!("{name}.log"));
            let file = fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            let mut command = Command::new(bin_dir.join(name));
            command
                .arg(format!("-max_total_time={}", time.as_secs()))
                .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
                .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
                .arg("-print_final_stats=1")
                // libFuzzer appends the file name to the prefix as given.
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                // New inputs go to the first directory; the committed corpus is only read.
                .arg(&scratch)
                .arg(root.join("fuzz").join("corpus").join(name))
                .current_dir(root)
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file);
            println!("    {name}: running (log {})", log.display());
            let child = command
                .spawn()
                .with_context(|| format!("cannot start {}", bin_dir.join(name).display()))?;
            running.push((name.clone(), child, Instant::now(), log, artifacts));
        }
        if running.is_empty() {
            break;
        }
        // No tokio here: xtask polls its two children from a plain thread.
        #[allow(clippy::disallowed_methods)]
        thread::sleep(Duration::from_millis(200));
        let mut i = 0;
        while i < running.len() {
            let (name, child, started, log, artifacts) = &mut running[i];
            let exit = match child.try_wait()? {
                Some(exit) => Some(exit.success()),
                None if started.elapsed() > time + GRACE => {
                    eprintln!(
                        "    {name}: still running after {:?}; killed",
                        started.elapsed()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    Some(false)
                }
                None => None,
            };
            if let Some(success) = exit {
                let text = fs::read_to_string(&*log).unwrap_or_default();
                let outcome = outcome(name, &text, success, log, artifacts);
                println!(
                    "    {name}: {}",
                    if outcome.failed { "FAILED" } else { "ok" }
                );
                done.push(outcome);
                running.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }
    done.sort_by_key(|o| names.iter().position(|n| *n == o.name));
    Ok(done)
}

/// Reads a finished run's log.
fn outcome(name: &str, log_text: &str, success: bool, log: &Path, artifacts: &Path) -> Outcome {
    let (executions, seconds) = stats(log_text);
    let crashes: Vec<PathBuf> = log_text
        .lines()
        .filter_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .map(|p| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                artifacts.join(p.file_name().unwrap_or_default())
            }
        })
        .collect();
    Outcome {
        name: name.to_owned(),
        executions,
        seconds,
        failed: !success || !crashes.is_empty(),
        crashes,
        log: log.to_owned(),
    }
}

/// Executions and seconds from libFuzzer's final lines: `stat::number_of_executed_units: N`
/// (with `-print_final_stats=1`), else `Done N runs in S second(s)`, and the seconds from
/// the latter (or `stat::...` lacks them: `None`).
fn stats(log: &str) -> (Option<u64>, Option<u64>) {
    let mut executions = None;
    let mut seconds = None;
    for line in log.lines() {
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            executions = n.trim().parse().ok().or(executions);
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            // "Done N runs in S second(s)"
            if let [n, "runs", "in", s, ..] = words[..] {
                executions = executions.or_else(|| n.parse().ok());
                seconds = s.parse().ok();
            }
        }
    }
    (executions, seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_final_lines() {
        let log = "#1024\tpulse  cov: 10\nDone 123456 runs in 31 second(s)\n\
                   stat::number_of_executed_units: 123457\nstat::peak_rss_mb: 40\n";
        assert_eq!(stats(log), (Some(123_457), Some(31)));
        assert_eq!(stats("Done 5 runs in 2 second(s)\n"), (Some(5), Some(2)));
        assert_eq!(stats("crashed\n"), (None, None));
    }

    #[test]
    fn finds_crash_files() {
        let log = "==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/t/a/'; Test unit written to /t/a/crash-abc\n";
        let o = outcome("x", log, false, Path::new("/t/x.log"), Path::new("/t/a"));
        assert!(o.failed);
        assert_eq!(o.crashes, [PathBuf::from("/t/a/crash-abc")]);
    }

    #[test]
    fn arguments() {
        assert_eq!(parse_args(&[]), Ok((None, DEFAULT_TIME)));
        assert_eq!(
            parse_args(&["dimse_command", "--time", "1h"]),
            Ok((Some("dimse_command"), Duration::from_secs(3600)))
        );
        assert_eq!(
            parse_args(&["--time", "10m"]),
            Ok((None, Duration::from_secs(600)))
        );
        assert!(parse_args(&["--time"]).is_err());
        assert!(parse_args(&["--time", "soon"]).is_err());
        assert!(parse_args(&["a", "b"]).is_err());
        assert!(parse_args(&["--fast"]).is_err());
    }
}
