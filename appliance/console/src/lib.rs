//! `console`: the clinic console (issue 19), the staff's Japanese web page on the clinic
//! LAN. HTTPS only, on the LAN address alone (`CAP_NET_BIND_SERVICE` for port 443 and
//! nothing else). Local staff accounts with a password (Argon2id) and a TOTP second factor
//! (MHLW's guideline 6.0 asks for two factors); the first administrator comes with a
//! one-time setup code. Every login, failed login and logout goes to the ATNA trail.
//!
//! - [`accounts`]: `console.db`, the accounts, sessions and the setup code.
//! - [`web`]: the pages and forms.
//! - [`lang`]: Japanese first, English when the browser chose it.
//! - [`overview`]: 接続状態's facts, from the services' metrics.
//! - [`patients`]: the consent desk's pages, over the consent service's desk socket.
//! - [`inspection`]: SS-MIX2 の点検, the storage's conformance report the sync keeps.
//! - [`trail`]: 監査, the consent service's decision trail and its verification.
//! - [`tls`]: the server certificate (the network CA's, or a self-signed one).
//! - [`service`]: the service that serves them.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod held;
pub mod inspection;
pub mod lang;
pub mod overview;
pub mod patients;
pub mod service;
pub mod tls;
pub mod trail;
pub mod web;

use tsunagi_runtime::service::{Capability, Launch, Service};

/// The service's name.
pub const NAME: &str = "console";
/// The service's user.
pub const USER: &str = "tsunagi-console";

/// The console as the binary lists it.
pub const SERVICE: Service = Service {
    name: NAME,
    user: USER,
    description: "tsunagi clinic console",
    capabilities: &[Capability::CAP_NET_BIND_SERVICE],
    // Reads the supervisor's status; hands its events to the audit trail; asks the consent
    // service's desk.
    groups: &[
        tsunagi_runtime::control::STATUS_GROUP,
        audit::service::CLIENT_GROUP,
        consent::desk::GROUP,
        // Reads the certificate the network issued for it.
        identity::CONSOLE_GROUP,
    ],
    worker_threads: 1,
    launch: |cfg| {
        cfg.console.enabled.then(|| {
            Launch::reading(
                cfg,
                &(
                    &cfg.console,
                    &cfg.audit.enabled,
                    &cfg.consent.enabled,
                    &cfg.identity.enabled,
                ),
            )
        })
    },
    main: |cfg, ctx| {
        tsunagi_runtime::service::boxed(service::run(ctx, service::Settings::from_config(cfg)))
    },
};
