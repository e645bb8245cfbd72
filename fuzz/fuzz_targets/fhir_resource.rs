//! The FHIR mapping of network resources to the box's model (`consent::fhir`), from the
//! JSON bytes the network's server sends: Consent (`consent_from_resource`), Patient
//! (`local_patient_id`, `identifier`, `other_identifiers`, `is_network_id`) and the audit
//! checkpoint (`checkpoint_from_resource`). Never panics, and fails closed: a resource that
//! is not a Consent, or carries a `modifierExtension`, `implicitRules` or `policy`, is never
//! read as a consent; one that is read, written back as the box writes consents, is read
//! with the same terms.
//!
//! The facility and patient are synthetic test values.
#![no_main]

use consent::fhir;
use consent::model::PatientId;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tsunagi_config::FacilityCode;

fuzz_target!(|data: &[u8]| {
    let Ok(resource) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let facility = FacilityCode::try_from(String::from("1310000019")).expect("valid code");
    let patient: PatientId = "0000012345".parse().expect("valid ID");

    let _ = fhir::local_patient_id(&facility, &resource);
    let _ = fhir::other_identifiers(&facility, &resource);
    if let Some(id) = fhir::identifier(&resource, "urn:oid:1.2.3.4.5") {
        let _ = fhir::is_network_id(&id);
    }
    let _ = fhir::checkpoint_from_resource(&facility, &resource);

    let Ok(consent) = fhir::consent_from_resource(&resource, patient.clone()) else {
        return;
    };
    assert_eq!(resource["resourceType"], "Consent");
    for forbidden in ["modifierExtension", "implicitRules", "policy"] {
        assert!(
            resource.get(forbidden).is_none(),
            "{forbidden} was accepted"
        );
    }
    let written = fhir::consent_resource(&facility, &consent, "Patient/1");
    let again = fhir::consent_from_resource(&written, patient).expect("our own Consent reads");
    assert!(
        fhir::same_terms(&consent, &again),
        "written and read back with other terms"
    );
});
