//! The enrollment server (`tsunagi-provision serve`, at the hub): HTTPS (rustls: TLS 1.3,
//! or 1.2 with ECDHE and AEAD suites only, the ring provider's safe defaults) with the
//! hub's certificate from the network CA, hyper's HTTP/1.1 server, and the runtime's one
//! accept loop ([`tsunagi_runtime::listen::serve`]: bounded connections, a deadline per
//! connection, backoff on accept errors). The decisions are [`crate::enroll`]'s.
//!
//! - `POST /v1/enroll` needs no client certificate (the box has none yet): the token is the
//!   credential.
//! - `POST /v1/renew` needs the box's current client certificate, verified by rustls against
//!   the box-identity CA; its serial and CN are what [`Operator::renew`] checks.
//! - `POST /v1/console-certificate`, the same way: the box's clinic console's server
//!   certificate ([`Operator::console_certificate`]).
//!
//! Logged per request: the path, the clinic, the outcome. Never the token, a key or a
//! certificate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tsunagi_medium::enroll::{
    CONSOLE_PATH, ConsoleRequest, ENROLL_PATH, EnrollRequest, MAX_REQUEST, RENEW_PATH, Refusal,
    RenewRequest,
};

use crate::ca::BoxCa;
use crate::enroll::Refused;
use crate::hub::HubPeers;
use crate::{Operator, ProvisionError};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// One connection's whole exchange, TLS handshake included.
const PER_CONNECTION: Duration = Duration::from_secs(30);

/// What the server needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// The hub's certificate chain (PEM), from the network CA.
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    pub policy: crate::enroll::Policy,
}

fn bad(what: &str, detail: impl std::fmt::Display) -> ProvisionError {
    ProvisionError::Invalid(format!("{what}: {detail}"))
}

/// The server's TLS configuration: the hub's certificate; client certificates from the
/// box-identity CA accepted but not required.
pub fn tls_config(
    settings: &Settings,
    box_ca_pem: &str,
) -> Result<rustls::ServerConfig, ProvisionError> {
    let chain = CertificateDer::pem_file_iter(&settings.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(&format!("the certificate {}", settings.cert.display()), e))?;
    if chain.is_empty() {
        return Err(bad(
            &format!("the certificate {}", settings.cert.display()),
            "no certificate",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&settings.key)
        .map_err(|e| bad(&format!("the key {}", settings.key.display()), e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(box_ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| bad("the box CA", e))?;
        roots.add(cert).map_err(|e| bad("the box CA", e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| bad("the box CA", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad("the certificate and its key", e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The serial (hex) and CN of a client certificate rustls verified.
fn presented(cert: &CertificateDer<'_>) -> Option<(String, String)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let serial: String = x509
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cn = x509
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some((serial, cn))
}

struct State {
    operator: Mutex<Operator>,
    ca: BoxCa,
    policy: crate::enroll::Policy,
    peers: Arc<dyn HubPeers>,
}

fn json_response(status: u16, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn refusal(r: &Refused) -> Response<Full<Bytes>> {
    json_response(
        r.status(),
        &Refusal {
            error: r.to_string(),
        },
    )
}

async fn body_json<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, Refused> {
    let bytes = Limited::new(request.into_body(), MAX_REQUEST)
        .collect()
        .await
        .map_err(|_| {
            Refused::BadRequest(format!(
                "the request is unreadable or over {MAX_REQUEST} bytes"
            ))
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| Refused::BadRequest(format!("the request: {e}")))
}

/// Runs a decision on the operator database, off the async threads (SQLite does file I/O),
/// one at a time.
async fn decide<T, F>(state: &Arc<State>, f: F) -> Result<T, Refused>
where
    T: Send + 'static,
    F: FnOnce(&mut Operator, &State) -> Result<T, Refused> + Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut op = state
            .operator
            .lock()
            .map_err(|_| Refused::Internal("the operator database's lock is poisoned".into()))?;
        f(&mut op, &state)
    })
    .await
    .unwrap_or_else(|e| Err(Refused::Internal(e.to_string())))
}

/// An enrolled box's request (`what` it asks for): its current client certificate
/// required (the serial and CN the TLS layer verified), the body read, then the decision.
async fn for_box<R, T, F>(
    state: &Arc<State>,
    client: Option<(String, String)>,
    what: &str,
    request: Request<Incoming>,
    f: F,
) -> Result<T, Refused>
where
    R: serde::de::DeserializeOwned + Send + 'static,
    T: Send + 'static,
    F: FnOnce(&mut Operator, &State, &str, &str, R) -> Result<T, Refused> + Send + 'static,
{
    let Some((serial, cn)) = client else {
        return Err(Refused::Forbidden(format!(
            "{what} needs the box's current client certificate"
        )));
    };
    let req = body_json::<R>(request).await?;
    decide(state, move |op, s| f(op, s, &serial, &cn, req)).await
}

async fn handle(
    state: Arc<State>,
    peer: Option<SocketAddr>,
    client: Option<(String, String)>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let from = peer.map_or_else(|| "?".to_owned(), |p| p.to_string());
    if request.method() != Method::POST {
        return refusal(&Refused::BadRequest("POST only".into()));
    }
    let path = request.uri().path().to_owned();
    let now = crate::now();
    let result = match path.as_str() {
        ENROLL_PATH => match body_json::<EnrollRequest>(request).await {
            Err(r) => Err(r),
            Ok(req) => {
                // Logged only if it is what a 医療機関コード looks like (it comes from the
                // network, and a log line is no place for whatever a client sends).
                let code = if req.facility_code.len() == 10
                    && req.facility_code.bytes().all(|b| b.is_ascii_digit())
                {
                    req.facility_code.clone()
                } else {
                    "?".to_owned()
                };
                let outcome = decide(&state, move |op, s| {
                    op.enroll(&s.ca, s.peers.as_ref(), &s.policy, &req, now)
                })
                .await;
                match &outcome {
                    Ok(e) => {
                        eprintln!("enroll: clinic {code}: enrolled {} from {from}", e.identity)
                    }
                    Err(r) => eprintln!("enroll: refused ({}) from {from}: {r}", r.status()),
                }
                outcome.and_then(to_json)
            }
        },
        RENEW_PATH => {
            let outcome = for_box(
                &state,
                client,
                "renewal",
                request,
                move |op, s, serial, cn, req: RenewRequest| {
                    op.renew(&s.ca, &s.policy, serial, cn, &req, now)
                },
            )
            .await;
            match &outcome {
                Ok(e) => eprintln!("renew: renewed {} from {from}", e.identity),
                Err(r) => eprintln!("renew: refused ({}) from {from}: {r}", r.status()),
            }
            outcome.and_then(to_json)
        }
        CONSOLE_PATH => {
            let who = client
                .as_ref()
                .map(|(_, cn)| cn.clone())
                .unwrap_or_default();
            let outcome = for_box(
                &state,
                client,
                "the console's certificate",
                request,
                move |op, s, serial, cn, req: ConsoleRequest| {
                    op.console_certificate(&s.ca, &s.policy, serial, cn, &req, now)
                },
            )
            .await;
            match &outcome {
                Ok(c) => eprintln!(
                    "console: issued for {who} ({}) from {from}",
                    c.addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(r) => eprintln!("console: refused ({}) from {from}: {r}", r.status()),
            }
            outcome.and_then(to_json)
        }
        _ => {
            let mut r = json_response(
                404,
                &Refusal {
                    error: "no such endpoint".into(),
                },
            );
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
    };
    match result {
        Ok(answer) => json_response(200, &answer),
        Err(r) => refusal(&r),
    }
}

fn to_json(answer: impl serde::Serialize) -> Result<serde_json::Value, Refused> {
    serde_json::to_value(answer).map_err(|e| Refused::Internal(e.to_string()))
}

/// Serves until `stop` fires.
pub async fn serve(
    operator: Operator,
    policy: crate::enroll::Policy,
    peers: Arc<dyn HubPeers>,
    listener: TcpListener,
    tls: rustls::ServerConfig,
    stop: CancellationToken,
) -> Result<(), ProvisionError> {
    let ca = operator.box_ca()?;
    let state = Arc::new(State {
        operator: Mutex::new(operator),
        ca,
        policy,
        peers,
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let limits = tsunagi_runtime::listen::Limits {
        max_connections: MAX_CONNECTIONS,
        max_overflow: 0,
        per_connection: Some(PER_CONNECTION),
        drain: tsunagi_runtime::listen::STOP_DRAIN,
    };
    let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
    tsunagi_runtime::listen::serve(accept, limits, stop, |stream, _| {
        let acceptor = acceptor.clone();
        let state = state.clone();
        async move {
            let _ = stream.set_nodelay(true);
            let peer = stream.peer_addr().ok();
            // A client that fails the handshake or goes away is its own problem.
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let client = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(presented);
            let service = service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                let client = client.clone();
                async move { Ok::<_, Infallible>(handle(state, peer, client, request).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(tls), service)
                .await;
        }
    })
    .await
    .map_err(|e| ProvisionError::Invalid(format!("the enrollment server: {e}")))
}
