//! `cargo xtask bench dicom`: how fast the box's DICOM SCP takes in instances, and how much
//! memory the DICOM service needs, against dcmtk's `storescp` on the same files in the same
//! run (issue 6, acceptance 7).
//!
//! - Ours: the real `tsunagi run` with only the `dicom` service, its spool in a fresh state
//!   directory: every instance streamed to disk, fsync'ed and queued before its C-STORE-RSP.
//!   The forwarder has no consent service to ask, so it forwards nothing and stays idle.
//! - Peer: `storescp --output-directory OUT` (dcmtk, one association at a time, no fsync);
//!   for the 4-association workload also `storescp --fork` (a process per association), and
//!   the faster of the two is the peer (issue 15).
//! - Both advertise the same maximum PDU ([`PDU`]) and run with `TCP_NODELAY=1` in a network
//!   namespace of their own (loopback only). The sender is [`crate::dicom_send`] (one
//!   association per folder, each file's data set sent as it is on disk), timed from the
//!   first association to the last instance stored. It replaced dcmtk's `storescu`, which
//!   was the limit: `storescp --ignore` took storescu's large files only 1.2-1.7× as fast
//!   as storescp stored them, so no receiver could show more (`docs/dicom-ingest-profile.md`).
//!   A fresh receiver per run, after a `sync` (storescp's writeback must not land in the
//!   next run); every run checks that every instance was stored, and the spool or output is
//!   removed afterwards.
//! - Workloads (as in `../shared/reference/dicom.md` §3): 500 copies of pydicom's
//!   `CT_small.dcm`, each with its own SOP Instance UID (dcmtk `dcmodify -gin`), and 4
//!   Multi-frame Grayscale Word Secondary Capture instances of 100/200/300/400 frames of
//!   512×512×16 bits (about 524 MB); and 2 VL Whole Slide Microscopy instances of 24×24
//!   uncompressed 256×256 RGB tiles (about 226 MB). Generated once into `target/bench-dicom/`. The small
//!   files are sent over 4 parallel associations (the headline figure: a clinic's modalities
//!   send at once, and storescp serves one association at a time) and over one; a storescp
//!   `--ignore` run (receiving, storing nothing) shows the sender's own limit on one
//!   association, and a `--fork --ignore` run the 4 senders' limit (no receiver can be
//!   faster on this machine, whose cores they share); for the large files, the disk's own
//!   limit is the same bytes written and made durable the way the spool does it, without
//!   DICOM (no receiver that answers only once an instance is durable can be faster).
//! - Peak RSS: ours is the DICOM service process's `VmHWM` (after both workloads), the
//!   peer's is GNU time's `%M`.
//! - Targets (issue 15): ≥ 1.5× the faster storescp's files/s over 4 associations, ≥ 1.0×
//!   storescp's over one, ≥ 2.0× its MB/s for the large files, peak RSS ≤ 32 MiB.
//!
//! The smoke run of `cargo xtask test` (`TSUNAGI_BENCH_SECS` set) uses 50 small files, one
//! 20-frame instance, one measured run and the debug build; its figures are not a verdict.
//! Needs root (network namespaces), dcmtk, GNU time and pydicom's test files (all installed
//! by `cargo xtask test`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use hil_tests::dicom_files::{
    Ids, MultiFrame, Slide, multi_frame, pydicom_test_files, whole_slide,
};
use hil_tests::orthanc::Netns;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::process::display;

/// Changes whenever the generated files change, so a stale cache is rebuilt.
const GENERATOR: &str = "dicom-bench-v2";
const GNU_TIME: &str = "/usr/bin/time";
/// The maximum PDU both receivers advertise (the box's default).
const PDU: u32 = 65536;
const PEER_PORT: u16 = 11113;
const OUR_PORT: u16 = 11112;
const OUR_AE: &str = "TSUNAGI-BENCH";
const PEER_AE: &str = "DCMTKSCP";
/// Measured runs of each receiver and workload (alternating); the median is reported.
const RUNS: usize = 5;
const SEND_TIMEOUT: Duration = Duration::from_secs(600);
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One set of files, sent over one association per folder, in parallel.
struct Workload {
    name: &'static str,
    dirs: Vec<PathBuf>,
    files: usize,
    bytes: u64,
}

/// One measured run.
struct Run {
    secs: f64,
    rss_kib: u64,
}

pub(crate) fn run() -> anyhow::Result<()> {
    let smoke = std::env::var_os("TSUNAGI_BENCH_SECS").is_some();
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the DICOM benchmark needs root (a network namespace of its own)"
    );
    for (tool, package) in [
        (GNU_TIME, "time"),
        ("/usr/bin/storescp", "dcmtk"),
        ("/usr/bin/storescu", "dcmtk"),
        ("/usr/bin/dcmodify", "dcmtk"),
    ] {
        ensure!(
            Path::new(tool).exists(),
            "{tool} is missing: install the Debian package `{package}` (cargo xtask test does)"
        );
    }
    let (tsunagi, target, profile) = crate::bench::build_tsunagi(smoke)?;

    let cache = target.join("bench-dicom");
    let workloads = ensure_data(&cache, smoke)?;
    let work = cache.join(format!("run-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    // The service's user must reach its state directory.
    set_mode(&work, 0o755)?;
    // The delivery latency through the tunnel first (its own test network).
    let latency = crate::bench_dicom_latency::measure(&tsunagi, &work, if smoke { 3 } else { 30 })
        .context("the delivery-latency run");
    let latency = match latency {
        Ok(l) => l,
        Err(e) => {
            let _ = fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    let ns = Netns::create().context("create the benchmark's network namespace")?;
    let result = measure(&ns, &tsunagi, profile, smoke, &workloads, &work, &latency);
    drop(ns);
    let _ = fs::remove_dir_all(&work);
    result
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn measure(
    ns: &Netns,
    tsunagi: &Path,
    profile: &str,
    smoke: bool,
    workloads: &Workloads,
    work: &Path,
    latency: &crate::bench_dicom_latency::Latency,
) -> anyhow::Result<()> {
    let runs = if smoke { 1 } else { RUNS };
    println!(
        "DICOM ingest: the box's SCP (tsunagi run, {profile} build{}) vs dcmtk storescp, \
         max PDU {PDU} both, TCP_NODELAY=1, {runs} measured run(s) each after one unmeasured \
         warm-up, medians",
        if smoke {
            ": smoke run, the figures are not a verdict"
        } else {
            ""
        }
    );
    let mut ours_rss = 0u64;
    let mut peer_rss = 0u64;
    let mut figures = Vec::new();
    for w in [
        &workloads.small,
        &workloads.small4,
        &workloads.large,
        &workloads.wsi,
    ] {
        println!(
            "workload {}: {} files, {:.1} MB, {} association(s) in parallel",
            w.name,
            w.files,
            mb(w.bytes),
            w.dirs.len()
        );
        // Over several associations the peer also runs with --fork (a process per
        // association, as a PACS would serve them), and the faster of the two is the peer.
        let fork = w.dirs.len() > 1;
        let mut ours = Vec::new();
        let mut peer = Vec::new();
        let mut forked = Vec::new();
        for rep in 0..=runs {
            // Each run starts with nothing dirty in the page cache: storescp does not fsync,
            // and its writeback must not land in the next run's figures.
            sync();
            let p = run_peer(ns, w, work, Peer::Plain)?;
            let f = if fork {
                sync();
                Some(run_peer(ns, w, work, Peer::Fork)?)
            } else {
                None
            };
            sync();
            let o = run_ours(ns, tsunagi, w, work)?;
            let label = if rep == 0 {
                "warm-up".to_owned()
            } else {
                format!("run {rep}")
            };
            println!(
                "  {label}: ours {:.3} s ({:.1} MiB), storescp {:.3} s ({:.1} MiB){}",
                o.secs,
                mib(o.rss_kib),
                p.secs,
                mib(p.rss_kib),
                f.as_ref()
                    .map(|f| format!(", storescp --fork {:.3} s", f.secs))
                    .unwrap_or_default()
            );
            ours_rss = ours_rss.max(o.rss_kib);
            peer_rss = peer_rss.max(p.rss_kib);
            if rep > 0 {
                ours.push(o.secs);
                peer.push(p.secs);
                forked.extend(f.map(|f| f.secs));
            }
        }
        figures.push((
            median(&mut ours),
            median(&mut peer),
            (!forked.is_empty()).then(|| median(&mut forked)),
        ));
    }
    // The sender's own limit: storescp receiving and discarding (--ignore), one association.
    let mut null = Vec::new();
    for _ in 0..runs {
        sync();
        null.push(run_peer(ns, &workloads.small, work, Peer::Ignore)?.secs);
    }
    let null_fps = workloads.small.files as f64 / median(&mut null);
    // And over 4 associations (storescp --fork --ignore): the most any receiver can take
    // from these 4 senders on this machine (they share its cores).
    let mut null4 = Vec::new();
    for _ in 0..runs {
        sync();
        null4.push(run_peer(ns, &workloads.small4, work, Peer::ForkIgnore)?.secs);
    }
    let null4_fps = workloads.small4.files as f64 / median(&mut null4);
    // And for the large files (one association): a receiver that stores them can at best
    // approach this.
    let mut null_large = Vec::new();
    for _ in 0..runs {
        sync();
        null_large.push(run_peer(ns, &workloads.large, work, Peer::Ignore)?.secs);
    }
    let null_large_mbps = mb(workloads.large.bytes) / median(&mut null_large);
    // And the disk's: the large files' bytes written where the receivers store them and
    // made durable, as the box does (writeback started every 8 MiB, one fdatasync a file).
    // A receiver that answers only once an instance is durable cannot be faster.
    let mut disk = Vec::new();
    for _ in 0..runs {
        sync();
        disk.push(durable_copy(&workloads.large, work)?);
    }
    let disk_mbps = mb(workloads.large.bytes) / median(&mut disk);

    let fps = |w: &Workload, secs: f64| w.files as f64 / secs;
    let (small_ours, small_peer, _) = figures[0];
    let (small4_ours, small4_plain, small4_fork) = figures[1];
    let (large_ours, large_peer, _) = figures[2];
    let (wsi_ours, wsi_peer, _) = figures[3];
    let wsi_mbps = mb(workloads.wsi.bytes) / wsi_ours;
    let wsi_peer_mbps = mb(workloads.wsi.bytes) / wsi_peer;
    let wsi_ratio = wsi_mbps / wsi_peer_mbps;
    let small1_fps = fps(&workloads.small, small_ours);
    let small1_peer_fps = fps(&workloads.small, small_peer);
    let small_fps = fps(&workloads.small4, small4_ours);
    let small_plain_fps = fps(&workloads.small4, small4_plain);
    let small_fork_fps = small4_fork.map_or(0.0, |secs| fps(&workloads.small4, secs));
    // The target is against the faster peer.
    let small_peer_fps = small_plain_fps.max(small_fork_fps);
    let large_mbps = mb(workloads.large.bytes) / large_ours;
    let large_peer_mbps = mb(workloads.large.bytes) / large_peer;
    let small1_ratio = small1_fps / small1_peer_fps;
    let small_ratio = small_fps / small_peer_fps;
    let large_ratio = large_mbps / large_peer_mbps;
    let rss_mib = mib(ours_rss);
    let verdict = |met: bool| {
        if smoke {
            "not judged in a smoke run"
        } else if met {
            "met"
        } else {
            "NOT met"
        }
    };
    println!("result:");
    println!(
        "  {} small, 4 associations: {small_fps:.0} files/s; storescp {small_plain_fps:.0} files/s, \
         storescp --fork {small_fork_fps:.0} files/s; against the faster: {small_ratio:.2}x (target ≥ 1.5: {}); \
         the senders' own limit (storescp --fork --ignore, storing nothing): {null4_fps:.0} files/s, {:.2}x the faster",
        workloads.small.files,
        verdict(small_ratio >= 1.5),
        null4_fps / small_peer_fps
    );
    println!(
        "  {} small, 1 association: {small1_fps:.0} files/s, storescp {small1_peer_fps:.0} files/s: {small1_ratio:.2}x \
         (target ≥ 1.0: {}); the sender's own limit (storescp --ignore, storing nothing): {null_fps:.0} files/s, {:.2}x storescp",
        workloads.small.files,
        verdict(small1_ratio >= 1.0),
        null_fps / small1_peer_fps
    );
    println!(
        "  large: {large_mbps:.0} MB/s, storescp {large_peer_mbps:.0} MB/s: {large_ratio:.2}x (target ≥ 2.0: {}); \
         the sender's own limit (storescp --ignore, storing nothing): {null_large_mbps:.0} MB/s, {:.2}x storescp",
        verdict(large_ratio >= 2.0),
        null_large_mbps / large_peer_mbps
    );
    println!(
        "  the disk's own limit for the large files (written and made durable, no DICOM): \
         {disk_mbps:.0} MB/s, {:.2}x storescp",
        disk_mbps / large_peer_mbps
    );
    println!(
        "  whole-slide ({} files, {:.0} MB): {wsi_mbps:.0} MB/s, storescp {wsi_peer_mbps:.0} MB/s: {wsi_ratio:.2}x",
        workloads.wsi.files,
        mb(workloads.wsi.bytes)
    );
    println!(
        "  delivery latency through the tunnel, {} instances at {}/s: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (C-STORE response at the box to stored at Orthanc)",
        latency.instances,
        crate::bench_dicom_latency::RATE,
        latency.p50_ms,
        latency.p99_ms,
        latency.max_ms
    );
    println!(
        "  peak RSS of the DICOM service: {rss_mib:.1} MiB (target ≤ 32: {}); storescp {:.1} MiB",
        verdict(rss_mib <= 32.0),
        mib(peer_rss)
    );
    println!(
        "{{\"bench\":\"dicom\",\"small_files_per_s\":{small_fps:.1},\"small_ratio_vs_storescp\":{small_ratio:.3},\"large_mb_per_s\":{large_mbps:.1},\"large_ratio_vs_storescp\":{large_ratio:.3},\"peak_rss_mib\":{rss_mib:.1},\"small_associations\":4,\"small_1assoc_files_per_s\":{small1_fps:.1},\"small_1assoc_ratio_vs_storescp\":{small1_ratio:.3},\"sender_limit_1assoc_files_per_s\":{null_fps:.1},\"sender_limit_4assoc_files_per_s\":{null4_fps:.1},\"sender_limit_large_mb_per_s\":{null_large_mbps:.1},\"disk_limit_large_mb_per_s\":{disk_mbps:.1},\"storescp_small_files_per_s\":{small_plain_fps:.1},\"storescp_fork_small_files_per_s\":{small_fork_fps:.1},\"storescp_large_mb_per_s\":{large_peer_mbps:.1},\"wsi_mb_per_s\":{wsi_mbps:.1},\"storescp_wsi_mb_per_s\":{wsi_peer_mbps:.1},\"wsi_ratio_vs_storescp\":{wsi_ratio:.3},\"delivery_latency_p50_ms\":{:.1},\"delivery_latency_p99_ms\":{:.1},\"delivery_latency_max_ms\":{:.1},\"delivery_latency_instances\":{},\"delivery_rate_per_s\":{},\"storescp_peak_rss_mib\":{:.1},\"small_files\":{},\"large_mb\":{:.1},\"max_pdu\":{PDU},\"profile\":\"{profile}\"}}",
        latency.p50_ms,
        latency.p99_ms,
        latency.max_ms,
        latency.instances,
        crate::bench_dicom_latency::RATE,
        mib(peer_rss),
        workloads.small.files,
        mb(workloads.large.bytes),
    );
    Ok(())
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The three workloads: the small files over one association, the same files split into
/// four folders (hard links) for four parallel associations, the large files.
struct Workloads {
    small: Workload,
    small4: Workload,
    large: Workload,
    wsi: Workload,
}

/// The generated files, written once into `cache` (a `complete` marker says a set was
/// written to the end).
fn ensure_data(cache: &Path, smoke: bool) -> anyhow::Result<Workloads> {
    let base = cache
        .join(GENERATOR)
        .join(if smoke { "smoke" } else { "full" });
    let (copies, frames): (usize, &[u32]) = if smoke {
        (48, &[20])
    } else {
        (500, &[100, 200, 300, 400])
    };
    let small_dir = base.join("small");
    let split: Vec<PathBuf> = (0..4).map(|n| base.join(format!("small4/{n}"))).collect();
    if !base.join("small.complete").exists() {
        let _ = fs::remove_dir_all(&small_dir);
        let _ = fs::remove_dir_all(base.join("small4"));
        fs::create_dir_all(&small_dir)?;
        for d in &split {
            fs::create_dir_all(d)?;
        }
        let ct = pydicom_test_files()?.join("CT_small.dcm");
        let mut files = Vec::new();
        for n in 0..copies {
            let file = small_dir.join(format!("ct{n:04}.dcm"));
            fs::copy(&ct, &file).with_context(|| format!("copy {}", ct.display()))?;
            files.push(file);
        }
        // A new SOP Instance UID in each copy (the meta header follows).
        let mut modify = Command::new("dcmodify");
        modify.args(["-nb", "-gin"]).args(&files);
        let out = modify
            .output()
            .with_context(|| format!("run {}", display(&modify)))?;
        ensure!(
            out.status.success(),
            "dcmodify failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (n, file) in files.iter().enumerate() {
            let name = file.file_name().context("a generated file has no name")?;
            fs::hard_link(file, split[n % split.len()].join(name))?;
        }
        fs::write(base.join("small.complete"), b"")?;
    }
    let large_dir = base.join("large");
    if !base.join("large.complete").exists() {
        let _ = fs::remove_dir_all(&large_dir);
        fs::create_dir_all(&large_dir)?;
        let mut ids = Ids::new("BENCH001");
        for &f in frames {
            multi_frame(
                &large_dir,
                &ids,
                MultiFrame {
                    rows: 512,
                    columns: 512,
                    frames: f,
                },
            )?;
            ids = ids.next_instance();
        }
        fs::write(base.join("large.complete"), b"")?;
    }
    // Whole-slide images (pathology): uncompressed 256×256 RGB tiles, so the figure is
    // about moving a scanner's volume, not a codec.
    let wsi_dir = base.join("wsi");
    if !base.join("wsi.complete").exists() {
        let _ = fs::remove_dir_all(&wsi_dir);
        fs::create_dir_all(&wsi_dir)?;
        let (count, side) = if smoke { (1, 4) } else { (2, 24) };
        let mut ids = Ids::new("BENCH002");
        for _ in 0..count {
            whole_slide(
                &wsi_dir,
                &ids,
                Slide {
                    across: side,
                    down: side,
                },
                false,
            )?;
            ids = ids.next_instance();
        }
        fs::write(base.join("wsi.complete"), b"")?;
    }
    let workload = |name, dirs: Vec<PathBuf>| -> anyhow::Result<Workload> {
        let mut files = 0;
        let mut bytes = 0;
        for dir in &dirs {
            for e in fs::read_dir(dir)? {
                files += 1;
                bytes += e?.metadata()?.len();
            }
        }
        Ok(Workload {
            name,
            dirs,
            files,
            bytes,
        })
    };
    Ok(Workloads {
        small: workload("small", vec![small_dir])?,
        small4: workload("small, 4 associations", split)?,
        large: workload("large", vec![large_dir])?,
        wsi: workload("whole-slide", vec![wsi_dir])?,
    })
}

/// Each of the workload's folders sent to `port` in the namespace over an association of
/// its own ([`crate::dicom_send`]), all at once; the wall time from the first start to
/// the last instance stored.
fn send(ns: &Netns, called: &str, port: u16, w: &Workload) -> anyhow::Result<f64> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    // One thread in the namespace; the senders' threads it spawns are in it too.
    let results: Vec<anyhow::Result<()>> = ns.run(|| {
        std::thread::scope(|scope| {
            let senders: Vec<_> = w
                .dirs
                .iter()
                .map(|dir| {
                    scope.spawn(move || {
                        crate::dicom_send::send_folder(
                            addr,
                            "BENCHSCU",
                            called,
                            PDU,
                            dir,
                            SEND_TIMEOUT,
                        )
                    })
                })
                .collect();
            senders
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a sender thread panicked")))
                })
                .collect()
        })
    })?;
    let secs = start.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    Ok(secs)
}

/// Waits until something answers a C-ECHO on `port` with AE title `called`.
fn wait_for_echo(
    ns: &Netns,
    called: &str,
    port: u16,
    child: &mut Child,
    what: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let mut echo = ns.command("echoscu");
        echo.args(["-aec", called, "127.0.0.1"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if echo.status().is_ok_and(|s| s.success()) {
            return Ok(());
        }
        if let Some(s) = child.try_wait()? {
            bail!("{what} ended before it answered ({s})");
        }
        ensure!(
            start.elapsed() < START_TIMEOUT,
            "{what} did not answer a C-ECHO within {START_TIMEOUT:?}"
        );
        pause(Duration::from_millis(100));
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the benchmark polls external processes"
)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Writes the bytes of every file of `w` into a fresh folder under `work` and makes each
/// durable as the box's spool does (the writeback of each 8 MiB started as it is written,
/// then one `fdatasync` a file); the seconds it took.
fn durable_copy(w: &Workload, work: &Path) -> anyhow::Result<f64> {
    use std::io::{Read as _, Write as _};
    const CHUNK: usize = 8 << 20;
    let out = work.join("disk");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    for dir in &w.dirs {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let mut from = fs::File::open(&path)?;
            let mut to = fs::File::create(out.join(path.file_name().context("no file name")?))?;
            let mut written = 0i64;
            loop {
                let n = from.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                to.write_all(&buf[..n])?;
                let _ = nix::fcntl::posix_fadvise(
                    &to,
                    written,
                    i64::try_from(n)?,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
                );
                written += i64::try_from(n)?;
            }
            to.sync_data()?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    fs::remove_dir_all(&out)?;
    Ok(secs)
}

/// `sync`: writes back everything dirty (the previous run's output is removed first).
fn sync() {
    let _ = Command::new("sync").status();
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}

/// How the peer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// `storescp`: one association at a time.
    Plain,
    /// `storescp --fork`: a process per association.
    Fork,
    /// `storescp --ignore`: receiving and discarding (the sender's own limit).
    Ignore,
    /// `storescp --fork --ignore`: the senders' own limit over several associations.
    ForkIgnore,
}

/// A fresh storescp for one run.
fn run_peer(ns: &Netns, w: &Workload, work: &Path, peer: Peer) -> anyhow::Result<Run> {
    let ignore = matches!(peer, Peer::Ignore | Peer::ForkIgnore);
    let out = work.join("storescp");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let rss = work.join("storescp.rss");
    let _ = fs::remove_file(&rss);
    let mut cmd = ns.command(GNU_TIME);
    cmd.arg("-o")
        .arg(&rss)
        .args(["-f", "%M", "storescp", "-aet", PEER_AE, "--max-pdu"])
        .arg(PDU.to_string())
        .arg("--output-directory")
        .arg(&out)
        .args(ignore.then_some("--ignore"))
        .args(matches!(peer, Peer::Fork | Peer::ForkIgnore).then_some("--fork"))
        .arg(PEER_PORT.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", display(&cmd)))?;
    let result = (|| {
        wait_for_echo(ns, PEER_AE, PEER_PORT, &mut child, "storescp")?;
        let secs = send(ns, PEER_AE, PEER_PORT, w)?;
        let stored = if ignore { w.files } else { count_files(&out) };
        ensure!(
            stored == w.files,
            "storescp stored {stored} of {} files",
            w.files
        );
        Ok(secs)
    })();
    // GNU time waits for storescp and then writes its figure: stop storescp, not time
    // (with --fork, each association's process has answered its last instance and exits
    // with it).
    stop_children_of(&child);
    let _ = child.wait();
    let _ = fs::remove_dir_all(&out);
    let secs = result?;
    let rss_kib = fs::read_to_string(&rss)
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| l.trim().parse().ok()))
        .with_context(|| format!("no peak RSS in {}", rss.display()))?;
    Ok(Run { secs, rss_kib })
}

/// SIGTERM to the direct children of `child` (GNU time's one child).
fn stop_children_of(child: &Child) {
    let pid = child.id();
    let list = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in list
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        let _ = kill(Pid::from_raw(c), Signal::SIGTERM);
    }
}

fn run_ours(ns: &Netns, tsunagi: &Path, w: &Workload, work: &Path) -> anyhow::Result<Run> {
    let dir = work.join("box");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    set_mode(&dir, 0o755)?;
    let config = dir.join("tsunagi.toml");
    fs::write(
        &config,
        format!(
            "version = 1\n\n[site]\nfacility-code = \"1312345678\"\nae-title = \"{OUR_AE}\"\n\n\
             [paths]\nstate-dir = \"{state}\"\nruntime-dir = \"{run}\"\n\n\
             [heartbeat]\nenabled = false\n\n\
             [dicom]\nlisten = \"127.0.0.1:{OUR_PORT}\"\nmax-pdu = {PDU}\npatient-ids = \"as-is\"\n\
             [dicom.pacs]\nae-title = \"NETWORK-PACS\"\naddress = \"127.0.0.1:9\"\n",
            state = dir.join("state").display(),
            run = dir.join("run").display(),
        ),
    )?;
    let log = fs::File::create(dir.join("tsunagi.log"))?;
    let mut cmd = ns.command(tsunagi);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", display(&cmd)))?;
    let result = (|| {
        wait_for_echo(ns, OUR_AE, OUR_PORT, &mut child, "tsunagi")?;
        let pid = dicom_pid(tsunagi, &config)?;
        let secs = send(ns, OUR_AE, OUR_PORT, w)?;
        // Rows follow the answers by milliseconds (the spool writes them together).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stored = queued(tsunagi, &config)?;
        while stored < w.files && Instant::now() < deadline {
            pause(Duration::from_millis(20));
            stored = queued(tsunagi, &config)?;
        }
        ensure!(
            stored == w.files,
            "the box spooled {stored} of {} files",
            w.files
        );
        let rss_kib = vm_hwm(pid)?;
        Ok(Run { secs, rss_kib })
    })();
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let _ = child.wait();
    let outcome = result.map_err(|e| {
        let log = fs::read_to_string(dir.join("tsunagi.log")).unwrap_or_default();
        let tail: String = log
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        e.context(format!("tsunagi's log ends:\n{tail}"))
    });
    let _ = fs::remove_dir_all(&dir);
    outcome
}

/// How many instances the box's spool holds, from `tsunagi dicom list` (small instances
/// are records in spool segments, not files of their own).
fn queued(tsunagi: &Path, config: &Path) -> anyhow::Result<usize> {
    let mut cmd = Command::new(tsunagi);
    cmd.args(["dicom", "--json", "--config"])
        .arg(config)
        .args(["list", "--state", "pending", "--limit", "1000000"]);
    let out = cmd
        .output()
        .with_context(|| format!("run {}", display(&cmd)))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        display(&cmd),
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} printed no JSON", display(&cmd)))?;
    list.as_array()
        .map(Vec::len)
        .context("`tsunagi dicom list --json` printed no list")
}

/// The DICOM service's pid, from `tsunagi status --json`.
fn dicom_pid(tsunagi: &Path, config: &Path) -> anyhow::Result<u32> {
    let mut cmd = Command::new(tsunagi);
    cmd.args(["status", "--json", "--config"]).arg(config);
    let out = cmd
        .output()
        .with_context(|| format!("run {}", display(&cmd)))?;
    let status: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} printed no JSON", display(&cmd)))?;
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "dicom"))
        .and_then(|s| s["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .context("the supervisor reports no pid for the dicom service")
}

/// A process's peak resident set (`VmHWM`), KiB.
fn vm_hwm(pid: u32) -> anyhow::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}
