//! The status model: what `tsunagi status` prints and the metrics endpoint exports.
//!
//! These types are the JSON wire format of the control socket, so they are `Serialize` and
//! `Deserialize`; field names are part of the contract that scripts depend on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a supervised service is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// The process has been started and has not reported ready yet.
    Starting,
    /// The process reported ready and is running.
    Ready,
    /// The process exited unexpectedly; it will be restarted after a backoff delay.
    Backoff,
    /// The process crashed too often within the crash window; it is retried slowly.
    Failed,
    /// The supervisor asked the process to stop and is waiting for it.
    Stopping,
    /// Not running, on purpose (supervisor shutting down).
    Stopped,
}

impl ServiceState {
    /// Every state, in a fixed order (used for metrics).
    pub const ALL: [ServiceState; 6] = [
        ServiceState::Starting,
        ServiceState::Ready,
        ServiceState::Backoff,
        ServiceState::Failed,
        ServiceState::Stopping,
        ServiceState::Stopped,
    ];

    /// The name used in JSON, tables and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Starting => "starting",
            ServiceState::Ready => "ready",
            ServiceState::Backoff => "backoff",
            ServiceState::Failed => "failed",
            ServiceState::Stopping => "stopping",
            ServiceState::Stopped => "stopped",
        }
    }
}

/// Health as the service itself judges it (reported over the status socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// No report yet.
    #[default]
    Unknown,
    /// Working as intended.
    Ok,
    /// Working, but something needs attention (the summary says what).
    Degraded,
}

/// One service as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    pub health: Health,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// How many times the process was started again after the first start.
    pub restarts: u32,
    /// The last error: the child's own report, or how the process ended.
    pub last_error: Option<String>,
    /// Seconds since the current process started; null when not running.
    pub uptime_secs: Option<u64>,
    /// The service's own one-line summary (never patient data).
    pub summary: String,
    /// The system user the process runs as (null when the supervisor is unprivileged).
    pub user: Option<String>,
    /// The service's own metrics, as last reported (exported as `tsunagi_SERVICE_NAME`).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// The supervisor itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    pub pid: u32,
    pub version: String,
    /// Whether services run under their own users with dropped capabilities.
    pub privileged: bool,
    /// Whether every enabled service has been ready or failed at least once (READY=1 sent).
    pub ready: bool,
    pub uptime_secs: u64,
    pub config: String,
}

/// The answer to a status request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub supervisor: SupervisorStatus,
    pub services: Vec<ServiceStatus>,
}
