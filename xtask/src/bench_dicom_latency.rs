//! The delivery latency of `cargo xtask bench dicom` (issue 15): from the C-STORE response
//! at the box to the instance being stored at the network PACS, for a steady stream of 10
//! instances a second through the tunnel.
//!
//! The demo's whole setting, for real: the test network (hub, box and clinic namespaces),
//! the box's `tsunagi run` with the tunnel, consent and DICOM services against the hub's
//! wireguard-go, the strict FHIR server and Orthanc in the hub, a registered patient with a
//! consent and a network ID (see `demo.rs`). After one instance has gone all the way, the
//! clinic sends one small CT (dcmtk `storescu`, its own association each) every 100 ms;
//! an instance is acknowledged when its storescu exits (the C-STORE response and the
//! A-RELEASE, on the clinic's LAN), and stored when Orthanc's change feed lists it (polled
//! every 20 ms, so a figure is up to that much late). Prints p50 and p99 in milliseconds.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use hil_tests::orthanc::Orthanc;
use hil_tests::testnet::{Host, Options, TestNet};

/// Instances a second.
pub(crate) const RATE: u32 = 10;

/// What was measured.
pub(crate) struct Latency {
    pub(crate) instances: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

/// Runs the stream for `secs` seconds; `tsunagi` is the binary, `work` a scratch folder.
pub(crate) fn measure(tsunagi: &Path, work: &Path, secs: u32) -> anyhow::Result<Latency> {
    let net = TestNet::up(Options {
        hub_extra_udp_ports: vec![443],
    })
    .context("cannot bring up the test network")?;
    let dir = work.join("latency");
    let (state, run) = (dir.join("state"), dir.join("run"));
    for d in [&state, &run] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let config = dir.join("tsunagi.toml");
    let text = crate::demo::config_text(&state, &run, 9109)? + &crate::demo::tunnel_section(&net);
    std::fs::write(&config, text)?;
    crate::demo::register_box(&net, tsunagi, &config)?;
    crate::demo::start_fhir_server(&net)?;
    crate::demo::register_sample_patient(tsunagi, &config, &dir)?;
    let pacs = Orthanc::start_with(&hil_tests::orthanc::Options {
        netns: Some(net.ns(Host::Hub).to_owned()),
        ..hil_tests::orthanc::Options::default()
    })
    .context("cannot start Orthanc in the hub")?;
    let mut child = Command::new("ip")
        .args(["netns", "exec", net.ns(Host::Box)])
        .arg(tsunagi)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start tsunagi")?;
    let result = stream(&net, &pacs, &dir, secs);
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = child.wait();
    drop(pacs);
    drop(net);
    result
}

/// `storescu` of `file` from the clinic to the box; whether it was stored.
fn store(net: &TestNet, file: &Path) -> bool {
    let box_addr = net.plan().lan_box_addr.addr.to_string();
    Command::new("ip")
        .args(["netns", "exec", net.ns(Host::Clinic), "storescu", "-aec"])
        .args(["TSUNAGI-DEMO", &box_addr, "11112"])
        .arg(file)
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The SOP Instance UIDs Orthanc stored since change `since`, and the last change's number.
fn new_instances(pacs: &Orthanc, since: i64) -> anyhow::Result<(Vec<String>, i64)> {
    let changes = pacs
        .get(&format!("/changes?since={since}&limit=1000"))?
        .json();
    let mut uids = Vec::new();
    for c in changes["Changes"].as_array().into_iter().flatten() {
        if c["ChangeType"] == "NewInstance"
            && let Some(id) = c["ID"].as_str()
        {
            let tags = pacs.get(&format!("/instances/{id}"))?.json();
            if let Some(uid) = tags["MainDicomTags"]["SOPInstanceUID"].as_str() {
                uids.push(uid.to_owned());
            }
        }
    }
    let last = changes["Last"].as_i64().unwrap_or(since);
    Ok((uids, last))
}

fn stream(net: &TestNet, pacs: &Orthanc, dir: &Path, secs: u32) -> anyhow::Result<Latency> {
    let files = dir.join("instances");
    std::fs::create_dir_all(&files)?;
    let base = hil_tests::dicom_files::Ids::new(crate::demo::SSMIX2_CONSENTED);
    // One instance all the way first: the tunnel is up, the consent pushed and pulled.
    let first = hil_tests::dicom_files::japanese_ct(&files, &base)?;
    let start = Instant::now();
    let mut since = 0;
    let mut warmed = false;
    while start.elapsed() < Duration::from_secs(120) {
        if !warmed {
            warmed = store(net, &first);
        }
        let (uids, last) = new_instances(pacs, since)?;
        since = last;
        if uids.contains(&base.sop_instance_uid) {
            break;
        }
        #[expect(clippy::disallowed_methods, reason = "xtask is not async; this polls")]
        std::thread::sleep(Duration::from_millis(500));
    }
    ensure!(
        start.elapsed() < Duration::from_secs(120),
        "the first instance did not reach Orthanc through the tunnel within 2 minutes"
    );

    let n = usize::try_from(secs * RATE).unwrap_or(10);
    let mut ids = Vec::with_capacity(n);
    let mut paths = Vec::with_capacity(n);
    for _ in 0..n {
        let next = base.next_instance();
        paths.push(hil_tests::dicom_files::japanese_ct(&files, &next)?);
        ids.push(next.sop_instance_uid);
    }
    let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let failed = Arc::new(Mutex::new(0usize));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let poller = {
            let (seen, done) = (seen.clone(), done.clone());
            scope.spawn(move || -> anyhow::Result<()> {
                let mut since = since;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let (uids, last) = new_instances(pacs, since)?;
                    since = last;
                    let now = Instant::now();
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    for u in uids {
                        seen.entry(u).or_insert(now);
                    }
                    drop(seen);
                    #[expect(clippy::disallowed_methods, reason = "a poller thread")]
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            })
        };
        let t0 = Instant::now();
        let period = Duration::from_secs(1) / RATE;
        let mut senders = Vec::new();
        for (i, (path, uid)) in paths.iter().zip(&ids).enumerate() {
            let at = t0 + period * u32::try_from(i).unwrap_or(0);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                #[expect(clippy::disallowed_methods, reason = "paces the stream")]
                std::thread::sleep(wait);
            }
            let (acked, failed) = (acked.clone(), failed.clone());
            senders.push(scope.spawn(move || {
                if store(net, path) {
                    let now = Instant::now();
                    acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(uid.clone(), now);
                } else {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                }
            }));
        }
        for s in senders {
            let _ = s.join();
        }
        let waiting = Instant::now();
        while waiting.elapsed() < Duration::from_secs(60) {
            let all = {
                let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                ids.iter().all(|u| seen.contains_key(u))
            };
            if all {
                break;
            }
            #[expect(clippy::disallowed_methods, reason = "waits for the last ones")]
            std::thread::sleep(Duration::from_millis(100));
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        poller
            .join()
            .map_err(|_| anyhow::anyhow!("the poller panicked"))??;
        Ok(())
    })?;
    let failed = *failed.lock().unwrap_or_else(|p| p.into_inner());
    ensure!(failed == 0, "{failed} of {n} C-STOREs to the box failed");
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let mut ms = Vec::with_capacity(n);
    for uid in &ids {
        let (Some(a), Some(s)) = (acked.get(uid), seen.get(uid)) else {
            bail!("an instance acknowledged by the box did not reach Orthanc within a minute");
        };
        // Seen before its storescu had exited (the release still under way): 0.
        ms.push(s.saturating_duration_since(*a).as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    // The nearest rank: the value at or below which `percent` of them are.
    let pick = |percent: usize| ms[(ms.len() * percent).div_ceil(100).clamp(1, ms.len()) - 1];
    Ok(Latency {
        instances: ms.len(),
        p50_ms: pick(50),
        p99_ms: pick(99),
        max_ms: pick(100),
    })
}
