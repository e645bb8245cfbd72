//! The one accept loop, used by every listener of the box: the supervisor's control socket
//! and metrics endpoint, the consent service's decision socket, the DICOM SCP (and later the
//! clinic console).
//!
//! [`serve`] accepts until the stop token fires and runs the handler of each connection as a
//! task it owns (a [`JoinSet`]): never detached. It bounds the connections served at once;
//! a connection beyond the bound is still handed to the handler as
//! [`Admission::Overflow`] (so a DICOM SCP can answer "local limit exceeded") while a few of
//! those are pending, and closed at once beyond that. An accept error (out of descriptors,
//! out of memory, a connection reset before it was accepted) backs off, from 10 ms doubling
//! to 1 s, instead of spinning. A connection task that panics ends the loop with
//! [`ServeError::ConnectionPanicked`], so that the service ends with the reason rather than
//! carrying on with a bug nobody sees. At stop, connections get [`Limits::drain`] to end
//! (each sees the same stop token) and are then aborted.
//!
//! [`serve_lines`] is the box's local protocols on it (the consent service's decisions, the
//! audit service's records): one request line, one answer line, a bounded line length and
//! an idle bound per connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Bounds for one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections beyond [`Limits::max_connections`] handed to the handler as
    /// [`Admission::Overflow`] at once; further ones are closed at once.
    pub max_overflow: usize,
    /// The whole exchange with one connection must finish within this (if set).
    pub per_connection: Option<Duration>,
    /// After stop, how long connections may take to end before they are aborted.
    pub drain: Duration,
}

/// Whether a connection is within the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Serve it.
    Admitted,
    /// Over the bound: say so if the protocol can (briefly), then close.
    Overflow,
}

/// Why the accept loop ended before its stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("a connection's task {0}")]
    ConnectionPanicked(String),
}

/// A drain that fits the stop budget (every service stops within 2 s of SIGTERM): what
/// listeners use unless their protocol needs less.
pub const STOP_DRAIN: Duration = Duration::from_millis(500);

/// The first pause after an accept error, doubled for each further one.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// The longest pause after an accept error.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections until `stop` fires and runs `handle` on each; see the module docs.
/// Returns `Ok` after a stop, once every connection task has ended or been aborted.
pub async fn serve<S, A, AFut, H, HFut>(
    mut accept: A,
    limits: Limits,
    stop: CancellationToken,
    mut handle: H,
) -> Result<(), ServeError>
where
    A: FnMut() -> AFut,
    AFut: Future<Output = std::io::Result<S>>,
    H: FnMut(S, Admission) -> HFut,
    HFut: Future<Output = ()> + Send + 'static,
{
    let admitted = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let overflow = Arc::new(Semaphore::new(limits.max_overflow));
    let mut connections = JoinSet::new();
    let mut pause = BACKOFF_FIRST;
    let mut failing = false;
    let result = loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = joined
                    && e.is_panic()
                {
                    break Err(ServeError::ConnectionPanicked(crate::tasks::panicked(
                        &*e.into_panic(),
                    )));
                }
                continue;
            }
            accepted = accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => {
                if failing {
                    tracing::info!("accepting connections again");
                }
                failing = false;
                pause = BACKOFF_FIRST;
                stream
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot accept a connection; backing off");
                }
                failing = true;
                tokio::select! {
                    _ = stop.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let (permit, admission) = match admitted.clone().try_acquire_owned() {
            Ok(permit) => (permit, Admission::Admitted),
            Err(_) => match overflow.clone().try_acquire_owned() {
                Ok(permit) => (permit, Admission::Overflow),
                Err(_) => continue, // Dropped: closed at once.
            },
        };
        let exchange = handle(stream, admission);
        let per_connection = limits.per_connection;
        connections.spawn(
            async move {
                let _permit = permit;
                match per_connection {
                    Some(within) => {
                        let _ = tokio::time::timeout(within, exchange).await;
                    }
                    None => exchange.await,
                }
            }
            .in_current_span(),
        );
    };
    let drained = tokio::time::timeout(limits.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            left = connections.len(),
            "connections still open at stop; aborted"
        );
        connections.shutdown().await;
    }
    result
}

/// What a line server's handler is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// One request line (its newline removed).
    Request(String),
    /// A line longer than the bound: the handler's answer is sent, then the connection is
    /// closed.
    TooLong,
}

/// Bounds of a line server.
#[derive(Debug, Clone, Copy)]
pub struct LineLimits {
    /// Connections served at once (the rest are closed at once).
    pub max_connections: usize,
    /// The longest request line, in bytes.
    pub max_line: usize,
    /// A connection that sends nothing this long is closed.
    pub idle: Duration,
}

/// Why [`ask_line`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot reach {path}")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer")]
    Io(#[source] std::io::Error),
    #[error("the answer cannot be read")]
    Answer(#[source] serde_json::Error),
}

/// Binds a line server's Unix socket at `path`, replacing a stale one, mode 0660: the
/// group of its directory (a setgid one, where it is shared) may connect.
pub fn bind_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Asks a [`serve_lines`] server at `socket` one JSON request and reads its one-line JSON
/// answer (at most `max_answer` bytes), blocking, at most `timeout` for each read and write.
/// The client of the box's local line protocols (the console's desks).
pub fn ask_line<Req, Ans>(
    socket: &std::path::Path,
    request: &Req,
    timeout: Duration,
    max_answer: u64,
) -> Result<Ans, AskError>
where
    Req: serde::Serialize,
    Ans: serde::de::DeserializeOwned,
{
    use std::io::{BufRead as _, Read as _, Write as _};
    let stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|source| AskError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(AskError::Io)?;
    let mut line = serde_json::to_string(request).map_err(AskError::Answer)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(AskError::Io)?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .take(max_answer)
        .read_line(&mut answer)
        .map_err(AskError::Io)?;
    serde_json::from_str(answer.trim()).map_err(AskError::Answer)
}

/// A Unix socket server of one request line, one answer line (the box's local protocols:
/// the consent service's decisions, the audit service's records), on [`serve`]'s accept
/// loop. `answer` turns each [`Line`] into its answer (without the newline).
pub async fn serve_lines<H, HFut>(
    listener: tokio::net::UnixListener,
    limits: LineLimits,
    stop: CancellationToken,
    answer: H,
) -> Result<(), ServeError>
where
    H: Fn(Line) -> HFut + Clone + Send + Sync + 'static,
    HFut: Future<Output = String> + Send + 'static,
{
    let accept = || async { listener.accept().await.map(|(stream, _)| stream) };
    let bounds = Limits {
        max_connections: limits.max_connections,
        max_overflow: 0,
        // Each connection has its idle bound; a client may keep asking.
        per_connection: None,
        drain: STOP_DRAIN,
    };
    serve(accept, bounds, stop, move |stream, _| {
        let answer = answer.clone();
        async move {
            let _ = lines(stream, limits, answer).await;
        }
    })
    .await
}

/// [`serve_lines`] for JSON: each line parsed as a `Req` and answered with the handler's
/// `Ans`. A line too long, or one that does not parse, is answered `refused(why)` without
/// the handler; an answer that cannot be written is `{"error":"internal error"}`.
pub async fn serve_json<Req, Ans, H, HFut>(
    listener: tokio::net::UnixListener,
    limits: LineLimits,
    stop: CancellationToken,
    refused: fn(String) -> Ans,
    handler: H,
) -> Result<(), ServeError>
where
    Req: serde::de::DeserializeOwned + Send + 'static,
    Ans: serde::Serialize + Send + 'static,
    H: Fn(Req) -> HFut + Clone + Send + Sync + 'static,
    HFut: Future<Output = Ans> + Send + 'static,
{
    let max_line = limits.max_line;
    serve_lines(listener, limits, stop, move |line| {
        let handler = handler.clone();
        async move {
            let answer = match line {
                Line::TooLong => refused(format!("request longer than {max_line} bytes")),
                Line::Request(line) => match serde_json::from_str::<Req>(line.trim()) {
                    Err(e) => refused(format!("bad request: {e}")),
                    Ok(request) => handler(request).await,
                },
            };
            serde_json::to_string(&answer)
                .unwrap_or_else(|_| "{\"error\":\"internal error\"}".into())
        }
    })
    .await
}

async fn lines<H, HFut>(
    stream: tokio::net::UnixStream,
    limits: LineLimits,
    answer: H,
) -> std::io::Result<()>
where
    H: Fn(Line) -> HFut,
    HFut: Future<Output = String>,
{
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = match tokio::time::timeout(
            limits.idle,
            (&mut reader)
                .take(limits.max_line as u64 + 1)
                .read_line(&mut line),
        )
        .await
        {
            Err(_) | Ok(Err(_)) | Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => n,
        };
        let too_long = n > limits.max_line || !line.ends_with('\n');
        let mut out = answer(if too_long {
            Line::TooLong
        } else {
            Line::Request(line.trim_end_matches(['\n', '\r']).to_owned())
        })
        .await;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
        if too_long {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn limits(max_connections: usize, max_overflow: usize) -> Limits {
        Limits {
            max_connections,
            max_overflow,
            per_connection: None,
            drain: Duration::from_millis(200),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_instead_of_spinning() {
        let calls = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let counted = calls.clone();
        let accept = move || {
            counted.fetch_add(1, Ordering::Relaxed);
            // EMFILE: out of file descriptors.
            std::future::ready(Err::<(), _>(std::io::Error::from_raw_os_error(24)))
        };
        let server = tokio::spawn(serve(accept, limits(4, 0), stop.clone(), |(), _| async {}));
        tokio::time::sleep(Duration::from_secs(10)).await;
        stop.cancel();
        assert_eq!(server.await.unwrap(), Ok(()));
        let calls = calls.load(Ordering::Relaxed);
        // 10 ms doubling to 1 s: 7 attempts in the first 1.27 s, then one a second.
        assert!((10..=20).contains(&calls), "{calls} accepts in 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_resets_after_a_connection_is_accepted() {
        let calls = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let counted = calls.clone();
        let accept = move || {
            let n = counted.fetch_add(1, Ordering::Relaxed);
            // Ten failures, one success, then failures again: the pauses start again at 10 ms.
            std::future::ready(match n {
                10 => Ok(()),
                _ if n > 30 => Err(std::io::Error::other("done")),
                _ => Err(std::io::Error::from_raw_os_error(24)),
            })
        };
        let server = tokio::spawn(serve(accept, limits(4, 0), stop.clone(), |(), _| async {}));
        // Ten failures take 10+20+…+1000+1000+1000 ms ≈ 4.3 s; after the success, the next
        // seven take 1.27 s.
        tokio::time::sleep(Duration::from_millis(5_700)).await;
        assert!(calls.load(Ordering::Relaxed) >= 17);
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_bound_overflow_then_close() {
        let stop = CancellationToken::new();
        let mut n = 0;
        let accept = move || {
            n += 1;
            let stream = n;
            async move {
                if stream > 5 {
                    std::future::pending::<()>().await;
                }
                Ok(stream)
            }
        };
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let server = tokio::spawn(serve(accept, limits(2, 1), stop.clone(), move |n, a| {
            record.lock().unwrap().push((n, a));
            std::future::pending()
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.cancel();
        server.await.unwrap().unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (1, Admission::Admitted),
                (2, Admission::Admitted),
                (3, Admission::Overflow)
            ],
            "4 and 5 are closed unseen"
        );
    }

    #[tokio::test]
    async fn a_connection_that_panics_ends_the_loop_with_its_message() {
        let stop = CancellationToken::new();
        let mut first = true;
        let accept = move || {
            let go = std::mem::take(&mut first);
            async move {
                if !go {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        };
        let ended = tokio::time::timeout(
            Duration::from_secs(5),
            serve(accept, limits(2, 0), stop, |(), _| async {
                panic!("bad length")
            }),
        )
        .await
        .unwrap();
        assert_eq!(
            ended,
            Err(ServeError::ConnectionPanicked(
                "panicked: bad length".into()
            ))
        );
    }

    #[tokio::test]
    async fn at_stop_connections_that_do_not_end_are_aborted_after_the_drain() {
        struct Dropped(Arc<AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let dropped = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let mut n = 0;
        let accept = move || {
            n += 1;
            let more = n <= 3;
            async move {
                if !more {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        };
        let counter = dropped.clone();
        let server = tokio::spawn(serve(accept, limits(8, 0), stop.clone(), move |(), _| {
            let guard = Dropped(counter.clone());
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            }
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = std::time::Instant::now();
        stop.cancel();
        server.await.unwrap().unwrap();
        assert!(asked.elapsed() < Duration::from_secs(1));
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_line_server_answers_each_line_and_closes_after_one_too_long() {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let stop = CancellationToken::new();
        let limits = LineLimits {
            max_connections: 4,
            max_line: 16,
            idle: Duration::from_secs(5),
        };
        let server = tokio::spawn(serve_lines(
            listener,
            limits,
            stop.clone(),
            |line| async move {
                match line {
                    Line::Request(text) => format!("ok {text}"),
                    Line::TooLong => "too long".to_owned(),
                }
            },
        ));
        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::new(read);
        let mut answer = String::new();
        write.write_all(b"one\r\ntwo\n").await.unwrap();
        for want in ["ok one\n", "ok two\n"] {
            answer.clear();
            read.read_line(&mut answer).await.unwrap();
            assert_eq!(answer, want);
        }
        write.write_all(&[b'x'; 40]).await.unwrap();
        answer.clear();
        read.read_line(&mut answer).await.unwrap();
        assert_eq!(answer, "too long\n");
        answer.clear();
        assert_eq!(read.read_line(&mut answer).await.unwrap(), 0, "closed");
        stop.cancel();
        assert_eq!(server.await.unwrap(), Ok(()));
    }
}
