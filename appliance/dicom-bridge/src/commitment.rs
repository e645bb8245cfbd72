//! Storage commitment, Push Model (PS3.4 Annex J): the data sets of the request the
//! forwarder sends (N-ACTION-RQ, action type 1) and of the report the PACS sends back
//! (N-EVENT-REPORT-RQ, event type 1 "all committed" or 2 "failures exist"), read and
//! written with dicom-rs (`dicom-object`).
//!
//! The report is untrusted input from the network: [`read_report`] reads it strictly, in
//! one bounded walk of our own (every element, item and sequence must end inside what
//! contains it; at most [`MAX_REPORT`] bytes, nesting at most [`MAX_DEPTH`]); anything else
//! is refused with a reason and commits nothing.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_object::InMemDicomObject;

/// Transaction UID (0008,1195).
pub const TRANSACTION_UID: Tag = Tag(0x0008, 0x1195);
/// Referenced SOP Sequence (0008,1199): what is asked for, and what is committed.
pub const REFERENCED_SOP_SEQUENCE: Tag = Tag(0x0008, 0x1199);
/// Failed SOP Sequence (0008,1198): what the PACS could not commit.
pub const FAILED_SOP_SEQUENCE: Tag = Tag(0x0008, 0x1198);
const REFERENCED_SOP_CLASS: Tag = Tag(0x0008, 0x1150);
const REFERENCED_SOP_INSTANCE: Tag = Tag(0x0008, 0x1155);
/// Failure Reason (0008,1197).
const FAILURE_REASON: Tag = Tag(0x0008, 0x1197);

/// A report's data set, at most (a reference is under 200 bytes: this is tens of
/// thousands of instances).
pub const MAX_REPORT: usize = 8 << 20;
/// Sequences and items open at once, at most.
pub const MAX_DEPTH: usize = 8;

/// Implicit VR Little Endian: the default transfer syntax, which every PACS takes.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// An instance a request or a report names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub sop_class: String,
    pub sop_instance: String,
}

/// What the PACS reported for a transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub transaction: String,
    pub committed: Vec<Reference>,
    /// With the failure reason (PS3.3 C.14.1.1: 0110H processing failure, 0112H no such
    /// object instance, 0213H resource limitation, 0122H SOP class not supported, 0119H
    /// class/instance conflict, 0131H duplicate transaction UID).
    pub failed: Vec<(Reference, u16)>,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitmentError {
    #[error("the transfer syntax {0} is not one a storage commitment uses")]
    TransferSyntax(String),
    #[error("the report is larger than {MAX_REPORT} bytes")]
    TooLarge,
    #[error("the report's data set is malformed at byte {0}")]
    Malformed(usize),
    #[error("the report's sequences nest deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("the report has no Transaction UID")]
    NoTransaction,
    #[error("a reference in the report has no SOP class or instance UID")]
    BadReference,
    #[error("the request cannot be written: {0}")]
    Write(String),
}

/// A new Transaction UID: `2.25.` and 128 random bits in decimal (PS3.5 B.2), so that a
/// report can only name a transaction this box started.
pub fn new_transaction_uid() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No system randomness: still unique, from the clock and a counter.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes = (now ^ (u128::from(n) << 64) ^ u128::from(fastrand::u64(..))).to_le_bytes();
    }
    format!("2.25.{}", u128::from_le_bytes(bytes))
}

fn transfer_syntax(
    uid: &str,
) -> Result<(dicom_transfer_syntax_registry::TransferSyntax, bool), CommitmentError> {
    use dicom_transfer_syntax_registry::entries;
    match uid.trim_end_matches('\0') {
        IMPLICIT_VR_LE => Ok((entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(), false)),
        EXPLICIT_VR_LE => Ok((entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(), true)),
        other => Err(CommitmentError::TransferSyntax(other.to_owned())),
    }
}

fn text(value: &str) -> PrimitiveValue {
    PrimitiveValue::from(value)
}

fn references(refs: &[Reference]) -> Vec<InMemDicomObject> {
    refs.iter()
        .map(|r| {
            InMemDicomObject::from_element_iter([
                DataElement::new(REFERENCED_SOP_CLASS, VR::UI, text(&r.sop_class)),
                DataElement::new(REFERENCED_SOP_INSTANCE, VR::UI, text(&r.sop_instance)),
            ])
        })
        .collect()
}

/// The N-ACTION-RQ data set asking the PACS to commit `refs` under `transaction`, in the
/// transfer syntax `ts` (one of [`IMPLICIT_VR_LE`], [`EXPLICIT_VR_LE`]).
pub fn request(
    transaction: &str,
    refs: &[Reference],
    ts: &str,
) -> Result<Vec<u8>, CommitmentError> {
    let (ts, _) = transfer_syntax(ts)?;
    let object = InMemDicomObject::from_element_iter([
        DataElement::new(TRANSACTION_UID, VR::UI, text(transaction)),
        DataElement::new(
            REFERENCED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(references(refs), Length::UNDEFINED),
        ),
    ]);
    let mut out = Vec::new();
    object
        .write_dataset_with_ts(&mut out, &ts)
        .map_err(|e| CommitmentError::Write(e.to_string()))?;
    Ok(out)
}

/// A report as the PACS would send it (for tests and the fuzz target's round trip).
pub fn report(report: &Report, ts: &str) -> Result<Vec<u8>, CommitmentError> {
    let (ts, _) = transfer_syntax(ts)?;
    let mut object = InMemDicomObject::from_element_iter([DataElement::new(
        TRANSACTION_UID,
        VR::UI,
        text(&report.transaction),
    )]);
    if !report.committed.is_empty() {
        object.put(DataElement::new(
            REFERENCED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(references(&report.committed), Length::UNDEFINED),
        ));
    }
    if !report.failed.is_empty() {
        let items = report
            .failed
            .iter()
            .map(|(r, reason)| {
                let mut item = references(std::slice::from_ref(r)).remove(0);
                item.put(DataElement::new(
                    FAILURE_REASON,
                    VR::US,
                    PrimitiveValue::from(*reason),
                ));
                item
            })
            .collect::<Vec<_>>();
        object.put(DataElement::new(
            FAILED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(items, Length::UNDEFINED),
        ));
    }
    let mut out = Vec::new();
    object
        .write_dataset_with_ts(&mut out, &ts)
        .map_err(|e| CommitmentError::Write(e.to_string()))?;
    Ok(out)
}

/// Reads an N-EVENT-REPORT-RQ data set in the transfer syntax `ts`: strictly, in one
/// bounded walk ([`Cursor`]). Every element, item and sequence must end inside what
/// contains it, undefined lengths only on sequences (closed by their delimiters), nesting
/// at most [`MAX_DEPTH`]; the Transaction UID once at the top level; in each item of the
/// two sequences, the SOP class and instance UIDs once each (`0-9` and `.`, at most 64
/// characters) and a Failure Reason (US) at most once. Anything else is refused and
/// commits nothing.
///
/// Not dicom-rs's reader: given a report with a UID of non-ASCII bytes it allocated
/// 2.4 GB before failing (found by the `commitment_report` fuzz target), so dicom-rs only
/// writes here (what the box sends).
pub fn read_report(bytes: &[u8], ts: &str) -> Result<Report, CommitmentError> {
    let (_, explicit) = transfer_syntax(ts)?;
    if bytes.len() > MAX_REPORT {
        return Err(CommitmentError::TooLarge);
    }
    let mut c = Cursor {
        b: bytes,
        pos: 0,
        explicit,
        found: Found::default(),
    };
    c.elements(bytes.len(), 0, false, Within::Top)?;
    let found = c.found;
    let transaction = found.transaction.ok_or(CommitmentError::NoTransaction)?;
    let reference = |item: Item| -> Result<(Reference, Option<u16>), CommitmentError> {
        match (item.sop_class, item.sop_instance) {
            (Some(sop_class), Some(sop_instance)) => Ok((
                Reference {
                    sop_class,
                    sop_instance,
                },
                item.reason,
            )),
            _ => Err(CommitmentError::BadReference),
        }
    };
    Ok(Report {
        transaction,
        committed: found
            .committed
            .into_iter()
            .map(|i| reference(i).map(|(r, _)| r))
            .collect::<Result<_, _>>()?,
        // A failure without a reason is a processing failure.
        failed: found
            .failed
            .into_iter()
            .map(|i| reference(i).map(|(r, reason)| (r, reason.unwrap_or(0x0110))))
            .collect::<Result<_, _>>()?,
    })
}

/// The UID of an element's value: trailing NUL and space padding removed; `0-9` and `.`
/// only, 1 to 64 characters.
fn uid_value(value: &[u8]) -> Option<String> {
    let end = value
        .iter()
        .rposition(|b| *b != 0 && *b != b' ')
        .map_or(0, |i| i + 1);
    let v = &value[..end];
    (!v.is_empty() && v.len() <= 64 && v.iter().all(|b| b.is_ascii_digit() || *b == b'.'))
        .then(|| String::from_utf8_lossy(v).into_owned())
}

/// What the walk found.
#[derive(Default)]
struct Found {
    transaction: Option<String>,
    committed: Vec<Item>,
    failed: Vec<Item>,
}

/// One item of a reference sequence.
#[derive(Default)]
struct Item {
    sop_class: Option<String>,
    sop_instance: Option<String>,
    reason: Option<u16>,
}

/// Where the walk is: at the top level, in an item of one of the two reference
/// sequences, or anywhere else (walked, not read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Within {
    Top,
    Committed,
    Failed,
    Other,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    explicit: bool,
    found: Found,
}

/// An element's (group, element), VR (explicit VR only) and value length.
type Header = ((u16, u16), Option<[u8; 2]>, u32);

const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const UNDEFINED: u32 = 0xFFFF_FFFF;

fn tag_pair(t: Tag) -> (u16, u16) {
    (t.0, t.1)
}

impl Cursor<'_> {
    fn malformed(&self) -> CommitmentError {
        CommitmentError::Malformed(self.pos)
    }

    fn u16_at(&self, at: usize) -> Option<u16> {
        Some(u16::from_le_bytes([
            *self.b.get(at)?,
            *self.b.get(at.checked_add(1)?)?,
        ]))
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.b.get(at..at.checked_add(4)?)?.try_into().ok()?,
        ))
    }

    /// The next header, the cursor moved past it (which must end by `end`).
    fn header(&mut self, end: usize) -> Result<Header, CommitmentError> {
        let p = self.pos;
        let bad = || CommitmentError::Malformed(p);
        let tag = (
            self.u16_at(p).ok_or_else(bad)?,
            self.u16_at(p + 2).ok_or_else(bad)?,
        );
        let (vr, len, size) = if tag.0 == 0xFFFE || !self.explicit {
            (None, self.u32_at(p + 4).ok_or_else(bad)?, 8)
        } else {
            let vr = [
                *self.b.get(p + 4).ok_or_else(bad)?,
                *self.b.get(p + 5).ok_or_else(bad)?,
            ];
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return Err(bad());
            }
            if crate::header::has_long_length(&vr) {
                (Some(vr), self.u32_at(p + 8).ok_or_else(bad)?, 12)
            } else {
                (Some(vr), u32::from(self.u16_at(p + 6).ok_or_else(bad)?), 8)
            }
        };
        if p + size > end {
            return Err(bad());
        }
        self.pos = p + size;
        Ok((tag, vr, len))
    }

    /// Elements until `end`, or (`delimited`) until an item delimiter; what they hold is
    /// taken where `within` says it matters.
    fn elements(
        &mut self,
        end: usize,
        depth: usize,
        delimited: bool,
        within: Within,
    ) -> Result<(), CommitmentError> {
        while self.pos < end {
            let at = self.pos;
            let (tag, vr, len) = self.header(end)?;
            if tag == ITEM_END {
                return if delimited && len == 0 {
                    Ok(())
                } else {
                    Err(CommitmentError::Malformed(at))
                };
            }
            if tag.0 == 0xFFFE {
                return Err(CommitmentError::Malformed(at));
            }
            let sequence = vr.is_none_or(|v| &v == b"SQ" || &v == b"UN");
            // The sequence a top-level element opens, if it is one the report is read from.
            let inner = match within {
                Within::Top if tag == tag_pair(REFERENCED_SOP_SEQUENCE) => Within::Committed,
                Within::Top if tag == tag_pair(FAILED_SOP_SEQUENCE) => Within::Failed,
                _ => Within::Other,
            };
            if inner != Within::Other && vr.is_some_and(|v| &v != b"SQ") {
                return Err(CommitmentError::Malformed(at));
            }
            if len == UNDEFINED {
                if !sequence {
                    return Err(CommitmentError::Malformed(at));
                }
                self.items(end, None, depth + 1, inner)?;
                continue;
            }
            let stop = self
                .pos
                .checked_add(len as usize)
                .filter(|s| *s <= end)
                .ok_or(CommitmentError::Malformed(at))?;
            let starts_item = len >= 8
                && self.u16_at(self.pos) == Some(ITEM.0)
                && self.u16_at(self.pos + 2) == Some(ITEM.1);
            if inner != Within::Other || (sequence && starts_item) {
                self.items(stop, Some(stop), depth + 1, inner)?;
            } else {
                let value = &self.b[self.pos..stop];
                self.take(within, tag, vr, value, at)?;
            }
            self.pos = stop;
        }
        if delimited {
            return Err(self.malformed());
        }
        Ok(())
    }

    /// Takes the value of `tag` where `within` reads it; an element that comes twice, or a
    /// value that is not what its tag holds, is malformed.
    fn take(
        &mut self,
        within: Within,
        tag: (u16, u16),
        vr: Option<[u8; 2]>,
        value: &[u8],
        at: usize,
    ) -> Result<(), CommitmentError> {
        let bad = CommitmentError::Malformed(at);
        let vr_is = |want: &[u8; 2]| vr.is_none_or(|v| &v == want);
        let found = &mut self.found;
        let item = match within {
            Within::Top => {
                if tag == tag_pair(TRANSACTION_UID) {
                    if found.transaction.is_some() || !vr_is(b"UI") {
                        return Err(bad);
                    }
                    found.transaction =
                        Some(uid_value(value).ok_or(CommitmentError::NoTransaction)?);
                }
                return Ok(());
            }
            Within::Other => return Ok(()),
            Within::Committed => found.committed.last_mut(),
            Within::Failed => found.failed.last_mut(),
        };
        let Some(item) = item else {
            return Err(bad);
        };
        let slot = if tag == tag_pair(REFERENCED_SOP_CLASS) {
            &mut item.sop_class
        } else if tag == tag_pair(REFERENCED_SOP_INSTANCE) {
            &mut item.sop_instance
        } else {
            if tag == tag_pair(FAILURE_REASON) {
                if item.reason.is_some() || !vr_is(b"US") || value.len() != 2 {
                    return Err(bad);
                }
                item.reason = Some(u16::from_le_bytes([value[0], value[1]]));
            }
            return Ok(());
        };
        if slot.is_some() || !vr_is(b"UI") {
            return Err(bad);
        }
        *slot = Some(uid_value(value).ok_or(CommitmentError::BadReference)?);
        Ok(())
    }

    /// Items of a sequence: until `defined_end`, or until the sequence delimiter.
    fn items(
        &mut self,
        end: usize,
        defined_end: Option<usize>,
        depth: usize,
        within: Within,
    ) -> Result<(), CommitmentError> {
        if depth > MAX_DEPTH {
            return Err(CommitmentError::TooDeep);
        }
        loop {
            if defined_end.is_some_and(|d| self.pos >= d) {
                return Ok(());
            }
            let at = self.pos;
            let (tag, _, len) = self.header(end)?;
            if tag == SEQUENCE_END && defined_end.is_none() {
                return if len == 0 {
                    Ok(())
                } else {
                    Err(CommitmentError::Malformed(at))
                };
            }
            if tag != ITEM {
                return Err(CommitmentError::Malformed(at));
            }
            match within {
                Within::Committed => self.found.committed.push(Item::default()),
                Within::Failed => self.found.failed.push(Item::default()),
                _ => {}
            }
            if len == UNDEFINED {
                self.elements(end, depth, true, within)?;
            } else {
                let stop = self
                    .pos
                    .checked_add(len as usize)
                    .filter(|s| *s <= end)
                    .ok_or(CommitmentError::Malformed(at))?;
                self.elements(stop, depth, false, within)?;
                self.pos = stop;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            transaction: new_transaction_uid(),
            committed: vec![
                Reference {
                    sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
                    sop_instance: "1.2.3.4.5".into(),
                },
                Reference {
                    sop_class: "1.2.840.10008.5.1.4.1.1.7".into(),
                    sop_instance: "1.2.3.4.6".into(),
                },
            ],
            failed: vec![(
                Reference {
                    sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
                    sop_instance: "1.2.3.4.77".into(),
                },
                0x0112,
            )],
        }
    }

    #[test]
    fn a_report_reads_back_in_both_transfer_syntaxes() {
        for ts in [IMPLICIT_VR_LE, EXPLICIT_VR_LE] {
            let r = sample();
            let bytes = report(&r, ts).unwrap();
            assert_eq!(read_report(&bytes, ts).unwrap(), r, "{ts}");
        }
    }

    #[test]
    fn a_request_names_the_transaction_and_every_instance() {
        let r = sample();
        let bytes = request(&r.transaction, &r.committed, IMPLICIT_VR_LE).unwrap();
        let read = read_report(&bytes, IMPLICIT_VR_LE).unwrap();
        assert_eq!(read.transaction, r.transaction);
        assert_eq!(read.committed, r.committed);
        assert!(read.failed.is_empty());
    }

    /// Found by the `commitment_report` fuzz target: dicom-rs's reader allocated 2.4 GB
    /// on this report (explicit VR; a Referenced SOP Class UID of non-ASCII bytes) before
    /// failing. Read strictly, it is refused at once.
    #[test]
    fn a_uid_of_other_bytes_is_refused_without_reading_further() {
        let report = b"\x08\x00\x95\x11\x55\x49\x24\x00\x32\x2e\x32\x35\x2e\x31\x32\x33\x34\x35\x36\x37\x38\x39\
          \x30\x31\x32\x33\x34\x35\x36\x37\x38\x39\x30\x31\x32\x33\x34\x35\x36\x37\x38\x39\x30\x00\
          \x08\x00\x98\x11\x53\x51\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\x08\x00\
          \x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x92\x24\x49\x92\x24\x49\x92\
          \x04\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x55\x49\x1c\x00\x31\x2e\x32\x2e\
          \x33\x39\x32\x2e\x32\x30\x30\x30\x33\x36\x2e\x39\x39\x39\x39\x2e\x31\x2e\x31\x2e\x31\x2e\
          \x39\x00\x08\x00\x97\x11\x55\x53\x02\x00\x12\x01\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\
          \xdd\xe0\x00\x00\x00\x00\x08\x00\x99\x11\x53\x51\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\
          \xff\xff\xff\xff\x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\
          \x30\x30\x38\x2e\x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x55\x49\
          \x1a\x00\x31\x2e\x32\x2e\x33\x39\x32\x2e\x32\x30\x30\x30\x33\x36\x2e\x39\x39\x39\x39\x2e\
          \x31\x2e\x31\x2e\x31\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0\xff\xff\xff\xff\
          \x08\x00\x50\x11\x55\x49\x1a\x00\x31\x2e\x32\x2e\x38\x34\x30\x2e\x31\x30\x30\x30\x38\x2e\
          \x35\x2e\x31\x2e\x34\x2e\x31\x2e\x31\x2e\x32\x00\x08\x00\x55\x11\x54\x49\x1c\x00\x31\xd2\
          \xcd\xd1\xcc\xc6\xcd\xd1\xd5\x30\x30\x30\x33\x36\x2e\x39\x39\x39\x39\x2e\x31\x2e\x31\x2e\
          \x31\x2e\x32\x00\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00";
        let started = std::time::Instant::now();
        assert_eq!(
            read_report(report, EXPLICIT_VR_LE),
            Err(CommitmentError::BadReference)
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn transaction_uids_are_unique_and_valid() {
        let a = new_transaction_uid();
        let b = new_transaction_uid();
        assert_ne!(a, b);
        assert!(a.starts_with("2.25.") && a.len() <= 64, "{a}");
        assert!(a[5..].bytes().all(|c| c.is_ascii_digit()));
    }

    #[test]
    fn a_declared_length_past_the_end_is_refused_before_it_is_read() {
        let r = sample();
        let mut bytes = report(&r, IMPLICIT_VR_LE).unwrap();
        // The Transaction UID's length (bytes 4..8) claims 4 GB.
        bytes[4..8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(matches!(
            read_report(&bytes, IMPLICIT_VR_LE),
            Err(CommitmentError::Malformed(_))
        ));
        // Cut short anywhere: refused, never a panic.
        let whole = report(&r, EXPLICIT_VR_LE).unwrap();
        for n in 0..whole.len() {
            let _ = read_report(&whole[..n], EXPLICIT_VR_LE);
        }
    }

    #[test]
    fn a_report_without_a_transaction_or_with_a_bad_reference_is_refused() {
        let mut r = sample();
        r.transaction = String::new();
        let bytes = report(&r, IMPLICIT_VR_LE).unwrap();
        assert_eq!(
            read_report(&bytes, IMPLICIT_VR_LE),
            Err(CommitmentError::NoTransaction)
        );
        let mut r = sample();
        r.committed[0].sop_instance = String::new();
        let bytes = report(&r, IMPLICIT_VR_LE).unwrap();
        assert_eq!(
            read_report(&bytes, IMPLICIT_VR_LE),
            Err(CommitmentError::BadReference)
        );
        assert!(matches!(
            read_report(&[], "1.2.840.10008.1.2.2"),
            Err(CommitmentError::TransferSyntax(_))
        ));
    }
}
