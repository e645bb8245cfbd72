//! The in-memory resource store: versions, `meta`, identifier matching and search.

use std::collections::BTreeMap;
use std::hash::{BuildHasher as _, Hasher as _, RandomState};

use serde_json::{Value, json};

use super::ResourceType;
use super::time::{format_instant, now_micros};

/// One resource with its history (oldest first; the last is current).
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) versions: Vec<Value>,
    /// When the current version was written (µs since the epoch).
    pub(crate) last_updated: i64,
}

impl Entry {
    pub(crate) fn current(&self) -> &Value {
        // Invariant: an entry is only ever created with one version and never shrinks.
        self.versions.last().unwrap_or(&Value::Null)
    }
}

/// What a write did.
#[derive(Clone, Debug)]
pub(crate) struct Written {
    pub(crate) created: bool,
    pub(crate) id: String,
    pub(crate) version: usize,
    pub(crate) resource: Value,
}

/// All resources. Cloned for a transaction, which commits by replacing the original.
#[derive(Clone, Debug, Default)]
pub(crate) struct Store {
    resources: BTreeMap<(ResourceType, String), Entry>,
    /// The last `lastUpdated` handed out: every write or transaction gets a later one; the
    /// entries of one transaction share it (as on real servers, which stamp a transaction
    /// once), so several resources can have the same `lastUpdated`.
    clock: i64,
}

/// A token search value: `[system]|[value]` or `value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Token {
    /// `None`: any system; `Some("")`: no system.
    pub(crate) system: Option<String>,
    /// `None`: any value (`system|`).
    pub(crate) value: Option<String>,
}

impl Token {
    /// Parses `[system]|[value]` or `value` with FHIR's search escapes (`\\`, `\|`, `\,`,
    /// `\$`: R4 search 3.1.1.4.7). Refused: an empty token, an unescaped `,` (a list of
    /// values, not served here), a second unescaped `|`, a lone or unknown escape.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        // The parts between unescaped `|`, unescaped.
        let mut parts = vec![String::new()];
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(e @ ('\\' | '|' | ',' | '$')) => parts.last_mut()?.push(e),
                    _ => return None,
                },
                ',' => return None,
                '|' => parts.push(String::new()),
                c => parts.last_mut()?.push(c),
            }
        }
        let token = match parts.as_slice() {
            [value] => Self {
                system: None,
                value: Some(value.clone()),
            },
            [system, value] => Self {
                system: Some(system.clone()),
                value: (!value.is_empty()).then(|| value.clone()),
            },
            _ => return None,
        };
        let empty = token.system.as_deref().is_none_or(str::is_empty) && token.value.is_none();
        (!s.is_empty() && !empty).then_some(token)
    }

    /// Whether any of `resource.identifier[]` matches.
    pub(crate) fn matches_identifier(&self, resource: &Value) -> bool {
        let Some(ids) = resource.get("identifier").and_then(Value::as_array) else {
            return false;
        };
        ids.iter().any(|id| {
            let system = id.get("system").and_then(Value::as_str);
            let value = id.get("value").and_then(Value::as_str);
            let system_ok = match self.system.as_deref() {
                None => true,
                Some("") => system.is_none(),
                Some(s) => system == Some(s),
            };
            let value_ok = match self.value.as_deref() {
                None => true,
                Some(v) => value == Some(v),
            };
            system_ok && value_ok
        })
    }
}

/// One search criterion (all given criteria must hold).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Criterion {
    Identifier(Token),
    /// `Consent.patient.reference` equals this (`Patient/{id}`).
    Patient(String),
    /// The Patient that `Consent.patient.reference` names has a matching identifier
    /// (the chained search `patient:Patient.identifier=`).
    PatientIdentifier(Token),
    /// After the page that ended at this `(lastUpdated, id)` (a search's continuation).
    After(i64, String),
    /// `lastUpdated` is within `[from, to)` µs.
    LastUpdated {
        from: i64,
        to: i64,
    },
}

impl Store {
    pub(crate) fn get(&self, ty: ResourceType, id: &str) -> Option<&Entry> {
        self.resources.get(&(ty, id.to_owned()))
    }

    /// Resources of `ty` matching every criterion, oldest `lastUpdated` first (then by id).
    pub(crate) fn search(&self, ty: ResourceType, criteria: &[Criterion]) -> Vec<(&str, &Entry)> {
        let mut hits: Vec<(&str, &Entry)> = self
            .resources
            .iter()
            .filter(|((t, _), _)| *t == ty)
            .filter(|((_, id), entry)| criteria.iter().all(|c| self.matches(c, id, entry)))
            .map(|((_, id), entry)| (id.as_str(), entry))
            .collect();
        hits.sort_by(|(a, x), (b, y)| (x.last_updated, *a).cmp(&(y.last_updated, *b)));
        hits
    }

    fn matches(&self, criterion: &Criterion, id: &str, entry: &Entry) -> bool {
        match criterion {
            Criterion::PatientIdentifier(token) => entry
                .current()
                .get("patient")
                .and_then(|p| p.get("reference"))
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("Patient/"))
                .and_then(|pid| self.get(ResourceType::Patient, pid))
                .is_some_and(|patient| token.matches_identifier(patient.current())),
            Criterion::After(at, after) => (entry.last_updated, id) > (*at, after.as_str()),
            other => matches(other, entry),
        }
    }

    /// The `lastUpdated` of the next write or transaction.
    pub(crate) fn tick(&mut self) -> i64 {
        self.clock = now_micros().max(self.clock + 1);
        self.clock
    }

    /// A new server-assigned id (a random UUID, v4 layout).
    pub(crate) fn new_id(&self) -> String {
        loop {
            let state = RandomState::new();
            let mut a = state.build_hasher();
            a.write_i64(now_micros());
            let mut b = state.build_hasher();
            b.write_usize(self.resources.len());
            let bits = (u128::from(a.finish()) << 64) | u128::from(b.finish());
            let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
            let hex = format!("{bits:032x}");
            let id = format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            );
            if !self.resources.keys().any(|(_, existing)| *existing == id) {
                return id;
            }
        }
    }

    /// Writes `resource` as the next version of `ty/id` (creating it if new), setting
    /// `id`, `meta.versionId` and `meta.lastUpdated`. The resource must be valid already.
    pub(crate) fn write(&mut self, ty: ResourceType, id: &str, resource: Value) -> Written {
        let at = self.tick();
        self.write_at(ty, id, resource, at)
    }

    /// [`Store::write`] with `lastUpdated` = `at` (from [`Store::tick`]).
    pub(crate) fn write_at(
        &mut self,
        ty: ResourceType,
        id: &str,
        mut resource: Value,
        at: i64,
    ) -> Written {
        let key = (ty, id.to_owned());
        let version = self.resources.get(&key).map_or(1, |e| e.versions.len() + 1);
        if let Some(obj) = resource.as_object_mut() {
            obj.insert("id".into(), json!(id));
            let meta = obj.entry("meta").or_insert_with(|| json!({}));
            if let Some(meta) = meta.as_object_mut() {
                meta.insert("versionId".into(), json!(version.to_string()));
                meta.insert("lastUpdated".into(), json!(format_instant(at)));
            }
        }
        let entry = self.resources.entry(key).or_insert_with(|| Entry {
            versions: Vec::new(),
            last_updated: 0,
        });
        entry.versions.push(resource.clone());
        entry.last_updated = at;
        Written {
            created: version == 1,
            id: id.to_owned(),
            version,
            resource,
        }
    }
}

fn matches(criterion: &Criterion, entry: &Entry) -> bool {
    match criterion {
        Criterion::Identifier(token) => token.matches_identifier(entry.current()),
        Criterion::Patient(reference) => {
            entry
                .current()
                .get("patient")
                .and_then(|p| p.get("reference"))
                .and_then(Value::as_str)
                == Some(reference)
        }
        Criterion::LastUpdated { from, to } => (*from..*to).contains(&entry.last_updated),
        // Need the store or the id: see `Store::matches`.
        Criterion::PatientIdentifier(_) | Criterion::After(..) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = Token::parse("urn:x|1").unwrap();
        assert!(t.matches_identifier(&json!({"identifier": [{"system": "urn:x", "value": "1"}]})));
        assert!(!t.matches_identifier(&json!({"identifier": [{"system": "urn:y", "value": "1"}]})));
        assert!(!t.matches_identifier(&json!({"identifier": [{"value": "1"}]})));
        let any_system = Token::parse("1").unwrap();
        assert!(
            any_system
                .matches_identifier(&json!({"identifier": [{"system": "urn:y", "value": "1"}]}))
        );
        let no_system = Token::parse("|1").unwrap();
        assert!(no_system.matches_identifier(&json!({"identifier": [{"value": "1"}]})));
        assert!(
            !no_system
                .matches_identifier(&json!({"identifier": [{"system": "urn:y", "value": "1"}]}))
        );
        let any_value = Token::parse("urn:x|").unwrap();
        assert!(
            any_value
                .matches_identifier(&json!({"identifier": [{"system": "urn:x", "value": "9"}]}))
        );
        for bad in ["", "|", "a,b", "a|b|c", "a\\", "a\\x", "urn:x|a\\"] {
            assert_eq!(Token::parse(bad), None, "{bad}");
        }
        // FHIR's escapes: an ID with `|`, `,`, `$` and a space is searched as itself.
        let escaped = Token::parse("urn:x|A\\|B\\,C\\$ D").unwrap();
        assert_eq!(escaped.system.as_deref(), Some("urn:x"));
        assert_eq!(escaped.value.as_deref(), Some("A|B,C$ D"));
        assert!(escaped.matches_identifier(
            &json!({"identifier": [{"system": "urn:x", "value": "A|B,C$ D"}]})
        ));
    }

    #[test]
    fn writes_set_meta_and_a_strictly_increasing_clock() {
        let mut store = Store::default();
        let id = store.new_id();
        assert_eq!(id.len(), 36);
        let a = store.write(
            ResourceType::Patient,
            &id,
            json!({"resourceType": "Patient"}),
        );
        let b = store.write(
            ResourceType::Patient,
            &id,
            json!({"resourceType": "Patient", "meta": {"tag": []}}),
        );
        assert!(a.created && !b.created);
        assert_eq!(b.resource["meta"]["versionId"], "2");
        assert_eq!(b.resource["meta"]["tag"], json!([]));
        assert!(
            a.resource["meta"]["lastUpdated"].as_str() < b.resource["meta"]["lastUpdated"].as_str()
        );
        assert_eq!(store.search(ResourceType::Patient, &[]).len(), 1);
    }
}
