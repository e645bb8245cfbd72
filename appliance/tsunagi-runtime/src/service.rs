//! The one shape of a service: what a service crate exports so that the binary can list it.
//!
//! Each service crate has one `pub const SERVICE: Service` next to its `run`: its name and
//! user, the capabilities and groups it needs, how it turns the validated config into what
//! the supervisor must prepare ([`Service::launch`], `None` when the config does not enable
//! it), and how it runs in its child process ([`Service::main`]: builds its settings from the
//! same config and runs until [`ServiceCtx::shutdown`]). The `tsunagi` binary keeps one
//! static list of them; adding a service is one crate plus one line there.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// The capability names services declare (re-exported so that service crates need no
/// `caps` dependency of their own).
pub use caps::Capability;
use serde::Serialize;
use tsunagi_config::Config;

use crate::child::ServiceCtx;

/// The error a service's run ends with (its source chain is what `tsunagi status` shows).
pub type ServiceError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What [`Service::main`] returns: the service's run, borrowing the config.
pub type ServiceFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ServiceError>> + 'a>>;

/// A service compiled into the binary. See the module docs.
#[derive(Clone, Copy)]
pub struct Service {
    /// `tsunagi service NAME`, the state directory's name, the name in status.
    pub name: &'static str,
    /// The system user it runs as when the supervisor is root.
    pub user: &'static str,
    /// One line for the system user's GECOS field (`tsunagi sysusers`).
    pub description: &'static str,
    /// The capabilities it keeps; every other one is dropped before its code runs.
    pub capabilities: &'static [Capability],
    /// Supplementary groups it runs with (exactly these), e.g. the decision socket's group.
    pub groups: &'static [&'static str],
    /// Worker threads of its tokio runtime.
    pub worker_threads: usize,
    /// What the supervisor prepares for it, or `None` when the config does not enable it.
    pub launch: fn(&Config) -> Option<Launch>,
    /// In the child, after privileges are dropped: builds the settings from the config and
    /// runs until `ctx.shutdown`.
    pub main: for<'a> fn(&'a Config, ServiceCtx) -> ServiceFuture<'a>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("user", &self.user)
            .field("capabilities", &self.capabilities)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

/// What the supervisor prepares for an enabled service, from the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    /// The part of the config the service reads, canonical: a change restarts it at reload.
    pub fingerprint: String,
    /// Environment variables set for the process.
    pub env: Vec<(String, String)>,
    /// Directories outside its state directory that it owns (mode 0700).
    pub extra_dirs: Vec<PathBuf>,
    /// Device nodes it opens.
    pub devices: Vec<PathBuf>,
    /// Directories it owns that members of a group may enter (mode 2750, that group).
    pub shared_dirs: Vec<(PathBuf, String)>,
}

impl Launch {
    /// A launch that needs nothing beyond its state directory; `section` is the service's own
    /// part of the config (the shared sections are always part of the fingerprint).
    pub fn reading<T: Serialize>(cfg: &Config, section: &T) -> Launch {
        Launch {
            fingerprint: fingerprint(cfg, section),
            ..Launch::default()
        }
    }
}

/// The fingerprint of a service that reads `section` and the shared sections (`[site]`,
/// `[paths]`, `[privacy]`).
pub fn fingerprint<T: Serialize>(cfg: &Config, section: &T) -> String {
    serde_json::to_string(&(&cfg.site, &cfg.paths, &cfg.privacy, section))
        .unwrap_or_else(|e| format!("unserializable: {e}"))
}

/// Boxes a service's run for [`Service::main`], erasing its error type.
pub fn boxed<'a, F, E>(run: F) -> ServiceFuture<'a>
where
    F: Future<Output = Result<(), E>> + 'a,
    E: std::error::Error + Send + Sync + 'static,
{
    Box::pin(async move { run.await.map_err(|e| Box::new(e) as ServiceError) })
}

/// A config that enables a service but lacks what it needs: config validation prevents it,
/// so this is a bug (or a config changed between the supervisor's read and the child's).
#[derive(Debug, thiserror::Error)]
#[error("the configuration does not enable service {service}")]
pub struct NotEnabled {
    pub service: &'static str,
}
