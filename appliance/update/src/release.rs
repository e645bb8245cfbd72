//! What the update channel says of a bundle: the `custom` metadata of its TUF target
//! (`{"tsunagi": {"version": …, "compatible": …, "waves": […]}}`), signed with the rest of
//! the targets metadata. The release tooling writes it, the box reads it; both with these
//! types, so the two cannot drift.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The key of our metadata in a target's `custom` map.
pub const CUSTOM_KEY: &str = "tsunagi";

/// A box's wave seed is in `0..SEEDS` (as Bottlerocket's): a wave is the boxes whose seed is
/// below a bound.
pub const SEEDS: u16 = 2048;

/// A release's version: one to four dot-separated numbers (`1.4.0`), compared number by
/// number (`1.10` is newer than `1.9`; `1.2` and `1.2.0` are the same).
#[derive(Debug, Clone)]
pub struct Version(Vec<u32>);

impl Version {
    /// The parts, with trailing zeros dropped (what equality and order compare).
    fn significant(&self) -> &[u32] {
        let end = self.0.iter().rposition(|&n| n != 0).map_or(0, |i| i + 1);
        &self.0[..end]
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Version) -> bool {
        self.significant() == other.significant()
    }
}

impl Eq for Version {}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> std::cmp::Ordering {
        self.significant().cmp(other.significant())
    }
}

/// Why a version string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a version (one to four dot-separated numbers, such as 1.4.0)")]
pub struct VersionError(String);

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Version, VersionError> {
        let bad = || VersionError(s.chars().take(40).collect());
        let parts = s
            .split('.')
            .map(|p| {
                // Digits only: no sign, no spaces, no leading zeros but "0" itself.
                if p.is_empty()
                    || !p.bytes().all(|b| b.is_ascii_digit())
                    || (p.len() > 1 && p.starts_with('0'))
                {
                    return Err(bad());
                }
                p.parse::<u32>().map_err(|_| bad())
            })
            .collect::<Result<Vec<u32>, VersionError>>()?;
        if parts.len() > 4 {
            return Err(bad());
        }
        Ok(Version(parts))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Version, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One wave: the boxes whose seed is below `seeds_below` may take the release from `starts`
/// on (unless an earlier wave already let them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Wave {
    pub seeds_below: u16,
    pub starts: jiff::Timestamp,
}

/// Our metadata of one bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Custom {
    pub version: Version,
    /// RAUC's `compatible` of the bundle: a box takes only its own.
    pub compatible: String,
    /// In order: bounds increasing, starts not decreasing, the last bound [`SEEDS`] (every
    /// box, eventually).
    pub waves: Vec<Wave>,
}

/// Why a release's metadata is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomError {
    #[error("the release has no waves")]
    NoWaves,
    #[error(
        "the waves are not in order (each wave's seed bound above the last, its start not before it)"
    )]
    Order,
    #[error("the last wave does not reach every box (its seed bound must be {SEEDS})")]
    NotEveryBox,
    #[error("the compatible is empty or not printable ASCII")]
    Compatible,
}

impl Custom {
    /// Checks the waves and the compatible.
    pub fn validate(&self) -> Result<(), CustomError> {
        if self.compatible.is_empty()
            || self.compatible.len() > 64
            || !self.compatible.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(CustomError::Compatible);
        }
        let Some(last) = self.waves.last() else {
            return Err(CustomError::NoWaves);
        };
        if self
            .waves
            .windows(2)
            .any(|w| w[0].seeds_below >= w[1].seeds_below || w[0].starts > w[1].starts)
        {
            return Err(CustomError::Order);
        }
        if last.seeds_below != SEEDS {
            return Err(CustomError::NotEveryBox);
        }
        Ok(())
    }

    /// When the box with `seed` may take the release: the start of the first wave that
    /// holds it (`None`: a seed outside `0..SEEDS`, or waves that were not validated).
    pub fn starts_for(&self, seed: u16) -> Option<jiff::Timestamp> {
        self.waves
            .iter()
            .find(|w| seed < w.seeds_below)
            .map(|w| w.starts)
    }
}

/// A bundle the channel offers, as its signed metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The target's name in the repository.
    pub target: String,
    /// Its length in bytes and SHA-256, from the signed targets metadata.
    pub length: u64,
    pub sha256: [u8; 32],
    pub custom: Custom,
}

impl Release {
    /// The file's name on the server (consistent snapshots: `SHA256.NAME`).
    pub fn file_name(&self) -> String {
        format!("{}.{}", hex::encode(self.sha256), self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn versions_compare_number_by_number_and_bad_ones_are_refused() {
        assert!(v("1.10") > v("1.9"));
        assert_eq!(v("1.2"), v("1.2.0"));
        assert!(v("2") > v("1.99.99.99"));
        assert_eq!(v("0.3.1").to_string(), "0.3.1");
        for bad in [
            "",
            "1.",
            ".1",
            "1..2",
            "01.2",
            "1.2.3.4.5",
            "+1",
            "1.-2",
            " 1",
            "1.2a",
            "99999999999",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?}");
        }
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn waves_must_reach_every_box_in_order_and_a_seed_finds_its_wave() {
        let custom = |waves: Vec<(u16, &str)>| Custom {
            version: v("1.0"),
            compatible: "tsunagi".into(),
            waves: waves
                .into_iter()
                .map(|(seeds_below, starts)| Wave {
                    seeds_below,
                    starts: at(starts),
                })
                .collect(),
        };
        let good = custom(vec![
            (64, "2026-12-01T00:00:00Z"),
            (SEEDS, "2026-12-03T00:00:00Z"),
        ]);
        assert_eq!(good.validate(), Ok(()));
        assert_eq!(good.starts_for(0), Some(at("2026-12-01T00:00:00Z")));
        assert_eq!(good.starts_for(64), Some(at("2026-12-03T00:00:00Z")));
        assert_eq!(good.starts_for(SEEDS), None);
        assert_eq!(custom(vec![]).validate(), Err(CustomError::NoWaves));
        assert_eq!(
            custom(vec![(64, "2026-12-01T00:00:00Z")]).validate(),
            Err(CustomError::NotEveryBox)
        );
        assert_eq!(
            custom(vec![
                (64, "2026-12-03T00:00:00Z"),
                (SEEDS, "2026-12-01T00:00:00Z")
            ])
            .validate(),
            Err(CustomError::Order)
        );
        let json = serde_json::to_value(&good).unwrap();
        assert_eq!(json["waves"][1]["seeds-below"], 2048);
        assert_eq!(serde_json::from_value::<Custom>(json).unwrap(), good);
    }
}
