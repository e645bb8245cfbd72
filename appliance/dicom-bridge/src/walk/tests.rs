use super::*;
use crate::testdata::{explicit, implicit};

/// An element of undefined length (explicit VR `vr`).
fn undefined(g: u16, e: u16, vr: &[u8; 2]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&g.to_le_bytes());
    v.extend_from_slice(&e.to_le_bytes());
    v.extend_from_slice(vr);
    v.extend_from_slice(&[0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
    v
}

const ITEM_UNDEFINED: [u8; 8] = [0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF];
const ITEM_END: [u8; 8] = [0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0];
const SEQUENCE_END: [u8; 8] = [0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0];

fn item(len: u32) -> Vec<u8> {
    let mut v = vec![0xFE, 0xFF, 0x00, 0xE0];
    v.extend_from_slice(&len.to_le_bytes());
    v
}

const NAME: &[u8] = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B";

/// A CT-like data set: a nested sequence of undefined length, a Japanese name, an UN of
/// undefined length (implicit VR inside), encapsulated pixel data.
fn sample() -> Vec<u8> {
    [
        explicit(0x0008, 0x0005, b"CS", b"\\ISO 2022 IR 87"),
        explicit(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2"),
        explicit(0x0008, 0x0018, b"UI", b"1.2.3.4.5"),
        undefined(0x0008, 0x1115, b"SQ"),
        ITEM_UNDEFINED.to_vec(),
        undefined(0x0008, 0x1140, b"SQ"),
        ITEM_UNDEFINED.to_vec(),
        explicit(0x0008, 0x1155, b"UI", b"1.2.3"),
        ITEM_END.to_vec(),
        SEQUENCE_END.to_vec(),
        ITEM_END.to_vec(),
        SEQUENCE_END.to_vec(),
        undefined(0x0009, 0x1010, b"UN"),
        ITEM_UNDEFINED.to_vec(),
        implicit(0x0009, 0x1011, b"private!"),
        ITEM_END.to_vec(),
        SEQUENCE_END.to_vec(),
        explicit(0x0010, 0x0010, b"PN", NAME),
        explicit(0x0010, 0x0020, b"LO", b"0001234"),
        explicit(0x0020, 0x000D, b"UI", b"1.2.3.9"),
        undefined(0x7FE0, 0x0010, b"OB"),
        item(0),
        item(6),
        vec![1, 2, 3, 4, 5, 6],
        SEQUENCE_END.to_vec(),
    ]
    .concat()
}

fn walk(ds: &[u8], explicit: bool, chunk: usize, limit: u64) -> Result<Header, WalkError> {
    let mut w = Walker::new(explicit, limit);
    for c in ds.chunks(chunk.max(1)) {
        w.push(c);
    }
    w.finish()
}

#[test]
fn a_well_formed_data_set_in_any_fragmentation_gives_its_routing_elements() {
    let ds = sample();
    for chunk in [1, 2, 3, 7, 12, 13, 64, ds.len()] {
        let h = walk(&ds, true, chunk, 1 << 20).unwrap();
        assert_eq!(h.sop_class.as_deref(), Some("1.2.840.10008.5.1.4.1.1.2"));
        assert_eq!(h.sop_instance.as_deref(), Some("1.2.3.4.5"));
        assert_eq!(h.patient_id.as_deref(), Some("0001234"), "chunk {chunk}");
        assert_eq!(h.study_instance.as_deref(), Some("1.2.3.9"));
        assert!(h.patient_name_raw.unwrap().starts_with(NAME));
        assert_eq!(
            h.specific_character_set.as_deref(),
            Some("\\ISO 2022 IR 87")
        );
    }
    let implicit_ds = [
        implicit(0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.7\0"),
        implicit(0x0008, 0x0018, b"1.2.3.4.6\0"),
        implicit(0x0008, 0x1115, &[0xFF; 0]),
        {
            let mut sq = implicit(0x0008, 0x1140, &[]);
            sq.truncate(4);
            sq.extend_from_slice(&[0xFF; 4]);
            sq.extend(ITEM_UNDEFINED);
            sq.extend(implicit(0x0008, 0x1155, b"1.2\0"));
            sq.extend(ITEM_END);
            sq.extend(SEQUENCE_END);
            sq
        },
        implicit(0x0010, 0x0020, b"0005678 "),
        implicit(0x7FE0, 0x0010, &[0; 16]),
    ]
    .concat();
    let h = walk(&implicit_ds, false, 5, 1 << 20).unwrap();
    assert_eq!(h.patient_id.as_deref(), Some("0005678"));
    assert_eq!(h.study_instance, None);
}

#[test]
fn a_duplicate_or_out_of_order_top_level_element_is_refused() {
    let twice = [
        explicit(0x0008, 0x0018, b"UI", b"1.2"),
        explicit(0x0010, 0x0020, b"LO", b"0001234"),
        explicit(0x0010, 0x0020, b"LO", b"0009999"),
    ]
    .concat();
    assert_eq!(
        walk(&twice, true, 3, 1 << 20),
        Err(WalkError::Duplicate(0x0010, 0x0020))
    );
    // Far from the routing elements too.
    let late = [
        explicit(0x0008, 0x0018, b"UI", b"1.2"),
        explicit(0x0010, 0x0020, b"LO", b"0001234"),
        explicit(0x0020, 0x000D, b"UI", b"1.2.3.9"),
        explicit(0x0028, 0x0010, b"US", &[0, 2]),
        explicit(0x0028, 0x0010, b"US", &[0, 4]),
        explicit(0x7FE0, 0x0010, b"OW", &[0; 64]),
    ]
    .concat();
    assert_eq!(
        walk(&late, true, 100, 1 << 20),
        Err(WalkError::Duplicate(0x0028, 0x0010))
    );
    let back = [
        explicit(0x0010, 0x0020, b"LO", b"1"),
        explicit(0x0008, 0x0018, b"UI", b"1.2"),
    ]
    .concat();
    assert_eq!(
        walk(&back, true, 64, 1 << 20),
        Err(WalkError::OutOfOrder(0x0008, 0x0018))
    );
}

#[test]
fn an_undefined_length_that_cannot_be_walked_is_refused() {
    // OB of undefined length anywhere but the pixel data.
    let ob = [
        explicit(0x0008, 0x0018, b"UI", b"1.2"),
        undefined(0x0009, 0x1010, b"OB"),
        item(2),
        vec![1, 2],
        SEQUENCE_END.to_vec(),
    ]
    .concat();
    assert_eq!(
        walk(&ob, true, 64, 1 << 20),
        Err(WalkError::UndefinedLength(0x0009, 0x1010))
    );
    // A short VR cannot be undefined: read as a length of 0xFFFF, the data set is cut short.
    let lo = [explicit(0x0008, 0x0018, b"UI", b"1.2"), {
        let mut v = explicit(0x0010, 0x0030, b"DA", b"");
        v[6] = 0xFF;
        v[7] = 0xFF;
        v
    }]
    .concat();
    assert_eq!(walk(&lo, true, 64, 1 << 20), Err(WalkError::Truncated));
    // An UN of undefined length whose content is not implicit VR items (an explicit VR
    // element where an item belongs).
    let un = [
        undefined(0x0009, 0x1010, b"UN"),
        explicit(0x0009, 0x1011, b"LO", b"x"),
        SEQUENCE_END.to_vec(),
    ]
    .concat();
    assert_eq!(
        walk(&un, true, 64, 1 << 20),
        Err(WalkError::Malformed(0x0009, 0x1011))
    );
    // An UN that never ends.
    let open = [
        undefined(0x0009, 0x1010, b"UN"),
        ITEM_UNDEFINED.to_vec(),
        implicit(0x0009, 0x1011, b"ab"),
    ]
    .concat();
    assert_eq!(walk(&open, true, 64, 1 << 20), Err(WalkError::Truncated));
    // A fragment of undefined length in encapsulated pixel data.
    let pixels = [
        undefined(0x7FE0, 0x0010, b"OB"),
        ITEM_UNDEFINED.to_vec(),
        SEQUENCE_END.to_vec(),
    ]
    .concat();
    assert!(matches!(
        walk(&pixels, true, 64, 1 << 20),
        Err(WalkError::Malformed(..))
    ));
    // A delimiter with a length; an item at the top level.
    let mut bad_end = sample();
    let at = bad_end.len() - 4;
    bad_end[at] = 1;
    assert!(matches!(
        walk(&bad_end, true, 64, 1 << 20),
        Err(WalkError::Malformed(0xFFFE, 0xE0DD))
    ));
    assert!(matches!(
        walk(&item(0), true, 64, 1 << 20),
        Err(WalkError::Malformed(0xFFFE, 0xE000))
    ));
}

#[test]
fn nesting_is_bounded() {
    let mut deep = Vec::new();
    for _ in 0..9 {
        deep.extend(undefined(0x0008, 0x1115, b"SQ"));
        deep.extend(ITEM_UNDEFINED);
    }
    assert_eq!(walk(&deep, true, 64, 1 << 20), Err(WalkError::TooDeep));
}

#[test]
fn a_patient_id_after_large_private_elements_is_found_within_the_limit() {
    let ds = [
        explicit(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2"),
        explicit(0x0008, 0x0018, b"UI", b"1.2.3.4.5"),
        explicit(0x0009, 0x1010, b"OB", &vec![0x5A; 200 * 1024]),
        explicit(0x0010, 0x0020, b"LO", b"0001234"),
        explicit(0x0020, 0x000D, b"UI", b"1.2.3.9"),
        explicit(0x7FE0, 0x0010, b"OW", &vec![0; 300 * 1024]),
    ]
    .concat();
    let h = walk(&ds, true, 16 * 1024, 1024 * 1024).unwrap();
    assert_eq!(h.patient_id.as_deref(), Some("0001234"));
    // With a 64 KiB limit, the patient elements are too far for the forwarder to rewrite.
    assert_eq!(
        walk(&ds, true, 16 * 1024, 64 * 1024),
        Err(WalkError::BeyondLimit(64 * 1024))
    );
    // The pixel data beyond the limit does not matter.
    assert!(walk(&ds, true, 16 * 1024, 256 * 1024).is_ok());
}

#[test]
fn a_routing_value_is_bounded_and_a_cut_data_set_is_refused() {
    let long = [
        explicit(0x0008, 0x0018, b"UI", b"1.2"),
        explicit(0x0010, 0x0010, b"PN", &[b'A'; 2000]),
    ]
    .concat();
    assert_eq!(
        walk(&long, true, 64, 1 << 20),
        Err(WalkError::LongValue(0x0010, 0x0010))
    );
    let ds = sample();
    for cut in [1, 7, 8, 11, 20, ds.len() - 1] {
        assert!(walk(&ds[..cut], true, 5, 1 << 20).is_err(), "cut at {cut}");
    }
    // Noise never panics.
    let mut seed = 11u64;
    for n in 0..3000usize {
        let noise: Vec<u8> = (0..n % 131)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                u8::try_from(seed >> 56).unwrap_or(0)
            })
            .collect();
        let _ = walk(&noise, n % 2 == 0, 1 + n % 9, 1 << 20);
    }
}
