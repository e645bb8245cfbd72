//! SS-MIX2 names (`ssmix2::name`, `ssmix2::time`): file names of the standardized storage,
//! content folders of the extended storage, data-type folders, patient IDs and the folder
//! checks. Never panics; a parsed file name written back with its flag parses to the same
//! name.
//!
//! Input: UTF-8 text; up to the first `/` is the data-type folder (extended storage), the
//! rest the name; folders for the folder check are the `/`-separated fields of the whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssmix2::name::{self, Flag, Folders};
use ssmix2::time::LocalTime;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = name::parse_file_name(text) {
        for flag in [Flag::parse("0"), Flag::parse("1"), Flag::parse("2")]
            .into_iter()
            .flatten()
        {
            let again = name::parse_file_name(&n.with_flag(flag)).expect("a written name parses");
            assert_eq!(again.key, n.key);
            assert_eq!(again.occurred, n.occurred);
            assert_eq!(again.department, n.department);
            assert_eq!(again.flag, flag);
        }
    }
    let (folder, rest) = text.split_once('/').unwrap_or(("ADT-00", text));
    let _ = name::check_extended_type_folder(folder);
    if let Ok(n) = name::parse_content_folder(rest, folder) {
        let _ = n.with_flag(n.flag);
    }
    let _ = name::check_patient_id(text);
    let _ = name::hash_folders(text);
    let _ = Flag::parse(text);
    let parts: Vec<&str> = text.split('/').collect();
    if let [level1, level2, patient_id, care_date, data_type, file] = parts[..] {
        let folders = Folders {
            level1,
            level2,
            patient_id,
            care_date,
            data_type,
        };
        let _ = name::check_folders(&folders);
        if let Ok(n) = name::parse_file_name(file) {
            let _ = name::check_name_against(&n, &folders);
        }
    }
    if let Ok(t) = LocalTime::parse_hl7(text) {
        let _ = (t.to_rfc3339(), t.yyyymmdd(), t.sort_key(), t.precision());
    }
    if let Ok(t) = LocalTime::parse_file_time(text) {
        let _ = (t.to_rfc3339(), t.yyyymmdd());
    }
});
