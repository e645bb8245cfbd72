//! The test-data builder: writes SS-MIX2 storages the way an EMR does, in ISO-2022-JP that
//! follows the writer rules (E-20), for the tests, the benchmark and the demo.
//!
//! [`Patient`] and [`Record`] describe what to write; [`message`] renders an HL7 v2.5
//! message of the record's data type (with its care date in the field the guideline names,
//! so a well-formed record passes every check); [`Storage`] places files, updates them
//! (`_1` → `_2`, new `_1`) and deletes them (every version → `_0`, plus a tombstone).
//! Builders that test the reader's tolerance (wrong terminators, 8-bit bytes, half-width
//! kana) write raw bytes with [`Storage::write_raw`].

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::datatype;
use crate::encode::encode;
use crate::name::Flag;

/// A patient, with a kanji and a kana name.
#[derive(Debug, Clone)]
pub struct Patient {
    pub id: String,
    pub family: String,
    pub given: String,
    pub family_kana: String,
    pub given_kana: String,
    /// `YYYYMMDD`.
    pub birth_date: String,
    /// `M`, `F`, `O` or `U`.
    pub sex: String,
    pub address: String,
}

impl Patient {
    /// A sample patient whose names contain kanji with delimiter bytes in JIS (東京 has `~`,
    /// 日 has `|`, 時 has `~`).
    pub fn sample(id: &str) -> Patient {
        Patient {
            id: id.to_owned(),
            family: "東京".into(),
            given: "時日".into(),
            family_kana: "トウキョウ".into(),
            given_kana: "ジニチ".into(),
            birth_date: "19480405".into(),
            sex: "M".into(),
            address: "東京都千代田区日比谷一丁目".into(),
        }
    }
}

/// One record: a file of the standardized storage.
#[derive(Debug, Clone)]
pub struct Record {
    pub data_type: String,
    /// `YYYYMMDD` or `-`.
    pub care_date: String,
    pub order_no: String,
    /// 発生日時 (normally 17 digits).
    pub occurred: String,
    /// 診療科コード or `-`.
    pub department: String,
    /// The message type to write; `None`: the data type's normal one.
    pub message_type: Option<String>,
    /// Free text put into the message (an NTE segment), to vary content.
    pub note: String,
}

impl Record {
    /// A record of `data_type` with defaults that fit it (ADT-00 and the other undated
    /// types under `-` with the dummy order number).
    pub fn new(data_type: &str, care_date: &str, order_no: &str, occurred: &str) -> Record {
        let undated = matches!(data_type, "ADT-00" | "ADT-01" | "ADT-61" | "PPR-01");
        Record {
            data_type: data_type.to_owned(),
            care_date: if undated {
                "-".to_owned()
            } else {
                care_date.to_owned()
            },
            order_no: order_no.to_owned(),
            occurred: occurred.to_owned(),
            department: if data_type == "ADT-00" {
                "-".to_owned()
            } else {
                "01".to_owned()
            },
            message_type: None,
            note: String::new(),
        }
    }

    pub fn with_message_type(mut self, t: &str) -> Record {
        self.message_type = Some(t.to_owned());
        self
    }

    pub fn with_note(mut self, note: &str) -> Record {
        self.note = note.to_owned();
        self
    }

    /// The file name with flag `flag`.
    pub fn file_name(&self, patient_id: &str, flag: Flag) -> String {
        format!(
            "{patient_id}_{}_{}_{}_{}_{}_{}",
            self.care_date,
            self.data_type,
            self.order_no,
            self.occurred,
            self.department,
            flag.digit()
        )
    }

    /// The folder of the record, relative to the root (IDs of 6 or more characters use the
    /// hash folders; shorter ones repeat the ID's prefix, as found in the wild).
    pub fn folder(&self, patient_id: &str) -> PathBuf {
        let (l1, l2) = hash_folders(patient_id);
        [l1, l2, patient_id, &self.care_date, &self.data_type]
            .iter()
            .collect()
    }

    fn message_type(&self) -> String {
        self.message_type.clone().unwrap_or_else(|| {
            datatype::lookup(&self.data_type)
                .map_or("ADT^A08", |t| t.messages[0])
                .to_owned()
        })
    }
}

pub use crate::name::hash_folders;

fn seg(id: &str, fields: &[(usize, &str)]) -> String {
    let last = fields.iter().map(|(n, _)| *n).max().unwrap_or(0);
    let mut parts = vec![String::new(); last + 1];
    parts[0] = id.to_owned();
    for (n, v) in fields {
        parts[*n] = (*v).to_owned();
    }
    parts.join("|")
}

/// Renders the HL7 v2.5 message of a record (Unicode text; [`encode`] turns it into bytes).
/// Segments end with CR; the care date is in the field the guideline names for the type.
pub fn message(p: &Patient, r: &Record, control_id: &str) -> String {
    let msg_type = r.message_type();
    let (code, event) = msg_type.split_once('^').unwrap_or((&msg_type, ""));
    let sent = &r.occurred[..14.min(r.occurred.len())];
    let day = if r.care_date == "-" {
        &sent[..8]
    } else {
        &r.care_date[..]
    };
    let day_time = format!("{day}0930");
    let mut segs = vec![format!(
        "MSH|^~\\&|HIS|1311234567|GW|RCV|{sent}||{code}^{event}^{code}_{event}|{control_id}|P|2.5||||||~ISO IR87||ISO 2022-1994|SS-MIX2_1.20^SS-MIX2^1.2.392.200250.2.1.100.1.2.120^ISO"
    )];
    let evn6 = if matches!(event, "A21" | "A52" | "A22" | "A02" | "A12") {
        day_time.as_str()
    } else {
        ""
    };
    segs.push(seg("EVN", &[(2, sent), (6, evn6)]));
    let name = format!(
        "{}^{}^^^^^L^I~{}^{}^^^^^L^P",
        p.family, p.given, p.family_kana, p.given_kana
    );
    let address = format!("^^^^100-0011^JPN^H^{}", p.address);
    let pid3 = format!("{}^^^^PI", p.id);
    segs.push(seg(
        "PID",
        &[
            (1, "0001"),
            (3, &pid3),
            (5, &name),
            (7, &p.birth_date),
            (8, &p.sex),
            (11, &address),
        ],
    ));
    if code == "ADT" {
        let pv1_44 = if matches!(event, "A04" | "A01" | "A11") {
            day_time.as_str()
        } else {
            ""
        };
        let pv1_45 = if matches!(event, "A03" | "A13") {
            day_time.as_str()
        } else {
            ""
        };
        segs.push(seg(
            "PV1",
            &[
                (1, "0001"),
                (2, "O"),
                (3, "01^^^^^C"),
                (10, "01"),
                (44, pv1_44),
                (45, pv1_45),
            ],
        ));
        let pv2 = match event {
            "A14" | "A27" | "A15" | "A26" => Some(8),
            "A16" | "A25" => Some(9),
            "A53" => Some(47),
            _ => None,
        };
        if let Some(n) = pv2 {
            segs.push(seg("PV2", &[(n, &day_time)]));
        }
    } else {
        let orc9 = format!("{day}093000");
        segs.push(seg(
            "ORC",
            &[
                (1, "NW"),
                (2, &r.order_no),
                (9, &orc9),
                (12, "110^医師^一郎^^^^^^^L^^^^^I"),
            ],
        ));
        match code {
            "RDE" => segs.push(seg(
                "RXE",
                &[
                    (2, "610406079^ロキソニン錠６０ｍｇ^HOT9"),
                    (3, "1"),
                    (5, "TAB^錠^MR9P"),
                ],
            )),
            "RAS" => segs.push(seg(
                "RXA",
                &[
                    (1, "0"),
                    (2, "1"),
                    (3, &format!("{day}100000")),
                    (5, "610406079^ロキソニン錠６０ｍｇ^HOT9"),
                ],
            )),
            "OUL" => {
                segs.push(seg(
                    "SPM",
                    &[
                        (1, "1"),
                        (4, "023^血清^JC10"),
                        (17, &format!("{day}083000")),
                    ],
                ));
                segs.push(seg(
                    "OBX",
                    &[
                        (1, "1"),
                        (2, "NM"),
                        (3, "3B035000002327201^ＡＳＴ^JC10"),
                        (5, "24"),
                        (6, "U/L^^ISO+"),
                    ],
                ));
            }
            "OMI" | "ORU" => segs.push(seg(
                "OBR",
                &[
                    (1, "1"),
                    (2, &r.order_no),
                    (4, "G0001^胸部単純撮影^JJ1017"),
                    (7, &format!("{day}110000")),
                ],
            )),
            _ => segs.push(seg(
                "OBR",
                &[(1, "1"), (2, &r.order_no), (4, "G0001^胸部単純撮影^JJ1017")],
            )),
        }
    }
    if !r.note.is_empty() {
        segs.push(seg("NTE", &[(1, "1"), (3, &r.note)]));
    }
    let mut text = segs.join("\r");
    text.push('\r');
    text
}

/// A storage being built. The builder writes like an EMR (never partially: a temporary name,
/// then a rename), except where a test asks for raw bytes.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
    control: u64,
}

impl Storage {
    pub fn create(root: &Path) -> io::Result<Storage> {
        fs::create_dir_all(root)?;
        Ok(Storage {
            root: root.to_owned(),
            control: 0,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn next_control(&mut self) -> String {
        self.control += 1;
        format!("{:014}", self.control)
    }

    /// Writes `bytes` at `rel` (creating folders), through a temporary name.
    pub fn write_raw(&self, rel: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
        let path = self.root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
        ));
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
        }
        fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The encoded message of a record, as the storage would hold it.
    pub fn bytes(&mut self, p: &Patient, r: &Record) -> Vec<u8> {
        let control = self.next_control();
        encode(&message(p, r, &control)).bytes
    }

    /// Writes a record as the current version (`_1`), without touching other versions.
    pub fn put(&mut self, p: &Patient, r: &Record) -> io::Result<PathBuf> {
        let bytes = self.bytes(p, r);
        self.put_bytes(p, r, Flag::Current, &bytes)
    }

    /// Writes given bytes under a record's name with a flag.
    pub fn put_bytes(
        &self,
        p: &Patient,
        r: &Record,
        flag: Flag,
        bytes: &[u8],
    ) -> io::Result<PathBuf> {
        let rel = r.folder(&p.id).join(r.file_name(&p.id, flag));
        self.write_raw(&rel, bytes)
    }

    /// An update: renames the current `_1` files of the key to `_2` (or `_0`, as legacy
    /// writers do, when `legacy`), then writes the new version as `_1`.
    pub fn update(
        &mut self,
        p: &Patient,
        old: &Record,
        new: &Record,
        legacy: bool,
    ) -> io::Result<PathBuf> {
        let dir = self.root.join(old.folder(&p.id));
        let from = dir.join(old.file_name(&p.id, Flag::Current));
        let to = dir.join(old.file_name(
            &p.id,
            if legacy {
                Flag::Deleted
            } else {
                Flag::Superseded
            },
        ));
        fs::rename(from, to)?;
        self.put(p, new)
    }

    /// A delete: renames every `_1` and `_2` version of the key to `_0` and writes the
    /// deletion message as a tombstone with flag `0` (the standardized storage's procedure).
    pub fn delete(&mut self, p: &Patient, key: &Record, tombstone: &Record) -> io::Result<PathBuf> {
        let dir = self.root.join(key.folder(&p.id));
        let prefix = format!(
            "{}_{}_{}_{}_",
            p.id, key.care_date, key.data_type, key.order_no
        );
        for entry in fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && (name.ends_with("_1") || name.ends_with("_2")) {
                let renamed = format!("{}0", &name[..name.len() - 1]);
                fs::rename(dir.join(&name), dir.join(renamed))?;
            }
        }
        let bytes = self.bytes(p, tombstone);
        self.put_bytes(p, tombstone, Flag::Deleted, &bytes)
    }
}

/// A small, fully valid storage: `patients` patients, each with demographics (ADT-00), an
/// admission (ADT-22), a prescription (OMP-01) and a lab result (OML-11). Patient IDs are
/// `first_id`, `first_id + 1`, ... zero-padded to 10 digits.
pub fn sample_storage(root: &Path, first_id: u64, patients: u64) -> io::Result<Vec<Patient>> {
    let mut s = Storage::create(root)?;
    let mut out = Vec::new();
    for i in 0..patients {
        let p = Patient::sample(&format!("{:010}", first_id + i));
        s.put(
            &p,
            &Record::new("ADT-00", "-", datatype::DUMMY_ORDER_NO, "20261120093000123"),
        )?;
        s.put(
            &p,
            &Record::new(
                "ADT-22",
                "20261120",
                datatype::DUMMY_ORDER_NO,
                "20261120100000000",
            ),
        )?;
        s.put(
            &p,
            &Record::new(
                "OMP-01",
                "20261120",
                &format!("{:015}", 1000 + i),
                "20261120103000000",
            ),
        )?;
        s.put(
            &p,
            &Record::new(
                "OML-11",
                "20261120",
                &format!("{:015}", 5000 + i),
                "20261120113000000",
            ),
        )?;
        out.push(p);
    }
    Ok(out)
}

/// Every file under `root`, hidden ones included: relative path (`/`-separated) → SHA-256
/// (hex). For tests that compare a replica with what it must hold.
pub fn digests(root: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::{Digest as _, Sha256};
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if let (Ok(rel), Ok(bytes)) = (path.strip_prefix(root), fs::read(&path)) {
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                out.insert(rel, crate::scan::hex(&Sha256::digest(&bytes)));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}
