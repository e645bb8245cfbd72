//! Fleet updates (issue 18), the box's side: what the network operator's update channel
//! offers and whether this box may take it.
//!
//! The channel is a TUF repository (static files: `cargo xtask release` writes it, any
//! static host serves it). [`channel`] reads it with the `tough` crate from the root of
//! trust built into the image, through the box's one HTTP client and TLS policy, and turns
//! what it signs into a [`release::Release`]: a RAUC bundle for one `compatible`, with its
//! version and the waves it goes out in. [`download`] fetches the chosen bundle to the data
//! partition, resuming a partial download, and keeps it only if its length and SHA-256 are
//! the ones the signed metadata names.
//!
//! [`service`] is the `update` service around them; [`install`] the privileged step that
//! installs what it verified (`rauc install`, as root), and the health gate after the reboot.
//!
//! Refused, never retried as if the network were down: expired metadata (a freeze attack),
//! metadata not signed by the trusted keys, a release older than the running one (a
//! rollback attack), a bundle whose bytes are not the ones signed.
#![forbid(unsafe_code)]

pub mod channel;
pub mod download;
pub mod install;
pub mod release;
pub mod service;

pub use service::SERVICE;
