//! The hub's health endpoint: a tiny HTTP/1.x server and client, std only.
//!
//! Server: `GET /health` → `200` with body `ok\n`; any other request line → `404`; a
//! request head that is malformed or larger than [`MAX_REQUEST_HEAD`] → `400`. One thread
//! per connection, at most [`MAX_CONNECTIONS`] at once, [`IO_TIMEOUT`] per read or write,
//! [`HEAD_DEADLINE`] for the whole request head, `Connection: close`.
//!
//! Client: [`get`], enough for tests to probe the server from inside a namespace
//! (`testnet get URL`).

use std::io::{self, Read, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The largest request head the server reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// The largest response the client reads.
pub const MAX_RESPONSE: usize = 64 * 1024;
/// Read and write timeout of each connection (server) and of each read (client).
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The whole request head must arrive within this time.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed right away.
pub const MAX_CONNECTIONS: usize = 32;
/// How much unread input the server discards after answering a bad request.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// What `testnet serve-health` prints on stdout once it listens.
pub const READY_LINE: &str = "hub-health: listening on";

/// Serves `listener` until accepting fails for good (it never returns normally).
pub fn serve(listener: &TcpListener) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            // Aborted handshakes and fd exhaustion are per-connection problems.
            Err(e) => {
                eprintln!("hub-health: accept: {e}");
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let active = Arc::clone(&active);
        thread::spawn(move || {
            if let Err(e) = handle(stream) {
                eprintln!("hub-health: connection: {e}");
            }
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
    Ok(())
}

fn handle(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let unread_input = head.is_none();
    let (status, reason, body) = match head {
        Some(head) => respond(&head),
        None => (400, "Bad Request", "bad request\n"),
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    if unread_input {
        // Closing with unread input makes the kernel send a reset, which can destroy the
        // response before the client reads it. Finish our side and discard a bounded
        // amount of what the client is still sending.
        stream.shutdown(Shutdown::Write)?;
        let _ = io::copy(&mut (&mut stream).take(DRAIN_LIMIT), &mut io::sink());
    }
    Ok(())
}

/// Reads up to the end of the request head. `None` if it is larger than
/// [`MAX_REQUEST_HEAD`] or the client closed before finishing it.
fn read_head(stream: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        // Each read has IO_TIMEOUT; this bounds a client that sends a byte at a time.
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow",
            ));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

/// Status, reason and body for a request head.
pub fn respond(head: &[u8]) -> (u16, &'static str, &'static str) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some("/health"), Some(version), None) if version.starts_with("HTTP/1.") => {
            (200, "OK", "ok\n")
        }
        (Some(_), Some(_), Some(version), None) if version.starts_with("HTTP/1.") => {
            (404, "Not Found", "not found\n")
        }
        _ => (400, "Bad Request", "bad request\n"),
    }
}

/// A response: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (everything after the head, cut to `Content-Length` if given).
    pub body: Vec<u8>,
}

/// Why [`get`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GetError {
    /// The URL is not `http://HOST[:PORT][/PATH]`.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Resolving or connecting failed.
    #[error("failed to connect to {addr}")]
    Connect {
        /// The address (as given, or resolved).
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sending the request or reading the response failed.
    #[error("failed to exchange a request with {addr}")]
    Io {
        /// The server's address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The response is not HTTP/1.x or is too large.
    #[error("bad response from {addr}: {detail}")]
    BadResponse {
        /// The server's address.
        addr: SocketAddr,
        /// What is wrong.
        detail: &'static str,
    },
}

/// `GET url` over HTTP/1.0 with `Connection: close`; `timeout` bounds the connect and each
/// read and write.
pub fn get(url: &str, timeout: Duration) -> Result<Response, GetError> {
    let invalid = |reason| GetError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("only http:// is supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(invalid("no host"));
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(invalid("the path contains spaces or control characters"));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let connect_err = |source| GetError::Connect {
        addr: with_port.clone(),
        source,
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| connect_err(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| GetError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let io_err = |source| GetError::Io { addr, source };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io_err)?;

    let mut raw = Vec::new();
    let mut limited = (&mut stream).take(u64::try_from(MAX_RESPONSE + 1).unwrap_or(u64::MAX));
    limited.read_to_end(&mut raw).map_err(io_err)?;
    if raw.len() > MAX_RESPONSE {
        return Err(GetError::BadResponse {
            addr,
            detail: "larger than 64 KiB",
        });
    }
    parse_response(&raw).ok_or(GetError::BadResponse {
        addr,
        detail: "not an HTTP/1.x response",
    })
}

/// Splits a complete response into status and body.
fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next()?.split(' ');
    if !status_line.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = status_line.next()?.parse().ok()?;
    let mut body = raw[end + 4..].to_vec();
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
            && let Ok(len) = value.trim().parse::<usize>()
        {
            body.truncate(len);
        }
    }
    Some(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_health_and_nothing_else() {
        assert_eq!(respond(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").0, 200);
        assert_eq!(respond(b"GET /health HTTP/1.0\r\n\r\n").2, "ok\n");
        assert_eq!(respond(b"GET /healthz HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(respond(b"POST /health HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(respond(b"GET /health\r\n\r\n").0, 400);
        assert_eq!(respond(b"\xff\xfe\r\n\r\n").0, 400);
    }

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\nextra").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok\n"[..]));
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_none());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_none());
    }

    #[test]
    fn rejects_bad_urls() {
        for url in ["https://x/", "http:///x", "http://x/a b", "ftp://x"] {
            assert!(
                matches!(get(url, IO_TIMEOUT), Err(GetError::InvalidUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn round_trip_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || serve(&listener));
        let ok = get(&format!("http://{addr}/health"), IO_TIMEOUT).unwrap();
        assert_eq!(
            ok,
            Response {
                status: 200,
                body: b"ok\n".to_vec()
            }
        );
        let missing = get(&format!("http://{addr}/nope"), IO_TIMEOUT).unwrap();
        assert_eq!(missing.status, 404);

        // An oversized head gets a 400, not an unbounded read.
        let mut stream = TcpStream::connect(addr).unwrap();
        let big = vec![b'a'; MAX_REQUEST_HEAD + 2048];
        stream.write_all(&big).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    }
}
