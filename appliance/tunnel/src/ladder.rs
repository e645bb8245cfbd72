//! Link health and the recovery ladder, as pure logic over instants.
//!
//! Every probe interval the service feeds an [`Observation`] (did the health probe through
//! the tunnel answer; how old is the last handshake). `probe_failures` failures in a row
//! trigger the next recovery [`Step`], in order, with a growing pause between steps:
//!
//! 1. re-resolve the endpoint and set the hub peer again (a fresh session: the handshake is
//!    redone at once instead of after WireGuard's own 15–25 s timers);
//! 2. restart the data plane (userspace daemon, or re-create the kernel interface) and
//!    re-apply everything;
//! 3. move to the next configured endpoint (e.g. UDP 443 when 51820 is blocked).
//!
//! A later transport (a TCP/443 relay) becomes one more step after 3. Success resets the
//! ladder; while on an alternative endpoint, the primary is tried again every `failback`.

use std::time::{Duration, Instant};

/// WireGuard re-handshakes every 120 s; with a 25 s keepalive an idle tunnel's handshake
/// is at most about 125 s old. Older than this, something is wrong.
pub const STALE_AFTER: Duration = Duration::from_secs(135);
/// Session keys are rejected after 180 s without a new handshake.
pub const DEAD_AFTER: Duration = Duration::from_secs(180);

/// What one probe round saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub probe_ok: bool,
    pub handshake_age: Option<Duration>,
}

/// The link as reported in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Probes answer and the handshake is fresh.
    Up,
    /// Probes answer but the handshake is getting old, or a few probes failed.
    Degraded,
    /// Probes fail.
    Down,
}

/// A recovery step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Re-resolve the endpoint and set the hub peer again.
    Reconnect,
    /// Restart the data plane and re-apply everything.
    RestartDataPlane,
    /// Use endpoint number `n` (0 is `hub-endpoint`, then `alternative-endpoints`).
    UseEndpoint(usize),
}

impl Step {
    /// A short description for status and logs.
    pub fn describe(&self) -> String {
        match self {
            Step::Reconnect => "re-resolve the endpoint and reconnect".to_owned(),
            Step::RestartDataPlane => "restart the data plane".to_owned(),
            Step::UseEndpoint(0) => "go back to the primary endpoint".to_owned(),
            Step::UseEndpoint(n) => format!("switch to alternative endpoint {n}"),
        }
    }
}

/// Tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LadderConfig {
    pub probe_failures: u32,
    pub endpoints: usize,
    /// The first pause between steps; doubled after each step, up to `max_pause`.
    pub min_pause: Duration,
    pub max_pause: Duration,
    /// While on an alternative endpoint, try the primary again this often.
    pub failback: Duration,
}

/// The state of the ladder.
#[derive(Debug, Clone)]
pub struct Ladder {
    cfg: LadderConfig,
    failures: u32,
    next: usize,
    pause: Duration,
    not_before: Option<Instant>,
    endpoint: usize,
    on_alternative_since: Option<Instant>,
    ever_up: bool,
    /// A step was taken since the last successful probe.
    recovering: bool,
}

const STEPS: usize = 3;

impl Ladder {
    pub fn new(cfg: LadderConfig) -> Ladder {
        Ladder {
            cfg,
            failures: 0,
            next: 0,
            pause: cfg.min_pause,
            not_before: None,
            endpoint: 0,
            on_alternative_since: None,
            ever_up: false,
            recovering: false,
        }
    }

    /// The endpoint in use (index into primary + alternatives).
    pub fn endpoint(&self) -> usize {
        self.endpoint
    }

    /// Consecutive failed probes.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a probe ever succeeded since the service started.
    pub fn ever_up(&self) -> bool {
        self.ever_up
    }

    /// Feeds one observation; returns the link state and the step to take now, if any.
    pub fn observe(&mut self, obs: Observation, now: Instant) -> (Link, Option<Step>) {
        if obs.probe_ok {
            self.failures = 0;
            self.next = 0;
            self.pause = self.cfg.min_pause;
            self.not_before = None;
            self.ever_up = true;
            self.recovering = false;
            let link = match obs.handshake_age {
                Some(age) if age > STALE_AFTER => Link::Degraded,
                _ => Link::Up,
            };
            // Fail back to the primary endpoint now and then.
            if let Some(since) = self.on_alternative_since
                && now.saturating_duration_since(since) >= self.cfg.failback
            {
                return (link, Some(self.switch_to(0, now)));
            }
            return (link, None);
        }
        self.failures = self.failures.saturating_add(1);
        let link = if self.failures < self.cfg.probe_failures && self.ever_up && !self.recovering {
            Link::Degraded
        } else {
            Link::Down
        };
        if self.failures < self.cfg.probe_failures {
            return (link, None);
        }
        if self.not_before.is_some_and(|t| now < t) {
            return (link, None);
        }
        let mut step = self.next % STEPS;
        if step == 2 && self.cfg.endpoints < 2 {
            step = 0;
        }
        self.next = step + 1;
        self.failures = 0;
        self.recovering = true;
        self.not_before = Some(now + self.pause);
        self.pause = (self.pause * 2).min(self.cfg.max_pause);
        let action = match step {
            0 => Step::Reconnect,
            1 => Step::RestartDataPlane,
            _ => {
                let next = (self.endpoint + 1) % self.cfg.endpoints;
                self.switch_to(next, now)
            }
        };
        (link, Some(action))
    }

    fn switch_to(&mut self, endpoint: usize, now: Instant) -> Step {
        self.endpoint = endpoint;
        self.on_alternative_since = (endpoint != 0).then_some(now);
        Step::UseEndpoint(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoints: usize) -> LadderConfig {
        LadderConfig {
            probe_failures: 3,
            endpoints,
            min_pause: Duration::from_secs(1),
            max_pause: Duration::from_secs(60),
            failback: Duration::from_secs(600),
        }
    }

    const OK: Observation = Observation {
        probe_ok: true,
        handshake_age: Some(Duration::from_secs(5)),
    };
    const FAIL: Observation = Observation {
        probe_ok: false,
        handshake_age: None,
    };

    /// Feeds `n` failures one second apart; returns the steps taken.
    fn fail(l: &mut Ladder, t: &mut Instant, n: usize) -> Vec<Step> {
        let mut steps = Vec::new();
        for _ in 0..n {
            *t += Duration::from_secs(1);
            if let (_, Some(step)) = l.observe(FAIL, *t) {
                steps.push(step);
            }
        }
        steps
    }

    #[test]
    fn steps_come_in_order_after_n_failures_each() {
        let mut l = Ladder::new(cfg(2));
        let mut t = Instant::now();
        assert_eq!(l.observe(OK, t), (Link::Up, None));
        assert_eq!(fail(&mut l, &mut t, 2), vec![]);
        assert_eq!(fail(&mut l, &mut t, 1), vec![Step::Reconnect]);
        assert_eq!(fail(&mut l, &mut t, 3), vec![Step::RestartDataPlane]);
        // The pause has grown to 4 s by now: 3 more failures are enough, one second apart.
        assert_eq!(fail(&mut l, &mut t, 4), vec![Step::UseEndpoint(1)]);
        assert_eq!(l.endpoint(), 1);
    }

    #[test]
    fn link_state_follows_probes_and_handshake_age() {
        let mut l = Ladder::new(cfg(1));
        let t = Instant::now();
        // Never up: failures are "down" straight away.
        assert_eq!(l.observe(FAIL, t).0, Link::Down);
        assert_eq!(l.observe(OK, t).0, Link::Up);
        assert_eq!(l.observe(FAIL, t).0, Link::Degraded);
        // Once recovery has started the link stays down until a probe answers.
        assert_eq!(l.observe(FAIL, t).0, Link::Degraded);
        assert_eq!(l.observe(FAIL, t).0, Link::Down);
        assert_eq!(l.observe(FAIL, t + Duration::from_secs(5)).0, Link::Down);
        assert_eq!(l.observe(OK, t).0, Link::Up);
        let old = Observation {
            probe_ok: true,
            handshake_age: Some(STALE_AFTER + Duration::from_secs(1)),
        };
        assert_eq!(l.observe(old, t).0, Link::Degraded);
    }

    #[test]
    fn with_one_endpoint_the_ladder_never_switches() {
        let mut l = Ladder::new(LadderConfig {
            max_pause: Duration::from_secs(1),
            ..cfg(1)
        });
        let mut t = Instant::now();
        let steps = fail(&mut l, &mut t, 30);
        assert!(
            !steps.iter().any(|s| matches!(s, Step::UseEndpoint(_))),
            "{steps:?}"
        );
        assert_eq!(
            steps[..4],
            [
                Step::Reconnect,
                Step::RestartDataPlane,
                Step::Reconnect,
                Step::RestartDataPlane
            ]
        );
    }

    #[test]
    fn steps_back_off_up_to_the_cap() {
        let mut l = Ladder::new(LadderConfig {
            max_pause: Duration::from_secs(8),
            ..cfg(1)
        });
        let mut t = Instant::now();
        let mut at = Vec::new();
        let start = t;
        for _ in 0..200 {
            t += Duration::from_secs(1);
            if l.observe(FAIL, t).1.is_some() {
                at.push((t - start).as_secs());
            }
        }
        let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
        assert!(gaps.iter().all(|g| *g <= 8), "{gaps:?}");
    }

    #[test]
    fn success_resets_and_fails_back_to_the_primary_later() {
        let mut l = Ladder::new(cfg(2));
        let mut t = Instant::now();
        l.observe(OK, t);
        let steps = fail(&mut l, &mut t, 20);
        assert!(steps.contains(&Step::UseEndpoint(1)), "{steps:?}");
        assert_eq!(l.observe(OK, t), (Link::Up, None));
        assert_eq!(l.failures(), 0);
        // Ten minutes on the alternative: try the primary again.
        t += Duration::from_secs(601);
        assert_eq!(l.observe(OK, t), (Link::Up, Some(Step::UseEndpoint(0))));
        assert_eq!(l.endpoint(), 0);
    }
}
