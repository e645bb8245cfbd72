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
