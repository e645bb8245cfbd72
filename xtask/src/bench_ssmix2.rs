//! `cargo xtask bench ssmix2`: how fast the SS-MIX2 inventory goes through a storage, and
//! how much memory it needs, against a bare directory walk of the same tree.
//!
//! Ours: the real CLI, `tsunagi ssmix2 scan ROOT --json` with its output to `/dev/null`
//! (every file listed, stat'ed, read, hashed with SHA-256, decoded, parsed and resolved).
//! Peer: GNU `find ROOT -type f -printf '%s %T@\n'` to `/dev/null`: readdir plus a stat per
//! file, the least any inventory must do. The ratio is what reading and checking every
//! message costs on top of walking the tree.
//!
//! The storage is generated with the engine's test-data builder (`ssmix2::build`) and
//! cached under `target/bench-ssmix2/<N>/` (a `complete` marker next to the storage says
//! it was written to the end), so only the first run pays for it (about 2 minutes and 9 GB
//! at 1,000,000 files on a 2-core VM: the folders take as much disk as the files). Every
//! file is valid: the unmeasured warm-up run checks that the scan reports exactly the
//! generated files, with the statuses the generator expects and no finding at all. The smoke
//! run measures once after the warm-up; the others measure three times.
//!
//! Size: `TSUNAGI_BENCH_FILES` if set; else 20,000 when `TSUNAGI_BENCH_SECS` is set (the
//! smoke run of `cargo xtask test`), else 1,000,000. Our memory is also measured on a tree
//! one tenth the size, to show that it does not grow with the tree. Peak RSS comes from
//! GNU time (`/usr/bin/time -f %M`), which reports the child's `wait4` rusage.
//!
//! `tsunagi` is built with `--release` (a debug build's SHA-256 and parsing would make the
//! ratio meaningless), except in the smoke run, which must stay well under a minute and so
//! uses the debug build `cargo xtask test` has just made; the output says which.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use ssmix2::build::{Patient, Record, Storage, message};
use ssmix2::datatype::DUMMY_ORDER_NO;
use ssmix2::name::Flag;

use crate::process::{display, status};

/// Changes whenever the generator writes a different storage, so a stale cache is rebuilt.
const GENERATOR: &str = "ssmix2-bench-v2";

/// GNU time: the peak RSS of the child it waits for.
const GNU_TIME: &str = "/usr/bin/time";

/// Measured runs of each side (after one unmeasured warm-up run); the median is reported.
/// The smoke run, whose figures are not a verdict, measures once.
const RUNS: usize = 3;

/// How many files to generate, and whether this is the smoke run.
fn size() -> anyhow::Result<(u64, bool)> {
    if let Some(v) = std::env::var_os("TSUNAGI_BENCH_FILES") {
        let n: u64 = v
            .to_str()
            .and_then(|s| s.trim().replace(['_', ','], "").parse().ok())
            .with_context(|| format!("TSUNAGI_BENCH_FILES={v:?} is not a number of files"))?;
        ensure!(
            n >= 100,
            "TSUNAGI_BENCH_FILES must be at least 100 (the tenth tree needs files too)"
        );
        return Ok((n, false));
    }
    if std::env::var_os("TSUNAGI_BENCH_SECS").is_some() {
        return Ok((20_000, true));
    }
    Ok((1_000_000, false))
}

pub(crate) fn run() -> anyhow::Result<()> {
    let (files, smoke) = size()?;
    let tenth = files / 10;
    ensure!(
        Path::new(GNU_TIME).exists(),
        "{GNU_TIME} is missing: install the Debian package `time` (cargo xtask test does)"
    );

    let (tsunagi, target, profile) = crate::bench::build_tsunagi(smoke)?;

    let cache = target.join("bench-ssmix2");
    let full = ensure_storage(&cache, files)?;
    let small = ensure_storage(&cache, tenth)?;
    let rss_file = cache.join(format!("rss-{}", std::process::id()));
    let runs = if smoke { 1 } else { RUNS };
    let result = measure(&tsunagi, profile, runs, &full, &small, &rss_file);
    let _ = fs::remove_file(&rss_file);
    result
}

/// A generated storage and what the scan must report for it.
struct Generated {
    root: PathBuf,
    files: u64,
    patients: u64,
    current: u64,
    superseded: u64,
    deleted: u64,
}

fn measure(
    tsunagi: &Path,
    profile: &str,
    runs: usize,
    full: &Generated,
    small: &Generated,
    rss_file: &Path,
) -> anyhow::Result<()> {
    println!(
        "ssmix2 inventory vs a bare directory walk, {runs} measured run(s) of each (alternating) after one unmeasured warm-up, median wall time:"
    );
    println!(
        "  ours: tsunagi ssmix2 scan ROOT --json > /dev/null ({profile} build{})",
        if profile == "release" {
            ""
        } else {
            ": smoke run, the figures are not meaningful"
        }
    );
    println!("  peer: find ROOT -type f -printf '%s %T@\\n' > /dev/null (readdir + stat per file)");
    println!("  peak RSS: GNU time %M (the child's wait4 rusage)");
    let big = compare(tsunagi, full, runs, rss_file)?;
    let tenth = compare(tsunagi, small, runs, rss_file)?;

    let target_met = if profile != "release" {
        "not judged in a debug smoke run"
    } else if big.ratio <= 2.0 {
        "met"
    } else {
        "NOT met"
    };
    // Flat: within a quarter (plus 1 MiB of allocator noise) of the tenth tree's figure.
    let flat = big.rss_mib <= tenth.rss_mib * 1.25 + 1.0;
    println!("result:");
    println!(
        "  {} files: {:.0} files/s, {:.2}x the walk's time (target ≤ 2: {target_met})",
        full.files, big.files_per_s, big.ratio
    );
    println!(
        "  peak RSS: {:.1} MiB at {} files, {:.1} MiB at {} files: {}",
        big.rss_mib,
        full.files,
        tenth.rss_mib,
        small.files,
        if flat {
            "does not grow with the tree"
        } else {
            "GROWS with the tree"
        }
    );
    println!(
        "{{\"bench\":\"ssmix2\",\"files\":{},\"files_per_s\":{:.0},\"ratio_vs_walk\":{:.3},\"peak_rss_mib\":{:.1},\"peak_rss_mib_tenth\":{:.1},\"files_tenth\":{},\"ratio_vs_walk_tenth\":{:.3},\"ours_s\":{:.3},\"walk_s\":{:.3},\"walk_rss_mib\":{:.1},\"profile\":\"{profile}\"}}",
        full.files,
        big.files_per_s,
        big.ratio,
        big.rss_mib,
        tenth.rss_mib,
        small.files,
        tenth.ratio,
        big.ours_s,
        big.walk_s,
        big.walk_rss_mib,
    );
    Ok(())
}

/// The figures of one tree.
struct Figures {
    ours_s: f64,
    walk_s: f64,
    ratio: f64,
    files_per_s: f64,
    rss_mib: f64,
    walk_rss_mib: f64,
}

fn compare(tsunagi: &Path, g: &Generated, runs: usize, rss_file: &Path) -> anyhow::Result<Figures> {
    println!(
        "tree: {} files of {} patients in {}",
        g.files,
        g.patients,
        g.root.display()
    );
    let root = g.root.as_os_str().to_owned();
    let ours: Vec<OsString> = vec![
        tsunagi.as_os_str().to_owned(),
        "ssmix2".into(),
        "scan".into(),
        root.clone(),
        "--json".into(),
    ];
    let walk: Vec<OsString> = vec![
        "find".into(),
        root,
        "-type".into(),
        "f".into(),
        "-printf".into(),
        "%s %T@\\n".into(),
    ];

    // Warm-up (unmeasured): fills the page cache and checks both see every file.
    let start = Instant::now();
    let (lines, last) = output_lines(&ours)?;
    verify_scan(g, lines, &last)?;
    let warm_ours = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let (lines, _) = output_lines(&walk)?;
    ensure!(
        lines == g.files,
        "find listed {lines} files, {} were generated",
        g.files
    );
    println!(
        "  warm-up: ours {warm_ours:.2} s (output checked: {} entries, current {}, superseded {}, deleted {}, none quarantined, no finding); walk {:.2} s ({lines} files)",
        g.files,
        g.current,
        g.superseded,
        g.deleted,
        start.elapsed().as_secs_f64()
    );

    let (mut ours_s, mut walk_s, mut rss, mut walk_rss) = (Vec::new(), Vec::new(), 0, 0);
    for i in 1..=runs {
        let (t, r) = timed(&ours, rss_file)?;
        let (wt, wr) = timed(&walk, rss_file)?;
        println!(
            "  run {i}: ours {t:.3} s (peak RSS {:.1} MiB), walk {wt:.3} s (peak RSS {:.1} MiB)",
            mib(r),
            mib(wr)
        );
        ours_s.push(t);
        walk_s.push(wt);
        rss = rss.max(r);
        walk_rss = walk_rss.max(wr);
    }
    let (ours_s, walk_s) = (median(ours_s), median(walk_s));
    let f = Figures {
        ours_s,
        walk_s,
        ratio: ours_s / walk_s,
        files_per_s: g.files as f64 / ours_s,
        rss_mib: mib(rss),
        walk_rss_mib: mib(walk_rss),
    };
    println!(
        "  median: ours {ours_s:.3} s ({:.0} files/s), walk {walk_s:.3} s ({:.0} files/s): ratio {:.2}; ours peak RSS {:.1} MiB",
        f.files_per_s,
        g.files as f64 / walk_s,
        f.ratio,
        f.rss_mib
    );
    Ok(f)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `argv` under GNU time with its output discarded: wall seconds and peak RSS (KiB).
fn timed(argv: &[OsString], rss_file: &Path) -> anyhow::Result<(f64, u64)> {
    let mut cmd = Command::new(GNU_TIME);
    cmd.args(["-f", "%M", "-o"])
        .arg(rss_file)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let start = Instant::now();
    let st = status(&mut cmd)?;
    let secs = start.elapsed().as_secs_f64();
    if !st.success() {
        bail!("`{}` failed ({st})", display(&cmd));
    }
    let report = fs::read_to_string(rss_file)
        .with_context(|| format!("GNU time wrote no report to {}", rss_file.display()))?;
    let kib = report
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .with_context(|| format!("unexpected GNU time report: {report:?}"))?;
    Ok((secs, kib))
}

/// Runs `argv` with its output piped to us: the number of lines and the last one.
fn output_lines(argv: &[OsString]) -> anyhow::Result<(u64, Vec<u8>)> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to run `{}`", display(&cmd)))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut reader = BufReader::with_capacity(1 << 20, stdout);
    let (mut lines, mut line, mut last) = (0u64, Vec::new(), Vec::new());
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        lines += 1;
        std::mem::swap(&mut line, &mut last);
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("`{}` failed ({st})", display(&cmd));
    }
    Ok((lines, last))
}

/// Checks the scan's output: one entry per generated file, then a summary that agrees with
/// what the generator wrote, with nothing quarantined and no finding.
fn verify_scan(g: &Generated, lines: u64, last: &[u8]) -> anyhow::Result<()> {
    let summary: serde_json::Value = serde_json::from_slice(last).with_context(|| {
        format!(
            "the scan's last line is not JSON: {}",
            String::from_utf8_lossy(last)
        )
    })?;
    let s = &summary["summary"];
    let count = |k: &str| s["by_status"][k].as_u64().unwrap_or(0);
    ensure!(
        s["files"].as_u64() == Some(g.files) && lines == g.files + 1,
        "the scan reported {} files in {} lines; {} were generated",
        s["files"],
        lines,
        g.files
    );
    ensure!(
        count("quarantined") == 0,
        "the scan quarantined {} generated files: {}",
        count("quarantined"),
        s["by_reason"]
    );
    ensure!(
        (count("current"), count("superseded"), count("deleted"))
            == (g.current, g.superseded, g.deleted),
        "the scan's statuses {} differ from the generated (current {}, superseded {}, deleted {})",
        s["by_status"],
        g.current,
        g.superseded,
        g.deleted
    );
    ensure!(
        s["by_reason"]
            .as_object()
            .is_none_or(serde_json::Map::is_empty),
        "the scan found problems in the generated storage: {}",
        s["by_reason"]
    );
    Ok(())
}

/// The 10-digit patient ID of the `i`th patient. An affine map modulo 10^10 whose
/// multiplier is prime to 10 is a bijection, so IDs are unique; they spread over the hash
/// folders (characters 1–3 and 4–6) as a clinic's numbers do.
fn patient_id(i: u64) -> String {
    let id = (u128::from(i) * 6_364_136_223 + 1_442_695_041) % 10_000_000_000;
    format!("{id:010}")
}

/// The files of the `i`th patient, in the order they are written. Any prefix is a valid
/// storage too (the current `_1` of an updated key comes before its `_2`), so the last
/// patient can be cut short to hit the file count exactly.
///
/// A patient has demographics (ADT-00, updated for one in three) and 1 to 4 visits on
/// different days, each with an outpatient reception (ADT-12) or an admission (ADT-22), a
/// prescription (OMP-01, changed afterwards in one visit of four), a lab result (OML-11,
/// deleted in one visit of seven: its version and the tombstone, both `_0`) and, every
/// other visit, a radiology order (OMG-01). About 11 files per patient.
fn plan(i: u64) -> Vec<(Record, Flag)> {
    let visits = 1 + i % 4;
    let day = 1 + i % 28;
    let date = |v: u64| format!("2026{:02}{day:02}", 1 + 3 * v);
    let mut out = Vec::new();
    let adt00 = |hh: &str| {
        Record::new(
            "ADT-00",
            "-",
            DUMMY_ORDER_NO,
            &format!("{}{hh}0000000", date(0)),
        )
    };
    out.push((adt00("08"), Flag::Current));
    if i.is_multiple_of(3) {
        out.push((adt00("07"), Flag::Superseded));
    }
    for v in 0..visits {
        let d = date(v);
        let at = |hhmm: &str| format!("{d}{hhmm}00000");
        let order = |k: u64| format!("{:015}", i * 100 + v * 10 + k);
        let visit = if (i + v).is_multiple_of(5) {
            "ADT-22"
        } else {
            "ADT-12"
        };
        out.push((
            Record::new(visit, &d, DUMMY_ORDER_NO, &at("0900")),
            Flag::Current,
        ));
        let rx = order(1);
        out.push((Record::new("OMP-01", &d, &rx, &at("1030")), Flag::Current));
        if (i + v).is_multiple_of(4) {
            out.push((
                Record::new("OMP-01", &d, &rx, &at("1000")),
                Flag::Superseded,
            ));
        }
        let lab = order(2);
        if (i + v).is_multiple_of(7) {
            out.push((Record::new("OML-11", &d, &lab, &at("1130")), Flag::Deleted));
            out.push((
                Record::new("OML-11", &d, &lab, &at("1200")).with_note("削除"),
                Flag::Deleted,
            ));
        } else {
            out.push((Record::new("OML-11", &d, &lab, &at("1130")), Flag::Current));
        }
        if v % 2 == 1 {
            out.push((
                Record::new("OMG-01", &d, &order(3), &at("1400")),
                Flag::Current,
            ));
        }
    }
    out
}

/// The builder's encoding ([`ssmix2::encode::encode`]), memoized. ISO-2022-JP writes every
/// ASCII character as itself, in ASCII mode, so a message encodes piece by piece (split
/// after each HL7 delimiter); the few pieces with Japanese text are the same in every file
/// and are encoded once. (The encoder looks JIS X 0208 up in a table linearly, which in the
/// debug build of xtask made the generator several times slower.)
#[derive(Default)]
struct Encoder {
    cache: HashMap<String, Vec<u8>>,
}

impl Encoder {
    fn encode(&mut self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len() + 64);
        for piece in text.split_inclusive(['|', '^', '~', '&', '\\', '\r']) {
            if piece.is_ascii() {
                out.extend_from_slice(piece.as_bytes());
            } else {
                let bytes = self
                    .cache
                    .entry(piece.to_owned())
                    .or_insert_with(|| ssmix2::encode::encode(piece).bytes);
                out.extend_from_slice(bytes);
            }
        }
        out
    }
}

/// The cached storage of `files` files under `cache/<files>/`, generated if missing.
fn ensure_storage(cache: &Path, files: u64) -> anyhow::Result<Generated> {
    let dir = cache.join(files.to_string());
    let root = dir.join("storage");
    let marker = dir.join("complete");

    // The plan: how many patients, and how many files of the last one.
    let (mut patients, mut total, mut current, mut superseded, mut deleted) = (0, 0, 0, 0, 0);
    let mut last_files = 0;
    while total < files {
        let mut n = 0;
        for (_, flag) in plan(patients) {
            if total == files {
                break;
            }
            match flag {
                Flag::Current => current += 1,
                Flag::Superseded => superseded += 1,
                Flag::Deleted => deleted += 1,
            }
            total += 1;
            n += 1;
        }
        last_files = n;
        patients += 1;
    }
    let generated = Generated {
        root: root.clone(),
        files,
        patients,
        current,
        superseded,
        deleted,
    };
    let stamp = format!("{GENERATOR} files={files} patients={patients}\n");
    if fs::read_to_string(&marker).is_ok_and(|m| m == stamp) {
        return Ok(generated);
    }

    if dir.exists() {
        println!(
            "removing the incomplete or outdated storage {}",
            dir.display()
        );
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    println!(
        "generating {files} files of {patients} patients in {} (once; later runs reuse it)...",
        root.display()
    );
    let start = Instant::now();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let root = &root;
                s.spawn(move || -> anyhow::Result<()> {
                    let storage = Storage::create(root)?;
                    let mut encoder = Encoder::default();
                    for i in (w..patients).step_by(usize::try_from(workers).unwrap_or(1)) {
                        let p = Patient::sample(&patient_id(i));
                        let take = if i + 1 == patients {
                            last_files
                        } else {
                            u64::MAX
                        };
                        for (k, (record, flag)) in plan(i)
                            .into_iter()
                            .take(usize::try_from(take).unwrap_or(usize::MAX))
                            .enumerate()
                        {
                            let text = message(&p, &record, &format!("{:014}", i * 100 + k as u64));
                            let bytes = encoder.encode(&text);
                            // The memo must write what the builder writes: check the first
                            // patients' files against it.
                            if i < 2 * workers {
                                ensure!(
                                    bytes == ssmix2::encode::encode(&text).bytes,
                                    "the memoized encoding differs from the builder's for {text:?}"
                                );
                            }
                            storage.put_bytes(&p, &record, flag, &bytes)?;
                        }
                        if w == 0 && i % 20_000 < workers {
                            eprint!("\r  {:>3}% ", i * 100 / patients);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        }
        Ok(())
    })
    .with_context(|| format!("cannot generate the storage in {}", root.display()))?;
    // Write the data out now, so that writeback does not run during the measurement.
    nix::unistd::sync();
    fs::write(&marker, stamp)?;
    eprintln!("\r  100%");
    println!(
        "  generated in {:.1} s ({current} current, {superseded} superseded, {deleted} deleted)",
        start.elapsed().as_secs_f64()
    );
    Ok(generated)
}
