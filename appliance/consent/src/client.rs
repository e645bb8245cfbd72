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

use consent_protocol::{Answer, Request};
pub use consent_protocol::{
    Category, Decided, Decision, DenyReason, Handling, MAX_RELEASE_OBJECTS, Object, Recipient,
    ReleaseKind,
};

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
    Protocol(#[source] consent_protocol::LineError),
    #[error("the consent service answered {got} to a {asked} request")]
    Mismatch {
        asked: &'static str,
        got: &'static str,
    },
    #[error("the consent service refused the request: {0}")]
    Refused(String),
}

/// Objects of one patient's data that reached the hub (or were removed there), for the
/// audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub patient: String,
    pub category: Category,
    pub kind: ReleaseKind,
    pub objects: Vec<Object>,
    /// The audit row of the decision that allowed it ([`Decided::audit`]); required for
    /// [`ReleaseKind::Sent`].
    pub decision: Option<i64>,
}

/// What the sync needs from the consent service.
pub trait Gate {
    /// May `patient`'s `category` data go to the hub now? With the decision's audit row.
    fn decide(&mut self, patient: &str, category: Category) -> Result<Decided, GateError>;
    /// The patients whose consents changed after `since` (all pages).
    fn changes(&mut self, since: i64) -> Result<Changes, GateError>;
    /// Records a release at the hub in the audit trail (one row per object; more than
    /// [`MAX_RELEASE_OBJECTS`] objects go in several requests).
    fn released(&mut self, release: &Release) -> Result<(), GateError>;
}

/// The patient-identity cache (名寄せ), as the DICOM bridge asks it.
pub trait Identities {
    /// The network ID of a local patient, once the network gave one.
    fn network_id(&mut self, patient: &str) -> Result<Option<String>, GateError>;
    /// The local patient with this network ID, if any.
    fn local_id(&mut self, network_id: &str) -> Result<Option<String>, GateError>;
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

    fn ask(&mut self, request: &Request) -> Result<Answer, GateError> {
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

    fn ask_once(&mut self, request: &Request) -> Result<Answer, GateError> {
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
        let line = consent_protocol::to_line(request);
        writer.write_all(line.as_bytes()).map_err(GateError::Io)?;
        let mut answer = String::new();
        if reader.read_line(&mut answer).map_err(GateError::Io)? == 0 {
            return Err(GateError::Io(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            )));
        }
        match consent_protocol::from_line::<Answer>(&answer).map_err(GateError::Protocol)? {
            Answer::Error(e) => Err(GateError::Refused(e)),
            answer => Ok(answer),
        }
    }
}

fn kind(answer: &Answer) -> &'static str {
    match answer {
        Answer::Decided(_) => "decision",
        Answer::Recorded { .. } => "release record",
        Answer::Changes(_) => "change feed",
        Answer::Identity(_) => "identity",
        Answer::Error(_) => "error",
    }
}

impl SocketGate {
    /// Whether `patient`'s `category` data may go to `recipient`: the hub, another facility,
    /// or this clinic's own viewers ([`Recipient::Clinic`]: participation at this clinic).
    pub fn decide_for(
        &mut self,
        patient: &str,
        recipient: Recipient,
        category: Category,
    ) -> Result<Decided, GateError> {
        let answer = self.ask(&Request::Decide {
            patient: patient.to_owned(),
            recipient,
            category,
            at: None,
        })?;
        match answer {
            Answer::Decided(d) => Ok(d),
            other => Err(GateError::Mismatch {
                asked: "decision",
                got: kind(&other),
            }),
        }
    }
}

impl SocketGate {
    /// Whether the patient participates: an active, valid consent (for this clinic's viewers).
    pub fn participates(&mut self, patient: &str) -> Result<Decided, GateError> {
        match self.ask(&Request::Participates {
            patient: patient.to_owned(),
        })? {
            Answer::Decided(d) => Ok(d),
            other => Err(GateError::Mismatch {
                asked: "participation",
                got: kind(&other),
            }),
        }
    }
}

impl SocketGate {
    /// Records what left for (or was removed at, or discarded before reaching) `recipient`
    /// in the audit trail: this clinic's viewers ([`Recipient::Clinic`]) or the hub.
    pub fn released_to(
        &mut self,
        recipient: Recipient,
        release: &Release,
    ) -> Result<(), GateError> {
        for objects in release.objects.chunks(MAX_RELEASE_OBJECTS) {
            match self.ask(&Request::Released {
                patient: release.patient.clone(),
                recipient: recipient.clone(),
                category: release.category,
                kind: release.kind,
                objects: objects.to_vec(),
                decision: release.decision,
            })? {
                Answer::Recorded { .. } => {}
                other => {
                    return Err(GateError::Mismatch {
                        asked: "release record",
                        got: kind(&other),
                    });
                }
            }
        }
        Ok(())
    }
}

impl SocketGate {
    /// Records that staff requeued or discarded `objects` of `patient`'s `category` data,
    /// held in the clinic on their way to `recipient` ([`Request::Handled`]). Call it before
    /// the objects change: what cannot be audited is not done.
    #[allow(clippy::too_many_arguments)] // each is one field of the request
    pub fn handled(
        &mut self,
        patient: Option<&str>,
        recipient: Recipient,
        category: Category,
        handling: Handling,
        objects: &[Object],
        by: &str,
    ) -> Result<(), GateError> {
        for objects in objects.chunks(MAX_RELEASE_OBJECTS) {
            match self.ask(&Request::Handled {
                patient: patient.map(str::to_owned),
                recipient: recipient.clone(),
                category,
                handling,
                objects: objects.to_vec(),
                by: by.to_owned(),
            })? {
                Answer::Recorded { .. } => {}
                other => {
                    return Err(GateError::Mismatch {
                        asked: "handling record",
                        got: kind(&other),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Gate for SocketGate {
    fn decide(&mut self, patient: &str, category: Category) -> Result<Decided, GateError> {
        self.decide_for(patient, Recipient::Hub, category)
    }

    fn released(&mut self, release: &Release) -> Result<(), GateError> {
        self.released_to(Recipient::Hub, release)
    }

    fn changes(&mut self, since: i64) -> Result<Changes, GateError> {
        let mut out = Changes {
            seq: since,
            ..Changes::default()
        };
        let mut seen = std::collections::HashSet::new();
        loop {
            let page = match self.ask(&Request::Changes { since: out.seq })? {
                Answer::Changes(page) => page,
                other => {
                    return Err(GateError::Mismatch {
                        asked: "change feed",
                        got: kind(&other),
                    });
                }
            };
            out.fresh = page.fresh;
            let progressed = page.seq > out.seq;
            out.seq = page.seq;
            for p in page.patients {
                if seen.insert(p.clone()) {
                    out.patients.push(p);
                }
            }
            if !page.more || !progressed {
                return Ok(out);
            }
        }
    }
}

impl SocketGate {
    fn identity(&mut self, request: Request) -> Result<consent_protocol::Identity, GateError> {
        match self.ask(&request)? {
            Answer::Identity(i) => Ok(i),
            other => Err(GateError::Mismatch {
                asked: "identity",
                got: kind(&other),
            }),
        }
    }
}

impl Identities for SocketGate {
    fn network_id(&mut self, patient: &str) -> Result<Option<String>, GateError> {
        Ok(self
            .identity(Request::NetworkIdOf {
                patient: patient.to_owned(),
            })?
            .network_id)
    }

    fn local_id(&mut self, network_id: &str) -> Result<Option<String>, GateError> {
        Ok(self
            .identity(Request::LocalIdOf {
                network_id: network_id.to_owned(),
            })?
            .patient)
    }
}
