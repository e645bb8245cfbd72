//! What the other services hand the `audit` service over its socket
//! (`RUNTIME-DIR/audit/record.sock`): one JSON line per event, one answer per line.
//!
//! - `{"record":{"instances-transferred":{...}}}` → `{"recorded":{"seq":42}}` once the
//!   message is committed to the queue, or `{"error":"..."}`.
//! - `{"record-all":[{...},{...}]}` (1 to [`MAX_BATCH`] events) → `{"recorded-all":{"first":
//!   43,"last":44}}` once all are committed, in one transaction (or none is, and the answer
//!   is an error).
//!
//! A patient is named by the network ID when the network gave one (`{"network":"..."}`),
//! else by the clinic's ID (`{"local":"..."}`), which never leaves the box: the message
//! carries a pseudonym that only this box can resolve ([`Patient::audit_id`]).
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
    RecordAll(Vec<Event>),
}

/// The most events one `record-all` carries.
pub const MAX_BATCH: usize = 100;

/// A patient, as an event names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Patient {
    /// The network ID (名寄せ): what the repository may see.
    Network(String),
    /// The clinic's ID of a patient the network has no ID for yet.
    Local(String),
}

impl Patient {
    /// The ID in the audit message: the network ID, or for a local ID a keyed pseudonym
    /// (`local-` and 32 hex digits of BLAKE3 keyed with `key`, the box's own secret in
    /// `audit.db`): the same patient always gets the same one, the repository cannot invert
    /// it, and the box can (`tsunagi audit` hashes the clinic's IDs with the same key).
    pub fn audit_id(&self, key: &[u8; 32]) -> String {
        match self {
            Patient::Network(id) => id.clone(),
            Patient::Local(id) => {
                let hash = blake3::keyed_hash(key, id.as_bytes());
                format!("local-{}", &hash.to_hex()[..32])
            }
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    Recorded { seq: u64 },
    RecordedAll { first: u64, last: u64 },
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
        patient: Patient,
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
    /// An SS-MIX2 file put at (or deleted from) the hub's replica, by its data type and
    /// content (SHA-256, hex): never its path, which holds the clinic's patient ID.
    Ssmix2File {
        deleted: bool,
        replica: String,
        data_type: String,
        sha256: String,
        patient: Patient,
        result: Result,
    },
    PatientRecord {
        /// "C", "U" or "D".
        action: String,
        patient: Patient,
        what: String,
        /// The console account that made the change (issue 19), and the address it came
        /// from; none for the sync and the command line.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
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
    /// The update channel refused (issue 18): the reason, and the channel (its URL).
    RefusedUpdate {
        reason: String,
        channel: String,
    },
    /// What became of an update (issue 18): `version` installed into the other slot, or
    /// its first boot judged by the health gate (good; unhealthy, the box back on the old
    /// slot), or the install failed; `reason` in words when it did not go well.
    Update {
        version: String,
        verdict: UpdateVerdict,
        reason: Option<String>,
    },
    FailedLogin {
        user: String,
        from: String,
    },
    /// A login or a logout at the clinic console (issue 19), by the account's name, from
    /// an address on the clinic LAN; `success: false` for a refused login (a wrong
    /// password or second factor, or a locked account).
    UserAuthentication {
        user: String,
        from: String,
        logout: bool,
        success: bool,
    },
    /// An administrator changed a console account (issue 19): `account`'s role
    /// (`role_changed`), or it was added, removed or unlocked; `what` in words.
    AccountChange {
        admin: String,
        from: String,
        account: String,
        role_changed: bool,
        what: String,
    },
    /// A console administrator read the consent service's decision trail (監査), from an
    /// address on the clinic LAN.
    AuditLogUsed {
        user: String,
        from: String,
    },
    /// A provisioning medium was applied, or applying it failed (`tsunagi medium apply`; a
    /// refusal is [`Event::RefusedMedium`]).
    Medium {
        applied: bool,
        reason: String,
    },
    /// The box's clock against the network's time server changed state: `off` (beyond
    /// 1 s), `lost` (no answer), or `in-step` again.
    Clock {
        state: String,
        server: String,
        /// The hub's clock minus the box's, in milliseconds, when known.
        offset_ms: Option<i64>,
    },
}

/// What became of an update, for [`Event::Update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateVerdict {
    Installed,
    Good,
    Failed,
    Unhealthy,
}

/// A line of the provisioning trail (`STATE/provisioning/audit.jsonl`, written by
/// `tsunagi medium apply`) as an event; `None` for a line that is not one.
pub fn provisioning_event(line: &str) -> Option<Event> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("event")?.as_str()? != "provisioning-medium" {
        return None;
    }
    let reason = v.get("reason")?.as_str()?.to_owned();
    let serial = v
        .get("serial")
        .and_then(serde_json::Value::as_u64)
        .map(|s| format!(" (serial {s})"))
        .unwrap_or_default();
    Some(match v.get("verdict")?.as_str()? {
        "refused" => Event::RefusedMedium { reason },
        "applied" => Event::Medium {
            applied: true,
            reason: format!("provisioning medium applied{serial}: {reason}"),
        },
        _ => Event::Medium {
            applied: false,
            reason: format!("provisioning medium failed{serial}: {reason}"),
        },
    })
}

/// A file's content as a URI: RFC 6920's `ni:///sha-256;` and the digest in base64url (a
/// digest that is not 64 hex digits is kept as it came, after `sha256:`).
pub fn content_uri(sha256_hex: &str) -> String {
    use base64::Engine as _;
    let bytes: Option<Vec<u8>> = (sha256_hex.len() == 64)
        .then(|| {
            (0..32)
                .map(|i| u8::from_str_radix(sha256_hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect()
        })
        .flatten();
    match bytes {
        Some(b) => format!(
            "ni:///sha-256;{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        ),
        None => format!("sha256:{sha256_hex}"),
    }
}

impl Event {
    /// The audit message of this event, from `node`, at `at`; `key` makes the pseudonyms of
    /// local patient IDs ([`Patient::audit_id`]).
    pub fn message(&self, node: &Node, key: &[u8; 32], at: std::time::SystemTime) -> AuditMessage {
        match self {
            Event::InstancesTransferred {
                sent,
                peer_ae,
                peer_address,
                result,
                patient,
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
                &patient.audit_id(key),
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
                data_type,
                sha256,
                patient,
                result,
            } => {
                let mut m = message::ssmix2_file(
                    node,
                    *deleted,
                    replica,
                    &content_uri(sha256),
                    &patient.audit_id(key),
                    (*result).into(),
                    at,
                );
                if let Some(file) = m.objects.last_mut() {
                    file.details
                        .push(("data-type".to_owned(), data_type.clone()));
                }
                m
            }
            Event::PatientRecord {
                action,
                patient,
                what,
                user,
                from,
            } => {
                let action = match action.as_str() {
                    "C" => Action::Create,
                    "D" => Action::Delete,
                    _ => Action::Update,
                };
                let user = user
                    .as_deref()
                    .map(|u| (u, from.as_deref().unwrap_or_default()));
                message::patient_record(node, action, &patient.audit_id(key), what, user, at)
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
            Event::RefusedUpdate { reason, channel } => {
                message::security_alert(node, Alert::RefusedUpdate, reason, Some(channel), at)
            }
            Event::Update {
                version,
                verdict,
                reason,
            } => {
                let (words, outcome) = match verdict {
                    UpdateVerdict::Installed => ("installed in the other slot", Outcome::Success),
                    UpdateVerdict::Good => ("its first boot is healthy: kept", Outcome::Success),
                    UpdateVerdict::Failed => ("failed to install", Outcome::SeriousFailure),
                    UpdateVerdict::Unhealthy => (
                        "failed its health gate: back on the old slot",
                        Outcome::SeriousFailure,
                    ),
                };
                let why = reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                let mut m = message::security_alert(
                    node,
                    Alert::Update,
                    &format!("update to {version}: {words}{why}"),
                    None,
                    at,
                );
                m.outcome = outcome;
                m
            }
            Event::FailedLogin { user, from } => message::failed_login(node, user, from, at),
            Event::UserAuthentication {
                user,
                from,
                logout,
                success,
            } => message::user_authentication(node, user, from, *logout, *success, at),
            Event::AccountChange {
                admin,
                from,
                account,
                role_changed,
                what,
            } => message::account_change(node, admin, from, account, *role_changed, what, at),
            Event::AuditLogUsed { user, from } => {
                message::audit_log_used(node, user, from, message::CONSENT_TRAIL_URI, at)
            }
            Event::Medium { applied, reason } => {
                let mut m = message::security_alert(node, Alert::RefusedMedium, reason, None, at);
                m.outcome = if *applied {
                    Outcome::Success
                } else {
                    Outcome::SeriousFailure
                };
                m
            }
            Event::Clock {
                state,
                server,
                offset_ms,
            } => {
                let offset = offset_ms
                    .map(|ms| format!(", offset {:+.3} s", ms as f64 / 1000.0))
                    .unwrap_or_default();
                let mut m = message::security_alert(
                    node,
                    Alert::Clock,
                    &format!("clock {state} against the network's time server{offset}"),
                    Some(server),
                    at,
                );
                if state == "in-step" {
                    m.outcome = Outcome::Success;
                }
                m
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_patient_id_becomes_a_keyed_pseudonym_and_a_network_id_stays() {
        let key = [7u8; 32];
        let local = Patient::Local("0001234".into());
        let pseudonym = local.audit_id(&key);
        assert!(pseudonym.starts_with("local-"), "{pseudonym}");
        assert_eq!(pseudonym.len(), "local-".len() + 32);
        assert!(!pseudonym.contains("0001234"));
        assert_eq!(local.audit_id(&key), pseudonym);
        assert_ne!(Patient::Local("0001235".into()).audit_id(&key), pseudonym);
        assert_ne!(local.audit_id(&[8u8; 32]), pseudonym);
        assert_eq!(Patient::Network("NET-1".into()).audit_id(&key), "NET-1");
    }

    #[test]
    fn the_provisioning_trail_s_lines_become_events() {
        let line = |verdict: &str| {
            format!(
                r#"{{"time":1,"event":"provisioning-medium","verdict":"{verdict}","serial":7,"reason":"why"}}"#
            )
        };
        assert_eq!(
            provisioning_event(&line("refused")),
            Some(Event::RefusedMedium {
                reason: "why".into()
            })
        );
        assert_eq!(
            provisioning_event(&line("applied")),
            Some(Event::Medium {
                applied: true,
                reason: "provisioning medium applied (serial 7): why".into()
            })
        );
        assert!(matches!(
            provisioning_event(&line("failed")),
            Some(Event::Medium { applied: false, .. })
        ));
        assert_eq!(provisioning_event("not json"), None);
        assert_eq!(provisioning_event(r#"{"event":"other"}"#), None);
    }

    #[test]
    fn an_update_s_outcome_is_a_software_configuration_alert_that_fails_only_when_it_failed() {
        let node = Node {
            facility: "1312345678".to_owned(),
            serial: "TSU-1".to_owned(),
            address: None,
        };
        let at = std::time::SystemTime::now();
        let update = |verdict, reason: Option<&str>| {
            Event::Update {
                version: "3".into(),
                verdict,
                reason: reason.map(str::to_owned),
            }
            .message(&node, &[0; 32], at)
        };
        let good = update(UpdateVerdict::Good, None);
        assert_eq!(
            good.event_types,
            vec![message::codes::SOFTWARE_CONFIGURATION]
        );
        assert_eq!(good.outcome, Outcome::Success);
        assert_eq!(
            good.outcome_description.as_deref(),
            Some("update to 3: its first boot is healthy: kept")
        );
        let bad = update(UpdateVerdict::Unhealthy, Some("not ready: dicom"));
        assert_eq!(bad.outcome, Outcome::SeriousFailure);
        assert_eq!(
            bad.outcome_description.as_deref(),
            Some("update to 3: failed its health gate: back on the old slot: not ready: dicom")
        );
        let line = serde_json::to_string(&Event::Update {
            version: "3".into(),
            verdict: UpdateVerdict::Failed,
            reason: None,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"update":{"version":"3","verdict":"failed","reason":null}}"#
        );
    }

    #[test]
    fn a_files_content_is_a_named_information_uri() {
        // RFC 6920 section 3's example: the SHA-256 of "Hello World!".
        assert_eq!(
            content_uri("7f83b1657ff1fc53b92dc18148a1d65dfc2d4b1fa3d677284addd200126d9069"),
            "ni:///sha-256;f4OxZX_x_FO5LcGBSKHWXfwtSx-j1ncoSt3SABJtkGk"
        );
        assert_eq!(content_uri("abc"), "sha256:abc");
    }

    #[test]
    fn requests_and_answers_on_the_wire() {
        let event = Event::PatientRecord {
            action: "U".into(),
            patient: Patient::Local("0001234".into()),
            what: "consent".into(),
            user: None,
            from: None,
        };
        let line = serde_json::to_string(&Request::RecordAll(vec![event.clone()])).unwrap();
        assert_eq!(
            line,
            r#"{"record-all":[{"patient-record":{"action":"U","patient":{"local":"0001234"},"what":"consent"}}]}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(&line).unwrap(),
            Request::RecordAll(vec![event])
        );
        assert_eq!(
            serde_json::to_string(&Answer::RecordedAll { first: 3, last: 4 }).unwrap(),
            r#"{"recorded-all":{"first":3,"last":4}}"#
        );
    }
}
