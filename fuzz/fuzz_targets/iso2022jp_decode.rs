//! The ISO-2022-JP decoder (`ssmix2::decode::decode`, with its CP932 and UTF-8 fallbacks)
//! never panics on any bytes; and for any text, what the writer (`ssmix2::encode`) makes of
//! it follows the writer rules and decodes without findings to text that encodes to the
//! same bytes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssmix2::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let decoded = decode::decode(data);
    let _ = decode::halfwidth_to_fullwidth(&decoded.text);
    let _ = decode::normalize_for_matching(&decoded.text);

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The writer's input is message text: no escape or shift controls of its own, and no
    // literal `&#` (which `check_written` takes for an HTML character reference; in HL7,
    // `&` is the subcomponent separator).
    if text.contains(['\x1b', '\x0e', '\x0f']) || text.contains("&#") {
        return;
    }
    let encoded = encode::encode(text);
    assert_eq!(encode::check_written(&encoded.bytes), Ok(()));
    let back = decode::decode(&encoded.bytes);
    assert!(
        back.findings.is_empty(),
        "written bytes decode with findings: {:?}",
        back.findings
    );
    assert_eq!(
        encode::encode(&back.text).bytes,
        encoded.bytes,
        "round trip"
    );
});
