//! The clinic console's one-time setup code (issue 19), with which the first administrator
//! registers: made by `tsunagi console setup-code` on the box, or by the operator's
//! `tsunagi-provision medium` for the provisioning sheet, whose medium carries only its
//! hash ([`crate::ConsoleSetup`]). One format and one hash for both.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// Why a code could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SetupCodeError {
    #[error("the system's random source failed")]
    Random,
    #[error("hashing the setup code failed: {0}")]
    Hash(String),
}

fn random(n: usize) -> Result<Vec<u8>, SetupCodeError> {
    let mut bytes = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| SetupCodeError::Random)?;
    Ok(bytes)
}

/// A setup code as typed: upper case, without the dashes and spaces.
pub fn normalize(code: &str) -> String {
    code.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// The Argon2id hash (PHC string; version 0x13, the crate's defaults: 19 MiB, 2 passes,
/// OWASP's minimum) of a code's normalized form.
pub fn hash(code: &str) -> Result<String, SetupCodeError> {
    let salt =
        SaltString::encode_b64(&random(16)?).map_err(|e| SetupCodeError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(normalize(code).as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| SetupCodeError::Hash(e.to_string()))
}

/// Whether `code` (as typed) is the one `phc` is the hash of.
pub fn verify(code: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(normalize(code).as_bytes(), &h)
            .is_ok()
    })
}

/// A new code, `XXXX-XXXX-XXXX-XXXX` (80 random bits in base32: read aloud or typed), and
/// its [`hash`].
pub fn generate() -> Result<(String, String), SetupCodeError> {
    let raw = base32::encode(base32::Alphabet::Rfc4648 { padding: false }, &random(10)?);
    let code = raw
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-");
    let hash = hash(&code)?;
    Ok((code, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_verifies_as_typed_and_nothing_else_does() {
        let (code, phc) = generate().unwrap();
        assert_eq!(code.len(), 19, "{code}");
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        assert!(!phc.contains(&normalize(&code)));
        assert!(verify(&code, &phc));
        assert!(verify(&code.to_lowercase().replace('-', " "), &phc));
        assert!(!verify("AAAA-AAAA-AAAA-AAAA", &phc));
        assert!(!verify(&code, "not a hash"));
    }
}
