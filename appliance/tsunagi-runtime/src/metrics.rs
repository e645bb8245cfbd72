//! Prometheus text-format metrics over a minimal HTTP/1.1 endpoint (`GET /metrics`).
//!
//! Off unless `[metrics] listen` is configured. Requests are bounded (8 KiB head, 5 s,
//! 16 clients at once) and answered with `Connection: close`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
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
) {
    let bounds = crate::listen::Bounds {
        max_clients: MAX_CLIENTS,
        per_client: IO_TIMEOUT,
    };
    let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
    crate::listen::serve(accept, bounds, cancel, |stream| {
        answer(stream, snapshot.clone())
    })
    .await;
}

async fn answer(mut stream: tokio::net::TcpStream, snapshot: watch::Receiver<Arc<Snapshot>>) {
    let _ = stream.set_nodelay(true);
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
            return;
        }
    }
    let request_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = request_line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != b"GET" && method != b"HEAD" {
        let _ = respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n",
        )
        .await;
        return;
    }
    let body = match target {
        b"/metrics" => render(&snapshot.borrow().report()),
        _ => {
            let _ = respond(&mut stream, "404 Not Found", "text/plain", "see /metrics\n").await;
            return;
        }
    };
    let body = if method == b"HEAD" {
        String::new()
    } else {
        body
    };
    let _ = respond(
        &mut stream,
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        &body,
    )
    .await;
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
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
