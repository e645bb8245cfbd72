//! The consent desk (受付: 参加同意, 公開設定, 名寄せ, 撤回) as the clinic console asks for it
//! (issue 19): find a patient, show them, register their consent, change what is disclosed
//! to whom, link another facility's ID, withdraw.
//!
//! Socket: `RUNTIME-DIR/consent-desk/desk.sock` (directory 2750, group [`GROUP`]; socket
//! 0660), served by the consent service beside its decision socket: one JSON request per
//! line, one answer per line ([`Request`], [`Answer`]). Only the console is in the group: the
//! services that ask for decisions cannot change a consent.
//!
//! Each change is the same [`Store`] call as `tsunagi consent`'s, so it goes into the same
//! audit trail and the same ATNA Patient Record events; the console's account and address
//! ([`Staff`]) are recorded as who asked for it ([`Store::attribute_changes`]).

use std::collections::BTreeSet;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tsunagi_config::FacilityCode;

use crate::decide::effective;
use crate::model::{Category, Consent, Evidence, Link, Patient, PatientId, Scope, Status};
use crate::store::{AuditCheck, AuditEntry, Directory, NewConsent, Store, StoreError};
use crate::time::Timestamp;

/// The socket's directory inside the runtime directory.
pub const DIR: &str = "consent-desk";
/// The socket's file name.
pub const SOCKET_NAME: &str = "desk.sock";
/// The group whose members may use the desk (the console's user).
pub const GROUP: &str = "tsunagi-desk";
/// The most patients one search lists.
pub const MAX_FOUND: usize = 50;
/// The longest search text.
pub const MAX_QUERY: usize = 64;

/// The desk socket's path for a config.
pub fn socket_path(cfg: &tsunagi_config::Config) -> PathBuf {
    cfg.paths.runtime_dir.as_path().join(DIR).join(SOCKET_NAME)
}

/// Who asked: the console's account, and the address their browser came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Staff {
    pub account: String,
    pub from: String,
}

/// A participation consent as the paper form has it (参加同意書).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The patient (a network ID is never set here: the network gives it).
    pub patient: Patient,
    pub scope: Scope,
    pub excluded: BTreeSet<FacilityCode>,
    pub categories: BTreeSet<Category>,
    /// Valid from (default: now).
    pub valid_from: Option<Timestamp>,
    /// Valid until (exclusive; default open-ended).
    pub valid_until: Option<Timestamp>,
    /// SHA-256 (hex) of the scanned, signed form.
    pub form_sha256: String,
}

/// A request to the desk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Patients whose local ID is `query`, or whose name in kana begins with it.
    Find {
        query: String,
    },
    Show {
        patient: PatientId,
    },
    Register {
        staff: Staff,
        registration: Box<Registration>,
    },
    /// Disclose to a facility (公開設定).
    Disclose {
        staff: Staff,
        patient: PatientId,
        facility: FacilityCode,
    },
    /// Stop disclosing to a facility.
    Undisclose {
        staff: Staff,
        patient: PatientId,
        facility: FacilityCode,
    },
    /// The patient's ID at another facility (名寄せ).
    Link {
        staff: Staff,
        patient: PatientId,
        facility: FacilityCode,
        id: String,
    },
    /// Withdraw (撤回), effective at once.
    Withdraw {
        staff: Staff,
        patient: PatientId,
    },
    /// The audit trail (監査), newest first, older than `before`, and its verification.
    /// Reading it is an Audit Log Used event naming `staff`; a trail that does not verify is
    /// also a Security Alert, as with `tsunagi audit verify`. The console lets only
    /// administrators ask.
    Trail {
        staff: Staff,
        before: Option<i64>,
    },
    /// The network's facility directory, to pick recipients by name.
    Facilities,
}

/// The most audit rows one [`Request::Trail`] answers.
pub const TRAIL_PAGE: usize = 50;

/// The audit trail as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trail {
    /// At most [`TRAIL_PAGE`] rows, newest first.
    pub rows: Vec<AuditEntry>,
    /// The whole trail's verification.
    pub check: AuditCheck,
    /// The last row the network acknowledged holding (its checkpoint), if any.
    pub checkpoint: Option<i64>,
}

/// Where a patient's participation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Participation {
    /// No consent recorded.
    None,
    Active,
    Withdrawn,
}

/// A patient found by a search.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Found {
    pub patient: Patient,
    pub participation: Participation,
}

/// A patient as the desk shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct View {
    pub patient: Patient,
    pub links: Vec<Link>,
    /// The effective consent (its latest version), if any.
    pub consent: Option<Consent>,
    pub participation: Participation,
    /// A network consent for this patient could not be understood: every decision denies
    /// until a readable one replaces it.
    pub unreadable: bool,
}

/// Why the desk did not do what was asked (words for the console to translate; never
/// patient data beyond what the request carried).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    UnknownPatient,
    /// A consent is in force: change it, or withdraw it first.
    AlreadyRegistered,
    NoConsent,
    AlreadyWithdrawn,
    /// The ID is already linked to another patient, or the network ID is taken.
    IdentityTaken,
    /// A value is not acceptable; what is wrong, in words.
    Invalid(String),
}

/// The desk's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Answer {
    Found(Vec<Found>),
    /// The patient after the request (shown, or changed).
    Patient(Box<View>),
    Refused(Refusal),
    Trail(Box<Trail>),
    Facilities(Box<Directory>),
    /// The service could not answer (never patient data).
    Error(String),
}

fn participation(consent: Option<(&Consent, bool)>) -> Participation {
    match consent {
        None => Participation::None,
        Some((c, withdrawn)) if withdrawn || c.status == Status::Withdrawn => {
            Participation::Withdrawn
        }
        Some(_) => Participation::Active,
    }
}

fn view(store: &Store, id: &PatientId) -> Result<Answer, StoreError> {
    let Some(patient) = store.patient(id)? else {
        return Ok(Answer::Refused(Refusal::UnknownPatient));
    };
    let links = store.links(id)?;
    let records = store.records(id)?;
    let current = effective(&records);
    Ok(Answer::Patient(Box::new(View {
        participation: participation(current),
        consent: current.map(|(c, _)| c.clone()),
        links,
        unreadable: store.is_unreadable(id)?,
        patient,
    })))
}

/// The trail's page and its verification. Reading it is itself audited (Audit Log Used,
/// naming the staff member), and a trail that does not verify is a Security Alert.
fn trail(store: &Store, staff: &Staff, before: Option<i64>) -> Result<Answer, StoreError> {
    store.record_event(&audit::protocol::Event::AuditLogUsed {
        user: staff.account.clone(),
        from: staff.from.clone(),
    })?;
    let check = store.verify_audit()?;
    if let AuditCheck::Broken { row, problem } = &check {
        store.record_failed_verify(*row, problem)?;
    }
    Ok(Answer::Trail(Box::new(Trail {
        rows: store.audit_rows(before, TRAIL_PAGE)?,
        check,
        checkpoint: store.audit_anchor()?.map(|a| a.seq),
    })))
}

fn refusal(e: StoreError) -> Result<Answer, StoreError> {
    match e {
        StoreError::UnknownPatient { .. } => Ok(Answer::Refused(Refusal::UnknownPatient)),
        StoreError::NoConsent { .. } => Ok(Answer::Refused(Refusal::NoConsent)),
        StoreError::AlreadyWithdrawn { .. } => Ok(Answer::Refused(Refusal::AlreadyWithdrawn)),
        StoreError::NetworkIdTaken { .. } => Ok(Answer::Refused(Refusal::IdentityTaken)),
        other => Err(other),
    }
}

/// Whether the staff member is named as the trail may record them.
pub fn valid(staff: &Staff) -> bool {
    crate::model::is_dicom_id(&staff.account) && staff.from.len() <= 64
}

fn invalid(why: &str) -> Answer {
    Answer::Refused(Refusal::Invalid(why.to_owned()))
}

/// Checks a registration's own values (the form's), before anything is written.
fn check(r: &Registration) -> Result<(), Answer> {
    let p = &r.patient;
    let name_ok = |s: &str| !s.trim().is_empty() && s.chars().count() <= 64;
    if ![
        &p.family_kanji,
        &p.given_kanji,
        &p.family_kana,
        &p.given_kana,
    ]
    .iter()
    .all(|s| name_ok(s))
    {
        return Err(invalid("names are 1 to 64 characters"));
    }
    if crate::time::parse(&p.birth_date).is_err()
        || p.birth_date.len() != 10
        || p.birth_date.contains('T')
    {
        return Err(invalid("the birth date is YYYY-MM-DD"));
    }
    if p.network_id.is_some() {
        return Err(invalid("a network ID comes from the network, not the form"));
    }
    if r.categories.is_empty() {
        return Err(invalid("at least one data category"));
    }
    if matches!(&r.scope, Scope::Facilities(list) if list.is_empty()) {
        return Err(invalid("at least one facility, or every participant"));
    }
    if r.form_sha256.len() != 64 || !r.form_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid("the scanned form's SHA-256"));
    }
    if let (Some(from), Some(until)) = (r.valid_from, r.valid_until)
        && until <= from
    {
        return Err(invalid("the end of validity comes after its start"));
    }
    Ok(())
}

/// Answers one request on `store` at `now`.
pub fn answer(store: &mut Store, request: Request, now: Timestamp) -> Result<Answer, StoreError> {
    let staff = match &request {
        Request::Find { query } => {
            if query.chars().count() > MAX_QUERY {
                return Ok(invalid("the search is at most 64 characters"));
            }
            let found = store.find_patients(query, MAX_FOUND)?;
            let mut out = Vec::with_capacity(found.len());
            for patient in found {
                let records = store.records(&patient.id)?;
                out.push(Found {
                    participation: participation(effective(&records)),
                    patient,
                });
            }
            return Ok(Answer::Found(out));
        }
        Request::Show { patient } => return view(store, patient),
        Request::Facilities => return Ok(Answer::Facilities(Box::new(store.directory()?))),
        Request::Trail { staff, before } => {
            if !valid(staff) {
                return Ok(invalid("the staff account"));
            }
            return trail(store, staff, *before);
        }
        Request::Register { staff, .. }
        | Request::Disclose { staff, .. }
        | Request::Undisclose { staff, .. }
        | Request::Link { staff, .. }
        | Request::Withdraw { staff, .. } => staff.clone(),
    };
    if !valid(&staff) {
        return Ok(invalid("the staff account"));
    }
    let before = store.last_change()?;
    let done = change(store, request, &staff, now);
    // Whatever part of it was written is this account's doing.
    store.attribute_changes(before, &staff.account, &staff.from)?;
    match done {
        Ok(answer) => Ok(answer),
        Err(e) => refusal(e),
    }
}

fn change(
    store: &mut Store,
    request: Request,
    staff: &Staff,
    now: Timestamp,
) -> Result<Answer, StoreError> {
    let id = match request {
        Request::Find { .. } | Request::Trail { .. } | Request::Facilities => {
            return Ok(invalid("a search changes nothing"));
        }
        Request::Show { patient } => patient,
        Request::Register { registration, .. } => {
            let r = *registration;
            if let Err(answer) = check(&r) {
                return Ok(answer);
            }
            let id = r.patient.id.clone();
            if store.patient(&id)?.is_some()
                && participation(effective(&store.records(&id)?)) == Participation::Active
            {
                return Ok(Answer::Refused(Refusal::AlreadyRegistered));
            }
            store.upsert_patient(&r.patient, now)?;
            store.record_consent(
                NewConsent {
                    patient: id.clone(),
                    scope: r.scope,
                    excluded: r.excluded,
                    categories: r.categories,
                    valid_from: r.valid_from.unwrap_or(now),
                    valid_until: r.valid_until,
                    evidence: Some(Evidence {
                        sha256: r.form_sha256.to_ascii_lowercase(),
                        recorded_by: staff.account.clone(),
                        recorded_at: now,
                    }),
                },
                now,
            )?;
            id
        }
        Request::Disclose {
            patient, facility, ..
        } => {
            store.change_consent(&patient, now, |c| {
                c.excluded.remove(&facility);
                if let Scope::Facilities(list) = &mut c.scope {
                    list.insert(facility.clone());
                }
            })?;
            patient
        }
        Request::Undisclose {
            patient, facility, ..
        } => {
            let current = store
                .records(&patient)
                .map(|r| effective(&r).map(|(c, _)| c.scope.clone()))?;
            if let Some(Scope::Facilities(list)) = &current
                && list.len() == 1
                && list.contains(&facility)
            {
                return Ok(invalid(
                    "the last facility: withdraw instead, or disclose to another first",
                ));
            }
            store.change_consent(&patient, now, |c| match &mut c.scope {
                Scope::AllParticipants => {
                    c.excluded.insert(facility.clone());
                }
                Scope::Facilities(list) => {
                    list.remove(&facility);
                }
            })?;
            patient
        }
        Request::Link {
            patient,
            facility,
            id,
            ..
        } => {
            let id = id.trim().to_owned();
            if !crate::model::is_dicom_id(&id) {
                return Ok(invalid(
                    "an ID is 1 to 64 printable ASCII characters, without a backslash",
                ));
            }
            if &facility == store.facility() {
                return Ok(invalid("this clinic's own IDs are not linked"));
            }
            store.add_link(&patient, &facility, &id, now)?;
            patient
        }
        Request::Withdraw { patient, .. } => {
            store.withdraw(&patient, &staff.account, now)?;
            patient
        }
    };
    view(store, &id)
}

/// Why the console could not get an answer from the desk.
pub type DeskError = tsunagi_runtime::listen::AskError;

/// Asks the desk at `socket` (blocking; at most `timeout` for each read and write).
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Answer, DeskError> {
    tsunagi_runtime::listen::ask_line(
        socket,
        request,
        timeout,
        consent_protocol::MAX_LINE as u64 * 4,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Decision, DenyReason};
    use crate::model::{Recipient, Sex};
    use crate::store::AuditKey;

    const T0: Timestamp = 1_795_273_200;

    fn fac(code: &str) -> FacilityCode {
        FacilityCode::try_from(code).unwrap()
    }

    fn staff() -> Staff {
        Staff {
            account: "uketsuke1".into(),
            from: "192.168.50.20".into(),
        }
    }

    fn registration(id: &str, family_kana: &str) -> Registration {
        Registration {
            patient: Patient {
                id: id.parse().unwrap(),
                family_kanji: "山田".into(),
                given_kanji: "花子".into(),
                family_kana: family_kana.into(),
                given_kana: "ハナコ".into(),
                birth_date: "1950-04-01".into(),
                sex: Sex::Female,
                network_id: None,
            },
            scope: Scope::Facilities([fac("1312345679")].into()),
            excluded: BTreeSet::new(),
            categories: [Category::Images].into(),
            valid_from: Some(T0 - 60),
            valid_until: None,
            form_sha256: "ab".repeat(32),
        }
    }

    fn shown(answer: Answer) -> View {
        match answer {
            Answer::Patient(v) => *v,
            other => panic!("not a patient: {other:?}"),
        }
    }

    #[test]
    fn the_desk_registers_finds_discloses_links_and_withdraws_and_names_who_did_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
        let mut store =
            Store::open(&dir.path().join("consent.db"), fac("1312345678"), key).unwrap();
        store.set_last_pull(T0).unwrap();
        let id: PatientId = "0001234".parse().unwrap();
        let ask = |store: &mut Store, r: Request| answer(store, r, T0).unwrap();

        let v = shown(ask(
            &mut store,
            Request::Register {
                staff: staff(),
                registration: Box::new(registration("0001234", "ヤマダ")),
            },
        ));
        assert_eq!(v.participation, Participation::Active);
        let c = v.consent.unwrap();
        assert_eq!(c.evidence.unwrap().recorded_by, "uketsuke1");
        // The same patient again, while the consent is in force: refused.
        assert_eq!(
            ask(
                &mut store,
                Request::Register {
                    staff: staff(),
                    registration: Box::new(registration("0001234", "ヤマダ")),
                },
            ),
            Answer::Refused(Refusal::AlreadyRegistered)
        );
        ask(
            &mut store,
            Request::Register {
                staff: staff(),
                registration: Box::new(registration("0005678", "ヤマモト")),
            },
        );
        // Hiragana, spaces, a prefix, an exact ID.
        let found = |store: &mut Store, q: &str| match ask(store, Request::Find { query: q.into() })
        {
            Answer::Found(f) => f
                .into_iter()
                .map(|f| f.patient.id.to_string())
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(found(&mut store, "やま"), ["0001234", "0005678"]);
        assert_eq!(found(&mut store, "ヤマダ　ハナ"), ["0001234"]);
        assert_eq!(found(&mut store, "0005678"), ["0005678"]);
        assert!(found(&mut store, "000").is_empty());
        assert!(found(&mut store, "  ").is_empty());

        let to = Recipient::Facility(fac("1312345670"));
        assert_eq!(
            store
                .decide(
                    &id,
                    &to,
                    Category::Images,
                    T0,
                    T0,
                    Duration::from_secs(86_400)
                )
                .unwrap(),
            Decision::Deny(DenyReason::RecipientNotDisclosed)
        );
        let v = shown(ask(
            &mut store,
            Request::Disclose {
                staff: staff(),
                patient: id.clone(),
                facility: fac("1312345670"),
            },
        ));
        assert_eq!(v.consent.as_ref().unwrap().version, 2);
        assert!(
            store
                .decide(
                    &id,
                    &to,
                    Category::Images,
                    T0,
                    T0,
                    Duration::from_secs(86_400)
                )
                .unwrap()
                .is_permit()
        );
        ask(
            &mut store,
            Request::Undisclose {
                staff: staff(),
                patient: id.clone(),
                facility: fac("1312345679"),
            },
        );
        // The last facility cannot be taken away: that is a withdrawal.
        assert!(matches!(
            ask(
                &mut store,
                Request::Undisclose {
                    staff: staff(),
                    patient: id.clone(),
                    facility: fac("1312345670"),
                },
            ),
            Answer::Refused(Refusal::Invalid(_))
        ));
        let v = shown(ask(
            &mut store,
            Request::Link {
                staff: staff(),
                patient: id.clone(),
                facility: fac("1312345679"),
                id: "H-77".into(),
            },
        ));
        assert_eq!(v.links.len(), 1);
        assert!(matches!(
            ask(
                &mut store,
                Request::Link {
                    staff: staff(),
                    patient: id.clone(),
                    facility: fac("1312345678"),
                    id: "X".into(),
                },
            ),
            Answer::Refused(Refusal::Invalid(_))
        ));
        let v = shown(ask(
            &mut store,
            Request::Withdraw {
                staff: staff(),
                patient: id.clone(),
            },
        ));
        assert_eq!(v.participation, Participation::Withdrawn);
        assert!(
            !store
                .decide(
                    &id,
                    &to,
                    Category::Images,
                    T0,
                    T0,
                    Duration::from_secs(86_400)
                )
                .unwrap()
                .is_permit()
        );
        assert_eq!(
            ask(
                &mut store,
                Request::Withdraw {
                    staff: staff(),
                    patient: id.clone(),
                },
            ),
            Answer::Refused(Refusal::AlreadyWithdrawn)
        );
        assert_eq!(
            ask(
                &mut store,
                Request::Show {
                    patient: "0009999".parse().unwrap(),
                },
            ),
            Answer::Refused(Refusal::UnknownPatient)
        );
        // After a withdrawal the patient may consent again.
        let v = shown(ask(
            &mut store,
            Request::Register {
                staff: staff(),
                registration: Box::new(registration("0001234", "ヤマダ")),
            },
        ));
        assert_eq!(v.participation, Participation::Active);

        // Every change is owed to the ATNA trail with the account and its address.
        let changes = store.pending_changes(100).unwrap();
        assert!(changes.len() >= 8, "{changes:?}");
        assert!(
            changes
                .iter()
                .all(|c| c.by == Some(("uketsuke1".into(), "192.168.50.20".into()))),
            "{changes:?}"
        );
        assert!(store.verify_audit().is_ok());
    }

    #[test]
    fn the_trail_is_read_a_page_at_a_time_its_reading_is_audited_and_a_tampered_row_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
        let db = dir.path().join("consent.db");
        let mut store = Store::open(&db, fac("1312345678"), key).unwrap();
        let id: PatientId = "0001234".parse().unwrap();
        let ask = |store: &mut Store, r: Request| answer(store, r, T0).unwrap();
        shown(ask(
            &mut store,
            Request::Register {
                staff: staff(),
                registration: Box::new(registration("0001234", "ヤマダ")),
            },
        ));
        for _ in 0..60 {
            store
                .decide(
                    &id,
                    &Recipient::Hub,
                    Category::Images,
                    T0,
                    T0,
                    Duration::from_secs(86_400),
                )
                .unwrap();
        }
        let trail = |store: &mut Store, before| match ask(
            store,
            Request::Trail {
                staff: staff(),
                before,
            },
        ) {
            Answer::Trail(t) => *t,
            other => panic!("{other:?}"),
        };
        let first = trail(&mut store, None);
        assert_eq!(first.rows.len(), TRAIL_PAGE);
        assert_eq!(first.check, AuditCheck::Intact { rows: 60 });
        assert_eq!(first.rows[0].seq, 60);
        assert_eq!(first.rows[0].recipient, Recipient::Hub.to_string());
        assert_eq!(first.rows[0].category, "images");
        // The patient is there only as the trail's pseudonym.
        assert!(!first.rows[0].patient_hash.contains("0001234"));
        let rest = trail(&mut store, Some(first.rows[TRAIL_PAGE - 1].seq));
        let seqs: Vec<i64> = rest.rows.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=10).rev().collect::<Vec<_>>());
        // Each reading is an Audit Log Used event naming the staff member.
        let events = store.pending_events(10).unwrap();
        assert_eq!(
            events
                .iter()
                .filter(
                    |(_, e)| matches!(e, audit::protocol::Event::AuditLogUsed { user, from }
                    if user == "uketsuke1" && from == "192.168.50.20")
                )
                .count(),
            2,
            "{events:?}"
        );
        // A row altered behind the store's back: the page says where, and a Security Alert
        // is owed.
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute("UPDATE audit SET reason = 'tampered' WHERE seq = 7", [])
            .unwrap();
        let broken = trail(&mut store, None);
        assert!(
            matches!(&broken.check, AuditCheck::Broken { row: 7, problem } if problem.contains("altered")),
            "{:?}",
            broken.check
        );
        assert!(
            store
                .pending_events(10)
                .unwrap()
                .iter()
                .any(|(_, e)| matches!(e, audit::protocol::Event::FailedAuditVerify { .. }))
        );
        // A staff account that is no account is refused, and nothing is read.
        let a = answer(
            &mut store,
            Request::Trail {
                staff: Staff {
                    account: "a\\b".into(),
                    from: "x".into(),
                },
                before: None,
            },
            T0,
        )
        .unwrap();
        assert!(matches!(a, Answer::Refused(Refusal::Invalid(_))), "{a:?}");
    }

    #[test]
    fn a_registration_the_form_does_not_support_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let key = AuditKey::load_or_create(&dir.path().join("audit.key")).unwrap();
        let mut store =
            Store::open(&dir.path().join("consent.db"), fac("1312345678"), key).unwrap();
        let cases: Vec<fn(&mut Registration)> = vec![
            |r| r.form_sha256 = "not a digest".into(),
            |r| r.categories.clear(),
            |r| r.scope = Scope::Facilities(BTreeSet::new()),
            |r| r.patient.birth_date = "1950-13-01".into(),
            |r| r.patient.family_kana = " ".into(),
            |r| r.patient.network_id = Some("N-1".into()),
            |r| r.valid_until = Some(T0 - 120),
        ];
        for spoil in cases {
            let mut r = registration("0001234", "ヤマダ");
            spoil(&mut r);
            let a = answer(
                &mut store,
                Request::Register {
                    staff: staff(),
                    registration: Box::new(r),
                },
                T0,
            )
            .unwrap();
            assert!(matches!(a, Answer::Refused(Refusal::Invalid(_))), "{a:?}");
        }
        assert!(
            store
                .patient(&"0001234".parse().unwrap())
                .unwrap()
                .is_none()
        );
        assert!(store.pending_changes(10).unwrap().is_empty());
        let a = answer(
            &mut store,
            Request::Show {
                patient: "0001234".parse().unwrap(),
            },
            T0,
        )
        .unwrap();
        assert_eq!(a, Answer::Refused(Refusal::UnknownPatient));
    }
}
