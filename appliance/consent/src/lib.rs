//! `consent`: the consent and patient-identity cache (同意・公開設定・名寄せ), and the one
//! place that decides whether a patient's data may leave the clinic.
//!
//! * [`model`]: patients, identifiers, consents (FHIR R4 / JP Core aligned), data categories
//!   and their mapping from SS-MIX2 data types and DICOM.
//! * [`decide`]: the decision, pure (default deny; fail closed when the cache is stale).
//! * [`store`]: the service's SQLite database: patients, links, consent versions, the push
//!   outbox, the sync state, and the append-only, keyed hash-chained audit trail.
//! * [`time`]: JST dates and times.
#![forbid(unsafe_code)]

pub mod client;
/// The typed protocol of the decision socket (the `consent-protocol` crate).
pub use consent_protocol as protocol;
pub mod decide;
pub mod desk;
pub mod fhir;
pub mod model;
pub mod service;
pub mod store;
pub mod sync;
pub mod time;

/// The service name (its state directory, user `tsunagi-consent`).
pub const NAME: &str = "consent";

/// The service's system user.
pub const USER: &str = "tsunagi-consent";

/// The group whose members may ask for decisions (connect to the decision socket).
pub const CLIENT_GROUP: &str = "tsunagi-decide";

/// The consent service as the binary lists it.
pub const SERVICE: tsunagi_runtime::service::Service = tsunagi_runtime::service::Service {
    name: NAME,
    user: USER,
    description: "tsunagi consent cache",
    capabilities: &[],
    // May present the box's certificate to the network's FHIR server; records consent and
    // identity changes in the ATNA audit trail.
    groups: &[identity::CLIENT_GROUP, audit::service::CLIENT_GROUP],
    worker_threads: 2,
    launch: |cfg| {
        cfg.consent
            .enabled
            .then(|| tsunagi_runtime::service::Launch {
                // The decision socket's directory: this service owns it; the services that ask
                // for decisions are members of its group.
                // The desk socket's: the console changes consents through it.
                shared_dirs: vec![
                    (
                        cfg.paths.runtime_dir.as_path().join(NAME),
                        CLIENT_GROUP.to_owned(),
                    ),
                    (
                        cfg.paths.runtime_dir.as_path().join(desk::DIR),
                        desk::GROUP.to_owned(),
                    ),
                ],
                ..tsunagi_runtime::service::Launch::reading(cfg, &cfg.consent)
            })
    },
    main: |cfg, ctx| tsunagi_runtime::service::boxed(service::main(cfg, ctx)),
};
