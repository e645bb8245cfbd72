//! Prometheus text-format metrics over a minimal HTTP/1.1 endpoint (`GET /metrics`).
//!
//! Off unless `[metrics] listen` is configured. Requests are bounded (8 KiB head, 5 s,
//! 16 clients at once) and answered with `Connection: close`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::status::{ServiceState, StatusReport};
use crate::supervisor::Snapshot;

const MAX_HEAD: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CLIENTS: usize = 16;

/// Renders a status report in the Prometheus text exposition format (version 0.0.4).
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let services = &report.services;
    let _ = writeln!(out, "# HELP tsunagi_up Whether the supervisor is running.");
    let _ = writeln!(out, "# TYPE tsunagi_up gauge\ntsunagi_up 1");
    let _ = writeln!(
        out,
        "# HELP tsunagi_ready Whether every enabled service has been ready or failed since start (READY=1 sent)."
    );
    let _ = writeln!(
        out,
        "# TYPE tsunagi_ready gauge\ntsunagi_ready {}",
        u8::from(report.supervisor.ready)
    );
    let _ = writeln!(
        out,
        "# HELP tsunagi_supervisor_uptime_seconds Seconds since the supervisor started."
    );
    let _ = writeln!(out, "# TYPE tsunagi_supervisor_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "tsunagi_supervisor_uptime_seconds {}",
        report.supervisor.uptime_secs
    );
    let _ = writeln!(
        out,
        "# HELP tsunagi_service_state The state of each service (1 for the current state)."
    );
    let _ = writeln!(out, "# TYPE tsunagi_service_state gauge");
    for s in services {
        for state in ServiceState::ALL {
            let _ = writeln!(
                out,
                "tsunagi_service_state{{service=\"{}\",state=\"{}\"}} {}",
                s.name,
                state.as_str(),
                u8::from(s.state == state)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP tsunagi_service_up Whether the service is running and ready."
    );
    let _ = writeln!(out, "# TYPE tsunagi_service_up gauge");
    for s in services {
        let _ = writeln!(
            out,
            "tsunagi_service_up{{service=\"{}\"}} {}",
            s.name,
            u8::from(s.state == ServiceState::Ready)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tsunagi_service_restarts_total Restarts of each service since the supervisor started."
    );
    let _ = writeln!(out, "# TYPE tsunagi_service_restarts_total counter");
    for s in services {
        let _ = writeln!(
            out,
            "tsunagi_service_restarts_total{{service=\"{}\"}} {}",
            s.name, s.restarts
        );
    }
    let _ = writeln!(
        out,
        "# HELP tsunagi_service_uptime_seconds Seconds since the service's current process started (0 when not running)."
    );
    let _ = writeln!(out, "# TYPE tsunagi_service_uptime_seconds gauge");
    for s in services {
        let _ = writeln!(
            out,
            "tsunagi_service_uptime_seconds{{service=\"{}\"}} {}",
            s.name,
            s.uptime_secs.unwrap_or(0)
        );
    }
    out
}

/// Serves `/metrics` until `cancel` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(IO_TIMEOUT, answer(stream, snapshot)).await;
        });
    }
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
