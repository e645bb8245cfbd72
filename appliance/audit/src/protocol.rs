//! What the other services hand the `audit` service over its socket
//! (`RUNTIME-DIR/audit/record.sock`): one JSON line per event, one answer per line.
//!
//! - `{"record":{"instances-transferred":{...}}}` → `{"recorded":{"seq":42}}` once the
//!   message is committed to the queue, or `{"error":"..."}`.
//!
//! Clients send typed events, never XML: the audit service builds every message itself
//! ([`crate::message`]), so the vocabulary is in one place and no client can put anything
//! else in the trail.

use serde::{Deserialize, Serialize};

use crate::message::{self, Action, Alert, AuditMessage, Direction, Node, Outcome, Peer};

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    Record(Event),
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    Recorded { seq: u64 },
    Error(String),
}

/// How an event ended, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Result {
    Success,
    MinorFailure,
    SeriousFailure,
    MajorFailure,
}

impl From<Result> for Outcome {
    fn from(r: Result) -> Outcome {
        match r {
            Result::Success => Outcome::Success,
            Result::MinorFailure => Outcome::MinorFailure,
            Result::SeriousFailure => Outcome::SeriousFailure,
            Result::MajorFailure => Outcome::MajorFailure,
        }
    }
}

/// The events of issue 17.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", rename_all_fields = "kebab-case")]
pub enum Event {
    InstancesTransferred {
        sent: bool,
        peer_ae: String,
        peer_address: String,
        result: Result,
        patient_network_id: String,
        study_uid: String,
        sop_classes: Vec<(String, u32)>,
    },
    Query {
        peer_ae: String,
        peer_address: String,
        result: Result,
        sop_class_uid: String,
        keys: Vec<u8>,
    },
    Ssmix2File {
        deleted: bool,
        replica: String,
        path: String,
        patient_network_id: String,
        result: Result,
    },
    PatientRecord {
        /// "C", "U" or "D".
        action: String,
        patient_network_id: String,
        what: String,
    },
    RefusedMedium {
        reason: String,
    },
    RefusedTlsPeer {
        reason: String,
        peer: String,
    },
    FailedAuditVerify {
        reason: String,
    },
    FailedLogin {
        user: String,
        from: String,
    },
}

impl Event {
    /// The audit message of this event, from `node`, at `at`.
    pub fn message(&self, node: &Node, at: std::time::SystemTime) -> AuditMessage {
        match self {
            Event::InstancesTransferred {
                sent,
                peer_ae,
                peer_address,
                result,
                patient_network_id,
                study_uid,
                sop_classes,
            } => message::instances_transferred(
                node,
                if *sent {
                    Direction::Sent
                } else {
                    Direction::Received
                },
                &Peer {
                    ae_title: peer_ae.clone(),
                    address: peer_address.clone(),
                },
                (*result).into(),
                patient_network_id,
                study_uid,
                sop_classes,
                at,
            ),
            Event::Query {
                peer_ae,
                peer_address,
                result,
                sop_class_uid,
                keys,
            } => message::query(
                node,
                &Peer {
                    ae_title: peer_ae.clone(),
                    address: peer_address.clone(),
                },
                (*result).into(),
                sop_class_uid,
                keys,
                at,
            ),
            Event::Ssmix2File {
                deleted,
                replica,
                path,
                patient_network_id,
                result,
            } => message::ssmix2_file(
                node,
                *deleted,
                replica,
                path,
                patient_network_id,
                (*result).into(),
                at,
            ),
            Event::PatientRecord {
                action,
                patient_network_id,
                what,
            } => {
                let action = match action.as_str() {
                    "C" => Action::Create,
                    "D" => Action::Delete,
                    _ => Action::Update,
                };
                message::patient_record(node, action, patient_network_id, what, at)
            }
            Event::RefusedMedium { reason } => {
                message::security_alert(node, Alert::RefusedMedium, reason, None, at)
            }
            Event::RefusedTlsPeer { reason, peer } => {
                message::security_alert(node, Alert::RefusedTlsPeer, reason, Some(peer), at)
            }
            Event::FailedAuditVerify { reason } => {
                message::security_alert(node, Alert::FailedAuditVerify, reason, None, at)
            }
            Event::FailedLogin { user, from } => message::failed_login(node, user, from, at),
        }
    }
}
