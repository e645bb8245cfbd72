//! What the bridge does with the bytes of an association after it is established: dicom-ul
//! reads PDUs from the stream (`read_pdu`, strict, the default maximum length), and the
//! P-DATA values are reassembled as the SCP does it: command fragments through
//! `CommandBuf` (bounded, then decoded), data-set fragments through the streaming
//! `walk::Walker` (structure and routing elements), finished once the last fragment came.
//!
//! Input: one flag byte (bit 0: the data set is explicit VR), then the PDU stream.
#![no_main]

use dicom_bridge::CommandBuf;
use dicom_bridge::walk::{MAX_ROUTING_VALUE, Walker};
use dicom_ul::pdu::{DEFAULT_MAX_PDU, PDataValueType, Pdu, read_pdu};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut stream)) = data.split_first() else {
        return;
    };
    let explicit = flags & 1 == 1;
    let mut commands = CommandBuf::default();
    // The SCP's default limit.
    let limit = 1024 * 1024;
    let mut walker = Walker::new(explicit, limit);
    loop {
        let before = stream.len();
        let pdu = match read_pdu(&mut stream, DEFAULT_MAX_PDU, true) {
            Ok(Some(pdu)) => pdu,
            // Incomplete, or an error: the association ends.
            Ok(None) | Err(_) => return,
        };
        assert!(
            stream.len() < before,
            "a PDU was read without consuming input"
        );
        let Pdu::PData { data } = pdu else {
            continue;
        };
        for pdv in data {
            match pdv.value_type {
                PDataValueType::Command => match commands.push(&pdv) {
                    Ok(Some(command)) => {
                        let _ = command.respond(dimse::status::Status::SUCCESS);
                    }
                    Ok(None) => {}
                    // The SCP aborts the association.
                    Err(()) => return,
                },
                PDataValueType::Data => {
                    walker.push(&pdv.data);
                    if pdv.is_last {
                        let done = std::mem::replace(&mut walker, Walker::new(explicit, limit));
                        if let Ok(h) = done.finish() {
                            // What is kept of an accepted data set is bounded.
                            for v in [&h.patient_id, &h.sop_instance, &h.sop_class] {
                                assert!(v.as_ref().is_none_or(|v| v.len() <= MAX_ROUTING_VALUE));
                            }
                            assert!(
                                h.patient_name_raw
                                    .as_ref()
                                    .is_none_or(|v| v.len() <= MAX_ROUTING_VALUE)
                            );
                        }
                    }
                }
            }
        }
    }
});
