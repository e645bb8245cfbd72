//! The enrollment server's decisions (issue 16), apart from its transport
//! ([`crate::serve`]): a box enrolls with its medium's one-time token, renews over the
//! tunnel with its current certificate, and the operator revokes a clinic's box.
//!
//! Enrolling, in one database transaction: the token must be known, unused, unexpired and
//! for the clinic the box names; the box's CSR must verify. Then the certificate is
//! issued, the hub's WireGuard peer set (the clinic's earlier box, if any, removed), and
//! only then is the token marked used and the box recorded, so a failure anywhere leaves
//! the token usable and the database as it was.

use std::net::Ipv4Addr;

use rusqlite::{OptionalExtension as _, params};
use tsunagi_medium::enroll::{
    ConsoleIssued, ConsoleRequest, EnrollRequest, Enrolled, RenewRequest, TunnelSettings, identity,
    valid_box_serial,
};

use crate::ca::BoxCa;
use crate::hub::HubPeers;
use crate::{Operator, ProvisionError};

/// What the server issues: the certificates' lifetime, and where boxes renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub lifetime: std::time::Duration,
    /// `https://` at the hub's address inside the tunnel.
    pub renew_url: String,
}

/// Why a request is refused: the HTTP status and one line for the box.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The request is not one the server can read (400).
    #[error("{0}")]
    BadRequest(String),
    /// The token or the certificate does not allow it (403).
    #[error("{0}")]
    Forbidden(String),
    /// The server's own failure (500): the token stays usable.
    #[error("{0}")]
    Internal(String),
}

impl Refused {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            Refused::BadRequest(_) => 400,
            Refused::Forbidden(_) => 403,
            Refused::Internal(_) => 500,
        }
    }
}

impl From<rusqlite::Error> for Refused {
    fn from(e: rusqlite::Error) -> Refused {
        Refused::Internal(format!("operator database: {e}"))
    }
}

impl From<ProvisionError> for Refused {
    fn from(e: ProvisionError) -> Refused {
        Refused::Internal(e.to_string())
    }
}

/// The SHA-256 of a token, hex, as the database keeps it.
pub fn token_hash(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tunnel_ip(address: &str) -> Result<Ipv4Addr, Refused> {
    address
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| Refused::Internal(format!("the clinic's tunnel address {address} is bad")))
}

fn valid_wg_key(text: &str) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .is_ok_and(|k| k.len() == 32)
}

/// A box as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxRecord {
    pub facility_code: String,
    pub box_serial: String,
    pub wireguard_public_key: String,
    pub cert_serial: String,
    pub not_after: i64,
    pub enrolled_at: i64,
    pub renewed_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// What the box gets for a certificate issued to `who`.
fn answer(
    ca: &BoxCa,
    policy: &Policy,
    issued: crate::ca::Issued,
    who: String,
    tunnel: TunnelSettings,
) -> Enrolled {
    Enrolled {
        certificate_pem: issued.pem,
        box_ca_pem: ca.cert_pem().to_owned(),
        not_after: issued.not_after,
        identity: who,
        tunnel,
        renew_url: policy.renew_url.clone(),
    }
}

/// The box whose current client certificate was presented (its serial, hex, and its CN,
/// as the TLS layer verified them against the box-identity CA): its clinic, identity and
/// tunnel address; refused unless it is the clinic's current certificate, for that
/// identity, unexpired and not revoked.
fn presented(
    conn: &rusqlite::Connection,
    presented_serial: &str,
    presented_identity: &str,
    now: i64,
) -> Result<(String, String, String), Refused> {
    let row: Option<(String, String, i64, Option<i64>, String)> = conn
        .query_row(
            "SELECT b.facility_code, b.box_serial, b.not_after, b.revoked_at, c.tunnel_address
             FROM boxes b JOIN clinics c USING (facility_code) WHERE b.cert_serial = ?1",
            [presented_serial],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    let Some((code, serial, not_after, revoked, address)) = row else {
        return Err(Refused::Forbidden(
            "the certificate is not the current one of any box: enroll again".into(),
        ));
    };
    let who = identity(&code, &serial);
    if who != presented_identity {
        return Err(Refused::Forbidden(
            "the certificate's identity does not match the box's".into(),
        ));
    }
    if revoked.is_some() {
        return Err(Refused::Forbidden("the box is revoked".into()));
    }
    if now >= not_after {
        return Err(Refused::Forbidden(
            "the certificate expired: enroll again with a new medium".into(),
        ));
    }
    Ok((code, who, address))
}

impl Operator {
    fn network(&self) -> Result<(String, String, String), ProvisionError> {
        Ok(self.conn.query_row(
            "SELECT name, hub_public_key, hub_endpoint FROM network",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?)
    }

    /// The box-identity CA, loaded.
    pub fn box_ca(&self) -> Result<BoxCa, ProvisionError> {
        let (cert, key): (Option<String>, Option<String>) =
            self.conn
                .query_row("SELECT box_ca_cert, box_ca_key FROM network", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        match (cert, key) {
            (Some(cert), Some(key)) => {
                BoxCa::load(std::path::Path::new(&cert), std::path::Path::new(&key))
            }
            _ => Err(ProvisionError::Invalid(
                "the operator directory has no box-identity CA".into(),
            )),
        }
    }

    /// The box enrolled for a clinic, if any.
    pub fn enrolled_box(&self, facility_code: &str) -> Result<Option<BoxRecord>, ProvisionError> {
        Ok(self
            .conn
            .query_row(
                "SELECT facility_code, box_serial, wireguard_public_key, cert_serial, not_after, enrolled_at, renewed_at, revoked_at
                 FROM boxes WHERE facility_code = ?1",
                [facility_code],
                |r| {
                    Ok(BoxRecord {
                        facility_code: r.get(0)?,
                        box_serial: r.get(1)?,
                        wireguard_public_key: r.get(2)?,
                        cert_serial: r.get(3)?,
                        not_after: r.get(4)?,
                        enrolled_at: r.get(5)?,
                        renewed_at: r.get(6)?,
                        revoked_at: r.get(7)?,
                    })
                },
            )
            .optional()?)
    }

    /// A box enrolls (see the module docs).
    pub fn enroll(
        &mut self,
        ca: &BoxCa,
        peers: &dyn HubPeers,
        policy: &Policy,
        req: &EnrollRequest,
        now: i64,
    ) -> Result<Enrolled, Refused> {
        if !valid_box_serial(&req.box_serial) {
            return Err(Refused::BadRequest(
                "the box serial is not 1-64 of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        if !valid_wg_key(req.wireguard_public_key.trim()) {
            return Err(Refused::BadRequest(
                "the WireGuard public key is not 32 bytes in base64".into(),
            ));
        }
        let (network, hub_public_key, hub_endpoint) = self.network()?;
        let tx = self.conn.transaction()?;
        let token: Option<(i64, String, Option<i64>, Option<i64>)> = tx
            .query_row(
                "SELECT serial, facility_code, token_expires_at, token_used_at FROM media WHERE token_sha256 = ?1",
                [token_hash(&req.token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((medium, code, expires, used)) = token else {
            return Err(Refused::Forbidden(
                "the enrollment token is not known".into(),
            ));
        };
        if used.is_some() {
            return Err(Refused::Forbidden(
                "the enrollment token was used already: a token enrolls one box once".into(),
            ));
        }
        if expires.is_none_or(|e| now >= e) {
            return Err(Refused::Forbidden(format!(
                "the enrollment token expired (medium serial {medium}): ask the operator for a new medium"
            )));
        }
        if code != req.facility_code {
            return Err(Refused::Forbidden(
                "the enrollment token is for another clinic".into(),
            ));
        }
        let (address, revoked): (String, Option<i64>) = tx.query_row(
            "SELECT tunnel_address, revoked_at FROM clinics WHERE facility_code = ?1",
            [&code],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if revoked.is_some() {
            return Err(Refused::Forbidden(format!("clinic {code} is revoked")));
        }
        let previous: Option<String> = tx
            .query_row(
                "SELECT wireguard_public_key FROM boxes WHERE facility_code = ?1",
                [&code],
                |r| r.get(0),
            )
            .optional()?;
        let who = identity(&code, &req.box_serial);
        let issued = ca
            .issue(&req.csr_pem, &who, &network, now, policy.lifetime)
            .map_err(Refused::BadRequest)?;
        let key = req.wireguard_public_key.trim();
        peers
            .set(key, tunnel_ip(&address)?, previous.as_deref())
            .map_err(Refused::Internal)?;
        tx.execute(
            "UPDATE media SET token_used_at = ?1 WHERE serial = ?2",
            params![now, medium],
        )?;
        tx.execute(
            "INSERT INTO boxes (facility_code, box_serial, wireguard_public_key, cert_serial, not_after, enrolled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (facility_code) DO UPDATE SET box_serial = excluded.box_serial,
               wireguard_public_key = excluded.wireguard_public_key, cert_serial = excluded.cert_serial,
               not_after = excluded.not_after, enrolled_at = excluded.enrolled_at,
               renewed_at = NULL, revoked_at = NULL",
            params![code, req.box_serial, key, issued.serial, issued.not_after, now],
        )?;
        tx.commit()?;
        Ok(answer(
            ca,
            policy,
            issued,
            who,
            TunnelSettings {
                address,
                hub_public_key,
                hub_endpoint,
            },
        ))
    }

    /// An enrolled box renews its certificate. `presented` is the serial (hex) of the
    /// client certificate the TLS layer verified against the box-identity CA; `identity`
    /// its CN. Refused unless it is the clinic's current certificate, unexpired and not
    /// revoked.
    pub fn renew(
        &mut self,
        ca: &BoxCa,
        policy: &Policy,
        presented_serial: &str,
        presented_identity: &str,
        req: &RenewRequest,
        now: i64,
    ) -> Result<Enrolled, Refused> {
        let (network, hub_public_key, hub_endpoint) = self.network()?;
        let tx = self.conn.transaction()?;
        let (code, who, address) = presented(&tx, presented_serial, presented_identity, now)?;
        let issued = ca
            .issue(&req.csr_pem, &who, &network, now, policy.lifetime)
            .map_err(Refused::BadRequest)?;
        tx.execute(
            "UPDATE boxes SET cert_serial = ?1, not_after = ?2, renewed_at = ?3 WHERE facility_code = ?4",
            params![issued.serial, issued.not_after, now, code],
        )?;
        tx.commit()?;
        Ok(answer(
            ca,
            policy,
            issued,
            who,
            TunnelSettings {
                address,
                hub_public_key,
                hub_endpoint,
            },
        ))
    }

    /// An enrolled box asks for its clinic console's server certificate, presenting its
    /// current client certificate as for [`Operator::renew`] (the same checks). The
    /// certificate names the console's address in the network's config for the clinic
    /// ([`Operator::console_addresses`]), lives as long as the box's, and is issued by the
    /// box-identity CA for server authentication only.
    pub fn console_certificate(
        &mut self,
        ca: &BoxCa,
        policy: &Policy,
        presented_serial: &str,
        presented_identity: &str,
        req: &ConsoleRequest,
        now: i64,
    ) -> Result<ConsoleIssued, Refused> {
        let (network, _, _) = self.network()?;
        let (code, who, _) = presented(&self.conn, presented_serial, presented_identity, now)?;
        let addresses = self.console_addresses(&code).map_err(|e| match e {
            ProvisionError::Invalid(why) | ProvisionError::Config(why) => Refused::Forbidden(why),
            other => Refused::Internal(other.to_string()),
        })?;
        let issued = ca
            .issue_console(
                &req.csr_pem,
                &who,
                &network,
                &addresses,
                now,
                policy.lifetime,
            )
            .map_err(Refused::BadRequest)?;
        Ok(ConsoleIssued {
            certificate_pem: issued.pem,
            box_ca_pem: ca.cert_pem().to_owned(),
            not_after: issued.not_after,
            addresses,
        })
    }

    /// Revokes a clinic's box: its WireGuard peer leaves the hub, its certificate is no
    /// longer renewed, and no new medium is written for the clinic. The box record, if any.
    pub fn revoke(
        &mut self,
        facility_code: &str,
        peers: &dyn HubPeers,
        now: i64,
    ) -> Result<Option<BoxRecord>, ProvisionError> {
        self.clinic(facility_code)?;
        let record = self.enrolled_box(facility_code)?;
        if let Some(b) = &record {
            peers
                .remove(&b.wireguard_public_key)
                .map_err(ProvisionError::Invalid)?;
        }
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE clinics SET revoked_at = coalesce(revoked_at, ?1) WHERE facility_code = ?2",
            params![now, facility_code],
        )?;
        tx.execute(
            "UPDATE boxes SET revoked_at = coalesce(revoked_at, ?1) WHERE facility_code = ?2",
            params![now, facility_code],
        )?;
        tx.commit()?;
        self.enrolled_box(facility_code)
    }
}
