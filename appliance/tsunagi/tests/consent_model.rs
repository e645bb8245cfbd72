//! Issue 13, acceptance: a model-based property test of the release paths to the hub.
//!
//! Random interleavings of local consent changes (registration with any categories,
//! withdrawal), network-side consent changes in every shape the network can say yes or no
//! (active permits, inactive, rejected, entered-in-error, draft, a top-level deny, nested
//! denies by category and by period, an unreadable resource), pulls that succeed or fail,
//! time passing (the cache going stale), new SS-MIX2 files of every data type and DICOM
//! instances of every kind of SOP class (an image, a report, a PDF, a private class), and
//! the timing of sending: the hub unreachable (SS-MIX2 uploads planned at one moment and
//! carried out at another) and consent changes between a DICOM round's decisions and each
//! instance of its batch leaving.
//!
//! The real pieces run: the consent store and its decision (`consent::store::Store`, the
//! FHIR mapping through `consent::sync::apply_network_resource`), the SS-MIX2 sync
//! (`Syncer::cycle`), and the DICOM forwarder's round (`dicom_bridge::service::gate_round`)
//! with its in-flight rule (`dicom_bridge::inflight`: before each instance, the change feed
//! since the round's decisions, and a stale cache stops everything). The hub is the witness:
//! at the moment a file or an instance reaches it, it decides again from the store with the
//! pure decision function (recipient hub, the category of that exact object), and records a
//! violation when that decision is a deny. Invariant: no violation, ever.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consent::client::{
    Category, Changes, Decided, Decision, Gate, GateError, Identities, Recipient, Release,
};
use consent::decide;
use consent::model::{Consent, Patient as ConsentPatient, PatientId, Scope, Sex, Source, Status};
use consent::store::{AuditCheck, AuditKey, NewConsent, Store};
use dicom_bridge::forward::Outgoing;
use dicom_bridge::inflight;
use dicom_bridge::spool::{Meta, Spool};
use proptest::prelude::*;
use ssmix2::build::{Patient, Record, Storage};
use ssmix2_sync::replica::{RelPath, Replica, ReplicaError};
use ssmix2_sync::sync::{Settings, Syncer};
use tsunagi_config::{FacilityCode, WithdrawalPolicy};

const FACILITY: &str = "1312345678";
const PATIENTS: [&str; 3] = ["0000000001", "0000000002", "0000000003"];
/// Data types of every category, and one no category covers.
const DATA_TYPES: [&str; 7] = [
    "ADT-00", "ADT-61", "PPR-01", "OMP-01", "OML-11", "OMG-01", "OMD",
];
const HOUR: i64 = 3600;
const BOUND: Duration = Duration::from_secs(24 * 3600);
/// 2026-11-20T00:00:00+09:00.
const T0: i64 = 1_795_532_400;

/// How the network says yes or no.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Permit,
    Inactive,
    Rejected,
    EnteredInError,
    Draft,
    TopLevelDeny,
    NestedDenyCategory(usize),
    NestedDenyPeriod,
    Unreadable,
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        patient: usize,
        categories: u16,
    },
    Withdraw {
        patient: usize,
    },
    Network {
        patient: usize,
        slot: u8,
        shape: Shape,
        categories: u16,
    },
    PullOk,
    Advance {
        hours: i64,
    },
    File {
        patient: usize,
        data_type: usize,
    },
    Cycle {
        hub_up: bool,
    },
    /// A DICOM instance of the patient, of one of [`SOP_CLASSES`], into the spool.
    Instance {
        patient: usize,
        class: usize,
    },
    /// The forwarder's round: decisions for up to a batch of ready instances.
    Round,
    /// The next instance of the batch leaves (after the in-flight watcher's poll).
    SendOne,
}

/// An image, a report, a PDF, a vendor's private class.
const SOP_CLASSES: [&str; 4] = [
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.104.1",
    "1.2.392.200036.9116.7.8.1.1.1",
];

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        3 => Just(Shape::Permit),
        1 => Just(Shape::Inactive),
        1 => Just(Shape::Rejected),
        1 => Just(Shape::EnteredInError),
        1 => Just(Shape::Draft),
        1 => Just(Shape::TopLevelDeny),
        1 => (0usize..9).prop_map(Shape::NestedDenyCategory),
        1 => Just(Shape::NestedDenyPeriod),
        1 => Just(Shape::Unreadable),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0usize..3, 1u16..512).prop_map(|(patient, categories)| Op::Register { patient, categories }),
        1 => (0usize..3).prop_map(|patient| Op::Withdraw { patient }),
        2 => (0usize..3, 0u8..2, shape(), 1u16..512).prop_map(|(patient, slot, shape, categories)| Op::Network { patient, slot, shape, categories }),
        2 => Just(Op::PullOk),
        1 => prop_oneof![Just(1i64), Just(12), Just(25)].prop_map(|hours| Op::Advance { hours }),
        3 => (0usize..3, 0usize..DATA_TYPES.len()).prop_map(|(patient, data_type)| Op::File { patient, data_type }),
        3 => any::<bool>().prop_map(|hub_up| Op::Cycle { hub_up }),
        3 => (0usize..3, 0usize..SOP_CLASSES.len()).prop_map(|(patient, class)| Op::Instance { patient, class }),
        2 => Just(Op::Round),
        4 => Just(Op::SendOne),
    ]
}

fn categories(bits: u16) -> std::collections::BTreeSet<Category> {
    Category::ALL
        .into_iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, c)| c)
        .collect()
}

fn pid(i: usize) -> PatientId {
    PATIENTS[i].parse().unwrap()
}

/// The consent service, as the sync asks it: the real store, at the test's clock.
struct StoreGate {
    store: Arc<Mutex<Store>>,
    clock: Arc<AtomicI64>,
}

impl Gate for StoreGate {
    fn decide(&mut self, patient: &str, category: Category) -> Result<Decided, GateError> {
        let now = self.clock.load(Ordering::SeqCst);
        let patient: PatientId = patient
            .parse()
            .map_err(|e: consent::model::ModelError| GateError::Refused(e.0))?;
        self.store
            .lock()
            .unwrap()
            .decide_audited(&patient, &Recipient::Hub, category, now, now, BOUND)
            .map(|(decision, audit)| Decided { decision, audit })
            .map_err(|e| GateError::Refused(e.to_string()))
    }

    fn released(&mut self, release: &Release) -> Result<(), GateError> {
        let now = self.clock.load(Ordering::SeqCst);
        let patient: PatientId = release
            .patient
            .parse()
            .map_err(|e: consent::model::ModelError| GateError::Refused(e.0))?;
        let objects = release
            .objects
            .iter()
            .map(|o| o.audit_text().map_err(|e| GateError::Refused(e.0)))
            .collect::<Result<Vec<_>, _>>()?;
        self.store
            .lock()
            .unwrap()
            .record_release(
                &consent::store::Release {
                    patient: &patient,
                    recipient: &Recipient::Hub,
                    category: release.category,
                    kind: release.kind,
                    objects: &objects,
                    decision: release.decision,
                },
                now,
            )
            .map(|_| ())
            .map_err(|e| GateError::Refused(e.to_string()))
    }

    fn changes(&mut self, since: i64) -> Result<Changes, GateError> {
        let now = self.clock.load(Ordering::SeqCst);
        let store = self.store.lock().unwrap();
        let (mut seq, mut patients) = (since, Vec::new());
        loop {
            let (next, page, more) = store
                .changes_since(seq, 1000)
                .map_err(|e| GateError::Refused(e.to_string()))?;
            seq = next;
            patients.extend(page.iter().map(ToString::to_string));
            if !more {
                break;
            }
        }
        let freshness = store
            .freshness(BOUND)
            .map_err(|e| GateError::Refused(e.to_string()))?;
        let bound = i64::try_from(BOUND.as_secs()).unwrap();
        let fresh = freshness
            .last_pull
            .is_some_and(|t| now >= t - 300 && now - t <= bound);
        Ok(Changes {
            seq,
            patients,
            fresh,
        })
    }
}

impl Identities for StoreGate {
    fn network_id(&mut self, patient: &str) -> Result<Option<String>, GateError> {
        let patient: PatientId = patient
            .parse()
            .map_err(|e: consent::model::ModelError| GateError::Refused(e.0))?;
        self.store
            .lock()
            .unwrap()
            .network_id(&patient)
            .map_err(|e| GateError::Refused(e.to_string()))
    }

    fn local_id(&mut self, network_id: &str) -> Result<Option<String>, GateError> {
        self.store
            .lock()
            .unwrap()
            .patient_by_network_id(network_id)
            .map(|p| p.map(|p| p.to_string()))
            .map_err(|e| GateError::Refused(e.to_string()))
    }
}

/// The hub: files by path; the witness of every release.
struct Hub {
    store: Arc<Mutex<Store>>,
    clock: Arc<AtomicI64>,
    files: BTreeMap<String, usize>,
    up: bool,
    violations: Arc<Mutex<Vec<String>>>,
    releases: u64,
}

impl Hub {
    fn reachable(&self) -> Result<(), ReplicaError> {
        if self.up {
            Ok(())
        } else {
            Err(ReplicaError::Io {
                path: "hub".into(),
                source: std::io::Error::other("unreachable"),
            })
        }
    }

    /// What the decision is at this moment for the file at `path`.
    fn witness(&mut self, path: &str) {
        self.releases += 1;
        // l1/l2/PATIENT/DATE/TYPE/FILE
        let parts: Vec<&str> = path.split('/').collect();
        let (Some(patient), Some(data_type)) = (parts.get(2), parts.get(4)) else {
            self.violations
                .lock()
                .unwrap()
                .push(format!("{path}: not a storage path"));
            return;
        };
        let Some(category) = Category::for_ssmix2(data_type) else {
            self.violations
                .lock()
                .unwrap()
                .push(format!("{path}: a data type with no category left"));
            return;
        };
        self.check(path, patient, category);
    }

    /// A DICOM instance of `patient` and SOP class `class` reaches the network PACS.
    fn witness_instance(&mut self, patient: &str, class: &str) {
        self.releases += 1;
        let what = format!("an instance of class {class} of {patient}");
        match Category::for_dicom_sop_class(class) {
            Some(category) => self.check(&what, patient, category),
            None => self
                .violations
                .lock()
                .unwrap()
                .push(format!("{what}: a class with no category left")),
        }
    }

    /// The decision at this moment, from the store, with the pure decision function.
    fn check(&self, what: &str, patient: &str, category: Category) {
        let now = self.clock.load(Ordering::SeqCst);
        let store = self.store.lock().unwrap();
        let patient: PatientId = patient.parse().unwrap();
        let decision = if store.is_unreadable(&patient).unwrap() {
            Decision::Deny(consent::client::DenyReason::UnreadableNetworkConsent)
        } else {
            decide::decide(
                &store.records(&patient).unwrap(),
                &Recipient::Hub,
                category,
                now,
                now,
                store.freshness(BOUND).unwrap(),
            )
        };
        if decision != Decision::Permit {
            self.violations
                .lock()
                .unwrap()
                .push(format!("{what} left while the decision was {decision:?}"));
        }
    }
}

impl Replica for Hub {
    fn put(&mut self, path: &RelPath, bytes: &[u8]) -> Result<(), ReplicaError> {
        self.reachable()?;
        self.witness(path.as_str());
        self.files.insert(path.as_str().to_owned(), bytes.len());
        Ok(())
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<bool, ReplicaError> {
        self.reachable()?;
        let Some(n) = self.files.remove(from.as_str()) else {
            return Ok(false);
        };
        self.witness(to.as_str());
        self.files.insert(to.as_str().to_owned(), n);
        Ok(true)
    }

    fn delete(&mut self, path: &RelPath) -> Result<(), ReplicaError> {
        self.reachable()?;
        self.files.remove(path.as_str());
        Ok(())
    }

    fn stat(&mut self, path: &RelPath) -> Result<Option<u64>, ReplicaError> {
        self.reachable()?;
        Ok(self.files.get(path.as_str()).map(|n| *n as u64))
    }
}

/// The network's Consent resource in one of its shapes.
fn network_resource(
    shape: Shape,
    patient: &PatientId,
    slot: u8,
    categories: u16,
) -> serde_json::Value {
    let fac = FacilityCode::try_from(FACILITY).unwrap();
    let consent = Consent {
        id: format!("net-{patient}-{slot}"),
        version: 1,
        patient: patient.clone(),
        status: Status::Active,
        scope: Scope::AllParticipants,
        excluded: Default::default(),
        categories: categories_or_one(categories),
        valid_from: T0 - 30 * 24 * HOUR,
        valid_until: None,
        evidence: None,
        source: Source::Network,
        recorded_at: T0,
    };
    let mut r = consent::fhir::consent_resource(&fac, &consent, "Patient/p");
    let category_code = |i: usize| serde_json::json!([{ "coding": [{ "system": consent::fhir::CATEGORY_SYSTEM, "code": Category::ALL[i].as_str() }] }]);
    match shape {
        Shape::Permit => {}
        Shape::Inactive => {
            r["status"] = "inactive".into();
            r.as_object_mut().unwrap().remove("provision");
        }
        Shape::Rejected => r["status"] = "rejected".into(),
        Shape::EnteredInError => r["status"] = "entered-in-error".into(),
        Shape::Draft => r["status"] = "draft".into(),
        Shape::TopLevelDeny => r["provision"]["type"] = "deny".into(),
        Shape::NestedDenyCategory(i) => {
            r["provision"]["provision"] =
                serde_json::json!([{ "type": "deny", "code": category_code(i) }]);
        }
        Shape::NestedDenyPeriod => {
            r["provision"]["provision"] = serde_json::json!([{
                "type": "deny",
                "period": { "start": "2026-11-01T00:00:00+09:00", "end": "2027-12-31T00:00:00+09:00" }
            }]);
        }
        Shape::Unreadable => {
            r["modifierExtension"] =
                serde_json::json!([{ "url": "urn:example:not-understood", "valueBoolean": true }]);
        }
    }
    r
}

fn categories_or_one(bits: u16) -> std::collections::BTreeSet<Category> {
    let c = categories(bits);
    if c.is_empty() {
        [Category::Demographics].into()
    } else {
        c
    }
}

/// Runs one interleaving; the violations the hub witnessed (and the audit trail shows), the
/// releases it saw, and the release rows in the audit trail.
fn run(ops: &[Op]) -> (Vec<String>, u64, u64) {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let key = AuditKey::load_or_create(&base.path().join("audit.key")).unwrap();
    let fac = FacilityCode::try_from(FACILITY).unwrap();
    let mut store = Store::open(&base.path().join("consent.db"), fac, key).unwrap();
    for id in PATIENTS {
        store
            .upsert_patient(
                &ConsentPatient {
                    id: id.parse().unwrap(),
                    family_kanji: "東京".into(),
                    given_kanji: "花子".into(),
                    family_kana: "トウキョウ".into(),
                    given_kana: "ハナコ".into(),
                    birth_date: "1950-04-01".into(),
                    sex: Sex::Female,
                    network_id: None,
                },
                T0,
            )
            .unwrap();
    }
    let store = Arc::new(Mutex::new(store));
    let clock = Arc::new(AtomicI64::new(T0));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let mut storage = Storage::create(&base.path().join("storage")).unwrap();
    let state = base.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut syncer = Syncer::open(
        &state,
        Settings {
            storage: storage.root().to_owned(),
            settle: Duration::ZERO,
            confirm_deletion: Duration::ZERO,
            recheck: Duration::from_secs(3600),
            withdrawal: WithdrawalPolicy::Delete,
            facility: FACILITY.into(),
            transaction_storage: None,
            share: false,
        },
    )
    .unwrap();
    let mut gate = StoreGate {
        store: store.clone(),
        clock: clock.clone(),
    };
    let mut hub = Hub {
        store: store.clone(),
        clock: clock.clone(),
        files: BTreeMap::new(),
        up: true,
        violations: violations.clone(),
        releases: 0,
    };
    // Every instance in a file of its own: a run opens a spool per case, and a spool
    // segment costs 16 MiB to make (the layout does not touch what this model checks).
    let spool = Spool::open_with(&base.path().join("spool"), 1 << 30, 0).unwrap();
    // The forwarder's feed position, and the batch being sent: its instances, how many have
    // been sent, and the in-flight watch over it.
    let mut dicom_seq = 0i64;
    let mut batch: Option<(i64, Vec<Outgoing>, usize, inflight::Watch, inflight::Stop)> = None;
    let mut order = 0u64;
    let mut version = 0u64;
    for op in ops {
        let now = clock.load(Ordering::SeqCst);
        match op {
            Op::Register {
                patient,
                categories: bits,
            } => {
                let _ = store.lock().unwrap().record_consent(
                    NewConsent {
                        patient: pid(*patient),
                        scope: Scope::AllParticipants,
                        excluded: Default::default(),
                        categories: categories(*bits),
                        valid_from: now - HOUR,
                        valid_until: None,
                        evidence: None,
                    },
                    now,
                );
            }
            Op::Withdraw { patient } => {
                let _ = store.lock().unwrap().withdraw(&pid(*patient), "desk", now);
            }
            Op::Network {
                patient,
                slot,
                shape,
                categories: bits,
            } => {
                version += 1;
                let p = pid(*patient);
                let resource = network_resource(*shape, &p, *slot, *bits);
                let reference = format!("Consent/net-{p}-{slot}");
                consent::sync::apply_network_resource(
                    &mut store.lock().unwrap(),
                    &resource,
                    &reference,
                    &version.to_string(),
                    "2026-11-20T00:00:00+09:00",
                    p,
                    now,
                )
                .unwrap();
            }
            Op::PullOk => store.lock().unwrap().set_last_pull(now).unwrap(),
            Op::Advance { hours } => {
                clock.fetch_add(hours * HOUR, Ordering::SeqCst);
            }
            Op::File { patient, data_type } => {
                order += 1;
                storage
                    .put(
                        &Patient::sample(PATIENTS[*patient]),
                        &Record::new(
                            DATA_TYPES[*data_type],
                            "20261120",
                            &format!("{order:015}"),
                            &format!("20261120{:09}", 90_000_000 + order),
                        ),
                    )
                    .unwrap();
            }
            Op::Cycle { hub_up } => {
                hub.up = *hub_up;
                // A failed cycle (the hub unreachable) leaves its plan in the outbox.
                let _ = syncer.cycle(&mut gate, &mut hub);
            }
            Op::Instance { patient, class } => {
                order += 1;
                let mut incoming = spool.begin().unwrap();
                incoming.write(b"a data set").unwrap();
                let meta = Meta {
                    sop_class: SOP_CLASSES[*class].to_owned(),
                    sop_instance: format!("1.2.826.0.1.3680043.9.7777.{order}"),
                    transfer_syntax: "1.2.840.10008.1.2.1".to_owned(),
                    calling_ae: "CT".to_owned(),
                    patient_id: Some(PATIENTS[*patient].to_owned()),
                    study_uid: None,
                };
                incoming.commit(&meta, now).unwrap();
            }
            Op::Round => {
                // A new round: what is left of the last batch stays queued (as after an
                // abort), to be decided again.
                if let Ok(round) = dicom_bridge::service::gate_round(
                    &mut gate,
                    &spool,
                    dicom_seq,
                    i64::MAX,
                    None,
                    64,
                    now,
                ) {
                    dicom_seq = round.seq;
                    let (watch, stop) = inflight::channel(inflight::MAX_AGE);
                    batch = Some((round.seq, round.permitted, 0, watch, stop));
                }
            }
            Op::SendOne => {
                let Some((since, permitted, next, watch, stop)) = batch.as_mut() else {
                    continue;
                };
                let Some(o) = permitted.get(*next) else {
                    continue;
                };
                *next += 1;
                // One poll of the real watcher (its `done` already said), then the sender's
                // rule before the instance.
                let (done, done_rx) = std::sync::mpsc::channel();
                done.send(()).unwrap();
                *since =
                    inflight::watch_feed_every(&mut gate, *since, watch, &done_rx, Duration::ZERO);
                let patient = o.queued.meta.patient_id.clone().unwrap_or_default();
                if stop.stopped(&patient) {
                    continue;
                }
                hub.witness_instance(&patient, &o.queued.meta.sop_class);
                spool.delivered(o.queued.id).unwrap();
            }
        }
    }
    // A last round records the delivered instances' releases in the trail.
    let _ = dicom_bridge::service::gate_round(
        &mut gate,
        &spool,
        dicom_seq,
        i64::MAX,
        None,
        64,
        clock.load(Ordering::SeqCst),
    );
    // A last cycle with the hub up carries out whatever is still planned.
    hub.up = true;
    let _ = syncer.cycle(&mut gate, &mut hub);
    let mut v = violations.lock().unwrap().clone();
    // Every release is in the audit trail, which verifies, and refers to a permit for its
    // patient, recipient and category (issue 13 item 10).
    let s = store.lock().unwrap();
    if !matches!(s.verify_audit().unwrap(), AuditCheck::Intact { .. }) {
        v.push("the audit trail does not verify".into());
    }
    let count = |sql: &str| -> u64 {
        let n: i64 = s.connection().query_row(sql, [], |r| r.get(0)).unwrap();
        u64::try_from(n).unwrap()
    };
    if count("SELECT count(*) FROM audit WHERE object <> '' AND reason <> ''") > 0 {
        v.push("a release in the audit trail refers to no decision for it".into());
    }
    let recorded = count("SELECT count(*) FROM audit WHERE decision = 'sent'");
    (v, hub.releases, recorded)
}

fn cases() -> u32 {
    std::env::var("TSUNAGI_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn nothing_reaches_the_hub_whose_decision_at_that_moment_is_deny(
        ops in prop::collection::vec(op(), 1..24),
    ) {
        let (violations, _, _) = run(&ops);
        prop_assert!(violations.is_empty(), "{violations:?}");
    }
}

/// The property is not vacuous: interleavings do release files (a permitted patient's
/// files reach the hub), so the witness is exercised.
#[test]
fn the_model_releases_what_consent_permits() {
    let ops = [
        Op::Register {
            patient: 0,
            categories: 0x1ff,
        },
        Op::PullOk,
        Op::File {
            patient: 0,
            data_type: 3,
        },
        Op::File {
            patient: 1,
            data_type: 3,
        },
        Op::Cycle { hub_up: true },
        Op::Instance {
            patient: 0,
            class: 0,
        },
        Op::Instance {
            patient: 1,
            class: 0,
        },
        Op::Instance {
            patient: 0,
            class: 3,
        },
        Op::Round,
        Op::SendOne,
        Op::SendOne,
        Op::SendOne,
    ];
    let (violations, releases, recorded) = run(&ops);
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(
        releases, 2,
        "the consented patient's file and image, and nothing else"
    );
    assert_eq!(recorded, 2, "their release rows in the audit trail");
}
