//! Prometheus text-format metrics over HTTP/1.1 (`GET /metrics`), served by hyper.
//!
//! Off unless `[metrics] listen` is configured. Requests are bounded (8 KiB head, 5 s,
//! 16 clients at once) and answered with `Connection: close`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::status::{ServiceState, ServiceStatus, StatusReport};
use crate::supervisor::Snapshot;

const MAX_HEAD: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CLIENTS: usize = 16;

/// Writes one metric family: its help and type lines, then one sample per entry.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn service_label(service: &str) -> String {
    format!("{{service=\"{service}\"}}")
}

/// Renders a status report in the Prometheus text exposition format (version 0.0.4).
/// Service names are validated (`[a-z][a-z0-9-]*`), so labels need no escaping.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let services = &report.services;
    let per_service = |value: &dyn Fn(&ServiceStatus) -> String| -> Vec<(String, String)> {
        services
            .iter()
            .map(|s| (service_label(&s.name), value(s)))
            .collect()
    };
    let one = |value: String| vec![(String::new(), value)];
    family(
        &mut out,
        "tsunagi_up",
        "gauge",
        "Whether the supervisor is running.",
        &one("1".into()),
    );
    family(
        &mut out,
        "tsunagi_ready",
        "gauge",
        "Whether every enabled service has been ready or failed since start (READY=1 sent).",
        &one(u8::from(report.supervisor.ready).to_string()),
    );
    family(
        &mut out,
        "tsunagi_supervisor_uptime_seconds",
        "gauge",
        "Seconds since the supervisor started.",
        &one(report.supervisor.uptime_secs.to_string()),
    );
    let states: Vec<(String, String)> = services
        .iter()
        .flat_map(|s| {
            ServiceState::ALL.iter().map(move |state| {
                (
                    format!("{{service=\"{}\",state=\"{}\"}}", s.name, state.as_str()),
                    u8::from(s.state == *state).to_string(),
                )
            })
        })
        .collect();
    family(
        &mut out,
        "tsunagi_service_state",
        "gauge",
        "The state of each service (1 for the current state).",
        &states,
    );
    family(
        &mut out,
        "tsunagi_service_up",
        "gauge",
        "Whether the service is running and ready.",
        &per_service(&|s| u8::from(s.state == ServiceState::Ready).to_string()),
    );
    family(
        &mut out,
        "tsunagi_service_restarts_total",
        "counter",
        "Restarts of each service since the supervisor started.",
        &per_service(&|s| s.restarts.to_string()),
    );
    family(
        &mut out,
        "tsunagi_service_uptime_seconds",
        "gauge",
        "Seconds since the service's current process started (0 when not running).",
        &per_service(&|s| s.uptime_secs.unwrap_or(0).to_string()),
    );
    // Each service's own metrics: `tsunagi_SERVICE_NAME` (service names are validated, so
    // replacing `-` gives a valid metric name; metric names were checked on receipt).
    for s in services {
        for (name, value) in &s.metrics {
            let full = format!("tsunagi_{}_{name}", s.name.replace('-', "_"));
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            family(
                &mut out,
                &full,
                kind,
                &format!("Reported by the {} service.", s.name),
                &[(String::new(), value.to_string())],
            );
        }
    }
    out
}

/// Serves `/metrics` until `cancel` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    cancel: CancellationToken,
) -> Result<(), crate::listen::ServeError> {
    let limits = crate::listen::Limits {
        max_connections: MAX_CLIENTS,
        max_overflow: 0,
        per_connection: Some(IO_TIMEOUT),
        drain: crate::listen::STOP_DRAIN,
    };
    let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
    crate::listen::serve(accept, limits, cancel, |stream, _| {
        let snapshot = snapshot.clone();
        exchange(stream, move || render(&snapshot.borrow().report()))
    })
    .await
}

/// One connection: one request (hyper's HTTP/1.1 server, no keep-alive), answered with
/// [`respond`]. A head larger than [`MAX_HEAD`] is answered `431` by hyper.
async fn exchange<R>(stream: TcpStream, render: R)
where
    R: Fn() -> String + Send + Sync + 'static,
{
    let _ = stream.set_nodelay(true);
    let render = Arc::new(render);
    let service = service_fn(move |request: Request<Incoming>| {
        let render = render.clone();
        async move { Ok::<_, Infallible>(respond(request.method(), request.uri().path(), &*render)) }
    });
    // A client that goes away or sends garbage is its own problem; nothing to report.
    let _ = http1::Builder::new()
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// The answer to a request: `GET` (or `HEAD`) `/metrics` renders the metrics.
fn respond(method: &Method, path: &str, render: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if method != Method::GET && method != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        )
    } else if path != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "see /metrics\n".to_owned(),
        )
    } else {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Health, SupervisorStatus};

    fn report() -> StatusReport {
        let service = |name: &str, state| ServiceStatus {
            name: name.into(),
            state,
            health: Health::Ok,
            pid: Some(42),
            restarts: 3,
            last_error: None,
            uptime_secs: Some(7),
            summary: String::new(),
            user: None,
            metrics: std::collections::BTreeMap::from([("queue_total".to_owned(), 4.0)]),
        };
        StatusReport {
            supervisor: SupervisorStatus {
                pid: 1,
                version: "0.0.0".into(),
                privileged: true,
                ready: true,
                uptime_secs: 9,
                config: "/etc/tsunagi/tsunagi.toml".into(),
            },
            services: vec![
                service("heartbeat", ServiceState::Ready),
                service("drill-x", ServiceState::Failed),
            ],
        }
    }

    /// One connection to [`exchange`] on loopback: sends `raw`, returns all it answered.
    async fn ask(raw: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            exchange(stream, || "tsunagi_up 1\n".to_owned()).await;
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&raw).await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        server.await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn the_endpoint_answers_get_metrics_and_refuses_the_rest() {
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{ok}"
        );
        assert!(ok.contains("connection: close\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\ntsunagi_up 1\n"), "{ok}");
        let head = ask(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        let other = ask(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
        let post =
            ask(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec()).await;
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        let garbage = ask(b"\x00\x01 not http\r\n\r\n".to_vec()).await;
        assert!(
            garbage.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{garbage}"
        );
    }

    #[tokio::test]
    async fn a_request_head_beyond_8_kib_is_refused() {
        let mut raw = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        raw.resize(MAX_HEAD, b'a');
        let answer = ask(raw).await;
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{answer}"
        );
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let text = render(&report());
        for line in text.lines() {
            if line.starts_with('#') {
                assert!(
                    line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                    "{line}"
                );
                continue;
            }
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(name.starts_with("tsunagi_"), "{line}");
            let bare = name.split('{').next().unwrap();
            assert!(
                bare.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{line}"
            );
        }
        assert!(text.contains("tsunagi_service_state{service=\"drill-x\",state=\"failed\"} 1\n"));
        assert!(text.contains("tsunagi_service_state{service=\"drill-x\",state=\"ready\"} 0\n"));
        assert!(text.contains("tsunagi_service_restarts_total{service=\"heartbeat\"} 3\n"));
        assert!(text.contains("tsunagi_service_up{service=\"heartbeat\"} 1\n"));
        assert!(text.contains("tsunagi_ready 1\n"));
        assert!(
            text.contains(
                "# TYPE tsunagi_drill_x_queue_total counter\ntsunagi_drill_x_queue_total 4\n"
            ),
            "{text}"
        );
        // Each family is declared once.
        assert_eq!(text.matches("# TYPE tsunagi_service_state ").count(), 1);
    }
}
