//! The box's clock against the hub's time server (IHE Consistent Time, issue 17): asked over
//! SNTP (RFC 5905, the `rsntp` crate) through the tunnel every `time-check-interval`. The box's
//! clock is kept by chrony; this is the check that it is right, in status and metrics.
//!
//! - More than [`TOLERANCE`] off the hub's clock: `off`.
//! - No valid answer for [`LOST_AFTER`] checks in a row: `lost` (the time server or the way
//!   to it is gone; chrony cannot keep the clock either).
//!
//! Each change of state is logged once (offsets only: no patient data here).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How far the box's clock may be off the hub's (IHE CT: 1 s).
pub(crate) const TOLERANCE: f64 = 1.0;

/// Checks without a valid answer before the sync counts as lost.
pub(crate) const LOST_AFTER: u32 = 3;

/// What the last checks showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum State {
    /// Not asked yet, or no answer yet (fewer than [`LOST_AFTER`] failures).
    Unknown,
    /// Within [`TOLERANCE`]; the offset in seconds (the hub's clock minus the box's).
    InStep(f64),
    /// Beyond [`TOLERANCE`]; the offset in seconds (the hub's clock minus the box's).
    Off(f64),
    /// No valid answer for [`LOST_AFTER`] checks in a row.
    Lost,
}

/// The clock check of the tunnel service.
#[derive(Debug)]
pub(crate) struct Clock {
    server: SocketAddr,
    interval: Duration,
    timeout: Duration,
    next: Instant,
    failures: u32,
    state: State,
    last_answer: Option<Instant>,
    last_error: Option<String>,
}

impl Clock {
    pub(crate) fn new(server: SocketAddr, interval: Duration, timeout: Duration) -> Clock {
        Clock {
            server,
            interval,
            timeout,
            next: Instant::now(),
            failures: 0,
            state: State::Unknown,
            last_answer: None,
            last_error: None,
        }
    }

    /// Asks the time server if a check is due (the caller cancels it on a stop).
    pub(crate) async fn check_if_due(&mut self) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + self.interval;
        let answer = ask(self.server, self.timeout).await;
        self.observe(answer, Instant::now());
    }

    /// Takes one check's outcome: the offset in seconds, or why there is none.
    fn observe(&mut self, answer: Result<f64, String>, now: Instant) {
        let state = match answer {
            Ok(offset) => {
                self.failures = 0;
                self.last_answer = Some(now);
                self.last_error = None;
                if offset.abs() > TOLERANCE {
                    State::Off(offset)
                } else {
                    State::InStep(offset)
                }
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.last_error = Some(e);
                if self.failures >= LOST_AFTER {
                    State::Lost
                } else {
                    // Keep what the last answer showed until the sync counts as lost.
                    self.state
                }
            }
        };
        if std::mem::discriminant(&state) != std::mem::discriminant(&self.state) {
            match state {
                State::InStep(offset) => {
                    tracing::info!(offset_s = offset, server = %self.server, "the clock is in step with the hub's");
                }
                State::Off(offset) => tracing::warn!(
                    offset_s = offset,
                    server = %self.server,
                    "the box's clock is more than 1 s off the hub's"
                ),
                State::Lost => tracing::warn!(
                    server = %self.server,
                    checks = self.failures,
                    error = self.last_error.as_deref().unwrap_or(""),
                    "no answer from the hub's time server: clock sync lost"
                ),
                State::Unknown => {}
            }
        }
        self.state = state;
    }

    /// Whether the health should be degraded for the clock.
    /// The time server asked.
    pub(crate) fn server(&self) -> SocketAddr {
        self.server
    }

    /// The state as the audit trail names it (`in-step`, `off`, `lost`), with the offset in
    /// milliseconds when known; `None` before the first answer.
    pub(crate) fn audit_state(&self) -> Option<(&'static str, Option<i64>)> {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "milliseconds of a clock offset"
        )]
        let ms = |s: f64| Some((s * 1000.0).round() as i64);
        match self.state {
            State::Unknown => None,
            State::InStep(o) => Some(("in-step", ms(o))),
            State::Off(o) => Some(("off", ms(o))),
            State::Lost => Some(("lost", None)),
        }
    }

    pub(crate) fn is_bad(&self) -> bool {
        matches!(self.state, State::Off(_) | State::Lost)
    }

    /// The clock's part of the status summary.
    pub(crate) fn describe(&self) -> String {
        let server = self.server;
        match self.state {
            State::Unknown => format!("clock: not checked yet against {server}"),
            State::InStep(offset) => {
                format!("clock in step with the hub's ({offset:+.3} s, {server})")
            }
            State::Off(offset) => format!(
                "clock {:.1} s {} the hub's, beyond 1 s ({server})",
                offset.abs(),
                if offset > 0.0 { "behind" } else { "ahead of" }
            ),
            State::Lost => format!(
                "clock sync lost: the hub's time server {server} has not answered {} checks{}{}",
                self.failures,
                self.last_answer.map_or_else(
                    || " (never answered)".to_owned(),
                    |at| format!(" (last answer {}s ago)", at.elapsed().as_secs())
                ),
                self.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        }
    }

    /// The clock's metrics.
    pub(crate) fn metrics(&self) -> Vec<(&'static str, f64)> {
        let mut m = vec![
            (
                "clock_in_step",
                f64::from(u8::from(matches!(self.state, State::InStep(_)))),
            ),
            (
                "clock_sync_lost",
                f64::from(u8::from(self.state == State::Lost)),
            ),
            ("clock_failed_checks", f64::from(self.failures)),
        ];
        if let State::InStep(offset) | State::Off(offset) = self.state {
            m.push(("clock_offset_seconds", offset));
        }
        m
    }
}

/// One SNTP exchange with `server`: the hub's clock minus the box's, in seconds. rsntp checks
/// the reply (mode, the request's timestamp echoed, kiss-o'-death, an unsynchronised server).
async fn ask(server: SocketAddr, timeout: Duration) -> Result<f64, String> {
    let client = rsntp::AsyncSntpClient::with_config(rsntp::Config::default().timeout(timeout));
    match tokio::time::timeout(
        timeout + Duration::from_millis(100),
        client.synchronize(server),
    )
    .await
    {
        Ok(Ok(result)) => Ok(result.clock_offset().as_secs_f64()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> Clock {
        Clock::new(
            "10.98.0.1:123".parse().unwrap(),
            Duration::from_secs(64),
            Duration::from_secs(2),
        )
    }

    #[test]
    fn an_offset_within_1_s_is_in_step_and_beyond_it_is_off() {
        let mut c = clock();
        let now = Instant::now();
        c.observe(Ok(0.25), now);
        assert_eq!(c.state, State::InStep(0.25));
        assert!(!c.is_bad());
        c.observe(Ok(-600.0), now);
        assert_eq!(c.state, State::Off(-600.0));
        assert!(c.is_bad());
        assert!(
            c.describe().contains("600.0 s ahead of the hub's"),
            "{}",
            c.describe()
        );
        c.observe(Ok(600.0), now);
        assert!(
            c.describe().contains("600.0 s behind the hub's"),
            "{}",
            c.describe()
        );
        assert!(c.metrics().contains(&("clock_offset_seconds", 600.0)));
        assert!(c.metrics().contains(&("clock_in_step", 0.0)));
    }

    #[test]
    fn three_checks_without_an_answer_lose_the_sync_and_one_answer_brings_it_back() {
        let mut c = clock();
        let now = Instant::now();
        c.observe(Ok(0.01), now);
        c.observe(Err("timeout".into()), now);
        c.observe(Err("timeout".into()), now);
        // Two failures: what the last answer showed still stands.
        assert_eq!(c.state, State::InStep(0.01));
        c.observe(Err("timeout".into()), now);
        assert_eq!(c.state, State::Lost);
        assert!(c.is_bad());
        assert!(
            c.describe().contains("has not answered 3 checks"),
            "{}",
            c.describe()
        );
        assert!(c.metrics().contains(&("clock_sync_lost", 1.0)));
        c.observe(Ok(0.02), now);
        assert_eq!(c.state, State::InStep(0.02));
        assert_eq!(
            c.metrics()
                .iter()
                .find(|m| m.0 == "clock_failed_checks")
                .map(|m| m.1),
            Some(0.0)
        );
    }

    /// A real exchange needs a server: the service test (`tsunagi` tests, `tunnel.rs`) asks
    /// chronyd in the hub's namespace. Here: nobody answers on a closed loopback port.
    #[tokio::test]
    async fn no_server_is_an_error_not_a_hang() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        drop(socket);
        let started = Instant::now();
        assert!(ask(addr, Duration::from_millis(300)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
