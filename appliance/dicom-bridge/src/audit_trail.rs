//! The bridge's part of the ATNA audit trail (issue 17): every instance received and every
//! instance sent is one DICOM Instances Transferred message.
//!
//! The spool writes each transfer in the transaction that makes it true (a receipt with its
//! queue row, a send with its release record: [`crate::spool::Spool::pending_transfers`]),
//! so none is lost with power, and this task hands them, oldest first, to the `audit`
//! service, which answers once they are in its durable queue; only then do they leave the
//! spool ([`audit::client::hand_over`]). The patient is named by the network ID (asked of the consent service's identity
//! cache) or, without one, by the clinic's ID, which the audit service turns into a
//! pseudonym that never leaves the box. With the audit trail off (`[audit] enabled =
//! false`), the records are dropped.

use std::collections::HashMap;
use std::path::PathBuf;

use audit::client::Source;
use audit::protocol::{Event, Patient, Result as Outcome};
use consent::client::{GateError, Identities, SocketGate};

use crate::spool::{PendingTransfer, Spool};

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

/// Why transfers were not read or named (they stay in the spool).
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("cannot ask the patient's network ID")]
    Identity(#[source] GateError),
}

/// The spool's transfer records, as events for the audit trail.
pub struct Transfers {
    pub spool: Spool,
    pub settings: Settings,
    consent: SocketGate,
}

impl Transfers {
    pub fn new(spool: Spool, settings: Settings) -> Transfers {
        let consent = SocketGate::new(&settings.consent_socket);
        Transfers {
            spool,
            settings,
            consent,
        }
    }
}

impl Source for Transfers {
    type Error = TrailError;

    fn pending(&mut self, limit: usize) -> Result<Vec<(i64, Event)>, TrailError> {
        let batch = self.spool.pending_transfers(limit)?;
        let named = self.settings.audit_socket.is_some();
        let mut network_ids: HashMap<String, Option<String>> = HashMap::new();
        let mut events = Vec::with_capacity(batch.len());
        for t in &batch {
            let local = t.patient_id.clone().unwrap_or_default();
            let network = match network_ids.get(&local) {
                Some(n) => n.clone(),
                None => {
                    // With the trail off the events are only forgotten: nothing to ask.
                    let n = if local.is_empty() || !named {
                        None
                    } else {
                        match self.consent.network_id(&local) {
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
            let patient = network.map_or(Patient::Local(local), Patient::Network);
            events.push((t.id, event(t, patient, &self.settings)));
        }
        Ok(events)
    }

    fn recorded(&mut self, last: i64) -> Result<(), TrailError> {
        Ok(self.spool.transfers_recorded(last)?)
    }
}

/// The spool's other audit events (a viewer's queries: [`audit::pending`]).
pub struct Events {
    pub spool: Spool,
}

impl Source for Events {
    type Error = TrailError;

    fn pending(&mut self, limit: usize) -> Result<Vec<(i64, Event)>, TrailError> {
        Ok(self.spool.pending_events(limit)?)
    }

    fn recorded(&mut self, last: i64) -> Result<(), TrailError> {
        Ok(self.spool.events_recorded(last)?)
    }
}

/// The audit event of one transfer.
fn event(t: &PendingTransfer, patient: Patient, settings: &Settings) -> Event {
    let clean = |s: &str| s.trim_end_matches(['\0', ' ']).to_owned();
    // A send without a peer of its own went to the network PACS; one with went to a
    // clinic's viewer (a retrieve through the box).
    let (peer_ae, peer_address) = if t.sent && t.peer_ae.is_empty() {
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
            // A send to the network PACS has no peer of its own.
            peer_ae: if sent { "" } else { "CT1" }.into(),
            peer_address: if sent { "" } else { "192.168.10.5" }.into(),
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
        // A retrieve's send to a clinic's viewer names the viewer.
        let to_viewer = PendingTransfer {
            peer_ae: "VIEWER".into(),
            peer_address: "192.168.10.7".into(),
            ..transfer(true)
        };
        let Event::InstancesTransferred {
            peer_ae,
            peer_address,
            ..
        } = event(&to_viewer, Patient::Network("NET-1".into()), &settings())
        else {
            panic!()
        };
        assert_eq!(
            (peer_ae.as_str(), peer_address.as_str()),
            ("VIEWER", "192.168.10.7")
        );
    }
}
