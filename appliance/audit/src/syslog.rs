//! Syslog over TLS to the audit repository: RFC 5424 messages, RFC 5425 transport.
//!
//! - [`format`]: one audit message as RFC 5424 text: facility 10 (security/authorization),
//!   severity notice, APP-NAME `tsunagi`, PROCID the recording process, MSGID `IHE+RFC-3881` (ITI-20), the structured data
//!   `[meta sequenceId="N"]` (RFC 5424 §7.3.1: the box's own count, so that a repository can
//!   see a gap or drop a message sent twice), and the XML as MSG, UTF-8 with its BOM. The
//!   `fasyslog` crate writes it; its timestamp is the moment of formatting, so a message is
//!   formatted when the event is recorded, not when it is sent.
//! - [`Connection`]: TLS to the repository (rustls, [`tsunagi_runtime::http::TLS_POLICY`],
//!   the server's certificate checked against the network CA and the address or name
//!   connected to, the box's certificate presented), each message framed as RFC 5425 §4.3
//!   says: its length in octets, a space, the message. (fasyslog's own TLS sender frames with
//!   a line end, RFC 6587's non-transparent framing, which RFC 5425 does not use.)
//! - RFC 5425 has no acknowledgement. [`Connection::close`] is the box's confirmation: it
//!   sends TLS close_notify and waits for the repository to end its side in order (a TCP FIN,
//!   with or without its own close_notify), which a repository does on reading the box's
//!   close_notify, after everything before it. A repository that stops before it has read
//!   everything ends with a reset instead (the kernel resets a socket closed with unread
//!   data), and so does one that refuses the box's certificate after the handshake (TLS 1.3),
//!   since the box has written to it by then. Until a clean end, what was written may be
//!   lost, and is to be sent again; the `sequenceId` lets the repository drop a repeat.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fasyslog::format::SyslogContext;
use fasyslog::{Facility, SDElement, Severity};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tsunagi_runtime::http::{ReloadingTls, TlsFileError, tls_refusal};

/// APP-NAME of every message.
pub const APP_NAME: &str = "tsunagi";
/// MSGID of a DICOM audit message (IHE ITI TF-2a, ITI-20).
pub const MSGID: &str = "IHE+RFC-3881";
/// The byte order mark RFC 5424 puts before a UTF-8 MSG.
const BOM: char = '\u{feff}';

#[derive(Debug, thiserror::Error)]
pub enum SyslogError {
    #[error("the host name {0:?} is not a valid RFC 5424 HOSTNAME")]
    BadHostName(String),
    #[error("the audit repository's TLS files: {0}")]
    TlsFiles(#[source] Arc<TlsFileError>),
    #[error("cannot reach the audit repository at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("syslog over TLS with the audit repository at {addr} failed: {reason}")]
    TlsRefused { addr: SocketAddr, reason: String },
    #[error("the connection to the audit repository at {addr} failed: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit repository at {addr} did not {what} within {within:?}")]
    Timeout {
        addr: SocketAddr,
        what: &'static str,
        within: Duration,
    },
    #[error(
        "the audit repository at {addr} reset the connection (it stopped, or refused the box's certificate); what was sent on it is sent again"
    )]
    Reset { addr: SocketAddr },
    #[error("the audit repository at {addr} sent data; syslog over TLS is one-way")]
    UnexpectedData { addr: SocketAddr },
}

/// One audit message as RFC 5424 text (module docs). `host` is the box's name on the network
/// (its serial), `sequence` its count of audit messages, `xml` the DICOM audit message.
pub fn format(host: &str, sequence: u64, xml: &str) -> Result<String, SyslogError> {
    // RFC 5424 §6.2.4: printable US-ASCII, at most 255 octets.
    if host.is_empty() || host.len() > 255 || !host.bytes().all(|b| (33..=126).contains(&b)) {
        return Err(SyslogError::BadHostName(host.to_owned()));
    }
    let mut context = SyslogContext::default();
    context
        .facility(Facility::AUTHPRIV)
        .hostname(host)
        .appname(APP_NAME);
    let mut meta = SDElement::new("meta").expect("a registered SD-ID");
    meta.add_param("sequenceId", sequence.to_string())
        .expect("a registered parameter and digits");
    Ok(context
        .format_rfc5424(
            Severity::NOTICE,
            Some(MSGID),
            vec![meta],
            Some(format!("{BOM}{xml}")),
        )
        .to_string())
}

/// RFC 5425 §4.3: the message's length in octets, a space, the message.
pub fn frame(message: &str) -> Vec<u8> {
    let mut out = format!("{} ", message.len()).into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

/// The network's audit repository.
#[derive(Debug, Clone)]
pub struct Repository {
    pub addr: SocketAddr,
    /// The name its certificate must carry: the address itself unless a name is configured.
    pub server_name: ServerName<'static>,
    pub tls: ReloadingTls,
    /// For the connection and the handshake, each write, and the close.
    pub timeout: Duration,
}

/// An open TLS connection to the repository.
pub struct Connection {
    stream: TlsStream<TcpStream>,
    addr: SocketAddr,
    timeout: Duration,
}

impl Connection {
    /// Connects and completes the TLS handshake.
    pub async fn open(repository: &Repository) -> Result<Connection, SyslogError> {
        let addr = repository.addr;
        let within = repository.timeout;
        let config = repository.tls.current().map_err(SyslogError::TlsFiles)?;
        let tcp = bounded(
            addr,
            within,
            "accept the connection",
            TcpStream::connect(addr),
        )
        .await?
        .map_err(|source| SyslogError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let handshake = TlsConnector::from(config).connect(repository.server_name.clone(), tcp);
        let stream = bounded(addr, within, "complete the TLS handshake", handshake)
            .await?
            .map_err(|e| io_error(addr, e))?;
        Ok(Connection {
            stream,
            addr,
            timeout: within,
        })
    }

    /// Writes one message, framed (RFC 5425). Written is not received: see [`Connection::close`].
    pub async fn send(&mut self, message: &str) -> Result<(), SyslogError> {
        let (addr, within) = (self.addr, self.timeout);
        bounded(
            addr,
            within,
            "take a message",
            self.stream.write_all(&frame(message)),
        )
        .await?
        .map_err(|e| io_error(addr, e))
    }

    /// Ends the connection and waits for the repository to end its side (module docs): on
    /// `Ok`, the repository has read every message sent on this connection. A refusal of the
    /// box's certificate (TLS 1.3 reports it after the handshake) is an error here.
    pub async fn close(mut self) -> Result<(), SyslogError> {
        let (addr, within) = (self.addr, self.timeout);
        let closed = async {
            self.stream.flush().await?;
            self.stream.shutdown().await?;
            let mut buf = [0u8; 512];
            match self.stream.read(&mut buf).await {
                Ok(0) => Ok(true),
                Ok(_) => Ok(false),
                // rsyslog (gnutls) ends its side with a TCP FIN, no close_notify: an orderly
                // end all the same. A reset (data the repository did not read) is not.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(true),
                Err(e) => Err(e),
            }
        };
        match tokio::time::timeout(within, closed).await {
            Err(_) => Err(SyslogError::Timeout {
                addr,
                what: "close the connection",
                within,
            }),
            Ok(Err(e)) => Err(io_error(addr, e)),
            Ok(Ok(false)) => Err(SyslogError::UnexpectedData { addr }),
            Ok(Ok(true)) => Ok(()),
        }
    }
}

/// `step` within `within`, or [`SyslogError::Timeout`] saying what the repository did not do.
async fn bounded<T>(
    addr: SocketAddr,
    within: Duration,
    what: &'static str,
    step: impl Future<Output = T>,
) -> Result<T, SyslogError> {
    tokio::time::timeout(within, step)
        .await
        .map_err(|_| SyslogError::Timeout { addr, what, within })
}

/// An I/O error of the connection, with a TLS refusal named as such.
fn io_error(addr: SocketAddr, source: std::io::Error) -> SyslogError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    match tls_refusal(&source) {
        Some(reason) => SyslogError::TlsRefused { addr, reason },
        None if matches!(source.kind(), BrokenPipe | ConnectionReset) => {
            SyslogError::Reset { addr }
        }
        None => SyslogError::Io { addr, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_rfc_5424_with_the_sequence_and_the_xml_after_a_bom() {
        let text = format("1312345678-QEMU-0001", 42, "<AuditMessage/>").unwrap();
        // <PRI>: facility 10 (authpriv) * 8 + severity 5 (notice).
        assert!(text.starts_with("<85>1 "), "{text}");
        let fields: Vec<&str> = text.splitn(9, ' ').collect();
        assert_eq!(fields[2], "1312345678-QEMU-0001");
        assert_eq!(fields[3], APP_NAME);
        // PROCID: the process that recorded it.
        assert!(fields[4].bytes().all(|b| b.is_ascii_digit()), "{text}");
        assert_eq!(fields[5], MSGID);
        assert_eq!(fields[6..8], ["[meta", "sequenceId=\"42\"]"]);
        assert_eq!(fields[8], "\u{feff}<AuditMessage/>");
    }

    #[test]
    fn a_host_name_outside_rfc_5424_is_refused() {
        for bad in ["", "two words", "ホスト", &"x".repeat(256)] {
            assert!(matches!(
                format(bad, 1, "<a/>"),
                Err(SyslogError::BadHostName(_))
            ));
        }
    }

    #[test]
    fn a_frame_counts_octets_not_characters() {
        assert_eq!(frame("abc"), b"3 abc");
        let text = "\u{feff}監査";
        assert_eq!(frame(text), [b"9 ".as_slice(), text.as_bytes()].concat());
    }
}
