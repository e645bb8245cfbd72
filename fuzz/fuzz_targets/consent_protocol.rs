//! The consent decision socket's protocol (`consent_protocol`): a `Request` line as the
//! consent service reads it from a client, an `Answer` line as every client reads it from
//! the service. Never panics; a line that parses, written again, parses to the same value.
#![no_main]

use consent_protocol::{Answer, Request, from_line, to_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(request) = from_line::<Request>(line) {
        let written = to_line(&request);
        assert_eq!(from_line::<Request>(&written).ok(), Some(request));
    }
    if let Ok(answer) = from_line::<Answer>(line) {
        let written = to_line(&answer);
        assert_eq!(from_line::<Answer>(&written).ok(), Some(answer));
    }
});
