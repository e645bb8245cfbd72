//! `ssmix2-sync`: the SS-MIX2 sync service (service `ssmix2`, user `tsunagi-ssmix2`).
//!
//! For each patient whose consent permits it, the current state of every key of the clinic's
//! storage is published to the network as an **SS-MIX2 replica**: a tree that is itself a
//! conformant standardized storage holding the consented subset.
//!
//! * [`replica`]: where the replica lives — the [`replica::Replica`] trait, validated
//!   relative paths, and the local/mounted directory transport.
//! * [`webdav`]: the HTTPS WebDAV transport (rustls, client certificate).
//! * [`sync`]: one sync cycle (index → revocations → publications → deletions → outbox).
//! * [`share`]: the storage on the EMR server's SMB share: the mount (run by the image's
//!   own unit, not by this service) and the check that it is there.
//! * [`watcher`]: inotify on local storages (a trigger; the rescan is the backstop).
//! * [`service`]: the service loop, status and metrics.
//! * [`desk`]: the console's requeue and discard of the files that wait (保留中).
//!
//! The consent service is asked through [`consent::client`] (decisions and its change feed).
#![forbid(unsafe_code)]

pub mod audit_trail;
pub mod desk;
pub mod replica;
pub mod service;
pub mod share;
pub mod sync;
pub mod watcher;
pub mod webdav;

/// The service name (its state directory, user `tsunagi-ssmix2`).
pub const NAME: &str = "ssmix2";

/// The service's system user.
pub const USER: &str = "tsunagi-ssmix2";

/// The directory, inside the runtime directory, of the storage's conformance report
/// (SS-MIX2 の点検), of what waits (保留中) and of the desk socket the console requeues
/// and discards through ([`desk`]): the service's, group `tsunagi-desk` (the console),
/// mode 2750.
pub const REPORT_DIR: &str = "ssmix2-report";
/// The report ([`ssmix2::conformance::Conformance`] as JSON, 0640), replaced after each
/// cycle.
pub const REPORT_FILE: &str = "conformance.json";

/// What waits at the clinic ([`sync::waiting::Waiting`] as JSON, 0640), in the same
/// directory, replaced after each cycle: 保留中's SS-MIX2 files.
pub const WAITING_FILE: &str = "waiting.json";

/// The path of what waits, for a config.
pub fn waiting_path(cfg: &tsunagi_config::Config) -> std::path::PathBuf {
    cfg.paths
        .runtime_dir
        .as_path()
        .join(REPORT_DIR)
        .join(WAITING_FILE)
}

/// The conformance report's path for a config.
pub fn report_path(cfg: &tsunagi_config::Config) -> std::path::PathBuf {
    cfg.paths
        .runtime_dir
        .as_path()
        .join(REPORT_DIR)
        .join(REPORT_FILE)
}

/// The SS-MIX2 sync as the binary lists it.
pub const SERVICE: tsunagi_runtime::service::Service = tsunagi_runtime::service::Service {
    name: NAME,
    user: USER,
    description: "tsunagi SS-MIX2 sync",
    // Reads the storage (a share readable by this user) and writes the replica.
    capabilities: &[],
    // Asks the consent service for decisions; may present the box's certificate to the hub;
    // records exports and deletions in the ATNA audit trail.
    groups: &[
        consent::CLIENT_GROUP,
        identity::CLIENT_GROUP,
        audit::service::CLIENT_GROUP,
    ],
    worker_threads: 2,
    launch: |cfg| {
        let x = cfg.ssmix2.as_ref().filter(|x| x.enabled)?;
        Some(tsunagi_runtime::service::Launch {
            // The conformance report's directory: the console (group `tsunagi-desk`) reads it,
            // and asks the desk socket in it.
            shared_dirs: vec![(
                cfg.paths.runtime_dir.as_path().join(REPORT_DIR),
                consent::desk::GROUP.to_owned(),
            )],
            ..tsunagi_runtime::service::Launch::reading(cfg, x)
        })
    },
    main: |cfg, ctx| match &cfg.ssmix2 {
        Some(x) => tsunagi_runtime::service::boxed(service::run(
            ctx,
            service::Settings::from_config(cfg, x),
        )),
        None => tsunagi_runtime::service::boxed(std::future::ready(Err(
            tsunagi_runtime::service::NotEnabled { service: NAME },
        ))),
    },
};
