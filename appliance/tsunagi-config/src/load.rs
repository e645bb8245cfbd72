//! Reading, parsing and reporting: every problem in a file at once, each with its line,
//! dotted key and a one-line reason.
//!
//! Serde stops at the first error, so [`parse`] runs it in rounds: deserialize, map the
//! error's byte span to the deepest key that contains it (using `toml_edit`'s spans),
//! record a problem, remove that key from a copy of the document, re-render and try again.
//! Keys are mapped back to lines in the original text at the end.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use toml_edit::{Document, DocumentMut, Item, TableLike};

use crate::{CURRENT_VERSION, Config, SecretFile};

/// Deserialization rounds before giving up; each round finds at least one problem.
const MAX_ROUNDS: usize = 64;

/// Longest reason taken from a library message, in characters.
const MAX_REASON: usize = 200;

/// Why [`load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read (missing, permissions, not UTF-8, ...).
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error(transparent)]
    Invalid(#[from] Problems),
}

/// Every problem found in one config file.
///
/// Displays one line per problem, `FILE:LINE: KEY: REASON`; `:LINE` is left out when the
/// line is unknown and `KEY: ` when the problem is about the whole file.
#[derive(Debug, Clone)]
pub struct Problems {
    /// The config file, as given to [`load`] or [`parse`].
    pub file: PathBuf,
    /// The problems, ordered by line (problems without a line first).
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        if self.problems.is_empty() {
            return write!(f, "{file}: invalid config");
        }
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            match problem.line {
                Some(line) => write!(f, "{file}:{line}: {problem}")?,
                None => write!(f, "{file}: {problem}")?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// Dotted key path such as `"site.ae-title"` or `"drill.crashy.exit-code"`; `""` when
    /// the problem is about the whole file (e.g. a TOML syntax error).
    pub key: String,
    /// Lowercase, one-line reason; never contains a secret value.
    pub reason: String,
}

impl fmt::Display for Problem {
    /// `KEY: REASON`, or `REASON` when the key is empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.key, self.reason)
        }
    }
}

/// Reads, parses and validates the config file at `path`, and checks its secret files on
/// disk.
///
/// Returns every problem found, not just the first.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut analysis = analyse(&text);
    if let Some(cfg) = &analysis.config {
        let secrets = secret_problems(cfg, analysis.index.as_ref());
        analysis.problems.extend(secrets);
    }
    Ok(finish(path, analysis)?)
}

/// Parses and validates config text; `file` is only used in messages.
///
/// Does not touch the filesystem, so secret files are not checked (see [`load`] and
/// [`check_secret_files`]).
pub fn parse(text: &str, file: &Path) -> Result<Config, Problems> {
    finish(file, analyse(text))
}

/// Checks every secret file named in `cfg`: it must exist, be a regular file, and not be
/// accessible by group or others. `text` is the config text `cfg` came from, used to find
/// the lines of the keys. `file` is not needed (problems carry no file name) and is kept
/// for symmetry with [`parse`]; wrap the result in [`Problems`] to print it.
pub fn check_secret_files(cfg: &Config, file: &Path, text: &str) -> Vec<Problem> {
    let _ = file;
    let index = Document::parse(text)
        .ok()
        .map(|doc| SpanIndex::build(&doc, text));
    secret_problems(cfg, index.as_ref())
}

/// The reason for an unsupported `version`.
pub(crate) fn version_reason(version: i64) -> String {
    format!("unsupported config version {version}; this software reads version {CURRENT_VERSION}")
}

// ---------------------------------------------------------------------------------------
// The analysis

struct Analysis {
    /// The config, when deserialization succeeded (possibly after removing bad keys).
    config: Option<Config>,
    problems: Vec<Problem>,
    /// Spans of the original text, when it is valid TOML.
    index: Option<SpanIndex>,
    /// Checking stopped after [`MAX_ROUNDS`]; there may be more problems.
    truncated: bool,
}

fn finish(file: &Path, analysis: Analysis) -> Result<Config, Problems> {
    let mut problems = analysis.problems;
    let mut seen = HashSet::new();
    problems.retain(|p| seen.insert((p.key.clone(), p.reason.clone())));
    // Stable: problems on the same line keep the order they were found in.
    problems.sort_by_key(|p| (p.line.is_some(), p.line));
    if analysis.truncated {
        problems.push(Problem {
            line: None,
            key: String::new(),
            reason: format!(
                "stopped after {MAX_ROUNDS} rounds of checks; fix the problems above and check again"
            ),
        });
    }
    match analysis.config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(Problems {
            file: file.to_owned(),
            problems,
        }),
    }
}

fn analyse(text: &str) -> Analysis {
    let original = match Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let lines = Lines::new(text);
            return Analysis {
                config: None,
                problems: vec![Problem {
                    line: e.span().map(|s| lines.line_at(s.start)),
                    key: String::new(),
                    reason: one_line(e.message()),
                }],
                index: None,
                truncated: false,
            };
        }
    };
    let index = SpanIndex::build(&original, text);

    // A different version means a different schema: report only that.
    if let Some(version) = original
        .as_table()
        .get("version")
        .and_then(Item::as_integer)
        && version != i64::from(CURRENT_VERSION)
    {
        let path = vec!["version".to_owned()];
        return Analysis {
            config: None,
            problems: vec![Problem {
                line: index.line_of(&path),
                key: render_key(&path),
                reason: version_reason(version),
            }],
            index: Some(index),
            truncated: false,
        };
    }

    let mut findings: Vec<(KeyPath, String)> = Vec::new();
    // Keys removed from the working copy; a later "missing" error about them is a
    // consequence, not a new problem, and cross-field rules about them are skipped.
    let mut removed: Vec<KeyPath> = Vec::new();
    let mut working: DocumentMut = original.clone().into_mut();
    let mut current = text.to_owned();
    let mut config = None;
    let mut truncated = false;

    for round in 0.. {
        if round == MAX_ROUNDS {
            truncated = true;
            break;
        }
        let err = match toml::from_str::<Config>(&current) {
            Ok(cfg) => {
                config = Some(cfg);
                break;
            }
            Err(err) => err,
        };
        let Ok(current_doc) = Document::parse(current.as_str()) else {
            // The working copy is rendered by toml_edit from a parsed document, so this
            // does not happen; stop rather than guess.
            findings.push((KeyPath::new(), one_line(err.message())));
            break;
        };
        let current_index = SpanIndex::build(&current_doc, &current);

        if let Some(field) = missing_field(err.message()) {
            // Serde checks for missing fields after every present key of the table
            // deserialized, so report every absent required key of that table now.
            let table = err
                .span()
                .map(|span| current_index.table_at(&span))
                .unwrap_or_default();
            let present = |key: &str| {
                table_like(working.as_table(), &table).is_some_and(|t| t.contains_key(key))
            };
            let mut missing: Vec<&str> = required_keys(&table).to_vec();
            if !missing.contains(&field) {
                missing.push(field);
            }
            for key in missing {
                let mut path = table.clone();
                path.push(key.to_owned());
                if !present(key) && !removed.contains(&path) {
                    findings.push((path.clone(), missing_reason(&table, key)));
                }
            }
            if table.is_empty() {
                // The root: every other key deserialized, nothing more to find.
                break;
            }
            if !remove_path(working.as_table_mut(), &table) {
                break;
            }
            removed.push(table);
        } else {
            let Some(path) = err.span().and_then(|span| current_index.path_at(&span)) else {
                findings.push((KeyPath::new(), humanize(err.message())));
                break;
            };
            findings.push((path.clone(), reason_for(err.message(), &path)));
            if !remove_path(working.as_table_mut(), &path) {
                break;
            }
            removed.push(path);
        }
        current = working.to_string();
    }

    if let Some(cfg) = &config {
        for rule in cfg.rules() {
            let involves_removed = rule.involves.iter().any(|key| {
                let key: KeyPath = key.split('.').map(str::to_owned).collect();
                removed.iter().any(|r| key.starts_with(r))
            });
            if !involves_removed {
                findings.push((rule.path, rule.reason));
            }
        }
    }

    let problems = findings
        .into_iter()
        .map(|(path, reason)| Problem {
            line: index.line_of(&path),
            key: render_key(&path),
            reason,
        })
        .collect();
    Analysis {
        config,
        problems,
        index: Some(index),
        truncated,
    }
}

/// Required keys of a table, for reporting all missing ones at once. The test
/// `missing_required_keys_all_reported` keeps this in step with the types.
fn required_keys(table: &[String]) -> &'static [&'static str] {
    match table {
        [] => &["version", "site", "paths"],
        [t] if t == "site" => &["facility-code", "ae-title"],
        [t, u] if t == "site" && u == "network-ids" => &["issuer", "oid"],
        [t] if t == "paths" => &["state-dir", "runtime-dir"],
        [t] if t == "metrics" => &["listen"],
        _ => &[],
    }
}

fn missing_reason(table: &[String], key: &str) -> String {
    match (table.is_empty(), key) {
        (true, "version") => {
            format!("missing required key `version` (add `version = {CURRENT_VERSION}` at the top)")
        }
        (true, _) => format!("missing required section [{key}]"),
        (false, _) => format!("missing required key `{key}`"),
    }
}

fn secret_problems(cfg: &Config, index: Option<&SpanIndex>) -> Vec<Problem> {
    cfg.secret_files()
        .into_iter()
        .filter_map(|(key, file)| {
            let reason = secret_file_problem(file)?;
            let path: KeyPath = key.split('.').map(str::to_owned).collect();
            Some(Problem {
                line: index.and_then(|i| i.line_of(&path)),
                key: key.to_owned(),
                reason,
            })
        })
        .collect()
}

fn secret_file_problem(file: &SecretFile) -> Option<String> {
    match std::fs::metadata(file.as_path()) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("secret file {file} does not exist"))
        }
        Err(e) => Some(format!("cannot check secret file {file}: {}", e.kind())),
        Ok(meta) if !meta.is_file() => Some(format!("secret file {file} is not a regular file")),
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o7777;
            (mode & 0o077 != 0).then(|| {
                format!(
                    "secret file {file} is readable or writable by group or others (mode {mode:04o}): chmod 600 it"
                )
            })
        }
    }
}

// ---------------------------------------------------------------------------------------
// Messages

/// The field name in serde's "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// The names between backticks in a serde message, in order.
fn backticked(message: &str) -> Vec<&str> {
    message.split('`').skip(1).step_by(2).collect()
}

fn reason_for(message: &str, path: &[String]) -> String {
    if message.starts_with("unknown field `") {
        let names = backticked(message);
        let unknown = path
            .last()
            .map(String::as_str)
            .or(names.first().copied())
            .unwrap_or_default();
        let expected = names.get(1..).unwrap_or_default();
        // `id_hash_key` is a misspelt `id-hash-key`: still an inline secret.
        let file_key = format!("{}-file", unknown.replace('_', "-"));
        if expected.contains(&file_key.as_str()) {
            return format!(
                "inline secrets are not accepted: use `{file_key}` with the path of a file (mode 0600)"
            );
        }
        let unknown = unknown.escape_debug();
        return if expected.is_empty() {
            format!("unknown key `{unknown}` (this table takes no keys)")
        } else {
            format!(
                "unknown key `{unknown}` (expected one of: {})",
                expected.join(", ")
            )
        };
    }
    humanize(message)
}

/// Rewrites serde's type errors without the offending value (it may be a secret) and in
/// TOML words; other messages are made one line.
fn humanize(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        let kind = found
            .split(" `")
            .next()
            .and_then(|s| s.split(" \"").next())
            .unwrap_or(found);
        return format!(
            "expected {}, found {}",
            toml_words(expected),
            toml_kind(kind)
        );
    }
    if let Some(rest) = message.strip_prefix("invalid value: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        let kind = found.split(" `").next().unwrap_or(found);
        return format!(
            "expected {}, found {} out of range",
            toml_words(expected),
            toml_kind(kind)
        );
    }
    if message == "invalid socket address syntax" {
        return "invalid socket address (write e.g. \"127.0.0.1:9464\" or \"[::1]:9464\")".into();
    }
    one_line(message)
}

fn toml_words(expected: &str) -> String {
    match expected {
        "u8" => "an integer from 0 to 255".into(),
        "u16" => "an integer from 0 to 65535".into(),
        "u32" => "an integer from 0 to 4294967295".into(),
        "a map" => "a table".into(),
        "a sequence" => "an array".into(),
        "socket address" => "a socket address such as \"127.0.0.1:9464\"".into(),
        s if s.starts_with("struct ") => "a table".into(),
        s => one_line(s),
    }
}

fn toml_kind(kind: &str) -> String {
    match kind {
        "map" => "a table".into(),
        "sequence" => "an array".into(),
        "integer" => "an integer".into(),
        "floating point" => "a float".into(),
        "unit value" => "an empty value".into(),
        k if k.starts_with(['a', 'e', 'i', 'o', 'u']) => format!("an {}", one_line(k)),
        k => format!("a {}", one_line(k)),
    }
}

/// Joins the lines of a library message and cuts it to [`MAX_REASON`] characters.
fn one_line(message: &str) -> String {
    let joined = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if joined.chars().count() > MAX_REASON {
        let mut cut: String = joined.chars().take(MAX_REASON).collect();
        cut.push('…');
        cut
    } else {
        joined
    }
}

// ---------------------------------------------------------------------------------------
// Spans, key paths and lines

type KeyPath = Vec<String>;

/// Renders a key path as dotted keys, quoting segments that are not bare TOML keys.
fn render_key(path: &[String]) -> String {
    path.iter()
        .map(|seg| {
            let bare = !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if bare {
                seg.clone()
            } else {
                format!("\"{}\"", seg.escape_debug())
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Byte offsets of the line breaks of a text.
struct Lines {
    breaks: Vec<usize>,
    /// The number of lines (a final line break does not start a new line).
    count: usize,
}

impl Lines {
    fn new(text: &str) -> Self {
        let breaks: Vec<usize> = text
            .bytes()
            .enumerate()
            .filter_map(|(i, b)| (b == b'\n').then_some(i))
            .collect();
        let count = if text.ends_with('\n') || text.is_empty() {
            breaks.len().max(1)
        } else {
            breaks.len() + 1
        };
        Self { breaks, count }
    }

    /// The 1-based line of a byte offset; an offset at the very end counts as the last line.
    fn line_at(&self, offset: usize) -> usize {
        (self.breaks.partition_point(|&b| b < offset) + 1).min(self.count)
    }
}

struct Entry {
    path: KeyPath,
    key: Option<Range<usize>>,
    item: Option<Range<usize>>,
}

/// Every key of a parsed document with the spans of the key and of its value.
///
/// Tables (standard, implicit, dotted and inline) are entered; arrays are leaves.
struct SpanIndex {
    entries: Vec<Entry>,
    lines: Lines,
}

impl SpanIndex {
    fn build(doc: &Document<&str>, text: &str) -> Self {
        fn walk(table: &dyn TableLike, prefix: &mut KeyPath, out: &mut Vec<Entry>) {
            for (name, item) in table.iter() {
                prefix.push(name.to_owned());
                out.push(Entry {
                    path: prefix.clone(),
                    key: table.key(name).and_then(|k| k.span()),
                    item: item.span(),
                });
                if let Some(sub) = item.as_table_like() {
                    walk(sub, prefix, out);
                }
                prefix.pop();
            }
        }
        let mut entries = Vec::new();
        walk(doc.as_table(), &mut KeyPath::new(), &mut entries);
        Self {
            entries,
            lines: Lines::new(text),
        }
    }

    /// The deepest key whose key or value span contains `span`.
    fn path_at(&self, span: &Range<usize>) -> Option<KeyPath> {
        let contains = |s: &Option<Range<usize>>| {
            s.as_ref()
                .is_some_and(|s| !s.is_empty() && s.start <= span.start && span.end <= s.end)
        };
        self.entries
            .iter()
            .filter(|e| contains(&e.key) || contains(&e.item))
            .max_by_key(|e| e.path.len())
            .map(|e| e.path.clone())
    }

    /// The table a "missing field" error is about: serde reports it with the span of the
    /// table (its header, inline value or dotted key), or an empty span for the root.
    fn table_at(&self, span: &Range<usize>) -> KeyPath {
        let exact = |s: &Option<Range<usize>>| s.as_ref() == Some(span);
        self.entries
            .iter()
            .filter(|e| !span.is_empty() && (exact(&e.key) || exact(&e.item)))
            .max_by_key(|e| e.path.len())
            .map(|e| e.path.clone())
            .unwrap_or_default()
    }

    /// The line of a key, or of its nearest ancestor present in the file; `None` for the
    /// root.
    fn line_of(&self, path: &[String]) -> Option<usize> {
        (1..=path.len()).rev().find_map(|len| {
            let entry = self.entries.iter().find(|e| e.path == path[..len])?;
            let span = entry.key.as_ref().or(entry.item.as_ref())?;
            Some(self.lines.line_at(span.start))
        })
    }
}

fn table_like<'a>(table: &'a dyn TableLike, path: &[String]) -> Option<&'a dyn TableLike> {
    match path.split_first() {
        None => Some(table),
        Some((first, rest)) => table_like(table.get(first)?.as_table_like()?, rest),
    }
}

fn remove_path(table: &mut dyn TableLike, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => table.remove(last).is_some(),
        [first, rest @ ..] => table
            .get_mut(first)
            .and_then(Item::as_table_like_mut)
            .is_some_and(|t| remove_path(t, rest)),
    }
}
