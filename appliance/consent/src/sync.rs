//! Sync with the network's FHIR R4 server: push what was recorded on the box, pull what
//! changed on the network.
//!
//! Push: every outbox entry, oldest first, as a conditional update by identifier
//! (`PUT Patient?identifier=…`, `PUT Consent?identifier=…`), so a push repeated after a
//! crash never creates a duplicate. An entry is marked done only after the server
//! acknowledged it; a failure stops the round and the entry is retried next round.
//!
//! Pull: `Consent` and `Patient` resources with `_lastUpdated` after the cursor; consents of
//! this clinic's patients are applied idempotently (a withdrawal wins), and other
//! facilities' identifiers of this clinic's patients are recorded as links. A successful
//! pull refreshes the cache (see `decide::Freshness`).
//!
//! The client speaks plain HTTP/1.1 to an address inside the hub subnet: the WireGuard
//! tunnel is the transport security (TLS to the FHIR server is a later step). The transport
//! is the appliance's one HTTP stack ([`tsunagi_runtime::http`], reqwest on hyper).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tsunagi_runtime::http::ClientError;

use crate::fhir::{self, CONSENT_ID_SYSTEM};
use crate::model::{PatientId, patient_id_system};
use crate::store::{Applied, Store, StoreError};
use crate::time;

const MAX_RESPONSE: usize = 8 * 1024 * 1024;
/// How long an idle connection to the FHIR server is kept for the next request.
const IDLE_CONNECTION: Duration = Duration::from_secs(30);

/// Errors of one sync round.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot reach the FHIR server at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: reqwest::Error,
    },
    #[error("the FHIR server at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The exchange broke off or the answer was not valid HTTP (e.g. a bad chunk size).
    #[error("the exchange {what} with the FHIR server at {addr} failed")]
    Exchange {
        addr: SocketAddr,
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot set up the FHIR client")]
    Client(#[source] Arc<ClientError>),
    #[error("bad answer from the FHIR server to {what}: {why}")]
    Protocol { what: String, why: String },
    #[error("the FHIR server refused {what} with status {status}: {diagnostics}")]
    Refused {
        what: String,
        status: u16,
        diagnostics: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: the store lock is poisoned")]
    Poisoned,
}

/// A FHIR server reached over plain HTTP.
#[derive(Debug, Clone)]
pub struct Client {
    addr: SocketAddr,
    base: String,
    timeout: Duration,
    /// Built once (connections are reused between requests); an error is reported by `call`.
    http: Result<reqwest::Client, Arc<ClientError>>,
    /// The FHIR identifier system of the network's patient IDs (`urn:oid:OID`), if any.
    network_id_system: Option<String>,
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Client {
    /// `base` is the path of the FHIR base, e.g. `/fhir`.
    pub fn new(addr: SocketAddr, base: &str, timeout: Duration) -> Client {
        let http = tsunagi_runtime::http::client(tsunagi_runtime::http::ClientSettings {
            // Plain HTTP inside the tunnel for now: no CA, so no https.
            roots: rustls::RootCertStore::empty(),
            connect_timeout: timeout,
            keep_idle: Some(IDLE_CONNECTION),
        })
        .map_err(Arc::new);
        Client {
            addr,
            base: base.trim_end_matches('/').to_owned(),
            timeout,
            http,
            network_id_system: None,
        }
    }

    /// Learns patients' network IDs (名寄せ) from the identifier with this system in the
    /// network's Patient resources (and keeps it in what the box pushes).
    pub fn with_network_id_system(mut self, system: impl Into<String>) -> Client {
        self.network_id_system = Some(system.into());
        self
    }

    /// One request; returns the status and the JSON body (`null` when empty). The whole
    /// exchange is bounded by the client's timeout and the answer by 8 MiB; dropping the
    /// future cancels it.
    pub async fn call(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), SyncError> {
        // Errors name the method and path only: a query may carry a patient's identifier.
        let what = format!("{method} {}", target.split('?').next().unwrap_or(""));
        let http = self
            .http
            .as_ref()
            .map_err(|e| SyncError::Client(e.clone()))?;
        let method =
            reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| SyncError::Protocol {
                what: what.clone(),
                why: "not an HTTP method".into(),
            })?;
        let mut request = http
            .request(
                method,
                format!("http://{}{}/{target}", self.addr, self.base),
            )
            .header(reqwest::header::ACCEPT, "application/fhir+json");
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/fhir+json")
                .body(body.to_string());
        }
        // reqwest's errors carry the URL, and with it the query: never shown.
        let exchange_err = |source: reqwest::Error| SyncError::Exchange {
            addr: self.addr,
            what: what.clone(),
            source: source.without_url(),
        };
        let exchange = async {
            let mut response = request.send().await.map_err(|source| {
                if source.is_connect() {
                    SyncError::Connect {
                        addr: self.addr,
                        source: source.without_url(),
                    }
                } else {
                    exchange_err(source)
                }
            })?;
            let status = response.status().as_u16();
            let too_large = || SyncError::Protocol {
                what: what.clone(),
                why: "response too large".into(),
            };
            if response
                .content_length()
                .is_some_and(|n| n > MAX_RESPONSE as u64)
            {
                return Err(too_large());
            }
            let mut raw = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(exchange_err)? {
                if raw.len() + chunk.len() > MAX_RESPONSE {
                    return Err(too_large());
                }
                raw.extend_from_slice(&chunk);
            }
            let value = if raw.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&raw).map_err(|e| SyncError::Protocol {
                    what: what.clone(),
                    why: format!("body is not JSON: {e}"),
                })?
            };
            Ok((status, value))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| SyncError::Timeout {
                addr: self.addr,
                timeout: self.timeout,
            })?
    }

    async fn expect_ok(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
    ) -> Result<Value, SyncError> {
        let (status, value) = self.call(method, target, body).await?;
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let diagnostics = value["issue"]
                .as_array()
                .and_then(|i| i.first())
                .and_then(|i| i["diagnostics"].as_str())
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            // The target carries identifiers, never names or bodies; still keep it short.
            Err(SyncError::Refused {
                what: format!("{method} {}", target.split('?').next().unwrap_or("")),
                status,
                diagnostics,
            })
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    pub pushed: usize,
    pub pulled: usize,
    pub changed: usize,
}

fn lock(store: &Mutex<Store>) -> Result<std::sync::MutexGuard<'_, Store>, SyncError> {
    store.lock().map_err(|_| SyncError::Poisoned)
}

/// Pushes every pending change, then pulls; records a successful pull.
pub async fn round(store: &Mutex<Store>, client: &Client) -> Result<Round, SyncError> {
    let pushed = push(store, client).await?;
    let (pulled, changed) = pull(store, client).await?;
    Ok(Round {
        pushed,
        pulled,
        changed,
    })
}

async fn server_patient_id(
    store: &Mutex<Store>,
    client: &Client,
    pid: &PatientId,
) -> Result<String, SyncError> {
    let (system, resource) = {
        let s = lock(store)?;
        let patient = s.patient(pid)?.ok_or_else(|| StoreError::UnknownPatient {
            patient: pid.to_string(),
        })?;
        let links = s.links(pid)?;
        (
            patient_id_system(s.facility()),
            fhir::patient_resource(
                s.facility(),
                &patient,
                &links,
                client.network_id_system.as_deref(),
            ),
        )
    };
    let target = format!("Patient?identifier={}", encode(&format!("{system}|{pid}")));
    let stored = client.expect_ok("PUT", &target, Some(&resource)).await?;
    stored["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| SyncError::Protocol {
            what: "PUT Patient".into(),
            why: "no id in the answer".into(),
        })
}

async fn push(store: &Mutex<Store>, client: &Client) -> Result<usize, SyncError> {
    let pending = lock(store)?.pending()?;
    let mut done = 0;
    for entry in pending {
        let result = push_one(store, client, &entry.kind, &entry.reference).await;
        match result {
            Ok(()) => {
                lock(store)?.push_done(entry.seq, time::now())?;
                done += 1;
            }
            Err(e) => {
                let message = tsunagi_runtime::child::error_chain(&e);
                lock(store)?.push_failed(entry.seq, &message)?;
                return Err(e);
            }
        }
    }
    Ok(done)
}

async fn push_one(
    store: &Mutex<Store>,
    client: &Client,
    kind: &str,
    reference: &str,
) -> Result<(), SyncError> {
    match kind {
        "patient" => {
            let pid: PatientId = reference.parse().map_err(|_| SyncError::Protocol {
                what: "outbox".into(),
                why: format!("bad patient reference {reference}"),
            })?;
            server_patient_id(store, client, &pid).await.map(|_| ())
        }
        "consent" => {
            let bad = || SyncError::Protocol {
                what: "outbox".into(),
                why: format!("bad consent reference {reference}"),
            };
            let (id, version) = reference.rsplit_once('/').ok_or_else(bad)?;
            let version: u32 = version.parse().map_err(|_| bad())?;
            // A version superseded since it was queued is not pushed: the newer one came from
            // the network (which has it) or is queued itself. Replaying an old version after
            // a restart must never undo a newer change, such as a withdrawal.
            if lock(store)?
                .latest_version(id)?
                .is_some_and(|latest| latest > version)
            {
                return Ok(());
            }
            let consent = lock(store)?.consent_version(id, version)?.ok_or_else(bad)?;
            let patient_id = server_patient_id(store, client, &consent.patient).await?;
            let resource = {
                let s = lock(store)?;
                fhir::consent_resource(s.facility(), &consent, &format!("Patient/{patient_id}"))
            };
            let target = format!(
                "Consent?identifier={}",
                encode(&format!("{CONSENT_ID_SYSTEM}|{id}"))
            );
            client
                .expect_ok("PUT", &target, Some(&resource))
                .await
                .map(|_| ())
        }
        other => Err(SyncError::Protocol {
            what: "outbox".into(),
            why: format!("unknown kind {other}"),
        }),
    }
}

fn entries(bundle: &Value) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .map(|e| e.iter().map(|x| x["resource"].clone()).collect())
        .unwrap_or_default()
}

fn newest(resources: &[Value], cursor: Option<String>) -> Option<String> {
    let mut best = cursor.map(|c| (time::parse(&c).unwrap_or(i64::MIN), c));
    for r in resources {
        if let Some(text) = r["meta"]["lastUpdated"].as_str()
            && let Ok(t) = time::parse(text)
            && best.as_ref().is_none_or(|(b, _)| t > *b)
        {
            best = Some((t, text.to_owned()));
        }
    }
    best.map(|(_, text)| text)
}

async fn pull(store: &Mutex<Store>, client: &Client) -> Result<(usize, usize), SyncError> {
    let (cursor, facility) = {
        let s = lock(store)?;
        (s.cursor()?, s.facility().clone())
    };
    let since = cursor
        .as_deref()
        .map(|c| format!("&_lastUpdated={}", encode(&format!("gt{c}"))))
        .unwrap_or_default();
    let consents = entries(
        &client
            .expect_ok("GET", &format!("Consent?_count=1000{since}"), None)
            .await?,
    );
    let patients = entries(
        &client
            .expect_ok("GET", &format!("Patient?_count=1000{since}"), None)
            .await?,
    );
    let mut known: HashMap<String, Option<PatientId>> = HashMap::new();
    for p in &patients {
        if let Some(id) = p["id"].as_str() {
            known.insert(
                format!("Patient/{id}"),
                fhir::local_patient_id(&facility, p),
            );
        }
    }
    let mut changed = 0;
    let now = time::now();
    for p in &patients {
        let Some(pid) = fhir::local_patient_id(&facility, p) else {
            continue;
        };
        let mut s = lock(store)?;
        if s.patient(&pid)?.is_none() {
            continue;
        }
        for (system, value) in fhir::other_identifiers(&facility, p) {
            if s.add_network_link(&pid, &system, &value, now)? {
                changed += 1;
            }
        }
        if let Some(system) = &client.network_id_system
            && let Some(value) = fhir::identifier(p, system)
        {
            if fhir::is_network_id(&value) {
                match s.set_network_id(&pid, &value, now) {
                    Ok(true) => changed += 1,
                    Ok(false) => {}
                    // Not assigned: the patient's instances keep waiting for a network ID.
                    Err(StoreError::NetworkIdTaken { .. }) => tracing::warn!(
                        "the network gave a patient a network ID another local patient holds; not assigned (check 名寄せ)"
                    ),
                    Err(e) => return Err(e.into()),
                }
            } else {
                tracing::warn!(
                    "the network's patient ID of a patient is not usable (1-64 printable ASCII, no backslash); ignored"
                );
            }
        }
    }
    for c in &consents {
        let Some(reference) = c["patient"]["reference"].as_str() else {
            continue;
        };
        if !known.contains_key(reference) {
            let (status, patient) = client.call("GET", reference, None).await?;
            let local = (status == 200)
                .then(|| fhir::local_patient_id(&facility, &patient))
                .flatten();
            known.insert(reference.to_owned(), local);
        }
        let Some(Some(pid)) = known.get(reference) else {
            continue;
        };
        let mut s = lock(store)?;
        if s.patient(pid)?.is_none() {
            continue;
        }
        match fhir::consent_from_resource(c, pid.clone()) {
            Ok(consent) => {
                if matches!(
                    s.apply_network_consent(consent)?,
                    Applied::New | Applied::Changed
                ) {
                    changed += 1;
                }
            }
            Err(e) => tracing::warn!(
                error = &e as &dyn std::error::Error,
                "skipping a consent from the network"
            ),
        }
    }
    let mut all = consents;
    all.extend(patients);
    let cursor = newest(&all, cursor);
    lock(store)?.pulled(cursor.as_deref(), time::now())?;
    Ok((all.len(), changed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("urn:oid:1.2|0001 x"), "urn%3Aoid%3A1.2%7C0001%20x");
    }
}
