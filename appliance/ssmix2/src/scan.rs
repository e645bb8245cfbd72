//! The streaming inventory of a storage: one [`Entry`] per file, in path order.
//!
//! The walk lists one folder at a time (sorted, so output is deterministic) and resolves
//! versions per data-type folder, where every version of a key lives, so memory is bounded
//! by the largest folder, never by the tree (E-22). The storage is only ever read: files are
//! opened read-only and nothing is created, renamed or touched in it.
//!
//! Files listed but gone when opened (renamed `_1` → `_2` by the EMR meanwhile) make the
//! folder be listed again (E-02); a file that changes while it is read is read again (E-01).
//! A [`ContentCache`] (the index) lets a rescan skip reading files whose size and mtime are
//! unchanged.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::datatype;
use crate::message::{PatientName, parse_key_fields};
use crate::name::{self, Folders, Key, Name};
use crate::reason::{Findings, Reason};
use crate::resolve::{self, Status, Version};

/// Which layout the root holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 標準化ストレージ.
    Standard,
    /// 拡張ストレージ.
    Extended,
}

/// Scan options.
#[derive(Debug, Clone)]
pub struct Options {
    pub kind: Kind,
    /// Files larger than this are not read (`TOO_LARGE`). Messages are kilobytes; extended
    /// storage documents can be large, so its default is higher.
    pub max_file_size: u64,
}

impl Options {
    pub fn standard() -> Options {
        Options {
            kind: Kind::Standard,
            max_file_size: 16 << 20,
        }
    }

    pub fn extended() -> Options {
        Options {
            kind: Kind::Extended,
            max_file_size: 1 << 30,
        }
    }
}

/// What was read from a file's content: kept by the index so an unchanged file is not read
/// again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Content {
    pub sha256: String,
    /// Findings from the content (decoding, HL7, checks against the folders).
    pub findings: Vec<Reason>,
    pub message_type: Option<String>,
    /// MSH-7 as written (tie-breaker for duplicate current files).
    pub sent_raw: String,
    pub patient_name: Option<PatientName>,
    pub cancels: bool,
}

/// Looks up what is known of a file that has not changed (same size and mtime).
pub trait ContentCache {
    fn lookup(&mut self, path: &str, size: u64, mtime_ns: i128) -> Option<Content>;

    /// Whether [`ContentCache::lookup`] can ever answer (else the scan does not stat files
    /// before reading them).
    fn active(&self) -> bool {
        true
    }
}

/// No cache: every file is read.
pub struct NoCache;

impl ContentCache for NoCache {
    fn lookup(&mut self, _: &str, _: u64, _: i128) -> Option<Content> {
        None
    }

    fn active(&self) -> bool {
        false
    }
}

/// One file of the storage.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Relative to the root, `/`-separated.
    pub path: String,
    pub status: Status,
    /// The worst finding, or `null`.
    pub reason: Option<Reason>,
    /// Every finding, the reason included.
    pub findings: Vec<Reason>,
    pub patient_id: Option<String>,
    /// `YYYYMMDD` or `-`.
    pub care_date: Option<String>,
    pub data_type: Option<String>,
    pub order_no: Option<String>,
    /// 発生日時 as RFC 3339 with `+09:00`.
    pub occurred_at: Option<String>,
    pub department: Option<String>,
    pub flag: Option<u8>,
    /// `ADT^A08`; `null` when the content could not be parsed (or is not HL7).
    pub message_type: Option<String>,
    /// For ADT-00 files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_name: Option<PatientName>,
    /// The message cancels an earlier event or order (E-06).
    pub cancels: bool,
    pub size: u64,
    #[serde(skip)]
    pub mtime_ns: i128,
    /// MSH-7 as written (kept by the index: the tie-breaker for duplicate current files).
    #[serde(skip)]
    pub sent_raw: String,
    pub sha256: Option<String>,
    /// The extended storage's content folder this file belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_folder: Option<String>,
}

impl Entry {
    /// The key, for files whose name parsed.
    pub fn key(&self) -> Option<Key> {
        Some(Key {
            patient_id: self.patient_id.clone()?,
            care_date: self.care_date.clone()?,
            data_type: self.data_type.clone()?,
            order_no: self.order_no.clone()?,
        })
    }
}

/// Counts by status and by reason.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub files: u64,
    pub by_status: BTreeMap<&'static str, u64>,
    pub by_reason: BTreeMap<&'static str, u64>,
    /// Keys whose current version is known (current or quarantined current).
    pub current_keys: u64,
}

impl Summary {
    pub fn add(&mut self, e: &Entry) {
        self.files += 1;
        *self.by_status.entry(e.status.as_str()).or_default() += 1;
        for r in &e.findings {
            *self.by_reason.entry(r.code()).or_default() += 1;
        }
        if e.status == Status::Current {
            self.current_keys += 1;
        }
    }
}

/// Why a scan could not run at all (problems inside the storage are entries, never errors).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read the storage root {path}")]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the storage root {0} is not a directory")]
    NotADirectory(PathBuf),
}

struct Listed {
    name: String,
    is_dir: bool,
    is_file: bool,
    collision: bool,
}

fn list(dir: &Path) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        out.push(Listed {
            name: entry.file_name().to_string_lossy().into_owned(),
            is_dir: ft.is_dir(),
            is_file: ft.is_file(),
            collision: false,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    // E-11: names equal but for case are one folder on a case-insensitive share.
    let mut lower: Vec<(String, usize)> = out
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name.to_ascii_lowercase(), i))
        .collect();
    lower.sort();
    for w in lower.windows(2) {
        if w[0].0 == w[1].0 {
            out[w[0].1].collision = true;
            out[w[1].1].collision = true;
        }
    }
    Ok(out)
}

fn mtime_ns(md: &fs::Metadata) -> i128 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

enum Read {
    Content(Vec<u8>, u64, i128),
    Gone,
    TooLarge(u64, i128),
    Failed,
}

/// Reads a file, again if it changed while it was read (E-01), up to three times.
fn read_file(path: &Path, max: u64) -> Read {
    for _ in 0..3 {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Read::Gone,
            Err(_) => return Read::Failed,
        };
        let Ok(before) = f.metadata() else {
            return Read::Failed;
        };
        if before.len() > max {
            return Read::TooLarge(before.len(), mtime_ns(&before));
        }
        let mut bytes = Vec::with_capacity(usize::try_from(before.len()).unwrap_or(0));
        if f.by_ref().take(max + 1).read_to_end(&mut bytes).is_err() {
            return Read::Failed;
        }
        let Ok(after) = f.metadata() else {
            return Read::Failed;
        };
        if after.len() == before.len()
            && mtime_ns(&after) == mtime_ns(&before)
            && bytes.len() as u64 == after.len()
        {
            return Read::Content(bytes, after.len(), mtime_ns(&after));
        }
    }
    Read::Failed
}

/// What the walk knows about the position of a file.
struct Place<'a> {
    rel: &'a [String],
}

impl Place<'_> {
    fn folders(&self) -> Option<Folders<'_>> {
        let r = self.rel;
        (r.len() >= 5).then(|| Folders {
            level1: &r[0],
            level2: &r[1],
            patient_id: &r[2],
            care_date: &r[3],
            data_type: &r[4],
        })
    }
}

fn join(rel: &[String], name: &str) -> String {
    let mut s = String::with_capacity(64);
    for part in rel {
        s.push_str(part);
        s.push('/');
    }
    s.push_str(name);
    s
}

fn bare_entry(path: String, reason: Reason, size: u64, mtime_ns: i128) -> Entry {
    Entry {
        path,
        status: Status::Quarantined,
        reason: Some(reason),
        findings: vec![reason],
        patient_id: None,
        care_date: None,
        data_type: None,
        order_no: None,
        occurred_at: None,
        department: None,
        flag: None,
        message_type: None,
        patient_name: None,
        cancels: false,
        size,
        mtime_ns,
        sent_raw: String::new(),
        sha256: None,
        content_folder: None,
    }
}

fn named_entry(path: String, name: &Name) -> Entry {
    let mut e = bare_entry(path, Reason::BadName, 0, 0);
    e.reason = None;
    e.findings.clear();
    e.status = Status::Current;
    e.patient_id = Some(name.key.patient_id.clone());
    e.care_date = Some(name.key.care_date.clone());
    e.data_type = Some(name.key.data_type.clone());
    e.order_no = Some(name.key.order_no.clone());
    e.occurred_at = Some(name.occurred_at.to_rfc3339());
    e.department = name.department.clone();
    e.flag = Some(name.flag.digit());
    e
}

/// A file whose name parsed, waiting for its key to be resolved.
struct Pending {
    entry: Entry,
    name: Name,
    findings: Findings,
    sent_raw: String,
}

/// Scans a storage, calling `sink` with every file's entry in path order.
pub fn scan(
    root: &Path,
    opts: &Options,
    cache: &mut dyn ContentCache,
    sink: &mut dyn FnMut(Entry),
) -> Result<Summary, ScanError> {
    let md = fs::metadata(root).map_err(|source| ScanError::Root {
        path: root.to_owned(),
        source,
    })?;
    if !md.is_dir() {
        return Err(ScanError::NotADirectory(root.to_owned()));
    }
    // Listing the root itself must work; deeper problems become entries.
    fs::read_dir(root).map_err(|source| ScanError::Root {
        path: root.to_owned(),
        source,
    })?;
    let mut w = Walker {
        root: root.to_owned(),
        opts: opts.clone(),
        cache,
        sink,
        summary: Summary::default(),
    };
    let mut rel = Vec::new();
    w.walk(&mut rel, false);
    Ok(w.summary)
}

/// Scans only the given data-type folders (each `L1/L2/PID/DATE/TYPE`, `/`-separated),
/// e.g. those a transaction storage named. A folder that does not exist yields nothing.
pub fn scan_folders(
    root: &Path,
    opts: &Options,
    folders: &[String],
    cache: &mut dyn ContentCache,
    sink: &mut dyn FnMut(Entry),
) -> Result<Summary, ScanError> {
    let md = fs::metadata(root).map_err(|source| ScanError::Root {
        path: root.to_owned(),
        source,
    })?;
    if !md.is_dir() {
        return Err(ScanError::NotADirectory(root.to_owned()));
    }
    let mut w = Walker {
        root: root.to_owned(),
        opts: opts.clone(),
        cache,
        sink,
        summary: Summary::default(),
    };
    for folder in folders {
        let rel: Vec<String> = folder.split('/').map(str::to_owned).collect();
        if rel.len() != 5 || rel.iter().any(|c| c.is_empty() || c == "." || c == "..") {
            continue;
        }
        if w.abs(&rel).is_dir() {
            w.key_folder(&rel, false);
        }
    }
    Ok(w.summary)
}

struct Walker<'c, 's> {
    root: PathBuf,
    opts: Options,
    cache: &'c mut dyn ContentCache,
    sink: &'s mut dyn FnMut(Entry),
    summary: Summary,
}

impl Walker<'_, '_> {
    fn emit(&mut self, e: Entry) {
        self.summary.add(&e);
        (self.sink)(e);
    }

    fn abs(&self, rel: &[String]) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(rel);
        p
    }

    /// The depth of the folder whose children are the versions of keys.
    fn key_depth(&self) -> usize {
        5
    }

    fn walk(&mut self, rel: &mut Vec<String>, collision: bool) {
        let dir = self.abs(rel);
        if rel.len() == self.key_depth() {
            self.key_folder(rel, collision);
            return;
        }
        let listed = match list(&dir) {
            Ok(l) => l,
            Err(_) => {
                let path = rel.join("/");
                self.emit(bare_entry(path, Reason::Unreadable, 0, 0));
                return;
            }
        };
        for l in listed {
            let collision = collision || (l.collision && rel.len() <= 2);
            if l.is_dir {
                rel.push(l.name);
                self.walk(rel, collision);
                rel.pop();
            } else {
                self.stray(rel, &l, collision);
            }
        }
    }

    /// A file where no file belongs (above the data-type folders, or below them in the
    /// standardized storage).
    fn stray(&mut self, rel: &[String], l: &Listed, collision: bool) {
        let path = join(rel, &l.name);
        let md = fs::symlink_metadata(self.root.join(&path));
        let (size, mt) = md.as_ref().map_or((0, 0), |m| (m.len(), mtime_ns(m)));
        let reason = if l.is_file {
            Reason::PathMismatch
        } else {
            Reason::NotRegular
        };
        let mut e = match name::parse_file_name(&l.name) {
            Ok(n) if l.is_file => {
                let mut e = named_entry(path, &n);
                e.status = Status::Quarantined;
                e.reason = Some(reason);
                e.findings = vec![reason];
                e
            }
            _ => bare_entry(path, reason, size, mt),
        };
        e.size = size;
        e.mtime_ns = mt;
        if collision {
            e.findings.push(Reason::CaseCollision);
        }
        self.emit(e);
    }

    /// A data-type folder: read every file, resolve each key, emit in name order.
    fn key_folder(&mut self, rel: &[String], collision: bool) {
        let dir = self.abs(rel);
        // A file that vanishes between listing and reading makes the folder be listed again
        // (E-02); after four listings, whatever is still moving waits for the next scan.
        for _attempt in 0..4 {
            let Ok(listed) = list(&dir) else {
                self.emit(bare_entry(rel.join("/"), Reason::Unreadable, 0, 0));
                return;
            };
            let result = match self.opts.kind {
                Kind::Standard => self.standard_folder(rel, &listed, collision),
                Kind::Extended => self.extended_folder(rel, &listed, collision),
            };
            if let Some(entries) = result {
                for e in entries {
                    self.emit(e);
                }
                return;
            }
        }
    }

    /// Reads (or takes from the cache) one file's content. `None`: it vanished.
    fn content(
        &mut self,
        path: &str,
        key: Option<&Key>,
        extended: bool,
    ) -> Option<(u64, i128, Result<Content, Reason>)> {
        let abs = self.root.join(path);
        if self.cache.active()
            && let Ok(md) = fs::symlink_metadata(&abs)
            && let Some(c) = self.cache.lookup(path, md.len(), mtime_ns(&md))
        {
            return Some((md.len(), mtime_ns(&md), Ok(c)));
        }
        match read_file(&abs, self.opts.max_file_size) {
            Read::Gone => None,
            Read::Failed => Some((0, 0, Err(Reason::Unreadable))),
            Read::TooLarge(size, mt) => Some((size, mt, Err(Reason::TooLarge))),
            Read::Content(bytes, size, mt) => {
                let sha256 = hex(&Sha256::digest(&bytes));
                let content = if extended && !looks_like_hl7(&bytes) {
                    Content {
                        sha256,
                        ..Content::default()
                    }
                } else {
                    let is_adt00 = key.is_some_and(|k| k.data_type == "ADT-00");
                    let (fields, mut findings) =
                        parse_key_fields(&bytes, if extended { None } else { key }, is_adt00);
                    if extended
                        && let (Some(f), Some(k)) = (&fields, key)
                        && !f.patient_id.is_empty()
                        && f.patient_id != k.patient_id
                    {
                        findings.add(Reason::PatientMismatch);
                    }
                    match fields {
                        Some(f) => Content {
                            sha256,
                            findings: findings.all().to_vec(),
                            message_type: Some(f.message_type),
                            sent_raw: f.sent_raw,
                            patient_name: f.name,
                            cancels: f.cancels,
                        },
                        None => Content {
                            sha256,
                            findings: findings.all().to_vec(),
                            ..Content::default()
                        },
                    }
                };
                Some((size, mt, Ok(content)))
            }
        }
    }

    fn standard_folder(
        &mut self,
        rel: &[String],
        listed: &[Listed],
        collision: bool,
    ) -> Option<Vec<Entry>> {
        let place = Place { rel };
        let folders = place.folders()?;
        let folder_problem = name::check_folders(&folders).err();
        let unknown_type = datatype::lookup(folders.data_type).is_none();
        let mut out: Vec<Entry> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut deeper: Vec<String> = Vec::new();
        for l in listed {
            let path = join(rel, &l.name);
            if l.is_dir {
                deeper.push(l.name.clone());
                continue;
            }
            if !l.is_file {
                out.push(self.quarantine(path, Reason::NotRegular, collision));
                continue;
            }
            let parsed_name = match folder_problem {
                Some(r) => Err(r),
                None => name::parse_file_name(&l.name)
                    .and_then(|n| name::check_name_against(&n, &folders).map(|()| n)),
            };
            match parsed_name {
                Err(reason) => {
                    let mut e = match name::parse_file_name(&l.name) {
                        Ok(n) => named_entry(path.clone(), &n),
                        Err(_) => bare_entry(path.clone(), reason, 0, 0),
                    };
                    e.status = Status::Quarantined;
                    e.reason = Some(reason);
                    e.findings = vec![reason];
                    if let Ok(md) = fs::symlink_metadata(self.root.join(&path)) {
                        e.size = md.len();
                        e.mtime_ns = mtime_ns(&md);
                    }
                    out.push(e);
                }
                Ok(n) => {
                    let (size, mt, content) = self.content(&path, Some(&n.key), false)?;
                    let mut e = named_entry(path, &n);
                    e.size = size;
                    e.mtime_ns = mt;
                    let mut findings = Findings::default();
                    if unknown_type {
                        findings.add(Reason::UnknownDataType);
                    }
                    let sent_raw = apply_content(&mut e, content, &mut findings, collision);
                    pending.push(Pending {
                        entry: e,
                        name: n,
                        findings,
                        sent_raw,
                    });
                }
            }
        }
        out.extend(resolve_pending(pending));
        for d in deeper {
            // Folders inside a data-type folder do not belong to the standardized storage.
            let mut sub = rel.to_vec();
            sub.push(d);
            self.deep_strays(&mut sub, collision, &mut out);
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Some(out)
    }

    fn quarantine(&self, path: String, reason: Reason, collision: bool) -> Entry {
        let (size, mt) =
            fs::symlink_metadata(self.root.join(&path)).map_or((0, 0), |m| (m.len(), mtime_ns(&m)));
        let mut e = bare_entry(path, reason, size, mt);
        if collision {
            e.findings.push(Reason::CaseCollision);
        }
        e
    }

    fn deep_strays(&mut self, rel: &mut Vec<String>, collision: bool, out: &mut Vec<Entry>) {
        let Ok(listed) = list(&self.abs(rel)) else {
            out.push(bare_entry(rel.join("/"), Reason::Unreadable, 0, 0));
            return;
        };
        for l in listed {
            if l.is_dir {
                rel.push(l.name);
                self.deep_strays(rel, collision, out);
                rel.pop();
            } else {
                let reason = if l.is_file {
                    Reason::PathMismatch
                } else {
                    Reason::NotRegular
                };
                out.push(self.quarantine(join(rel, &l.name), reason, collision));
            }
        }
    }

    fn extended_folder(
        &mut self,
        rel: &[String],
        listed: &[Listed],
        collision: bool,
    ) -> Option<Vec<Entry>> {
        let place = Place { rel };
        let folders = place.folders()?;
        let folder_problem = name::check_folders(&folders)
            .err()
            .or_else(|| name::check_extended_type_folder(folders.data_type).err());
        let mut out = Vec::new();
        // Each content folder is one version; its files share its status.
        let mut versions: Vec<(Name, Vec<Pending>)> = Vec::new();
        for l in listed {
            let path = join(rel, &l.name);
            if !l.is_dir {
                let reason = if l.is_file {
                    Reason::PathMismatch
                } else {
                    Reason::NotRegular
                };
                out.push(self.quarantine(path, reason, collision));
                continue;
            }
            let parsed = match folder_problem {
                Some(r) => Err(r),
                None => name::parse_content_folder(&l.name, folders.data_type).and_then(|n| {
                    if n.key.patient_id == folders.patient_id
                        && n.key.care_date == folders.care_date
                    {
                        Ok(n)
                    } else {
                        Err(Reason::PathMismatch)
                    }
                }),
            };
            let mut files = Vec::new();
            let mut sub = rel.to_vec();
            sub.push(l.name.clone());
            self.content_files(&mut sub, &mut files);
            match parsed {
                Err(reason) => {
                    for path in files {
                        out.push(self.quarantine(path, reason, collision));
                    }
                }
                Ok(n) => {
                    let mut pendings = Vec::new();
                    for path in files {
                        let (size, mt, content) = self.content(&path, Some(&n.key), true)?;
                        let mut e = named_entry(path, &n);
                        e.content_folder = Some(join(rel, &l.name));
                        e.size = size;
                        e.mtime_ns = mt;
                        let mut findings = Findings::default();
                        let sent_raw = apply_content(&mut e, content, &mut findings, collision);
                        pendings.push(Pending {
                            entry: e,
                            name: n.clone(),
                            findings,
                            sent_raw,
                        });
                    }
                    versions.push((n, pendings));
                }
            }
        }
        // Resolve per key over the content folders.
        let mut by_key: BTreeMap<Key, Vec<(Name, Vec<Pending>)>> = BTreeMap::new();
        for (n, p) in versions {
            by_key.entry(n.key.clone()).or_default().push((n, p));
        }
        for (_, group) in by_key {
            let vs: Vec<Version<'_>> = group
                .iter()
                .map(|(n, _)| Version {
                    flag: n.flag,
                    occurred: n.occurred_at.sort_key(),
                    sent: "",
                    mtime_ns: 0,
                    name: &n.occurred,
                })
                .collect();
            let (_, statuses) = resolve::resolve(&vs);
            let statuses: Vec<_> = statuses.into_iter().collect();
            for ((_, pendings), (status, anomaly)) in group.into_iter().zip(statuses) {
                for mut p in pendings {
                    if let Some(a) = anomaly {
                        p.findings.add(a);
                    }
                    out.push(finish(p, status));
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Some(out)
    }

    /// Every file inside a content folder (attachments may sit in subfolders).
    fn content_files(&mut self, rel: &mut Vec<String>, out: &mut Vec<String>) {
        let Ok(listed) = list(&self.abs(rel)) else {
            return;
        };
        for l in listed {
            if l.is_dir {
                rel.push(l.name);
                self.content_files(rel, out);
                rel.pop();
            } else {
                out.push(join(rel, &l.name));
            }
        }
    }
}

/// Puts what was read from a file into its entry and findings; returns MSH-7 as written.
fn apply_content(
    e: &mut Entry,
    content: Result<Content, Reason>,
    findings: &mut Findings,
    collision: bool,
) -> String {
    let sent_raw = match content {
        Ok(c) => {
            for r in &c.findings {
                findings.add(*r);
            }
            e.sha256 = Some(c.sha256);
            e.message_type = c.message_type;
            e.patient_name = c.patient_name;
            e.cancels = c.cancels;
            c.sent_raw
        }
        Err(r) => {
            findings.add(r);
            String::new()
        }
    };
    if collision {
        findings.add(Reason::CaseCollision);
    }
    sent_raw
}

fn looks_like_hl7(bytes: &[u8]) -> bool {
    let b = bytes.strip_prefix(b"\x0b").unwrap_or(bytes);
    b.starts_with(b"MSH")
}

fn finish(mut p: Pending, status: Status) -> Entry {
    let quarantined = p.findings.quarantined();
    p.entry.status = if quarantined {
        Status::Quarantined
    } else {
        status
    };
    p.entry.reason = p.findings.worst();
    p.entry.findings = p.findings.all().to_vec();
    p.entry
}

/// Groups the files of one data-type folder by key and resolves each key.
fn resolve_pending(pending: Vec<Pending>) -> Vec<Entry> {
    let mut by_key: BTreeMap<Key, Vec<Pending>> = BTreeMap::new();
    for p in pending {
        by_key.entry(p.name.key.clone()).or_default().push(p);
    }
    let mut out = Vec::new();
    for (_, group) in by_key {
        let vs: Vec<Version<'_>> = group
            .iter()
            .map(|p| Version {
                flag: p.name.flag,
                occurred: p.name.occurred_at.sort_key(),
                sent: &p.sent_raw,
                mtime_ns: p.entry.mtime_ns,
                name: &p.entry.path,
            })
            .collect();
        let (_, statuses) = resolve::resolve(&vs);
        for (mut p, (status, anomaly)) in group.into_iter().zip(statuses) {
            p.entry.sent_raw = p.sent_raw.clone();
            if let Some(a) = anomaly {
                p.findings.add(a);
            }
            out.push(finish(p, status));
        }
    }
    out
}

/// Lower-case hexadecimal (of a digest).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Scans into a vector (for tests and small storages).
pub fn scan_all(root: &Path, opts: &Options) -> Result<(Vec<Entry>, Summary), ScanError> {
    let mut entries = Vec::new();
    let summary = scan(root, opts, &mut NoCache, &mut |e| entries.push(e))?;
    Ok((entries, summary))
}
