//! `dicom-bridge`: the DICOM bridge between the clinic's modalities and viewers and the
//! network PACS (issue 6).
//!
//! * [`audit_trail`]: each instance received and sent, handed to the `audit` service (ATNA).
//! * [`admin`]: what an operator does with the spool (requeue dead letters), audited.
//! * [`forward`]: C-STORE of queued instances to the network PACS (bytes as received, or
//!   with a rewritten start), on associations kept for reuse.
//! * [`inflight`]: the in-flight bound: while a batch is being sent, the consent change
//!   feed is read every 100 ms, and nothing of a patient leaves more than 1 s after their
//!   withdrawal is recorded locally.
//! * [`walk`]: the data set's structure, checked as it streams in (duplicates, undefined
//!   lengths that cannot be walked); the routing elements on the way.
//! * [`header`]: the routing elements (SOP class and instance, patient ID, the raw patient
//!   name, study) from the start of a data set, without decoding the rest.
//! * [`translate`]: patient-ID translation (network ID with its issuer; the clinic's ID in
//!   OtherPatientIDsSequence), every other byte carried as is.
//! * [`qr`]: the query/retrieve proxy for the clinic's viewers (C-FIND, C-MOVE, C-GET).
//! * [`scp`]: the clinic-side SCP (C-ECHO; C-STORE of the storage SOP classes into the spool;
//!   C-FIND, C-MOVE and C-GET through the proxy).
//! * [`service`]: the `dicom` service: the SCP, and the consent-gated forwarder.
//! * [`spool`]: the durable spool and store-and-forward queue. An instance is durable (in a
//!   segment or a file of its own) and recorded in the queue **before** its C-STORE success
//!   is sent; a quota or a full disk is `OutOfResources` (A700) with nothing left behind;
//!   duplicates of a SOP Instance UID follow a stated policy.
#![forbid(unsafe_code)]

/// The service name (its state directory, user `tsunagi-dicom`).
pub const NAME: &str = "dicom";

/// The service's system user.
pub const USER: &str = "tsunagi-dicom";

/// The DICOM bridge as the binary lists it.
pub const SERVICE: tsunagi_runtime::service::Service = tsunagi_runtime::service::Service {
    name: NAME,
    user: USER,
    description: "tsunagi DICOM bridge",
    // The standard DICOM port is 104.
    capabilities: &[tsunagi_runtime::service::Capability::CAP_NET_BIND_SERVICE],
    // Asks the consent service for decisions; presents the box's certificate from
    // enrollment with DICOM TLS and `client-identity`; records transfers in the audit trail.
    groups: &[
        consent::CLIENT_GROUP,
        identity::CLIENT_GROUP,
        audit::service::CLIENT_GROUP,
    ],
    worker_threads: 2,
    launch: |cfg| {
        let d = cfg.dicom.as_ref().filter(|d| d.enabled)?;
        Some(tsunagi_runtime::service::Launch {
            // Two malloc arenas, not eight per core: the forwarder, the SCP's commits and
            // the audit hand-over each run on blocking threads, and an arena per thread was
            // 1.8 MiB of the service's peak RSS with a 2 GiB instance (issue 15: ≤ 32 MiB).
            env: vec![("MALLOC_ARENA_MAX".to_owned(), "2".to_owned())],
            // The desk socket's directory: the console lists, requeues and discards the
            // instances waiting in the clinic through it (保留中).
            shared_dirs: vec![(
                cfg.paths.runtime_dir.as_path().join(desk::DIR),
                consent::desk::GROUP.to_owned(),
            )],
            ..tsunagi_runtime::service::Launch::reading(cfg, d)
        })
    },
    main: |cfg, ctx| match &cfg.dicom {
        Some(d) => tsunagi_runtime::service::boxed(service::run(
            ctx,
            service::Settings::from_config(cfg, d),
        )),
        None => tsunagi_runtime::service::boxed(std::future::ready(Err(
            tsunagi_runtime::service::NotEnabled { service: NAME },
        ))),
    },
};

pub mod admin;
pub mod audit_trail;
pub mod commitment;
pub mod desk;
pub mod forward;
pub mod header;
pub mod inflight;
pub mod pacs;
pub mod qr;
pub mod scp;
pub mod service;
pub mod spool;
pub mod translate;
pub mod walk;

#[cfg(test)]
mod testdata;

/// Now, in Unix seconds (what the spool records).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A command set arriving in P-DATA fragments: bounded by
/// [`dimse::command::MAX_COMMAND_SET`], decoded once its last fragment came. The one way
/// every association of the bridge reads commands. (Public for the fuzz targets.)
#[derive(Debug, Default)]
pub struct CommandBuf(Vec<u8>);

impl CommandBuf {
    /// Adds a command fragment; the command once it is complete. `Err`: too long or not a
    /// command set (the association is to be ended).
    #[allow(clippy::result_unit_err)] // the caller ends the association either way
    pub fn push(
        &mut self,
        pdv: &dicom_ul::pdu::PDataValue,
    ) -> Result<Option<dimse::command::Command>, ()> {
        if self.0.len() + pdv.data.len() > dimse::command::MAX_COMMAND_SET {
            return Err(());
        }
        self.0.extend_from_slice(&pdv.data);
        if !pdv.is_last {
            return Ok(None);
        }
        let command = dimse::command::Command::decode(&self.0).map_err(|_| ());
        self.0.clear();
        command.map(Some)
    }
}

/// One P-DATA PDU with one value.
pub(crate) fn pdata(
    pc_id: u8,
    kind: dicom_ul::pdu::PDataValueType,
    is_last: bool,
    data: Vec<u8>,
) -> dicom_ul::Pdu {
    dicom_ul::Pdu::PData {
        data: vec![dicom_ul::pdu::PDataValue {
            presentation_context_id: pc_id,
            value_type: kind,
            is_last,
            data,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::{PDataValue, PDataValueType};

    fn pdv(data: &[u8], is_last: bool) -> PDataValue {
        PDataValue {
            presentation_context_id: 1,
            value_type: PDataValueType::Command,
            is_last,
            data: data.to_vec(),
        }
    }

    #[test]
    fn command_fragments_reassemble() {
        let bytes = dimse::command::Command::echo(7).encode();
        let (a, b) = bytes.split_at(5);
        let mut buf = CommandBuf::default();
        assert_eq!(buf.push(&pdv(a, false)), Ok(None));
        let command = buf.push(&pdv(b, true)).unwrap().unwrap();
        assert_eq!(command, dimse::command::Command::echo(7));
        // The buffer is empty again: the next command starts afresh.
        assert_eq!(buf.push(&pdv(&bytes, true)).unwrap(), Some(command));
    }

    #[test]
    fn oversized_or_garbled_commands_are_errors() {
        let mut buf = CommandBuf::default();
        let big = vec![0u8; dimse::command::MAX_COMMAND_SET + 1];
        assert_eq!(buf.push(&pdv(&big, false)), Err(()));
        let mut buf = CommandBuf::default();
        assert_eq!(buf.push(&pdv(&[1, 2, 3], true)), Err(()));
    }
}
