//! The consent and identity model, aligned with FHIR R4 / JP Core (see `docs/consent.md`).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tsunagi_config::FacilityCode;

use crate::time::Timestamp;

/// The identifier system of a facility's patient IDs: this prefix followed by the facility's
/// 10-digit 医療機関コード (JP Core).
pub const PATIENT_ID_SYSTEM_PREFIX: &str = "urn:oid:1.2.392.100495.20.3.51.1";

/// The identifier system of patient IDs at `facility`.
pub fn patient_id_system(facility: &FacilityCode) -> String {
    format!("{PATIENT_ID_SYSTEM_PREFIX}{facility}")
}

/// A facility of the network as its directory names it (FHIR `Organization`, JP Core): for
/// staff to pick recipients by name. Decisions use only the code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Facility {
    pub code: FacilityCode,
    pub name: String,
    /// `Organization.active` (absent: active). An inactive facility is not offered.
    pub active: bool,
}

/// The longest facility name kept.
pub const MAX_FACILITY_NAME: usize = 200;

/// Why a value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModelError(pub String);

/// A patient's ID in this clinic's EMR / SS-MIX2 storage, or as a modality sends it. Leading
/// zeros are significant. Any valid DICOM PatientID is one (LO, PS3.5 6.2: 1 to 64
/// characters of the default repertoire, printable ASCII, without a backslash; the padding
/// spaces around it are not part of it), so that no instance a modality sends is refused for
/// its ID's form: `AB_01`, `AB 01` and `A|B,C$` are IDs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PatientId(String);

/// Whether `value` is a DICOM LO value as an ID carries it: 1-64 printable ASCII
/// characters, no backslash, no leading or trailing space.
pub fn is_dicom_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'\\')
        && !value.starts_with(' ')
        && !value.ends_with(' ')
}

impl TryFrom<String> for PatientId {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, ModelError> {
        if !is_dicom_id(&value) {
            return Err(ModelError(
                "a patient ID is a DICOM PatientID: 1 to 64 printable ASCII characters, no backslash, no leading or trailing space"
                    .into(),
            ));
        }
        Ok(Self(value))
    }
}

impl FromStr for PatientId {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        Self::try_from(s.to_owned())
    }
}

impl PatientId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PatientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<consent_protocol::ParseError> for ModelError {
    fn from(e: consent_protocol::ParseError) -> ModelError {
        ModelError(e.0)
    }
}

impl From<PatientId> for String {
    fn from(p: PatientId) -> String {
        p.0
    }
}

pub use consent_protocol::{Category, Handling, Recipient};

/// To whom a consent discloses data (公開設定).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "facilities")]
pub enum Scope {
    /// Every participant of the network.
    AllParticipants,
    /// Only these facilities.
    Facilities(BTreeSet<FacilityCode>),
}

/// A consent's participation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Active,
    Withdrawn,
}

/// Where a consent record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Recorded on this box.
    Local,
    /// Pulled from the network.
    Network,
}

/// Evidence of a consent: the scanned form's hash and who recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// SHA-256 of the scanned consent form, hex.
    pub sha256: String,
    pub recorded_by: String,
    pub recorded_at: Timestamp,
}

/// One version of a consent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// The logical consent (stable across versions).
    pub id: String,
    pub version: u32,
    pub patient: PatientId,
    pub status: Status,
    pub scope: Scope,
    /// Facilities never disclosed to, whatever the scope says.
    pub excluded: BTreeSet<FacilityCode>,
    /// The data categories covered; anything else is not released.
    pub categories: BTreeSet<Category>,
    pub valid_from: Timestamp,
    /// Exclusive end; none means open-ended.
    pub valid_until: Option<Timestamp>,
    pub evidence: Option<Evidence>,
    pub source: Source,
    /// When this version was recorded (on the box, or by the network).
    pub recorded_at: Timestamp,
}

/// Sex, as JP Core Patient.gender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sex {
    Male,
    Female,
    Other,
    Unknown,
}

impl FromStr for Sex {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "male" => Ok(Sex::Male),
            "female" => Ok(Sex::Female),
            "other" => Ok(Sex::Other),
            "unknown" => Ok(Sex::Unknown),
            _ => Err(ModelError(format!(
                "sex {s:?}: one of male, female, other, unknown"
            ))),
        }
    }
}

/// A patient of this clinic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patient {
    pub id: PatientId,
    pub family_kanji: String,
    pub given_kanji: String,
    pub family_kana: String,
    pub given_kana: String,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
    pub sex: Sex,
    /// The network's identity for this patient (名寄せ), once known.
    pub network_id: Option<String>,
}

/// Another facility's identifier for the same patient (名寄せ).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub system: String,
    pub value: String,
    pub recorded_at: Timestamp,
}

/// A name as typed into a search: hiragana become katakana (ぁ..ゖ → ァ..ヶ), and spaces
/// (ASCII and ideographic) are dropped; anything else stays as typed.
pub fn search_kana(text: &str) -> String {
    text.chars()
        .filter(|c| *c != ' ' && *c != '\u{3000}')
        .map(|c| match c {
            '\u{3041}'..='\u{3096}' => char::from_u32(c as u32 + 0x60).unwrap_or(c),
            _ => c,
        })
        .collect()
}
