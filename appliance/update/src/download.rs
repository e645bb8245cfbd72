//! Fetches a release's bundle to the data partition, resuming a partial download (an HTTP
//! `Range` from what is already there), and keeps it only if its length and SHA-256 are the
//! ones the signed targets metadata names. Nothing of the bundle is used before that check.

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
        let _ = std::fs::remove_file(&partial);
        if resumed_from == 0 {
            return Err(e);
        }
        tracing::warn!(
            resumed_from,
            error = %e,
            "a resumed download does not verify: fetched again from the start"
        );
        resumed_from = download(client, &url, release, &partial).await?;
        if let Err(e) = verify_off_thread(&partial, release).await {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    }
    std::fs::rename(&partial, &done).map_err(disk(&done))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(disk(dir))?;
    Ok(Fetched {
        path: done,
        resumed_from,
    })
}

fn disk(path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError {
    let path = path.to_owned();
    move |source| DownloadError::Disk { path, source }
}

/// Brings `partial` to `release.length` bytes from `url`, going on from what it holds (an
/// HTTP `Range`); returns how many bytes were there before.
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
    let mut have = file.metadata().map_err(disk(partial))?.len();
    if have > release.length {
        file.set_len(0).map_err(disk(partial))?;
        have = 0;
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
                file.set_len(0).map_err(disk(partial))?;
                have = 0;
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
                let _ = std::fs::remove_file(partial);
                return Err(Refusal::Tampered(format!(
                    "longer than the {} bytes signed",
                    release.length
                ))
                .into());
            }
            file.write_all(&chunk).map_err(disk(partial))?;
            if have / SYNC_EVERY != (have - chunk.len() as u64) / SYNC_EVERY {
                file.sync_data().map_err(disk(partial))?;
            }
        }
        file.sync_all().map_err(disk(partial))?;
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
        let stem = name
            .strip_suffix(".raucb")
            .or_else(|| name.strip_suffix(".partial"));
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
            ("notes.txt".to_owned(), 5),
        ] {
            std::fs::write(dir.path().join(file), vec![0u8; len]).unwrap();
        }
        assert_eq!(prune(dir.path(), Some(&now)).unwrap(), 320);
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
}
