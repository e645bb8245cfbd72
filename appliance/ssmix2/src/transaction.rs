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

/// Where the feed was read up to: a transaction file (relative to the transaction root,
/// `/`-separated) and the byte offset after the last complete line read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub file: String,
    pub offset: u64,
}

/// What one read of the feed found.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub headers: Vec<Header>,
    pub errors: Vec<HeaderError>,
    pub cursor: Cursor,
}

fn transaction_files(root: &std::path::Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for year in std::fs::read_dir(root)? {
        let year = year?;
        if !year.file_type()?.is_dir() {
            continue;
        }
        let y = year.file_name().to_string_lossy().into_owned();
        for f in std::fs::read_dir(year.path())? {
            let f = f?;
            let name = f.file_name().to_string_lossy().into_owned();
            if f.file_type()?.is_file() && is_transaction_file(&name) {
                out.push(format!("{y}/{name}"));
            }
        }
    }
    // TR_YYYYMMDDHHMMSSFFF_nnnnn sorts by time within and across years.
    out.sort_by(|a, b| {
        a.rsplit('/')
            .next()
            .cmp(&b.rsplit('/').next())
            .then(a.cmp(b))
    });
    Ok(out)
}

/// Reads the records added after `cursor` (whole lines only: a line still being written is
/// read next time). Headers are ASCII, so the messages between them are not decoded.
pub fn read_since(root: &std::path::Path, cursor: &Cursor) -> std::io::Result<Batch> {
    use std::io::{Read as _, Seek as _};
    let mut batch = Batch {
        cursor: cursor.clone(),
        ..Batch::default()
    };
    let key = |f: &str| f.rsplit('/').next().unwrap_or(f).to_owned();
    for file in transaction_files(root)? {
        if !cursor.file.is_empty() && key(&file) < key(&cursor.file) {
            continue;
        }
        let start = if file == cursor.file {
            cursor.offset
        } else {
            0
        };
        let mut f = std::fs::File::open(root.join(&file))?;
        f.seek(std::io::SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        // Only up to the last line terminator.
        let complete = bytes
            .iter()
            .rposition(|&b| b == b'\r' || b == b'\n')
            .map_or(0, |i| i + 1);
        let mut line_no = 0;
        for line in bytes[..complete].split(|&b| b == b'\r' || b == b'\n') {
            line_no += 1;
            if line.starts_with(b"#SSMIX") {
                match std::str::from_utf8(line) {
                    Ok(text) => match parse_header(text, line_no) {
                        Ok(h) => batch.headers.push(h),
                        Err(e) => batch.errors.push(e),
                    },
                    Err(_) => batch.errors.push(HeaderError {
                        line: line_no,
                        why: "not ASCII".into(),
                    }),
                }
            }
        }
        batch.cursor = Cursor {
            file: file.clone(),
            offset: start + complete as u64,
        };
    }
    Ok(batch)
}

#[cfg(test)]
mod feed_tests {
    use super::*;

    #[test]
    fn reads_only_new_complete_records() {
        let dir = tempfile::tempdir().unwrap();
        let year = dir.path().join("2026");
        std::fs::create_dir_all(&year).unwrap();
        let h = |op: &str, order: &str| {
            format!(
                "#SSMIX,2.00,1311234567,0000000001,20261120,OMP-01,{order},{op},-,20261120103000000\r"
            )
        };
        let first = year.join("TR_20261120000000000_00001.DAT");
        std::fs::write(
            &first,
            format!(
                "{}MSH|^~\\&|x\r{}",
                h("INS", "000000000000001"),
                h("DEL", "000000000000002")
            ),
        )
        .unwrap();
        let b = read_since(dir.path(), &Cursor::default()).unwrap();
        assert_eq!(b.headers.len(), 2);
        assert_eq!(b.headers[1].operation, Operation::Delete);
        // Nothing new.
        assert!(
            read_since(dir.path(), &b.cursor)
                .unwrap()
                .headers
                .is_empty()
        );
        // An append, with a line still being written, and a new file.
        let mut text = std::fs::read_to_string(&first).unwrap();
        text.push_str(&h("INS", "000000000000003"));
        text.push_str("#SSMIX,2.00,13112");
        std::fs::write(&first, text).unwrap();
        std::fs::write(
            year.join("TR_20261121000000000_00001.DAT"),
            h("INS", "000000000000004"),
        )
        .unwrap();
        let c = read_since(dir.path(), &b.cursor).unwrap();
        let orders: Vec<&str> = c.headers.iter().map(|h| h.key.order_no.as_str()).collect();
        assert_eq!(orders, vec!["000000000000003", "000000000000004"]);
        assert!(c.errors.is_empty());
    }
}
