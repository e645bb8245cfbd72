//! Issue 18: the update channel against a real nginx serving a TUF repository written by
//! the release tooling (`tsunagi_provision::release`, with `tough`), over mutual TLS with the
//! box's HTTP client: what is offered in which wave, a download resumed and verified, and
//! each refusal (expired metadata, another root's keys, metadata rolled back, an older
//! release, a tampered bundle). Needs the Debian packages `nginx` and `openssl`
//! (`cargo xtask test` installs them).

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hil_tests::nginx::Nginx;
use jiff::{SignedDuration, Timestamp};
use tsunagi_provision::release::{self as tooling, Bundle, ChannelKeys, Expiries};
use update::channel::{self, Channel, ChannelError, Offer, Refusal};
use update::download::{self, DownloadError};
use update::release::{Custom, SEEDS, Version, Wave};

const COMPATIBLE: &str = "tsunagi";

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

fn hours(n: i64) -> SignedDuration {
    SignedDuration::from_hours(n)
}

/// A release's metadata: boxes with seeds below 64 from an hour ago, the rest in a day.
fn custom(version: &str, compatible: &str) -> Custom {
    let now = Timestamp::now();
    Custom {
        version: v(version),
        compatible: compatible.to_owned(),
        waves: vec![
            Wave {
                seeds_below: 64,
                starts: now - hours(1),
            },
            Wave {
                seeds_below: SEEDS,
                starts: now + hours(24),
            },
        ],
    }
}

fn month() -> Expiries {
    let later = Timestamp::now() + hours(24 * 30);
    Expiries {
        targets: later,
        snapshot: later,
        timestamp: later,
    }
}

/// The operator's side: keys, the root, and the repository in nginx's data root.
struct Operator {
    keys: ChannelKeys,
    root_json: PathBuf,
    repo: PathBuf,
    bundles: PathBuf,
}

impl Operator {
    fn new(dir: &Path, nginx: &Nginx, name: &str) -> Operator {
        let keys = ChannelKeys::generate(&dir.join(format!("{name}-keys"))).unwrap();
        let root = block(tooling::root(
            &keys,
            NonZeroU64::MIN,
            Timestamp::now() + hours(24 * 365),
        ))
        .unwrap();
        let root_json = dir.join(format!("{name}-root.json"));
        std::fs::write(&root_json, root).unwrap();
        let bundles = dir.join(format!("{name}-bundles"));
        std::fs::create_dir_all(&bundles).unwrap();
        Operator {
            keys,
            root_json,
            repo: nginx.data_root().join(name),
            bundles,
        }
    }

    /// A bundle file of `len` bytes (its content from its name).
    fn bundle(&self, file: &str, len: usize, custom: Custom) -> Bundle {
        let path = self.bundles.join(file);
        let seed = blake_like(file);
        let bytes: Vec<u8> = (0..len)
            .map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap()))
            .collect();
        std::fs::write(&path, bytes).unwrap();
        Bundle { path, custom }
    }

    fn publish(&self, bundles: &[Bundle], expiries: &Expiries) -> NonZeroU64 {
        let version = block(tooling::publish(
            &self.repo,
            &self.root_json,
            &self.keys,
            bundles,
            expiries,
        ))
        .unwrap();
        // nginx's workers read what root wrote.
        chmod_r(&self.repo);
        version
    }
}

fn blake_like(s: &str) -> u8 {
    s.bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b))
}

fn chmod_r(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chmod_r(&entry.unwrap().path());
        }
    }
}

fn block<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The box's side: its HTTP client (the network CA, its certificate) and its view of the
/// channel, trusting `root_json`.
struct BoxSide {
    client: reqwest::Client,
    channel: Channel,
    dir: tempfile::TempDir,
}

impl BoxSide {
    fn new(nginx: &Nginx, repo: &str, root_json: &Path) -> BoxSide {
        use tsunagi_runtime::http::{ClientSettings, client, load_identity, load_roots};
        let client = client(ClientSettings {
            roots: load_roots(&nginx.ca_file()).unwrap(),
            identity: Some(
                load_identity(&nginx.client_cert_file(), &nginx.client_key_file()).unwrap(),
            ),
            connect_timeout: Duration::from_secs(5),
            timeout: Some(Duration::from_secs(30)),
            keep_idle: None,
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = format!("{}/{repo}/", nginx.base_url().trim_end_matches('/'));
        let channel = Channel {
            root: std::fs::read(root_json).unwrap(),
            metadata_url: format!("{base}metadata/").parse().unwrap(),
            targets_url: format!("{base}targets/").parse().unwrap(),
            datastore: dir.path().join("tuf"),
        };
        BoxSide {
            client,
            channel,
            dir,
        }
    }

    async fn check_async(&self, running: &str, seed: u16) -> Result<Offer, ChannelError> {
        channel::check(
            &self.channel,
            self.client.clone(),
            COMPATIBLE,
            &v(running),
            seed,
            Timestamp::now(),
        )
        .await
    }

    fn check(&self, running: &str, seed: u16) -> Result<Offer, ChannelError> {
        block(self.check_async(running, seed))
    }

    fn downloads(&self) -> PathBuf {
        let d = self.dir.path().join("downloads");
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

fn refusal(result: Result<Offer, ChannelError>) -> Refusal {
    match result {
        Err(ChannelError::Refused(r)) => r,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_newer_release_is_offered_in_its_wave_and_downloaded_resumed_and_verified() {
    let nginx = Nginx::start_for_test();
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::new(dir.path(), &nginx, "channel");
    let len = 3 << 20;
    let new = op.bundle("tsunagi-1.1.0.raucb", len, custom("1.1.0", COMPATIBLE));
    // Another compatible's newer bundle is never offered to this box.
    let other = op.bundle("other-9.0.raucb", 1000, custom("9.0", "other-board"));
    op.publish(&[new.clone(), other], &month());

    let b = BoxSide::new(&nginx, "channel", &op.root_json);
    let offer = b.check("1.0.0", 10).unwrap();
    let Offer::Take(release) = offer else {
        panic!("not offered: {offer:?}")
    };
    assert_eq!(release.custom.version, v("1.1.0"));
    assert_eq!(release.length, len as u64);
    // A box in the second wave is told when.
    match b.check("1.0.0", 100).unwrap() {
        Offer::NotYet { release, starts } => {
            assert_eq!(release.custom.version, v("1.1.0"));
            assert!(starts > Timestamp::now() + hours(23), "{starts}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.check("1.1.0", 10).unwrap(), Offer::UpToDate);

    // A download that stopped after 2 MiB, of which a flush made 1 MiB durable before a
    // power cut: the rest reads as zeros (ext4 committed the length before the data). It
    // goes on from the durable 1 MiB.
    let downloads = b.downloads();
    let bytes = std::fs::read(&new.path).unwrap();
    let name = hex::encode(release.sha256);
    let partial = downloads.join(format!("{name}.partial"));
    let mark = downloads.join(format!("{name}.durable"));
    let mut cut = bytes[..2 << 20].to_vec();
    cut[1 << 20..].fill(0);
    std::fs::write(&partial, &cut).unwrap();
    std::fs::write(&mark, format!("{}\n", 1 << 20)).unwrap();
    let requests = |status: &str| {
        nginx
            .access_log()
            .lines()
            .filter(|l| l.contains(&release.file_name()) && l.contains(&format!("\" {status} ")))
            .count()
    };
    let fetched = block(download::fetch(&b.client, &b.channel, &release, &downloads)).unwrap();
    assert_eq!(fetched.resumed_from, 1 << 20);
    assert_eq!(std::fs::read(&fetched.path).unwrap(), bytes);
    assert!(!partial.exists() && !mark.exists());
    assert_eq!(
        (requests("206"), requests("200")),
        (1, 0),
        "{}",
        nginx.access_log()
    );
    // A partial download without its mark: nothing of it is known to be durable.
    std::fs::remove_file(&fetched.path).unwrap();
    std::fs::write(&partial, &bytes[..1 << 20]).unwrap();
    let fetched = block(download::fetch(&b.client, &b.channel, &release, &downloads)).unwrap();
    assert_eq!(fetched.resumed_from, 0);
    assert_eq!(std::fs::read(&fetched.path).unwrap(), bytes);
    assert_eq!(
        (requests("206"), requests("200")),
        (1, 1),
        "{}",
        nginx.access_log()
    );
    // Fetched again: the verified file, nothing downloaded.
    let again = block(download::fetch(&b.client, &b.channel, &release, &downloads)).unwrap();
    assert_eq!(again.path, fetched.path);

    // A partial download whose bytes went bad (a power cut left its tail unwritten): the
    // resumed whole does not verify, so it is fetched again from the start, and kept.
    std::fs::remove_file(&fetched.path).unwrap();
    let mut spoilt = bytes[..1 << 20].to_vec();
    spoilt[(1 << 20) - 4096..].fill(0);
    std::fs::write(&partial, &spoilt).unwrap();
    std::fs::write(&mark, format!("{}\n", 1 << 20)).unwrap();
    let fetched = block(download::fetch(&b.client, &b.channel, &release, &downloads)).unwrap();
    assert_eq!(fetched.resumed_from, 0);
    assert_eq!(std::fs::read(&fetched.path).unwrap(), bytes);
    assert_eq!(
        (requests("206"), requests("200")),
        (2, 2),
        "{}",
        nginx.access_log()
    );
    // Nothing but the verified bundle is left: no partial, mark or spoilt copy.
    let left: Vec<_> = std::fs::read_dir(&downloads)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![fetched.path.file_name().unwrap().to_owned()]);
}

#[test]
fn expired_metadata_another_roots_keys_and_rolled_back_metadata_are_refused() {
    let nginx = Nginx::start_for_test();
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::new(dir.path(), &nginx, "channel");
    let bundle = op.bundle("tsunagi-1.1.0.raucb", 4096, custom("1.1.0", COMPATIBLE));

    // A timestamp that has expired: a freeze attack (or the operator's signing lapsed).
    let mut stale = month();
    stale.timestamp = Timestamp::now() - hours(1);
    op.publish(std::slice::from_ref(&bundle), &stale);
    let b = BoxSide::new(&nginx, "channel", &op.root_json);
    assert_eq!(
        refusal(b.check("1.0.0", 10)),
        Refusal::Expired {
            role: "timestamp".into()
        }
    );

    // Fresh metadata: taken. Its copy is kept to be served again later.
    op.publish(std::slice::from_ref(&bundle), &month());
    assert!(matches!(b.check("1.0.0", 10).unwrap(), Offer::Take(_)));
    let copy = dir.path().join("copy");
    copy_dir(&op.repo, &copy);
    op.publish(std::slice::from_ref(&bundle), &month());
    assert!(matches!(b.check("1.0.0", 10).unwrap(), Offer::Take(_)));
    // The server goes back to the earlier publication (validly signed, not yet expired):
    // the box saw a newer one, and refuses.
    std::fs::remove_dir_all(&op.repo).unwrap();
    copy_dir(&copy, &op.repo);
    chmod_r(&op.repo);
    match refusal(b.check("1.0.0", 10)) {
        Refusal::Untrusted(why) => assert!(why.contains("version"), "{why}"),
        other => panic!("{other:?}"),
    }

    // A box that trusts another root (another network's keys) refuses the channel.
    let stranger = Operator::new(dir.path(), &nginx, "stranger");
    let b = BoxSide::new(&nginx, "channel", &stranger.root_json);
    assert!(matches!(
        refusal(b.check("1.0.0", 10)),
        Refusal::Untrusted(_)
    ));
}

#[test]
fn an_older_release_and_a_tampered_bundle_are_refused() {
    let nginx = Nginx::start_for_test();
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::new(dir.path(), &nginx, "channel");
    // The channel's newest release is older than the running one: a rollback.
    let old = op.bundle("tsunagi-0.9.raucb", 4096, custom("0.9", COMPATIBLE));
    op.publish(std::slice::from_ref(&old), &month());
    let b = BoxSide::new(&nginx, "channel", &op.root_json);
    assert_eq!(
        refusal(b.check("1.0.0", 10)),
        Refusal::Older {
            offered: v("0.9"),
            running: v("1.0.0")
        }
    );

    // A newer release whose bytes on the server are not the ones signed.
    let new = op.bundle("tsunagi-1.1.raucb", 8192, custom("1.1", COMPATIBLE));
    op.publish(&[old, new], &month());
    let Offer::Take(release) = b.check("1.0.0", 10).unwrap() else {
        panic!("not offered")
    };
    let served = op.repo.join("targets").join(release.file_name());
    let mut bytes = std::fs::read(&served).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&served, &bytes).unwrap();
    let downloads = b.downloads();
    match block(download::fetch(&b.client, &b.channel, &release, &downloads)) {
        Err(DownloadError::Refused(Refusal::Tampered(why))) => {
            assert!(why.contains("SHA-256"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read_dir(&downloads).unwrap().count(), 0);
    // Resumed from the tampered bytes: fetched again from the start, and refused then.
    let name = hex::encode(release.sha256);
    let partial = downloads.join(format!("{name}.partial"));
    std::fs::write(&partial, &bytes[..4096]).unwrap();
    std::fs::write(downloads.join(format!("{name}.durable")), "4096\n").unwrap();
    match block(download::fetch(&b.client, &b.channel, &release, &downloads)) {
        Err(DownloadError::Refused(Refusal::Tampered(why))) => {
            assert!(why.contains("SHA-256"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read_dir(&downloads).unwrap().count(), 0);
    let log = nginx.access_log();
    let requests: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&release.file_name()))
        .collect();
    assert!(
        requests.len() >= 3
            && requests[requests.len() - 2].contains("\" 206 ")
            && requests[requests.len() - 1].contains("\" 200 "),
        "{log}"
    );
    // Longer than signed: refused as it arrives.
    bytes.extend_from_slice(&[0; 4096]);
    std::fs::write(&served, &bytes).unwrap();
    match block(download::fetch(&b.client, &b.channel, &release, &downloads)) {
        Err(DownloadError::Refused(Refusal::Tampered(why))) => {
            assert!(why.contains("longer"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read_dir(&downloads).unwrap().count(), 0);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}
