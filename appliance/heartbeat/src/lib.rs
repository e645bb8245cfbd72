//! `heartbeat`: the built-in diagnostic service, and the fault drills built on it.
//!
//! The heartbeat proves the whole path from supervisor to state on a running box: it starts
//! under its own user, opens its SQLite database in its own state directory, reports ready,
//! then records a beat every `interval` and reports the count as its status summary.
//!
//! A drill (`[drill.NAME]` in the config, service `drill-NAME`) runs the same loop and
//! misbehaves on purpose, so operators and tests can exercise the supervisor: crash after a
//! while, panic in a background task, ignore SIGTERM, never become ready, keep a helper
//! process, or hold capabilities.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use tokio::time::Instant;
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::service::{self, Launch, Service};
use tsunagi_runtime::status::Health;
use tsunagi_runtime::tasks::{TaskEnded, Tasks};
use tsunagi_state::{Durability, Migration, StateError};

/// The heartbeat's service name.
pub const NAME: &str = "heartbeat";

/// The heartbeat as the binary lists it.
pub const SERVICE: Service = Service {
    name: NAME,
    user: "tsunagi-heartbeat",
    description: "tsunagi heartbeat service",
    capabilities: &[],
    groups: &[],
    worker_threads: 1,
    launch: |cfg| {
        cfg.heartbeat
            .enabled
            .then(|| Launch::reading(cfg, &cfg.heartbeat))
    },
    main: |cfg, ctx| service::boxed(run(ctx, Behaviour::heartbeat(&cfg.heartbeat))),
};

/// The schema of `heartbeat.db`.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: "CREATE TABLE beat (
              id INTEGER PRIMARY KEY CHECK (id = 1),
              total INTEGER NOT NULL,
              last_unix INTEGER NOT NULL
          );
          INSERT INTO beat (id, total, last_unix) VALUES (1, 0, 0);",
}];

/// Errors of the heartbeat and the drills.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot record a beat in {path}")]
    Beat {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the database task stopped unexpectedly")]
    Task(#[source] tokio::task::JoinError),
    #[error("cannot start the drill's helper process")]
    Subprocess(#[source] std::io::Error),
    /// A drill's planned crash; the process exits with `code`.
    #[error("drill: planned crash with exit status {code}")]
    PlannedCrash { code: u8 },
    #[error("the heartbeat cannot go on")]
    Background(#[source] TaskEnded),
}

/// How the loop behaves: the heartbeat uses the defaults, drills set their faults.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    pub interval: Duration,
    pub exit_after: Option<(Duration, u8)>,
    pub panic_task_after: Option<Duration>,
    pub ignore_sigterm: bool,
    pub never_ready: bool,
    pub subprocess: bool,
}

impl Behaviour {
    /// The plain heartbeat.
    pub fn heartbeat(cfg: &tsunagi_config::Heartbeat) -> Behaviour {
        Behaviour {
            interval: cfg.interval.get(),
            ..Behaviour::default()
        }
    }

    /// A fault drill.
    pub fn drill(cfg: &tsunagi_config::Drill) -> Behaviour {
        Behaviour {
            interval: cfg.interval.get(),
            exit_after: cfg.exit_after.as_ref().map(|d| (d.get(), cfg.exit_code)),
            panic_task_after: cfg.panic_task_after.as_ref().map(|d| d.get()),
            ignore_sigterm: cfg.ignore_sigterm,
            never_ready: cfg.never_ready,
            subprocess: cfg.subprocess,
        }
    }
}

struct Beats {
    conn: Connection,
    path: PathBuf,
}

impl Beats {
    fn open(path: PathBuf) -> Result<Beats, HeartbeatError> {
        let conn = tsunagi_state::open(&path, Durability::Normal, MIGRATIONS)?;
        Ok(Beats { conn, path })
    }

    /// Records one beat and returns the total since the database was created.
    fn beat(&self) -> Result<i64, HeartbeatError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.conn
            .query_row(
                "UPDATE beat SET total = total + 1, last_unix = ?1 WHERE id = 1 RETURNING total",
                [now],
                |row| row.get(0),
            )
            .map_err(|source| HeartbeatError::Beat {
                path: self.path.clone(),
                source,
            })
    }
}

/// Runs one beat on the blocking pool (SQLite does file I/O).
async fn beat(beats: Beats) -> Result<(Beats, i64), HeartbeatError> {
    tokio::task::spawn_blocking(move || {
        let total = beats.beat()?;
        Ok((beats, total))
    })
    .await
    .map_err(HeartbeatError::Task)?
}

/// Runs the heartbeat (or a drill) until shutdown.
pub async fn run(ctx: ServiceCtx, behaviour: Behaviour) -> Result<(), HeartbeatError> {
    let path = ctx.state_dir.join("heartbeat.db");
    let beats = tokio::task::spawn_blocking(move || Beats::open(path))
        .await
        .map_err(HeartbeatError::Task)??;
    let (mut beats, mut total) = beat(beats).await?;
    let mut this_run = 1u64;

    let mut helper = None;
    if behaviour.subprocess {
        let child = tokio::process::Command::new("sleep")
            .arg("86400")
            .kill_on_drop(false) // The supervisor, not us, must clean it up: that is the drill.
            .spawn()
            .map_err(HeartbeatError::Subprocess)?;
        helper = child.id();
        // Detach: the handle is dropped, the process lives on in our process group.
        drop(child);
    }
    let summary = |this_run: u64, total: i64| match helper {
        Some(pid) => format!("{this_run} beats ({total} since install); helper pid {pid}"),
        None => format!("{this_run} beats ({total} since install)"),
    };
    ctx.reporter.status(Health::Ok, &summary(this_run, total));
    if behaviour.never_ready {
        tracing::warn!("drill: never reporting ready");
    } else {
        ctx.reporter.ready();
    }
    let mut tasks = Tasks::new(ctx.shutdown.clone());
    if let Some(after) = behaviour.panic_task_after {
        tasks.spawn("drill-panic", async move {
            tokio::time::sleep(after).await;
            panic!("drill: planned panic in a background task");
        });
    }
    let crash_at = behaviour
        .exit_after
        .map(|(after, code)| (Instant::now() + after, code));
    let mut ticker =
        tokio::time::interval_at(Instant::now() + behaviour.interval, behaviour.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = ctx.shutdown.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled(), if !behaviour.ignore_sigterm => break,
            ended = tasks.failed() => return Err(HeartbeatError::Background(ended)),
            _ = async {
                match crash_at {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let code = crash_at.map_or(1, |(_, code)| code);
                return Err(HeartbeatError::PlannedCrash { code });
            }
            _ = ticker.tick() => {
                (beats, total) = beat(beats).await?;
                this_run += 1;
                tracing::debug!(total, "beat");
                ctx.reporter.status(Health::Ok, &summary(this_run, total));
            }
        }
    }
    tracing::info!(beats = this_run, "heartbeat stopping");
    Ok(())
}
