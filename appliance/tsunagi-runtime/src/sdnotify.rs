//! The systemd notification protocol (`sd_notify`), written directly to `$NOTIFY_SOCKET`.
//!
//! Without systemd (no `NOTIFY_SOCKET`) every call is a no-op, so the supervisor behaves the
//! same in a terminal, in tests and under systemd.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to systemd's notification socket, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring `WATCHDOG_PID`).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_str()?.to_owned();
            let addr = match path.strip_prefix('@') {
                Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// How often to send `WATCHDOG=1`: half the configured watchdog interval.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends one notification (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`).
    /// Failures are logged at debug level: systemd going away must not stop the appliance.
    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.target
            && let Err(error) = sock.send_to_addr(state.as_bytes(), addr)
        {
            tracing::debug!(error = &error as &dyn std::error::Error, "sd_notify failed");
        }
    }
}
