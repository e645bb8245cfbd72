//! The transaction storage (トランザクションストレージ): `TR_YYYYMMDDHHMMSSFFF_nnnnn.DAT` files
//! of records, each an `#SSMIX` header line followed by the message. When configured, it is
//! the change feed: which keys were inserted or deleted, without rescanning the tree.

use crate::name::Key;
use crate::time::LocalTime;

/// 処理区分.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Delete,
}

/// One record's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: String,
    /// 医療施設ID (10 digits).
    pub facility: String,
    pub key: Key,
    pub operation: Operation,
    pub department: String,
    pub at: LocalTime,
}

/// Why a header line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct HeaderError {
    pub line: usize,
    pub why: String,
}

/// Whether a file name is a transaction file (`TR_…​.DAT`).
pub fn is_transaction_file(name: &str) -> bool {
    name.starts_with("TR_") && name.ends_with(".DAT")
}

/// Parses one `#SSMIX,…` header line.
pub fn parse_header(line: &str, line_no: usize) -> Result<Header, HeaderError> {
    let err = |why: &str| HeaderError {
        line: line_no,
        why: why.to_owned(),
    };
    let f: Vec<&str> = line
        .trim_end_matches(['\r', '\n'])
        .split(',')
        .map(str::trim)
        .collect();
    let [
        tag,
        version,
        facility,
        pid,
        date,
        data_type,
        order,
        op,
        dept,
        at,
    ] = f.as_slice()
    else {
        return Err(err("an #SSMIX header has 10 comma-separated fields"));
    };
    if *tag != "#SSMIX" {
        return Err(err("not an #SSMIX header"));
    }
    if facility.len() != 10 || !facility.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("the facility ID is not 10 digits"));
    }
    crate::name::check_patient_id(pid).map_err(|_| err("the patient ID is not valid"))?;
    if *date != "-" && crate::time::check_date(date).is_err() {
        return Err(err("the care date is not YYYYMMDD or -"));
    }
    let operation = match *op {
        "INS" => Operation::Insert,
        "DEL" => Operation::Delete,
        _ => return Err(err("the operation is neither INS nor DEL")),
    };
    let at = LocalTime::parse_file_time(at).map_err(|e| err(&e.to_string()))?;
    Ok(Header {
        version: (*version).to_owned(),
        facility: (*facility).to_owned(),
        key: Key {
            patient_id: (*pid).to_owned(),
            care_date: (*date).to_owned(),
            data_type: (*data_type).to_owned(),
            order_no: (*order).to_owned(),
        },
        operation,
        department: (*dept).to_owned(),
        at,
    })
}

/// The headers of a transaction file's decoded text, in order. Lines between headers are the
/// messages; a malformed header is reported and skipped, never fatal.
pub fn headers(text: &str) -> (Vec<Header>, Vec<HeaderError>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.split(['\r', '\n']).enumerate() {
        if line.starts_with("#SSMIX") {
            match parse_header(line, i + 1) {
                Ok(h) => ok.push(h),
                Err(e) => bad.push(e),
            }
        }
    }
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers_and_skips_bad_ones() {
        let text = "#SSMIX,2.00,9999999999,0000000123,20220101,OMP-01,000000000012345,INS,-,20220101235959567\rMSH|^~\\&|x\r#SSMIX,2.00,9999999999,0000000123,20220101,OMP-01,000000000012345,DEL,-,20220102000000000\r#SSMIX,2.00,99,0000000123\r";
        let (ok, bad) = headers(text);
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].operation, Operation::Insert);
        assert_eq!(ok[1].operation, Operation::Delete);
        assert_eq!(ok[0].key.order_no, "000000000012345");
        assert_eq!(bad.len(), 1);
        assert!(is_transaction_file("TR_20220101000000000_00001.DAT"));
    }
}
