//! The routing-header reader (`dicom_bridge::header`): `read` and `elements_until` never
//! panic, and the top-level elements `elements_until` reports tile the input: contiguous,
//! in ascending tag order, each inside the input, the last ending at the boundary.
//!
//! Input: one flag byte (bit 0: explicit VR; bit 1: the input is the whole data set), then
//! the data set.
#![no_main]

use dicom_bridge::header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, ds)) = data.split_first() else {
        return;
    };
    let explicit = flags & 1 == 1;
    let complete = flags & 2 == 2;
    let _ = header::read(ds, explicit);
    for last in [0x0010_1002, u32::MAX] {
        let Ok((elements, boundary)) = header::elements_until(ds, explicit, last, complete) else {
            continue;
        };
        assert!(boundary <= ds.len());
        let mut end = 0;
        let mut tag = 0;
        for e in &elements {
            assert_eq!(e.start, end, "elements are contiguous");
            assert!(
                e.tag >= tag && e.tag <= last,
                "tags ascend up to the last wanted"
            );
            assert!(e.start < e.value_start && e.value_start <= e.end && e.end <= ds.len());
            end = e.end;
            tag = e.tag;
        }
        assert_eq!(end, boundary, "the boundary is where the last element ends");
    }
});
