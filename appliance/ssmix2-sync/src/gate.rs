//! The consent gate (the client of the consent service's socket), shared with the other
//! services: see [`consent::client`].

pub use consent::client::*;
