//! The box-identity CA: it issues each enrolled box a short-lived client certificate
//! (identity = 医療機関コード + box serial, [`tsunagi_medium::enroll::identity`]) from the
//! box's own CSR, so that the box's TLS key never leaves it. Made by `init` (ECDSA P-256,
//! ten years), or an existing one used by reference.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

use crate::ProvisionError;

/// How long a box's certificate is valid (issue 16: 30 days; renewed before it ends).
pub const BOX_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// How long a CA made by `init` is valid.
const CA_LIFETIME_SECS: i64 = 10 * 365 * 86_400;
/// How far back a certificate's validity starts, for boxes whose clock is a little behind.
const BACKDATE_SECS: i64 = 3_600;

fn at(unix: i64) -> Result<time::OffsetDateTime, ProvisionError> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|_| ProvisionError::Invalid(format!("time {unix} is out of range")))
}

fn random_serial() -> Result<SerialNumber, ProvisionError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ProvisionError::Random)?;
    // Positive, never zero-led.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A new CA for network `name`: (certificate PEM, key PEM).
pub fn make(name: &str, now: i64) -> Result<(String, String), ProvisionError> {
    let bad = |e: rcgen::Error| ProvisionError::Invalid(format!("cannot make the box CA: {e}"));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(bad)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, name);
    dn.push(DnType::CommonName, format!("{name} box identity CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = at(now - BACKDATE_SECS)?;
    params.not_after = at(now + CA_LIFETIME_SECS)?;
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(bad)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The CA, loaded to issue.
pub struct BoxCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for BoxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoxCa").finish_non_exhaustive()
    }
}

/// A certificate issued to a box.
#[derive(Debug, Clone)]
pub struct Issued {
    pub pem: String,
    /// The serial, hex.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl BoxCa {
    /// Loads the CA's certificate and key (PEM files).
    pub fn load(cert: &Path, key: &Path) -> Result<BoxCa, ProvisionError> {
        let cert_pem = std::fs::read_to_string(cert).map_err(crate::io(cert))?;
        let key_pem = std::fs::read_to_string(key).map_err(crate::io(key))?;
        let bad = |what: &Path, e: rcgen::Error| {
            ProvisionError::Invalid(format!("the box CA {}: {e}", what.display()))
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(key, e))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(cert, e))?;
        Ok(BoxCa { cert_pem, issuer })
    }

    /// The CA's certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A client certificate for `identity` (the subject's CN; organisation `network`) on
    /// the public key of `csr_pem`, valid from an hour before `now` for `lifetime`
    /// ([`BOX_CERT_LIFETIME`] unless the operator says otherwise). Only the key is taken
    /// from the CSR (its signature checked): its subject, names and extensions are ignored.
    pub fn issue(
        &self,
        csr_pem: &str,
        identity: &str,
        network: &str,
        now: i64,
        lifetime: std::time::Duration,
    ) -> Result<Issued, String> {
        self.sign(
            csr_pem,
            identity,
            network,
            (now, lifetime),
            ExtendedKeyUsagePurpose::ClientAuth,
            &[],
        )
    }

    /// A server certificate for a box's clinic console: CN `IDENTITY console`, the
    /// subject alternative names `addresses` (the caller decided them; nothing is taken
    /// from the CSR but its key), server authentication only.
    pub fn issue_console(
        &self,
        csr_pem: &str,
        identity: &str,
        network: &str,
        addresses: &[std::net::IpAddr],
        now: i64,
        lifetime: std::time::Duration,
    ) -> Result<Issued, String> {
        self.sign(
            csr_pem,
            &format!("{identity} console"),
            network,
            (now, lifetime),
            ExtendedKeyUsagePurpose::ServerAuth,
            addresses,
        )
    }

    fn sign(
        &self,
        csr_pem: &str,
        common_name: &str,
        network: &str,
        (now, lifetime): (i64, std::time::Duration),
        usage: ExtendedKeyUsagePurpose,
        addresses: &[std::net::IpAddr],
    ) -> Result<Issued, String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("the certificate request cannot be used: {e}"))?;
        if !matches!(
            csr.public_key.algorithm(),
            a if *a == rcgen::PKCS_ECDSA_P256_SHA256
                || *a == rcgen::PKCS_ECDSA_P384_SHA384
                || *a == rcgen::PKCS_ED25519
        ) {
            return Err("the certificate request's key is not ECDSA P-256/P-384 or Ed25519".into());
        }
        let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
        let not_after = now.saturating_add(lifetime);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, network);
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.subject_alt_names = addresses
            .iter()
            .map(|ip| rcgen::SanType::IpAddress(*ip))
            .collect();
        params.use_authority_key_identifier_extension = true;
        params.not_before = at(now - BACKDATE_SECS).map_err(|e| e.to_string())?;
        params.not_after = at(not_after).map_err(|e| e.to_string())?;
        let serial = random_serial().map_err(|e| e.to_string())?;
        let hex: String = serial
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params.serial_number = Some(serial);
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| format!("cannot issue the certificate: {e}"))?;
        Ok(Issued {
            pem: cert.pem(),
            serial: hex,
            not_after,
        })
    }
}
