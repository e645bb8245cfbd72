//! The storage commitment report reader (`dicom_bridge::commitment`): `read_report` (a
//! PACS's N-EVENT-REPORT data set, implicit or explicit VR) never panics and never
//! allocates beyond the input; a report it accepts, written again by dicom-rs (`report`),
//! reads back the same.
//!
//! Input: one flag byte (bit 0: explicit VR), then the data set.
#![no_main]

use dicom_bridge::commitment::{self, EXPLICIT_VR_LE, IMPLICIT_VR_LE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, ds)) = data.split_first() else {
        return;
    };
    let ts = if flags & 1 == 1 {
        EXPLICIT_VR_LE
    } else {
        IMPLICIT_VR_LE
    };
    let Ok(report) = commitment::read_report(ds, ts) else {
        return;
    };
    assert!(!report.transaction.is_empty());
    if let Ok(again) = commitment::report(&report, ts) {
        assert_eq!(
            commitment::read_report(&again, ts).as_ref(),
            Ok(&report),
            "a report written again reads back the same"
        );
    }
});
