//! A service's background tasks, watched: none of them may end unnoticed.
//!
//! A service spawns its long-lived tasks (a socket server, a sync loop) into [`Tasks`]
//! instead of detaching them with `tokio::spawn`, and waits on [`Tasks::failed`] beside its
//! shutdown token. A task that returns, fails or panics while the service is not stopping
//! resolves `failed` with [`TaskEnded`] (a panic with its message); the service's `run` then
//! returns it as its error, so the supervisor restarts the service and `tsunagi status` shows
//! why. Once the service's stop token is cancelled, tasks end quietly. Dropping [`Tasks`]
//! aborts what is still running.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The longest panic message or error chain kept in [`TaskEnded`] (status stays one line).
const MAX_WHY: usize = 300;

/// A background task ended while its service was not stopping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("background task {task} {why}")]
pub struct TaskEnded {
    /// The task's name, as given to [`Tasks::spawn`].
    pub task: &'static str,
    /// How it ended: `ended unexpectedly`, `failed: CHAIN` or `panicked: MESSAGE`.
    pub why: String,
}

/// A service's background tasks; see the module docs.
#[derive(Debug)]
pub struct Tasks {
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, &'static str>,
    stop: CancellationToken,
}

impl Tasks {
    /// Tasks of a service that stops when `stop` is cancelled (its `ServiceCtx::shutdown`).
    pub fn new(stop: CancellationToken) -> Tasks {
        Tasks {
            set: JoinSet::new(),
            names: HashMap::new(),
            stop,
        }
    }

    /// Spawns a task that runs until the service stops; it ending earlier is a failure.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn_fallible(name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Spawns a task that may fail; its error chain becomes [`TaskEnded::why`].
    pub fn spawn_fallible<F, E>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let task = async move {
            task.await
                .map_err(|e| clip(format!("failed: {}", crate::child::error_chain(&e))))
        };
        let handle = self.set.spawn(task.in_current_span());
        self.names.insert(handle.id(), name);
    }

    /// Resolves when a task ends while the service is not stopping. Never resolves once the
    /// stop token is cancelled, nor while there are no tasks. Cancel-safe (for `select!`).
    pub async fn failed(&mut self) -> TaskEnded {
        loop {
            let Some(joined) = self.set.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (task, why) = match joined {
                Ok((id, result)) => (
                    self.names.remove(&id),
                    result
                        .err()
                        .unwrap_or_else(|| "ended unexpectedly".to_owned()),
                ),
                Err(e) => (self.names.remove(&e.id()), why_not_joined(e)),
            };
            if self.stop.is_cancelled() {
                continue;
            }
            return TaskEnded {
                task: task.unwrap_or("unnamed"),
                why,
            };
        }
    }

    /// After stop: waits up to `within` for the tasks to finish, then aborts the rest.
    pub async fn join(mut self, within: Duration) {
        let all = async { while self.set.join_next().await.is_some() {} };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!(
                left = self.set.len(),
                "background tasks did not stop in time; aborted"
            );
        }
    }
}

fn why_not_joined(e: JoinError) -> String {
    if !e.is_panic() {
        return "was cancelled".to_owned();
    }
    panicked(&*e.into_panic())
}

/// [`TaskEnded::why`] for a panic (of a task, or of a thread from `JoinHandle::join`).
pub fn panicked(payload: &(dyn std::any::Any + Send)) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    clip(format!("panicked: {message}"))
}

fn clip(mut text: String) -> String {
    if text.len() > MAX_WHY {
        let mut end = MAX_WHY;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn failed_within(tasks: &mut Tasks, within: Duration) -> Option<TaskEnded> {
        tokio::time::timeout(within, tasks.failed()).await.ok()
    }

    #[tokio::test]
    async fn a_task_that_returns_is_a_failure_named_after_it() {
        let stop = CancellationToken::new();
        let mut tasks = Tasks::new(stop.clone());
        tasks.spawn("forever", std::future::pending());
        tasks.spawn("sync", async {});
        let ended = failed_within(&mut tasks, Duration::from_secs(5)).await;
        assert_eq!(
            ended,
            Some(TaskEnded {
                task: "sync",
                why: "ended unexpectedly".into()
            })
        );
        assert_eq!(
            ended.unwrap().to_string(),
            "background task sync ended unexpectedly"
        );
    }

    #[tokio::test]
    async fn a_task_that_panics_carries_its_message() {
        let mut tasks = Tasks::new(CancellationToken::new());
        tasks.spawn("server", async { panic!("chunk size overflow") });
        let ended = failed_within(&mut tasks, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ended.task, "server");
        assert_eq!(ended.why, "panicked: chunk size overflow");
        let formatted = format!("{}", 7);
        let mut tasks = Tasks::new(CancellationToken::new());
        tasks.spawn("formatted", async move { panic!("at {formatted}") });
        let ended = failed_within(&mut tasks, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ended.why, "panicked: at 7");
    }

    #[tokio::test]
    async fn a_task_that_fails_carries_its_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot serve")]
        struct Outer(#[source] std::io::Error);
        let mut tasks = Tasks::new(CancellationToken::new());
        tasks.spawn_fallible("scp", async {
            Err(Outer(std::io::Error::other("socket closed")))
        });
        let ended = failed_within(&mut tasks, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ended.why, "failed: cannot serve: socket closed");
    }

    #[tokio::test]
    async fn tasks_that_end_after_stop_was_requested_end_quietly() {
        let stop = CancellationToken::new();
        let mut tasks = Tasks::new(stop.clone());
        for name in ["a", "b"] {
            let stop = stop.clone();
            tasks.spawn(name, async move { stop.cancelled().await });
        }
        tasks.spawn("panics-on-stop", {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                panic!("while stopping");
            }
        });
        stop.cancel();
        assert_eq!(
            failed_within(&mut tasks, Duration::from_millis(300)).await,
            None
        );
        tasks.join(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn no_tasks_never_fail_and_join_aborts_what_does_not_stop() {
        let mut tasks = Tasks::new(CancellationToken::new());
        assert_eq!(
            failed_within(&mut tasks, Duration::from_millis(100)).await,
            None
        );
        tasks.spawn("stubborn", std::future::pending());
        let started = std::time::Instant::now();
        tasks.join(Duration::from_millis(100)).await;
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_thread_that_panicked_reads_the_same() {
        let payload = std::thread::spawn(|| panic!("worker {}", 1))
            .join()
            .unwrap_err();
        assert_eq!(panicked(&*payload), "panicked: worker 1");
    }

    #[test]
    fn long_reasons_are_clipped_to_one_line() {
        let why = clip(format!("panicked: {}\nsecond line", "é".repeat(400)));
        assert!(why.len() <= MAX_WHY + '…'.len_utf8());
        assert!(!why.contains('\n'));
        assert!(why.ends_with('…'));
    }
}
