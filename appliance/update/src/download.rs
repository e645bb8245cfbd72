//! Fetches a release's bundle to the data partition, resuming a partial download (an HTTP
//! `Range` from what is already there), and keeps it only if its length and SHA-256 are the
//! ones the signed targets metadata names. Nothing of the bundle is used before that check.
//!
//! A partial download is trusted only as far as a flush made it durable, which its
//! `SHA256.durable` mark records: after a power cut, ext4 can show a file longer than what
//! reached the disk, the rest reading as zeros (its blocks were allocated, and the size
//! committed, before their data was written). The bytes past the mark are fetched again.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use reqwest::StatusCode;

use crate::channel::{Channel, Refusal};
use crate::release::Release;

/// What arrives is made durable every this many bytes: a power cut loses at most this much
/// of a download, and the next try resumes from there.
const SYNC_EVERY: u64 = 8 << 20;

/// Why a download did not finish.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The network; what arrived is kept for the next try.
    #[error("the bundle cannot be fetched from {url}: {reason}")]
    Network { url: String, reason: String },
    #[error("the bundle cannot be written to {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not the ones signed: thrown away, audited.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// How a download went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The verified bundle.
    pub path: PathBuf,
    /// Bytes that were already there from an earlier try.
    pub resumed_from: u64,
}

/// Downloads `release` from `channel` into `dir` (which exists), resuming what an earlier
/// call left, and returns the verified bundle's path (`dir/SHA256.raucb`).
///
/// A resumed download that does not verify is fetched once more from its first byte
/// before it counts as tampered: what an earlier try left may be what spoilt it (a power
/// cut can leave a partial file's tail unwritten).
pub async fn fetch(
    client: &reqwest::Client,
    channel: &Channel,
    release: &Release,
    dir: &Path,
) -> Result<Fetched, DownloadError> {
    let name = hex::encode(release.sha256);
    let done = dir.join(format!("{name}.raucb"));
    let partial = dir.join(format!("{name}.partial"));
    if done.exists() {
        // Verified before it got its name; checked again in case the disk changed since.
        verify_off_thread(&done, release).await?;
        return Ok(Fetched {
            path: done,
            resumed_from: release.length,
        });
    }
    let url = channel
        .targets_url
        .join(&release.file_name())
        .map_err(|e| DownloadError::Network {
            url: channel.targets_url.to_string(),
            reason: e.to_string(),
        })?;
    let mut resumed_from = download(client, &url, release, &partial).await?;
    if let Err(e) = verify_off_thread(&partial, release).await {
        if resumed_from == 0 {
            forget(&partial);
            return Err(e);
        }
        // Kept aside until the download from the start verifies: where the two differ says
        // what spoilt it.
        let bad = partial.with_extension("bad");
        let kept = std::fs::rename(&partial, &bad).is_ok();
        forget(&partial);
        resumed_from = download(client, &url, release, &partial).await?;
        if let Err(e) = verify_off_thread(&partial, release).await {
            forget(&partial);
            let _ = std::fs::remove_file(&bad);
            return Err(e);
        }
        let difference = if kept {
            first_difference(&bad, &partial)
        } else {
            None
        };
        let _ = std::fs::remove_file(&bad);
        tracing::warn!(
            resumed_from,
            first_difference = ?difference,
            error = %e,
            "a resumed download did not verify: fetched again from the start, and that verifies"
        );
    }
    std::fs::rename(&partial, &done).map_err(disk(&done))?;
    let _ = std::fs::remove_file(durable_mark(&partial));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(disk(dir))?;
    Ok(Fetched {
        path: done,
        resumed_from,
    })
}

/// `partial`'s durable mark: how many of its first bytes a flush made durable (decimal).
fn durable_mark(partial: &Path) -> PathBuf {
    partial.with_extension("durable")
}

/// The durable length the mark of `partial` records; 0 without a readable one.
fn read_durable(partial: &Path) -> u64 {
    std::fs::read_to_string(durable_mark(partial))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Records that the first `length` bytes of `partial` are durable (after a flush).
fn write_durable(partial: &Path, length: u64) -> Result<(), DownloadError> {
    let mark = durable_mark(partial);
    tsunagi_state::replace_file(&mark, format!("{length}\n").as_bytes(), 0o600).map_err(disk(&mark))
}

/// Removes `partial` and its mark.
fn forget(partial: &Path) {
    let _ = std::fs::remove_file(partial);
    let _ = std::fs::remove_file(durable_mark(partial));
}

/// The first offset at which the files `a` and `b` differ (the shorter one's length if one
/// is a prefix of the other); `None` if they are the same or cannot be read.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let (mut a, mut b) = (std::fs::File::open(a).ok()?, std::fs::File::open(b).ok()?);
    let (mut x, mut y) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut offset = 0u64;
    loop {
        let n = read_full(&mut a, &mut x).ok()?;
        let m = read_full(&mut b, &mut y).ok()?;
        if let Some(i) = x[..n.min(m)]
            .iter()
            .zip(&y[..n.min(m)])
            .position(|(p, q)| p != q)
        {
            return Some(offset + i as u64);
        }
        if n != m {
            return Some(offset + n.min(m) as u64);
        }
        if n == 0 {
            return None;
        }
        offset += n as u64;
    }
}

/// Reads until `buf` is full or the file ends; how many bytes.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn disk(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError {
    let path = path.to_owned();
    move |source| DownloadError::Disk { path, source }
}

/// Brings `partial` to `release.length` bytes from `url`, going on from what it holds as
/// far as its durable mark (an HTTP `Range`); returns how many bytes were kept.
async fn download(
    client: &reqwest::Client,
    url: &reqwest::Url,
    release: &Release,
    partial: &Path,
) -> Result<u64, DownloadError> {
    let network = |reason: String| DownloadError::Network {
        url: url.to_string(),
        reason,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)
        .map_err(disk(partial))?;
    let length = file.metadata().map_err(disk(partial))?.len();
    let mut have = length.min(read_durable(partial));
    if have > release.length {
        have = 0;
    }
    if have < length {
        // The mark first: never a mark beyond what the file holds durably.
        write_durable(partial, have)?;
        file.set_len(have).map_err(disk(partial))?;
        if have > 0 {
            tracing::info!(
                length,
                durable = have,
                "a partial download is kept as far as it was durable"
            );
        }
    }
    let resumed_from = have;
    if have < release.length {
        let mut request = client.get(url.clone());
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| network(tsunagi_runtime::child::error_chain(&e)))?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT if have > 0 => {}
            StatusCode::OK => {
                // The server sends it whole: start again.
                if have > 0 {
                    write_durable(partial, 0)?;
                    file.set_len(0).map_err(disk(partial))?;
                    have = 0;
                }
            }
            status => return Err(network(format!("the server answered {status}"))),
        }
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| network(tsunagi_runtime::child::error_chain(&e)))?
        {
            have += chunk.len() as u64;
            if have > release.length {
                drop(file);
                forget(partial);
                return Err(Refusal::Tampered(format!(
                    "longer than the {} bytes signed",
                    release.length
                ))
                .into());
            }
            file.write_all(&chunk).map_err(disk(partial))?;
            if have / SYNC_EVERY != (have - chunk.len() as u64) / SYNC_EVERY {
                file.sync_data().map_err(disk(partial))?;
                write_durable(partial, have)?;
            }
        }
        file.sync_all().map_err(disk(partial))?;
        write_durable(partial, have)?;
    }
    Ok(resumed_from)
}

/// Removes from `dir` every bundle and partial download but those of `keep` (the release
/// the box takes now, if any): a superseded release, or one the channel no longer offers,
/// would otherwise hold its hundreds of MB of the data partition for good. Returns the
/// bytes freed. A missing `dir` holds nothing.
pub fn prune(dir: &Path, keep: Option<&[u8; 32]>) -> std::io::Result<u64> {
    let kept = keep.map(hex::encode);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut freed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // A mark being replaced is `.SHA256.durable.new`.
        let plain = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".new"))
            .unwrap_or(&name);
        let stem = ["raucb", "partial", "durable", "bad"]
            .iter()
            .find_map(|ext| plain.strip_suffix(ext)?.strip_suffix('.'));
        let Some(stem) = stem else { continue };
        if kept.as_deref() == Some(stem) {
            continue;
        }
        let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(entry.path())?;
        freed += bytes;
    }
    Ok(freed)
}

/// [`verify`] on a blocking thread (a bundle is hundreds of MB).
async fn verify_off_thread(path: &Path, release: &Release) -> Result<(), DownloadError> {
    let (path, release) = (path.to_owned(), release.clone());
    let disk_path = path.clone();
    tokio::task::spawn_blocking(move || verify(&path, &release))
        .await
        .map_err(|e| DownloadError::Disk {
            path: disk_path,
            source: std::io::Error::other(e.to_string()),
        })?
}

/// `path` holds exactly the signed bytes of `release`.
fn verify(path: &Path, release: &Release) -> Result<(), DownloadError> {
    let mut file = std::fs::File::open(path).map_err(|source| DownloadError::Disk {
        path: path.to_owned(),
        source,
    })?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut length = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|source| DownloadError::Disk {
            path: path.to_owned(),
            source,
        })?;
        if n == 0 {
            break;
        }
        length += n as u64;
        digest.update(&buf[..n]);
    }
    if length != release.length {
        return Err(Refusal::Tampered(format!(
            "{length} bytes where {} were signed",
            release.length
        ))
        .into());
    }
    if digest.finish().as_ref() != release.sha256 {
        return Err(Refusal::Tampered("its SHA-256 is not the one signed".into()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_release_taken_now_and_nothing_else_of_ours() {
        let dir = tempfile::tempdir().unwrap();
        let (now, old) = ([0xabu8; 32], [0x01u8; 32]);
        let name = |sha: &[u8; 32], ext: &str| format!("{}.{ext}", hex::encode(sha));
        for (file, len) in [
            (name(&now, "partial"), 10),
            (name(&old, "raucb"), 300),
            (name(&old, "partial"), 20),
            (name(&old, "durable"), 3),
            (name(&old, "bad"), 40),
            (format!(".{}.new", name(&old, "durable")), 2),
            ("notes.txt".to_owned(), 5),
        ] {
            std::fs::write(dir.path().join(file), vec![0u8; len]).unwrap();
        }
        assert_eq!(prune(dir.path(), Some(&now)).unwrap(), 365);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![name(&now, "partial"), "notes.txt".to_owned()]);
        // Up to date: no bundle stays.
        assert_eq!(prune(dir.path(), None).unwrap(), 10);
        assert_eq!(prune(&dir.path().join("absent"), None).unwrap(), 0);
    }

    #[test]
    fn a_partial_download_is_trusted_as_far_as_its_durable_mark() {
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("ab.partial");
        assert_eq!(read_durable(&partial), 0);
        write_durable(&partial, 8 << 20).unwrap();
        assert_eq!(read_durable(&partial), 8 << 20);
        std::fs::write(durable_mark(&partial), "not a length").unwrap();
        assert_eq!(read_durable(&partial), 0);
        std::fs::write(&partial, b"x").unwrap();
        forget(&partial);
        assert!(!partial.exists() && !durable_mark(&partial).exists());
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut bytes = vec![7u8; 200_000];
        std::fs::write(&a, &bytes).unwrap();
        std::fs::write(&b, &bytes).unwrap();
        assert_eq!(first_difference(&a, &b), None);
        bytes[150_000] = 0;
        std::fs::write(&b, &bytes).unwrap();
        assert_eq!(first_difference(&a, &b), Some(150_000));
        std::fs::write(&b, &bytes[..70_000]).unwrap();
        assert_eq!(first_difference(&a, &b), Some(70_000));
    }
}
