//! The `dicom` service: the SCP on the clinic LAN, and the forwarder that sends what the
//! consent service permits (category images, recipient the network) to the network PACS.
//!
//! Forwarding: every cycle the consent service's change feed releases the held instances of
//! patients whose consent changed; ready instances are asked about (per patient), held with
//! the reason when denied (a stale cache or a clock behind: retried later, not held), and the
//! permitted ones sent in one association. Failures to reach the PACS back off (up to 5
//! minutes); instances not delivered within `dead_letter_after` become dead letters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use consent::client::{Gate, SocketGate, Verdict};
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::status::Health;

use crate::forward::{Destination, record, send_batch};
use crate::now;
use crate::scp;
use crate::spool::{Spool, SpoolError};

/// What the service needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub scp: scp::Settings,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub quota: u64,
    pub pacs: Destination,
    pub consent_socket: PathBuf,
    pub dead_letter_after: Duration,
}

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the service until shutdown.
pub async fn run(ctx: ServiceCtx, settings: Settings) -> Result<(), ServiceError> {
    let spool = Spool::open(&settings.state_dir.join("spool"), settings.quota)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServiceError::Listen {
            addr: settings.listen,
            source,
        })?;
    tokio::spawn(scp::serve(
        listener,
        Arc::new(settings.scp.clone()),
        spool.clone(),
        ctx.shutdown.clone(),
    ));
    ctx.reporter.ready();
    tracing::info!(listen = %settings.listen, "DICOM bridge listening");
    let mut gate = Some(SocketGate::new(&settings.consent_socket));
    let mut seq = 0i64;
    let mut backoff = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    loop {
        let wait = tokio::time::sleep(backoff);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = wait => {}
        }
        let (g, result) = {
            let mut g = gate
                .take()
                .unwrap_or_else(|| SocketGate::new(&settings.consent_socket));
            let spool = spool.clone();
            let dead_after =
                i64::try_from(settings.dead_letter_after.as_secs()).unwrap_or(i64::MAX);
            match tokio::task::spawn_blocking(move || {
                let r = gate_round(&mut g, &spool, seq, dead_after);
                (g, r)
            })
            .await
            {
                Ok(v) => v,
                Err(_) => (
                    SocketGate::new(&settings.consent_socket),
                    Err("internal error".to_owned()),
                ),
            }
        };
        gate = Some(g);
        let permitted = match result {
            Ok((next, permitted)) => {
                seq = next;
                permitted
            }
            Err(e) => {
                last_error = Some(e);
                Vec::new()
            }
        };
        if !permitted.is_empty() {
            let (outcomes, error) = send_batch(&settings.pacs, &permitted).await;
            let delivered = record(&spool, &outcomes).unwrap_or(0);
            if let Some(e) = error {
                let message = tsunagi_runtime::child::error_chain(&e);
                tracing::warn!(error = %message, "cannot forward to the network PACS; retrying");
                let later = now() + i64::try_from(backoff.as_secs()).unwrap_or(1);
                let done: Vec<i64> = outcomes.iter().map(|(id, _)| *id).collect();
                for q in permitted.iter().filter(|q| !done.contains(&q.id)) {
                    let _ = spool.retry_later(q.id, &message, later);
                }
                last_error = Some(message);
                backoff = (backoff * 2).min(Duration::from_secs(300));
            } else {
                tracing::info!(delivered, "forwarded to the network PACS");
                last_error = None;
                backoff = Duration::from_millis(200);
            }
        } else if last_error.is_none() {
            backoff = Duration::from_secs(1);
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        let counts = spool.counts().unwrap_or_default();
        let summary = format!(
            "{} waiting, {} held in the clinic, {} dead letters, {} delivered, {} duplicates{}",
            counts.pending,
            counts.held,
            counts.dead,
            counts.delivered,
            counts.duplicates,
            last_error
                .as_ref()
                .map(|e| format!("; last forward failed: {e}"))
                .unwrap_or_default()
        );
        let health = if last_error.is_some() || counts.dead > 0 {
            Health::Degraded
        } else {
            Health::Ok
        };
        ctx.reporter.status_with_metrics(
            health,
            &summary,
            &[
                ("spool_pending", counts.pending as f64),
                ("spool_held", counts.held as f64),
                ("spool_dead", counts.dead as f64),
                ("spool_bytes", counts.bytes as f64),
                ("delivered_total", counts.delivered as f64),
                ("duplicates_total", counts.duplicates as f64),
            ],
        );
    }
}

/// One round with the consent service (blocking): releases held instances of changed
/// patients, marks dead letters, and returns the ready instances that may be sent.
fn gate_round(
    gate: &mut SocketGate,
    spool: &Spool,
    seq: i64,
    dead_after: i64,
) -> Result<(i64, Vec<crate::spool::Queued>), String> {
    let changes = gate
        .changes(seq)
        .map_err(|e| tsunagi_runtime::child::error_chain(&e))?;
    for p in &changes.patients {
        spool.release_patient(p).map_err(|e| e.to_string())?;
    }
    let now = now();
    let _ = spool.dead_letters(now.saturating_sub(dead_after));
    let mut permitted = Vec::new();
    let mut decided: Vec<(String, Verdict)> = Vec::new();
    for q in spool.ready(now, 64).map_err(|e| e.to_string())? {
        let Some(patient) = q.meta.patient_id.clone() else {
            spool
                .hold(q.id, "no PatientID in the data set")
                .map_err(|e| e.to_string())?;
            continue;
        };
        let verdict = match decided.iter().find(|(p, _)| *p == patient) {
            Some((_, v)) => v.clone(),
            None => {
                let v = gate
                    .decide(&patient, "images")
                    .map_err(|e| tsunagi_runtime::child::error_chain(&e))?;
                decided.push((patient.clone(), v.clone()));
                v
            }
        };
        match verdict {
            Verdict::Permit => permitted.push(q),
            v if v.is_transient() => {
                spool
                    .retry_later(q.id, "consent cache stale", now + 30)
                    .map_err(|e| e.to_string())?;
            }
            Verdict::Deny(reason) => spool.hold(q.id, &reason).map_err(|e| e.to_string())?,
        }
    }
    Ok((changes.seq, permitted))
}
