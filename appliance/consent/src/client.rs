//! The consent gate, as the other services use it: asks the consent service (the one place
//! that decides) whether a patient's data of a category may go to the hub, and which
//! patients' consents changed.
//!
//! Protocol: one JSON line each way over `RUNTIME-DIR/consent/decide.sock` (see
//! [`crate::service`]). A decision is a local lookup there, audited before it is answered.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The answer to "may this leave?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Permit,
    /// Denied, with the consent service's reason (`withdrawn`, `cache-stale`, ...).
    Deny(String),
}

impl Verdict {
    /// A denial that says nothing about the consent itself (the cache is stale, the clock is
    /// behind): hold — publish nothing new, remove nothing.
    pub fn is_transient(&self) -> bool {
        matches!(self, Verdict::Deny(r) if r == "cache-stale" || r == "clock-behind")
    }
}

/// Patients whose consent changed since a sequence number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub seq: i64,
    pub patients: Vec<String>,
    /// Whether decisions for the hub can permit now (the cache is fresh).
    pub fresh: bool,
}

/// Gate errors: the consent service could not answer. The sync then holds.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot reach the consent service at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the consent service connection failed")]
    Io(#[source] std::io::Error),
    #[error("the consent service answered something unexpected")]
    Protocol(#[source] serde_json::Error),
    #[error("the consent service refused the request: {0}")]
    Refused(String),
}

/// What the sync needs from the consent service.
pub trait Gate {
    /// May `patient`'s `category` data go to the hub now?
    fn decide(&mut self, patient: &str, category: &str) -> Result<Verdict, GateError>;
    /// The patients whose consents changed after `since` (all pages).
    fn changes(&mut self, since: i64) -> Result<Changes, GateError>;
}

/// The patient-identity cache (名寄せ), as the DICOM bridge asks it.
pub trait Identities {
    /// The network ID of a local patient, once the network gave one.
    fn network_id(&mut self, patient: &str) -> Result<Option<String>, GateError>;
    /// The local patient with this network ID, if any.
    fn local_id(&mut self, network_id: &str) -> Result<Option<String>, GateError>;
}

#[derive(Debug, Deserialize)]
struct Answer {
    decision: Option<String>,
    reason: Option<String>,
    error: Option<String>,
    seq: Option<i64>,
    patients: Option<Vec<String>>,
    more: Option<bool>,
    fresh: Option<bool>,
    known: Option<bool>,
    network_id: Option<String>,
    patient: Option<String>,
}

/// The consent service over its Unix socket; one connection, reopened when it breaks.
#[derive(Debug)]
pub struct SocketGate {
    path: PathBuf,
    conn: Option<(BufReader<UnixStream>, UnixStream)>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl SocketGate {
    pub fn new(path: &Path) -> SocketGate {
        SocketGate {
            path: path.to_owned(),
            conn: None,
        }
    }

    fn ask(&mut self, request: &serde_json::Value) -> Result<Answer, GateError> {
        // One retry on a fresh connection: the service may have restarted.
        let mut last = None;
        for _ in 0..2 {
            match self.ask_once(request) {
                Ok(a) => return Ok(a),
                Err(e @ (GateError::Io(_) | GateError::Connect { .. })) => {
                    self.conn = None;
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| GateError::Io(std::io::Error::other("no answer"))))
    }

    fn ask_once(&mut self, request: &serde_json::Value) -> Result<Answer, GateError> {
        if self.conn.is_none() {
            let stream = UnixStream::connect(&self.path).map_err(|source| GateError::Connect {
                path: self.path.clone(),
                source,
            })?;
            stream
                .set_read_timeout(Some(TIMEOUT))
                .map_err(GateError::Io)?;
            stream
                .set_write_timeout(Some(TIMEOUT))
                .map_err(GateError::Io)?;
            let reader = BufReader::new(stream.try_clone().map_err(GateError::Io)?);
            self.conn = Some((reader, stream));
        }
        let Some((reader, writer)) = self.conn.as_mut() else {
            return Err(GateError::Io(std::io::Error::other("not connected")));
        };
        let mut line = serde_json::to_string(request).map_err(GateError::Protocol)?;
        line.push('\n');
        writer.write_all(line.as_bytes()).map_err(GateError::Io)?;
        let mut answer = String::new();
        if reader.read_line(&mut answer).map_err(GateError::Io)? == 0 {
            return Err(GateError::Io(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            )));
        }
        let answer: Answer = serde_json::from_str(answer.trim()).map_err(GateError::Protocol)?;
        if let Some(e) = answer.error {
            return Err(GateError::Refused(e));
        }
        Ok(answer)
    }
}

impl SocketGate {
    /// Whether `patient`'s `category` data may go to `recipient` (`hub` or a facility's
    /// 医療機関コード, e.g. this clinic's own for what its viewers see).
    pub fn decide_for(
        &mut self,
        patient: &str,
        recipient: &str,
        category: &str,
    ) -> Result<Verdict, GateError> {
        let a = self.ask(
            &serde_json::json!({"patient": patient, "recipient": recipient, "category": category}),
        )?;
        match a.decision.as_deref() {
            Some("permit") => Ok(Verdict::Permit),
            Some("deny") => Ok(Verdict::Deny(a.reason.unwrap_or_else(|| "unknown".into()))),
            _ => Err(GateError::Refused("no decision in the answer".into())),
        }
    }
}

impl Gate for SocketGate {
    fn decide(&mut self, patient: &str, category: &str) -> Result<Verdict, GateError> {
        self.decide_for(patient, "hub", category)
    }

    fn changes(&mut self, since: i64) -> Result<Changes, GateError> {
        let mut out = Changes {
            seq: since,
            ..Changes::default()
        };
        let mut seen = std::collections::HashSet::new();
        loop {
            let a = self.ask(&serde_json::json!({"changes_since": out.seq}))?;
            let (Some(seq), Some(patients), Some(fresh)) = (a.seq, a.patients, a.fresh) else {
                return Err(GateError::Refused("no change feed in the answer".into()));
            };
            out.fresh = fresh;
            let progressed = seq > out.seq;
            out.seq = seq;
            for p in patients {
                if seen.insert(p.clone()) {
                    out.patients.push(p);
                }
            }
            if !a.more.unwrap_or(false) || !progressed {
                return Ok(out);
            }
        }
    }
}

impl Identities for SocketGate {
    fn network_id(&mut self, patient: &str) -> Result<Option<String>, GateError> {
        let a = self.ask(&serde_json::json!({ "network_id_of": patient }))?;
        match a.known {
            Some(_) => Ok(a.network_id),
            None => Err(GateError::Refused("no identity in the answer".into())),
        }
    }

    fn local_id(&mut self, network_id: &str) -> Result<Option<String>, GateError> {
        let a = self.ask(&serde_json::json!({ "local_id_of": network_id }))?;
        match a.known {
            Some(_) => Ok(a.patient),
            None => Err(GateError::Refused("no identity in the answer".into())),
        }
    }
}
