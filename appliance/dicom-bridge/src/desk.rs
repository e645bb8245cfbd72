//! The clinic console's 保留中 for DICOM (issue 19): the instances that wait in the clinic,
//! each with why, and the staff's requeue and discard, audited.
//!
//! Socket: `RUNTIME-DIR/dicom-desk/desk.sock` (directory 2750, group
//! [`consent::desk::GROUP`]; socket 0660), served by the DICOM service: one JSON request per
//! line, one answer per line ([`Request`], [`Answer`]). Only the console is in the group.
//!
//! A requeue or a discard is recorded in the consent service's audit trail first (one row
//! per instance, decision `requeued` or `discarded-held`, reason `by:ACCOUNT (ADDRESS)`,
//! under its patient's hash and the category of its SOP class); what cannot be recorded is
//! not done. A requeued instance is decided again (consent, identity) before it is sent:
//! nothing leaves by a requeue. Only held instances and dead letters may be discarded; a
//! pending one may be on its way out at that moment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use consent::client::DenyReason;
use consent::client::{Handling, Object, Recipient, SocketGate};
use consent::desk::Staff;
use consent::model::Category;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tsunagi_runtime::listen::{self, LineLimits, ServeError};

use crate::spool::{Requeued, Spool, Waiting};

/// The socket's directory inside the runtime directory.
pub const DIR: &str = "dicom-desk";
/// The socket's file name.
pub const SOCKET_NAME: &str = "desk.sock";
/// The most instances one list answers.
pub const MAX_LISTED: usize = 200;
/// The most instances one requeue or discard names.
pub const MAX_IDS: usize = 200;
/// The longest request line.
const MAX_REQUEST: usize = 16 * 1024;

/// Why an instance is held: it carries no PatientID.
pub(crate) const NO_PATIENT_ID: &str = "no PatientID in the data set";
/// Why an instance is held: no data category covers its SOP class.
pub(crate) const NO_CATEGORY: &str = "no data category covers this SOP class";
/// Why an instance waits: its patient has no network ID yet.
pub(crate) const NO_NETWORK_ID: &str = "waiting for the patient's network ID";
/// How a dead letter's reason begins when the network PACS refused it for good.
pub(crate) const PACS_REFUSED: &str = "refused by the network PACS: ";
/// A dead letter's reason when the PACS takes neither the class nor the syntax.
pub(crate) const NOT_ACCEPTED: &str =
    "the network PACS accepts neither this SOP class nor its transfer syntax";
/// How a pending instance's reason begins when the PACS was busy (a transient status).
pub(crate) const PACS_BUSY: &str = "the network PACS cannot store it now: ";
/// How a held instance's reason begins when the consent service refused the question.
pub(crate) const CONSENT_REFUSED: &str = "the consent service refused the question: ";
/// How a pending instance's reason begins when the consent service denied for now.
pub(crate) const CONSENT_FOR_NOW: &str = "the consent service answered ";

/// The desk socket's path for a config.
pub fn socket_path(cfg: &tsunagi_config::Config) -> PathBuf {
    cfg.paths.runtime_dir.as_path().join(DIR).join(SOCKET_NAME)
}

/// A request to the DICOM desk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The waiting instances, oldest first (at most [`MAX_LISTED`]).
    List,
    /// Put these back in the way out (each decided again before it is sent).
    Requeue { staff: Staff, ids: Vec<i64> },
    /// Remove these held instances or dead letters, never sent.
    Discard { staff: Staff, ids: Vec<i64> },
}

/// Where a waiting instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Held in the clinic: never sent while held.
    Held,
    /// A dead letter: refused for good, or waited too long.
    Dead,
    /// Still in the way out, tried again later.
    Pending,
}

/// Why an instance waits, for the console's words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// The consent service denied it (no consent, withdrawn, not covered, ...).
    Consent(DenyReason),
    /// The consent service denied it for now (its cache stale, the clock behind).
    ConsentForNow,
    /// The consent service could not take the question (e.g. an ID its model refuses).
    ConsentRefused,
    NoPatientId,
    NoCategory,
    NoNetworkId,
    /// The network PACS could not be reached.
    PacsUnreachable,
    /// The network PACS was busy (a transient status).
    PacsBusy,
    /// The network PACS refused it for good (the status).
    PacsRefused(String),
    /// The network PACS takes neither its SOP class nor its transfer syntax.
    NotAccepted,
    /// It waited longer than the dead-letter time.
    TooLong,
    /// Anything else (the detail says what).
    Other,
}

/// A waiting instance as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The spool's queue ID (what a requeue or discard names).
    pub id: i64,
    pub state: State,
    pub why: Why,
    /// The reason as the service recorded it (English, for an operator).
    pub detail: String,
    /// The PatientID the instance carries.
    pub patient: Option<String>,
    /// The category of its SOP class (none: no category covers it).
    pub category: Option<Category>,
    pub sop_class: String,
    pub size: u64,
    /// Unix seconds.
    pub received_at: i64,
    pub attempts: u32,
    /// Unix seconds: when a pending one is tried again.
    pub next_attempt_at: i64,
}

/// The desk's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Answer {
    /// The waiting instances; `more`: there are more than listed.
    Waiting { items: Vec<Item>, more: bool },
    /// So many instances were requeued or discarded (the others named were no longer
    /// waiting, or may not be discarded).
    Done { count: usize },
    /// The request is not acceptable: what is wrong, in words.
    Refused(String),
    /// The service could not answer (never patient data).
    Error(String),
}

/// Why an instance waits, from its state and recorded reason.
pub fn why(state: State, reason: &str) -> Why {
    match state {
        State::Held => {
            if let Ok(deny) = reason.parse::<DenyReason>() {
                Why::Consent(deny)
            } else if reason == NO_PATIENT_ID {
                Why::NoPatientId
            } else if reason == NO_CATEGORY {
                Why::NoCategory
            } else if reason.starts_with(CONSENT_REFUSED) {
                Why::ConsentRefused
            } else {
                Why::Other
            }
        }
        State::Dead => {
            if let Some(status) = reason.strip_prefix(PACS_REFUSED) {
                Why::PacsRefused(status.to_owned())
            } else if reason == NOT_ACCEPTED {
                Why::NotAccepted
            } else {
                // Moved here by the dead-letter clock, with its last forwarding error.
                Why::TooLong
            }
        }
        State::Pending => {
            if reason == NO_NETWORK_ID {
                Why::NoNetworkId
            } else if reason.starts_with(PACS_BUSY) {
                Why::PacsBusy
            } else if reason.starts_with(CONSENT_FOR_NOW) {
                Why::ConsentForNow
            } else {
                Why::PacsUnreachable
            }
        }
    }
}

fn item(w: Waiting) -> Item {
    let state = match w.state.as_str() {
        "held" => State::Held,
        "dead" => State::Dead,
        _ => State::Pending,
    };
    Item {
        id: w.id,
        state,
        why: why(state, &w.reason),
        category: Category::for_dicom_sop_class(&w.sop_class),
        detail: w.reason,
        patient: w.patient_id,
        sop_class: w.sop_class,
        size: w.size,
        received_at: w.received_at,
        attempts: w.attempts,
        next_attempt_at: w.next_attempt_at,
    }
}

/// Answers one request (blocking: SQLite, the consent socket).
pub fn answer(spool: &Spool, gate: &mut SocketGate, request: Request, now: i64) -> Answer {
    let (staff, ids, handling) = match request {
        Request::List => {
            return match spool.waiting(MAX_LISTED + 1) {
                Ok(mut rows) => {
                    let more = rows.len() > MAX_LISTED;
                    rows.truncate(MAX_LISTED);
                    Answer::Waiting {
                        items: rows.into_iter().map(item).collect(),
                        more,
                    }
                }
                Err(e) => failed("list", &e),
            };
        }
        Request::Requeue { staff, ids } => (staff, ids, Handling::Requeued),
        Request::Discard { staff, ids } => (staff, ids, Handling::Discarded),
    };
    if !consent::desk::valid(&staff) {
        return Answer::Refused("the staff account".into());
    }
    if ids.is_empty() || ids.len() > MAX_IDS {
        return Answer::Refused(format!("name 1 to {MAX_IDS} instances"));
    }
    let discard = handling == Handling::Discarded;
    let picked = match spool.pick_waiting(&ids, discard) {
        Ok(p) => p,
        Err(e) => return failed("read the waiting instances", &e),
    };
    if picked.is_empty() {
        return Answer::Done { count: 0 };
    }
    // Audited first, per patient and category: what cannot be recorded is not done.
    let by = format!("{} ({})", staff.account, staff.from);
    if let Err(e) = audit(gate, &picked, handling, &by) {
        tracing::error!(
            error = &e as &dyn std::error::Error,
            "the audit trail cannot record a requeue or discard; nothing was changed"
        );
        return Answer::Error("the audit trail cannot record it; nothing was changed".into());
    }
    let ids: Vec<i64> = picked.iter().map(|r| r.id).collect();
    let done = if discard {
        spool.discard(&ids)
    } else {
        spool.requeue_waiting(&ids, now)
    };
    match done {
        Ok(done) => {
            tracing::info!(
                count = done.len(),
                action = handling.as_str(),
                "waiting instances handled at the console"
            );
            Answer::Done { count: done.len() }
        }
        Err(e) => failed("change the spool (the audit trail has recorded it)", &e),
    }
}

fn failed(what: &str, e: &(dyn std::error::Error + 'static)) -> Answer {
    tracing::error!(error = e, "the DICOM desk could not {what}");
    Answer::Error(format!("the spool could not {what}"))
}

/// One audit record per patient and category of `picked`.
fn audit(
    gate: &mut SocketGate,
    picked: &[Requeued],
    handling: Handling,
    by: &str,
) -> Result<(), consent::client::GateError> {
    let mut groups: BTreeMap<(Option<&str>, Category), Vec<Object>> = BTreeMap::new();
    for r in picked {
        // A class no category covers is never sent; it is recorded under images, the
        // category of what the bridge carries (as `tsunagi dicom requeue` does).
        let category = Category::for_dicom_sop_class(&r.sop_class).unwrap_or(Category::Images);
        groups
            .entry((r.patient_id.as_deref(), category))
            .or_default()
            .push(Object::DicomInstance(r.sop_instance.clone()));
    }
    for ((patient, category), objects) in groups {
        gate.handled(patient, Recipient::Hub, category, handling, &objects, by)?;
    }
    Ok(())
}

/// Binds the desk socket in `dir` (replacing a stale one), mode 0660.
pub fn bind(dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    listen::bind_socket(&dir.join(SOCKET_NAME))
}

/// Serves the desk until `stop` fires: each request on a blocking thread, one at a time
/// (a requeue and a discard of the same instance never interleave).
pub async fn serve(
    listener: tokio::net::UnixListener,
    spool: Spool,
    consent_socket: PathBuf,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let gate = std::sync::Arc::new(std::sync::Mutex::new(SocketGate::new(&consent_socket)));
    let limits = LineLimits {
        max_connections: 4,
        max_line: MAX_REQUEST,
        idle: Duration::from_secs(60),
    };
    listen::serve_json(listener, limits, stop, Answer::Refused, move |request| {
        let (spool, gate) = (spool.clone(), gate.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let mut gate = gate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                answer(&spool, &mut gate, request, crate::now())
            })
            .await
            .unwrap_or_else(|_| Answer::Error("internal error".into()))
        }
    })
    .await
}

/// Asks the desk at `socket` (blocking; at most `timeout` for each read and write).
pub fn ask(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Answer, listen::AskError> {
    listen::ask_line(socket, request, timeout, 1 << 20)
}

#[cfg(test)]
mod tests;
