//! The bridge's part of the ATNA audit trail (issue 17): every instance received and every
//! instance sent is one DICOM Instances Transferred message.
//!
//! The spool writes each transfer in the transaction that makes it true (a receipt with its
//! queue row, a send with its release record: [`crate::spool::Spool::pending_transfers`]),
//! so none is lost with power, and this task hands them, oldest first, to the `audit`
//! service, which answers once they are in its durable queue; only then do they leave the
//! spool. The patient is named by the network ID (asked of the consent service's identity
//! cache) or, without one, by the clinic's ID, which the audit service turns into a
//! pseudonym that never leaves the box. With the audit trail off (`[audit] enabled =
//! false`), the records are dropped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use audit::protocol::{Event, Patient, Result as Outcome};
use consent::client::{GateError, Identities, SocketGate};
use tokio_util::sync::CancellationToken;

use crate::spool::{PendingTransfer, Spool};

/// Transfers handed over per request.
const BATCH: usize = audit::protocol::MAX_BATCH;
/// How often the spool is looked at when nothing waits (a receipt or a send lands there
/// first; a second is soon enough for an audit trail and costs one indexed query).
const POLL: Duration = Duration::from_secs(1);
/// The longest wait after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the audit trail goes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `audit` service's socket; `None`: the audit trail is off.
    pub audit_socket: Option<PathBuf>,
    pub consent_socket: PathBuf,
    /// The network PACS, named in each send.
    pub pacs_ae: String,
    pub pacs_address: String,
}

/// Why transfers were not handed over (they stay in the spool).
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error(transparent)]
    Audit(#[from] audit::client::ClientError),
    #[error("cannot ask the patient's network ID")]
    Identity(#[source] GateError),
}

/// Hands the spool's transfer records to the audit service until `stop`; the last failure
/// (or `None`) is kept in `last_error` for status.
pub async fn run(
    spool: Spool,
    settings: Settings,
    last_error: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
) {
    let mut clients = Some(Clients {
        audit: settings
            .audit_socket
            .as_deref()
            .map(audit::client::Client::new),
        consent: SocketGate::new(&settings.consent_socket),
    });
    let mut failures = 0u32;
    loop {
        let Some(mut c) = clients.take() else {
            return;
        };
        let (spool2, settings2) = (spool.clone(), settings.clone());
        let Ok((c, result)) = tokio::task::spawn_blocking(move || {
            let r = hand_over(&mut c, &spool2, &settings2);
            (c, r)
        })
        .await
        else {
            // A panic is a bug: the records stay; the next start tries again.
            return;
        };
        clients = Some(c);
        let wait = match result {
            Ok(0) => {
                failures = 0;
                set(&last_error, None);
                POLL
            }
            Ok(_) => {
                failures = 0;
                set(&last_error, None);
                Duration::ZERO
            }
            Err(e) => {
                failures += 1;
                let reason = tsunagi_runtime::child::error_chain(&e);
                tracing::warn!(error = %reason, "transfers not handed to the audit trail; retrying");
                set(&last_error, Some(reason));
                (POLL * 2u32.saturating_pow(failures.min(5))).min(MAX_BACKOFF)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn set(slot: &Mutex<Option<String>>, value: Option<String>) {
    if let Ok(mut s) = slot.lock() {
        *s = value;
    }
}

struct Clients {
    audit: Option<audit::client::Client>,
    consent: SocketGate,
}

/// One batch: read, named, recorded, forgotten. Returns how many were handed over.
fn hand_over(c: &mut Clients, spool: &Spool, settings: &Settings) -> Result<usize, TrailError> {
    let batch = spool.pending_transfers(BATCH)?;
    let Some(last) = batch.last().map(|t| t.id) else {
        return Ok(0);
    };
    let Some(audit) = c.audit.as_mut() else {
        spool.transfers_recorded(last)?;
        return Ok(batch.len());
    };
    let mut network_ids: HashMap<String, Option<String>> = HashMap::new();
    let mut events = Vec::with_capacity(batch.len());
    for t in &batch {
        let local = t.patient_id.clone().unwrap_or_default();
        let network = match network_ids.get(&local) {
            Some(n) => n.clone(),
            None => {
                let n = if local.is_empty() {
                    None
                } else {
                    match c.consent.network_id(&local) {
                        Ok(n) => n,
                        // An ID the identity cache will not look up has no network ID.
                        Err(GateError::Refused(_)) => None,
                        Err(e) => return Err(TrailError::Identity(e)),
                    }
                };
                network_ids.insert(local.clone(), n.clone());
                n
            }
        };
        events.push(event(
            t,
            network.map_or(Patient::Local(local), Patient::Network),
            settings,
        ));
    }
    audit.record_all(&events)?;
    spool.transfers_recorded(last)?;
    Ok(batch.len())
}

/// The audit event of one transfer.
fn event(t: &PendingTransfer, patient: Patient, settings: &Settings) -> Event {
    let clean = |s: &str| s.trim_end_matches(['\0', ' ']).to_owned();
    let (peer_ae, peer_address) = if t.sent {
        (settings.pacs_ae.clone(), settings.pacs_address.clone())
    } else {
        (t.peer_ae.clone(), t.peer_address.clone())
    };
    Event::InstancesTransferred {
        sent: t.sent,
        peer_ae,
        peer_address,
        result: Outcome::Success,
        patient,
        study_uid: clean(t.study_uid.as_deref().unwrap_or_default()),
        sop_classes: vec![(clean(&t.sop_class), 1)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(sent: bool) -> PendingTransfer {
        PendingTransfer {
            id: 1,
            sent,
            peer_ae: "CT1".into(),
            peer_address: "192.168.10.5".into(),
            patient_id: Some("0001234".into()),
            study_uid: Some("1.2.392.9\0".into()),
            sop_class: "1.2.840.10008.5.1.4.1.1.2\0".into(),
            sop_instance: "1.2.3".into(),
            at: 0,
        }
    }

    fn settings() -> Settings {
        Settings {
            audit_socket: None,
            consent_socket: PathBuf::new(),
            pacs_ae: "HUBPACS".into(),
            pacs_address: "10.98.0.1:4242".into(),
        }
    }

    #[test]
    fn a_receipt_names_the_modality_and_a_send_the_network_pacs() {
        let received = event(
            &transfer(false),
            Patient::Local("0001234".into()),
            &settings(),
        );
        let Event::InstancesTransferred {
            sent,
            peer_ae,
            peer_address,
            study_uid,
            sop_classes,
            ..
        } = received
        else {
            panic!()
        };
        assert!(!sent);
        assert_eq!(
            (peer_ae.as_str(), peer_address.as_str()),
            ("CT1", "192.168.10.5")
        );
        assert_eq!(study_uid, "1.2.392.9");
        assert_eq!(sop_classes, [("1.2.840.10008.5.1.4.1.1.2".to_owned(), 1)]);
        let Event::InstancesTransferred {
            sent,
            peer_ae,
            peer_address,
            patient,
            ..
        } = event(
            &transfer(true),
            Patient::Network("NET-1".into()),
            &settings(),
        )
        else {
            panic!()
        };
        assert!(sent);
        assert_eq!(
            (peer_ae.as_str(), peer_address.as_str()),
            ("HUBPACS", "10.98.0.1:4242")
        );
        assert_eq!(patient, Patient::Network("NET-1".into()));
    }
}
