//! Paths and file names of the standardized and the extended storage. Pure: no I/O.
//!
//! Standardized storage (7 fields, no extension):
//! `<PID[0..3]>/<PID[3..6]>/<PID>/<診療日|->/<データ種別>/<PID>_<診療日>_<種別>_<オーダNo>_<発生日時>_<診療科>_<フラグ>`.
//!
//! Extended storage: the same five folders, then a content folder named
//! `<PID>_<診療日>_<データ種別>_<特定キー>_<発生日時>[_<診療科>]_<フラグ>` (6 or 7 fields)
//! holding the document and its attachments. The data-type folder may contain `^`, `_` and
//! Japanese text, so a content-folder name is parsed from both ends, using its parent folder
//! to find where the data-type field ends, never by splitting blindly on `_`.

use crate::reason::Reason;
use crate::time::{LocalTime, check_date};

/// The condition flag (コンディションフラグ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flag {
    /// `0`: deleted (or, from legacy writers, superseded).
    Deleted = 0,
    /// `1`: the current version.
    Current = 1,
    /// `2`: superseded by an update.
    Superseded = 2,
}

impl Flag {
    pub fn parse(s: &str) -> Option<Flag> {
        match s {
            "0" => Some(Flag::Deleted),
            "1" => Some(Flag::Current),
            "2" => Some(Flag::Superseded),
            _ => None,
        }
    }

    pub fn digit(self) -> u8 {
        self as u8
    }
}

/// Patient IDs: ASCII letters and digits (plus `-` and `.`, not first), 1 to 64 characters.
/// Leading zeros are part of the ID. `_`, spaces and non-ASCII are refused (E-11).
pub fn check_patient_id(id: &str) -> Result<(), Reason> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && id.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Reason::BadPatientId)
    }
}

/// The two hash folders of a patient ID: its characters 1–3 and 4–6 (for IDs shorter than
/// 6, what there is, or `_`).
pub fn hash_folders(id: &str) -> (&str, &str) {
    let a = id.get(..3).unwrap_or(id);
    let b = id.get(3..6).or_else(|| id.get(3..)).unwrap_or("");
    (a, if b.is_empty() { "_" } else { b })
}

/// The key of a record: every version of it lives in the same data-type folder.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub patient_id: String,
    /// `YYYYMMDD` or `-`.
    pub care_date: String,
    pub data_type: String,
    /// オーダNo (standardized) or 特定キー (extended).
    pub order_no: String,
}

/// The fields of a file name (standardized) or content-folder name (extended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    pub key: Key,
    /// 発生日時 as written (14 to 17 digits).
    pub occurred: String,
    pub occurred_at: LocalTime,
    /// 診療科コード, `-`, or `None` for a 6-field content folder.
    pub department: Option<String>,
    pub flag: Flag,
}

impl Name {
    /// The name with another flag (what an update or a delete renames a file to).
    pub fn with_flag(&self, flag: Flag) -> String {
        let k = &self.key;
        match &self.department {
            Some(d) => format!(
                "{}_{}_{}_{}_{}_{}_{}",
                k.patient_id,
                k.care_date,
                k.data_type,
                k.order_no,
                self.occurred,
                d,
                flag.digit()
            ),
            None => format!(
                "{}_{}_{}_{}_{}_{}",
                k.patient_id,
                k.care_date,
                k.data_type,
                k.order_no,
                self.occurred,
                flag.digit()
            ),
        }
    }
}

fn check_care_date(s: &str) -> bool {
    s == "-" || check_date(s).is_ok()
}

fn check_order_no(s: &str) -> bool {
    // Usually 15 digits; 13 occur; IndexDB allows 22. Letters occur in vendor data.
    !s.is_empty() && s.len() <= 22 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn check_department(s: &str) -> bool {
    s == "-" || (!s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn check_data_type_field(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '\0'])
}

/// Parses a standardized-storage file name (exactly 7 `_`-separated fields).
pub fn parse_file_name(name: &str) -> Result<Name, Reason> {
    let fields: Vec<&str> = name.split('_').collect();
    let [pid, date, data_type, order, occurred, dept, flag] = fields.as_slice() else {
        return Err(Reason::BadName);
    };
    if check_patient_id(pid).is_err() {
        // A name whose patient field is wrong is a bad name; the folder is checked apart.
        return Err(Reason::BadName);
    }
    let flag = Flag::parse(flag).ok_or(Reason::BadName)?;
    if !check_care_date(date)
        || !check_data_type_field(data_type)
        || !check_order_no(order)
        || !check_department(dept)
    {
        return Err(Reason::BadName);
    }
    let occurred_at = LocalTime::parse_file_time(occurred).map_err(|_| Reason::BadName)?;
    Ok(Name {
        key: Key {
            patient_id: (*pid).to_owned(),
            care_date: (*date).to_owned(),
            data_type: (*data_type).to_owned(),
            order_no: (*order).to_owned(),
        },
        occurred: (*occurred).to_owned(),
        occurred_at,
        department: Some((*dept).to_owned()),
        flag,
    })
}

/// The five folders above a file (standardized) or above a content folder (extended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folders<'a> {
    pub level1: &'a str,
    pub level2: &'a str,
    pub patient_id: &'a str,
    pub care_date: &'a str,
    pub data_type: &'a str,
}

/// Checks the folders themselves: the patient folder's ID (E-11), the hash folders for IDs of
/// 6 or more characters (shorter IDs are taken as found), the care date.
pub fn check_folders(f: &Folders<'_>) -> Result<(), Reason> {
    check_patient_id(f.patient_id)?;
    let pid = f.patient_id;
    if pid.len() >= 6 && (f.level1 != &pid[..3] || f.level2 != &pid[3..6]) {
        return Err(Reason::PathMismatch);
    }
    if pid.len() < 6 && !pid.starts_with(f.level1) {
        return Err(Reason::PathMismatch);
    }
    if !check_care_date(f.care_date) {
        return Err(Reason::PathMismatch);
    }
    Ok(())
}

/// Cross-checks a parsed name against its folders (E-10).
pub fn check_name_against(name: &Name, f: &Folders<'_>) -> Result<(), Reason> {
    let k = &name.key;
    if k.patient_id != f.patient_id || k.care_date != f.care_date || k.data_type != f.data_type {
        return Err(Reason::PathMismatch);
    }
    Ok(())
}

/// Parses an extended-storage content-folder name inside data-type folder `data_type_folder`.
///
/// Accepted: `PID_DATE_<type>_KEY_TIME_DEPT_FLAG` and `PID_DATE_<type>_KEY_TIME_FLAG`, where
/// `<type>` is normally the data-type folder's name (which may itself contain `_`). A vendor
/// variant writes a different type code there (SEAMAT: `LJCS-100D`); it is accepted when it
/// has no `_`, and the key's data type is then the folder's.
pub fn parse_content_folder(name: &str, data_type_folder: &str) -> Result<Name, Reason> {
    let (pid, rest) = name.split_once('_').ok_or(Reason::BadName)?;
    let (date, rest) = rest.split_once('_').ok_or(Reason::BadName)?;
    if check_patient_id(pid).is_err() || !check_care_date(date) {
        return Err(Reason::BadName);
    }
    // `rest` is `<type>_KEY_TIME[_DEPT]_FLAG`.
    let (type_field, tail) = match rest
        .strip_prefix(data_type_folder)
        .and_then(|t| t.strip_prefix('_'))
    {
        Some(tail) => (data_type_folder, tail),
        None => rest.split_once('_').ok_or(Reason::BadName)?,
    };
    if !check_data_type_field(type_field) {
        return Err(Reason::BadName);
    }
    let parts: Vec<&str> = tail.split('_').collect();
    let (key, occurred, dept, flag) = match parts.as_slice() {
        [key, time, dept, flag] => (*key, *time, Some(*dept), *flag),
        [key, time, flag] => (*key, *time, None, *flag),
        _ => return Err(Reason::BadName),
    };
    let flag = Flag::parse(flag).ok_or(Reason::BadName)?;
    // 特定キー: up to 22 characters; `.` separates the parts of SEAMAT keys.
    let key_ok = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !key_ok || dept.is_some_and(|d| !check_department(d)) {
        return Err(Reason::BadName);
    }
    let occurred_at = LocalTime::parse_file_time(occurred).map_err(|_| Reason::BadName)?;
    Ok(Name {
        key: Key {
            patient_id: pid.to_owned(),
            care_date: date.to_owned(),
            data_type: data_type_folder.to_owned(),
            order_no: key.to_owned(),
        },
        occurred: occurred.to_owned(),
        occurred_at,
        department: dept.map(str::to_owned),
        flag,
    })
}

/// Data-type folders of the extended storage: a 6-component CWE such as
/// `^経過記録^^11506-3^経過記録^LN`, up to 180 characters; `/` and NUL impossible, and no
/// control characters.
pub fn check_extended_type_folder(name: &str) -> Result<(), Reason> {
    if name.is_empty() || name.chars().count() > 180 || name.chars().any(char::is_control) {
        return Err(Reason::BadName);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folders<'a>(
        l1: &'a str,
        l2: &'a str,
        pid: &'a str,
        date: &'a str,
        t: &'a str,
    ) -> Folders<'a> {
        Folders {
            level1: l1,
            level2: l2,
            patient_id: pid,
            care_date: date,
            data_type: t,
        }
    }

    #[test]
    fn parses_the_sample_name() {
        let n = parse_file_name("9999013_20110701_OMP-01_000000011000185_20110701224603984_01_1")
            .unwrap();
        assert_eq!(n.key.patient_id, "9999013");
        assert_eq!(n.key.care_date, "20110701");
        assert_eq!(n.key.data_type, "OMP-01");
        assert_eq!(n.key.order_no, "000000011000185");
        assert_eq!(n.occurred_at.to_rfc3339(), "2011-07-01T22:46:03.984+09:00");
        assert_eq!(n.department.as_deref(), Some("01"));
        assert_eq!(n.flag, Flag::Current);
        assert_eq!(
            n.with_flag(Flag::Superseded),
            "9999013_20110701_OMP-01_000000011000185_20110701224603984_01_2"
        );
        assert!(
            check_name_against(&n, &folders("999", "901", "9999013", "20110701", "OMP-01")).is_ok()
        );
        assert!(check_folders(&folders("999", "901", "9999013", "20110701", "OMP-01")).is_ok());
    }

    #[test]
    fn e10_bad_names_and_mismatches() {
        for bad in [
            "9999013_20110701_OMP-01_000000011000185_20110701224603984_01",
            "9999013_20110701_OMP-01_000000011000185_20110701224603984_01_1_x",
            "9999013_20110701_OMP-01_000000011000185_20110701224603984_01_3",
            "9999013_20111301_OMP-01_000000011000185_20110701224603984_01_1",
            "9999013_20110701_OMP-01_000000011000185_2011070122460_01_1",
            "Thumbs.db",
            "",
        ] {
            assert_eq!(parse_file_name(bad), Err(Reason::BadName), "{bad}");
        }
        let n = parse_file_name("9999013_20110701_OMP-11_000000011000185_20110701224603984_01_1")
            .unwrap();
        assert_eq!(
            check_name_against(&n, &folders("999", "901", "9999013", "20110701", "ADT-31")),
            Err(Reason::PathMismatch)
        );
        assert_eq!(
            check_folders(&folders("999", "902", "9999013", "20110701", "OMP-01")),
            Err(Reason::PathMismatch)
        );
    }

    #[test]
    fn e11_patient_ids() {
        assert!(check_folders(&folders("000", "123", "0001234", "-", "ADT-00")).is_ok());
        // Shorter than 6: taken as found.
        assert!(check_folders(&folders("123", "45", "12345", "-", "ADT-00")).is_ok());
        for bad in ["12_345", "12 345", "１２３４５６", ".123456", ""] {
            assert_eq!(check_patient_id(bad), Err(Reason::BadPatientId), "{bad:?}");
        }
    }

    #[test]
    fn e19_order_numbers_of_other_lengths() {
        assert!(
            parse_file_name("9999013_20111220_OMG-01_2011122000300_20111220224447000_01_1").is_ok()
        );
        assert!(parse_file_name("9999013_-_ADT-00_999999999999999_20111220224447000_-_1").is_ok());
    }

    #[test]
    fn e18_content_folders_with_6_or_7_fields() {
        let folder = "^経過_記録^^11506-3^経過記録^LN";
        let n = parse_content_folder(
            &format!("9999013_20110701_{folder}_20110701_20110701120000123_01_1"),
            folder,
        )
        .unwrap();
        assert_eq!(n.key.data_type, folder);
        assert_eq!(n.key.order_no, "20110701");
        assert_eq!(n.department.as_deref(), Some("01"));
        let n = parse_content_folder(
            &format!("9999013_20110701_{folder}_2011070112_201107011200001_2"),
            folder,
        )
        .unwrap();
        assert_eq!(n.department, None);
        assert_eq!(n.flag, Flag::Superseded);
        assert_eq!(n.occurred, "201107011200001");
        // SEAMAT writes its own type code in the content folder.
        let n = parse_content_folder(
            "9999013_20110701_LJCS-100D_20110701120000.12.34.56_20110701120000123_01_1",
            "ECG^心電図^99X",
        )
        .unwrap();
        assert_eq!(n.key.order_no, "20110701120000.12.34.56");
        assert!(check_extended_type_folder(&"あ".repeat(180)).is_ok());
        assert!(check_extended_type_folder(&"あ".repeat(181)).is_err());
    }
}
