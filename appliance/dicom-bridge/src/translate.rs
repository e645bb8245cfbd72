//! Patient-ID translation on the way to the network (issuer-qualified IDs, as IHE's
//! Import Reconciliation and PIX do it, and `../shared/reference/dicom.md` edge case 25).
//!
//! Only the patient-identification elements at the top level of the data set change:
//! - PatientID (0010,0020) becomes the network's ID for the patient;
//! - IssuerOfPatientID (0010,0021) the network's issuer name, and
//!   IssuerOfPatientIDQualifiersSequence (0010,0024) its OID (Universal Entity ID (0040,0032),
//!   type `ISO` (0040,0033));
//! - OtherPatientIDsSequence (0010,1002) keeps the items it had and gains one with the
//!   clinic's own ID: PatientID, IssuerOfPatientID the clinic's 医療機関コード, TypeOfPatientID
//!   `TEXT`, and the clinic's OID (JP Core's patient-ID system
//!   `1.2.392.100495.20.3.51.1` followed by the 医療機関コード);
//! - a group length (0010,0000) is dropped (retired; it would be wrong now).
//!
//! Everything else is carried byte for byte: the bytes before the first patient element,
//! PatientName (ISO 2022 IR 87 text included) and every element after (0010,1002), pixel data
//! and UIDs, are copied, never decoded and re-encoded. The new values are ASCII, valid in
//! every character set DICOM allows. Implicit and explicit VR little endian only: another
//! encoding of the data set cannot be rewritten, and the caller must not send it as is.

use crate::header::{self, Element, HeaderError};

/// The identifiers the rewrite writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub network_id: String,
    pub network_issuer: String,
    pub network_oid: String,
    pub local_id: String,
    /// The clinic's 医療機関コード.
    pub facility_code: String,
}

/// JP Core's patient-ID system of a facility: this prefix, then the 医療機関コード.
pub const LOCAL_ID_OID_PREFIX: &str = "1.2.392.100495.20.3.51.1";

/// A rewritten start of a data set: send `head`, then the original from `rest_from` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub head: Vec<u8>,
    pub rest_from: u64,
}

/// Why a data set cannot be translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error(
        "the data set's encoding cannot be rewritten (only implicit and explicit VR little endian)"
    )]
    Encoding,
    #[error("the patient elements are not within the first {0} bytes")]
    TooFar(usize),
    #[error("the data set's patient elements are malformed")]
    Malformed(#[source] HeaderError),
    #[error("a value for {0} is too long or not ASCII")]
    BadValue(&'static str),
}

const PATIENT_ID: u32 = 0x0010_0020;
const ISSUER: u32 = 0x0010_0021;
const QUALIFIERS: u32 = 0x0010_0024;
const OTHER_IDS: u32 = 0x0010_1002;
const GROUP_LENGTH: u32 = 0x0010_0000;

/// Transfer syntaxes whose data set is implicit or explicit VR little endian (every
/// compressed one encodes the data set as explicit VR LE); `None` for the others.
pub fn data_set_is_explicit(transfer_syntax: &str) -> Option<bool> {
    match transfer_syntax {
        "1.2.840.10008.1.2" => Some(false),
        // Deflated, and explicit VR big endian (retired).
        "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.2" => None,
        _ => Some(true),
    }
}

/// Rewrites the patient elements of the data set that starts with `prefix`. `complete`: the
/// prefix is the whole data set.
pub fn rewrite(
    prefix: &[u8],
    explicit: bool,
    complete: bool,
    ids: &Identity,
) -> Result<Rewritten, TranslateError> {
    for (what, v) in [
        ("the network ID", &ids.network_id),
        ("the network issuer", &ids.network_issuer),
        ("the clinic's ID", &ids.local_id),
    ] {
        if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err(TranslateError::BadValue(what));
        }
        if v.contains('\\') {
            return Err(TranslateError::BadValue(what));
        }
    }
    let (elements, boundary) = match header::elements_until(prefix, explicit, OTHER_IDS, complete) {
        Ok(v) => v,
        Err(HeaderError::Incomplete) => return Err(TranslateError::TooFar(prefix.len())),
        Err(e) => return Err(TranslateError::Malformed(e)),
    };
    let e = Encoder { explicit };
    let local_oid = format!("{LOCAL_ID_OID_PREFIX}{}", ids.facility_code);
    let mut ours: Vec<(u32, Vec<u8>)> = vec![
        (PATIENT_ID, e.text(PATIENT_ID, b"LO", &ids.network_id)),
        (ISSUER, e.text(ISSUER, b"LO", &ids.network_issuer)),
        (QUALIFIERS, e.qualifiers(&ids.network_oid)),
    ];
    // The clinic's ID, after the items the sequence already had.
    let mut items = Vec::new();
    if let Some(old) = elements.iter().find(|x| x.tag == OTHER_IDS) {
        let mut end = old.end;
        if old.undefined_length {
            end -= 8; // the sequence delimitation item
        }
        items.extend_from_slice(&prefix[old.value_start..end]);
    }
    let mut item = Vec::new();
    item.extend(e.text(PATIENT_ID, b"LO", &ids.local_id));
    item.extend(e.text(ISSUER, b"LO", &ids.facility_code));
    item.extend(e.text(0x0010_0022, b"CS", "TEXT"));
    item.extend(e.qualifiers(&local_oid));
    items.extend(e.item(&item));
    ours.push((OTHER_IDS, e.sequence(OTHER_IDS, &items)));

    let replaced = [GROUP_LENGTH, PATIENT_ID, ISSUER, QUALIFIERS, OTHER_IDS];
    Ok(Rewritten {
        head: assemble(prefix, &elements, &replaced, ours),
        rest_from: boundary as u64,
    })
}

/// The way back, for what a clinic viewer retrieves: PatientID becomes the clinic's ID, and
/// the network's IssuerOfPatientID and its qualifiers go; OtherPatientIDsSequence and every
/// other byte stay as they are.
pub fn restore(
    prefix: &[u8],
    explicit: bool,
    complete: bool,
    local_id: &str,
) -> Result<Rewritten, TranslateError> {
    if local_id.is_empty()
        || local_id.len() > 64
        || !local_id
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'\\')
    {
        return Err(TranslateError::BadValue("the clinic's ID"));
    }
    let (elements, boundary) = match header::elements_until(prefix, explicit, QUALIFIERS, complete)
    {
        Ok(v) => v,
        Err(HeaderError::Incomplete) => return Err(TranslateError::TooFar(prefix.len())),
        Err(e) => return Err(TranslateError::Malformed(e)),
    };
    let e = Encoder { explicit };
    let ours = e.text(PATIENT_ID, b"LO", local_id);
    let replaced = [GROUP_LENGTH, PATIENT_ID, ISSUER, QUALIFIERS];
    Ok(Rewritten {
        head: assemble(prefix, &elements, &replaced, vec![(PATIENT_ID, ours)]),
        rest_from: boundary as u64,
    })
}

/// A top-level text value of a whole (small) data set, trimmed; `None` when absent.
pub fn text_value(
    data_set: &[u8],
    explicit: bool,
    tag: u32,
) -> Result<Option<String>, TranslateError> {
    let (elements, _) =
        header::elements_until(data_set, explicit, tag, true).map_err(TranslateError::Malformed)?;
    Ok(elements.iter().find(|x| x.tag == tag).map(|x| {
        String::from_utf8_lossy(&data_set[x.value_start..x.end])
            .trim_matches([' ', '\0'])
            .to_owned()
    }))
}

/// A whole (small) data set, such as a query identifier, with top-level text elements set
/// (`Some`: replaced or added) or removed (`None`); every other element byte for byte.
pub fn with_elements(
    data_set: &[u8],
    explicit: bool,
    set: &[(u32, [u8; 2], Option<&str>)],
) -> Result<Vec<u8>, TranslateError> {
    for (_, _, v) in set {
        if let Some(v) = v
            && (v.len() > 64 || !v.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'\\'))
        {
            return Err(TranslateError::BadValue("a query key"));
        }
    }
    let (elements, _) = header::elements_until(data_set, explicit, u32::MAX, true)
        .map_err(TranslateError::Malformed)?;
    let e = Encoder { explicit };
    let new: Vec<(u32, Vec<u8>)> = set
        .iter()
        .filter_map(|(t, vr, v)| v.map(|v| (*t, e.text(*t, vr, v))))
        .collect();
    let replaced: Vec<u32> = set.iter().map(|(t, _, _)| *t).collect();
    Ok(assemble(data_set, &elements, &replaced, new))
}

/// The elements of `data` without the `replaced` tags, with `ours` (encoded), in ascending
/// tag order: the one way the bridge reassembles a data set's start.
fn assemble(
    data: &[u8],
    elements: &[Element],
    replaced: &[u32],
    ours: Vec<(u32, Vec<u8>)>,
) -> Vec<u8> {
    let mut all: Vec<(u32, &[u8])> = elements
        .iter()
        .filter(|x| !replaced.contains(&x.tag))
        .map(|x| (x.tag, &data[x.start..x.end]))
        .collect();
    all.extend(ours.iter().map(|(t, b)| (*t, b.as_slice())));
    all.sort_by_key(|(t, _)| *t);
    all.into_iter()
        .flat_map(|(_, b)| b.iter().copied())
        .collect()
}

struct Encoder {
    explicit: bool,
}

impl Encoder {
    fn tag(out: &mut Vec<u8>, tag: u32) {
        out.extend_from_slice(&u16::try_from(tag >> 16).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&u16::try_from(tag & 0xFFFF).unwrap_or(0).to_le_bytes());
    }

    /// A short-VR text element (LO, CS), padded to even length with a space.
    fn text(&self, tag: u32, vr: &[u8; 2], value: &str) -> Vec<u8> {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.element(tag, vr, &v)
    }

    fn element(&self, tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(value.len() + 12);
        Self::tag(&mut out, tag);
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        let long = matches!(vr, b"UT" | b"SQ" | b"OB" | b"UN");
        if !self.explicit {
            out.extend_from_slice(&len.to_le_bytes());
        } else if long {
            out.extend_from_slice(vr);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&len.to_le_bytes());
        } else {
            out.extend_from_slice(vr);
            out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    /// An item of defined length.
    fn item(&self, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(content.len() + 8);
        Self::tag(&mut out, 0xFFFE_E000);
        out.extend_from_slice(&u32::try_from(content.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(content);
        out
    }

    /// A sequence of defined length holding `items` (already encoded).
    fn sequence(&self, tag: u32, items: &[u8]) -> Vec<u8> {
        self.element(tag, b"SQ", items)
    }

    /// IssuerOfPatientIDQualifiersSequence with one item: the OID, type ISO.
    fn qualifiers(&self, oid: &str) -> Vec<u8> {
        let mut item = self.text(0x0040_0032, b"UT", oid);
        item.extend(self.text(0x0040_0033, b"CS", "ISO"));
        self.sequence(QUALIFIERS, &self.item(&item))
    }
}

#[cfg(test)]
mod tests;
