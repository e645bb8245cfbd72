//! The decision: may this patient's data of this category go to this recipient now?
//!
//! Pure: the caller passes the patient's consent records, the recipient, the category, the
//! time and the cache's freshness; nothing here does I/O, so it is fast and testable.
//!
//! Rules, in order (default deny):
//! 1. A clock earlier than the last pull by more than [`CLOCK_SLACK`] is
//!    `Deny(ClockBehind)`: time cannot be trusted.
//! 2. The patient's effective consent is the consent created last (by the order the box
//!    learned of it). A consent with any withdrawn version is withdrawn for good: a
//!    withdrawal wins over every other version of that consent, however it arrived.
//!    No consent → `Deny(NoConsent)`; withdrawn → `Deny(Withdrawn)`. These are answered
//!    even from a stale cache (a definite "no" the box knows itself).
//!    Then the cache must be fresh: the last successful pull from the network is at most
//!    `bound` old, else `Deny(CacheStale)` (fail closed: a withdrawal recorded on the
//!    network may not be known yet).
//! 3. Its latest version must be valid at `at`: `NotYetValid`, `Expired`.
//! 4. Recipient: the hub (the network's central storage) is covered by any active
//!    participation consent; a facility must not be excluded (`RecipientExcluded`) and must be
//!    in the scope (`RecipientNotDisclosed`) unless the scope is every participant.
//! 5. The category must be covered (`CategoryExcluded`).

use std::time::Duration;

use crate::model::{Category, Consent, Recipient, Scope, Status};
use crate::time::Timestamp;

/// How far the clock may be behind the last pull before decisions stop trusting it.
pub const CLOCK_SLACK: Duration = Duration::from_secs(300);

pub use consent_protocol::{Decision, DenyReason};

/// What the box knows about how current its cache is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// When the last successful pull from the network finished.
    pub last_pull: Option<Timestamp>,
    /// How old it may be.
    pub bound: Duration,
}

/// A consent record as the store hands it over: the version and the order in which the box
/// first learned of its consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub consent: Consent,
    /// Increases with each new consent (not each version) the box learns of.
    pub created_seq: i64,
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The patient's effective consent: the latest version of the consent created last, and
/// whether any version of it was a withdrawal.
pub fn effective(records: &[Known]) -> Option<(&Consent, bool)> {
    let newest = records.iter().map(|k| k.created_seq).max()?;
    let versions: Vec<&Known> = records.iter().filter(|k| k.created_seq == newest).collect();
    let withdrawn = versions
        .iter()
        .any(|k| k.consent.status == Status::Withdrawn);
    let latest = versions.iter().max_by_key(|k| k.consent.version)?;
    Some((&latest.consent, withdrawn))
}

/// The patient's active participation consent at `at`: rules 1 to 3.
fn active(
    records: &[Known],
    at: Timestamp,
    now: Timestamp,
    freshness: Freshness,
) -> Result<&Consent, DenyReason> {
    use DenyReason::*;
    if freshness
        .last_pull
        .is_some_and(|pulled| now < pulled - secs(CLOCK_SLACK))
    {
        return Err(ClockBehind);
    }
    // What the box itself knows to be "no" (no consent, a withdrawal recorded here or
    // pulled earlier) is answered as such even from a stale cache: a stale cache can only
    // miss a newer "no", never turn this one into a "yes". Revocations act on it offline.
    let Some((consent, withdrawn)) = effective(records) else {
        return Err(NoConsent);
    };
    if withdrawn || consent.status == Status::Withdrawn {
        return Err(Withdrawn);
    }
    match freshness.last_pull {
        Some(pulled) if now - pulled <= secs(freshness.bound) => {}
        _ => return Err(CacheStale),
    }
    if at < consent.valid_from {
        return Err(NotYetValid);
    }
    if consent.valid_until.is_some_and(|until| at >= until) {
        return Err(Expired);
    }
    Ok(consent)
}

/// Whether the patient participates (an active, valid consent) at `at`, whatever it covers:
/// what this clinic's viewers need to see the network's studies of the patient at all.
pub fn participation(
    records: &[Known],
    at: Timestamp,
    now: Timestamp,
    freshness: Freshness,
) -> Decision {
    match active(records, at, now, freshness) {
        Ok(_) => Decision::Permit,
        Err(reason) => Decision::Deny(reason),
    }
}

/// Decides for one patient's records (all versions of all their consents).
pub fn decide(
    records: &[Known],
    recipient: &Recipient,
    category: Category,
    at: Timestamp,
    now: Timestamp,
    freshness: Freshness,
) -> Decision {
    use DenyReason::*;
    let consent = match active(records, at, now, freshness) {
        Ok(c) => c,
        Err(reason) => return Decision::Deny(reason),
    };
    if let Recipient::Facility(code) = recipient {
        if consent.excluded.contains(code) {
            return Decision::Deny(RecipientExcluded);
        }
        if let Scope::Facilities(list) = &consent.scope
            && !list.contains(code)
        {
            return Decision::Deny(RecipientNotDisclosed);
        }
    }
    if !consent.categories.contains(&category) {
        return Decision::Deny(CategoryExcluded);
    }
    Decision::Permit
}

#[cfg(test)]
mod tests;
