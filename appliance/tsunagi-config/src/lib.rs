//! Configuration of the tsunagi edge appliance: the types, their defaults, and loading with
//! error reports a clinic operator can act on.
//!
//! The file is TOML (`/etc/tsunagi/tsunagi.toml` by default), versioned by a top-level
//! `version = 1`. Every table refuses unknown keys; durations are humantime strings such
//! as `"30s"`; values are checked as they are parsed (see the newtypes such as [`AeTitle`]),
//! and rules that span several keys live in [`Config::validate`].
//!
//! [`load`] reads a file and returns a [`Config`] or every problem found in it at once,
//! each with its line, dotted key and a one-line reason (`tsunagi config check` prints
//! them). [`parse`] does the same for text without touching the filesystem. Secrets are
//! never inlined: the config holds the path of a file, and [`load`] refuses a secret file
//! that group or others can read.
//!
//! ```
//! # use std::path::Path;
//! let text = r#"
//! version = 1
//! [site]
//! facility-code = "0112345678"
//! ae-title = "TSUNAGI"
//! [paths]
//! state-dir = "/var/lib/tsunagi"
//! runtime-dir = "/run/tsunagi"
//! "#;
//! let cfg = tsunagi_config::parse(text, Path::new("tsunagi.toml")).unwrap();
//! assert_eq!(cfg.site.ae_title.as_str(), "TSUNAGI");
//! assert_eq!(cfg.supervisor.crash_limit, 5);
//! ```

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

mod load;
mod types;

pub use load::{LoadError, Problem, Problems, check_secret_files, load, parse};
pub use types::{
    AbsPath, AeTitle, Capability, ConfigDuration, FacilityCode, LogFilter, Port, SecretFile,
    ServiceName, ValueError,
};

/// The config file format version this software reads.
pub const CURRENT_VERSION: u32 = 1;

/// Where the appliance looks for its config file unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tsunagi/tsunagi.toml";

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// File format version; must be [`CURRENT_VERSION`].
    pub version: u32,
    /// Who this appliance is on the network.
    pub site: Site,
    /// Where it keeps its files.
    pub paths: Paths,
    /// Logging.
    #[serde(default)]
    pub log: Log,
    /// Privacy of patient data in logs and diagnostics.
    #[serde(default)]
    pub privacy: Privacy,
    /// Restart and stop policy for supervised services.
    #[serde(default)]
    pub supervisor: Supervisor,
    /// Prometheus metrics endpoint; absent means metrics are off.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// The liveness heartbeat every service sends to the supervisor.
    #[serde(default)]
    pub heartbeat: Heartbeat,
    /// Fault drills, by name (`[drill.crashy]` runs as service `drill-crashy`).
    #[serde(default)]
    pub drill: BTreeMap<ServiceName, Drill>,
}

/// `[site]`: the clinic this appliance belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Site {
    /// The clinic's 医療機関コード (10 digits).
    pub facility_code: FacilityCode,
    /// The DICOM AE title this appliance uses on the network.
    pub ae_title: AeTitle,
    /// A human-readable name for the site, shown in status output.
    #[serde(default)]
    pub name: Option<String>,
}

/// `[paths]`: directories owned by the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Paths {
    /// Durable state (survives reboots), e.g. `/var/lib/tsunagi`.
    pub state_dir: AbsPath,
    /// Volatile runtime files (sockets, pid files), e.g. `/run/tsunagi`.
    pub runtime_dir: AbsPath,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Log {
    /// `tracing` filter directives; default `"info"`.
    pub filter: LogFilter,
}

/// `[privacy]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Privacy {
    /// File holding the key for keyed hashes of patient IDs in logs. Optional.
    pub id_hash_key_file: Option<SecretFile>,
}

/// `[supervisor]`: how services are started, restarted and stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Supervisor {
    /// Time between SIGTERM and SIGKILL when stopping a service; default 10s.
    pub stop_timeout: ConfigDuration,
    /// A service not ready within this time counts as a crash; default 60s.
    pub ready_timeout: ConfigDuration,
    /// First restart delay; default 1s.
    pub backoff_initial: ConfigDuration,
    /// Longest restart delay; default 60s.
    pub backoff_max: ConfigDuration,
    /// This many crashes within `crash_window` put a service in state `failed`; default 5.
    pub crash_limit: u32,
    /// Window for `crash_limit`; default 5m.
    pub crash_window: ConfigDuration,
    /// How often a failed service is retried; default 10m.
    pub failed_retry: ConfigDuration,
    /// Running this long resets the backoff; default 60s.
    pub stable_after: ConfigDuration,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self {
            stop_timeout: ConfigDuration::secs(10),
            ready_timeout: ConfigDuration::secs(60),
            backoff_initial: ConfigDuration::secs(1),
            backoff_max: ConfigDuration::secs(60),
            crash_limit: 5,
            crash_window: ConfigDuration::secs(5 * 60),
            failed_retry: ConfigDuration::secs(10 * 60),
            stable_after: ConfigDuration::secs(60),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Metrics {
    /// Address to listen on, e.g. `127.0.0.1:9464`; the port must not be 0.
    pub listen: SocketAddr,
}

/// `[heartbeat]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Heartbeat {
    /// Whether services send heartbeats; default true.
    pub enabled: bool,
    /// Time between heartbeats; default 10s.
    pub interval: ConfigDuration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: ConfigDuration::secs(10),
        }
    }
}

/// A fault drill: a diagnostic service that runs the heartbeat loop and misbehaves on
/// purpose, so operators and tests can exercise the supervisor's restart, failure and stop
/// paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Drill {
    /// Heartbeat interval of the drill; default 1s.
    pub interval: ConfigDuration,
    /// Exit (crash) this long after becoming ready; default: never.
    pub exit_after: Option<ConfigDuration>,
    /// Exit code used by `exit_after`; default 1, must not be 0.
    pub exit_code: u8,
    /// Ignore SIGTERM, so the supervisor has to SIGKILL it; default false.
    pub ignore_sigterm: bool,
    /// Never report ready, so the ready timeout fires; default false.
    pub never_ready: bool,
    /// Spawn a long-lived child process (tests process-group cleanup); default false.
    pub subprocess: bool,
    /// Capabilities the drill asks for; default none.
    pub capabilities: Vec<Capability>,
}

impl Default for Drill {
    fn default() -> Self {
        Self {
            interval: ConfigDuration::secs(1),
            exit_after: None,
            exit_code: 1,
            ignore_sigterm: false,
            never_ready: false,
            subprocess: false,
            capabilities: Vec::new(),
        }
    }
}

/// A broken cross-field rule: the key it is reported at, the reason, and every key the rule
/// reads (so a rule about a key that was removed for another problem is not reported).
pub(crate) struct Rule {
    pub(crate) path: Vec<String>,
    pub(crate) reason: String,
    pub(crate) involves: Vec<String>,
}

impl Config {
    /// Cross-field rules that no single value can check.
    ///
    /// Returns every broken rule. The problems have `line: None`: [`parse`] and [`load`]
    /// fill in the line from the file. Keys are dotted paths of bare keys
    /// (`"supervisor.backoff-initial"`, `"drill.crashy.exit-code"`).
    pub fn validate(&self) -> Vec<Problem> {
        self.rules()
            .into_iter()
            .map(|rule| Problem {
                line: None,
                key: rule.path.join("."),
                reason: rule.reason,
            })
            .collect()
    }

    pub(crate) fn rules(&self) -> Vec<Rule> {
        let mut out = Vec::new();
        let mut broken = |key: &str, reason: String, involves: &[&str]| {
            out.push(Rule {
                path: key.split('.').map(str::to_owned).collect(),
                reason,
                involves: involves.iter().map(|k| (*k).to_owned()).collect(),
            });
        };

        if self.version != CURRENT_VERSION {
            broken(
                "version",
                load::version_reason(self.version.into()),
                &["version"],
            );
        }

        let state = self.paths.state_dir.as_path();
        let runtime = self.paths.runtime_dir.as_path();
        let both = ["paths.state-dir", "paths.runtime-dir"];
        // `Path` equality and `starts_with` compare components, so `/a/` and `/a/.` match `/a`.
        if state == runtime {
            broken(
                "paths.runtime-dir",
                "runtime-dir must not be the same directory as state-dir".into(),
                &both,
            );
        } else if runtime.starts_with(state) {
            broken(
                "paths.runtime-dir",
                format!(
                    "runtime-dir {} is inside state-dir {}; they must be separate directories",
                    self.paths.runtime_dir, self.paths.state_dir
                ),
                &both,
            );
        } else if state.starts_with(runtime) {
            broken(
                "paths.state-dir",
                format!(
                    "state-dir {} is inside runtime-dir {}; they must be separate directories",
                    self.paths.state_dir, self.paths.runtime_dir
                ),
                &both,
            );
        }

        let sup = &self.supervisor;
        if sup.backoff_initial > sup.backoff_max {
            broken(
                "supervisor.backoff-initial",
                format!(
                    "backoff-initial ({}) must not be longer than backoff-max ({})",
                    sup.backoff_initial, sup.backoff_max
                ),
                &["supervisor.backoff-initial", "supervisor.backoff-max"],
            );
        }
        if sup.crash_limit == 0 {
            broken(
                "supervisor.crash-limit",
                "crash-limit must be at least 1".into(),
                &["supervisor.crash-limit"],
            );
        }

        if let Some(metrics) = &self.metrics
            && metrics.listen.port() == 0
        {
            broken(
                "metrics.listen",
                "the metrics port must not be 0 (pick a fixed port such as 9464)".into(),
                &["metrics.listen"],
            );
        }

        for (name, drill) in &self.drill {
            if drill.exit_code == 0 {
                let key = format!("drill.{name}.exit-code");
                broken(
                    &key,
                    "exit-code must not be 0: a drill's exit is a crash".into(),
                    &[&key],
                );
            }
        }

        out
    }

    /// Every secret file named in the config, with the dotted key that names it.
    pub fn secret_files(&self) -> Vec<(&'static str, &SecretFile)> {
        let mut out = Vec::new();
        if let Some(file) = &self.privacy.id_hash_key_file {
            out.push(("privacy.id-hash-key-file", file));
        }
        out
    }
}

#[cfg(test)]
mod tests;
