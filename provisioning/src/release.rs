//! The update channel, the operator's side (issue 18): the TUF keys of the channel and the
//! repository that lists the release bundles (static files, for nginx at the hub or any
//! static host), written with the `tough` crate.
//!
//! Four Ed25519 keys, one per role (`root`, which stays offline, `targets`, `snapshot`,
//! `timestamp`), each a PKCS#8 file of mode 0600. The root (`root.json`, built into the
//! image) names them; the repository uses consistent snapshots, so a box never mixes
//! files of two publications. Each bundle is a target whose `custom` metadata carries its
//! version, compatible and waves ([`update::release::Custom`]).

use std::num::NonZeroU64;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use tough::editor::RepositoryEditor;
use tough::editor::signed::{PathExists, SignedRole};
use tough::key_source::{KeySource, LocalKeySource};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Target};
use update::release::{CUSTOM_KEY, Custom};

/// The TUF spec version written.
const SPEC_VERSION: &str = "1.0.0";

/// The roles, each with its key file's name.
const ROLES: [(RoleType, &str); 4] = [
    (RoleType::Root, "root.pk8"),
    (RoleType::Targets, "targets.pk8"),
    (RoleType::Snapshot, "snapshot.pk8"),
    (RoleType::Timestamp, "timestamp.pk8"),
];

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a key")]
    Key,
    #[error("the {role} key cannot be used: {reason}")]
    KeySource { role: String, reason: String },
    #[error("the update channel's metadata: {0}")]
    Tuf(Box<tough::error::Error>),
    #[error("the update channel's metadata: {0}")]
    Schema(#[from] tough::schema::Error),
    #[error("the release's metadata: {0}")]
    Custom(#[from] update::release::CustomError),
    #[error("the repository's timestamp.json at {path} cannot be read: {reason}")]
    Timestamp { path: PathBuf, reason: String },
    #[error("{path} has no file name usable as a target name")]
    TargetName { path: PathBuf },
}

impl From<tough::error::Error> for ReleaseError {
    fn from(e: tough::error::Error) -> ReleaseError {
        ReleaseError::Tuf(Box::new(e))
    }
}

/// The channel's keys: a directory with one PKCS#8 file per role.
#[derive(Debug, Clone)]
pub struct ChannelKeys {
    dir: PathBuf,
}

impl ChannelKeys {
    /// Makes the four keys in `dir` (created; existing keys are refused, never replaced).
    pub fn generate(dir: &Path) -> Result<ChannelKeys, ReleaseError> {
        std::fs::create_dir_all(dir).map_err(|source| ReleaseError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let rng = aws_lc_rs::rand::SystemRandom::new();
        for (_, file) in ROLES {
            let path = dir.join(file);
            let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| ReleaseError::Key)?;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| ReleaseError::Write {
                    path: path.clone(),
                    source,
                })?;
            std::io::Write::write_all(&mut out, pkcs8.as_ref())
                .and_then(|()| out.sync_all())
                .map_err(|source| ReleaseError::Write { path, source })?;
        }
        Ok(ChannelKeys {
            dir: dir.to_owned(),
        })
    }

    /// The keys already in `dir`.
    pub fn open(dir: &Path) -> ChannelKeys {
        ChannelKeys {
            dir: dir.to_owned(),
        }
    }

    fn source(&self, role: RoleType) -> Box<dyn KeySource> {
        let file = ROLES
            .iter()
            .find(|(r, _)| *r == role)
            .map_or("root.pk8", |(_, f)| f);
        Box::new(LocalKeySource {
            path: self.dir.join(file),
        })
    }

    fn all(&self) -> Vec<Box<dyn KeySource>> {
        ROLES.iter().map(|(r, _)| self.source(*r)).collect()
    }
}

/// A signed `root.json` (version `version`, expiring at `expires`) that names the four
/// keys of `keys`, one signature each role.
pub async fn root(
    keys: &ChannelKeys,
    version: NonZeroU64,
    expires: jiff::Timestamp,
) -> Result<Vec<u8>, ReleaseError> {
    let one = NonZeroU64::MIN;
    let mut root = Root {
        spec_version: SPEC_VERSION.to_owned(),
        consistent_snapshot: true,
        version,
        expires,
        keys: Default::default(),
        roles: Default::default(),
        _extra: Default::default(),
    };
    for (role, _) in ROLES {
        let key = keys
            .source(role)
            .as_sign()
            .await
            .map_err(|e| ReleaseError::KeySource {
                role: format!("{role:?}"),
                reason: e.to_string(),
            })?
            .tuf_key();
        let id = key.key_id().map_err(|e| ReleaseError::KeySource {
            role: format!("{role:?}"),
            reason: e.to_string(),
        })?;
        root.keys.insert(id.clone(), key);
        root.roles.insert(
            role,
            RoleKeys {
                keyids: vec![id],
                threshold: one,
                _extra: Default::default(),
            },
        );
    }
    let holder = KeyHolder::Root(root.clone());
    let signed = SignedRole::new(
        root,
        &holder,
        &[keys.source(RoleType::Root)],
        &aws_lc_rs::rand::SystemRandom::new(),
    )
    .await?;
    Ok(signed.buffer().clone())
}

/// A bundle to list: the file (its name is the target's) and what the box needs to know.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub path: PathBuf,
    pub custom: Custom,
}

/// When each role's metadata of a publication expires.
#[derive(Debug, Clone, Copy)]
pub struct Expiries {
    pub targets: jiff::Timestamp,
    pub snapshot: jiff::Timestamp,
    pub timestamp: jiff::Timestamp,
}

/// Publishes `bundles` (all the channel lists from now on) into the repository at `repo`
/// (`metadata/` and `targets/`), signed under `root_json`, with metadata versions one above
/// the last publication's. Returns that version.
pub async fn publish(
    repo: &Path,
    root_json: &Path,
    keys: &ChannelKeys,
    bundles: &[Bundle],
    expiries: &Expiries,
) -> Result<NonZeroU64, ReleaseError> {
    let metadata = repo.join("metadata");
    let targets = repo.join("targets");
    let version =
        NonZeroU64::new(last_version(&metadata)?.saturating_add(1)).unwrap_or(NonZeroU64::MAX);
    let mut editor = RepositoryEditor::new(root_json).await?;
    editor
        .targets_version(version)?
        .targets_expires(expiries.targets)?
        .snapshot_version(version)
        .snapshot_expires(expiries.snapshot)
        .timestamp_version(version)
        .timestamp_expires(expiries.timestamp);
    for bundle in bundles {
        bundle.custom.validate()?;
        let name = bundle
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ReleaseError::TargetName {
                path: bundle.path.clone(),
            })?
            .to_owned();
        let mut target = Target::from_path(&bundle.path).await?;
        target.custom.insert(
            CUSTOM_KEY.to_owned(),
            serde_json::to_value(&bundle.custom).map_err(|e| ReleaseError::Timestamp {
                path: bundle.path.clone(),
                reason: e.to_string(),
            })?,
        );
        editor.add_target(name, target)?;
    }
    let signed = editor.sign(&keys.all()).await?;
    for dir in [&metadata, &targets] {
        std::fs::create_dir_all(dir).map_err(|source| ReleaseError::Write {
            path: dir.clone(),
            source,
        })?;
    }
    for bundle in bundles {
        signed
            .copy_target(&bundle.path, &targets, PathExists::Skip, None)
            .await?;
    }
    signed.write(&metadata).await?;
    Ok(version)
}

/// The version of the repository's last publication (0: none yet).
fn last_version(metadata: &Path) -> Result<u64, ReleaseError> {
    let path = metadata.join("timestamp.json");
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(ReleaseError::Read { path, source }),
    };
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| ReleaseError::Timestamp {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    json["signed"]["version"]
        .as_u64()
        .ok_or_else(|| ReleaseError::Timestamp {
            path,
            reason: "no signed.version".to_owned(),
        })
}
