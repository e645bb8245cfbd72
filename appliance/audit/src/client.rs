//! The other services' side of the `audit` socket ([`crate::protocol`]): blocking, one
//! connection kept open and reopened after a failure.
//!
//! A caller keeps its events in its own durable table until [`Client::record_all`] returns:
//! only then are they in the audit queue. An event whose answer was lost (the connection
//! broke after the audit service committed it) is recorded again at the caller's next try.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{Answer, Event, MAX_BATCH, Request};

/// How long one request may take (a commit with `synchronous=FULL`).
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why events were not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the audit service at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the audit service failed")]
    Io(#[source] std::io::Error),
    #[error("the audit service answered something else than a record")]
    Protocol,
    #[error("the audit service refused the events: {0}")]
    Refused(String),
}

/// A connection to the audit service.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    conn: Option<(BufReader<UnixStream>, UnixStream)>,
}

impl Client {
    /// A client of the socket at `path` (connected at the first request).
    pub fn new(path: &Path) -> Client {
        Client {
            path: path.to_owned(),
            conn: None,
        }
    }

    /// Records `events` (in order; several requests of at most [`MAX_BATCH`]): returns once
    /// every one is committed to the audit queue. On an error, some batches may have been
    /// recorded.
    pub fn record_all(&mut self, events: &[Event]) -> Result<(), ClientError> {
        for batch in events.chunks(MAX_BATCH) {
            let answer = self.ask(&Request::RecordAll(batch.to_vec()));
            if answer.is_err() {
                self.conn = None;
            }
            match answer? {
                Answer::RecordedAll { .. } => {}
                Answer::Error(e) => return Err(ClientError::Refused(e)),
                Answer::Recorded { .. } => return Err(ClientError::Protocol),
            }
        }
        Ok(())
    }

    fn ask(&mut self, request: &Request) -> Result<Answer, ClientError> {
        if self.conn.is_none() {
            let stream =
                UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
            stream
                .set_read_timeout(Some(TIMEOUT))
                .map_err(ClientError::Io)?;
            stream
                .set_write_timeout(Some(TIMEOUT))
                .map_err(ClientError::Io)?;
            let reader = BufReader::new(stream.try_clone().map_err(ClientError::Io)?);
            self.conn = Some((reader, stream));
        }
        let Some((reader, writer)) = self.conn.as_mut() else {
            return Err(ClientError::Protocol);
        };
        let mut line = serde_json::to_string(request).map_err(|_| ClientError::Protocol)?;
        line.push('\n');
        writer.write_all(line.as_bytes()).map_err(ClientError::Io)?;
        let mut answer = String::new();
        if reader.read_line(&mut answer).map_err(ClientError::Io)? == 0 {
            return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        serde_json::from_str(answer.trim_end()).map_err(|_| ClientError::Protocol)
    }
}

/// A link's TLS refusals (a peer the box cannot verify, or one that refuses the box), for
/// the trail once per streak: the same refusal again, retry after retry, is not a new
/// event; a success ends the streak.
#[derive(Debug, Default)]
pub struct Refusals {
    last: Option<String>,
}

impl Refusals {
    /// What the last attempt came to (`Some((peer, reason))`: refused): the event to keep
    /// when the refusal is new.
    pub fn observe(&mut self, refused: Option<(String, String)>) -> Option<Event> {
        match refused {
            None => {
                self.last = None;
                None
            }
            Some((peer, reason)) => {
                if self.last.as_deref() == Some(reason.as_str()) {
                    return None;
                }
                self.last = Some(reason.clone());
                Some(Event::RefusedTlsPeer { reason, peer })
            }
        }
    }
}

/// Where a service keeps the events it owes the audit trail: durable, written with the
/// change each records, and forgotten only once the audit service has them.
pub trait Source: Send + 'static {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Up to `limit` events not yet recorded, oldest first, each with its id (increasing).
    fn pending(&mut self, limit: usize) -> Result<Vec<(i64, Event)>, Self::Error>;
    /// The events up to id `last` are in the audit trail (or the trail is off): forget them.
    fn recorded(&mut self, last: i64) -> Result<(), Self::Error>;
}

/// Why a round of [`hand_over`] did not finish (the events stay in their source).
#[derive(Debug, thiserror::Error)]
pub enum HandOverError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Source(E),
    #[error(transparent)]
    Audit(#[from] ClientError),
}

/// How often a source is looked at when nothing waits.
const POLL: Duration = Duration::from_secs(1);
/// The longest wait after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One round: a batch read, recorded, forgotten. Returns how many. `client` `None`: the
/// audit trail is off, and the events are forgotten.
pub fn hand_over_once<S: Source>(
    source: &mut S,
    client: Option<&mut Client>,
) -> Result<usize, HandOverError<S::Error>> {
    let batch = source.pending(MAX_BATCH).map_err(HandOverError::Source)?;
    let Some(&(last, _)) = batch.last() else {
        return Ok(0);
    };
    if let Some(client) = client {
        let events: Vec<Event> = batch.iter().map(|(_, e)| e.clone()).collect();
        client.record_all(&events)?;
    }
    source.recorded(last).map_err(HandOverError::Source)?;
    Ok(batch.len())
}

/// One round of a [`Source`], its error told as text, so that one loop serves several.
trait Round: Send {
    fn round(&mut self, client: Option<&mut Client>) -> Result<usize, String>;
}

impl<S: Source> Round for S {
    fn round(&mut self, client: Option<&mut Client>) -> Result<usize, String> {
        hand_over_once(self, client).map_err(|e| tsunagi_runtime::child::error_chain(&e))
    }
}

/// The sources one service hands over, in one loop on one blocking thread (each source
/// keeps its own order; there is no order between them).
#[derive(Default)]
pub struct Sources(Vec<Box<dyn Round>>);

impl Sources {
    /// No source yet.
    pub fn new() -> Sources {
        Sources::default()
    }

    /// `source` too.
    #[must_use]
    pub fn with<S: Source>(mut self, source: S) -> Sources {
        self.0.push(Box::new(source));
        self
    }

    /// One round of each source; how many were handed over, and the reasons of those
    /// that failed (the others still went).
    fn round(&mut self, mut client: Option<&mut Client>) -> (usize, Option<String>) {
        let mut moved = 0;
        let mut reasons = Vec::new();
        for source in &mut self.0 {
            match source.round(client.as_deref_mut()) {
                Ok(n) => moved += n,
                Err(reason) => reasons.push(reason),
            }
        }
        (moved, (!reasons.is_empty()).then(|| reasons.join("; ")))
    }
}

/// Hands the `sources`' events to the audit service at `socket` (`None`: the trail is off)
/// until `stop`, oldest first, in batches; after a failure it tries again with a backoff
/// (1 s doubling to 30 s), keeping the reason in `last_error` for the service's status.
pub async fn hand_over(
    sources: Sources,
    socket: Option<PathBuf>,
    last_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let set = |value: Option<String>| {
        if let Ok(mut e) = last_error.lock() {
            *e = value;
        }
    };
    let mut state = Some((sources, socket.as_deref().map(Client::new)));
    let mut failures = 0u32;
    loop {
        let Some((mut sources, mut client)) = state.take() else {
            return;
        };
        let Ok((sources, client, (moved, failed))) = tokio::task::spawn_blocking(move || {
            let r = sources.round(client.as_mut());
            (sources, client, r)
        })
        .await
        else {
            // A panic is a bug: the events stay in their source for the next start.
            set(Some("the audit hand-over failed".into()));
            return;
        };
        state = Some((sources, client));
        let wait = match failed {
            None => {
                failures = 0;
                set(None);
                if moved == 0 { POLL } else { Duration::ZERO }
            }
            Some(reason) => {
                failures += 1;
                tracing::warn!(error = %reason, "events not handed to the audit trail; retrying");
                set(Some(reason));
                if moved == 0 {
                    (POLL * 2u32.saturating_pow(failures.min(5))).min(MAX_BACKOFF)
                } else {
                    POLL
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Listed {
        events: Vec<(i64, Event)>,
        forgotten: Vec<i64>,
    }

    impl Source for Listed {
        type Error = std::io::Error;

        fn pending(&mut self, limit: usize) -> Result<Vec<(i64, Event)>, std::io::Error> {
            Ok(self.events.iter().take(limit).cloned().collect())
        }

        fn recorded(&mut self, last: i64) -> Result<(), std::io::Error> {
            self.forgotten.push(last);
            self.events.retain(|(id, _)| *id > last);
            Ok(())
        }
    }

    fn alerts(n: i64) -> Listed {
        Listed {
            events: (1..=n)
                .map(|i| {
                    (
                        i,
                        Event::FailedAuditVerify {
                            reason: format!("row {i}"),
                        },
                    )
                })
                .collect(),
            forgotten: Vec::new(),
        }
    }

    #[test]
    fn a_refusal_is_an_event_once_per_streak() {
        let mut r = Refusals::default();
        let refused = |why: &str| Some(("10.98.0.1:443".to_owned(), why.to_owned()));
        assert!(matches!(
            r.observe(refused("expired")),
            Some(Event::RefusedTlsPeer { .. })
        ));
        assert_eq!(r.observe(refused("expired")), None);
        assert!(r.observe(refused("another CA")).is_some());
        assert_eq!(r.observe(None), None);
        assert!(r.observe(refused("another CA")).is_some());
    }

    struct Broken;

    impl Source for Broken {
        type Error = std::io::Error;

        fn pending(&mut self, _: usize) -> Result<Vec<(i64, Event)>, std::io::Error> {
            Err(std::io::Error::other("the table cannot be read"))
        }

        fn recorded(&mut self, _: i64) -> Result<(), std::io::Error> {
            Ok(())
        }
    }

    #[test]
    fn one_loop_serves_several_sources_and_a_failing_one_does_not_hold_the_others() {
        let mut sources = Sources::new().with(Broken).with(alerts(3));
        let (moved, failed) = sources.round(None);
        assert_eq!(moved, 3);
        assert_eq!(failed.as_deref(), Some("the table cannot be read"));
        assert_eq!(
            sources.round(None),
            (0, Some("the table cannot be read".into()))
        );
    }

    #[test]
    fn events_are_forgotten_only_once_recorded_or_with_the_trail_off() {
        // The audit service cannot be reached: nothing is forgotten.
        let dir = tempfile::tempdir().unwrap();
        let mut client = Client::new(&dir.path().join("record.sock"));
        let mut source = alerts(3);
        assert!(matches!(
            hand_over_once(&mut source, Some(&mut client)),
            Err(HandOverError::Audit(ClientError::Connect { .. }))
        ));
        assert_eq!(source.events.len(), 3);
        assert!(source.forgotten.is_empty());
        // The trail is off: forgotten a batch at a time.
        let mut source = alerts(150);
        assert_eq!(hand_over_once(&mut source, None).unwrap(), MAX_BATCH);
        assert_eq!(hand_over_once(&mut source, None).unwrap(), 50);
        assert_eq!(hand_over_once(&mut source, None).unwrap(), 0);
        assert_eq!(source.forgotten, [100, 150]);
    }
}
