//! The process runtime of the tsunagi appliance: the supervisor and the child side.
//!
//! One binary, `tsunagi`, plays both roles:
//!
//! * `tsunagi run` calls [`supervisor::run`]. The supervisor starts every enabled service as a
//!   child process of the same binary (`tsunagi service NAME`), restarts crashed children with
//!   exponential backoff ([`policy`]), answers `tsunagi status` over a Unix control socket
//!   ([`control`]), serves Prometheus metrics ([`metrics`]), talks to systemd
//!   ([`sdnotify`]), reloads on SIGHUP and stops everything on SIGTERM/SIGINT.
//! * `tsunagi service NAME` calls [`child::enter`] (take the inherited status socket, drop to
//!   the service's own user and declared capabilities, set `NO_NEW_PRIVS`) and then
//!   [`child::run_service`], which hands the service a [`child::ServiceCtx`].
//!
//! Children report to the supervisor over a socket pair the supervisor creates and the child
//! inherits ([`protocol`], [`fd`]): readiness, health and a short status summary, one JSON
//! object per line. A service's background tasks run in [`tasks::Tasks`], so one that ends or
//! panics ends the service with an error instead of dying unnoticed.
//!
//! This is the only crate of the workspace with `unsafe` code: one block in [`fd`] that adopts
//! the inherited file descriptor. Everything else goes through `nix` and `caps`.
#![deny(unsafe_code)]

pub mod child;
pub mod control;
pub mod fd;
pub mod http;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod privilege;
pub mod protocol;
pub mod sdnotify;
pub mod service;
pub mod status;
pub mod supervisor;
pub mod tasks;

/// Exit codes of the `tsunagi` binary, in both roles. They are API: the systemd unit lists
/// [`exit_code::CONFIG`] in `RestartPreventExitStatus=`, and the supervisor reports them.
pub mod exit_code {
    /// Clean stop.
    pub const OK: u8 = 0;
    /// A runtime failure (the message says which).
    pub const FAILURE: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// The configuration file is invalid; restarting will not help.
    pub const CONFIG: u8 = 3;
    /// `tsunagi status` could not reach a running supervisor.
    pub const NO_SUPERVISOR: u8 = 4;
    /// A child could not set itself up (inherited socket, privileges, state directory).
    pub const CHILD_SETUP: u8 = 5;
    /// `tsunagi medium`: the provisioning medium was refused (the line says why).
    pub const REFUSED: u8 = 6;
}
