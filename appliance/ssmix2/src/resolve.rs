//! The condition-flag lifecycle: which version of a key is current (reference §1.4–1.5).
//!
//! * Current = the file with flag `1`. Several (a writer crashed between create and rename):
//!   the greatest 発生日時, then MSH-7, then mtime, then name wins; all are marked
//!   `DUPLICATE_CURRENT` (E-04).
//! * `_2` files are history. `_0` files next to a `_1` are history written by a legacy writer
//!   (E-05).
//! * No `_1` but some `_0`: the key is deleted; every file of it is `deleted`.
//! * Only `_2` files: inconsistent; the newest is taken as current, marked `NO_CURRENT`.

use serde::Serialize;

use crate::name::Flag;
use crate::reason::Reason;

/// What a file is, within its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Current,
    Superseded,
    Deleted,
    Quarantined,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Current => "current",
            Status::Superseded => "superseded",
            Status::Deleted => "deleted",
            Status::Quarantined => "quarantined",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "current" => Status::Current,
            "superseded" => Status::Superseded,
            "deleted" => Status::Deleted,
            "quarantined" => Status::Quarantined,
            _ => return None,
        })
    }
}

/// One version of a key, as the resolution needs it.
#[derive(Debug, Clone)]
pub struct Version<'a> {
    pub flag: Flag,
    /// 発生日時 ordering key (see `LocalTime::sort_key`).
    pub occurred: (u16, u8, u8, u8, u8, u8, u32),
    /// MSH-7 as written, or empty.
    pub sent: &'a str,
    pub mtime_ns: i128,
    pub name: &'a str,
}

/// The state of a key as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Index into the versions of the current one.
    Current(usize),
    Deleted,
}

/// Resolves one key: a status (and an anomaly, if any) per version, in input order.
pub fn resolve<'a>(versions: &[Version<'a>]) -> (KeyState, Vec<(Status, Option<Reason>)>) {
    let rank = |v: &Version<'a>| (v.occurred, v.sent, v.mtime_ns, v.name);
    let newest_with = |flag: Flag| {
        versions
            .iter()
            .enumerate()
            .filter(|(_, v)| v.flag == flag)
            .max_by_key(|(_, v)| rank(v))
            .map(|(i, _)| i)
    };
    let count = |flag: Flag| versions.iter().filter(|v| v.flag == flag).count();
    let mut out = vec![(Status::Superseded, None); versions.len()];
    if let Some(winner) = newest_with(Flag::Current) {
        let duplicate = count(Flag::Current) > 1;
        for (i, v) in versions.iter().enumerate() {
            if v.flag == Flag::Current && duplicate {
                out[i].1 = Some(Reason::DuplicateCurrent);
            }
        }
        out[winner].0 = Status::Current;
        return (KeyState::Current(winner), out);
    }
    if count(Flag::Deleted) > 0 {
        for o in &mut out {
            o.0 = Status::Deleted;
        }
        return (KeyState::Deleted, out);
    }
    match newest_with(Flag::Superseded) {
        Some(winner) => {
            out[winner] = (Status::Current, Some(Reason::NoCurrent));
            (KeyState::Current(winner), out)
        }
        None => (KeyState::Deleted, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(flag: Flag, t: u32, name: &str) -> Version<'_> {
        Version {
            flag,
            occurred: (2011, 1, 1, 0, 0, 0, t),
            sent: "",
            mtime_ns: 0,
            name,
        }
    }

    #[test]
    fn update_then_current() {
        let (state, s) = resolve(&[v(Flag::Superseded, 1, "a"), v(Flag::Current, 2, "b")]);
        assert_eq!(state, KeyState::Current(1));
        assert_eq!(s, vec![(Status::Superseded, None), (Status::Current, None)]);
    }

    #[test]
    fn e04_duplicate_current_takes_the_newest() {
        let (state, s) = resolve(&[v(Flag::Current, 3, "a"), v(Flag::Current, 2, "b")]);
        assert_eq!(state, KeyState::Current(0));
        assert_eq!(s[0], (Status::Current, Some(Reason::DuplicateCurrent)));
        assert_eq!(s[1], (Status::Superseded, Some(Reason::DuplicateCurrent)));
        // Same 発生日時: MSH-7 decides, then mtime.
        let mut a = v(Flag::Current, 3, "a");
        let mut b = v(Flag::Current, 3, "b");
        a.sent = "20110101000001";
        b.sent = "20110101000000";
        assert_eq!(resolve(&[a.clone(), b.clone()]).0, KeyState::Current(0));
        a.sent = "";
        b.sent = "";
        b.mtime_ns = 5;
        assert_eq!(resolve(&[a, b]).0, KeyState::Current(1));
    }

    #[test]
    fn e05_flag_semantics() {
        // _0 beside a _1: legacy history.
        let (state, s) = resolve(&[v(Flag::Deleted, 1, "a"), v(Flag::Current, 2, "b")]);
        assert_eq!(state, KeyState::Current(1));
        assert_eq!(s[0].0, Status::Superseded);
        // _0 only (renamed versions plus the tombstone): deleted.
        let (state, s) = resolve(&[
            v(Flag::Deleted, 1, "a"),
            v(Flag::Deleted, 2, "b"),
            v(Flag::Superseded, 0, "c"),
        ]);
        assert_eq!(state, KeyState::Deleted);
        assert!(
            s.iter()
                .all(|(st, r)| *st == Status::Deleted && r.is_none())
        );
        // _2 only: the newest, flagged.
        let (state, s) = resolve(&[v(Flag::Superseded, 1, "a"), v(Flag::Superseded, 2, "b")]);
        assert_eq!(state, KeyState::Current(1));
        assert_eq!(s[1], (Status::Current, Some(Reason::NoCurrent)));
    }
}
