//! The HTTPS WebDAV transport (to be written).
