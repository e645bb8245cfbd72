use super::*;
use crate::header::elements_until;

fn el(explicit: bool, tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    Encoder { explicit }.element(tag, vr, &v)
}

/// An undefined-length sequence with one undefined-length item.
fn undefined_sequence(explicit: bool, tag: u32, item: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::tag(&mut out, tag);
    if explicit {
        out.extend_from_slice(b"SQ\0\0");
    }
    out.extend_from_slice(&u32::MAX.to_le_bytes());
    Encoder::tag(&mut out, 0xFFFE_E000);
    out.extend_from_slice(&u32::MAX.to_le_bytes());
    out.extend_from_slice(item);
    Encoder::tag(&mut out, 0xFFFE_E00D);
    out.extend_from_slice(&0u32.to_le_bytes());
    Encoder::tag(&mut out, 0xFFFE_E0DD);
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// `ESC $ B` 山田 `ESC ( B` ^ ... as DICOM writes ISO 2022 IR 87 names.
const NAME: &[u8] = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B";

fn ids() -> Identity {
    Identity {
        network_id: "TKY0000042".into(),
        network_issuer: "TOKYO-NET".into(),
        network_oid: "1.2.392.999.1".into(),
        local_id: "0001234".into(),
        facility_code: "1312345678".into(),
    }
}

fn data_set(explicit: bool, extra_patient: &[Vec<u8>]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend(el(explicit, 0x0008_0005, b"CS", b"\\ISO 2022 IR 87"));
    d.extend(el(
        explicit,
        0x0008_0016,
        b"UI",
        b"1.2.840.10008.5.1.4.1.1.2",
    ));
    d.extend(el(explicit, 0x0008_0018, b"UI", b"1.2.3.4.5"));
    d.extend(undefined_sequence(
        explicit,
        0x0008_1110,
        &el(explicit, 0x0008_1155, b"UI", b"1.2.3"),
    ));
    d.extend(el(explicit, 0x0010_0010, b"PN", NAME));
    d.extend(el(explicit, 0x0010_0020, b"LO", b"0001234"));
    for x in extra_patient {
        d.extend_from_slice(x);
    }
    d.extend(el(explicit, 0x0010_0030, b"DA", b"19700101"));
    d.extend(el(explicit, 0x0020_000D, b"UI", b"1.2.3.4"));
    d.extend(el(explicit, 0x7FE0_0010, b"OB", &[7u8; 1000]));
    d
}

fn value(all: &[u8], explicit: bool, tag: u32) -> Vec<u8> {
    let (els, _) = elements_until(all, explicit, u32::MAX, true).unwrap();
    let x = els.iter().find(|x| x.tag == tag).unwrap();
    all[x.value_start..x.end].to_vec()
}

fn translated(original: &[u8], explicit: bool) -> Vec<u8> {
    let r = rewrite(original, explicit, true, &ids()).unwrap();
    let mut all = r.head.clone();
    all.extend_from_slice(&original[usize::try_from(r.rest_from).unwrap()..]);
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_patient_id_becomes_the_network_id_and_the_rest_is_untouched() {
    for explicit in [true, false] {
        let original = data_set(explicit, &[]);
        let all = translated(&original, explicit);
        assert_eq!(value(&all, explicit, PATIENT_ID), b"TKY0000042");
        assert_eq!(value(&all, explicit, ISSUER), b"TOKYO-NET ");
        let q = value(&all, explicit, QUALIFIERS);
        assert!(contains(&q, b"1.2.392.999.1"), "{explicit}");
        assert!(contains(&q, b"ISO "), "{explicit}");
        let other = value(&all, explicit, OTHER_IDS);
        assert!(contains(&other, b"0001234 "), "{explicit}");
        assert!(contains(&other, b"1312345678"), "{explicit}");
        assert!(contains(&other, b"1.2.392.100495.20.3.51.11312345678"));
        assert!(contains(&other, b"TEXT"));
        // Byte for byte: the name (ISO 2022 IR 87), the elements before and after, pixels.
        assert_eq!(value(&all, explicit, 0x0010_0010), NAME);
        let (orig_els, _) = elements_until(&original, explicit, u32::MAX, true).unwrap();
        let (new_els, _) = elements_until(&all, explicit, u32::MAX, true).unwrap();
        for o in orig_els.iter().filter(|x| x.tag != PATIENT_ID) {
            let n = new_els.iter().find(|x| x.tag == o.tag).unwrap();
            assert_eq!(
                &original[o.start..o.end],
                &all[n.start..n.end],
                "{:08X}",
                o.tag
            );
        }
        let tags: Vec<u32> = new_els.iter().map(|x| x.tag).collect();
        let mut sorted = tags.clone();
        sorted.sort_unstable();
        assert_eq!(tags, sorted, "ascending order");
        // The rest is sent from the original: everything after (0010,1002).
        let r = rewrite(&original, explicit, true, &ids()).unwrap();
        let study = orig_els.iter().find(|x| x.tag == 0x0020_000D).unwrap();
        assert_eq!(r.rest_from, study.start as u64);
    }
}

#[test]
fn existing_other_ids_are_kept_and_a_group_length_is_dropped() {
    for explicit in [true, false] {
        let earlier = undefined_sequence(
            explicit,
            OTHER_IDS,
            &el(explicit, PATIENT_ID, b"LO", b"HOSP-99"),
        );
        let mut original = Vec::new();
        original.extend(el(explicit, 0x0008_0018, b"UI", b"1.2.3.4.5"));
        original.extend(el(explicit, GROUP_LENGTH, b"UL", &20u32.to_le_bytes()));
        original.extend(el(explicit, PATIENT_ID, b"LO", b"0001234"));
        original.extend(el(explicit, ISSUER, b"LO", b"SOMEONE"));
        original.extend(earlier);
        original.extend(el(explicit, 0x7FE0_0010, b"OB", &[1u8; 10]));
        let all = translated(&original, explicit);
        let (els, _) = elements_until(&all, explicit, u32::MAX, true).unwrap();
        assert!(!els.iter().any(|x| x.tag == GROUP_LENGTH));
        assert_eq!(els.iter().filter(|x| x.tag == ISSUER).count(), 1);
        assert_eq!(value(&all, explicit, ISSUER), b"TOKYO-NET ");
        let other = value(&all, explicit, OTHER_IDS);
        assert!(contains(&other, b"HOSP-99 "), "the earlier item is kept");
        assert!(contains(&other, b"0001234 "), "ours is added");
        assert!(other.find_item_end_is_sane());
    }
}

trait Sane {
    fn find_item_end_is_sane(&self) -> bool;
}

impl Sane for Vec<u8> {
    /// No sequence delimiter of the earlier undefined-length sequence is left inside.
    fn find_item_end_is_sane(&self) -> bool {
        !contains(self, &[0xFE, 0xFF, 0xDD, 0xE0])
    }
}

#[test]
fn patient_elements_beyond_the_prefix_or_bad_values_are_refused() {
    let original = data_set(true, &[]);
    let cut = &original[..60];
    assert!(matches!(
        rewrite(cut, true, false, &ids()),
        Err(TranslateError::TooFar(60))
    ));
    let mut bad = ids();
    bad.network_id = "山田".into();
    assert_eq!(
        rewrite(&original, true, true, &bad),
        Err(TranslateError::BadValue("the network ID"))
    );
    bad.network_id = "A\\B".into();
    assert!(rewrite(&original, true, true, &bad).is_err());
    assert_eq!(data_set_is_explicit("1.2.840.10008.1.2"), Some(false));
    assert_eq!(data_set_is_explicit("1.2.840.10008.1.2.4.50"), Some(true));
    assert_eq!(data_set_is_explicit("1.2.840.10008.1.2.1.99"), None);
}

#[test]
fn a_data_set_without_a_patient_id_gets_one() {
    let mut original = Vec::new();
    original.extend(el(true, 0x0008_0018, b"UI", b"1.2.3.4.5"));
    let all = translated(&original, true);
    assert_eq!(value(&all, true, PATIENT_ID), b"TKY0000042");
}

#[test]
fn the_way_back_gives_the_clinic_its_id_and_keeps_the_rest() {
    for explicit in [true, false] {
        let original = data_set(explicit, &[]);
        let there = translated(&original, explicit);
        let r = restore(&there, explicit, true, "0001234").unwrap();
        let mut back = r.head.clone();
        back.extend_from_slice(&there[usize::try_from(r.rest_from).unwrap()..]);
        assert_eq!(value(&back, explicit, PATIENT_ID), b"0001234 ");
        let (els, _) = elements_until(&back, explicit, u32::MAX, true).unwrap();
        assert!(!els.iter().any(|x| x.tag == ISSUER || x.tag == QUALIFIERS));
        assert_eq!(value(&back, explicit, 0x0010_0010), NAME);
        assert_eq!(
            value(&back, explicit, OTHER_IDS),
            value(&there, explicit, OTHER_IDS)
        );
        assert_eq!(
            value(&back, explicit, 0x7FE0_0010),
            value(&original, explicit, 0x7FE0_0010)
        );
    }
}
