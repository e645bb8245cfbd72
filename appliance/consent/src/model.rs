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

/// Why a value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModelError(pub String);

/// A patient's ID in this clinic's EMR / SS-MIX2 storage. Leading zeros are significant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PatientId(String);

impl TryFrom<String> for PatientId {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, ModelError> {
        if value.is_empty() || value.len() > 64 {
            return Err(ModelError("a patient ID is 1 to 64 characters".into()));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(ModelError(
                "a patient ID may only contain letters, digits, `-` and `.`".into(),
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

impl From<PatientId> for String {
    fn from(p: PatientId) -> String {
        p.0
    }
}

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

    /// DICOM instances (any SOP class) are images; encapsulated PDF and structured reports
    /// count as documents.
    pub fn for_dicom_sop_class(sop_class_uid: &str) -> Category {
        const ENCAPSULATED_PDF: &str = "1.2.840.10008.5.1.4.1.1.104.1";
        const SR_PREFIX: &str = "1.2.840.10008.5.1.4.1.1.88.";
        if sop_class_uid == ENCAPSULATED_PDF || sop_class_uid.starts_with(SR_PREFIX) {
            Category::Documents
        } else {
            Category::Images
        }
    }
}

impl FromStr for Category {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                ModelError(format!(
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
}

impl FromStr for Recipient {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        if s == "hub" {
            return Ok(Recipient::Hub);
        }
        FacilityCode::try_from(s)
            .map(Recipient::Facility)
            .map_err(|e| ModelError(format!("recipient {s:?}: `hub` or a 医療機関コード: {e}")))
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recipient::Hub => f.write_str("hub"),
            Recipient::Facility(code) => write!(f, "{code}"),
        }
    }
}

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
