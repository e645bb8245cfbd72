//! FHIR R4 (JP Core aligned) resources for patients and consents, both ways.
//!
//! * Patient: `identifier` = this clinic's ID (system `urn:oid:1.2.392.100495.20.3.51.1` +
//!   医療機関コード) plus every linked identifier of other facilities (名寄せ); names in kanji
//!   and kana (`iso21090-EN-representation` IDE / SYL); gender; birthDate.
//! * Consent: `identifier` = the box's consent id (system [`CONSENT_ID_SYSTEM`]); `status`
//!   `active` or `inactive` (withdrawn); `patient`; `provision` of type permit with the
//!   validity `period`, the disclosed facilities as `actor`s with the information-recipient
//!   role (IRCP) referencing Organizations by 医療機関コード (none listed = every participant),
//!   the categories as `code`s (system [`CATEGORY_SYSTEM`]), and each excluded facility as a
//!   nested provision of type deny.
//!
//! Reading the network's consents fails closed ([`consent_from_resource`]): every R4 way of
//! saying "no" becomes a deny, and a resource with anything the box does not understand is
//! an error, which the sync records as unreadable (the patient is denied).

use std::collections::BTreeSet;

use serde_json::{Value, json};
use tsunagi_config::FacilityCode;

use crate::model::{
    Category, Consent, Facility, Link, MAX_FACILITY_NAME, PATIENT_ID_SYSTEM_PREFIX, Patient,
    PatientId, Scope, Sex, Source, Status, patient_id_system,
};
use crate::time::{self, Timestamp};

/// The identifier system of consents recorded by tsunagi boxes.
pub const CONSENT_ID_SYSTEM: &str = "urn:tsunagi:consent-id";
/// The code system of data categories.
pub const CATEGORY_SYSTEM: &str = "urn:tsunagi:data-category";
/// The identifier system of medical institutions by 医療機関コード (JP Core).
pub const INSTITUTION_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const CONSENT_SCOPE: &str = "http://terminology.hl7.org/CodeSystem/consentscope";
const EN_REPRESENTATION: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";

/// A resource the box cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unusable {what}: {why}")]
pub struct FhirError {
    pub what: &'static str,
    pub why: String,
}

fn bad(what: &'static str, why: impl Into<String>) -> FhirError {
    FhirError {
        what,
        why: why.into(),
    }
}

/// The Patient resource for a local patient. (`name.text` joins family and given name with
/// an ASCII space: the R4 schema's string pattern rejects the ideographic space U+3000.)
/// `network_id_system`: the network's patient-ID system; the patient's network ID (once
/// known) is kept in the resource under it.
pub fn patient_resource(
    facility: &FacilityCode,
    p: &Patient,
    links: &[Link],
    network_id_system: Option<&str>,
) -> Value {
    let mut identifiers = vec![json!({
        "use": "usual",
        "system": patient_id_system(facility),
        "value": p.id.as_str(),
    })];
    for link in links {
        identifiers.push(json!({ "system": link.system, "value": link.value }));
    }
    if let (Some(system), Some(id)) = (network_id_system, &p.network_id) {
        identifiers.push(json!({ "system": system, "value": id }));
    }
    let gender = match p.sex {
        Sex::Male => "male",
        Sex::Female => "female",
        Sex::Other => "other",
        Sex::Unknown => "unknown",
    };
    json!({
        "resourceType": "Patient",
        "identifier": identifiers,
        "name": [
            {
                "extension": [{ "url": EN_REPRESENTATION, "valueCode": "IDE" }],
                "use": "official",
                "text": format!("{} {}", p.family_kanji, p.given_kanji),
                "family": p.family_kanji,
                "given": [p.given_kanji],
            },
            {
                "extension": [{ "url": EN_REPRESENTATION, "valueCode": "SYL" }],
                "use": "official",
                "text": format!("{} {}", p.family_kana, p.given_kana),
                "family": p.family_kana,
                "given": [p.given_kana],
            }
        ],
        "gender": gender,
        "birthDate": p.birth_date,
    })
}

/// The code system of tsunagi's audit events (the checkpoint's `type`) and the identifier
/// system of a box's audit trail (the checkpoint's entity, by 医療機関コード).
pub const AUDIT_SYSTEM: &str = "urn:tsunagi:audit";
/// The identifier system of a box's audit trail.
pub const AUDIT_TRAIL_SYSTEM: &str = "urn:tsunagi:audit-trail";

/// The id of the box's audit checkpoint on the network's server (one per box: a client-given
/// id from the 医療機関コード, written with update-as-create; R4 `AuditEvent` has no
/// `identifier` to update conditionally by).
pub fn checkpoint_id(facility: &FacilityCode) -> String {
    format!("tsunagi-audit-{facility}")
}

/// The checkpoint of the box's audit trail: an R4 `AuditEvent` whose entity is the trail
/// (identifier [`AUDIT_TRAIL_SYSTEM`] | 医療機関コード) with details `head-seq` and
/// `head-mac` (the last row's sequence number and MAC; neither carries patient data).
pub fn checkpoint_resource(
    facility: &FacilityCode,
    head: &crate::store::AuditHead,
    now: Timestamp,
) -> Value {
    json!({
        "resourceType": "AuditEvent",
        "id": checkpoint_id(facility),
        "type": { "system": AUDIT_SYSTEM, "code": "checkpoint", "display": "audit trail checkpoint" },
        "action": "E",
        "recorded": time::format(now),
        "outcome": "0",
        "agent": [{ "who": institution(facility), "requestor": false }],
        "source": { "observer": institution(facility) },
        "entity": [{
            "what": { "identifier": { "system": AUDIT_TRAIL_SYSTEM, "value": facility.as_str() } },
            "detail": [
                { "type": "head-seq", "valueString": head.seq.to_string() },
                { "type": "head-mac", "valueString": head.row_mac },
            ],
        }],
    })
}

/// The head a checkpoint of this box's trail holds, or why it cannot be read.
pub fn checkpoint_from_resource(
    facility: &FacilityCode,
    resource: &Value,
) -> Result<crate::store::AuditHead, String> {
    if resource["resourceType"] != "AuditEvent" {
        return Err("not an AuditEvent".into());
    }
    let entity = resource["entity"]
        .as_array()
        .and_then(|e| {
            e.iter().find(|e| {
                e["what"]["identifier"]["system"] == AUDIT_TRAIL_SYSTEM
                    && e["what"]["identifier"]["value"] == facility.as_str()
            })
        })
        .ok_or("no entity naming this box's audit trail")?;
    let detail = |name: &str| {
        entity["detail"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["type"] == name))
            .and_then(|d| d["valueString"].as_str())
    };
    let seq = detail("head-seq")
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|s| *s >= 0)
        .ok_or("no readable head-seq")?;
    let row_mac = detail("head-mac")
        .filter(|m| m.len() == 64 && m.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("no readable head-mac")?;
    Ok(crate::store::AuditHead {
        seq,
        row_mac: row_mac.to_owned(),
    })
}

fn institution(code: &FacilityCode) -> Value {
    json!({ "identifier": { "system": INSTITUTION_SYSTEM, "value": code.as_str() } })
}

fn recipient_actor(code: &FacilityCode) -> Value {
    json!({
        "role": { "coding": [{ "system": PARTICIPATION, "code": "IRCP" }] },
        "reference": institution(code),
    })
}

/// The Consent resource for one consent version, about the Patient `patient_reference`.
pub fn consent_resource(facility: &FacilityCode, c: &Consent, patient_reference: &str) -> Value {
    let mut period = serde_json::Map::new();
    // An unbounded start is written as no start (it is read back as unbounded): it has no
    // RFC 3339 form.
    if c.valid_from > UNBOUNDED_START {
        period.insert("start".into(), json!(time::format(c.valid_from)));
    }
    if let Some(until) = c.valid_until {
        period.insert("end".into(), json!(time::format(until)));
    }
    let mut provision = json!({
        "type": "permit",
        "period": period,
        "code": [{
            "coding": c.categories.iter().map(|k| json!({ "system": CATEGORY_SYSTEM, "code": k.as_str() })).collect::<Vec<_>>()
        }],
    });
    if let Scope::Facilities(list) = &c.scope {
        provision["actor"] = json!(list.iter().map(recipient_actor).collect::<Vec<_>>());
    }
    if !c.excluded.is_empty() {
        provision["provision"] = json!(
            c.excluded
                .iter()
                .map(|code| json!({ "type": "deny", "actor": [recipient_actor(code)] }))
                .collect::<Vec<_>>()
        );
    }
    json!({
        "resourceType": "Consent",
        "identifier": [{ "system": CONSENT_ID_SYSTEM, "value": c.id }],
        "status": if c.status == Status::Withdrawn { "inactive" } else { "active" },
        "scope": { "coding": [{ "system": CONSENT_SCOPE, "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": patient_reference },
        "dateTime": time::format(c.recorded_at),
        "organization": [institution(facility)],
        "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN" }] },
        "provision": provision,
    })
}

/// This clinic's patient ID in a Patient resource, if it has one.
pub fn local_patient_id(facility: &FacilityCode, patient: &Value) -> Option<PatientId> {
    let system = patient_id_system(facility);
    patient["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == system.as_str())
        .and_then(|i| i["value"].as_str())
        .and_then(|v| v.parse().ok())
}

/// A local patient restored from this clinic's Patient on the network (a new or reset box
/// recovering the clinic's patients, whose consents then apply). The demographics are only
/// for people to recognise the patient: the kanji name (`IDE`, or a name without a
/// representation), the kana (`SYL`), `gender` and `birthDate` (kept when it is a full
/// date); what is absent stays empty (unknown). What the box cannot read as R4 says (a
/// `modifierExtension`, `implicitRules`, a gender or a date that is not one) is an error:
/// the patient is not restored, so every decision about them denies. The network ID is set
/// by the caller.
pub fn patient_from_resource(id: PatientId, r: &Value) -> Result<Patient, FhirError> {
    const WHAT: &str = "Patient";
    if r["resourceType"] != "Patient" {
        return Err(bad(WHAT, "not a Patient"));
    }
    if r.get("modifierExtension").is_some() || r.get("implicitRules").is_some() {
        return Err(bad(WHAT, "modifierExtension or implicitRules"));
    }
    let names = match r.get("name") {
        None => &[][..],
        Some(v) => v
            .as_array()
            .map(Vec::as_slice)
            .ok_or_else(|| bad(WHAT, "name is not a list"))?,
    };
    if names.iter().any(|n| n.get("modifierExtension").is_some()) {
        return Err(bad(WHAT, "a name with a modifierExtension"));
    }
    let representation = |n: &Value| -> Option<String> {
        n["extension"]
            .as_array()?
            .iter()
            .find(|e| e["url"] == EN_REPRESENTATION)
            .and_then(|e| e["valueCode"].as_str())
            .map(str::to_owned)
    };
    let parts = |n: Option<&Value>| -> (String, String) {
        let Some(n) = n else {
            return (String::new(), String::new());
        };
        let family = n["family"].as_str().unwrap_or_default().trim().to_owned();
        let given = n["given"]
            .as_array()
            .and_then(|g| g.first())
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim()
            .to_owned();
        (family, given)
    };
    let kanji = parts(
        names
            .iter()
            .find(|n| representation(n).as_deref() == Some("IDE"))
            .or_else(|| names.iter().find(|n| representation(n).is_none())),
    );
    let kana = parts(
        names
            .iter()
            .find(|n| representation(n).as_deref() == Some("SYL")),
    );
    let sex = match r.get("gender") {
        None => Sex::Unknown,
        Some(g) => g
            .as_str()
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| bad(WHAT, "gender is not an R4 administrative gender"))?,
    };
    let birth_date = match r.get("birthDate") {
        None => String::new(),
        Some(d) => {
            let d = d
                .as_str()
                .ok_or_else(|| bad(WHAT, "birthDate is not a date"))?;
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            let shape: Vec<&str> = d.split('-').collect();
            match shape.as_slice() {
                [y, m, day]
                    if y.len() == 4
                        && m.len() == 2
                        && day.len() == 2
                        && shape.iter().all(|p| digits(p)) =>
                {
                    d.to_owned()
                }
                // A year, or a year and month: valid R4, not a date of birth to show.
                [y] if y.len() == 4 && digits(y) => String::new(),
                [y, m] if y.len() == 4 && m.len() == 2 && digits(y) && digits(m) => String::new(),
                _ => return Err(bad(WHAT, "birthDate is not an R4 date")),
            }
        }
    };
    Ok(Patient {
        id,
        family_kanji: kanji.0,
        given_kanji: kanji.1,
        family_kana: kana.0,
        given_kana: kana.1,
        birth_date,
        sex,
        network_id: None,
    })
}

/// The value of the identifier with this system in a Patient resource.
pub fn identifier(patient: &Value, system: &str) -> Option<String> {
    patient["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == system)
        .and_then(|i| i["value"].as_str())
        .map(str::to_owned)
}

/// A facility of the network's directory from its `Organization` (JP Core): the one
/// 医療機関コード under [`INSTITUTION_SYSTEM`], `name` (1 to [`MAX_FACILITY_NAME`] characters,
/// no control character), and `active` (absent: active). Anything the box cannot read as R4
/// says (a `modifierExtension` anywhere, `implicitRules`, no code or two, a code that is not
/// 10 digits, no usable name) is an error: the facility is not offered by name. Its code is
/// returned with the error when it could be read.
pub fn facility_from_resource(r: &Value) -> Result<Facility, (Option<FacilityCode>, FhirError)> {
    const WHAT: &str = "Organization";
    let codes: Vec<&Value> = r["identifier"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter(|i| i["system"] == INSTITUTION_SYSTEM)
                .collect()
        })
        .unwrap_or_default();
    let code = match codes.as_slice() {
        [one] => one["value"]
            .as_str()
            .and_then(|v| FacilityCode::try_from(v).ok()),
        _ => None,
    };
    let fail = |why: &str| Err((code.clone(), bad(WHAT, why)));
    if r["resourceType"] != "Organization" {
        return fail("not an Organization");
    }
    if has_modifier_extension(r) || r.get("implicitRules").is_some() {
        return fail("a modifierExtension or implicitRules");
    }
    if codes.len() != 1 {
        return fail("not exactly one 医療機関コード identifier");
    }
    let Some(code) = code.clone() else {
        return fail("the 医療機関コード is not 10 digits");
    };
    let active = match r.get("active") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return fail("active is not a boolean"),
    };
    let name = r["name"].as_str().map(str::trim).unwrap_or_default();
    if name.is_empty()
        || name.chars().count() > MAX_FACILITY_NAME
        || name.chars().any(char::is_control)
    {
        return fail("no name, or a name that is too long or has control characters");
    }
    Ok(Facility {
        code,
        name: name.to_owned(),
        active,
    })
}

/// Whether a network ID can be carried as a DICOM PatientID (LO): 1–64 printable ASCII
/// characters, no backslash, no surrounding space.
pub fn is_network_id(value: &str) -> bool {
    crate::model::is_dicom_id(value)
}

/// Other facilities' identifiers in a Patient resource (名寄せ links).
pub fn other_identifiers(facility: &FacilityCode, patient: &Value) -> Vec<(String, String)> {
    let own = patient_id_system(facility);
    patient["identifier"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|i| Some((i["system"].as_str()?, i["value"].as_str()?)))
                .filter(|(s, _)| s.starts_with(PATIENT_ID_SYSTEM_PREFIX) && *s != own)
                .map(|(s, v)| (s.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The instant a draft or proposed consent (or one whose permitted time is denied entirely)
/// starts and ends: 9999-12-31 00:00 JST, an empty validity window that never begins.
/// Such a version denies (`not-yet-valid`) without being final: a later `active` version
/// of the same consent is applied as usual (unlike a withdrawal, which is final).
pub const NOT_IN_FORCE: Timestamp = 253_402_182_000;

/// The start of an unbounded validity (a permit without `period.start`).
const UNBOUNDED_START: Timestamp = i64::MIN / 2;

fn unreadable(why: &'static str) -> FhirError {
    bad("Consent", why)
}

/// Whether a `modifierExtension` (an extension that changes the meaning of what contains
/// it) appears anywhere in `value`.
fn has_modifier_extension(value: &Value) -> bool {
    match value {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k == "modifierExtension" || has_modifier_extension(v)),
        Value::Array(items) => items.iter().any(has_modifier_extension),
        _ => false,
    }
}

/// The facility an actor names, if it is an information recipient (role IRCP) referenced by
/// 医療機関コード; anything else is not understood.
fn recipient_facility(actor: &Value) -> Result<FacilityCode, FhirError> {
    let Some(actor) = actor.as_object() else {
        return Err(unreadable("an actor is not an object"));
    };
    if actor
        .keys()
        .any(|k| !matches!(k.as_str(), "role" | "reference" | "extension" | "id"))
    {
        return Err(unreadable(
            "an actor has elements the box does not understand",
        ));
    }
    let codings = actor
        .get("role")
        .and_then(|r| r["coding"].as_array())
        .ok_or_else(|| unreadable("an actor has no coded role"))?;
    let ircp = !codings.is_empty()
        && codings
            .iter()
            .all(|c| c["system"] == PARTICIPATION && c["code"] == "IRCP");
    if !ircp {
        return Err(unreadable(
            "an actor's role is not information recipient (IRCP)",
        ));
    }
    let reference = actor
        .get("reference")
        .and_then(Value::as_object)
        .ok_or_else(|| unreadable("an actor has no reference"))?;
    if reference.contains_key("reference") {
        return Err(unreadable(
            "an actor is referenced by a literal reference, not by 医療機関コード",
        ));
    }
    let id = &reference.get("identifier").cloned().unwrap_or(Value::Null);
    if id["system"] != INSTITUTION_SYSTEM {
        return Err(unreadable("an actor is not identified by 医療機関コード"));
    }
    id["value"]
        .as_str()
        .and_then(|v| FacilityCode::try_from(v).ok())
        .ok_or_else(|| unreadable("an actor's 医療機関コード is not valid"))
}

/// The categories a deny provision's `code`s name; every coding must be a known category.
fn denied_categories(codes: &[Value]) -> Result<BTreeSet<Category>, FhirError> {
    let mut out = BTreeSet::new();
    for concept in codes {
        let codings = concept["coding"]
            .as_array()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| unreadable("a deny provision has a code without coding"))?;
        for coding in codings {
            if coding["system"] != CATEGORY_SYSTEM {
                return Err(unreadable(
                    "a deny provision has a code of a system the box does not know",
                ));
            }
            let category = coding["code"]
                .as_str()
                .and_then(|k| k.parse::<Category>().ok())
                .ok_or_else(|| unreadable("a deny provision names an unknown data category"))?;
            out.insert(category);
        }
    }
    Ok(out)
}

/// A `dateTime` of a period, as its first second.
fn instant(v: &Value) -> Result<Option<Timestamp>, FhirError> {
    match v {
        Value::Null => Ok(None),
        Value::String(t) => time::parse(t)
            .map(Some)
            .map_err(|_| unreadable("a period has a time the box cannot read")),
        _ => Err(unreadable("a period has a time that is not a string")),
    }
}

/// The first second after a `dateTime` taken at its precision (a date covers its whole day,
/// `HH:MM` its whole minute): where a deny period ends at the earliest.
fn instant_end(v: &Value) -> Result<Option<Timestamp>, FhirError> {
    let Some(start) = instant(v)? else {
        return Ok(None);
    };
    let text = v.as_str().unwrap_or_default();
    let step = match text.split_once('T') {
        None => 86_400,
        Some((_, clock)) if clock.as_bytes().get(5) == Some(&b':') => 1,
        Some(_) => 60,
    };
    Ok(Some(start.saturating_add(step)))
}

/// Checks that a provision has only the elements the box understands.
fn only_known_elements(p: &serde_json::Map<String, Value>, deny: bool) -> Result<(), FhirError> {
    for key in p.keys() {
        match key.as_str() {
            "id" | "extension" | "type" | "period" | "actor" | "code" | "provision" => {}
            _ if deny => {
                return Err(unreadable(
                    "a deny provision is restricted by something the box does not understand (data, class, action, purpose, securityLabel, dataPeriod...)",
                ));
            }
            _ => {
                return Err(unreadable(
                    "the permit is restricted by something the box does not understand (data, class, action, purpose, securityLabel, dataPeriod...)",
                ));
            }
        }
    }
    if let Some(period) = p.get("period") {
        let Some(period) = period.as_object() else {
            return Err(unreadable("a period is not an object"));
        };
        if period
            .keys()
            .any(|k| !matches!(k.as_str(), "start" | "end" | "id" | "extension"))
        {
            return Err(unreadable(
                "a period has elements the box does not understand",
            ));
        }
    }
    Ok(())
}

/// The permitted time `[from, until)` minus the denied `[start, end)`, narrowed to one
/// interval: a deny inside the permitted time keeps only the part before it (narrower than
/// the truth, never wider).
fn narrow(
    from: Timestamp,
    until: Option<Timestamp>,
    start: Option<Timestamp>,
    end: Option<Timestamp>,
) -> (Timestamp, Option<Timestamp>) {
    let start = start.unwrap_or(i64::MIN);
    let until_or_max = until.unwrap_or(i64::MAX);
    match end {
        // The deny does not overlap the permitted time.
        Some(end) if end <= from => (from, until),
        _ if start >= until_or_max => (from, until),
        // The deny covers the start: permitted only from its end.
        Some(end) if start <= from => {
            if end >= until_or_max {
                (NOT_IN_FORCE, Some(NOT_IN_FORCE))
            } else {
                (end, until)
            }
        }
        None if start <= from => (NOT_IN_FORCE, Some(NOT_IN_FORCE)),
        // The deny starts inside: permitted only until its start.
        _ => (from, Some(start)),
    }
}

/// The consent a Consent resource describes, for `patient`. Fail closed: every valid R4
/// way of saying "no" becomes a deny, and anything the box does not fully understand is an
/// error (the caller records the resource as unreadable, which denies the patient).
///
/// | resource | consent |
/// |---|---|
/// | `status` inactive, rejected, entered-in-error (with or without `provision`) | withdrawn (final) |
/// | `status` draft, proposed | not in force: validity [`NOT_IN_FORCE`] (`not-yet-valid`), not final |
/// | other or missing `status` | unreadable |
/// | `policyRule` OPTOUT / OPTOUTE | withdrawn |
/// | `provision.type` deny (top level) | withdrawn (its exceptions are not granted) |
/// | nested deny by `actor` (IRCP, 医療機関コード) | that facility excluded |
/// | nested deny by `code` (only [`CATEGORY_SYSTEM`]) | those categories removed |
/// | nested deny by `period` | validity narrowed so the period is never permitted |
/// | nested deny by actor and code or period | the actor excluded altogether |
/// | nested deny by code and period | the categories removed altogether |
/// | nested deny with no restriction | not in force |
/// | `scope` other than patient-privacy; anything else in a provision, a nested permit, `modifierExtension`, `implicitRules`, `policy`, an unreadable period or actor | unreadable |
pub fn consent_from_resource(r: &Value, patient: PatientId) -> Result<Consent, FhirError> {
    if r["resourceType"] != "Consent" {
        return Err(unreadable("not a Consent"));
    }
    let id = r["identifier"]
        .as_array()
        .and_then(|ids| ids.iter().find(|i| i["system"] == CONSENT_ID_SYSTEM))
        .and_then(|i| i["value"].as_str())
        .or_else(|| r["id"].as_str())
        .ok_or_else(|| unreadable("no identifier"))?
        .to_owned();
    if has_modifier_extension(r) {
        return Err(unreadable(
            "a modifierExtension the box does not understand",
        ));
    }
    if r.get("implicitRules").is_some() {
        return Err(unreadable("implicitRules the box does not understand"));
    }
    if r.get("policy").is_some() {
        return Err(unreadable("a policy the box does not understand"));
    }
    // Only a privacy consent (data sharing) is the box's business; another kind (research,
    // treatment, advance directive) would otherwise become the patient's latest consent.
    let privacy = r["scope"]["coding"].as_array().is_some_and(|codings| {
        codings
            .iter()
            .any(|c| c["system"] == CONSENT_SCOPE && c["code"] == "patient-privacy")
    });
    if !privacy {
        return Err(unreadable("scope is not patient-privacy"));
    }
    let recorded_at = instant(&r["meta"]["lastUpdated"])
        .map_err(|_| unreadable("meta.lastUpdated is not a time"))?
        .unwrap_or_else(time::now);
    let nothing = |status: Status, from: Timestamp, until: Option<Timestamp>| Consent {
        id: id.clone(),
        version: 0,
        patient: patient.clone(),
        status,
        scope: Scope::Facilities(BTreeSet::new()),
        excluded: BTreeSet::new(),
        categories: BTreeSet::new(),
        valid_from: from,
        valid_until: until,
        evidence: None,
        source: Source::Network,
        recorded_at,
    };
    match r["status"].as_str() {
        Some("active") => {}
        Some("inactive" | "rejected" | "entered-in-error") => {
            return Ok(nothing(Status::Withdrawn, UNBOUNDED_START, None));
        }
        Some("draft" | "proposed") => {
            return Ok(nothing(Status::Active, NOT_IN_FORCE, Some(NOT_IN_FORCE)));
        }
        _ => return Err(unreadable("status is missing or not an R4 consent status")),
    }
    let opt_out = r["policyRule"]["coding"].as_array().is_some_and(|codings| {
        codings
            .iter()
            .any(|c| matches!(c["code"].as_str(), Some("OPTOUT" | "OPTOUTE")))
    });
    if opt_out {
        return Ok(nothing(Status::Withdrawn, UNBOUNDED_START, None));
    }
    let Some(provision) = r.get("provision").and_then(Value::as_object) else {
        return Err(unreadable("an active consent without a provision"));
    };
    match provision.get("type").and_then(Value::as_str) {
        Some("permit") => {}
        Some("deny") => return Ok(nothing(Status::Withdrawn, UNBOUNDED_START, None)),
        _ => {
            return Err(unreadable(
                "the provision's type is neither permit nor deny",
            ));
        }
    }
    only_known_elements(provision, false)?;
    let period = provision.get("period").unwrap_or(&Value::Null);
    let mut valid_from = instant(&period["start"])?.unwrap_or(UNBOUNDED_START);
    let mut valid_until = instant(&period["end"])?;
    let scope = match provision.get("actor") {
        None => Scope::AllParticipants,
        Some(Value::Array(actors)) if actors.is_empty() => Scope::AllParticipants,
        Some(Value::Array(actors)) => Scope::Facilities(
            actors
                .iter()
                .map(recipient_facility)
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => return Err(unreadable("provision.actor is not a list")),
    };
    let mut categories: BTreeSet<Category> = match provision.get("code") {
        None => BTreeSet::new(),
        Some(Value::Array(codes)) => codes
            .iter()
            .flat_map(|c| c["coding"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["system"] == CATEGORY_SYSTEM)
            .filter_map(|c| c["code"].as_str().and_then(|k| k.parse().ok()))
            .collect(),
        Some(_) => return Err(unreadable("provision.code is not a list")),
    };
    let mut excluded = BTreeSet::new();
    let nested = match provision.get("provision") {
        None => Vec::new(),
        Some(Value::Array(nested)) => nested.clone(),
        Some(_) => return Err(unreadable("provision.provision is not a list")),
    };
    for p in &nested {
        let Some(p) = p.as_object() else {
            return Err(unreadable("a nested provision is not an object"));
        };
        match p.get("type").and_then(Value::as_str) {
            Some("deny") => {}
            Some("permit") => {
                return Err(unreadable(
                    "a nested permit (its meaning under a permit is not defined well enough)",
                ));
            }
            _ => {
                return Err(unreadable(
                    "a nested provision's type is neither permit nor deny",
                ));
            }
        }
        only_known_elements(p, true)?;
        let actors = match p.get("actor") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(unreadable("a deny provision's actor is not a list")),
        };
        let codes = match p.get("code") {
            None => Vec::new(),
            Some(Value::Array(c)) => c.clone(),
            Some(_) => return Err(unreadable("a deny provision's code is not a list")),
        };
        let period = p.get("period").unwrap_or(&Value::Null);
        let (start, end) = (instant(&period["start"])?, instant_end(&period["end"])?);
        let has_period = start.is_some() || end.is_some() || p.contains_key("period");
        // Each deny is represented by the broadest of its restrictions the box can express,
        // which covers at least what the deny covers: the actor (for every category and
        // time), else the categories (for all time), else the period.
        if !actors.is_empty() {
            for actor in &actors {
                excluded.insert(recipient_facility(actor)?);
            }
            // Still check the codes: a deny the box cannot read is unreadable as a whole.
            denied_categories(&codes)?;
        } else if !codes.is_empty() {
            for category in denied_categories(&codes)? {
                categories.remove(&category);
            }
        } else if has_period {
            (valid_from, valid_until) = narrow(valid_from, valid_until, start, end);
        } else {
            // A deny with no restriction denies everything.
            (valid_from, valid_until) = (NOT_IN_FORCE, Some(NOT_IN_FORCE));
        }
    }
    Ok(Consent {
        id,
        version: 0, // the store assigns the local version
        patient,
        status: Status::Active,
        scope,
        excluded,
        categories,
        valid_from,
        valid_until,
        evidence: None,
        source: Source::Network,
        recorded_at,
    })
}

/// Whether two versions say the same thing (ignoring version, source, times, evidence).
pub fn same_terms(a: &Consent, b: &Consent) -> bool {
    a.status == b.status
        && a.scope == b.scope
        && a.excluded == b.excluded
        && a.categories == b.categories
        && a.valid_from == b.valid_from
        && a.valid_until == b.valid_until
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consent_survives_the_round_trip_through_fhir() {
        let c = Consent {
            id: "c-0123".into(),
            version: 3,
            patient: "0001234".parse().unwrap(),
            status: Status::Active,
            scope: Scope::Facilities([fac("1312345679"), fac("0112345678")].into()),
            excluded: [fac("2732345678")].into(),
            categories: [Category::Images, Category::LabResults].into(),
            valid_from: 1_795_273_200,
            valid_until: Some(1_800_000_000),
            evidence: None,
            source: Source::Local,
            recorded_at: 1_795_273_200,
        };
        let r = consent_resource(&fac("1312345678"), &c, "Patient/p1");
        let back = consent_from_resource(&r, c.patient.clone()).unwrap();
        assert!(same_terms(&c, &back), "{back:?}");
        assert_eq!(back.id, "c-0123");
        let withdrawn = Consent {
            status: Status::Withdrawn,
            scope: Scope::AllParticipants,
            excluded: BTreeSet::new(),
            ..c
        };
        let r = consent_resource(&fac("1312345678"), &withdrawn, "Patient/p1");
        assert_eq!(r["status"], "inactive");
        assert!(r["provision"].get("actor").is_none());
        let back = consent_from_resource(&r, withdrawn.patient.clone()).unwrap();
        assert_eq!(back.status, Status::Withdrawn);
        assert_eq!(back.id, "c-0123");
    }

    /// Found by the `fhir_resource` fuzz target (issue 14): a network permit without
    /// `period.start` is valid from the unbounded start, which the box wrote back as a year
    /// of twelve digits that nobody (the box included) can read. It is written as no start.
    #[test]
    fn a_permit_without_a_start_is_written_without_one_and_reads_back_the_same() {
        let resource = json!({
            "resourceType": "Consent", "id": "srv-1",
            "meta": { "versionId": "3", "lastUpdated": "2026-11-22T04:05:00Z" },
            "status": "active",
            "scope": { "coding": [{ "system": CONSENT_SCOPE, "code": "patient-privacy" }] },
            "patient": { "reference": "Patient/p1" },
            "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN" }] },
            "provision": { "type": "permit", "code": [{ "coding": [{ "system": CATEGORY_SYSTEM, "code": "images" }] }] },
        });
        let patient: PatientId = "0000012345".parse().unwrap();
        let c = consent_from_resource(&resource, patient.clone()).unwrap();
        assert_eq!(c.valid_from, UNBOUNDED_START);
        let written = consent_resource(&fac("1312345678"), &c, "Patient/p1");
        assert!(
            written["provision"]["period"].get("start").is_none(),
            "{written}"
        );
        let back = consent_from_resource(&written, patient).unwrap();
        assert!(same_terms(&c, &back), "{back:?}");
    }

    fn fac(c: &str) -> FacilityCode {
        FacilityCode::try_from(c).unwrap()
    }

    /// A network consent: permit from 2026-11-01 to all participants for images and lab
    /// results, with `change` applied.
    fn network(change: impl FnOnce(&mut Value)) -> Result<Consent, FhirError> {
        let mut r = json!({
            "resourceType": "Consent",
            "id": "srv-1",
            "meta": { "versionId": "3", "lastUpdated": "2026-11-22T04:05:00.123456Z" },
            "status": "active",
            "scope": { "coding": [{ "system": CONSENT_SCOPE, "code": "patient-privacy" }] },
            "patient": { "reference": "Patient/p1" },
            "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN" }] },
            "provision": {
                "type": "permit",
                "period": { "start": "2026-11-01" },
                "code": [{ "coding": [
                    { "system": CATEGORY_SYSTEM, "code": "images" },
                    { "system": CATEGORY_SYSTEM, "code": "lab-results" }
                ] }]
            }
        });
        change(&mut r);
        consent_from_resource(&r, "0001234".parse().unwrap())
    }

    fn deny(extra: Value) -> impl FnOnce(&mut Value) {
        move |r: &mut Value| {
            let mut p = json!({ "type": "deny" });
            if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
                p.extend(extra.clone());
            }
            r["provision"]["provision"] = json!([p]);
        }
    }

    fn ircp(code: &str) -> Value {
        recipient_actor(&fac(code))
    }

    fn t(text: &str) -> Timestamp {
        time::parse(text).unwrap()
    }

    #[test]
    fn an_active_permit_maps_to_its_terms() {
        let c = network(|_| {}).unwrap();
        assert_eq!(c.status, Status::Active);
        assert_eq!(c.id, "srv-1");
        assert_eq!(c.scope, Scope::AllParticipants);
        assert_eq!(
            c.categories,
            [Category::Images, Category::LabResults].into()
        );
        assert_eq!((c.valid_from, c.valid_until), (t("2026-11-01"), None));
    }

    #[test]
    fn inactive_rejected_and_entered_in_error_are_withdrawals_with_or_without_provision() {
        for status in ["inactive", "rejected", "entered-in-error"] {
            for keep_provision in [true, false] {
                let c = network(|r| {
                    r["status"] = json!(status);
                    if !keep_provision {
                        r.as_object_mut().unwrap().remove("provision");
                    }
                })
                .unwrap();
                assert_eq!(c.status, Status::Withdrawn, "{status} {keep_provision}");
                assert!(c.categories.is_empty());
            }
        }
    }

    #[test]
    fn draft_and_proposed_are_not_in_force_but_not_final() {
        for status in ["draft", "proposed"] {
            let c = network(|r| r["status"] = json!(status)).unwrap();
            assert_eq!(c.status, Status::Active, "not a withdrawal: not final");
            assert_eq!(
                (c.valid_from, c.valid_until),
                (NOT_IN_FORCE, Some(NOT_IN_FORCE))
            );
            assert!(c.categories.is_empty());
        }
        assert_eq!(time::format(NOT_IN_FORCE), "9999-12-31T00:00:00+09:00");
    }

    #[test]
    fn unknown_or_missing_status_is_unreadable() {
        assert!(network(|r| r["status"] = json!("revoked")).is_err());
        assert!(
            network(|r| {
                r.as_object_mut().unwrap().remove("status");
            })
            .is_err()
        );
    }

    #[test]
    fn a_top_level_deny_and_an_opt_out_are_withdrawals() {
        let c = network(|r| r["provision"]["type"] = json!("deny")).unwrap();
        assert_eq!(c.status, Status::Withdrawn);
        let c = network(|r| r["policyRule"]["coding"][0]["code"] = json!("OPTOUT")).unwrap();
        assert_eq!(c.status, Status::Withdrawn);
        assert!(network(|r| r["provision"]["type"] = json!("maybe")).is_err());
    }

    #[test]
    fn a_nested_deny_by_category_removes_it() {
        let c = network(deny(
            json!({ "code": [{ "coding": [{ "system": CATEGORY_SYSTEM, "code": "images" }] }] }),
        ))
        .unwrap();
        assert_eq!(c.categories, [Category::LabResults].into());
        // A code of another system, or an unknown category: unreadable.
        assert!(network(deny(json!({ "code": [{ "coding": [{ "system": "http://loinc.org", "code": "18748-4" }] }] }))).is_err());
        assert!(
            network(deny(
                json!({ "code": [{ "coding": [{ "system": CATEGORY_SYSTEM, "code": "genome" }] }] })
            ))
            .is_err()
        );
    }

    #[test]
    fn a_nested_deny_by_period_is_never_permitted() {
        // Covering the start: permitted from the end of the deny (a date covers its day).
        let c = network(deny(
            json!({ "period": { "start": "2026-10-01", "end": "2026-11-30" } }),
        ))
        .unwrap();
        assert_eq!((c.valid_from, c.valid_until), (t("2026-12-01"), None));
        // Inside: only the part before it stays permitted (narrower, never wider).
        let c = network(deny(
            json!({ "period": { "start": "2026-12-01T10:00:00+09:00", "end": "2026-12-02" } }),
        ))
        .unwrap();
        assert_eq!(
            (c.valid_from, c.valid_until),
            (t("2026-11-01"), Some(t("2026-12-01T10:00:00+09:00")))
        );
        // Open-ended from before the start: never in force.
        let c = network(deny(json!({ "period": { "start": "2026-01-01" } }))).unwrap();
        assert_eq!(
            (c.valid_from, c.valid_until),
            (NOT_IN_FORCE, Some(NOT_IN_FORCE))
        );
        // Entirely before: nothing changes.
        let c = network(deny(json!({ "period": { "end": "2026-10-01T12:30" } }))).unwrap();
        assert_eq!((c.valid_from, c.valid_until), (t("2026-11-01"), None));
        // A minute-precision end covers the whole minute.
        let c = network(deny(json!({ "period": { "end": "2026-11-01T12:30" } }))).unwrap();
        assert_eq!(c.valid_from, t("2026-11-01T12:31"));
        // Unreadable times: the whole resource is unreadable.
        assert!(network(deny(json!({ "period": { "start": "2026" } }))).is_err());
        assert!(network(|r| r["provision"]["period"]["end"] = json!("soon")).is_err());
    }

    #[test]
    fn a_nested_deny_by_actor_and_code_excludes_the_actor() {
        let c = network(deny(json!({
            "actor": [ircp("1312345679")],
            "code": [{ "coding": [{ "system": CATEGORY_SYSTEM, "code": "images" }] }]
        })))
        .unwrap();
        assert_eq!(c.excluded, [fac("1312345679")].into());
        assert_eq!(
            c.categories,
            [Category::Images, Category::LabResults].into()
        );
        let c = network(deny(
            json!({ "actor": [ircp("1312345679")], "period": { "start": "2026-12-01" } }),
        ))
        .unwrap();
        assert_eq!(c.excluded, [fac("1312345679")].into());
        assert_eq!(c.valid_until, None);
    }

    #[test]
    fn anything_not_understood_is_unreadable() {
        for element in [
            "data",
            "class",
            "action",
            "purpose",
            "securityLabel",
            "dataPeriod",
        ] {
            let value = json!([{}]);
            assert!(
                network(deny(json!({ element: value.clone() }))).is_err(),
                "deny {element}"
            );
            assert!(
                network(|r| r["provision"][element] = value).is_err(),
                "permit {element}"
            );
        }
        assert!(
            network(|r| r["modifierExtension"] = json!([{ "url": "urn:x", "valueBoolean": true }]))
                .is_err()
        );
        assert!(
            network(|r| r["provision"]["modifierExtension"] =
                json!([{ "url": "urn:x", "valueBoolean": true }]))
            .is_err()
        );
        assert!(network(|r| r["implicitRules"] = json!("urn:rules")).is_err());
        // A consent of another kind (research) is not the box's: unreadable, not a permit.
        assert!(network(|r| r["scope"]["coding"][0]["code"] = json!("research")).is_err());
        assert!(
            network(|r| {
                r.as_object_mut().unwrap().remove("scope");
            })
            .is_err()
        );
        // A permit to an actor the box cannot name, or in another role.
        let mut org = ircp("1312345679");
        org["reference"] = json!({ "reference": "Organization/7" });
        assert!(network(|r| r["provision"]["actor"] = json!([org])).is_err());
        let mut author = ircp("1312345679");
        author["role"]["coding"][0]["code"] = json!("AUT");
        assert!(network(|r| r["provision"]["actor"] = json!([author])).is_err());
        let mut bad_code = ircp("1312345679");
        bad_code["reference"]["identifier"]["value"] = json!("12345");
        assert!(network(deny(json!({ "actor": [bad_code] }))).is_err());
        // A nested permit.
        assert!(
            network(|r| r["provision"]["provision"] =
                json!([{ "type": "permit", "actor": [ircp("1312345679")] }]))
            .is_err()
        );
        // An active consent without a provision.
        assert!(
            network(|r| {
                r.as_object_mut().unwrap().remove("provision");
            })
            .is_err()
        );
    }

    #[test]
    fn a_facility_is_read_from_its_organization_and_anything_else_is_refused_with_its_code() {
        let org = |change: fn(&mut Value)| {
            let mut r = json!({
                "resourceType": "Organization",
                "identifier": [
                    { "system": "urn:other", "value": "x" },
                    { "system": INSTITUTION_SYSTEM, "value": "1312345670" }
                ],
                "name": " 東京第一病院 ",
            });
            change(&mut r);
            facility_from_resource(&r)
        };
        assert_eq!(
            org(|_| {}).unwrap(),
            Facility {
                code: fac("1312345670"),
                name: "東京第一病院".into(),
                active: true
            }
        );
        assert!(!org(|r| r["active"] = json!(false)).unwrap().active);
        let refused: [fn(&mut Value); 7] = [
            |r| r["active"] = json!("no"),
            |r| r["name"] = json!(""),
            |r| r["name"] = json!("改行\nのある名前"),
            |r| r["name"] = json!("長".repeat(MAX_FACILITY_NAME + 1)),
            |r| r["implicitRules"] = json!("urn:x"),
            |r| {
                r["contact"] =
                    json!([{ "modifierExtension": [{ "url": "urn:x", "valueBoolean": true }] }])
            },
            |r| r["resourceType"] = json!("Patient"),
        ];
        for change in refused {
            let (code, _) = org(change).unwrap_err();
            assert_eq!(code, Some(fac("1312345670")), "the code is still named");
        }
        let (code, _) = org(|r| r["identifier"][1]["value"] = json!("131234567")).unwrap_err();
        assert_eq!(code, None);
        let (code, _) = org(|r| {
            r["identifier"][0] = json!({ "system": INSTITUTION_SYSTEM, "value": "1312345671" })
        })
        .unwrap_err();
        assert_eq!(code, None, "two codes: neither is the facility's");
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop_oneof![
                Just("deny".to_owned()),
                Just("permit".to_owned()),
                Just("2026-11-22".to_owned()),
                Just("2026-11-22T04:05".to_owned()),
                Just("9999-12-31T23:59:59+14:00".to_owned()),
                Just("0000-01-01T00:00:00-14:00".to_owned()),
                Just(CATEGORY_SYSTEM.to_owned()),
                Just(INSTITUTION_SYSTEM.to_owned()),
                Just("IRCP".to_owned()),
                "\\PC{0,12}",
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            let key = prop_oneof![
                Just("type"),
                Just("period"),
                Just("start"),
                Just("end"),
                Just("actor"),
                Just("code"),
                Just("coding"),
                Just("system"),
                Just("role"),
                Just("reference"),
                Just("identifier"),
                Just("value"),
                Just("provision"),
                Just("status"),
                Just("scope"),
                Just("policyRule"),
                Just("meta"),
                Just("lastUpdated"),
                Just("data"),
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map(key.prop_map(str::to_owned), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// Whatever the network sends, the mapping answers (a consent or an error) and
        /// never panics.
        #[test]
        fn any_provision_or_resource_maps_or_is_refused_without_panicking(
            provision in any_json(),
            period in any_json(),
            status in any_json(),
            resource in any_json(),
        ) {
            let _ = network(|r| {
                r["provision"] = provision;
                r["status"] = status;
            });
            let _ = network(|r| r["provision"]["provision"] = serde_json::json!([{"type": "deny", "period": period}]));
            let _ = consent_from_resource(&resource, "0001234".parse().unwrap());
        }
    }

    #[test]
    fn a_nested_deny_without_restriction_denies_everything() {
        let c = network(deny(json!({}))).unwrap();
        assert_eq!(
            (c.valid_from, c.valid_until),
            (NOT_IN_FORCE, Some(NOT_IN_FORCE))
        );
    }
}
