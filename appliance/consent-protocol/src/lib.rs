//! `consent-protocol`: the one vocabulary of the consent service and its clients.
//!
//! Every service that releases patient data asks the consent service over its Unix socket
//! (`RUNTIME-DIR/consent/decide.sock`), one JSON line each way. The request and the answer
//! are the enums here, and so are the [`Category`] of the data and the [`DenyReason`]: no
//! client matches strings, and an answer that does not parse as one of these types is a
//! protocol error, which every client treats as "not permitted" (fail closed).
//!
//! Wire shapes (serde's external tagging, kebab-case):
//! - `{"decide":{"patient":"0001234","recipient":"hub","category":"images"}}` →
//!   `{"decided":{"decision":"permit","audit":41}}` or
//!   `{"decided":{"decision":"deny","reason":"withdrawn","audit":42}}` (`audit`: the
//!   decision's row in the audit trail, which a release record refers to);
//! - `{"released":{"patient":"0001234","recipient":"hub","category":"images","kind":"sent",
//!   "objects":[{"dicom-instance":"1.2.3"}],"decision":41}}` → `{"recorded":{"audit":43}}`
//!   (one audit row per object; `audit` is the last one's);
//! - `{"participates":{"patient":"0001234"}}` → `{"decided":…}` as above;
//! - `{"changes":{"since":0}}` → `{"changes":{"seq":7,"patients":["0001234"],"more":false,"fresh":true}}`;
//! - `{"network-id-of":{"patient":"0001234"}}` and `{"local-id-of":{"network_id":"N-1"}}` →
//!   `{"identity":{"known":true,"network_id":"N-1","patient":null}}`;
//! - any request may be answered `{"error":"..."}` (never carrying patient data).
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tsunagi_config::FacilityCode;

/// A value that is not one of a protocol enum's names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// The kinds of data a consent can cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    Demographics,
    Problems,
    Allergies,
    Prescriptions,
    Injections,
    LabResults,
    Orders,
    Images,
    Documents,
}

/// The root of the standard DICOM storage SOP classes (PS3.4 B.5).
const DICOM_STORAGE_ROOT: &str = "1.2.840.10008.5.1.4.1.1.";

impl Category {
    pub const ALL: [Category; 9] = [
        Category::Demographics,
        Category::Problems,
        Category::Allergies,
        Category::Prescriptions,
        Category::Injections,
        Category::LabResults,
        Category::Orders,
        Category::Images,
        Category::Documents,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Demographics => "demographics",
            Category::Problems => "problems",
            Category::Allergies => "allergies",
            Category::Prescriptions => "prescriptions",
            Category::Injections => "injections",
            Category::LabResults => "lab-results",
            Category::Orders => "orders",
            Category::Images => "images",
            Category::Documents => "documents",
        }
    }

    /// The category of an SS-MIX2 data type (standardized storage), or `None` for a type
    /// that is not shared (unknown types are never released). The mapping is documented in
    /// `docs/consent.md`.
    pub fn for_ssmix2(data_type: &str) -> Option<Category> {
        Some(match data_type {
            // Patient demographics and encounter events (admissions, transfers, discharges).
            "ADT-00" | "ADT-01" | "ADT-12" | "ADT-21" | "ADT-22" | "ADT-31" | "ADT-32"
            | "ADT-41" | "ADT-42" | "ADT-51" | "ADT-52" => Category::Demographics,
            "ADT-61" => Category::Allergies,
            "PPR-01" => Category::Problems,
            "OMP-01" | "OMP-11" => Category::Prescriptions,
            "OMP-02" | "OMP-12" => Category::Injections,
            "OML-11" => Category::LabResults,
            // Orders for lab, radiology, endoscopy and physiology tests, and their
            // performed-notifications (the results of physiology tests are lab results).
            "OML-01" | "OMG-01" | "OMG-02" | "OMG-03" | "OMG-11" | "OMG-12" => Category::Orders,
            "OMG-13" => Category::LabResults,
            _ => return None,
        })
    }

    /// The category of a DICOM instance by its SOP Class UID, or `None` for a class that no
    /// category covers (such an instance is held, never sent).
    ///
    /// - `documents`: the encapsulated documents (`…1.104.*`: PDF, CDA and the rest) and
    ///   every structured report (`…1.88.*`: SR, key object selection, CAD and dose reports).
    /// - `images`: every other standard storage class (`1.2.840.10008.5.1.4.1.1.*`): images,
    ///   and what belongs to an imaging study (presentation states, waveforms, raw data).
    /// - `None`: anything outside the standard storage root (private classes a site allows
    ///   with `[dicom] extra-sop-classes`), and malformed UIDs.
    pub fn for_dicom_sop_class(sop_class_uid: &str) -> Option<Category> {
        let uid = sop_class_uid.trim_end_matches(['\0', ' ']);
        let rest = uid.strip_prefix(DICOM_STORAGE_ROOT)?;
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return None;
        }
        let first = rest.split('.').next().unwrap_or("");
        if first.is_empty() {
            return None;
        }
        Some(match first {
            "104" | "88" => Category::Documents,
            _ => Category::Images,
        })
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Category {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                ParseError(format!(
                    "unknown data category {s:?} (one of: {})",
                    Category::ALL.map(Category::as_str).join(", ")
                ))
            })
    }
}

/// Who would receive data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recipient {
    /// The network's central storage (the hub).
    Hub,
    /// Another facility, by 医療機関コード.
    Facility(FacilityCode),
    /// This clinic's own viewers, showing what the network holds about the clinic's
    /// patient: needs the patient's active participation consent at this clinic. Other
    /// facilities' disclosure settings (公開設定) are enforced by the network, which
    /// answers the box only with what is disclosed to it.
    Clinic,
}

impl FromStr for Recipient {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "hub" => return Ok(Recipient::Hub),
            "clinic" => return Ok(Recipient::Clinic),
            _ => {}
        }
        FacilityCode::try_from(s)
            .map(Recipient::Facility)
            .map_err(|e| {
                ParseError(format!(
                    "recipient {s:?}: `hub`, `clinic` or a 医療機関コード: {e}"
                ))
            })
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recipient::Hub => f.write_str("hub"),
            Recipient::Clinic => f.write_str("clinic"),
            Recipient::Facility(code) => write!(f, "{code}"),
        }
    }
}

/// Why data is held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenyReason {
    NoConsent,
    Withdrawn,
    RecipientNotDisclosed,
    RecipientExcluded,
    CategoryExcluded,
    Expired,
    NotYetValid,
    CacheStale,
    ClockBehind,
    /// A consent resource about the patient came from the network and could not be
    /// understood: the patient is denied until a readable one arrives.
    UnreadableNetworkConsent,
}

impl DenyReason {
    pub const ALL: [DenyReason; 10] = [
        DenyReason::NoConsent,
        DenyReason::Withdrawn,
        DenyReason::RecipientNotDisclosed,
        DenyReason::RecipientExcluded,
        DenyReason::CategoryExcluded,
        DenyReason::Expired,
        DenyReason::NotYetValid,
        DenyReason::CacheStale,
        DenyReason::ClockBehind,
        DenyReason::UnreadableNetworkConsent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoConsent => "no-consent",
            DenyReason::Withdrawn => "withdrawn",
            DenyReason::RecipientNotDisclosed => "recipient-not-disclosed",
            DenyReason::RecipientExcluded => "recipient-excluded",
            DenyReason::CategoryExcluded => "category-excluded",
            DenyReason::Expired => "expired",
            DenyReason::NotYetValid => "not-yet-valid",
            DenyReason::CacheStale => "cache-stale",
            DenyReason::ClockBehind => "clock-behind",
            DenyReason::UnreadableNetworkConsent => "unreadable-network-consent",
        }
    }

    /// A sentence for people (English; the console will add Japanese).
    pub fn explain(self) -> &'static str {
        match self {
            DenyReason::NoConsent => "the patient has no consent to share data",
            DenyReason::Withdrawn => "the patient withdrew consent",
            DenyReason::RecipientNotDisclosed => {
                "the consent does not disclose data to this recipient"
            }
            DenyReason::RecipientExcluded => "the consent excludes this recipient",
            DenyReason::CategoryExcluded => "the consent does not cover this kind of data",
            DenyReason::Expired => "the consent has expired",
            DenyReason::NotYetValid => "the consent is not valid yet",
            DenyReason::CacheStale => {
                "the consent cache has not been synced with the network recently enough"
            }
            DenyReason::ClockBehind => "the clock is behind the last sync; check the time",
            DenyReason::UnreadableNetworkConsent => {
                "a consent from the network about this patient could not be understood"
            }
        }
    }

    /// A denial that says nothing about the patient's consent itself (the cache is stale,
    /// the clock is behind): publish nothing new, but remove nothing either; ask again later.
    pub fn is_transient(self) -> bool {
        matches!(self, DenyReason::CacheStale | DenyReason::ClockBehind)
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DenyReason {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        DenyReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ParseError(format!("unknown deny reason {s:?}")))
    }
}

/// A decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "decision", content = "reason")]
pub enum Decision {
    Permit,
    Deny(DenyReason),
}

impl Decision {
    pub fn is_permit(self) -> bool {
        self == Decision::Permit
    }

    /// A denial that says nothing about the consent itself (see [`DenyReason::is_transient`]).
    pub fn is_transient(self) -> bool {
        matches!(self, Decision::Deny(r) if r.is_transient())
    }
}

/// A decision and its row in the audit trail.
///
/// Wire shape: `{"decision":"permit","audit":41}` or
/// `{"decision":"deny","reason":"withdrawn","audit":42}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "DecidedWire", into = "DecidedWire")]
pub struct Decided {
    pub decision: Decision,
    /// The sequence number of the decision's row in the audit trail.
    pub audit: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Verdict {
    Permit,
    Deny,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecidedWire {
    decision: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<DenyReason>,
    audit: i64,
}

impl TryFrom<DecidedWire> for Decided {
    type Error = ParseError;
    fn try_from(w: DecidedWire) -> Result<Decided, ParseError> {
        let decision = match (w.decision, w.reason) {
            (Verdict::Permit, None) => Decision::Permit,
            (Verdict::Deny, Some(r)) => Decision::Deny(r),
            (Verdict::Permit, Some(_)) => return Err(ParseError("a permit with a reason".into())),
            (Verdict::Deny, None) => return Err(ParseError("a deny without a reason".into())),
        };
        Ok(Decided {
            decision,
            audit: w.audit,
        })
    }
}

impl From<Decided> for DecidedWire {
    fn from(d: Decided) -> DecidedWire {
        let (decision, reason) = match d.decision {
            Decision::Permit => (Verdict::Permit, None),
            Decision::Deny(r) => (Verdict::Deny, Some(r)),
        };
        DecidedWire {
            decision,
            reason,
            audit: d.audit,
        }
    }
}

/// What happened at the recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseKind {
    /// The object reached the recipient (a DICOM instance stored, an SS-MIX2 file put or
    /// renamed into place): needs the permit that allowed it.
    Sent,
    /// The object was removed at the recipient (an SS-MIX2 file deleted, or a tombstone
    /// written in its place).
    Deleted,
    /// The network sent this object for the patient, but it was not what was asked for
    /// (another patient's data, another instance): kept from the recipient and removed. A
    /// security event; it refers to no decision.
    Discarded,
}

impl ReleaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseKind::Sent => "sent",
            ReleaseKind::Deleted => "deleted",
            ReleaseKind::Discarded => "discarded",
        }
    }
}

/// What clinic staff did with objects held in the clinic (the console's 保留中).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Handling {
    /// Put back in the way out: each is decided again (consent, identity) before it is sent.
    Requeued,
    /// Removed from the clinic's queue, never sent.
    Discarded,
}

impl Handling {
    /// The audit trail's decision word: `requeued`, `discarded-held`.
    pub fn as_str(self) -> &'static str {
        match self {
            Handling::Requeued => "requeued",
            Handling::Discarded => "discarded-held",
        }
    }
}

/// What left, named without patient data: never a path or a name that carries a patient ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Object {
    /// A DICOM instance, by its SOP Instance UID.
    DicomInstance(String),
    /// An SS-MIX2 file, by the SHA-256 of its bytes (hex) and its data type (e.g. `OMP-01`,
    /// or `OMD`, which has no number).
    Ssmix2File { sha256: String, data_type: String },
}

impl Object {
    /// The object as the audit trail records it (`dicom:UID`, `ssmix2:TYPE:SHA256`), or why
    /// it is not acceptable (it could carry something other than an identifier).
    pub fn audit_text(&self) -> Result<String, ParseError> {
        match self {
            Object::DicomInstance(uid) => {
                let ok = (1..=64).contains(&uid.len())
                    && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.');
                if !ok {
                    return Err(ParseError(
                        "a SOP Instance UID is 1-64 digits and dots".into(),
                    ));
                }
                Ok(format!("dicom:{uid}"))
            }
            Object::Ssmix2File { sha256, data_type } => {
                let hex = sha256.len() == 64
                    && sha256
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !hex {
                    return Err(ParseError("a SHA-256 is 64 lowercase hex digits".into()));
                }
                let t = data_type.as_bytes();
                let typed = (t.len() == 3 || t.len() == 6)
                    && t[..3].iter().all(u8::is_ascii_uppercase)
                    && (t.len() == 3 || (t[3] == b'-' && t[4..].iter().all(u8::is_ascii_digit)));
                if !typed {
                    return Err(ParseError(
                        "an SS-MIX2 data type is like OMP-01 or OMD".into(),
                    ));
                }
                Ok(format!("ssmix2:{data_type}:{sha256}"))
            }
        }
    }
}

/// The most objects one release request may carry (the request line stays well under
/// [`MAX_LINE`]).
pub const MAX_RELEASE_OBJECTS: usize = 256;
/// The longest request line the consent service reads.
pub const MAX_LINE: usize = 64 * 1024;

/// A request to the consent service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// May this patient's data of this category go to this recipient now (or at `at`,
    /// RFC 3339)? Audited before it is answered.
    Decide {
        patient: String,
        recipient: Recipient,
        category: Category,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
    },
    /// Does the patient participate (an active, valid consent, whatever it covers)? What this
    /// clinic's viewers need to see the network's matches for the patient at all. Audited
    /// like a decision, with recipient `clinic`.
    Participates { patient: String },
    /// The patients whose consents changed after change `since`, and the cache's freshness.
    Changes { since: i64 },
    /// The network ID of a local patient (名寄せ).
    NetworkIdOf { patient: String },
    /// The local patient with this network ID.
    LocalIdOf { network_id: String },
    /// Objects of the patient's data of this category reached (or were removed at) the
    /// recipient: one audit row each, referring to the decision that allowed it
    /// ([`Decided::audit`]; required for [`ReleaseKind::Sent`]). At most
    /// [`MAX_RELEASE_OBJECTS`] objects.
    Released {
        patient: String,
        recipient: Recipient,
        category: Category,
        kind: ReleaseKind,
        objects: Vec<Object>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decision: Option<i64>,
    },
    /// Staff requeued or discarded objects of the patient's data of this category that were
    /// held in the clinic on their way to `recipient`: one audit row each, reason `by:BY`,
    /// made before the objects change (what cannot be audited is not done). `patient` is
    /// the ID the object carries (none: it carries none). At most [`MAX_RELEASE_OBJECTS`].
    Handled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        patient: Option<String>,
        recipient: Recipient,
        category: Category,
        handling: Handling,
        objects: Vec<Object>,
        by: String,
    },
}

/// A page of the change feed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Changes {
    /// Ask again from here.
    pub seq: i64,
    pub patients: Vec<String>,
    /// Whether there are more changes after this page.
    pub more: bool,
    /// Whether decisions for recipients outside the clinic can permit now.
    pub fresh: bool,
}

/// The identity cache's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// Whether the patient asked about is known at all.
    pub known: bool,
    /// The network ID (for `network-id-of`; none while the network has not given one).
    #[serde(default)]
    pub network_id: Option<String>,
    /// The local patient (for `local-id-of`).
    #[serde(default)]
    pub patient: Option<String>,
}

/// The consent service's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Answer {
    Decided(Decided),
    /// A release was recorded; `audit` is the last of its rows.
    Recorded {
        audit: i64,
    },
    Changes(Changes),
    Identity(Identity),
    /// The request could not be answered (never carries patient data).
    Error(String),
}

/// A protocol line that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("not a consent protocol message")]
pub struct LineError(#[source] serde_json::Error);

/// One message as a line (JSON and `\n`).
pub fn to_line<T: Serialize>(message: &T) -> String {
    // Serialising these types cannot fail: no maps with non-string keys, no foreign types.
    let mut line = serde_json::to_string(message).unwrap_or_else(|_| "{}".to_owned());
    line.push('\n');
    line
}

/// Reads one message from a line (surrounding whitespace ignored).
pub fn from_line<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, LineError> {
    serde_json::from_str(line.trim()).map_err(LineError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dicom_sop_classes_map_to_their_category_or_to_none() {
        let images = [
            "1.2.840.10008.5.1.4.1.1.2",      // CT
            "1.2.840.10008.5.1.4.1.1.7",      // secondary capture
            "1.2.840.10008.5.1.4.1.1.77.1.1", // VL endoscopic
            "1.2.840.10008.5.1.4.1.1.77.1.6", // VL whole slide microscopy
            "1.2.840.10008.5.1.4.1.1.11.1",   // presentation state
            "1.2.840.10008.5.1.4.1.1.4\0",    // MR, padded
        ];
        for uid in images {
            assert_eq!(
                Category::for_dicom_sop_class(uid),
                Some(Category::Images),
                "{uid}"
            );
        }
        let documents = [
            "1.2.840.10008.5.1.4.1.1.88.33", // comprehensive SR
            "1.2.840.10008.5.1.4.1.1.88.11", // basic text SR
            "1.2.840.10008.5.1.4.1.1.88.59", // key object selection
            "1.2.840.10008.5.1.4.1.1.104.1", // encapsulated PDF
            "1.2.840.10008.5.1.4.1.1.104.2", // encapsulated CDA
        ];
        for uid in documents {
            assert_eq!(
                Category::for_dicom_sop_class(uid),
                Some(Category::Documents),
                "{uid}"
            );
        }
        let none = [
            "",
            "1.2.392.200036.9116.7.8.1.1.1", // a vendor's private class
            "1.2.840.10008.5.1.4.1.1.",
            "1.2.840.10008.5.1.4.1.1.x",
            "1.2.840.10008.5.1.4.1.1..2",
            "1.2.840.10008.1.1",           // verification, not storage
            "1.2.840.10008.5.1.4.1.2.2.1", // a query model
        ];
        for uid in none {
            assert_eq!(Category::for_dicom_sop_class(uid), None, "{uid:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        for c in Category::ALL {
            assert_eq!(c.as_str().parse::<Category>().unwrap(), c);
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        for r in DenyReason::ALL {
            assert_eq!(r.as_str().parse::<DenyReason>().unwrap(), r);
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        assert!("image".parse::<Category>().is_err());
        assert!("cache_stale".parse::<DenyReason>().is_err());
    }

    #[test]
    fn the_wire_shapes_are_the_documented_ones() {
        let req = Request::Decide {
            patient: "0001234".into(),
            recipient: Recipient::Hub,
            category: Category::Images,
            at: None,
        };
        assert_eq!(
            to_line(&req),
            "{\"decide\":{\"patient\":\"0001234\",\"recipient\":\"hub\",\"category\":\"images\"}}\n"
        );
        let deny = Answer::Decided(Decided {
            decision: Decision::Deny(DenyReason::Withdrawn),
            audit: 42,
        });
        assert_eq!(
            to_line(&deny),
            "{\"decided\":{\"decision\":\"deny\",\"reason\":\"withdrawn\",\"audit\":42}}\n"
        );
        let permit = Answer::Decided(Decided {
            decision: Decision::Permit,
            audit: 41,
        });
        assert_eq!(
            to_line(&permit),
            "{\"decided\":{\"decision\":\"permit\",\"audit\":41}}\n"
        );
        assert_eq!(from_line::<Answer>(&to_line(&permit)).unwrap(), permit);
        let released = Request::Released {
            patient: "0001234".into(),
            recipient: Recipient::Hub,
            category: Category::Images,
            kind: ReleaseKind::Sent,
            objects: vec![Object::DicomInstance("1.2.3".into())],
            decision: Some(41),
        };
        assert_eq!(
            to_line(&released),
            "{\"released\":{\"patient\":\"0001234\",\"recipient\":\"hub\",\"category\":\"images\",\"kind\":\"sent\",\"objects\":[{\"dicom-instance\":\"1.2.3\"}],\"decision\":41}}\n"
        );
        assert_eq!(from_line::<Request>(&to_line(&released)).unwrap(), released);
        let handled = Request::Handled {
            patient: Some("0005678".into()),
            recipient: Recipient::Hub,
            category: Category::Images,
            handling: Handling::Discarded,
            objects: vec![Object::DicomInstance("1.2.3".into())],
            by: "uketsuke1 (192.168.50.20)".into(),
        };
        assert_eq!(
            to_line(&handled),
            "{\"handled\":{\"patient\":\"0005678\",\"recipient\":\"hub\",\"category\":\"images\",\"handling\":\"discarded\",\"objects\":[{\"dicom-instance\":\"1.2.3\"}],\"by\":\"uketsuke1 (192.168.50.20)\"}}\n"
        );
        assert_eq!(from_line::<Request>(&to_line(&handled)).unwrap(), handled);
        assert_eq!(Handling::Discarded.as_str(), "discarded-held");
        assert_eq!(
            to_line(&Answer::Recorded { audit: 43 }),
            "{\"recorded\":{\"audit\":43}}\n"
        );
        // A decision without its audit row, a permit with a reason, a deny without one.
        assert!(from_line::<Answer>(r#"{"decided":{"decision":"permit"}}"#).is_err());
        assert!(
            from_line::<Answer>(
                r#"{"decided":{"decision":"permit","reason":"withdrawn","audit":1}}"#
            )
            .is_err()
        );
        assert!(from_line::<Answer>(r#"{"decided":{"decision":"deny","audit":1}}"#).is_err());
        assert_eq!(from_line::<Answer>(&to_line(&deny)).unwrap(), deny);
        let facility = Request::Decide {
            patient: "1".into(),
            recipient: Recipient::Facility(FacilityCode::try_from("1312345679").unwrap()),
            category: Category::Documents,
            at: Some("2026-01-01T00:00:00+09:00".into()),
        };
        assert_eq!(from_line::<Request>(&to_line(&facility)).unwrap(), facility);
        // Strings that are not the enums' names are refused, never guessed.
        assert!(
            from_line::<Answer>(r#"{"decided":{"decision":"deny","reason":"busy","audit":1}}"#)
                .is_err()
        );
        assert!(from_line::<Answer>(r#"{"decided":{"decision":"maybe","audit":1}}"#).is_err());
        assert!(
            from_line::<Request>(
                r#"{"decide":{"patient":"1","recipient":"hub","category":"image"}}"#
            )
            .is_err()
        );
        assert!(from_line::<Request>(r#"{"changes":{"since":1,"extra":2}}"#).is_err());
        assert!(
            from_line::<Request>(r#"{"patient":"1","recipient":"hub","category":"images"}"#)
                .is_err()
        );
    }

    #[test]
    fn release_objects_name_what_left_without_patient_data() {
        let sha = "ab".repeat(32);
        assert_eq!(
            Object::DicomInstance("1.2.840.1.5".into())
                .audit_text()
                .unwrap(),
            "dicom:1.2.840.1.5"
        );
        assert_eq!(
            Object::Ssmix2File {
                sha256: sha.clone(),
                data_type: "OMP-01".into()
            }
            .audit_text()
            .unwrap(),
            format!("ssmix2:OMP-01:{sha}")
        );
        assert_eq!(
            Object::Ssmix2File {
                sha256: sha.clone(),
                data_type: "OMD".into()
            }
            .audit_text()
            .unwrap(),
            format!("ssmix2:OMD:{sha}")
        );
        for bad in [
            Object::DicomInstance("0001234/x".into()),
            Object::DicomInstance(String::new()),
            Object::DicomInstance("1".repeat(65)),
            Object::Ssmix2File {
                sha256: "0001234".into(),
                data_type: "OMP-01".into(),
            },
            Object::Ssmix2File {
                sha256: sha.clone(),
                data_type: "000/12/0001234_OMP-01".into(),
            },
            Object::Ssmix2File {
                sha256: sha.clone(),
                data_type: "OMP-".into(),
            },
            Object::Ssmix2File {
                sha256: sha.clone(),
                data_type: "omd".into(),
            },
        ] {
            assert!(bad.audit_text().is_err(), "{bad:?}");
        }
    }
}
