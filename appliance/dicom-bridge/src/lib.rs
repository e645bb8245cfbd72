//! `dicom-bridge`: the DICOM bridge between the clinic's modalities and viewers and the
//! network PACS (issue 6, in progress).
//!
//! * [`forward`]: C-STORE of queued instances to the network PACS, bytes as received.
//! * [`header`]: the routing elements (SOP class and instance, patient ID, the raw patient
//!   name, study) from the start of a data set, without decoding the rest.
//! * [`scp`]: the clinic-side SCP (C-ECHO; C-STORE of any SOP class into the spool).
//! * [`service`]: the `dicom` service: the SCP, and the consent-gated forwarder.
//! * [`spool`]: the durable spool and store-and-forward queue. An instance is streamed into
//!   a temporary file, fsynced, renamed into place and recorded in the queue **before** its
//!   C-STORE success is sent; a quota or a full disk is `OutOfResources` (A700) with nothing
//!   left behind; duplicates of a SOP Instance UID follow a stated policy.
#![forbid(unsafe_code)]

/// The service name (its state directory, user `tsunagi-dicom`).
pub const NAME: &str = "dicom";

/// The service's system user.
pub const USER: &str = "tsunagi-dicom";

pub mod forward;
pub mod header;
pub mod qr;
pub mod scp;
pub mod service;
pub mod spool;
pub mod translate;

/// Now, in Unix seconds (what the spool records).
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
