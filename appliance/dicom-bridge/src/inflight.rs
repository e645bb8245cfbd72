//! The in-flight bound: nothing of a patient leaves for the network PACS more than
//! [`BOUND`] (1 s) after a change to their consent (a withdrawal at the desk) is recorded
//! locally, even while a batch permitted earlier is being sent.
//!
//! A round's decisions are made once, before its batch is sent; the batch (up to 64
//! instances per association) can take seconds. So while any association of the batch is
//! sending, a **watcher** ([`watch_feed`], on a blocking thread: the consent socket is a
//! blocking client) reads the consent service's change feed (`Changes { since }`: a cheap
//! read, no audit row) every [`POLL`] (100 ms), from the feed position the round's decisions
//! were made after. Each answer is published to the senders ([`Stop`]): the patients whose
//! consent changed since, and the instant the question was asked (the *confirmation*).
//!
//! - **Before the first instance** the senders wait for the watcher's first answer, so a
//!   batch never starts on decisions older than one feed read.
//! - **Before each instance** (before its C-STORE request): an instance of a changed
//!   patient is not sent; it stays queued (`Outcome::Stopped`) and the next round decides
//!   it again (a withdrawal then holds it in the clinic with the reason).
//! - **During an instance** (between and during its P-DATA fragments): when its patient
//!   changes, the association is aborted (A-ABORT between fragments; a TCP reset when the
//!   stop comes in the middle of a PDU, so no byte of another PDU can complete it), so the
//!   PACS discards the partial instance. It and the rest of that association's share go back
//!   to the queue; the PACS de-duplicates by SOP Instance UID should one arrive twice.
//!   Once the last fragment has gone, the instance has left: its response is awaited.
//! - **Fail closed**: a confirmation older than [`MAX_AGE`] (500 ms: the consent service
//!   is slow or gone) counts as a change of every patient, and so does a feed that cannot
//!   be read or says the cache went stale (the decisions would no longer permit).
//!
//! The bound: a withdrawal recorded at `t` is in the feed at once, so every confirmation
//! asked after `t` carries it. Usually the next poll (asked before `t + POLL`) brings it
//! within a few milliseconds; whatever the consent service's latency, nothing is sent on a
//! confirmation asked before `t` after `t + MAX_AGE`. The senders act at their next fragment,
//! or at once when blocked writing one: they stop by `t + 500 ms` plus their own scheduling
//! delay, half the bound left for a loaded machine (measured end to end at Orthanc: the last
//! instance stored at most about 0.1 s after the withdrawal began). Any change counts, not
//! only withdrawals (the feed does not say what changed): such instances are decided again a
//! round later.

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use consent::client::Gate;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The promise: nothing of a patient leaves more than this after their withdrawal is
/// recorded locally.
pub const BOUND: Duration = Duration::from_secs(1);
/// How often the watcher reads the change feed while a batch is being sent.
pub const POLL: Duration = Duration::from_millis(100);
/// How old the last confirmation may be while instances are sent (then: stop everything).
pub const MAX_AGE: Duration = Duration::from_millis(500);

/// What the watcher last learnt.
#[derive(Debug, Clone, Default)]
struct State {
    /// Patients whose consent changed after the round's decisions.
    changed: HashSet<String>,
    /// Stop everything (the feed could not be read).
    all: bool,
    /// When the last question whose answer is in `changed` was asked.
    confirmed: Option<Instant>,
}

impl State {
    fn stops(&self, patient: &str, max_age: Duration, now: Instant) -> bool {
        self.all
            || self.changed.contains(patient)
            || self
                .confirmed
                .is_none_or(|c| now.saturating_duration_since(c) > max_age)
    }
}

/// The senders' side: whether an instance of a patient may (still) be sent.
#[derive(Debug, Clone)]
pub struct Stop {
    /// `None`: not watched (tests; never stops).
    rx: Option<watch::Receiver<State>>,
    max_age: Duration,
    /// The service's stop: once cancelled, nothing more is sent and nothing is waited for
    /// ([`Stop::with_shutdown`]).
    shutdown: Option<CancellationToken>,
}

/// The watcher's side (see [`watch_feed`]).
#[derive(Debug)]
pub struct Watch {
    tx: watch::Sender<State>,
}

/// A watch and its stop, nothing confirmed yet.
pub fn channel(max_age: Duration) -> (Watch, Stop) {
    let (tx, rx) = watch::channel(State::default());
    (
        Watch { tx },
        Stop {
            rx: Some(rx),
            max_age,
            shutdown: None,
        },
    )
}

impl Watch {
    /// The feed was read: asked at `asked`, these patients changed (since the last read).
    pub fn confirm(&self, patients: impl IntoIterator<Item = String>, asked: Instant) {
        self.tx.send_modify(|s| {
            s.changed.extend(patients);
            s.confirmed = Some(s.confirmed.map_or(asked, |c| c.max(asked)));
        });
    }

    /// The feed could not be read: nothing more is sent.
    pub fn stop_all(&self) {
        self.tx.send_modify(|s| s.all = true);
    }
}

impl Stop {
    /// Never stops (sends that are not watched: tests).
    pub fn never() -> Stop {
        Stop {
            rx: None,
            max_age: MAX_AGE,
            shutdown: None,
        }
    }

    /// The same, ended by `shutdown` too (the service's stop token): once it is cancelled the
    /// sender sends nothing more and waits for nothing (a connect, an A-ASSOCIATE-AC, a
    /// C-STORE response); what it had not finished stays queued.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Stop {
        self.shutdown = Some(shutdown);
        self
    }

    /// Whether the service is stopping.
    pub fn shutting_down(&self) -> bool {
        self.shutdown
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    }

    /// Resolves once the service is stopping (never without a shutdown token).
    pub async fn until_shutdown(&self) {
        match &self.shutdown {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// Whether nothing more of `patient` may be sent now.
    pub fn stopped(&self, patient: &str) -> bool {
        self.rx
            .as_ref()
            .is_some_and(|rx| rx.borrow().stops(patient, self.max_age, Instant::now()))
    }

    /// Resolves once nothing more of `patient` may be sent (never, unwatched).
    pub async fn until_stopped(&self, patient: &str) {
        let Some(rx) = &self.rx else {
            return std::future::pending().await;
        };
        let mut rx = rx.clone();
        loop {
            let deadline = {
                let state = rx.borrow_and_update();
                if state.stops(patient, self.max_age, Instant::now()) {
                    return;
                }
                state.confirmed.map(|c| c + self.max_age)
            };
            let Some(deadline) = deadline else {
                // Unreachable (no confirmation stops), kept total.
                return;
            };
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The watcher is gone: nothing confirms any more.
                        return;
                    }
                }
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline + Duration::from_millis(1))) => {}
            }
        }
    }

    /// Waits for the watcher's first answer (or its failure); false if there will be none.
    pub async fn first_confirmation(&self) -> bool {
        let Some(rx) = &self.rx else {
            return true;
        };
        let mut rx = rx.clone();
        rx.wait_for(|s| s.confirmed.is_some() || s.all)
            .await
            .is_ok_and(|s| !s.all)
    }
}

/// The watcher (blocking): reads the change feed from `since` every [`POLL`] and publishes
/// each answer to `watch`, until `done` says the batch is over (or is dropped). A feed that
/// cannot be read, or says the cache is stale, stops everything and ends the watch. Returns the feed position it reached.
pub fn watch_feed(
    gate: &mut dyn Gate,
    since: i64,
    watch: &Watch,
    done: &mpsc::Receiver<()>,
) -> i64 {
    watch_feed_every(gate, since, watch, done, POLL)
}

/// [`watch_feed`] with another period (tests).
pub fn watch_feed_every(
    gate: &mut dyn Gate,
    mut since: i64,
    watch: &Watch,
    done: &mpsc::Receiver<()>,
    every: Duration,
) -> i64 {
    loop {
        let asked = Instant::now();
        match gate.changes(since) {
            Ok(changes) if changes.fresh => {
                since = changes.seq.max(since);
                watch.confirm(changes.patients, asked);
            }
            Ok(_) => {
                // The cache went stale since the decisions: they would not permit now.
                tracing::info!(
                    "the consent cache went stale while sending; the batch stops and is decided again"
                );
                watch.stop_all();
                return since;
            }
            Err(e) => {
                tracing::warn!(
                    error = %tsunagi_runtime::child::error_chain(&e),
                    "cannot read the consent change feed while sending; the batch stops and is decided again"
                );
                watch.stop_all();
                return since;
            }
        }
        match done.recv_timeout(every.saturating_sub(asked.elapsed())) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return since,
        }
    }
}

#[cfg(test)]
mod tests;
