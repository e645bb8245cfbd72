//! The key fields of an SS-MIX2 message (MSH, EVN, PID, PV1, ORC), and the checks of a
//! message against the folder it is in.

use serde::Serialize;

use crate::datatype::{self, CareDateSource};
use crate::decode::{Decoded, decode};
use crate::hl7::{self, Message};
use crate::name::Key;
use crate::reason::{Findings, Reason};
use crate::time::LocalTime;

/// A patient's name from PID-5: the ideographic (kanji, `I`) and phonetic (kana, `P`)
/// repetitions, family and given name joined by one full-width space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PatientName {
    pub ideographic: Option<String>,
    pub phonetic: Option<String>,
}

/// The fields the inventory and the sync use. Times are Japan local time (+09:00).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// `MSH-9.1^MSH-9.2`, e.g. `ADT^A08`.
    pub message_type: String,
    pub control_id: String,
    /// MSH-7.
    pub sent_at: Option<LocalTime>,
    /// MSH-7 as written (the tie-breaker after 発生日時, E-04).
    pub sent_raw: String,
    /// EVN-2 and EVN-6.
    pub recorded_at: Option<LocalTime>,
    pub event_occurred_at: Option<LocalTime>,
    /// PID-3.1 (of the `PI` repetition, else the first).
    pub patient_id: String,
    pub name: PatientName,
    /// PID-7 (`YYYYMMDD`) and PID-8.
    pub birth_date: String,
    pub sex: String,
    /// PV1-2 (`I`/`O`) and PV1-10.
    pub patient_class: String,
    pub hospital_service: String,
    pub admitted_at: Option<LocalTime>,
    pub discharged_at: Option<LocalTime>,
    /// ORC-1, ORC-2.1 and ORC-9.
    pub order_control: String,
    pub placer_order_no: String,
    pub order_entered_at: Option<LocalTime>,
    /// The message's trigger event cancels what an earlier one did (E-06: A11, A23, ...), or
    /// an order is cancelled (ORC-1 `CA`).
    pub cancels: bool,
}

/// A file read and understood as far as it could be.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub decoded: Decoded,
    /// `None` when the message could not be tokenised (the reason is in `findings`).
    pub fields: Option<Fields>,
    pub findings: Findings,
}

fn time(m: &Message<'_>, seg: &str, n: usize) -> Option<LocalTime> {
    let v = m.value(seg, n, 1);
    if v.is_empty() {
        None
    } else {
        LocalTime::parse_hl7(&v).ok()
    }
}

fn join_name(family: &str, given: &str) -> Option<String> {
    match (family.is_empty(), given.is_empty()) {
        (true, true) => None,
        (false, true) => Some(family.to_owned()),
        (true, false) => Some(given.to_owned()),
        (false, false) => Some(format!("{family}\u{3000}{given}")),
    }
}

fn patient_name(m: &Message<'_>) -> PatientName {
    let mut name = PatientName::default();
    let Some(pid) = m.segment("PID") else {
        return name;
    };
    for (i, rep) in m.repetitions(pid.field(5)).enumerate() {
        let family = m.unescape(m.component(rep, 1));
        let given = m.unescape(m.component(rep, 2));
        let joined = join_name(&family, &given);
        match m.component(rep, 8) {
            "I" => name.ideographic = name.ideographic.or(joined),
            "P" => name.phonetic = name.phonetic.or(joined),
            // No representation code: the first repetition is taken as the written name.
            "" if i == 0 => name.ideographic = name.ideographic.or(joined),
            _ => {}
        }
    }
    name
}

fn patient_id(m: &Message<'_>) -> String {
    let Some(pid) = m.segment("PID") else {
        return String::new();
    };
    let mut first = None;
    for rep in m.repetitions(pid.field(3)) {
        let id = m.unescape(m.component(rep, 1));
        if m.component(rep, 5) == "PI" {
            return id;
        }
        first.get_or_insert(id);
    }
    first.unwrap_or_default()
}

/// Extracts the key fields of a tokenised message.
pub fn fields(m: &Message<'_>) -> Fields {
    let message_type = format!("{}^{}", m.value("MSH", 9, 1), m.value("MSH", 9, 2));
    let order_control = m.value("ORC", 1, 1);
    let cancels = datatype::TABLE
        .iter()
        .any(|t| t.cancels.contains(&message_type.as_str()))
        || order_control == "CA";
    Fields {
        control_id: m.value("MSH", 10, 1),
        sent_at: time(m, "MSH", 7),
        sent_raw: m.value("MSH", 7, 1),
        recorded_at: time(m, "EVN", 2),
        event_occurred_at: time(m, "EVN", 6),
        patient_id: patient_id(m),
        name: patient_name(m),
        birth_date: m.value("PID", 7, 1),
        sex: m.value("PID", 8, 1),
        patient_class: m.value("PV1", 2, 1),
        hospital_service: m.value("PV1", 10, 1),
        admitted_at: time(m, "PV1", 44),
        discharged_at: time(m, "PV1", 45),
        placer_order_no: m.value("ORC", 2, 1),
        order_entered_at: time(m, "ORC", 9),
        order_control,
        cancels,
        message_type,
    }
}

/// The segments a message of this type must have; a message without them is `TRUNCATED`.
fn required_segments(message_type: &str) -> &'static [&'static str] {
    match message_type.split('^').next().unwrap_or("") {
        "ADT" => &["EVN", "PID"],
        "PPR" | "OMD" | "RDE" | "RAS" | "OML" | "OUL" | "OMG" | "OMI" | "ORU" => &["PID"],
        _ => &[],
    }
}

/// Decodes, tokenises and extracts a file's content, checking it against its key (patient
/// and data type from the folders). Never fails: what is wrong is in `findings`.
pub fn parse_file(bytes: &[u8], key: Option<&Key>) -> Parsed {
    let decoded = decode(bytes);
    let mut findings = decoded.findings.clone();
    if bytes.is_empty() {
        findings.add(Reason::EmptyFile);
        return Parsed {
            decoded,
            fields: None,
            findings,
        };
    }
    let fields = match hl7::parse(&decoded.text) {
        Err(reason) => {
            findings.add(reason);
            None
        }
        Ok(m) => {
            let f = fields(&m);
            if required_segments(&f.message_type)
                .iter()
                .any(|s| m.segment(s).is_none())
            {
                findings.add(Reason::Truncated);
            }
            if let Some(key) = key {
                check_against_key(&m, &f.message_type, &f.patient_id, key, &mut findings);
            }
            Some(f)
        }
    };
    Parsed {
        decoded,
        fields,
        findings,
    }
}

fn check_against_key(
    m: &Message<'_>,
    message_type: &str,
    patient_id: &str,
    key: &Key,
    findings: &mut Findings,
) {
    if m.segment("PID").is_some() && patient_id != key.patient_id {
        findings.add(Reason::PatientMismatch);
    }
    let Some(t) = datatype::lookup(&key.data_type) else {
        findings.add(Reason::UnknownDataType);
        return;
    };
    if !t.messages.contains(&message_type) {
        findings.add(Reason::MessageMismatch);
        return;
    }
    let expected = match datatype::care_date_source(message_type) {
        Some(CareDateSource::None) => Some("-".to_owned()),
        Some(CareDateSource::Field(seg, n)) => {
            let v = m.value(seg, n, 1);
            (v.len() >= 8).then(|| v[..8].to_owned())
        }
        None => None,
    };
    if let Some(expected) = expected
        && expected != key.care_date
    {
        findings.add(Reason::CareDateMismatch);
    }
}

/// What the inventory needs of a message: less than [`Fields`], for speed (no times are
/// parsed, no values copied that are not used).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFields {
    /// `MSH-9.1^MSH-9.2`.
    pub message_type: String,
    /// MSH-7 as written.
    pub sent_raw: String,
    /// PID-3.1 (the `PI` repetition, else the first).
    pub patient_id: String,
    /// PID-5, when asked for.
    pub name: Option<PatientName>,
    pub cancels: bool,
}

/// Like [`parse_file`], extracting only [`KeyFields`] (the name only when `want_name`). The
/// findings are the same.
pub fn parse_key_fields(
    bytes: &[u8],
    key: Option<&Key>,
    want_name: bool,
) -> (Option<KeyFields>, Findings) {
    let mut decoded = decode(bytes);
    let mut findings = std::mem::take(&mut decoded.findings);
    if bytes.is_empty() {
        findings.add(Reason::EmptyFile);
        return (None, findings);
    }
    match hl7::parse(&decoded.text) {
        Err(reason) => {
            findings.add(reason);
            (None, findings)
        }
        Ok(m) => {
            let message_type = match m.segment("MSH") {
                Some(msh) => {
                    let first = m.repetitions(msh.field(9)).next().unwrap_or("");
                    format!("{}^{}", m.component(first, 1), m.component(first, 2))
                }
                None => String::new(),
            };
            if required_segments(&message_type)
                .iter()
                .any(|s| m.segment(s).is_none())
            {
                findings.add(Reason::Truncated);
            }
            let patient_id = patient_id(&m);
            if let Some(key) = key {
                check_against_key(&m, &message_type, &patient_id, key, &mut findings);
            }
            let order_cancel = m
                .segment("ORC")
                .is_some_and(|orc| m.component(orc.field(1), 1) == "CA");
            let cancels = order_cancel
                || datatype::TABLE
                    .iter()
                    .any(|t| t.cancels.contains(&message_type.as_str()));
            let sent_raw = m
                .segment("MSH")
                .map(|msh| m.component(msh.field(7), 1).to_owned())
                .unwrap_or_default();
            let name = want_name.then(|| patient_name(&m));
            (
                Some(KeyFields {
                    message_type,
                    sent_raw,
                    patient_id,
                    name,
                    cancels,
                }),
                findings,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::encode;

    fn key(pid: &str, date: &str, t: &str) -> Key {
        Key {
            patient_id: pid.into(),
            care_date: date.into(),
            data_type: t.into(),
            order_no: "999999999999999".into(),
        }
    }

    const ADT: &str = "MSH|^~\\&|HIS|FAC|GW|RCV|20111220224447.3399||ADT^A08^ADT_A01|20111220000001|P|2.5||||||~ISO IR87||ISO 2022-1994\rEVN||201112202244\rPID|||0009013^^^^PI||東京^時日^^^^^L^I~トウキョウ^ジニチ^^^^^L^P||19480405|M\r";

    #[test]
    fn e13_names_with_delimiter_bytes_in_kanji() {
        let p = parse_file(&encode(ADT).bytes, Some(&key("0009013", "-", "ADT-00")));
        assert!(p.findings.is_empty(), "{:?}", p.findings);
        let f = p.fields.unwrap();
        assert_eq!(f.message_type, "ADT^A08");
        assert_eq!(f.patient_id, "0009013");
        assert_eq!(f.name.ideographic.as_deref(), Some("東京\u{3000}時日"));
        assert_eq!(f.name.phonetic.as_deref(), Some("トウキョウ\u{3000}ジニチ"));
        assert_eq!(
            f.sent_at.unwrap().to_rfc3339(),
            "2011-12-20T22:44:47.3399+09:00"
        );
        assert!(!f.cancels);
    }

    #[test]
    fn checks_against_the_folder() {
        let bytes = encode(ADT).bytes;
        let p = parse_file(&bytes, Some(&key("9013", "-", "ADT-00")));
        assert!(p.findings.contains(Reason::PatientMismatch));
        let p = parse_file(&bytes, Some(&key("0009013", "-", "OMP-01")));
        assert!(p.findings.contains(Reason::MessageMismatch));
        let p = parse_file(&bytes, Some(&key("0009013", "20111220", "ADT-00")));
        assert!(p.findings.contains(Reason::CareDateMismatch));
        let p = parse_file(&bytes, Some(&key("0009013", "-", "ADT-62")));
        assert!(p.findings.contains(Reason::UnknownDataType));
        let cancel = ADT.replace("ADT^A08^ADT_A01", "ADT^A23^ADT_A21");
        assert!(
            parse_file(&encode(&cancel).bytes, None)
                .fields
                .unwrap()
                .cancels
        );
    }

    #[test]
    fn e15_header_variants_are_accepted() {
        for (h18, h20) in [
            ("~ISOIR87", "ISO2022-1994"),
            ("ISO IR87", " ISO 2022-1994"),
            ("", ""),
        ] {
            let text = ADT.replace("~ISO IR87||ISO 2022-1994", &format!("{h18}||{h20}"));
            let p = parse_file(&encode(&text).bytes, Some(&key("0009013", "-", "ADT-00")));
            assert!(p.findings.is_empty(), "{h18:?} {h20:?}: {:?}", p.findings);
            assert_eq!(
                p.fields.unwrap().name.ideographic.as_deref(),
                Some("東京\u{3000}時日")
            );
        }
    }

    #[test]
    fn key_fields_agree_with_fields() {
        for text in [
            ADT.to_owned(),
            ADT.replace("ADT^A08^ADT_A01", "ADT^A23^ADT_A21"),
        ] {
            let bytes = encode(&text).bytes;
            let k = key("0009013", "-", "ADT-00");
            let full = parse_file(&bytes, Some(&k));
            let (light, findings) = parse_key_fields(&bytes, Some(&k), true);
            let (f, l) = (full.fields.unwrap(), light.unwrap());
            assert_eq!(full.findings, findings);
            assert_eq!(
                (
                    l.message_type,
                    l.sent_raw,
                    l.patient_id,
                    l.name.unwrap(),
                    l.cancels
                ),
                (f.message_type, f.sent_raw, f.patient_id, f.name, f.cancels)
            );
        }
    }

    #[test]
    fn missing_segments_are_truncation() {
        let text = "MSH|^~\\&|HIS|FAC|GW|RCV|20111220224447||ADT^A08^ADT_A01|1|P|2.5\rEVN||2011\r";
        let p = parse_file(text.as_bytes(), None);
        assert!(p.findings.contains(Reason::Truncated));
        assert!(parse_file(b"", None).findings.contains(Reason::EmptyFile));
    }
}
