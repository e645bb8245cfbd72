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

use std::collections::BTreeSet;

use serde_json::{Value, json};
use tsunagi_config::FacilityCode;

use crate::model::{
    Category, Consent, Link, PATIENT_ID_SYSTEM_PREFIX, Patient, PatientId, Scope, Sex, Source,
    Status, patient_id_system,
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
    period.insert("start".into(), json!(time::format(c.valid_from)));
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
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
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

/// The value of the identifier with this system in a Patient resource.
pub fn identifier(patient: &Value, system: &str) -> Option<String> {
    patient["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == system)
        .and_then(|i| i["value"].as_str())
        .map(str::to_owned)
}

/// Whether a network ID can be carried as a DICOM PatientID (LO): 1–64 printable ASCII
/// characters, no backslash, no surrounding space.
pub fn is_network_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'\\')
        && !value.starts_with(' ')
        && !value.ends_with(' ')
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

fn facility_of(actor: &Value) -> Option<FacilityCode> {
    let id = &actor["reference"]["identifier"];
    (id["system"] == INSTITUTION_SYSTEM)
        .then(|| id["value"].as_str())
        .flatten()
        .and_then(|v| FacilityCode::try_from(v).ok())
}

/// The consent a Consent resource describes, for `patient`.
pub fn consent_from_resource(r: &Value, patient: PatientId) -> Result<Consent, FhirError> {
    let id = r["identifier"]
        .as_array()
        .and_then(|ids| ids.iter().find(|i| i["system"] == CONSENT_ID_SYSTEM))
        .and_then(|i| i["value"].as_str())
        .or_else(|| r["id"].as_str())
        .ok_or_else(|| bad("Consent", "no identifier"))?
        .to_owned();
    let status = match r["status"].as_str() {
        Some("active") => Status::Active,
        Some("inactive" | "rejected" | "entered-in-error") => Status::Withdrawn,
        other => return Err(bad("Consent", format!("status {other:?}"))),
    };
    let provision = &r["provision"];
    if provision["type"] != "permit" {
        return Err(bad("Consent", "the top provision is not a permit"));
    }
    let when = |v: &Value| -> Result<Option<Timestamp>, FhirError> {
        v.as_str()
            .map(|t| time::parse(t).map_err(|e| bad("Consent", e.to_string())))
            .transpose()
    };
    let valid_from = when(&provision["period"]["start"])?.unwrap_or(i64::MIN / 2);
    let valid_until = when(&provision["period"]["end"])?;
    let scope = match provision["actor"].as_array() {
        None => Scope::AllParticipants,
        Some(actors) if actors.is_empty() => Scope::AllParticipants,
        Some(actors) => Scope::Facilities(actors.iter().filter_map(facility_of).collect()),
    };
    let excluded: BTreeSet<FacilityCode> = provision["provision"]
        .as_array()
        .map(|nested| {
            nested
                .iter()
                .filter(|p| p["type"] == "deny")
                .flat_map(|p| p["actor"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| facility_of(&a))
                .collect()
        })
        .unwrap_or_default();
    let categories: BTreeSet<Category> = provision["code"]
        .as_array()
        .map(|codes| {
            codes
                .iter()
                .flat_map(|c| c["coding"].as_array().cloned().unwrap_or_default())
                .filter(|c| c["system"] == CATEGORY_SYSTEM)
                .filter_map(|c| c["code"].as_str().and_then(|k| k.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    let recorded_at = when(&r["meta"]["lastUpdated"])?.unwrap_or_else(time::now);
    Ok(Consent {
        id,
        version: 0, // the store assigns the local version
        patient,
        status,
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
        let fac = |c: &str| FacilityCode::try_from(c).unwrap();
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
        assert!(same_terms(
            &withdrawn,
            &consent_from_resource(&r, withdrawn.patient.clone()).unwrap()
        ));
    }
}
