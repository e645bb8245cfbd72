//! The ATNA audit trail (IHE ITI-20, issue 17).
//!
//! [`protocol`] and [`client`]: how the other services hand the `audit` service ([`service`])
//! their events; [`pending`]: where a service keeps them until then.
//!
//! [`message`]: the DICOM audit messages (PS3.15 A.5) of the events issue 17 lists.
//!
//! [`outbox`]: the durable, ordered queue (store and forward) and its drain.
//!
//! [`syslog`]: the transport to the network's audit repository: each audit message is an
//! RFC 5424 syslog message (formatted by the `fasyslog` crate when it is recorded, so that
//! its timestamp is the event's), sent over TLS with RFC 5425's octet-counting framing under
//! the box's one TLS policy (the repository verified against the network CA, the box's
//! certificate presented).
#![forbid(unsafe_code)]

pub mod client;
pub mod message;
pub mod outbox;
pub mod pending;
pub mod protocol;
pub mod service;
pub mod syslog;
