//! The restart policy, as pure logic over instants so that it is tested without waiting.
//!
//! A crashed service is restarted after `initial × 2^(n−1)` (n = consecutive crashes), capped
//! at `max`, with ±20 % jitter so that services that failed together do not restart in step.
//! A run that lasted `stable_after` resets the count. `crash_limit` crashes within
//! `crash_window` mark the service failed: it is then retried every `failed_retry`, and a
//! retry that crashes before becoming stable goes straight back to failed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The tunables, from the `[supervisor]` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub crash_limit: u32,
    pub crash_window: Duration,
    pub failed_retry: Duration,
    pub stable_after: Duration,
}

/// What to do after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start again after this delay.
    RestartAfter(Duration),
    /// Mark the service failed; retry after this delay.
    Failed { retry_after: Duration },
}

/// The crash record of one service.
#[derive(Debug, Clone, Default)]
pub struct CrashHistory {
    crashes: VecDeque<Instant>,
    consecutive: u32,
    failed: bool,
}

impl CrashHistory {
    /// Records a crash at `now` of a process that ran for `ran_for`. `jitter` is a number in
    /// `[0, 1)` (random in production, fixed in tests).
    pub fn on_crash(
        &mut self,
        policy: &RestartPolicy,
        now: Instant,
        ran_for: Duration,
        jitter: f64,
    ) -> Decision {
        if ran_for >= policy.stable_after {
            self.consecutive = 0;
            self.failed = false;
        }
        self.crashes.push_back(now);
        while let Some(first) = self.crashes.front() {
            if now.saturating_duration_since(*first) > policy.crash_window {
                self.crashes.pop_front();
            } else {
                break;
            }
        }
        let limit = usize::try_from(policy.crash_limit.max(1)).unwrap_or(usize::MAX);
        if self.failed || self.crashes.len() >= limit {
            self.failed = true;
            return Decision::Failed {
                retry_after: policy.failed_retry,
            };
        }
        let exponent = self.consecutive.min(30);
        self.consecutive = self.consecutive.saturating_add(1);
        let base = policy
            .backoff_initial
            .saturating_mul(1u32 << exponent)
            .min(policy.backoff_max);
        let factor = 0.8 + 0.4 * jitter.clamp(0.0, 1.0);
        Decision::RestartAfter(base.mul_f64(factor).min(policy.backoff_max))
    }

    /// Whether the last decision was [`Decision::Failed`].
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Forgets everything (the service's configuration changed).
    pub fn reset(&mut self) {
        *self = CrashHistory::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            crash_limit: 5,
            crash_window: Duration::from_secs(300),
            failed_retry: Duration::from_secs(600),
            stable_after: Duration::from_secs(60),
        }
    }

    fn delays(
        history: &mut CrashHistory,
        p: &RestartPolicy,
        n: usize,
        jitter: f64,
    ) -> Vec<Decision> {
        let t0 = Instant::now();
        (0..n)
            .map(|i| {
                let at = t0 + Duration::from_secs(u64::try_from(i).unwrap_or(0));
                history.on_crash(p, at, Duration::from_millis(100), jitter)
            })
            .collect()
    }

    #[test]
    fn backoff_doubles_then_fails_at_the_limit() {
        let p = policy();
        let mut h = CrashHistory::default();
        let got = delays(&mut h, &p, 6, 0.5);
        assert_eq!(
            got,
            vec![
                Decision::RestartAfter(Duration::from_secs(1)),
                Decision::RestartAfter(Duration::from_secs(2)),
                Decision::RestartAfter(Duration::from_secs(4)),
                Decision::RestartAfter(Duration::from_secs(8)),
                Decision::Failed {
                    retry_after: Duration::from_secs(600)
                },
                Decision::Failed {
                    retry_after: Duration::from_secs(600)
                },
            ]
        );
        assert!(h.is_failed());
    }

    #[test]
    fn backoff_is_capped_and_jitter_stays_within_bounds() {
        let p = RestartPolicy {
            crash_limit: 100,
            ..policy()
        };
        for jitter in [0.0, 0.999] {
            let mut h = CrashHistory::default();
            for d in delays(&mut h, &p, 12, jitter) {
                let Decision::RestartAfter(d) = d else {
                    panic!("unexpected failure")
                };
                assert!(d <= p.backoff_max, "{d:?}");
                assert!(d >= p.backoff_initial.mul_f64(0.8), "{d:?}");
            }
        }
        let mut h = CrashHistory::default();
        let last = *delays(&mut h, &p, 12, 0.5).last().unwrap();
        assert_eq!(last, Decision::RestartAfter(Duration::from_secs(60)));
    }

    #[test]
    fn crashes_outside_the_window_do_not_count() {
        let p = policy();
        let mut h = CrashHistory::default();
        let t0 = Instant::now();
        for i in 0..10u64 {
            // One crash every 2 minutes: never 5 within 5 minutes.
            let d = h.on_crash(
                &p,
                t0 + Duration::from_secs(120 * i),
                Duration::from_secs(1),
                0.5,
            );
            assert!(matches!(d, Decision::RestartAfter(_)), "crash {i}: {d:?}");
        }
    }

    #[test]
    fn a_stable_run_resets_backoff_and_failure() {
        let p = policy();
        let mut h = CrashHistory::default();
        let _ = delays(&mut h, &p, 5, 0.5);
        assert!(h.is_failed());
        // Retried, ran quickly into a crash again: straight back to failed.
        let t = Instant::now() + Duration::from_secs(900);
        assert!(matches!(
            h.on_crash(&p, t, Duration::from_secs(1), 0.5),
            Decision::Failed { .. }
        ));
        // Retried, ran for longer than stable_after, then crashed: back to a short backoff.
        let t = t + Duration::from_secs(1200);
        assert_eq!(
            h.on_crash(&p, t, Duration::from_secs(61), 0.5),
            Decision::RestartAfter(Duration::from_secs(1))
        );
        assert!(!h.is_failed());
    }
}
