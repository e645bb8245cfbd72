//! The transaction storage's `#SSMIX` header lines (`ssmix2::transaction`), the change feed
//! read from files the EMR writes: never panics, on decoded text as the reader sees it and
//! on single lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssmix2::{decode, transaction};

fuzz_target!(|data: &[u8]| {
    let text = decode::decode(data).text;
    let _ = transaction::headers(&text);
    for (n, line) in text.lines().take(64).enumerate() {
        let _ = transaction::parse_header(line, n + 1);
    }
    let _ = transaction::is_transaction_file(&text);
});
