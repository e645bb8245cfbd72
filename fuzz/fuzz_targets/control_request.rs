//! The control socket (`tsunagi_runtime::control`): a request line as the supervisor parses
//! it, and a response line as `tsunagi status` parses it. Never panics; a value that
//! parses, written again, parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsunagi_runtime::control::{Request, Response};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    // The supervisor trims the line before parsing.
    if let Ok(request) = serde_json::from_str::<Request>(line.trim()) {
        let written = serde_json::to_string(&request).expect("serializes");
        assert_eq!(
            serde_json::from_str::<Request>(&written).ok(),
            Some(request)
        );
    }
    if let Ok(response) = serde_json::from_str::<Response>(line.trim()) {
        let written = serde_json::to_string(&response).expect("serializes");
        assert!(serde_json::from_str::<Response>(&written).is_ok());
    }
});
