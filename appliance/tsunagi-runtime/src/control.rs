//! The control socket: `tsunagi status` asks the running supervisor over a Unix socket.
//!
//! The socket lives at `RUNTIME_DIR/control.sock`, owned by the supervisor's user (root on
//! the appliance), mode 0660 with group [`STATUS_GROUP`] (the clinic console's) when the
//! supervisor runs as root, else 0600. The protocol is one JSON request line, one JSON response line:
//! `{"request":"status"}` → `{"ok":true,"status":{...}}` or `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::status::StatusReport;
use crate::supervisor::Snapshot;

/// The socket's file name inside the runtime directory.
pub const SOCKET_NAME: &str = "control.sock";
/// The group that may read the status over the socket (the clinic console's): it answers
/// nothing but status.
pub const STATUS_GROUP: &str = "tsunagi-status";
const MAX_REQUEST: u64 = 4096;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CLIENTS: usize = 8;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
}

/// A response on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Errors of the control socket, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another supervisor already answers on {path}")]
    InUse { path: PathBuf },
    #[error("cannot listen on control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the supervisor at {path} (is `tsunagi run` running?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from the supervisor at {path}")]
    Exchange {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor sent an answer this client does not understand")]
    Decode(#[source] serde_json::Error),
    #[error("the supervisor refused the request: {message}")]
    Refused { message: String },
}

/// Binds the control socket, replacing a stale one left by a crashed supervisor; mode
/// 0600, or 0660 with `group` ([`STATUS_GROUP`]'s id, when the supervisor runs as root).
pub fn bind(path: &Path, group: Option<nix::unistd::Gid>) -> Result<UnixListener, ControlError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind {
        path: path.to_owned(),
        source,
    })?;
    // The runtime directory is not writable by others, so nobody can swap the socket
    // between bind and chmod.
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| bind_err(e.into()))?;
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves status requests until `cancel` fires.
pub(crate) async fn serve(
    listener: UnixListener,
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
        answer(stream, snapshot.clone())
    })
    .await
}

async fn answer(stream: tokio::net::UnixStream, snapshot: watch::Receiver<Arc<Snapshot>>) {
    let (read_half, mut write_half) = stream.into_split();
    let mut line = String::new();
    let mut reader =
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read_half, MAX_REQUEST));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(Request::Status) => Response {
            ok: true,
            status: Some(snapshot.borrow().report()),
            error: None,
        },
        Err(e) => Response {
            ok: false,
            status: None,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut out = serde_json::to_string(&response).unwrap_or_default();
    out.push('\n');
    let _ = write_half.write_all(out.as_bytes()).await;
}

/// Asks the supervisor listening on `path` for its status (blocking, with timeouts).
pub fn query_status(path: &Path) -> Result<StatusReport, ControlError> {
    let connect_err = |source| ControlError::Connect {
        path: path.to_owned(),
        source,
    };
    let exchange_err = |source| ControlError::Exchange {
        path: path.to_owned(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(connect_err)?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(exchange_err)?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(exchange_err)?;
    let mut request = serde_json::to_string(&Request::Status).map_err(ControlError::Decode)?;
    request.push('\n');
    stream.write_all(request.as_bytes()).map_err(exchange_err)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(exchange_err)?;
    let response: Response = serde_json::from_str(line.trim()).map_err(ControlError::Decode)?;
    match (response.ok, response.status) {
        (true, Some(status)) => Ok(status),
        _ => Err(ControlError::Refused {
            message: response.error.unwrap_or_else(|| "no reason given".into()),
        }),
    }
}
