//! The box's WireGuard private key: generated on the box when absent, stored with mode 0600,
//! never logged and never sent anywhere. `Debug` of every type here is redacted
//! (wireguard-control's `Key` prints the secret in `Debug`).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use wireguard_control::Key;

/// Errors while loading or creating the private key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read private key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "private key file {path} is readable or writable by group or others (mode {mode:o}): chmod 600 it, or delete it to have a new key generated"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("private key file {path} does not hold a WireGuard key (32 bytes in base64)")]
    Invalid { path: PathBuf },
    #[error("cannot write private key file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The box's key pair. The private half never leaves this type except to WireGuard.
pub struct BoxKey {
    private: Key,
    public: Key,
}

impl std::fmt::Debug for BoxKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoxKey")
            .field("public", &self.public.to_base64())
            .field("private", &"<redacted>")
            .finish()
    }
}

impl BoxKey {
    /// The public key, base64, for the operator and the hub.
    pub fn public_base64(&self) -> String {
        self.public.to_base64()
    }

    pub(crate) fn private(&self) -> &Key {
        &self.private
    }
}

/// Whether a generated key was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Existing,
    Generated,
}

/// Loads the key at `path`, or generates and stores a new one if the file does not exist.
pub fn load_or_generate(path: &Path) -> Result<(BoxKey, Origin), KeyError> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                path: path.to_owned(),
                source,
            })?;
            let private = Key::from_base64(text.trim()).map_err(|_| KeyError::Invalid {
                path: path.to_owned(),
            })?;
            let public = private.get_public();
            Ok((BoxKey { private, public }, Origin::Existing))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let private = Key::generate_private();
            write_new(path, &private)?;
            let public = private.get_public();
            Ok((BoxKey { private, public }, Origin::Generated))
        }
        Err(source) => Err(KeyError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Loads an existing key file (a preshared key): mode 0600 or stricter, one base64 key.
pub fn load_or_generate_existing(path: &Path) -> Result<Key, KeyError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    Key::from_base64(text.trim()).map_err(|_| KeyError::Invalid {
        path: path.to_owned(),
    })
}

/// Writes a new key file atomically: a temporary file of mode 0600, fsync, rename.
fn write_new(path: &Path, key: &Key) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    // The umask may have narrowed the mode further; it can never have widened it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    file.write_all(format!("{}\n", key.to_base64()).as_bytes())
        .map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_generated_once_with_mode_0600_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let (first, origin) = load_or_generate(&path).unwrap();
        assert_eq!(origin, Origin::Generated);
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        let (again, origin) = load_or_generate(&path).unwrap();
        assert_eq!(origin, Origin::Existing);
        assert_eq!(first.public_base64(), again.public_base64());
        let debug = format!("{first:?}");
        let secret = std::fs::read_to_string(&path).unwrap();
        assert!(!debug.contains(secret.trim()), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        load_or_generate(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_generate(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        std::fs::write(&path, "not a key\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_generate(&path).unwrap_err(),
            KeyError::Invalid { .. }
        ));
    }
}
