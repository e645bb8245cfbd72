//! Change detection rules that do not depend on how changes are noticed (inotify, polling or
//! a transaction storage): when a file is settled enough to read (E-01), and when a key
//! that lost its current file is really deleted (E-03). Pure: the caller passes the time.

use std::collections::BTreeMap;

use crate::name::Key;

/// Nanoseconds since the Unix epoch.
pub type Nanos = i128;

/// E-01: EMRs write files in place, not through a temporary name, so a file whose mtime is
/// within `delay` of `now` may still be growing and is not read yet. (After reading, the
/// scanner re-checks size and mtime and reads again if they changed.)
pub fn settled(mtime_ns: Nanos, now_ns: Nanos, delay_ns: Nanos) -> bool {
    now_ns.saturating_sub(mtime_ns) >= delay_ns
}

/// What to do with a key in this scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDecision {
    /// It has a current version: publish it.
    Current,
    /// It lost its current version, but not for long enough: keep what was published (the
    /// EMR may be between renaming `_1` to `_2` and writing the new `_1`).
    Wait,
    /// Confirmed deleted: by a second scan at least `confirm_after` later, or by a `DEL`
    /// record of the transaction storage.
    Delete,
}

/// E-03: a key that shows no current file in one scan is deleted only when a later scan, at
/// least `confirm_after` later, confirms it, or a `DEL` transaction record exists. Holds only
/// the keys under suspicion.
#[derive(Debug, Clone)]
pub struct DeletionGate {
    confirm_after_ns: Nanos,
    suspected: BTreeMap<Key, Nanos>,
}

impl DeletionGate {
    pub fn new(confirm_after_ns: Nanos) -> DeletionGate {
        DeletionGate {
            confirm_after_ns,
            suspected: BTreeMap::new(),
        }
    }

    /// One observation of a key that was published before.
    pub fn observe(&mut self, key: &Key, has_current: bool, now_ns: Nanos) -> KeyDecision {
        if has_current {
            self.suspected.remove(key);
            return KeyDecision::Current;
        }
        let since = *self.suspected.entry(key.clone()).or_insert(now_ns);
        if now_ns.saturating_sub(since) >= self.confirm_after_ns {
            self.suspected.remove(key);
            KeyDecision::Delete
        } else {
            KeyDecision::Wait
        }
    }

    /// A `DEL` record in the transaction storage confirms at once.
    pub fn confirmed_by_transaction(&mut self, key: &Key) -> KeyDecision {
        self.suspected.remove(key);
        KeyDecision::Delete
    }

    /// Keys waiting for confirmation.
    pub fn pending(&self) -> usize {
        self.suspected.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn key() -> Key {
        Key {
            patient_id: "0001".into(),
            care_date: "-".into(),
            data_type: "ADT-00".into(),
            order_no: "999999999999999".into(),
        }
    }

    #[test]
    fn e01_a_file_written_within_the_delay_is_not_read() {
        assert!(!settled(100 * S, 105 * S, 10 * S));
        assert!(settled(100 * S, 110 * S, 10 * S));
        // A clock behind the file's mtime: not settled.
        assert!(!settled(100 * S, 90 * S, 10 * S));
    }

    #[test]
    fn e03_one_scan_never_deletes() {
        let mut g = DeletionGate::new(30 * S);
        assert_eq!(g.observe(&key(), false, 100 * S), KeyDecision::Wait);
        assert_eq!(g.observe(&key(), false, 120 * S), KeyDecision::Wait);
        // The new _1 appeared: no deletion, and the clock starts over.
        assert_eq!(g.observe(&key(), true, 125 * S), KeyDecision::Current);
        assert_eq!(g.observe(&key(), false, 126 * S), KeyDecision::Wait);
        assert_eq!(g.observe(&key(), false, 156 * S), KeyDecision::Delete);
        assert_eq!(g.pending(), 0);
        assert_eq!(g.observe(&key(), false, 157 * S), KeyDecision::Wait);
        assert_eq!(g.confirmed_by_transaction(&key()), KeyDecision::Delete);
    }
}
