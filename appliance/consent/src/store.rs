//! The consent service's database (`STATE-DIR/consent/consent.db`, `synchronous=FULL`).
//!
//! Consent versions are never updated in place: a change or a withdrawal is a new version.
//! Every local change also queues an outbox entry for the push to the network, in the same
//! transaction, so nothing recorded is lost across restarts or power cuts.
//!
//! The audit trail is append-only and chained with a keyed MAC (HMAC-SHA-256): each row's MAC
//! covers the previous row's MAC, and a separate head row records the last sequence number
//! and its MAC. [`Store::verify_audit`] finds any row changed, removed from the middle or cut
//! from the end; without the key nobody can forge a consistent chain. Patients appear in the
//! trail only as a keyed hash of the facility and patient ID.
//!
//! Rows are decisions and releases ([`Store::record_release`]: what left, never patient
//! data, and the decision row that allowed it). A trail deleted whole has nothing left to
//! verify against locally: the sync anchors the head at the network each round, keeps the
//! checkpoint it acknowledged in `audit_anchor`, and records there a local trail that does
//! not continue it (a reset), which [`Store::verify_audit`] then reports.
//!
//! A network consent the sync could not understand is recorded in `unreadable` and denies
//! its patient (`unreadable-network-consent`) until a readable version of the same resource
//! replaces it. The change feed ([`Store::changes_since`]) is the `changes` table: every new
//! consent version (a trigger) and every unreadable consent recorded or lifted. The pull's
//! cursors ([`PullCursor`]) are in `pull_cursor`. The network's facility directory, for
//! picking recipients by name, is in `facility` ([`Store::directory`]).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::Sha256;
use tsunagi_config::FacilityCode;
use tsunagi_state::{Durability, Migration, StateError};

use crate::decide::{self, Decision, DenyReason, Freshness, Known};
use crate::model::{
    Category, Consent, Evidence, Link, Patient, PatientId, Recipient, Scope, Sex, Source, Status,
};
use crate::time::{self, Timestamp};

type HmacSha256 = Hmac<Sha256>;

/// The schema.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
        CREATE TABLE patient (
            id TEXT PRIMARY KEY,
            family_kanji TEXT NOT NULL, given_kanji TEXT NOT NULL,
            family_kana TEXT NOT NULL, given_kana TEXT NOT NULL,
            birth_date TEXT NOT NULL, sex TEXT NOT NULL,
            network_id TEXT,
            updated_at INTEGER NOT NULL
        );
        CREATE TABLE patient_link (
            patient_id TEXT NOT NULL REFERENCES patient(id),
            system TEXT NOT NULL, value TEXT NOT NULL,
            recorded_at INTEGER NOT NULL,
            PRIMARY KEY (patient_id, system, value)
        );
        CREATE TABLE consent (
            id TEXT NOT NULL, version INTEGER NOT NULL,
            patient_id TEXT NOT NULL REFERENCES patient(id),
            created_seq INTEGER NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (id, version)
        );
        CREATE INDEX consent_patient ON consent (patient_id);
        CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL, ref TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
            done_at INTEGER
        );
        CREATE TABLE sync_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            last_pull_at INTEGER, cursor TEXT
        );
        INSERT INTO sync_state (id) VALUES (1);
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            at TEXT NOT NULL, patient_hash TEXT NOT NULL, recipient TEXT NOT NULL,
            category TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,
            mac TEXT NOT NULL
        );
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL, row_mac TEXT NOT NULL, mac TEXT NOT NULL
        );
    ",
    },
    Migration {
        version: 2,
        // The change feed gets its own table, so that more than a new consent version can be a
        // change (a network consent found unreadable, or read again). It is seeded from the
        // consent rowids, which were the feed's sequence numbers: a client's saved number keeps
        // its meaning. Unreadable network consents deny their patient until a readable version
        // of the same resource replaces them. The pull keeps one cursor per resource type: the
        // newest `lastUpdated` applied and the versions applied at exactly that instant.
        sql: "
        CREATE TABLE changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            patient_id TEXT NOT NULL
        );
        INSERT INTO changes (seq, patient_id) SELECT rowid, patient_id FROM consent ORDER BY rowid;
        CREATE TRIGGER consent_is_a_change AFTER INSERT ON consent
        BEGIN
            INSERT INTO changes (patient_id) VALUES (NEW.patient_id);
        END;
        CREATE TABLE unreadable (
            resource TEXT PRIMARY KEY,
            patient_id TEXT NOT NULL,
            version_id TEXT, last_updated TEXT,
            why TEXT NOT NULL,
            recorded_at INTEGER NOT NULL
        );
        CREATE INDEX unreadable_patient ON unreadable (patient_id);
        CREATE TABLE pull_cursor (
            kind TEXT PRIMARY KEY,
            last_updated TEXT NOT NULL,
            seen TEXT NOT NULL
        );
        INSERT INTO pull_cursor (kind, last_updated, seen)
            SELECT 'Patient', cursor, '[]' FROM sync_state WHERE cursor IS NOT NULL;
        INSERT INTO pull_cursor (kind, last_updated, seen)
            SELECT 'Consent', cursor, '[]' FROM sync_state WHERE cursor IS NOT NULL;
    ",
    },
    Migration {
        version: 3,
        // Release rows: what left (`object`, never patient data) and the decision row that
        // allowed it (`decision_seq`); their MAC covers both. Decision rows keep both empty
        // and their MAC as before. `audit_anchor`: the checkpoint the network acknowledged
        // last (the trail's copy outside the box), and a reset found against it.
        sql: "
        ALTER TABLE audit ADD COLUMN object TEXT NOT NULL DEFAULT '';
        ALTER TABLE audit ADD COLUMN decision_seq INTEGER;
        CREATE TABLE audit_anchor (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL, row_mac TEXT NOT NULL,
            acknowledged_at INTEGER NOT NULL,
            reset TEXT
        );
    ",
    },
    Migration {
        version: 4,
        // The ATNA audit trail (issue 17): every consent and identity change, written by
        // triggers in the transaction that makes it (whoever makes it: the service's sync,
        // `tsunagi consent`, the console), until the service hands it to the `audit`
        // service. `what` names the change, never patient data.
        sql: "
        CREATE TABLE atna_pending (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            action TEXT NOT NULL CHECK (action IN ('C', 'U', 'D')),
            patient_id TEXT NOT NULL,
            what TEXT NOT NULL
        );
        CREATE TRIGGER atna_patient_registered AFTER INSERT ON patient
        BEGIN
            INSERT INTO atna_pending (action, patient_id, what)
            VALUES ('C', NEW.id, 'patient registered');
        END;
        CREATE TRIGGER atna_demographics AFTER UPDATE ON patient
        WHEN OLD.family_kanji IS NOT NEW.family_kanji OR OLD.given_kanji IS NOT NEW.given_kanji
          OR OLD.family_kana IS NOT NEW.family_kana OR OLD.given_kana IS NOT NEW.given_kana
          OR OLD.birth_date IS NOT NEW.birth_date OR OLD.sex IS NOT NEW.sex
        BEGIN
            INSERT INTO atna_pending (action, patient_id, what)
            VALUES ('U', NEW.id, 'demographics updated');
        END;
        CREATE TRIGGER atna_network_id AFTER UPDATE ON patient
        WHEN OLD.network_id IS NOT NEW.network_id
        BEGIN
            INSERT INTO atna_pending (action, patient_id, what)
            VALUES ('U', NEW.id, CASE WHEN NEW.network_id IS NULL THEN 'network ID removed'
                                      ELSE 'network ID assigned' END);
        END;
        CREATE TRIGGER atna_link AFTER INSERT ON patient_link
        BEGIN
            INSERT INTO atna_pending (action, patient_id, what)
            VALUES ('U', NEW.patient_id, 'identity linked: ' || NEW.system);
        END;
        CREATE TRIGGER atna_unlink AFTER DELETE ON patient_link
        BEGIN
            INSERT INTO atna_pending (action, patient_id, what)
            VALUES ('U', OLD.patient_id, 'identity link removed: ' || OLD.system);
        END;
        CREATE TRIGGER atna_consent AFTER INSERT ON consent
        BEGIN
            INSERT INTO atna_pending (action, patient_id, what)
            VALUES (CASE WHEN NEW.version = 1 THEN 'C' ELSE 'U' END, NEW.patient_id,
                    'consent ' || COALESCE(json_extract(NEW.body, '$.status'), 'recorded')
                    || ' (version ' || NEW.version || ')');
        END;
        CREATE TRIGGER atna_unreadable AFTER INSERT ON unreadable
        BEGIN
            INSERT INTO atna_pending (action, patient_id, what)
            VALUES ('U', NEW.patient_id, 'a network consent is unreadable: denied');
        END;
        CREATE TRIGGER atna_readable AFTER DELETE ON unreadable
        BEGIN
            INSERT INTO atna_pending (action, patient_id, what)
            VALUES ('U', OLD.patient_id, 'an unreadable network consent was replaced');
        END;
    ",
    },
    Migration {
        version: 5,
        // The ATNA audit trail's other events (`audit::pending::TABLE`): a failed
        // verification of the local trail (by `tsunagi audit verify`, or a reset found
        // against the network's checkpoint, written here by triggers), as Security Alerts.
        sql: "
        CREATE TABLE atna_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            event TEXT NOT NULL
        ) STRICT;
        CREATE TRIGGER atna_trail_reset AFTER UPDATE OF reset ON audit_anchor
        WHEN NEW.reset IS NOT NULL AND OLD.reset IS NULL
        BEGIN
            INSERT INTO atna_events (event) VALUES (json_object('failed-audit-verify',
                json_object('reason', 'the consent audit trail does not continue the network''s checkpoint: ' || NEW.reset)));
        END;
        CREATE TRIGGER atna_trail_reset_first AFTER INSERT ON audit_anchor
        WHEN NEW.reset IS NOT NULL
        BEGIN
            INSERT INTO atna_events (event) VALUES (json_object('failed-audit-verify',
                json_object('reason', 'the consent audit trail does not continue the network''s checkpoint: ' || NEW.reset)));
        END;
    ",
    },
    Migration {
        version: 6,
        // Who made a change at the clinic console (issue 19): the staff account and the
        // address it came from, for the ATNA Patient Record event's human participant. Set
        // by [`Store::attribute_changes`] under the same lock as the change; empty for the
        // sync and the command line.
        sql: "
        ALTER TABLE atna_pending ADD COLUMN by_user TEXT;
        ALTER TABLE atna_pending ADD COLUMN by_from TEXT;
    ",
    },
    Migration {
        version: 7,
        // The network's facility directory (its `Organization`s), for the console to offer
        // recipients by name (issue 19). Replaced whole at each refresh: one row per
        // resource, `why` set when it could not be understood (then not offered, and with it
        // any other row of the same code). Never used by a decision.
        sql: "
        CREATE TABLE facility (
            resource TEXT PRIMARY KEY,
            code TEXT,
            name TEXT,
            active INTEGER,
            why TEXT
        ) STRICT;
        CREATE TABLE facility_refresh (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            at INTEGER NOT NULL
        ) STRICT;
    ",
    },
];

/// A consent or identity change not yet handed to the `audit` service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChange {
    pub id: i64,
    /// "C" or "U".
    pub action: String,
    pub patient: String,
    /// The patient's network ID now, if any.
    pub network_id: Option<String>,
    pub what: String,
    /// The console account that made it, and the address it came from.
    pub by: Option<(String, String)>,
}

/// The head of the audit trail: the last row's sequence number and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: i64,
    pub row_mac: String,
}

impl AuditHead {
    /// The first 12 hex digits of the MAC, for status lines.
    pub fn short_mac(&self) -> &str {
        self.row_mac.get(..12).unwrap_or(&self.row_mac)
    }
}

/// The checkpoint the network acknowledged last, and a reset found against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAnchor {
    pub seq: i64,
    pub row_mac: String,
    pub acknowledged_at: Timestamp,
    /// Why the local trail does not continue the network's checkpoint, once found.
    pub reset: Option<String>,
}

/// One release row to append (see [`Store::record_release`]).
#[derive(Debug, Clone)]
pub struct Release<'a> {
    pub patient: &'a PatientId,
    pub recipient: &'a Recipient,
    pub category: Category,
    pub kind: consent_protocol::ReleaseKind,
    /// What left, as [`consent_protocol::Object::audit_text`] names it.
    pub objects: &'a [String],
    pub decision: Option<i64>,
}

/// Where the pull of one resource type stands: the newest `meta.lastUpdated` applied (as the
/// server wrote it) and the resources (`id/versionId`) applied at exactly that instant. The
/// next pull asks `_lastUpdated=ge` it and skips those, so a resource sharing the instant is
/// never skipped and none is applied twice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullCursor {
    pub last_updated: Option<String>,
    pub seen: std::collections::BTreeSet<String>,
}

/// A network consent the box could not understand, about one of this clinic's patients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The server's resource (`Consent/ID`).
    pub resource: String,
    pub patient: PatientId,
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
    /// What was not understood (never patient data).
    pub why: String,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("database operation `{op}` failed")]
    Sql {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot read or create the audit key {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit key {path} is readable or writable by group or others: chmod 600 it")]
    KeyPermissions { path: PathBuf },
    #[error(
        "the audit key {path} is missing: without it the trail cannot be verified (a new key would not verify the old rows)"
    )]
    KeyMissing { path: PathBuf },
    #[error("the audit key {path} must hold at least 32 bytes")]
    KeyTooShort { path: PathBuf },
    #[error("unknown patient {patient} (register them first)")]
    UnknownPatient { patient: String },
    /// Carries patient IDs: for the desk's command line, never for a log line.
    #[error(
        "network ID {network_id} already belongs to patient {holder}; one network ID is one patient"
    )]
    NetworkIdTaken { network_id: String, holder: String },
    #[error("patient {patient} has no consent")]
    NoConsent { patient: String },
    #[error("consent {id} is withdrawn; record a new consent instead")]
    AlreadyWithdrawn { id: String },
    #[error("a stored consent could not be read")]
    Corrupt(#[source] serde_json::Error),
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql { op, source }
}

/// The secret that keys the audit MACs and the patient hashes.
pub struct AuditKey(Vec<u8>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

impl AuditKey {
    /// Loads the key file; a missing key is an error (what verifies never makes a key).
    pub fn load(path: &Path) -> Result<AuditKey, StoreError> {
        if std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        {
            return Err(StoreError::KeyMissing {
                path: path.to_owned(),
            });
        }
        Self::load_or_create(path)
    }

    /// Loads the key file, or creates one of 32 random bytes (mode 0600) if it is missing.
    pub fn load_or_create(path: &Path) -> Result<AuditKey, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let err = |source| StoreError::Key {
            path: path.to_owned(),
            source,
        };
        match std::fs::metadata(path) {
            Ok(meta) => {
                if meta.mode() & 0o077 != 0 {
                    return Err(StoreError::KeyPermissions {
                        path: path.to_owned(),
                    });
                }
                let bytes = std::fs::read(path).map_err(err)?;
                if bytes.len() < 32 {
                    return Err(StoreError::KeyTooShort {
                        path: path.to_owned(),
                    });
                }
                Ok(AuditKey(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = random_bytes(32).map_err(err)?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(err)?;
                std::io::Write::write_all(&mut file, &bytes).map_err(err)?;
                file.sync_all().map_err(err)?;
                Ok(AuditKey(bytes))
            }
            Err(e) => Err(err(e)),
        }
    }

    fn mac(&self, parts: &[&str]) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        for part in parts {
            mac.update(part.as_bytes());
            mac.update(b"\x1f");
        }
        hex(&mac.finalize().into_bytes())
    }
}

fn random_bytes(n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, hex (the evidence of a scanned consent form).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// A push waiting to reach the network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pending {
    pub seq: i64,
    pub kind: String,
    pub reference: String,
    pub created_at: String,
    pub attempts: i64,
    pub last_error: Option<String>,
}

/// The result of verifying the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum AuditCheck {
    /// Every row is present and unchanged.
    Intact { rows: i64 },
    /// The first problem found.
    Broken { row: i64, problem: String },
}

/// One row of the audit trail as an administrator reads it (監査): the patient only as the
/// trail's keyed pseudonym; what left (a release row's object) is not shown.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: i64,
    /// As recorded: `YYYY-MM-DDTHH:MM:SS+09:00`.
    pub at: String,
    pub patient_hash: String,
    pub recipient: String,
    pub category: String,
    /// `permit`, `deny`, `sent`, `deleted`, `requeued`, `discarded-held`.
    pub decision: String,
    pub reason: String,
}

/// What applying a consent from the network did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A consent the box did not know: recorded.
    New,
    /// A change of a known consent: recorded as a new version.
    Changed,
    /// Nothing new.
    Unchanged,
    /// The box already withdrew this consent; a withdrawal wins over any other change.
    IgnoredWithdrawn,
}

/// What a new consent says (the store assigns id, version and times).
#[derive(Debug, Clone)]
pub struct NewConsent {
    pub patient: PatientId,
    pub scope: Scope,
    pub excluded: std::collections::BTreeSet<FacilityCode>,
    pub categories: std::collections::BTreeSet<Category>,
    pub valid_from: Timestamp,
    pub valid_until: Option<Timestamp>,
    pub evidence: Option<Evidence>,
}

/// The consent database.
pub struct Store {
    conn: Connection,
    facility: FacilityCode,
    key: AuditKey,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("facility", &self.facility)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The audit key's file in the service's state directory. It is the trail's own secret,
    /// never `privacy.id-hash-key-file`: whoever may hash IDs for logs must not be able to
    /// forge the trail.
    pub const AUDIT_KEY_FILE: &'static str = "audit.key";
    /// The database's file in the service's state directory.
    pub const DATABASE_FILE: &'static str = "consent.db";

    /// Opens the service's database in its state directory `dir` with its audit key;
    /// `create_key`: make the key when there is none (never for `audit verify`).
    pub fn open_in(
        dir: &Path,
        facility: FacilityCode,
        create_key: bool,
    ) -> Result<Store, StoreError> {
        let key_path = dir.join(Self::AUDIT_KEY_FILE);
        let key = if create_key {
            AuditKey::load_or_create(&key_path)
        } else {
            AuditKey::load(&key_path)
        }?;
        Store::open(&dir.join(Self::DATABASE_FILE), facility, key)
    }

    /// Opens (creating or migrating) the database at `path`.
    pub fn open(path: &Path, facility: FacilityCode, key: AuditKey) -> Result<Store, StoreError> {
        let conn = tsunagi_state::open(path, Durability::Acknowledging, MIGRATIONS)?;
        Ok(Store {
            conn,
            facility,
            key,
        })
    }

    /// The raw connection (for tests that tamper with the audit trail).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Registers a patient, or updates their demographics.
    pub fn upsert_patient(&mut self, p: &Patient, now: Timestamp) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        tx.execute(
            "INSERT INTO patient (id, family_kanji, given_kanji, family_kana, given_kana, birth_date, sex, network_id, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (id) DO UPDATE SET family_kanji = ?2, given_kanji = ?3, family_kana = ?4,
                given_kana = ?5, birth_date = ?6, sex = ?7, network_id = COALESCE(?8, network_id), updated_at = ?9",
            params![
                p.id.as_str(), p.family_kanji, p.given_kanji, p.family_kana, p.given_kana,
                p.birth_date, serde_json::to_string(&p.sex).unwrap_or_default(), p.network_id, now
            ],
        )
        .map_err(sql("save patient"))?;
        queue(&tx, "patient", p.id.as_str(), now)?;
        tx.commit().map_err(sql("commit"))
    }

    /// Restores a patient from the network (a box recovering this clinic's patients): like
    /// [`Store::upsert_patient`] for a patient not known here, without queueing a push (the
    /// network has it already). A patient known here is left as it is. True when restored.
    pub fn restore_patient(&mut self, p: &Patient, now: Timestamp) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "INSERT INTO patient (id, family_kanji, given_kanji, family_kana, given_kana, birth_date, sex, network_id, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8) ON CONFLICT (id) DO NOTHING",
                params![
                    p.id.as_str(), p.family_kanji, p.given_kanji, p.family_kana, p.given_kana,
                    p.birth_date, serde_json::to_string(&p.sex).unwrap_or_default(), now
                ],
            )
            .map_err(sql("restore patient"))?;
        Ok(n == 1)
    }

    /// A patient, if registered.
    pub fn patient(&self, id: &PatientId) -> Result<Option<Patient>, StoreError> {
        self.conn
            .query_row(
                "SELECT id, family_kanji, given_kanji, family_kana, given_kana, birth_date, sex, network_id FROM patient WHERE id = ?1",
                [id.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?, r.get::<_, String>(4)?, r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?, r.get::<_, Option<String>>(7)?,
                    ))
                },
            )
            .optional()
            .map_err(sql("read patient"))?
            .map(|(pid, fk, gk, fkn, gkn, birth, sex, net)| {
                Ok(Patient {
                    id: pid.parse().map_err(|_| StoreError::UnknownPatient { patient: pid.clone() })?,
                    family_kanji: fk,
                    given_kanji: gk,
                    family_kana: fkn,
                    given_kana: gkn,
                    birth_date: birth,
                    sex: serde_json::from_str::<Sex>(&sex).map_err(StoreError::Corrupt)?,
                    network_id: net,
                })
            })
            .transpose()
    }

    fn require_patient(&self, id: &PatientId) -> Result<(), StoreError> {
        match self.patient(id)? {
            Some(_) => Ok(()),
            None => Err(StoreError::UnknownPatient {
                patient: id.to_string(),
            }),
        }
    }

    /// Records the patient's network ID (名寄せ: the ID the network's patient index gave
    /// them). Returns whether it changed.
    pub fn set_network_id(
        &mut self,
        id: &PatientId,
        network_id: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.require_patient(id)?;
        // One network ID belongs to one local patient at most: two local patients under one
        // network identity would send one person's data under another's name. The check and
        // the write are one transaction (SQLite serialises writers).
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let holder: Option<String> = tx
            .query_row(
                "SELECT id FROM patient WHERE network_id = ?1 AND id <> ?2 ORDER BY id LIMIT 1",
                params![network_id, id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("find by network ID"))?;
        if let Some(holder) = holder {
            return Err(StoreError::NetworkIdTaken {
                network_id: network_id.to_owned(),
                holder,
            });
        }
        let n = tx
            .execute(
                "UPDATE patient SET network_id = ?2, updated_at = ?3
                 WHERE id = ?1 AND (network_id IS NULL OR network_id <> ?2)",
                params![id.as_str(), network_id, now],
            )
            .map_err(sql("save the network ID"))?;
        tx.commit().map_err(sql("commit"))?;
        Ok(n > 0)
    }

    /// Consent and identity changes not yet in the ATNA audit trail, oldest first.
    pub fn pending_changes(&self, limit: usize) -> Result<Vec<PendingChange>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT a.id, a.action, a.patient_id, p.network_id, a.what, a.by_user, a.by_from
                 FROM atna_pending a LEFT JOIN patient p ON p.id = a.patient_id
                 ORDER BY a.id LIMIT ?1",
            )
            .map_err(sql("read pending changes"))?;
        let rows = stmt
            .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok(PendingChange {
                    id: r.get(0)?,
                    action: r.get(1)?,
                    patient: r.get(2)?,
                    network_id: r.get(3)?,
                    what: r.get(4)?,
                    by: match (
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ) {
                        (Some(user), from) => Some((user, from.unwrap_or_default())),
                        _ => None,
                    },
                })
            })
            .map_err(sql("read pending changes"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("read pending changes"))
    }

    /// The last change owed to the ATNA trail so far (0 when none): what
    /// [`Store::attribute_changes`] counts from.
    pub fn last_change(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM atna_pending", [], |r| {
                r.get(0)
            })
            .map_err(sql("read the last change"))
    }

    /// The changes after `after` (from [`Store::last_change`]) were made by the console
    /// account `user` from `from`. Called with the store held since `after` was read, so
    /// that they are this account's changes and not yet handed to the ATNA trail.
    pub fn attribute_changes(&self, after: i64, user: &str, from: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE atna_pending SET by_user = ?2, by_from = ?3 WHERE id > ?1 AND by_user IS NULL",
                params![after, user, from],
            )
            .map_err(sql("attribute changes"))?;
        Ok(())
    }

    /// Patients whose local ID is `query`, or whose name in katakana (family then given,
    /// spaces ignored) begins with it (hiragana typed is taken as katakana); at most `limit`,
    /// by kana.
    pub fn find_patients(&self, query: &str, limit: usize) -> Result<Vec<Patient>, StoreError> {
        let kana = crate::model::search_kana(query);
        if kana.is_empty() {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id FROM patient
                 WHERE id = ?1 OR instr(replace(replace(family_kana || given_kana, ' ', ''), '　', ''), ?2) = 1
                 ORDER BY id = ?1 DESC, family_kana, given_kana, id LIMIT ?3",
            )
            .map_err(sql("find patients"))?;
        let ids = stmt
            .query_map(
                params![query.trim(), kana, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| r.get::<_, String>(0),
            )
            .map_err(sql("find patients"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("find patients"))?;
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(pid) = id.parse::<PatientId>() else {
                continue;
            };
            if let Some(p) = self.patient(&pid)? {
                found.push(p);
            }
        }
        Ok(found)
    }

    /// The trail failed its verification (`tsunagi audit verify`): a Security Alert owed to
    /// the ATNA audit trail.
    pub fn record_failed_verify(&self, row: i64, problem: &str) -> Result<(), StoreError> {
        audit::pending::record(
            &self.conn,
            &audit::protocol::Event::FailedAuditVerify {
                reason: format!("the consent audit trail is broken at row {row}: {problem}"),
            },
        )
        .map_err(sql("record a failed verification"))
    }

    /// Keeps an event owed to the ATNA audit trail (`atna_events`).
    pub fn record_event(&self, event: &audit::protocol::Event) -> Result<(), StoreError> {
        audit::pending::record(&self.conn, event).map_err(sql("record an audit event"))
    }

    /// The other ATNA events owed (`atna_events`), oldest first.
    pub fn pending_events(
        &self,
        limit: usize,
    ) -> Result<Vec<(i64, audit::protocol::Event)>, StoreError> {
        audit::pending::pending(&self.conn, limit).map_err(sql("read pending events"))
    }

    /// The other ATNA events up to `last` are in the trail.
    pub fn events_recorded(&self, last: i64) -> Result<(), StoreError> {
        audit::pending::forget(&self.conn, last).map_err(sql("forget pending events"))
    }

    /// The changes up to `last` are in the ATNA audit trail.
    pub fn changes_recorded(&mut self, last: i64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM atna_pending WHERE id <= ?1", [last])
            .map_err(sql("forget pending changes"))?;
        Ok(())
    }

    /// The patient's network ID, if known.
    pub fn network_id(&self, id: &PatientId) -> Result<Option<String>, StoreError> {
        Ok(self.patient(id)?.and_then(|p| p.network_id))
    }

    /// The local patient whose network ID this is.
    pub fn patient_by_network_id(&self, network_id: &str) -> Result<Option<PatientId>, StoreError> {
        let id: Option<String> = self
            .conn
            .query_row(
                "SELECT id FROM patient WHERE network_id = ?1 ORDER BY id LIMIT 1",
                [network_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("find by network ID"))?;
        Ok(id.and_then(|v| v.parse().ok()))
    }

    /// Links another facility's identifier to the patient (名寄せ).
    pub fn add_link(
        &mut self,
        id: &PatientId,
        facility: &FacilityCode,
        value: &str,
        now: Timestamp,
    ) -> Result<Link, StoreError> {
        self.require_patient(id)?;
        let system = crate::model::patient_id_system(facility);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        tx.execute(
            "INSERT OR IGNORE INTO patient_link (patient_id, system, value, recorded_at) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), system, value, now],
        )
        .map_err(sql("save link"))?;
        queue(&tx, "patient", id.as_str(), now)?;
        tx.commit().map_err(sql("commit"))?;
        Ok(Link {
            system,
            value: value.to_owned(),
            recorded_at: now,
        })
    }

    /// The patient's links to other facilities' identifiers.
    pub fn links(&self, id: &PatientId) -> Result<Vec<Link>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT system, value, recorded_at FROM patient_link WHERE patient_id = ?1 ORDER BY recorded_at, system, value")
            .map_err(sql("read links"))?;
        let rows = stmt
            .query_map([id.as_str()], |r| {
                Ok(Link {
                    system: r.get(0)?,
                    value: r.get(1)?,
                    recorded_at: r.get(2)?,
                })
            })
            .map_err(sql("read links"))?;
        rows.collect::<Result<_, _>>().map_err(sql("read links"))
    }

    /// Records a new consent (version 1) and queues its push.
    pub fn record_consent(
        &mut self,
        new: NewConsent,
        now: Timestamp,
    ) -> Result<Consent, StoreError> {
        self.require_patient(&new.patient)?;
        let id = format!(
            "c-{}",
            hex(&random_bytes(8).map_err(|source| StoreError::Key {
                path: PathBuf::from("/dev/urandom"),
                source,
            })?)
        );
        let consent = Consent {
            id,
            version: 1,
            patient: new.patient,
            status: Status::Active,
            scope: new.scope,
            excluded: new.excluded,
            categories: new.categories,
            valid_from: new.valid_from,
            valid_until: new.valid_until,
            evidence: new.evidence,
            source: Source::Local,
            recorded_at: now,
        };
        self.insert_version(&consent, None, now)?;
        Ok(consent)
    }

    fn insert_version(
        &mut self,
        c: &Consent,
        created_seq: Option<i64>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let seq: i64 = match created_seq {
            Some(s) => s,
            None => tx
                .query_row(
                    "SELECT COALESCE(MAX(created_seq), 0) + 1 FROM consent",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql("next consent"))?,
        };
        let body = serde_json::to_string(c).map_err(StoreError::Corrupt)?;
        tx.execute(
            "INSERT INTO consent (id, version, patient_id, created_seq, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![c.id, c.version, c.patient.as_str(), seq, body],
        )
        .map_err(sql("save consent"))?;
        if c.source == Source::Local {
            queue(&tx, "consent", &format!("{}/{}", c.id, c.version), now)?;
        }
        tx.commit().map_err(sql("commit"))
    }

    /// All versions of all the patient's consents.
    pub fn records(&self, id: &PatientId) -> Result<Vec<Known>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT body, created_seq FROM consent WHERE patient_id = ?1 ORDER BY created_seq, version")
            .map_err(sql("read consents"))?;
        let rows = stmt
            .query_map([id.as_str()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(sql("read consents"))?;
        let mut out = Vec::new();
        for row in rows {
            let (body, created_seq) = row.map_err(sql("read consents"))?;
            let consent: Consent = serde_json::from_str(&body).map_err(StoreError::Corrupt)?;
            out.push(Known {
                consent,
                created_seq,
            });
        }
        Ok(out)
    }

    /// Changes the patient's effective consent: a new version made by `change`.
    pub fn change_consent(
        &mut self,
        id: &PatientId,
        now: Timestamp,
        change: impl FnOnce(&mut Consent),
    ) -> Result<Consent, StoreError> {
        self.require_patient(id)?;
        let records = self.records(id)?;
        let Some((current, withdrawn)) = decide::effective(&records) else {
            return Err(StoreError::NoConsent {
                patient: id.to_string(),
            });
        };
        if withdrawn {
            return Err(StoreError::AlreadyWithdrawn {
                id: current.id.clone(),
            });
        }
        let created_seq = records
            .iter()
            .find(|k| k.consent.id == current.id)
            .map(|k| k.created_seq);
        let mut next = current.clone();
        change(&mut next);
        next.version = current.version + 1;
        next.source = Source::Local;
        next.recorded_at = now;
        self.insert_version(&next, created_seq, now)?;
        Ok(next)
    }

    /// Withdraws the patient's effective consent (takes effect at once, even offline).
    pub fn withdraw(
        &mut self,
        id: &PatientId,
        by: &str,
        now: Timestamp,
    ) -> Result<Consent, StoreError> {
        let by = by.to_owned();
        self.change_consent(id, now, |c| {
            c.status = Status::Withdrawn;
            c.evidence = Some(Evidence {
                sha256: c
                    .evidence
                    .as_ref()
                    .map(|e| e.sha256.clone())
                    .unwrap_or_default(),
                recorded_by: by,
                recorded_at: now,
            });
        })
    }

    /// One version of a consent (for the push).
    pub fn consent_version(&self, id: &str, version: u32) -> Result<Option<Consent>, StoreError> {
        let body: Option<String> = self
            .conn
            .query_row(
                "SELECT body FROM consent WHERE id = ?1 AND version = ?2",
                params![id, version],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read consent"))?;
        body.map(|b| serde_json::from_str(&b).map_err(StoreError::Corrupt))
            .transpose()
    }

    /// The newest version number of a consent, if known.
    pub fn latest_version(&self, id: &str) -> Result<Option<u32>, StoreError> {
        self.conn
            .query_row(
                "SELECT MAX(version) FROM consent WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .map_err(sql("read consent"))
    }

    /// Applies a consent pulled from the network (idempotent; a withdrawal wins).
    pub fn apply_network_consent(&mut self, mut incoming: Consent) -> Result<Applied, StoreError> {
        self.require_patient(&incoming.patient)?;
        let records = self.records(&incoming.patient)?;
        let versions: Vec<&Known> = records
            .iter()
            .filter(|k| k.consent.id == incoming.id)
            .collect();
        let now = incoming.recorded_at;
        if versions.is_empty() {
            incoming.version = 1;
            incoming.source = Source::Network;
            self.insert_version(&incoming, None, now)?;
            return Ok(Applied::New);
        }
        let withdrawn = versions
            .iter()
            .any(|k| k.consent.status == Status::Withdrawn);
        let Some(latest) = versions.iter().max_by_key(|k| k.consent.version) else {
            return Ok(Applied::Unchanged);
        };
        if withdrawn {
            return Ok(Applied::IgnoredWithdrawn);
        }
        if crate::fhir::same_terms(&latest.consent, &incoming) {
            return Ok(Applied::Unchanged);
        }
        let mut next = incoming;
        next.version = latest.consent.version + 1;
        next.source = Source::Network;
        next.evidence = latest.consent.evidence.clone();
        self.insert_version(&next, Some(latest.created_seq), now)?;
        Ok(Applied::Changed)
    }

    /// Adds a link learned from the network (no push: the network already has it).
    pub fn add_network_link(
        &mut self,
        id: &PatientId,
        system: &str,
        value: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.require_patient(id)?;
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO patient_link (patient_id, system, value, recorded_at) VALUES (?1, ?2, ?3, ?4)",
                params![id.as_str(), system, value, now],
            )
            .map_err(sql("save link"))?;
        Ok(n > 0)
    }

    /// Marks a push as acknowledged by the network.
    pub fn push_done(&mut self, seq: i64, now: Timestamp) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE outbox SET done_at = ?2 WHERE seq = ?1",
                params![seq, now],
            )
            .map_err(sql("update outbox"))?;
        Ok(())
    }

    /// Records a failed push attempt (it stays queued).
    pub fn push_failed(&mut self, seq: i64, error: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE seq = ?1",
                params![seq, error],
            )
            .map_err(sql("update outbox"))?;
        Ok(())
    }

    /// Where the pull of resource type `kind` stands.
    pub fn pull_cursor(&self, kind: &str) -> Result<PullCursor, StoreError> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT last_updated, seen FROM pull_cursor WHERE kind = ?1",
                [kind],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read pull cursor"))?;
        match row {
            None => Ok(PullCursor::default()),
            Some((last_updated, seen)) => Ok(PullCursor {
                last_updated: Some(last_updated),
                seen: serde_json::from_str(&seen).map_err(StoreError::Corrupt)?,
            }),
        }
    }

    /// Saves where the pull of `kind` stands (after the resources up to it were applied).
    /// It does not make the cache fresh: only [`Store::set_last_pull`] after a complete pull
    /// does.
    pub fn save_pull_cursor(&mut self, kind: &str, cursor: &PullCursor) -> Result<(), StoreError> {
        let Some(last_updated) = &cursor.last_updated else {
            return Ok(());
        };
        let seen = serde_json::to_string(&cursor.seen).map_err(StoreError::Corrupt)?;
        self.conn
            .execute(
                "INSERT INTO pull_cursor (kind, last_updated, seen) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind) DO UPDATE SET last_updated = ?2, seen = ?3",
                params![kind, last_updated, seen],
            )
            .map_err(sql("save pull cursor"))?;
        Ok(())
    }

    /// Records a network consent about `u.patient` that the box could not understand: every
    /// decision for the patient denies (`unreadable-network-consent`) until a readable
    /// version of the same resource replaces it. A change in the feed, and a row in the
    /// audit trail. Returns whether it was new (not the same version again).
    pub fn record_unreadable(
        &mut self,
        u: &Unreadable,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let hash = self.patient_hash(&u.patient);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let same: bool = tx
            .query_row(
                "SELECT COUNT(*) > 0 FROM unreadable WHERE resource = ?1 AND patient_id = ?2
                    AND version_id IS ?3 AND last_updated IS ?4",
                params![u.resource, u.patient.as_str(), u.version_id, u.last_updated],
                |r| r.get(0),
            )
            .map_err(sql("read unreadable"))?;
        if same {
            return Ok(false);
        }
        // The same resource about another patient before: that patient is a change too.
        let before: Option<String> = tx
            .query_row(
                "SELECT patient_id FROM unreadable WHERE resource = ?1",
                [&u.resource],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read unreadable"))?;
        tx.execute(
            "INSERT INTO unreadable (resource, patient_id, version_id, last_updated, why, recorded_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (resource) DO UPDATE SET patient_id = ?2, version_id = ?3,
                last_updated = ?4, why = ?5, recorded_at = ?6",
            params![u.resource, u.patient.as_str(), u.version_id, u.last_updated, u.why, now],
        )
        .map_err(sql("save unreadable"))?;
        for patient in before
            .iter()
            .map(String::as_str)
            .chain([u.patient.as_str()])
        {
            tx.execute("INSERT INTO changes (patient_id) VALUES (?1)", [patient])
                .map_err(sql("save change"))?;
        }
        tx.commit().map_err(sql("commit"))?;
        self.append_audit(
            &time::format(now),
            &hash,
            "network",
            "consent",
            "unreadable",
            DenyReason::UnreadableNetworkConsent.as_str(),
        )?;
        Ok(true)
    }

    /// A readable version of `resource` arrived: it no longer denies its patient. Returns
    /// whether it did.
    pub fn clear_unreadable(&mut self, resource: &str) -> Result<bool, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let patient: Option<String> = tx
            .query_row(
                "DELETE FROM unreadable WHERE resource = ?1 RETURNING patient_id",
                [resource],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("clear unreadable"))?;
        if let Some(patient) = &patient {
            tx.execute("INSERT INTO changes (patient_id) VALUES (?1)", [patient])
                .map_err(sql("save change"))?;
        }
        tx.commit().map_err(sql("commit"))?;
        Ok(patient.is_some())
    }

    /// Whether an unreadable network consent denies the patient.
    pub fn is_unreadable(&self, id: &PatientId) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) > 0 FROM unreadable WHERE patient_id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .map_err(sql("read unreadable"))
    }

    /// How many patients an unreadable network consent denies.
    pub fn unreadable_patients(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(DISTINCT patient_id) FROM unreadable",
                [],
                |r| r.get(0),
            )
            .map_err(sql("read unreadable"))
    }

    /// The facility this store belongs to.
    pub fn facility(&self) -> &FacilityCode {
        &self.facility
    }

    /// How fresh the cache is.
    pub fn freshness(&self, bound: Duration) -> Result<Freshness, StoreError> {
        let last_pull = self
            .conn
            .query_row(
                "SELECT last_pull_at FROM sync_state WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .map_err(sql("read sync state"))?;
        Ok(Freshness { last_pull, bound })
    }

    /// Records a successful pull from the network.
    pub fn set_last_pull(&mut self, at: Timestamp) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE sync_state SET last_pull_at = ?1 WHERE id = 1", [at])
            .map_err(sql("save sync state"))?;
        Ok(())
    }

    /// The patients whose consents changed (a new version recorded here or pulled from the
    /// network, a network consent found unreadable or read again) after change `seq`, at most `limit` of them, oldest first, and the sequence
    /// number to ask from next time. Other services use it to re-check only what changed.
    pub fn changes_since(
        &self,
        seq: i64,
        limit: usize,
    ) -> Result<(i64, Vec<PatientId>, bool), StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, patient_id FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(sql("read changes"))?;
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![seq, limit_sql.saturating_add(1)], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(sql("read changes"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("read changes"))?;
        let more = rows.len() > limit;
        let mut next = seq;
        let mut patients = Vec::new();
        for (rowid, patient) in rows.into_iter().take(limit) {
            next = rowid;
            if let Ok(p) = patient.parse::<PatientId>()
                && !patients.contains(&p)
            {
                patients.push(p);
            }
        }
        Ok((next, patients, more))
    }

    /// Pushes not yet acknowledged by the network.
    pub fn pending(&self) -> Result<Vec<Pending>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, kind, ref, created_at, attempts, last_error FROM outbox WHERE done_at IS NULL ORDER BY seq")
            .map_err(sql("read outbox"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Pending {
                    seq: r.get(0)?,
                    kind: r.get(1)?,
                    reference: r.get(2)?,
                    created_at: time::format(r.get(3)?),
                    attempts: r.get(4)?,
                    last_error: r.get(5)?,
                })
            })
            .map_err(sql("read outbox"))?;
        rows.collect::<Result<_, _>>().map_err(sql("read outbox"))
    }

    /// The keyed hash that stands for a patient in the audit trail.
    pub fn patient_hash(&self, id: &PatientId) -> String {
        let full = self
            .key
            .mac(&["patient", self.facility.as_str(), id.as_str()]);
        full[..32].to_owned()
    }

    /// Decides, and records the decision in the audit trail (see [`Store::decide_audited`]).
    pub fn decide(
        &mut self,
        id: &PatientId,
        recipient: &Recipient,
        category: Category,
        at: Timestamp,
        now: Timestamp,
        bound: Duration,
    ) -> Result<Decision, StoreError> {
        self.decide_audited(id, recipient, category, at, now, bound)
            .map(|(d, _)| d)
    }

    /// Decides, and records the decision in the audit trail; returns it with its row's
    /// sequence number. A patient with an unreadable network consent is denied
    /// (`unreadable-network-consent`) whatever else is known.
    pub fn decide_audited(
        &mut self,
        id: &PatientId,
        recipient: &Recipient,
        category: Category,
        at: Timestamp,
        now: Timestamp,
        bound: Duration,
    ) -> Result<(Decision, i64), StoreError> {
        self.audited(
            id,
            &recipient.to_string(),
            category.as_str(),
            now,
            bound,
            |records, f| decide::decide(records, recipient, category, at, now, f),
        )
    }

    /// Decides whether the patient participates (active, valid consent; see
    /// [`decide::participation`]), and records it in the audit trail (recipient `clinic`,
    /// category `participation`).
    pub fn participation(
        &mut self,
        id: &PatientId,
        now: Timestamp,
        bound: Duration,
    ) -> Result<Decision, StoreError> {
        self.participation_audited(id, now, bound).map(|(d, _)| d)
    }

    /// [`Store::participation`], with the decision's audit row.
    pub fn participation_audited(
        &mut self,
        id: &PatientId,
        now: Timestamp,
        bound: Duration,
    ) -> Result<(Decision, i64), StoreError> {
        self.audited(
            id,
            &Recipient::Clinic.to_string(),
            "participation",
            now,
            bound,
            |records, f| decide::participation(records, now, now, f),
        )
    }

    /// One audited decision: an unreadable network consent denies whatever else is known;
    /// otherwise `decide` over the patient's records and the cache's freshness. The answer
    /// is in the audit trail (with its sequence number) before it is returned.
    fn audited(
        &mut self,
        id: &PatientId,
        recipient: &str,
        category: &str,
        now: Timestamp,
        bound: Duration,
        decide: impl FnOnce(&[Known], Freshness) -> Decision,
    ) -> Result<(Decision, i64), StoreError> {
        let decision = if self.is_unreadable(id)? {
            Decision::Deny(DenyReason::UnreadableNetworkConsent)
        } else {
            let records = self.records(id)?;
            let freshness = self.freshness(bound)?;
            decide(&records, freshness)
        };
        let (verdict, reason) = match decision {
            Decision::Permit => ("permit", ""),
            Decision::Deny(r) => ("deny", r.as_str()),
        };
        let hash = self.patient_hash(id);
        let seq = self.append_audit(
            &time::format(now),
            &hash,
            recipient,
            category,
            verdict,
            reason,
        )?;
        Ok((decision, seq))
    }

    fn append_audit(
        &mut self,
        at: &str,
        patient_hash: &str,
        recipient: &str,
        category: &str,
        decision: &str,
        reason: &str,
    ) -> Result<i64, StoreError> {
        let row = AuditRow {
            at,
            patient_hash,
            recipient,
            category,
            decision,
            reason,
            object: "",
            decision_seq: None,
        };
        self.append_rows(&[row])
    }

    /// Appends rows in one transaction; returns the last one's sequence number.
    fn append_rows(&mut self, rows: &[AuditRow<'_>]) -> Result<i64, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        // Continue from the head, not from the last row present: a tail cut off by someone
        // must stay visible as a gap.
        let head: Option<(i64, String)> = tx
            .query_row(
                "SELECT seq, row_mac FROM audit_head WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read audit head"))?;
        let (mut seq, mut prev) = match head {
            Some((seq, mac)) => (seq, mac),
            None => (0, "genesis".to_owned()),
        };
        for row in rows {
            seq += 1;
            let mac = row.mac(&self.key, &prev, seq);
            tx.execute(
                "INSERT INTO audit (seq, at, patient_hash, recipient, category, decision, reason, object, decision_seq, mac)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    seq, row.at, row.patient_hash, row.recipient, row.category, row.decision,
                    row.reason, row.object, row.decision_seq, mac
                ],
            )
            .map_err(sql("append audit"))?;
            prev = mac;
        }
        let head_mac = self.key.mac(&["head", &seq.to_string(), &prev]);
        tx.execute(
            "INSERT INTO audit_head (id, seq, row_mac, mac) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET seq = ?1, row_mac = ?2, mac = ?3",
            params![seq, prev, head_mac],
        )
        .map_err(sql("update audit head"))?;
        tx.commit().map_err(sql("commit"))?;
        Ok(seq)
    }

    /// Records that objects of a patient's data left for (or were removed at) a recipient:
    /// one audit row each (decision column `sent` or `deleted`), in one transaction,
    /// referring to the decision row that allowed it (a removal: the denial that caused it,
    /// if any). A reference that is not such a decision for this patient, recipient and
    /// category (or a missing one for `sent`) is still recorded
    /// (the data did leave) and flagged in the row's reason (`unverified-decision`), so the
    /// trail shows it. Returns the last row's sequence number.
    pub fn record_release(
        &mut self,
        release: &Release<'_>,
        now: Timestamp,
    ) -> Result<i64, StoreError> {
        let hash = self.patient_hash(release.patient);
        let recipient = release.recipient.to_string();
        let verified = match release.decision {
            None => matches!(
                release.kind,
                consent_protocol::ReleaseKind::Deleted | consent_protocol::ReleaseKind::Discarded
            ),
            Some(seq) => {
                let row: Option<(String, String, String, String, String)> = self
                    .conn
                    .query_row(
                        "SELECT patient_hash, recipient, category, decision, object FROM audit WHERE seq = ?1",
                        [seq],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )
                    .optional()
                    .map_err(sql("read audit"))?;
                // What sends refers to a permit; a removal, to the denial that caused it.
                let want = match release.kind {
                    consent_protocol::ReleaseKind::Sent => "permit",
                    consent_protocol::ReleaseKind::Deleted => "deny",
                    // What was discarded refers to no decision.
                    consent_protocol::ReleaseKind::Discarded => "",
                };
                row.is_some_and(|(h, r, c, d, o)| {
                    h == hash
                        && r == recipient
                        && c == release.category.as_str()
                        && d == want
                        && o.is_empty()
                })
            }
        };
        let reason = if verified { "" } else { "unverified-decision" };
        let at = time::format(now);
        let rows: Vec<AuditRow<'_>> = release
            .objects
            .iter()
            .map(|object| AuditRow {
                at: &at,
                patient_hash: &hash,
                recipient: &recipient,
                category: release.category.as_str(),
                decision: release.kind.as_str(),
                reason,
                object,
                decision_seq: release.decision,
            })
            .collect();
        if !verified {
            tracing::warn!(
                decision = ?release.decision,
                "a release refers to no permit for its patient, recipient and category; recorded as unverified-decision"
            );
        }
        self.append_rows(&rows)
    }

    /// Records that an operator put objects held in the clinic back in the way out (e.g.
    /// `tsunagi dicom requeue` of dead letters, or the console's 保留中), or discarded them:
    /// one audit row per object, decision [`crate::model::Handling::as_str`] (`requeued`,
    /// `discarded-held`), reason `by:WHO` (WHO is the operator's name as given, up to 64
    /// printable characters). `patient` is the spool's raw patient ID (hashed like every
    /// other row; an instance without one is recorded under an empty hash). Returns the last
    /// row's sequence number. Nothing leaves by this: a requeued object is decided again
    /// before it is sent.
    #[allow(clippy::too_many_arguments)] // each is one column of the rows
    pub fn record_handling(
        &mut self,
        patient: Option<&str>,
        recipient: &Recipient,
        category: Category,
        handling: crate::model::Handling,
        objects: &[String],
        by: &str,
        now: Timestamp,
    ) -> Result<i64, StoreError> {
        let hash = match patient {
            Some(id) => {
                let full = self.key.mac(&["patient", self.facility.as_str(), id]);
                full[..32].to_owned()
            }
            None => String::new(),
        };
        let by: String = by.chars().filter(|c| !c.is_control()).take(64).collect();
        let reason = format!("by:{by}");
        let recipient = recipient.to_string();
        let at = time::format(now);
        let rows: Vec<AuditRow<'_>> = objects
            .iter()
            .map(|object| AuditRow {
                at: &at,
                patient_hash: &hash,
                recipient: &recipient,
                category: category.as_str(),
                decision: handling.as_str(),
                reason: &reason,
                object,
                decision_seq: None,
            })
            .collect();
        self.append_rows(&rows)
    }

    /// The head of the audit trail, if anything was recorded.
    pub fn audit_head(&self) -> Result<Option<AuditHead>, StoreError> {
        self.conn
            .query_row(
                "SELECT seq, row_mac FROM audit_head WHERE id = 1",
                [],
                |r| {
                    Ok(AuditHead {
                        seq: r.get(0)?,
                        row_mac: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(sql("read audit head"))
    }

    /// The MAC of row `seq`, if it is there.
    pub fn audit_row_mac(&self, seq: i64) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT mac FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
            .optional()
            .map_err(sql("read audit"))
    }

    /// The checkpoint the network acknowledged last, and any reset found against it.
    pub fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
        self.conn
            .query_row(
                "SELECT seq, row_mac, acknowledged_at, reset FROM audit_anchor WHERE id = 1",
                [],
                |r| {
                    Ok(AuditAnchor {
                        seq: r.get(0)?,
                        row_mac: r.get(1)?,
                        acknowledged_at: r.get(2)?,
                        reset: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(sql("read audit anchor"))
    }

    /// The network acknowledged a checkpoint of the trail at `head`.
    pub fn set_audit_anchor(&mut self, head: &AuditHead, now: Timestamp) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO audit_anchor (id, seq, row_mac, acknowledged_at, reset) VALUES (1, ?1, ?2, ?3, NULL)
                 ON CONFLICT (id) DO UPDATE SET seq = ?1, row_mac = ?2, acknowledged_at = ?3
                 WHERE reset IS NULL",
                params![head.seq, head.row_mac, now],
            )
            .map_err(sql("save audit anchor"))?;
        Ok(())
    }

    /// The local trail does not continue the network's checkpoint (`network`): recorded
    /// (kept until an operator acts), so status and `audit verify` report it.
    pub fn set_audit_reset(
        &mut self,
        network: &AuditHead,
        why: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO audit_anchor (id, seq, row_mac, acknowledged_at, reset) VALUES (1, ?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET seq = ?1, row_mac = ?2, acknowledged_at = ?3, reset = ?4
                 WHERE reset IS NULL",
                params![network.seq, network.row_mac, now, why],
            )
            .map_err(sql("save audit reset"))?;
        Ok(())
    }

    /// Whether the local trail continues `checkpoint` (a head the network holds): `None`
    /// when it does, else why not (the trail was reset, cut or rewritten).
    pub fn audit_diverges_from(
        &self,
        checkpoint: &AuditHead,
    ) -> Result<Option<String>, StoreError> {
        let local = self.audit_head()?.map_or(0, |h| h.seq);
        if local < checkpoint.seq {
            return Ok(Some(format!(
                "the audit trail ends at row {local}, behind the checkpoint the network holds (row {}): the trail was reset or cut",
                checkpoint.seq
            )));
        }
        match self.audit_row_mac(checkpoint.seq)? {
            Some(mac) if mac == checkpoint.row_mac => Ok(None),
            Some(_) => Ok(Some(format!(
                "row {} of the audit trail is not the one the network's checkpoint holds: the trail was rewritten",
                checkpoint.seq
            ))),
            None => Ok(Some(format!(
                "row {} of the audit trail, which the network's checkpoint holds, is missing",
                checkpoint.seq
            ))),
        }
    }

    /// At most `limit` rows of the audit trail, newest first, older than `before` (from the
    /// newest when `None`).
    pub fn audit_rows(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, at, patient_hash, recipient, category, decision, reason FROM audit
                 WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(sql("read audit"))?;
        let rows = stmt
            .query_map(
                params![
                    before.unwrap_or(i64::MAX),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok(AuditEntry {
                        seq: r.get(0)?,
                        at: r.get(1)?,
                        patient_hash: r.get(2)?,
                        recipient: r.get(3)?,
                        category: r.get(4)?,
                        decision: r.get(5)?,
                        reason: r.get(6)?,
                    })
                },
            )
            .map_err(sql("read audit"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql("read audit"))
    }

    /// Checks the whole audit trail.
    pub fn verify_audit(&self) -> Result<AuditCheck, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, at, patient_hash, recipient, category, decision, reason, object, decision_seq, mac FROM audit ORDER BY seq")
            .map_err(sql("read audit"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    (r.get::<_, String>(7)?, r.get::<_, Option<i64>>(8)?),
                    r.get::<_, String>(9)?,
                ))
            })
            .map_err(sql("read audit"))?;
        let mut prev = "genesis".to_owned();
        let mut expected = 1i64;
        for row in rows {
            let (seq, at, hash, recipient, category, decision, reason, (object, decision_seq), mac) =
                row.map_err(sql("read audit"))?;
            if seq != expected {
                let problem = if expected + 1 == seq {
                    format!("row {expected} was removed")
                } else {
                    format!("rows {expected} to {} were removed", seq - 1)
                };
                return Ok(AuditCheck::Broken {
                    row: expected,
                    problem,
                });
            }
            let want = AuditRow {
                at: &at,
                patient_hash: &hash,
                recipient: &recipient,
                category: &category,
                decision: &decision,
                reason: &reason,
                object: &object,
                decision_seq,
            }
            .mac(&self.key, &prev, seq);
            if want != mac {
                return Ok(AuditCheck::Broken {
                    row: seq,
                    problem: format!("row {seq} was altered"),
                });
            }
            prev = mac;
            expected += 1;
        }
        let last = expected - 1;
        let head: Option<(i64, String, String)> = self
            .conn
            .query_row(
                "SELECT seq, row_mac, mac FROM audit_head WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql("read audit head"))?;
        match head {
            // Empty: intact only if the network never acknowledged a checkpoint of it.
            None if last == 0 => self.verify_anchor(0),
            None => Ok(AuditCheck::Broken {
                row: last,
                problem: "the audit head was removed".into(),
            }),
            Some((seq, _, _)) if seq > last => Ok(AuditCheck::Broken {
                row: last + 1,
                problem: format!("rows {} to {seq} were removed from the end", last + 1),
            }),
            Some((seq, row_mac, mac)) => {
                if seq != last
                    || row_mac != prev
                    || mac != self.key.mac(&["head", &seq.to_string(), &row_mac])
                {
                    Ok(AuditCheck::Broken {
                        row: seq,
                        problem: "the audit head was altered".into(),
                    })
                } else {
                    self.verify_anchor(last)
                }
            }
        }
    }

    /// The part of verification that needs the network's copy: a reset the sync found, or
    /// a trail behind (or beside) the checkpoint the network acknowledged.
    fn verify_anchor(&self, last: i64) -> Result<AuditCheck, StoreError> {
        let Some(anchor) = self.audit_anchor()? else {
            return Ok(AuditCheck::Intact { rows: last });
        };
        if let Some(why) = anchor.reset {
            return Ok(AuditCheck::Broken {
                row: anchor.seq,
                problem: why,
            });
        }
        let checkpoint = AuditHead {
            seq: anchor.seq,
            row_mac: anchor.row_mac,
        };
        match self.audit_diverges_from(&checkpoint)? {
            Some(problem) => Ok(AuditCheck::Broken {
                row: anchor.seq,
                problem,
            }),
            None => Ok(AuditCheck::Intact { rows: last }),
        }
    }
}

/// One row of the audit trail, as its MAC covers it.
struct AuditRow<'a> {
    at: &'a str,
    patient_hash: &'a str,
    recipient: &'a str,
    category: &'a str,
    decision: &'a str,
    reason: &'a str,
    /// What left (release rows only; empty for a decision).
    object: &'a str,
    /// The decision a release refers to.
    decision_seq: Option<i64>,
}

impl AuditRow<'_> {
    /// The row's MAC, chained to the previous row's. A decision row's MAC is the one it has
    /// always been; a release row's also covers what left and the decision it refers to.
    fn mac(&self, key: &AuditKey, prev: &str, seq: i64) -> String {
        let seq_text = seq.to_string();
        let mut parts = vec![
            "row",
            prev,
            &seq_text,
            self.at,
            self.patient_hash,
            self.recipient,
            self.category,
            self.decision,
            self.reason,
        ];
        let decision_text = self.decision_seq.map(|d| d.to_string()).unwrap_or_default();
        if !self.object.is_empty() || self.decision_seq.is_some() {
            parts.extend(["release", self.object, &decision_text]);
        }
        key.mac(&parts)
    }
}

fn queue(
    tx: &rusqlite::Transaction<'_>,
    kind: &str,
    reference: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO outbox (kind, ref, created_at) VALUES (?1, ?2, ?3)",
        params![kind, reference, now],
    )
    .map_err(sql("queue push"))?;
    Ok(())
}

mod facilities;
pub use facilities::{Directory, DirectoryEntry, NotOffered, SHARED_CODE};
#[cfg(test)]
mod tests;
