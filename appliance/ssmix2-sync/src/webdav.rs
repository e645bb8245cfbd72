//! The HTTPS WebDAV transport ([`WebDavReplica`]).
//!
//! * `put`: `PUT` to the temporary name ([`RelPath::part_name`]), then `MOVE` it onto the
//!   final name (`Overwrite: T`, an absolute `Destination`), so the final name only ever
//!   shows a complete file.
//! * `rename`: `MOVE` (`404`: the source is gone, `Ok(false)`); `delete`: `DELETE` (`404`
//!   is success); `stat`: `HEAD` (`404`: `None`, else `Content-Length`).
//! * Missing folders: nginx makes them for `PUT` with `create_full_put_path on`, and for
//!   `MOVE` always (both seen against a real nginx 1.22 in `tests/webdav.rs`). When a
//!   `PUT` or `MOVE` answers `409 Conflict` (RFC 4918: a missing parent collection) or
//!   `500` (nginx's answer to a `PUT` into a missing folder without
//!   `create_full_put_path`), the folders are made by `MKCOL`, top down (`405`: already
//!   there), and the request is sent once more; its second answer is final.
//!
//! TLS and HTTP: the appliance's one HTTP stack, [`tsunagi_runtime::http`] (reqwest's
//! blocking client, like the [`Replica`] trait; rustls with the ring provider). The server
//! is verified against the configured CA file only (no system or built-in roots), and the
//! client certificate is always presented. No proxies from the environment, no redirects,
//! `https` only; a status is an answer, not an error.
//!
//! Paths are patient data (they hold patient IDs): they appear in errors, which the caller
//! handles, but never in this module's logs, which record the method and status only, nor
//! in the transport errors (reqwest's URL is removed from them). reqwest and hyper log
//! through the `log` crate, which the appliance does not forward.

use std::fmt;
use std::io::{self, Read as _};
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, header};
pub use tsunagi_runtime::http::TlsFileError;
use tsunagi_runtime::http::{ClientError, ClientSettings, load_identity, load_roots};

use crate::replica::{RelPath, Replica, ReplicaError};

/// How much of a response body is read (and thrown away) so the connection can be reused.
/// nginx's answers to WebDAV requests are short HTML pages; a longer body just closes the
/// connection.
const DRAIN_LIMIT: u64 = 64 * 1024;

/// The replica's root on a WebDAV server: `https://HOST[:PORT][/PREFIX]/`, always with a
/// trailing `/`. No user info, query or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

/// Why a base URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url:?} is not a WebDAV base URL: {reason}")]
pub struct BadBaseUrl {
    pub url: String,
    pub reason: &'static str,
}

impl BaseUrl {
    pub fn new(url: &str) -> Result<BaseUrl, BadBaseUrl> {
        let bad = |reason| BadBaseUrl {
            url: url.to_owned(),
            reason,
        };
        if !url.starts_with("https://") {
            return Err(bad("it must start with https://"));
        }
        if url.contains(['?', '#']) {
            return Err(bad("it must not have a query or a fragment"));
        }
        let uri = http::Uri::try_from(url).map_err(|_| bad("it is not a valid URL"))?;
        let Some(authority) = uri.authority() else {
            return Err(bad("it has no host"));
        };
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return Err(bad("it must name a host, without user information"));
        }
        let mut normal = format!("https://{}{}", authority.as_str(), uri.path());
        if !normal.ends_with('/') {
            normal.push('/');
        }
        Ok(BaseUrl(normal))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for BaseUrl {
    type Error = BadBaseUrl;

    fn try_from(url: &str) -> Result<BaseUrl, BadBaseUrl> {
        BaseUrl::new(url)
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where and how to reach the WebDAV server.
#[derive(Debug, Clone)]
pub struct WebDavSettings {
    pub base_url: BaseUrl,
    /// The CA certificates (PEM) the server's certificate must chain to; nothing else is
    /// trusted.
    pub ca_file: PathBuf,
    /// The client certificate (PEM; the leaf first, then any intermediates).
    pub client_cert_file: PathBuf,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub client_key_file: PathBuf,
    /// The deadline of each request, from connecting to the end of the response.
    pub timeout: Duration,
}

impl From<TlsFileError> for ReplicaError {
    fn from(e: TlsFileError) -> ReplicaError {
        ReplicaError::Tls(Box::new(e))
    }
}

/// How long an idle connection to the server is kept for the next request.
const KEEP_IDLE: Duration = Duration::from_secs(15);

/// The replica on an HTTPS WebDAV server.
pub struct WebDavReplica {
    base: BaseUrl,
    client: reqwest::blocking::Client,
}

impl fmt::Debug for WebDavReplica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebDavReplica")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

/// The WebDAV methods we send, with the names errors carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dav {
    Put,
    Move,
    Delete,
    Head,
    Mkcol,
}

impl Dav {
    fn name(self) -> &'static str {
        match self {
            Dav::Put => "PUT",
            Dav::Move => "MOVE",
            Dav::Delete => "DELETE",
            Dav::Head => "HEAD",
            Dav::Mkcol => "MKCOL",
        }
    }

    fn method(self) -> Method {
        match self {
            Dav::Put => Method::PUT,
            Dav::Delete => Method::DELETE,
            Dav::Head => Method::HEAD,
            // Only fails for bytes that are not an HTTP token; both names are tokens.
            Dav::Move | Dav::Mkcol => Method::from_bytes(self.name().as_bytes())
                .expect("MOVE and MKCOL are valid method names"),
        }
    }
}

/// What the server answered.
#[derive(Debug, Clone, Copy)]
struct Answer {
    status: u16,
    content_length: Option<u64>,
}

impl WebDavReplica {
    /// Loads the CA, the client certificate and its key (errors: [`ReplicaError::Tls`]).
    /// Does not connect: the first request does. Blocking, like the requests: not to be
    /// called inside an async task (see [`tsunagi_runtime::http::blocking_client_builder`]).
    pub fn new(settings: &WebDavSettings) -> Result<WebDavReplica, ReplicaError> {
        let roots = load_roots(&settings.ca_file)?;
        let identity = load_identity(&settings.client_cert_file, &settings.client_key_file)?;
        let builder = tsunagi_runtime::http::blocking_client_builder(ClientSettings {
            roots,
            identity: Some(identity),
            connect_timeout: settings.timeout,
            timeout: Some(settings.timeout),
            keep_idle: Some(KEEP_IDLE),
        })
        .map_err(|e| match e {
            ClientError::ClientAuth(source) => ReplicaError::from(TlsFileError::ClientAuth {
                cert: settings.client_cert_file.clone(),
                key: settings.client_key_file.clone(),
                source,
            }),
            e => ReplicaError::Tls(Box::new(e)),
        })?;
        let client = builder
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ReplicaError::Tls(Box::new(e)))?;
        Ok(WebDavReplica {
            base: settings.base_url.clone(),
            client,
        })
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &BaseUrl {
        &self.base
    }

    fn url(&self, path: &RelPath) -> String {
        let mut url = self.base.as_str().to_owned();
        push_encoded(&mut url, path.as_str());
        url
    }

    /// One request. `destination`: a `MOVE`'s target URL (sent with `Overwrite: T`).
    fn send(
        &self,
        dav: Dav,
        url: &str,
        destination: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Answer, ReplicaError> {
        let mut request = self.client.request(dav.method(), url);
        if let Some(destination) = destination {
            request = request
                .header("Destination", destination)
                .header("Overwrite", "T");
        }
        if let Some(bytes) = body {
            request = request.body(bytes.to_vec());
        }
        let mut response = match request.send() {
            Ok(response) => response,
            Err(e) => {
                tracing::debug!(method = dav.name(), "webdav request failed");
                if let Some(reason) = tsunagi_runtime::http::tls_refusal(&e) {
                    return Err(ReplicaError::TlsRefused(reason));
                }
                // reqwest's errors name the URL, which holds patient IDs.
                return Err(ReplicaError::Connect(Box::new(e.without_url())));
            }
        };
        let status = response.status().as_u16();
        // The header itself: reqwest's `content_length` is the body's, none for `HEAD`.
        let content_length = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        tracing::debug!(method = dav.name(), status, "webdav request");
        if dav != Dav::Head {
            // Only to reuse the connection; a failure here says nothing about the request.
            let _ = io::copy(&mut (&mut response).take(DRAIN_LIMIT), &mut io::sink());
        }
        Ok(Answer {
            status,
            content_length,
        })
    }

    /// `MKCOL` every folder down to `folder` (`a/b/c`: `a/`, `a/b/`, `a/b/c/`). `405`: the
    /// folder exists.
    fn make_folders(&self, folder: &str) -> Result<(), ReplicaError> {
        let mut url = self.base.as_str().to_owned();
        for (i, component) in folder.split('/').enumerate() {
            push_encoded(&mut url, component);
            url.push('/');
            let answer = self.send(Dav::Mkcol, &url, None, None)?;
            if !matches!(answer.status, 201 | 405) {
                let upto: Vec<&str> = folder.split('/').take(i + 1).collect();
                return Err(ReplicaError::Status {
                    method: Dav::Mkcol.name(),
                    path: upto.join("/"),
                    status: answer.status,
                });
            }
        }
        Ok(())
    }

    /// `send`, and on `409 Conflict` or `500` (a missing parent folder, see the module
    /// docs) the folders of `target` are made and the request is sent once more.
    fn send_making_folders(
        &self,
        dav: Dav,
        target: &RelPath,
        url: &str,
        destination: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<Answer, ReplicaError> {
        let answer = self.send(dav, url, destination, body)?;
        match (answer.status, target.parent()) {
            (409 | 500, Some(folder)) => {
                self.make_folders(folder)?;
                self.send(dav, url, destination, body)
            }
            _ => Ok(answer),
        }
    }

    /// `MOVE from to` with `Overwrite: T`: `Ok(true)` moved, `Ok(false)` no source.
    fn move_file(&self, from: &RelPath, to: &RelPath) -> Result<bool, ReplicaError> {
        let (source, destination) = (self.url(from), self.url(to));
        let answer = self.send_making_folders(Dav::Move, to, &source, Some(&destination), None)?;
        match answer.status {
            201 | 204 => Ok(true),
            404 => Ok(false),
            status => Err(ReplicaError::Status {
                method: Dav::Move.name(),
                path: from.to_string(),
                status,
            }),
        }
    }
}

impl Replica for WebDavReplica {
    fn put(&mut self, path: &RelPath, bytes: &[u8]) -> Result<(), ReplicaError> {
        let part = path.part_name();
        let answer =
            self.send_making_folders(Dav::Put, &part, &self.url(&part), None, Some(bytes))?;
        if !matches!(answer.status, 200 | 201 | 204) {
            return Err(ReplicaError::Status {
                method: Dav::Put.name(),
                path: part.to_string(),
                status: answer.status,
            });
        }
        if self.move_file(&part, path)? {
            Ok(())
        } else {
            // The temporary we just wrote is gone: someone else moved or deleted it.
            Err(ReplicaError::Status {
                method: Dav::Move.name(),
                path: part.to_string(),
                status: 404,
            })
        }
    }

    fn rename(&mut self, from: &RelPath, to: &RelPath) -> Result<bool, ReplicaError> {
        self.move_file(from, to)
    }

    fn delete(&mut self, path: &RelPath) -> Result<(), ReplicaError> {
        let answer = self.send(Dav::Delete, &self.url(path), None, None)?;
        match answer.status {
            200 | 202 | 204 | 404 => Ok(()),
            status => Err(ReplicaError::Status {
                method: Dav::Delete.name(),
                path: path.to_string(),
                status,
            }),
        }
    }

    fn stat(&mut self, path: &RelPath) -> Result<Option<u64>, ReplicaError> {
        let answer = self.send(Dav::Head, &self.url(path), None, None)?;
        match (answer.status, answer.content_length) {
            (200, Some(len)) => Ok(Some(len)),
            (404, _) => Ok(None),
            (status, _) => Err(ReplicaError::Status {
                method: Dav::Head.name(),
                path: path.to_string(),
                status,
            }),
        }
    }
}

/// Appends `path` to `url`, each `/`-separated component percent-encoded as UTF-8: every
/// byte but the RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`.
fn push_encoded(url: &mut String, path: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for (i, component) in path.split('/').enumerate() {
        if i > 0 {
            url.push('/');
        }
        for b in component.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                url.push(char::from(b));
            } else {
                url.push('%');
                url.push(char::from(HEX[usize::from(b >> 4)]));
                url.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn components_are_percent_encoded_as_utf8() {
        let mut url = String::from("https://h/ssmix2/");
        push_encoded(
            &mut url,
            "000/012/0000123456/20261120/^経過記録^^11506-3^経過記録^LN/a b_1~.x",
        );
        assert_eq!(
            url,
            "https://h/ssmix2/000/012/0000123456/20261120/\
             %5E%E7%B5%8C%E9%81%8E%E8%A8%98%E9%8C%B2%5E%5E11506-3%5E\
             %E7%B5%8C%E9%81%8E%E8%A8%98%E9%8C%B2%5ELN/a%20b_1~.x"
        );
        let mut url = String::new();
        push_encoded(&mut url, "%/?#");
        assert_eq!(url, "%25/%3F%23");
    }

    #[test]
    fn base_urls() {
        let ok = |s: &str| BaseUrl::new(s).map(|b| b.as_str().to_owned());
        assert_eq!(ok("https://h").unwrap(), "https://h/");
        assert_eq!(
            ok("https://h:8443/ssmix2").unwrap(),
            "https://h:8443/ssmix2/"
        );
        assert_eq!(
            ok("https://127.0.0.1:1/ssmix2/").unwrap(),
            "https://127.0.0.1:1/ssmix2/"
        );
        for bad in [
            "",
            "http://h/",
            "https://",
            "https:///x",
            "https://u:p@h/",
            "https://h/?q",
            "https://h/#f",
            "https://h /",
            "ftp://h/",
        ] {
            assert!(BaseUrl::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_and_bad_files_are_tls_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, b"").unwrap();
        let settings = WebDavSettings {
            base_url: BaseUrl::new("https://127.0.0.1:9/").unwrap(),
            ca_file: dir.path().join("missing.pem"),
            client_cert_file: empty.clone(),
            client_key_file: empty.clone(),
            timeout: Duration::from_secs(1),
        };
        let err = WebDavReplica::new(&settings).unwrap_err();
        let ReplicaError::Tls(source) = err else {
            panic!("{err:?}")
        };
        assert!(matches!(
            source.downcast_ref::<TlsFileError>(),
            Some(TlsFileError::Read { what: "CA", .. })
        ));
        let settings = WebDavSettings {
            ca_file: empty.clone(),
            ..settings
        };
        let err = WebDavReplica::new(&settings).unwrap_err();
        let ReplicaError::Tls(source) = err else {
            panic!("{err:?}")
        };
        assert!(matches!(
            source.downcast_ref::<TlsFileError>(),
            Some(TlsFileError::Pem { what: "CA", .. })
        ));
    }
}
