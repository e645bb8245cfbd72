//! The enrollment protocol (issue 16): what a box sends to the network's enrollment server
//! (`tsunagi-provision serve`, at the hub, over TLS pinned to the network CA) and what it
//! gets back. JSON over HTTPS, one request each:
//!
//! - `POST` [`ENROLL_PATH`]: [`EnrollRequest`] (the medium's one-time token, the box's
//!   serial, its WireGuard public key, a CSR for its TLS key) → [`Enrolled`]. Neither
//!   private key ever leaves the box.
//! - `POST` [`RENEW_PATH`], over the tunnel, authenticated by the box's current client
//!   certificate: [`RenewRequest`] (a CSR) → [`Enrolled`].
//! - `POST` [`CONSOLE_PATH`], the same way: [`ConsoleRequest`] (a CSR for the clinic
//!   console's own TLS key) → [`ConsoleIssued`], a server certificate for the console's
//!   address on the clinic LAN as the network's config for the clinic has it (the server
//!   takes no name from the box).
//!
//! A refusal is an HTTP error status with [`Refusal`] as its body: one line for the box's
//! console and status.

use serde::{Deserialize, Serialize};

/// Where a box enrolls.
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Where an enrolled box renews its certificate.
pub const RENEW_PATH: &str = "/v1/renew";
/// Where an enrolled box gets its clinic console's server certificate.
pub const CONSOLE_PATH: &str = "/v1/console-certificate";
/// A request's body, at most.
pub const MAX_REQUEST: usize = 64 * 1024;
/// A response's body, at most (a certificate chain and the tunnel settings).
pub const MAX_RESPONSE: usize = 64 * 1024;

/// A box enrolls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EnrollRequest {
    /// The medium's one-time token.
    pub token: String,
    /// The clinic the medium was for (the token is bound to it).
    pub facility_code: String,
    /// The box's serial ([`valid_box_serial`]).
    pub box_serial: String,
    /// The box's WireGuard public key (base64 of 32 bytes).
    pub wireguard_public_key: String,
    /// A PKCS#10 request for the box's TLS key (PEM).
    pub csr_pem: String,
}

/// An enrolled box renews its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RenewRequest {
    /// A PKCS#10 request for the box's TLS key (PEM): the same key or a new one.
    pub csr_pem: String,
}

/// An enrolled box asks for its console's server certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsoleRequest {
    /// A PKCS#10 request for the console's TLS key (PEM): its key only is used.
    pub csr_pem: String,
}

/// The console's server certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConsoleIssued {
    /// The certificate (PEM), issued by the box-identity CA for server authentication.
    pub certificate_pem: String,
    /// The box-identity CA's certificate (PEM): what the clinic's computers trust.
    pub box_ca_pem: String,
    /// Unix seconds: the certificate's end.
    pub not_after: i64,
    /// The addresses it names (the console's on the clinic LAN).
    pub addresses: Vec<std::net::IpAddr>,
}

/// Whether `ip` may be a clinic console's name in a certificate: a private address
/// (RFC 1918, or an IPv6 unique local address), never a public, loopback, link-local or
/// unspecified one.
pub fn private_lan_address(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_private(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The box's tunnel, as the hub has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TunnelSettings {
    /// The box's address inside the tunnel (`10.98.1.2/24`).
    pub address: String,
    /// The hub's WireGuard public key.
    pub hub_public_key: String,
    /// `HOST:PORT` of the hub's WireGuard endpoint.
    pub hub_endpoint: String,
}

/// What an enrolled (or renewed) box gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Enrolled {
    /// The box's client certificate (PEM), issued by the box-identity CA.
    pub certificate_pem: String,
    /// The box-identity CA's certificate (PEM).
    pub box_ca_pem: String,
    /// Unix seconds: the certificate's end.
    pub not_after: i64,
    /// The box's identity in the certificate ([`identity`]).
    pub identity: String,
    pub tunnel: TunnelSettings,
    /// Where the box renews (`https://`, an address inside the tunnel).
    pub renew_url: String,
}

/// A refusal's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Refusal {
    pub error: String,
}

impl Refusal {
    /// The reason as one printable line of at most 300 characters (it comes from the
    /// network and goes to a console and a status).
    pub fn line(&self) -> String {
        self.error
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(300)
            .collect()
    }
}

/// A box serial: 1-64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit (the
/// hardware's serial, or the machine ID).
pub fn valid_box_serial(serial: &str) -> bool {
    (1..=64).contains(&serial.len())
        && serial
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A box's identity in its certificate (the subject's CN): its clinic's 医療機関コード
/// and its serial.
pub fn identity(facility_code: &str, box_serial: &str) -> String {
    format!("{facility_code}-{box_serial}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_serials() {
        for ok in ["a", "QEMU-0001", "4c4c4544.0042_10", &"x".repeat(64)] {
            assert!(valid_box_serial(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "ａ", &"x".repeat(65), "a\n"] {
            assert!(!valid_box_serial(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_refusal_is_one_printable_line() {
        let r = Refusal {
            error: format!("bad\nline\x1b[31m{}", "x".repeat(400)),
        };
        let line = r.line();
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert_eq!(line.chars().count(), 300);
        assert!(line.starts_with("bad line "));
    }

    #[test]
    fn console_names_are_private_lan_addresses_only() {
        for ok in [
            "192.168.50.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "fd00::1",
        ] {
            assert!(private_lan_address(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "8.8.8.8",
            "172.32.0.1",
            "127.0.0.1",
            "0.0.0.0",
            "169.254.1.1",
            "::",
            "::1",
            "fe80::1",
            "2001:db8::1",
        ] {
            assert!(!private_lan_address(bad.parse().unwrap()), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r = serde_json::from_str::<RenewRequest>(r#"{"csr-pem":"x","admin":true}"#);
        assert!(r.is_err());
    }
}
