//! The patient-ID rewrite (`dicom_bridge::translate`), on whole data sets:
//! * `rewrite`: the output (the new head, then the original from `rest_from`) parses again
//!   with the header reader; its PatientID is the network ID; only the ID elements
//!   (PatientID, IssuerOfPatientID, IssuerOfPatientIDQualifiersSequence,
//!   OtherPatientIDsSequence, and the retired group length (0010,0000), which is dropped)
//!   differ; every other top-level element is byte-identical and in the same order.
//! * `restore`: the same, with the clinic's ID and without the issuer and its qualifiers.
//! * `with_elements` and `text_value` (query identifiers) never panic.
//!
//! Input: one flag byte (bit 0: explicit VR), then the data set. The identities are
//! synthetic test values.
#![no_main]

use dicom_bridge::header::{self, Element};
use dicom_bridge::translate::{self, Identity, Rewritten};
use libfuzzer_sys::fuzz_target;

const PATIENT_ID: u32 = 0x0010_0020;
const ID_TAGS: [u32; 5] = [
    0x0010_0000,
    PATIENT_ID,
    0x0010_0021,
    0x0010_0024,
    0x0010_1002,
];

/// The top-level elements other than the ID elements, as (tag, bytes).
fn others<'a>(data: &'a [u8], elements: &[Element]) -> Vec<(u32, &'a [u8])> {
    elements
        .iter()
        .filter(|e| !ID_TAGS.contains(&e.tag))
        .map(|e| (e.tag, &data[e.start..e.end]))
        .collect()
}

/// `last`: the last tag the rewrite reads (its head holds the elements up to it).
fn check(ds: &[u8], explicit: bool, last: u32, rewritten: &Rewritten, patient_id: &str) {
    let rest_from = usize::try_from(rewritten.rest_from).expect("fits");
    assert!(rest_from <= ds.len());
    let head = &rewritten.head;

    // The head alone: whole elements, the same others as the input's up to `last`.
    let (before, boundary) = header::elements_until(ds, explicit, last, true)
        .expect("the rewrite accepted the input's start");
    assert_eq!(boundary, rest_from);
    let (after, end) =
        header::elements_until(head, explicit, u32::MAX, true).expect("the new head parses again");
    assert_eq!(end, head.len());
    assert_eq!(
        others(ds, &before),
        others(head, &after),
        "only the ID elements change"
    );
    let id = after
        .iter()
        .find(|e| e.tag == PATIENT_ID)
        .expect("the head has a PatientID");
    let value = String::from_utf8_lossy(&head[id.value_start..id.end]);
    assert_eq!(value.trim_end(), patient_id);

    // The whole output, when the whole input parses.
    let mut out = head.clone();
    out.extend_from_slice(&ds[rest_from..]);
    if let Ok((before, _)) = header::elements_until(ds, explicit, u32::MAX, true) {
        let (after, end) = header::elements_until(&out, explicit, u32::MAX, true)
            .expect("the rewritten data set parses again");
        assert_eq!(end, out.len());
        assert_eq!(
            others(ds, &before),
            others(&out, &after),
            "only the ID elements change"
        );
    }
    if let Ok(old) = header::read(ds, explicit) {
        let new = header::read(&out, explicit).expect("the header reader reads the output");
        assert_eq!(new.patient_id.as_deref(), Some(patient_id));
        assert_eq!(new.specific_character_set, old.specific_character_set);
        assert_eq!(new.sop_class, old.sop_class);
        assert_eq!(new.sop_instance, old.sop_instance);
        assert_eq!(new.patient_name_raw, old.patient_name_raw);
        assert_eq!(new.study_instance, old.study_instance);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, ds)) = data.split_first() else {
        return;
    };
    let explicit = flags & 1 == 1;
    let ids = Identity {
        network_id: "NET-0001".into(),
        network_issuer: "TESTNET".into(),
        network_oid: "1.2.3.4.5".into(),
        local_id: "12345".into(),
        facility_code: "1310000019".into(),
    };
    if let Ok(rewritten) = translate::rewrite(ds, explicit, true, &ids) {
        check(ds, explicit, 0x0010_1002, &rewritten, &ids.network_id);
    }
    if let Ok(restored) = translate::restore(ds, explicit, true, &ids.local_id) {
        check(ds, explicit, 0x0010_0024, &restored, &ids.local_id);
    }
    let _ = translate::text_value(ds, explicit, PATIENT_ID);
    let _ = translate::with_elements(
        ds,
        explicit,
        &[
            (PATIENT_ID, *b"LO", Some(ids.network_id.as_str())),
            (0x0008_0052, *b"CS", None),
        ],
    );
});
