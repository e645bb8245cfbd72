//! `ssmix2`: reading a clinic's SS-MIX2 standardized and extended storage correctly.
//!
//! The parsers do no I/O:
//! * [`name`]: paths and file names (standardized: 7 fields; extended: content folders of 6
//!   or 7 fields under data-type folders that contain `^`, `_` and Japanese text).
//! * [`resolve`]: the condition-flag lifecycle (1 current, 2 superseded, 0 deleted).
//! * [`decode`]: bytes to Unicode before any tokenising (ISO-2022-JP; E-12 fallbacks).
//! * [`hl7`], [`message`]: HL7 v2.5 tokenising and the MSH/EVN/PID/PV1/ORC key fields.
//! * [`time`]: every timestamp as Japan local time (+09:00).
//! * [`reason`]: the stable reason codes.
//!
//! With I/O, and never writing to the storage:
//! * [`scan`]: the streaming inventory (memory bounded by one folder, not the tree).
//! * [`index`]: the inventory's SQLite index.
//! * [`conformance`]: the storage's conformance report (SS-MIX2 の点検) from the index.
//! * [`build`]: the test-data builder (writes storages, as an EMR would).
//! * [`encode`]: the ISO-2022-JP writer rules (E-20), used by the builder.
//! * [`watch`]: when a file is settled (E-01), when a deletion is confirmed (E-03).
//! * [`transaction`]: the transaction storage's `#SSMIX` headers (the change feed).
#![forbid(unsafe_code)]

pub mod build;
pub mod conformance;
pub mod datatype;
pub mod decode;
pub mod encode;
pub mod hl7;
pub mod index;
pub mod message;
pub mod name;
pub mod reason;
pub mod resolve;
pub mod scan;
pub mod time;
pub mod transaction;
pub mod watch;
