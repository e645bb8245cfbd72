//! testssl.sh (Debian package `testssl.sh`, the command `testssl`) against a TLS endpoint
//! the box connects to, and the appliance's one TLS policy checked on what it found
//! (issue 17): no SSL, TLS 1.0 or 1.1; TLS 1.3 offered; every cipher a TLS 1.3 one, or a
//! TLS 1.2 one with ECDHE key exchange and an AEAD (GCM or ChaCha20-Poly1305).
//!
//! [`scan`] runs `testssl --protocols --cipher-per-proto --jsonfile FILE HOST:PORT` (in a
//! network namespace with `ip netns exec` when given) and reads its JSON findings;
//! [`Offer::policy_violations`] lists what breaks the policy; [`Offer`]'s `Display` is the
//! table a test prints.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::testnet::cmd::{CLEAN_PATH, display, find_in_clean_path, tail};

/// Why a scan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TestsslError {
    #[error(
        "testssl is not installed: not found in PATH (Debian package `testssl.sh`; `cargo xtask test` installs it)"
    )]
    Missing,
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} wrote no usable findings ({why}); its output: {output}")]
    Findings {
        command: String,
        why: String,
        output: String,
    },
}

/// What an endpoint offered, as testssl found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    /// The endpoint scanned, `HOST:PORT`.
    pub target: String,
    /// Each protocol testssl probes (`SSLv2` … `TLS1_3`) and its finding (`offered`,
    /// `offered with final`, `not offered`).
    pub protocols: BTreeMap<String, String>,
    /// Each cipher offered: its protocol (`TLS 1.2`, `TLS 1.3`) and OpenSSL name.
    pub ciphers: Vec<(String, String)>,
}

impl Offer {
    fn offered(&self, protocol: &str) -> bool {
        self.protocols
            .get(protocol)
            .is_some_and(|f| f.starts_with("offered"))
    }

    /// What in the offer breaks the policy (empty: it holds).
    pub fn policy_violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
            match self.protocols.get(old) {
                Some(f) if f.starts_with("not offered") => {}
                Some(f) => out.push(format!("{old}: {f}")),
                None => out.push(format!("{old}: not probed")),
            }
        }
        if !self.offered("TLS1_3") {
            out.push("TLS 1.3 is not offered".to_owned());
        }
        if self.ciphers.is_empty() {
            out.push("no cipher found".to_owned());
        }
        for (protocol, name) in &self.ciphers {
            let aead = name.contains("GCM")
                || name.contains("CHACHA20-POLY1305")
                || name.contains("CHACHA20_POLY1305");
            let ok = match protocol.as_str() {
                "TLS 1.3" => aead,
                "TLS 1.2" => name.starts_with("ECDHE-") && aead,
                _ => false,
            };
            if !ok {
                out.push(format!("{protocol} {name}: outside the policy"));
            }
        }
        out
    }
}

impl fmt::Display for Offer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "testssl {}:", self.target)?;
        for (protocol, finding) in &self.protocols {
            writeln!(f, "  {protocol:<7} {finding}")?;
        }
        for (protocol, name) in &self.ciphers {
            writeln!(f, "  {protocol}  {name}")?;
        }
        Ok(())
    }
}

/// The protocol findings testssl reports (its JSON `id`s).
const PROTOCOLS: [&str; 6] = ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"];

/// Scans `target` (`HOST:PORT`), from the network namespace `netns` if given (root, `ip`).
/// Takes 20 s or so.
pub fn scan(target: &str, netns: Option<&str>) -> Result<Offer, TestsslError> {
    let testssl = find_in_clean_path("testssl").ok_or(TestsslError::Missing)?;
    let dir = tempfile::tempdir().map_err(|source| TestsslError::Spawn {
        command: "a temporary directory".into(),
        source,
    })?;
    let json: PathBuf = dir.path().join("findings.json");
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new(find_in_clean_path("ip").unwrap_or_else(|| "ip".into()));
            c.args(["netns", "exec", ns]).arg(&testssl);
            c
        }
        None => Command::new(&testssl),
    };
    command
        .env_clear()
        .env("PATH", CLEAN_PATH)
        .env("HOME", dir.path())
        .args(["--quiet", "--color", "0", "--warnings", "off"])
        .args(["--protocols", "--cipher-per-proto", "--jsonfile"])
        .arg(&json)
        .arg(target)
        .stdin(Stdio::null());
    let line = display(&command);
    let output = command.output().map_err(|source| TestsslError::Spawn {
        command: line.clone(),
        source,
    })?;
    let said = || {
        tail(
            &format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            2000,
        )
    };
    let bad = |why: String| TestsslError::Findings {
        command: line.clone(),
        why,
        output: said(),
    };
    let text = std::fs::read_to_string(&json).map_err(|e| bad(e.to_string()))?;
    let findings: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut offer = Offer {
        target: target.to_owned(),
        ..Offer::default()
    };
    for finding in &findings {
        let (Some(id), Some(text)) = (finding["id"].as_str(), finding["finding"].as_str()) else {
            continue;
        };
        if PROTOCOLS.contains(&id) {
            offer.protocols.insert(id.to_owned(), text.to_owned());
        } else if id.starts_with("cipher-tls") || id.starts_with("cipher-ssl") {
            // "TLS 1.2   xc02b   ECDHE-ECDSA-AES128-GCM-SHA256   ECDH 253 ..."
            let words: Vec<&str> = text.split_whitespace().collect();
            if let [p, v, _hex, name, ..] = words.as_slice() {
                offer.ciphers.push((format!("{p} {v}"), (*name).to_owned()));
            }
        }
    }
    if offer.protocols.len() != PROTOCOLS.len() {
        return Err(bad(format!(
            "protocols found: {:?}",
            offer.protocols.keys().collect::<Vec<_>>()
        )));
    }
    Ok(offer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weaker_offer_breaks_the_policy() {
        // What testssl 3.0.8 found at an nginx with `ssl_protocols TLSv1.2` and
        // `ssl_ciphers ECDHE-ECDSA-AES128-SHA`.
        let offer = Offer {
            target: "127.0.0.1:1".into(),
            protocols: [
                ("SSLv2", "not offered"),
                ("SSLv3", "not offered"),
                ("TLS1", "not offered"),
                ("TLS1_1", "not offered"),
                ("TLS1_2", "offered"),
                ("TLS1_3", "not offered + downgraded to weaker protocol"),
            ]
            .map(|(p, f)| (p.to_owned(), f.to_owned()))
            .into(),
            ciphers: vec![("TLS 1.2".into(), "ECDHE-ECDSA-AES128-SHA".into())],
        };
        assert_eq!(
            offer.policy_violations(),
            [
                "TLS 1.3 is not offered",
                "TLS 1.2 ECDHE-ECDSA-AES128-SHA: outside the policy"
            ]
        );
        let good = Offer {
            protocols: offer
                .protocols
                .iter()
                .map(|(p, f)| {
                    (
                        p.clone(),
                        if p == "TLS1_3" {
                            "offered with final".into()
                        } else {
                            f.clone()
                        },
                    )
                })
                .collect(),
            ciphers: vec![
                ("TLS 1.2".into(), "ECDHE-RSA-AES256-GCM-SHA384".into()),
                ("TLS 1.3".into(), "TLS_CHACHA20_POLY1305_SHA256".into()),
            ],
            ..offer.clone()
        };
        assert!(good.policy_violations().is_empty());
        let mut rsa = good.clone();
        rsa.ciphers
            .push(("TLS 1.2".into(), "AES128-GCM-SHA256".into()));
        rsa.protocols
            .insert("TLS1_1".into(), "offered (deprecated)".into());
        assert_eq!(
            rsa.policy_violations(),
            [
                "TLS1_1: offered (deprecated)",
                "TLS 1.2 AES128-GCM-SHA256: outside the policy"
            ]
        );
    }
}
