//! Storage commitment, Push Model (PS3.4 Annex J): the data sets of the request the
//! forwarder sends (N-ACTION-RQ, action type 1) and of the report the PACS sends back
//! (N-EVENT-REPORT-RQ, event type 1 "all committed" or 2 "failures exist"), read and
//! written with dicom-rs (`dicom-object`).
//!
//! The report is untrusted input from the network: it is read only when its structure
//! holds ([`check_structure`]: every element, item and sequence ends inside what contains
//! it, nesting at most [`MAX_DEPTH`], at most [`MAX_REPORT`] bytes), so no declared length
//! can make the reader allocate more than the report's own size; anything else is refused
//! with a reason and commits nothing.

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
    #[error("the report cannot be read: {0}")]
    Read(String),
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

/// Reads an N-EVENT-REPORT-RQ data set in the transfer syntax `ts`.
pub fn read_report(bytes: &[u8], ts: &str) -> Result<Report, CommitmentError> {
    let (syntax, explicit) = transfer_syntax(ts)?;
    if bytes.len() > MAX_REPORT {
        return Err(CommitmentError::TooLarge);
    }
    check_structure(bytes, explicit)?;
    let object = InMemDicomObject::read_dataset_with_ts(bytes, &syntax)
        .map_err(|e| CommitmentError::Read(e.to_string()))?;
    let uid = |item: &InMemDicomObject, tag: Tag| -> Option<String> {
        let e = item.element_opt(tag).ok()??;
        let s = e.to_str().ok()?;
        let s = s.trim_end_matches(['\0', ' ']).trim_start();
        (!s.is_empty()).then(|| s.to_owned())
    };
    let transaction = uid(&object, TRANSACTION_UID).ok_or(CommitmentError::NoTransaction)?;
    let refs = |tag: Tag| -> Result<Vec<(Reference, Option<u16>)>, CommitmentError> {
        let Some(e) = object.element_opt(tag).ok().flatten() else {
            return Ok(Vec::new());
        };
        let items = e.items().ok_or(CommitmentError::BadReference)?;
        items
            .iter()
            .map(|item| {
                let (Some(sop_class), Some(sop_instance)) = (
                    uid(item, REFERENCED_SOP_CLASS),
                    uid(item, REFERENCED_SOP_INSTANCE),
                ) else {
                    return Err(CommitmentError::BadReference);
                };
                let reason = item
                    .element_opt(FAILURE_REASON)
                    .ok()
                    .flatten()
                    .and_then(|e| e.to_int::<u16>().ok());
                Ok((
                    Reference {
                        sop_class,
                        sop_instance,
                    },
                    reason,
                ))
            })
            .collect()
    };
    Ok(Report {
        transaction,
        committed: refs(REFERENCED_SOP_SEQUENCE)?
            .into_iter()
            .map(|(r, _)| r)
            .collect(),
        // A failure without a reason is a processing failure.
        failed: refs(FAILED_SOP_SEQUENCE)?
            .into_iter()
            .map(|(r, reason)| (r, reason.unwrap_or(0x0110)))
            .collect(),
    })
}

/// Checks that every element of `bytes` (and of every item, at any depth) ends inside
/// what contains it, that undefined lengths are only on sequences (closed by their
/// delimiters), and that nesting stays within [`MAX_DEPTH`].
pub fn check_structure(bytes: &[u8], explicit: bool) -> Result<(), CommitmentError> {
    let mut c = Cursor {
        b: bytes,
        pos: 0,
        explicit,
    };
    c.elements(bytes.len(), 0, false)
}

/// An element's (group, element), VR (explicit VR only) and value length.
type Header = ((u16, u16), Option<[u8; 2]>, u32);

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    explicit: bool,
}

const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const UNDEFINED: u32 = 0xFFFF_FFFF;

impl Cursor<'_> {
    fn malformed(&self) -> CommitmentError {
        CommitmentError::Malformed(self.pos)
    }

    fn u16_at(&self, at: usize) -> Option<u16> {
        Some(u16::from_le_bytes([*self.b.get(at)?, *self.b.get(at + 1)?]))
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.b.get(at..at + 4)?.try_into().ok()?))
    }

    /// The next header: (tag, VR if explicit, length), the cursor moved past it.
    fn header(&mut self, end: usize) -> Result<Header, CommitmentError> {
        let p = self.pos;
        let tag = (
            self.u16_at(p).ok_or_else(|| self.malformed())?,
            self.u16_at(p + 2).ok_or_else(|| self.malformed())?,
        );
        let (vr, len, size) = if tag.0 == 0xFFFE || !self.explicit {
            (None, self.u32_at(p + 4).ok_or_else(|| self.malformed())?, 8)
        } else {
            let vr = [
                *self.b.get(p + 4).ok_or_else(|| self.malformed())?,
                *self.b.get(p + 5).ok_or_else(|| self.malformed())?,
            ];
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return Err(self.malformed());
            }
            if matches!(
                &vr,
                b"OB"
                    | b"OW"
                    | b"OF"
                    | b"SQ"
                    | b"UT"
                    | b"UN"
                    | b"UC"
                    | b"UR"
                    | b"OD"
                    | b"OL"
                    | b"OV"
                    | b"SV"
                    | b"UV"
            ) {
                (
                    Some(vr),
                    self.u32_at(p + 8).ok_or_else(|| self.malformed())?,
                    12,
                )
            } else {
                (
                    Some(vr),
                    u32::from(self.u16_at(p + 6).ok_or_else(|| self.malformed())?),
                    8,
                )
            }
        };
        if p + size > end {
            return Err(self.malformed());
        }
        self.pos = p + size;
        Ok((tag, vr, len))
    }

    /// Elements until `end`, or (`delimited`) until an item delimiter.
    fn elements(
        &mut self,
        end: usize,
        depth: usize,
        delimited: bool,
    ) -> Result<(), CommitmentError> {
        while self.pos < end {
            let (tag, vr, len) = self.header(end)?;
            if tag == ITEM_END {
                return if delimited && len == 0 {
                    Ok(())
                } else {
                    Err(self.malformed())
                };
            }
            if tag.0 == 0xFFFE {
                return Err(self.malformed());
            }
            let sequence = vr.is_none_or(|v| &v == b"SQ" || &v == b"UN");
            if len == UNDEFINED {
                if !sequence {
                    return Err(self.malformed());
                }
                self.items(end, None, depth + 1)?;
            } else {
                let stop = self
                    .pos
                    .checked_add(len as usize)
                    .filter(|s| *s <= end)
                    .ok_or_else(|| self.malformed())?;
                // A defined-length value that starts as an item is read as a sequence by a
                // reader that knows its tag: check it as one.
                if sequence
                    && len >= 8
                    && self.u16_at(self.pos) == Some(ITEM.0)
                    && self.u16_at(self.pos + 2) == Some(ITEM.1)
                {
                    self.items(stop, Some(stop), depth + 1)?;
                }
                self.pos = stop;
            }
        }
        if delimited {
            return Err(self.malformed());
        }
        Ok(())
    }

    /// Items of a sequence: until `defined_end`, or until the sequence delimiter.
    fn items(
        &mut self,
        end: usize,
        defined_end: Option<usize>,
        depth: usize,
    ) -> Result<(), CommitmentError> {
        if depth > MAX_DEPTH {
            return Err(CommitmentError::TooDeep);
        }
        loop {
            if defined_end.is_some_and(|d| self.pos >= d) {
                return Ok(());
            }
            let (tag, _, len) = self.header(end)?;
            if tag == SEQUENCE_END && defined_end.is_none() {
                return if len == 0 {
                    Ok(())
                } else {
                    Err(self.malformed())
                };
            }
            if tag != ITEM {
                return Err(self.malformed());
            }
            if len == UNDEFINED {
                self.elements(end, depth, true)?;
            } else {
                let stop = self
                    .pos
                    .checked_add(len as usize)
                    .filter(|s| *s <= end)
                    .ok_or_else(|| self.malformed())?;
                self.elements(stop, depth, false)?;
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
