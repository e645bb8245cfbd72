//! Bounded HTTP/1.1 request reading and response writing for the FHIR test server, and a
//! tiny client for tests. std only; one request per connection (`Connection: close`).

use std::io::{self, Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The largest request head (request line and headers) the server reads.
pub const MAX_HEAD: usize = 16 * 1024;
/// The largest request body the server reads.
pub const MAX_BODY: usize = 1024 * 1024;
/// The largest response the client reads.
pub const MAX_RESPONSE: usize = 8 * 1024 * 1024;
/// Read and write timeout of each connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole request (head and body) must arrive within this time.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query (after `?`), if any.
    pub query: Option<String>,
    /// Header names (lowercase) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read; each maps to a status code.
#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    /// Malformed request line or headers (400).
    Malformed(&'static str),
    /// The head is larger than [`MAX_HEAD`] (431).
    HeadTooLarge,
    /// The body is larger than [`MAX_BODY`] (413).
    BodyTooLarge,
    /// `Transfer-Encoding` is not supported (501): send `Content-Length`.
    TransferEncoding,
}

impl BadRequest {
    /// Status code and a message for the `OperationOutcome`.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Self::Malformed(why) => (400, why),
            Self::HeadTooLarge => (431, "request head too large"),
            Self::BodyTooLarge => (413, "request body too large"),
            Self::TransferEncoding => (
                501,
                "Transfer-Encoding is not supported; send Content-Length",
            ),
        }
    }
}

/// Reads one request. `Ok(Err(..))` is a request to answer with an error status;
/// `Err(..)` an I/O problem (the client is gone or too slow).
pub fn read_request(stream: &mut impl Read) -> io::Result<Result<Request, BadRequest>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Ok(Err(BadRequest::HeadTooLarge));
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request too slow"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(Err(BadRequest::Malformed("connection closed mid-request")));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head_end > MAX_HEAD {
        return Ok(Err(BadRequest::HeadTooLarge));
    }
    let (mut request, length) = match parse_head(&buf[..head_end]) {
        Ok(parsed) => parsed,
        Err(e) => return Ok(Err(e)),
    };
    let mut body = buf.split_off(head_end);
    if body.len() > length {
        return Ok(Err(BadRequest::Malformed("more data than Content-Length")));
    }
    while body.len() < length {
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request too slow"));
        }
        let want = (length - body.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..want])?;
        if n == 0 {
            return Ok(Err(BadRequest::Malformed("connection closed mid-body")));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    request.body = body;
    Ok(Ok(request))
}

/// The index just past `\r\n\r\n`.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a request head (ending in `\r\n\r\n`); returns the request without body and the
/// body length.
pub fn parse_head(head: &[u8]) -> Result<(Request, usize), BadRequest> {
    let head = std::str::from_utf8(head).map_err(|_| BadRequest::Malformed("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadRequest::Malformed("bad request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(BadRequest::Malformed("not HTTP/1.x"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(BadRequest::Malformed("bad method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(BadRequest::Malformed("bad request target"));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    let mut headers = Vec::new();
    let mut length = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(BadRequest::Malformed("bad header line"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(BadRequest::Malformed("bad header name"));
        }
        let name = name.to_ascii_lowercase();
        let value = value.trim().to_owned();
        match name.as_str() {
            "transfer-encoding" => return Err(BadRequest::TransferEncoding),
            "content-length" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| BadRequest::Malformed("bad Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(BadRequest::Malformed("conflicting Content-Length"));
                }
                if n > MAX_BODY {
                    return Err(BadRequest::BodyTooLarge);
                }
                length = Some(n);
            }
            _ => {}
        }
        headers.push((name, value));
    }
    let request = Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        headers,
        body: Vec::new(),
    };
    Ok((request, length.unwrap_or(0)))
}

/// Reason phrase for the status codes the server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        _ => "Internal Server Error",
    }
}

/// A response as the client sees it.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Sends one request to `addr` (`Connection: close`) with an `application/fhir+json` body
/// if given, and reads the whole response. For tests.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/fhir+json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("Accept: application/fhir+json\r\n\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    let mut raw = Vec::new();
    let limit = u64::try_from(MAX_RESPONSE + 1).unwrap_or(u64::MAX);
    (&mut stream).take(limit).read_to_end(&mut raw)?;
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    if raw.len() > MAX_RESPONSE {
        return Err(bad("response too large"));
    }
    let end = find_head_end(&raw).ok_or_else(|| bad("no response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(raw: &[u8]) -> Result<Request, BadRequest> {
        read_request(&mut &raw[..]).unwrap()
    }

    #[test]
    fn parses_a_request_with_body_and_query() {
        let r = read(b"PUT /fhir/Patient?identifier=a%7Cb HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Type: application/fhir+json\r\n\r\n{}").unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/fhir/Patient");
        assert_eq!(r.query.as_deref(), Some("identifier=a%7Cb"));
        assert_eq!(r.header("content-type"), Some("application/fhir+json"));
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn enforces_the_bounds() {
        let mut big = b"GET /".to_vec();
        big.extend(vec![b'a'; MAX_HEAD + 10]);
        big.extend(b" HTTP/1.1\r\n\r\n");
        assert_eq!(read(&big), Err(BadRequest::HeadTooLarge));
        // A head that never ends stops at the bound too.
        assert_eq!(
            read(&vec![b'a'; MAX_HEAD * 3]),
            Err(BadRequest::HeadTooLarge)
        );
        let huge = format!(
            "POST /fhir HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(read(huge.as_bytes()), Err(BadRequest::BodyTooLarge));
        assert_eq!(
            read(b"POST /fhir HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(BadRequest::TransferEncoding)
        );
    }

    #[test]
    fn rejects_malformed_requests() {
        for raw in [
            &b"GET /fhir\r\n\r\n"[..],
            b"GET /fhir HTTP/2\r\n\r\n",
            b"get /fhir HTTP/1.1\r\n\r\n",
            b"GET fhir HTTP/1.1\r\n\r\n",
            b"GET /fhir HTTP/1.1\r\nno colon\r\n\r\n",
            b"POST /fhir HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST /fhir HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"POST /fhir HTTP/1.1\r\nContent-Length: 1\r\n\r\nab",
            b"POST /fhir HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET /fhir HTTP/1.1\r\n",
        ] {
            assert!(
                matches!(read(raw), Err(BadRequest::Malformed(_))),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}
