//! The edge cases E-01…E-19 of `../shared/reference/ssmix2.md` §8, each built with the
//! test-data builder (ISO-2022-JP, with kanji whose JIS bytes are HL7 delimiters) and scanned.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ssmix2::build::{Patient, Record, Storage, message};
use ssmix2::datatype::DUMMY_ORDER_NO;
use ssmix2::encode::encode;
use ssmix2::index::Index;
use ssmix2::name::{Flag, Key};
use ssmix2::reason::Reason;
use ssmix2::resolve::Status;
use ssmix2::scan::{self, Content, ContentCache, Entry, Options};
use ssmix2::watch::{DeletionGate, KeyDecision, settled};

fn storage() -> (tempfile::TempDir, Storage) {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::create(&dir.path().join("1311234567")).unwrap();
    (dir, s)
}

fn scan(root: &Path) -> BTreeMap<String, Entry> {
    let (entries, summary) = scan::scan_all(root, &Options::standard()).unwrap();
    assert_eq!(summary.files, u64::try_from(entries.len()).unwrap());
    entries.into_iter().map(|e| (e.path.clone(), e)).collect()
}

fn rel(p: &Path, root: &Path) -> String {
    p.strip_prefix(root).unwrap().to_str().unwrap().to_owned()
}

fn one<'a>(m: &'a BTreeMap<String, Entry>, p: &Path, root: &Path) -> &'a Entry {
    let r = rel(p, root);
    m.get(&r)
        .unwrap_or_else(|| panic!("{r} not in the scan: {:?}", m.keys()))
}

fn prescription(order: &str, occurred: &str) -> Record {
    Record::new("OMP-01", "20261120", order, occurred)
}

#[test]
fn e01_files_being_written_are_not_settled_and_changed_files_are_read_again() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let path = s
        .put(&p, &prescription("000000000000001", "20261120103000000"))
        .unwrap();
    let mtime = fs::metadata(&path)
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    assert!(
        !settled(mtime, now, 10_000_000_000),
        "a file written just now is not read yet"
    );
    assert!(settled(mtime, now + 10_000_000_000, 10_000_000_000));

    // The index reads a file again when its size or mtime changed (the EMR appended to it).
    let mut index = Index::open_in_memory().unwrap();
    let (_, changes) = index
        .update(s.root(), &Options::standard(), &mut |_| {})
        .unwrap();
    assert_eq!(changes.read, 1);
    let (_, changes) = index
        .update(s.root(), &Options::standard(), &mut |_| {})
        .unwrap();
    assert_eq!(changes.read, 0, "an unchanged file is not read again");
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(b"NTE|1||appended\r");
    fs::write(&path, &bytes).unwrap();
    let (_, changes) = index
        .update(s.root(), &Options::standard(), &mut |_| {})
        .unwrap();
    assert_eq!(changes.read, 1);
    assert_eq!(changes.changed, vec![rel(&path, s.root())]);
}

/// Renames the file the scanner is about to read, as an EMR doing an update would.
struct RenameBeforeRead {
    target: PathBuf,
    renamed_to: PathBuf,
    new_current: (PathBuf, Vec<u8>),
    done: bool,
}

impl ContentCache for RenameBeforeRead {
    fn lookup(&mut self, _path: &str, _: u64, _: i128) -> Option<Content> {
        if !self.done {
            self.done = true;
            fs::rename(&self.target, &self.renamed_to).unwrap();
            fs::write(&self.new_current.0, &self.new_current.1).unwrap();
        }
        None
    }
}

#[test]
fn e02_a_file_renamed_between_listing_and_reading_makes_the_folder_be_listed_again() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let old = prescription("000000000000001", "20261120103000000");
    let new = prescription("000000000000001", "20261120113000000");
    let path = s.put(&p, &old).unwrap();
    let dir = path.parent().unwrap().to_owned();
    let bytes = s.bytes(&p, &new);
    let mut cache = RenameBeforeRead {
        target: path.clone(),
        renamed_to: dir.join(old.file_name(&p.id, Flag::Superseded)),
        new_current: (dir.join(new.file_name(&p.id, Flag::Current)), bytes),
        done: false,
    };
    let mut entries = Vec::new();
    scan::scan(s.root(), &Options::standard(), &mut cache, &mut |e| {
        entries.push(e)
    })
    .unwrap();
    let statuses: Vec<(String, Status)> = entries
        .iter()
        .map(|e| (e.path.rsplit('/').next().unwrap().to_owned(), e.status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (old.file_name(&p.id, Flag::Superseded), Status::Superseded),
            (new.file_name(&p.id, Flag::Current), Status::Current)
        ]
    );
    assert!(entries.iter().all(|e| e.reason.is_none()));
}

#[test]
fn e03_a_key_is_deleted_only_after_a_confirming_second_scan() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let r = prescription("000000000000001", "20261120103000000");
    let path = s.put(&p, &r).unwrap();
    let key = Key {
        patient_id: p.id.clone(),
        care_date: r.care_date.clone(),
        data_type: r.data_type.clone(),
        order_no: r.order_no.clone(),
    };
    let has_current = |root: &Path| {
        scan(root)
            .values()
            .any(|e| e.key().as_ref() == Some(&key) && e.status == Status::Current)
    };
    let mut gate = DeletionGate::new(30_000_000_000);
    assert_eq!(
        gate.observe(&key, has_current(s.root()), 0),
        KeyDecision::Current
    );
    // The EMR renamed _1 to _2 and has not written the new _1 yet.
    fs::rename(
        &path,
        path.with_file_name(r.file_name(&p.id, Flag::Superseded)),
    )
    .unwrap();
    // Only _2 left: the scanner keeps the newest as current (NO_CURRENT), so nothing is lost.
    assert!(has_current(s.root()));
    fs::remove_file(path.with_file_name(r.file_name(&p.id, Flag::Superseded))).unwrap();
    assert_eq!(
        gate.observe(&key, has_current(s.root()), 1_000_000_000),
        KeyDecision::Wait
    );
    assert_eq!(
        gate.observe(&key, has_current(s.root()), 20_000_000_000),
        KeyDecision::Wait
    );
    assert_eq!(
        gate.observe(&key, has_current(s.root()), 31_000_000_000),
        KeyDecision::Delete
    );
}

#[test]
fn e04_duplicate_current_files_take_the_newest_and_raise_an_anomaly() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let a = s
        .put(&p, &prescription("000000000000001", "20261120103000000"))
        .unwrap();
    let b = s
        .put(&p, &prescription("000000000000001", "20261120113000000"))
        .unwrap();
    let m = scan(s.root());
    let (a, b) = (one(&m, &a, s.root()), one(&m, &b, s.root()));
    assert_eq!(
        (b.status, b.reason),
        (Status::Current, Some(Reason::DuplicateCurrent))
    );
    assert_eq!(
        (a.status, a.reason),
        (Status::Superseded, Some(Reason::DuplicateCurrent))
    );
}

#[test]
fn e05_flag_semantics() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    // Update by the book: _1 → _2, new _1.
    let v1 = prescription("000000000000001", "20261120103000000");
    let v2 = prescription("000000000000001", "20261120113000000");
    s.put(&p, &v1).unwrap();
    let cur = s.update(&p, &v1, &v2, false).unwrap();
    // Update by a legacy writer: _1 → _0, new _1.
    let l1 = prescription("000000000000002", "20261120103000000");
    let l2 = prescription("000000000000002", "20261120113000000");
    s.put(&p, &l1).unwrap();
    let legacy_cur = s.update(&p, &l1, &l2, true).unwrap();
    // A delete: every version → _0, plus a tombstone.
    let d1 = prescription("000000000000003", "20261120103000000");
    let d2 = prescription("000000000000003", "20261120113000000");
    s.put(&p, &d1).unwrap();
    s.update(&p, &d1, &d2, false).unwrap();
    let tomb = prescription("000000000000003", "20261120123000000").with_note("削除");
    s.delete(&p, &d2, &tomb).unwrap();
    let m = scan(s.root());
    let by_order = |o: &str| {
        m.values()
            .filter(|e| e.order_no.as_deref() == Some(o))
            .map(|e| (e.flag.unwrap(), e.status))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        by_order("000000000000001"),
        vec![(2, Status::Superseded), (1, Status::Current)]
    );
    assert_eq!(one(&m, &cur, s.root()).status, Status::Current);
    assert_eq!(
        by_order("000000000000002"),
        vec![(0, Status::Superseded), (1, Status::Current)]
    );
    assert_eq!(one(&m, &legacy_cur, s.root()).reason, None);
    assert_eq!(by_order("000000000000003"), vec![(0, Status::Deleted); 3]);
    assert!(m.values().all(|e| e.reason.is_none()), "{m:#?}");
}

#[test]
fn e06_a_cancel_event_in_the_same_key_cancels() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let admit = Record::new("ADT-22", "20261120", DUMMY_ORDER_NO, "20261120100000000");
    let cancel = Record::new("ADT-22", "20261120", DUMMY_ORDER_NO, "20261120110000000")
        .with_message_type("ADT^A11");
    s.put(&p, &admit).unwrap();
    let c = s.put(&p, &cancel).unwrap();
    let m = scan(s.root());
    let cur = m.values().find(|e| e.status == Status::Current).unwrap();
    assert_eq!(cur.path, rel(&c, s.root()));
    assert_eq!(cur.message_type.as_deref(), Some("ADT^A11"));
    assert!(cur.cancels, "admission cancelled");
    // The same for the other cancel events.
    for (dt, ev) in [
        ("ADT-42", "ADT^A12"),
        ("ADT-52", "ADT^A13"),
        ("ADT-51", "ADT^A25"),
        ("ADT-41", "ADT^A26"),
        ("ADT-21", "ADT^A27"),
        ("ADT-31", "ADT^A52"),
        ("ADT-32", "ADT^A53"),
        ("ADT-01", "ADT^A55"),
        ("ADT-00", "ADT^A23"),
    ] {
        let r =
            Record::new(dt, "20261120", DUMMY_ORDER_NO, "20261120120000000").with_message_type(ev);
        let path = s.put(&p, &r).unwrap();
        let m = scan(s.root());
        let e = one(&m, &path, s.root());
        assert!(e.cancels && e.reason.is_none(), "{dt} {ev}: {e:?}");
    }
}

#[test]
fn e07_snapshot_types_replace_the_whole_state() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let v1 = Record::new("ADT-61", "-", DUMMY_ORDER_NO, "20261120100000000").with_note("卵;そば");
    let v2 = Record::new("ADT-61", "-", DUMMY_ORDER_NO, "20261121100000000").with_note("そば");
    s.put(&p, &v1).unwrap();
    let cur = s.update(&p, &v1, &v2, false).unwrap();
    let m = scan(s.root());
    let current: Vec<&Entry> = m.values().filter(|e| e.status == Status::Current).collect();
    assert_eq!(current.len(), 1, "one snapshot is the state");
    assert_eq!(current[0].path, rel(&cur, s.root()));
    assert!(ssmix2::datatype::lookup("ADT-61").unwrap().snapshot);
    assert!(ssmix2::datatype::lookup("PPR-01").unwrap().snapshot);
    assert!(ssmix2::datatype::lookup("ADT-00").unwrap().snapshot);
}

#[test]
fn e08_the_same_bytes_twice_are_one_content() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let r1 = prescription("000000000000001", "20261120103000000");
    let bytes = s.bytes(&p, &r1);
    let a = s.put_bytes(&p, &r1, Flag::Superseded, &bytes).unwrap();
    // Re-sent with a new 発生日時 and the identical body: a version bump, no data change.
    let r2 = prescription("000000000000001", "20261120113000000");
    let b = s.put_bytes(&p, &r2, Flag::Current, &bytes).unwrap();
    let mut index = Index::open_in_memory().unwrap();
    let mut seen = Vec::new();
    let (_, first) = index
        .update(s.root(), &Options::standard(), &mut |e| {
            seen.push(e.clone())
        })
        .unwrap();
    assert_eq!(first.added.len(), 2);
    let m: BTreeMap<_, _> = seen.into_iter().map(|e| (e.path.clone(), e)).collect();
    assert_eq!(one(&m, &a, s.root()).sha256, one(&m, &b, s.root()).sha256);
    // Scanning again changes nothing.
    let (_, again) = index
        .update(s.root(), &Options::standard(), &mut |_| {})
        .unwrap();
    assert!(again.added.is_empty() && again.changed.is_empty() && again.removed.is_empty());
}

#[test]
fn e09_unknown_data_types_are_inventoried_and_reported() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let mut paths = Vec::new();
    for t in ["ADT-62", "OMG-04", "ZZZ-01", "omp-01"] {
        paths.push(
            s.put(
                &p,
                &Record::new(t, "20261120", "000000000000001", "20261120103000000")
                    .with_message_type("RDE^O11"),
            )
            .unwrap(),
        );
    }
    let ok = s
        .put(&p, &prescription("000000000000001", "20261120103000000"))
        .unwrap();
    let m = scan(s.root());
    for path in &paths {
        let e = one(&m, path, s.root());
        assert_eq!(
            (e.status, e.reason),
            (Status::Current, Some(Reason::UnknownDataType)),
            "{}",
            e.path
        );
    }
    assert_eq!(one(&m, &ok, s.root()).reason, None);
}

#[test]
fn e10_name_and_path_mismatches_are_quarantined() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    // An OMP-11 file in the ADT-31 folder (as in NHO's fixtures).
    let r = Record::new("OMP-11", "20261120", "000000000000001", "20261120103000000");
    let bytes = s.bytes(&p, &r);
    let misplaced = s
        .write_raw(
            &PathBuf::from("000/012/0000123456/20261120/ADT-31")
                .join(r.file_name(&p.id, Flag::Current)),
            &bytes,
        )
        .unwrap();
    let six = s.write_raw(Path::new("000/012/0000123456/20261120/OMP-11/0000123456_20261120_OMP-11_000000000000001_20261120103000000_1"), &bytes).unwrap();
    let eight = s.write_raw(Path::new("000/012/0000123456/20261120/OMP-11/0000123456_20261120_OMP-11_000000000000001_20261120103000000_01_1_x"), &bytes).unwrap();
    let wrong_hash = s
        .write_raw(
            &PathBuf::from("000/013/0000123456/20261120/OMP-11")
                .join(r.file_name(&p.id, Flag::Current)),
            &bytes,
        )
        .unwrap();
    let m = scan(s.root());
    assert_eq!(
        one(&m, &misplaced, s.root()).reason,
        Some(Reason::PathMismatch)
    );
    assert_eq!(
        one(&m, &wrong_hash, s.root()).reason,
        Some(Reason::PathMismatch)
    );
    assert_eq!(one(&m, &six, s.root()).reason, Some(Reason::BadName));
    assert_eq!(one(&m, &eight, s.root()).reason, Some(Reason::BadName));
    assert!(m.values().all(|e| e.status == Status::Quarantined));
}

#[test]
fn e11_patient_ids() {
    let (_d, mut s) = storage();
    // Leading zeros kept; IDs shorter than 6 taken as found.
    let zeros = Patient::sample("0000000001");
    let a = s
        .put(
            &zeros,
            &Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000"),
        )
        .unwrap();
    let short = Patient::sample("12345");
    let b = s
        .put(
            &short,
            &Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000"),
        )
        .unwrap();
    let mut bad = Vec::new();
    for id in ["12_3456", "12 3456", "１２３４５６"] {
        let p = Patient::sample(id);
        let r = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000");
        let bytes = s.bytes(&p, &r);
        let folder = PathBuf::from("123")
            .join("456")
            .join(id)
            .join("-")
            .join("ADT-00");
        bad.push(
            s.write_raw(&folder.join(r.file_name(id, Flag::Current)), &bytes)
                .unwrap(),
        );
    }
    // On a case-insensitive share, abc123 and ABC123 are one patient.
    let lower = Patient::sample("abc123");
    let upper = Patient::sample("ABC123");
    let c = s
        .put(
            &lower,
            &Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000"),
        )
        .unwrap();
    let d = s
        .put(
            &upper,
            &Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000"),
        )
        .unwrap();
    let m = scan(s.root());
    let e = one(&m, &a, s.root());
    assert_eq!(
        (e.status, e.patient_id.as_deref()),
        (Status::Current, Some("0000000001"))
    );
    assert!(e.path.starts_with("000/000/0000000001/"));
    assert_eq!(one(&m, &b, s.root()).status, Status::Current);
    for path in &bad {
        assert_eq!(
            one(&m, path, s.root()).reason,
            Some(Reason::BadPatientId),
            "{path:?}"
        );
    }
    for path in [&c, &d] {
        let e = one(&m, path, s.root());
        assert_eq!(
            (e.status, e.reason),
            (Status::Current, Some(Reason::CaseCollision)),
            "{}",
            e.path
        );
    }
}

fn adt00_bytes(s: &mut Storage, p: &Patient) -> (Record, Vec<u8>) {
    let r = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000");
    let bytes = s.bytes(p, &r);
    (r, bytes)
}

#[test]
fn e12_encodings() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let (r, pure) = adt00_bytes(&mut s, &p);
    // a) pure ISO-2022-JP
    let a = s.put_bytes(&p, &r, Flag::Current, &pure).unwrap();
    // b) a byte 0xFC in the message
    let p2 = Patient::sample("0000123457");
    let (r2, mut b_bytes) = adt00_bytes(&mut s, &p2);
    let at = b_bytes.len() - 2;
    b_bytes.insert(at, 0xfc);
    let b = s.put_bytes(&p2, &r2, Flag::Current, &b_bytes).unwrap();
    // c) the kana name in half-width katakana (ESC ( I): ﾄｳｷｮｳ = 0x44 0x33 0x37 0x2e 0x33
    let p3 = Patient::sample("0000123458");
    let (r3, c_bytes) = adt00_bytes(&mut s, &p3);
    let kana = encode("トウキョウ").bytes;
    let c_bytes = replace(&c_bytes, &kana, b"\x1b(ID37.3\x1b(B");
    let c = s.put_bytes(&p3, &r3, Flag::Current, &c_bytes).unwrap();
    // d) a JIS X 0212 character in the address
    let p4 = Patient::sample("0000123459");
    let (r4, d_bytes) = adt00_bytes(&mut s, &p4);
    let d_bytes = replace(&d_bytes, b"^JPN^H^", b"^JPN^H^\x1b$(D\x30\x21\x1b(B");
    let d = s.put_bytes(&p4, &r4, Flag::Current, &d_bytes).unwrap();
    // e) the file ends still in JIS mode
    let p5 = Patient::sample("0000123460");
    let r5 = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000").with_note("東京");
    let mut e_bytes = s.bytes(&p5, &r5);
    let tail = b"\x1b(B\r";
    assert!(e_bytes.ends_with(tail));
    e_bytes.truncate(e_bytes.len() - tail.len());
    let e = s.put_bytes(&p5, &r5, Flag::Current, &e_bytes).unwrap();
    let m = scan(s.root());
    let ea = one(&m, &a, s.root());
    assert_eq!((ea.status, ea.reason), (Status::Current, None));
    let eb = one(&m, &b, s.root());
    assert_eq!(
        (eb.status, eb.reason),
        (Status::Quarantined, Some(Reason::CharsetViolation))
    );
    let ec = one(&m, &c, s.root());
    assert_eq!(
        (ec.status, ec.reason),
        (Status::Current, Some(Reason::HalfWidthKana))
    );
    assert_eq!(
        ec.patient_name.as_ref().unwrap().phonetic.as_deref(),
        Some("トウキョウ\u{3000}ジニチ")
    );
    let ed = one(&m, &d, s.root());
    assert_eq!(
        (ed.status, ed.reason),
        (Status::Current, Some(Reason::JisX0212))
    );
    let ee = one(&m, &e, s.root());
    assert_eq!(
        (ee.status, ee.reason),
        (Status::Current, Some(Reason::UnterminatedJis))
    );
    // f) variant characters are one form for matching and hashing.
    use ssmix2::decode::normalize_for_matching as n;
    assert_eq!(n("〜−‖¢¬"), n("～－∥￠￢"));
}

fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = haystack
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    [&haystack[..at], to, &haystack[at + from.len()..]].concat()
}

#[test]
fn e13_delimiters_inside_kanji_survive_a_round_trip() {
    let (_d, mut s) = storage();
    let p = Patient {
        address: "東京都日野市時計町".into(),
        ..Patient::sample("0000123456")
    };
    let r = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000");
    let path = s.put(&p, &r).unwrap();
    let raw = fs::read(&path).unwrap();
    assert!(
        raw.windows(4).any(|w| w == b"El5~"),
        "東京 is written with its `~` byte"
    );
    let m = scan(s.root());
    let e = one(&m, &path, s.root());
    assert_eq!(e.reason, None);
    assert_eq!(
        e.patient_name.as_ref().unwrap().ideographic.as_deref(),
        Some("東京\u{3000}時日")
    );
    // decode → parse → re-encode → decode: identical fields.
    let text = ssmix2::decode::decode(&raw).text;
    let again = ssmix2::decode::decode(&encode(&text).bytes).text;
    assert_eq!(text, again);
    let f1 = ssmix2::message::parse_file(&raw, None).fields.unwrap();
    let f2 = ssmix2::message::parse_file(&encode(&again).bytes, None)
        .fields
        .unwrap();
    assert_eq!(f1, f2);
    let m = ssmix2::hl7::parse(&text).unwrap();
    let pid = m.segment("PID").unwrap();
    assert!(
        m.component(pid.field(11), 8)
            .starts_with("東京都日野市時計町")
    );
}

#[test]
fn e14_framing_and_terminators() {
    let (_d, s) = storage();
    let mut paths = Vec::new();
    for (i, f) in [("\r\x1c", 0), ("\r", 1), ("", 2), ("\r\n", 3), ("\x0b", 4)]
        .iter()
        .enumerate()
    {
        let p = Patient::sample(&format!("00001234{i:02}"));
        let r = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000");
        let text = message(&p, &r, "1").trim_end_matches('\r').to_owned();
        let text = match f.1 {
            3 => format!("{}\r\n", text.replace('\r', "\r\n")),
            4 => format!("\x0b{text}\r\x1c\r"),
            _ => format!("{text}{}", f.0),
        };
        paths.push(
            s.put_bytes(&p, &r, Flag::Current, &encode(&text).bytes)
                .unwrap(),
        );
    }
    let m = scan(s.root());
    for path in &paths {
        let e = one(&m, path, s.root());
        assert_eq!(
            (e.status, e.reason, e.message_type.as_deref()),
            (Status::Current, None, Some("ADT^A08")),
            "{}",
            e.path
        );
        assert_eq!(
            e.patient_name.as_ref().unwrap().ideographic.as_deref(),
            Some("東京\u{3000}時日")
        );
    }
}

#[test]
fn e15_header_variants() {
    let (_d, s) = storage();
    let mut paths = Vec::new();
    for (i, (h18, h20)) in [
        ("~ISO IR87", "ISO 2022-1994"),
        ("~ISOIR87", "ISO2022-1994"),
        ("ISO IR87", " ISO 2022-1994"),
        ("", ""),
    ]
    .iter()
    .enumerate()
    {
        let p = Patient::sample(&format!("00001234{i:02}"));
        let r = Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000");
        let text =
            message(&p, &r, "1").replace("~ISO IR87||ISO 2022-1994", &format!("{h18}||{h20}"));
        paths.push(
            s.put_bytes(&p, &r, Flag::Current, &encode(&text).bytes)
                .unwrap(),
        );
    }
    let m = scan(s.root());
    for path in &paths {
        let e = one(&m, path, s.root());
        assert_eq!((e.status, e.reason), (Status::Current, None), "{}", e.path);
        assert_eq!(
            e.patient_name.as_ref().unwrap().ideographic.as_deref(),
            Some("東京\u{3000}時日")
        );
    }
}

#[test]
fn e16_times() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let a = s
        .put(&p, &prescription("000000000000001", "20111220224447339"))
        .unwrap();
    let b = s
        .put(&p, &prescription("000000000000002", "200802031630123"))
        .unwrap();
    let c = s
        .put(&p, &prescription("000000000000003", "20080203163012"))
        .unwrap();
    let m = scan(s.root());
    assert_eq!(
        one(&m, &a, s.root()).occurred_at.as_deref(),
        Some("2011-12-20T22:44:47.339+09:00")
    );
    assert_eq!(
        one(&m, &b, s.root()).occurred_at.as_deref(),
        Some("2008-02-03T16:30:12.3+09:00")
    );
    assert_eq!(
        one(&m, &c, s.root()).occurred_at.as_deref(),
        Some("2008-02-03T16:30:12+09:00")
    );
    let t = ssmix2::time::LocalTime::parse_hl7("20111220224447.3399").unwrap();
    assert_eq!(t.to_rfc3339(), "2011-12-20T22:44:47.3399+09:00");
    assert_eq!(
        ssmix2::time::LocalTime::parse_hl7("201112202100")
            .unwrap()
            .precision(),
        ssmix2::time::Precision::Minute
    );
}

#[test]
fn e17_corrupt_files_are_quarantined_and_retried_when_they_change() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let good = s.bytes(&p, &prescription("000000000000001", "20261120103000000"));
    let cases: [(&str, Vec<u8>, Reason); 4] = [
        ("000000000000001", Vec::new(), Reason::EmptyFile),
        (
            "000000000000002",
            b"PID|||0000123456^^^^PI\r".to_vec(),
            Reason::NotHl7,
        ),
        (
            "000000000000003",
            vec![0u8, 1, 2, 3, 0xff, 0xfe, 0x10],
            Reason::CharsetViolation,
        ),
        (
            "000000000000004",
            good[..good.len() / 3].to_vec(),
            Reason::Truncated,
        ),
    ];
    let mut paths = Vec::new();
    for (order, bytes, _) in &cases {
        paths.push(
            s.put_bytes(
                &p,
                &prescription(order, "20261120103000000"),
                Flag::Current,
                bytes,
            )
            .unwrap(),
        );
    }
    let mut index = Index::open_in_memory().unwrap();
    let mut seen = BTreeMap::new();
    index
        .update(s.root(), &Options::standard(), &mut |e| {
            seen.insert(e.path.clone(), e.clone());
        })
        .unwrap();
    for (path, (_, _, reason)) in paths.iter().zip(&cases) {
        let e = one(&seen, path, s.root());
        assert_eq!(e.status, Status::Quarantined, "{}", e.path);
        assert!(e.findings.contains(reason), "{}: {:?}", e.path, e.findings);
    }
    // The garbage file is also not HL7.
    assert!(
        one(&seen, &paths[2], s.root())
            .findings
            .contains(&Reason::NotHl7)
    );
    // The EMR finishes writing the truncated file: the next scan reads it again.
    fs::write(
        &paths[3],
        s.bytes(&p, &prescription("000000000000004", "20261120103000000")),
    )
    .unwrap();
    let (_, changes) = index
        .update(s.root(), &Options::standard(), &mut |_| {})
        .unwrap();
    assert_eq!(changes.read, 1);
    let row = index.get(&rel(&paths[3], s.root())).unwrap().unwrap();
    assert_eq!((row.status.as_str(), row.reason), ("current", None));
}

#[test]
fn e18_extended_storage_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::create(&dir.path().join("ext")).unwrap();
    // 180 characters (the IndexDB limit). Linux limits a name to 255 bytes, and the content
    // folder repeats the type folder, so the long one is mostly ASCII.
    let long = format!("L-DOC^経過_記録^99ZL01^{}^LN", "X".repeat(180 - 22));
    assert_eq!(long.chars().count(), 180);
    let folders = [
        "^経過記録^^11506-3^経過記録^LN",
        "L-JSPEED^災害時JSPEED記録^99ZL01^74465-6^災害時JSPEED記録^LN",
        long.as_str(),
    ];
    let mut expect = Vec::new();
    for (i, folder) in folders.iter().enumerate() {
        let base = PathBuf::from("000/012/0000123456/20261120").join(folder);
        // 7 fields (with 診療科), version 1 superseded by version 2; and a 6-field folder.
        let v1 = format!("0000123456_20261120_{folder}_2026112010_20261120100000000_01_2");
        let v2 = format!("0000123456_20261120_{folder}_2026112010_20261120110000000_01_1");
        let six = format!("0000123456_20261120_{folder}_2026112012_202611201200001_1");
        for (cf, status) in [
            (v1, Status::Superseded),
            (v2, Status::Current),
            (six, Status::Current),
        ] {
            let doc = s
                .write_raw(
                    &base.join(&cf).join("main_document.xml"),
                    format!("<ClinicalDocument>{i}</ClinicalDocument>").as_bytes(),
                )
                .unwrap();
            let img = s
                .write_raw(
                    &base.join(&cf).join("images").join("key.jpg"),
                    b"\xff\xd8\xff",
                )
                .unwrap();
            expect.push((doc, status));
            expect.push((img, status));
        }
    }
    let (entries, _) = scan::scan_all(s.root(), &Options::extended()).unwrap();
    let m: BTreeMap<_, _> = entries.into_iter().map(|e| (e.path.clone(), e)).collect();
    for (path, status) in &expect {
        let e = one(&m, path, s.root());
        assert_eq!((e.status, e.reason), (*status, None), "{}", e.path);
        assert!(e.data_type.as_deref().unwrap().contains('^'));
    }
    assert!(
        expect.iter().any(|(p, _)| p.as_os_str().len() > 260),
        "a full path over 260 characters"
    );
}

#[test]
fn e19_order_numbers() {
    let (_d, mut s) = storage();
    let p = Patient::sample("0000123456");
    let q = Patient::sample("0000123457");
    let thirteen = s
        .put(
            &p,
            &Record::new("OMG-01", "20111220", "2011122000300", "20111220224447000"),
        )
        .unwrap();
    // The dummy order number links nothing across patients or data types.
    let a = s
        .put(
            &p,
            &Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120100000000"),
        )
        .unwrap();
    let b = s
        .put(
            &q,
            &Record::new("ADT-00", "-", DUMMY_ORDER_NO, "20261120110000000"),
        )
        .unwrap();
    let c = s
        .put(
            &p,
            &Record::new("ADT-61", "-", DUMMY_ORDER_NO, "20261120120000000"),
        )
        .unwrap();
    let m = scan(s.root());
    let e = one(&m, &thirteen, s.root());
    assert_eq!(
        (e.status, e.reason, e.order_no.as_deref()),
        (Status::Current, None, Some("2011122000300"))
    );
    let keys: std::collections::BTreeSet<Key> = [&a, &b, &c]
        .iter()
        .map(|x| one(&m, x, s.root()).key().unwrap())
        .collect();
    assert_eq!(keys.len(), 3);
    for x in [&a, &b, &c] {
        assert_eq!(one(&m, x, s.root()).status, Status::Current);
    }
}
