//! The DIMSE command set decoder (`dimse::command::Command::decode`): never panics, and a
//! command it accepts encodes to bytes that decode to the same command.
#![no_main]

use dimse::command::Command;
use dimse::status::Status;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(command) = Command::decode(data) else {
        return;
    };
    let encoded = command.encode();
    let again = Command::decode(&encoded).expect("an encoded command decodes");
    assert_eq!(again, command, "encode/decode round trip");
    for status in [Status::SUCCESS, Status::PROCESSING_FAILURE] {
        if let Some(rsp) = command.respond(status) {
            assert_eq!(Command::decode(&rsp.encode()), Ok(rsp));
        }
    }
});
