//! Reads the update channel (a TUF repository) with `tough`, and says what it offers this
//! box.
//!
//! The root of trust is the `root.json` built into the image; `tough` walks the root
//! chain from it, then timestamp, snapshot and targets, each verified against the keys the
//! root names, checked for expiry, and never older than what this box saw before (the
//! datastore in the box's state keeps the newest metadata it trusted). Bytes reach `tough`
//! through [`Http`]: the box's one HTTP client, under its TLS policy.

use std::path::PathBuf;

use bytes::Bytes;
use reqwest::Url;
use tough::{Transport, TransportError, TransportErrorKind, TransportStream};

use crate::release::{CUSTOM_KEY, Custom, Release, Version};

/// Where the channel is and what this box trusts of it.
#[derive(Debug, Clone)]
pub struct Channel {
    /// The trusted `root.json` (the image's).
    pub root: Vec<u8>,
    /// The repository's `metadata/` and `targets/` (each ending in `/`).
    pub metadata_url: Url,
    pub targets_url: Url,
    /// Where `tough` keeps the newest metadata it trusted (the box's state).
    pub datastore: PathBuf,
}

/// Why the channel said nothing this time (tried again later).
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the update channel cannot be reached: {0}")]
    Unreachable(String),
    /// The channel's server refused over TLS (another CA, expired, another name): the reason.
    #[error("TLS with the update channel failed: {0}")]
    TlsRefused(String),
    #[error("the update channel's metadata cannot be kept in {path}: {reason}")]
    Datastore { path: PathBuf, reason: String },
    /// Refused: audited, and nothing is taken from the channel until it changes.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// What the box refuses of the channel (each one is a Security Alert in the audit trail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the update channel's {role} metadata has expired (refused: a freeze attack, or the operator's signing lapsed)"
    )]
    Expired { role: String },
    #[error(
        "the update channel's metadata is not signed by the keys this box trusts, or is older than what it saw before (refused): {0}"
    )]
    Untrusted(String),
    #[error(
        "the update channel's release {target} has metadata the box cannot read (refused): {reason}"
    )]
    Unreadable { target: String, reason: String },
    #[error("release {offered} is older than the running {running} (refused: a rollback)")]
    Older { offered: Version, running: Version },
    #[error("the downloaded bundle is not the one signed (refused): {0}")]
    Tampered(String),
}

/// What the channel offers this box now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Nothing newer than the running version.
    UpToDate,
    /// A newer release, and this box's wave has started.
    Take(Release),
    /// A newer release whose wave for this box starts later.
    NotYet {
        release: Release,
        starts: jiff::Timestamp,
    },
}

/// The box's HTTP client as `tough`'s transport: a `GET` per file, streamed.
#[derive(Debug, Clone)]
pub struct Http {
    pub client: reqwest::Client,
}

#[async_trait::async_trait]
impl Transport for Http {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let other = |e: reqwest::Error| {
            TransportError::new_with_cause(TransportErrorKind::Other, url.as_str(), e)
        };
        if !matches!(url.scheme(), "https" | "http") {
            return Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                url.as_str(),
            ));
        }
        let response = self.client.get(url.clone()).send().await.map_err(other)?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Err(TransportError::new(
                TransportErrorKind::FileNotFound,
                url.as_str(),
            ));
        }
        let response = response.error_for_status().map_err(other)?;
        let url = url.to_string();
        let chunks = futures_util::stream::unfold(Some(response), move |state| {
            let url = url.clone();
            async move {
                let mut response = state?;
                match response.chunk().await {
                    Ok(Some(chunk)) => Some((Ok::<Bytes, TransportError>(chunk), Some(response))),
                    Ok(None) => None,
                    Err(e) => Some((
                        Err(TransportError::new_with_cause(
                            TransportErrorKind::Other,
                            url,
                            e,
                        )),
                        None,
                    )),
                }
            }
        });
        Ok(Box::pin(chunks))
    }
}

/// What the repository at `channel` offers a box of `compatible` running `running`, whose
/// wave seed is `seed`, at `now`.
pub async fn check(
    channel: &Channel,
    client: reqwest::Client,
    compatible: &str,
    running: &Version,
    seed: u16,
    now: jiff::Timestamp,
) -> Result<Offer, ChannelError> {
    std::fs::create_dir_all(&channel.datastore).map_err(|e| ChannelError::Datastore {
        path: channel.datastore.clone(),
        reason: e.to_string(),
    })?;
    let repo = tough::RepositoryLoader::new(
        &channel.root,
        channel.metadata_url.clone(),
        channel.targets_url.clone(),
    )
    .transport(Http { client })
    .datastore(channel.datastore.clone())
    .expiration_enforcement(tough::ExpirationEnforcement::Safe)
    .load()
    .await
    .map_err(|e| classify(e, channel))?;
    let newest = releases(&repo, compatible)?
        .into_iter()
        .max_by(|a, b| a.custom.version.cmp(&b.custom.version));
    let Some(release) = newest else {
        return Ok(Offer::UpToDate);
    };
    match release.custom.version.cmp(running) {
        std::cmp::Ordering::Less => Err(Refusal::Older {
            offered: release.custom.version,
            running: running.clone(),
        }
        .into()),
        std::cmp::Ordering::Equal => Ok(Offer::UpToDate),
        std::cmp::Ordering::Greater => match release.custom.starts_for(seed) {
            Some(starts) if starts <= now => Ok(Offer::Take(release)),
            Some(starts) => Ok(Offer::NotYet { release, starts }),
            None => Err(Refusal::Unreadable {
                target: release.target,
                reason: format!("no wave holds this box's seed {seed}"),
            }
            .into()),
        },
    }
}

/// The releases for `compatible` the verified targets metadata lists. A target that claims
/// our metadata but whose metadata cannot be read refuses the whole channel (fail closed:
/// it might be the newest).
fn releases(repo: &tough::Repository, compatible: &str) -> Result<Vec<Release>, Refusal> {
    let mut found = Vec::new();
    for (name, target) in repo.targets().signed.targets_iter() {
        let target_name = name.raw().to_owned();
        let Some(custom) = target.custom.get(CUSTOM_KEY) else {
            continue;
        };
        let unreadable = |reason: String| Refusal::Unreadable {
            target: target_name.clone(),
            reason,
        };
        let custom: Custom =
            serde_json::from_value(custom.clone()).map_err(|e| unreadable(e.to_string()))?;
        custom.validate().map_err(|e| unreadable(e.to_string()))?;
        if custom.compatible != compatible {
            continue;
        }
        let sha256: [u8; 32] = target
            .hashes
            .sha256
            .as_ref()
            .try_into()
            .map_err(|_| unreadable("its SHA-256 is not 32 bytes".into()))?;
        found.push(Release {
            target: target_name,
            length: target.length,
            sha256,
            custom,
        });
    }
    Ok(found)
}

/// A `tough` error as a reason to wait (the network, our own disk) or a refusal (anything
/// the metadata itself is to blame for).
fn classify(error: tough::error::Error, channel: &Channel) -> ChannelError {
    use tough::error::Error as E;
    match error {
        E::Transport { .. } => match tsunagi_runtime::http::tls_refusal(&error) {
            Some(reason) => ChannelError::TlsRefused(reason),
            None => ChannelError::Unreachable(tsunagi_runtime::child::error_chain(&error)),
        },
        E::DatastoreInit { .. }
        | E::DatastoreCreate { .. }
        | E::DatastoreOpen { .. }
        | E::DatastoreRemove { .. }
        | E::DatastoreSerialize { .. } => ChannelError::Datastore {
            path: channel.datastore.clone(),
            reason: tsunagi_runtime::child::error_chain(&error),
        },
        E::ExpiredMetadata { role, .. } => Refusal::Expired {
            role: role.to_string(),
        }
        .into(),
        other => Refusal::Untrusted(tsunagi_runtime::child::error_chain(&other)).into(),
    }
}
