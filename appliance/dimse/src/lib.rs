//! `dimse`: the DICOM message service element layer (PS3.7) that dicom-rs does not provide:
//! command sets (group 0000, always Implicit VR Little Endian), the command fields of the
//! composite services (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET, C-CANCEL) and their statuses.
//!
//! * [`command`]: a command set as typed fields, encoded with its group length and decoded
//!   strictly (bounded, never panicking on any input).
//! * [`status`]: the status codes and their classes (success, pending, cancel, warning,
//!   failure).
//!
//! The association (A-ASSOCIATE, P-DATA fragments) is `dicom-ul`'s; this crate only turns a
//! reassembled command fragment into a [`command::Command`] and back.
#![forbid(unsafe_code)]

pub mod command;
pub mod status;
