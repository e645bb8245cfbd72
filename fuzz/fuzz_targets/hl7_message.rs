//! An SS-MIX2 message file, as the inventory and the sync read it: decoding to Unicode
//! (`ssmix2::decode`), the HL7 v2 tokenizer (`ssmix2::hl7`) and the key fields
//! (`ssmix2::message`: `parse_file`, `parse_key_fields`, `fields`). Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssmix2::name::Key;
use ssmix2::{decode, hl7, message};

fuzz_target!(|data: &[u8]| {
    let key = Key {
        patient_id: "0000012345".into(),
        care_date: "20250401".into(),
        data_type: "ADT-00".into(),
        order_no: "000000000000000".into(),
    };
    let _ = message::parse_file(data, Some(&key));
    let _ = message::parse_file(data, None);
    let _ = message::parse_key_fields(data, Some(&key), true);
    let _ = message::parse_key_fields(data, None, false);

    let decoded = decode::decode(data);
    if let Ok(m) = hl7::parse(&decoded.text) {
        let _ = message::fields(&m);
        for id in ["MSH", "EVN", "PID", "PV1", "ORC"] {
            if let Some(segment) = m.segment(id) {
                for n in 0..segment.len().min(32) {
                    let raw = segment.field(n);
                    for repetition in m.repetitions(raw) {
                        for c in 1..4 {
                            let _ = m.unescape(m.component(repetition, c));
                        }
                    }
                }
            }
            let _ = m.value(id, 3, 1);
        }
    }
    // The tokenizer on any text, not only what the decoder produces.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(m) = hl7::parse(text)
    {
        let _ = message::fields(&m);
    }
});
