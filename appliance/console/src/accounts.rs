//! The console's local staff accounts, their sessions and the one-time setup code
//! (`console.db`, in the service's state directory).
//!
//! - A password is kept only as an Argon2id hash (PHC string, a salt of its own).
//! - Each account has a TOTP secret (RFC 6238: SHA-1, 6 digits, 30 s steps, one step of
//!   drift either way); a code is accepted once (its step must be newer than the last one
//!   used), so a code seen over a shoulder cannot be used again.
//! - After `lockout_after` failed logins in a row the account is locked for `lockout_for`;
//!   a login to a locked account fails even with the right password and code.
//! - A session is a random token the browser holds in a cookie; only its SHA-256 is kept.
//!   It ends at logout, or once unused for `idle_timeout`.
//! - The first administrator is made with a one-time setup code (only its hash is kept),
//!   which is then gone.
//!
//! Every function takes the time (Unix seconds) so the rules are tested without waiting.

use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use ring::rand::SecureRandom as _;
use rusqlite::{Connection, OptionalExtension as _, params};
use tsunagi_state::{Durability, Migration, StateError};

use crate::lang::{en, t};

/// The schema of `console.db`.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    sql: "CREATE TABLE account (
              name TEXT PRIMARY KEY,
              role TEXT NOT NULL CHECK (role IN ('desk', 'physician', 'admin')),
              password TEXT NOT NULL,
              totp_secret BLOB NOT NULL,
              failures INTEGER NOT NULL DEFAULT 0,
              locked_until INTEGER NOT NULL DEFAULT 0,
              last_step INTEGER NOT NULL DEFAULT 0,
              created_at INTEGER NOT NULL
          );
          CREATE TABLE session (
              token_sha256 BLOB PRIMARY KEY,
              account TEXT NOT NULL REFERENCES account (name) ON DELETE CASCADE,
              csrf TEXT NOT NULL,
              created_at INTEGER NOT NULL,
              last_seen INTEGER NOT NULL
          );
          CREATE TABLE setup_code (
              id INTEGER PRIMARY KEY CHECK (id = 1),
              code_hash TEXT NOT NULL,
              expires_at INTEGER NOT NULL
          );",
}];

/// The TOTP step (RFC 6238's X), in seconds.
pub const TOTP_STEP: u64 = 30;
/// The TOTP code's digits.
pub const TOTP_DIGITS: usize = 6;
/// The length of a TOTP secret, in bytes (160 bits, RFC 4226's recommendation).
pub const TOTP_SECRET_LEN: usize = 20;
/// The shortest password an account may have.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// An account name: 1 to 32 of `a-z0-9._-`.
const MAX_NAME: usize = 32;

/// A staff role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// 事務: the front desk.
    Desk,
    /// 医師: a physician.
    Physician,
    /// 管理者: the clinic's administrator.
    Admin,
}

impl Role {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Desk => "desk",
            Role::Physician => "physician",
            Role::Admin => "admin",
        }
    }

    /// As the console shows it.
    pub fn japanese(self) -> &'static str {
        match self {
            Role::Desk => "事務",
            Role::Physician => "医師",
            Role::Admin => "管理者",
        }
    }

    /// As the console shows it, in the language of the request.
    pub fn words(self) -> &'static str {
        match self {
            Role::Desk => t("事務", "Desk"),
            Role::Physician => t("医師", "Physician"),
            Role::Admin => t("管理者", "Administrator"),
        }
    }

    /// Every role, as the administrator picks one.
    pub const ALL: [Role; 3] = [Role::Desk, Role::Physician, Role::Admin];

    /// A role by its stored name.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "desk" => Some(Role::Desk),
            "physician" => Some(Role::Physician),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The lockout rules (`[console]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub lockout_after: u32,
    pub lockout_for_secs: i64,
    pub idle_timeout_secs: i64,
}

/// Why something cannot be done with the accounts.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path}: {what}")]
    Db {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("no random numbers from the system")]
    Random,
    #[error("cannot hash: {0}")]
    Hash(String),
}

/// Why a login or the setup was refused; what the page may say, nothing more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The name, the password or the code is wrong (which one is not said).
    #[error("the name, the password or the code is wrong")]
    Credentials,
    /// The account is locked until then (Unix seconds); `now` when this failure locked it.
    #[error("the account is locked until {until}")]
    Locked { until: i64, now: bool },
    #[error("the setup code is wrong, used or expired")]
    SetupCode,
    #[error("{0}")]
    Invalid(String),
}

/// A logged-in session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub account: String,
    pub role: Role,
    /// The form token every state-changing request of this session must carry.
    pub csrf: String,
}

/// A new session: the token for the cookie, and the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    pub token: String,
    pub session: Session,
}

/// `console.db`.
pub struct Accounts {
    conn: Connection,
    path: PathBuf,
}

/// `n` random bytes from the system.
pub fn random(n: usize) -> Result<Vec<u8>, AccountsError> {
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AccountsError::Random)?;
    Ok(bytes)
}

/// A random token for a cookie or a form (256 bits, base64url).
pub fn random_token() -> Result<String, AccountsError> {
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random(32)?))
}

fn sha256(text: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .to_vec()
}

/// Compares in constant time.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn argon2() -> argon2::Argon2<'static> {
    // Argon2id, version 0x13, the crate's defaults (19 MiB, 2 passes): OWASP's minimum.
    argon2::Argon2::default()
}

/// The Argon2id hash of `secret` (PHC string).
pub fn hash_secret(secret: &str) -> Result<String, AccountsError> {
    let salt =
        SaltString::encode_b64(&random(16)?).map_err(|e| AccountsError::Hash(e.to_string()))?;
    argon2()
        .hash_password(secret.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountsError::Hash(e.to_string()))
}

fn verify_secret(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| argon2().verify_password(secret.as_bytes(), &h).is_ok())
}

/// A hash to verify against when the account does not exist, so that a wrong name takes
/// as long as a wrong password.
fn decoy() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_secret("not an account").unwrap_or_default())
}

/// The TOTP code of `secret` at step `step`.
pub fn totp_code(secret: &[u8], step: u64) -> String {
    let totp = totp_rs::TOTP::new_unchecked(
        totp_rs::Algorithm::SHA1,
        TOTP_DIGITS,
        0,
        TOTP_STEP,
        secret.to_vec(),
    );
    totp.generate(step * TOTP_STEP)
}

/// The step of `code` for `secret` at `now`, if it is the code of this step or of the one
/// before or after.
pub fn totp_step(secret: &[u8], code: &str, now: i64) -> Option<u64> {
    let code = code.trim();
    if code.len() != TOTP_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = u64::try_from(now).ok()? / TOTP_STEP;
    [current.saturating_sub(1), current, current + 1]
        .into_iter()
        .find(|step| same(totp_code(secret, *step).as_bytes(), code.as_bytes()))
}

/// The secret as an authenticator app takes it by hand (RFC 4648 base32, no padding).
pub fn totp_base32(secret: &[u8]) -> String {
    totp_rs::Secret::Raw(secret.to_vec())
        .to_encoded()
        .to_string()
        .trim_end_matches('=')
        .to_owned()
}

/// A secret from its base32 form ([`totp_base32`]'s, or as typed: spaces and case
/// ignored); `None` when it is not base32.
pub fn totp_secret(base32: &str) -> Option<Vec<u8>> {
    let text: String = base32
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    totp_rs::Secret::Encoded(text).to_bytes().ok()
}

/// The `otpauth://` URI of an account's secret (for a QR code or a link).
pub fn otpauth_uri(secret: &[u8], issuer: &str, account: &str) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={TOTP_DIGITS}&period={TOTP_STEP}",
        enc(issuer),
        enc(account),
        totp_base32(secret),
        enc(issuer)
    )
}

/// Checks an account name.
pub fn valid_name(name: &str) -> Result<(), Refused> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(Refused::Invalid(if en() {
            format!(
                "An account name is 1 to {MAX_NAME} characters: lowercase letters, digits and \"._-\""
            )
        } else {
            format!("アカウント名は英小文字・数字・「._-」の1〜{MAX_NAME}文字です")
        }));
    }
    Ok(())
}

/// Checks a new password.
pub fn valid_password(password: &str) -> Result<(), Refused> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(Refused::Invalid(if en() {
            format!("A password needs at least {MIN_PASSWORD_CHARS} characters")
        } else {
            format!("パスワードは{MIN_PASSWORD_CHARS}文字以上にしてください")
        }));
    }
    Ok(())
}

impl Accounts {
    /// Opens (or makes) `console.db` at `path`.
    pub fn open(path: &Path) -> Result<Accounts, AccountsError> {
        let conn = tsunagi_state::open(path, Durability::Acknowledging, MIGRATIONS)?;
        conn.execute_batch("PRAGMA foreign_keys = ON")
            .map_err(|source| AccountsError::Db {
                path: path.to_owned(),
                what: "foreign keys",
                source,
            })?;
        Ok(Accounts {
            conn,
            path: path.to_owned(),
        })
    }

    fn db(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> AccountsError + '_ {
        move |source| AccountsError::Db {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// How many accounts there are.
    pub fn count(&self) -> Result<u64, AccountsError> {
        self.conn
            .query_row("SELECT count(*) FROM account", [], |r| r.get::<_, i64>(0))
            .map(|n| u64::try_from(n).unwrap_or(0))
            .map_err(self.db("count accounts"))
    }

    /// Whether a setup code waits (unexpired) at `now`.
    pub fn setup_pending(&self, now: i64) -> Result<bool, AccountsError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM setup_code WHERE expires_at > ?1",
                [now],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(self.db("read the setup code"))
    }

    /// Makes a new one-time setup code, valid until `expires_at`, replacing any earlier
    /// one, and returns it (`XXXX-XXXX-XXXX-XXXX`, base32: read aloud or typed).
    pub fn new_setup_code(&self, expires_at: i64) -> Result<String, AccountsError> {
        let (code, hash) = tsunagi_medium::setup_code::generate()
            .map_err(|e| AccountsError::Hash(e.to_string()))?;
        self.keep_setup_code(&hash, expires_at)?;
        Ok(code)
    }

    /// Keeps the hash of a setup code made elsewhere (the operator's, for the provisioning
    /// sheet, whose medium carries only the hash), valid until `expires_at`, replacing any
    /// earlier one. Only while the console has no account: returns whether it was kept.
    pub fn install_setup_code(&self, hash: &str, expires_at: i64) -> Result<bool, AccountsError> {
        if self.count()? > 0 {
            return Ok(false);
        }
        if !hash.starts_with("$argon2id$") || PasswordHash::new(hash).is_err() {
            return Err(AccountsError::Hash("not an Argon2id hash".into()));
        }
        self.keep_setup_code(hash, expires_at)?;
        Ok(true)
    }

    fn keep_setup_code(&self, hash: &str, expires_at: i64) -> Result<(), AccountsError> {
        self.conn
            .execute(
                "INSERT INTO setup_code (id, code_hash, expires_at) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET code_hash = ?1, expires_at = ?2",
                params![hash, expires_at],
            )
            .map_err(self.db("write the setup code"))?;
        Ok(())
    }

    /// Makes the first administrator with the setup code: `name`, `password`, and the TOTP
    /// secret the page showed, proven by a `code` of it. The setup code is then gone.
    pub fn setup_admin(
        &mut self,
        setup_code: &str,
        name: &str,
        password: &str,
        secret: &[u8],
        code: &str,
        now: i64,
    ) -> Result<Result<(), Refused>, AccountsError> {
        let stored: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT code_hash, expires_at FROM setup_code WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.db("read the setup code"))?;
        let Some((hash, expires_at)) = stored else {
            return Ok(Err(Refused::SetupCode));
        };
        if expires_at <= now || !tsunagi_medium::setup_code::verify(setup_code, &hash) {
            return Ok(Err(Refused::SetupCode));
        }
        if let Err(r) = valid_name(name).and_then(|()| valid_password(password)) {
            return Ok(Err(r));
        }
        if secret.len() != TOTP_SECRET_LEN {
            return Ok(Err(Refused::Invalid(
                t(
                    "二要素認証の鍵が正しくありません",
                    "The two-factor key is not valid",
                )
                .into(),
            )));
        }
        let Some(step) = totp_step(secret, code, now) else {
            return Ok(Err(Refused::Invalid(
                t(
                    "認証アプリのコードが違います。もう一度入力してください",
                    "The code from the authenticator app is wrong. Please enter it again",
                )
                .into(),
            )));
        };
        let hash = hash_secret(password)?;
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|source| AccountsError::Db {
                path: path.clone(),
                what: "begin",
                source,
            })?;
        let taken: i64 = tx
            .query_row(
                "SELECT count(*) FROM account WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .map_err(|source| AccountsError::Db {
                path: path.clone(),
                what: "read accounts",
                source,
            })?;
        if taken > 0 {
            return Ok(Err(Refused::Invalid(
                t(
                    "そのアカウント名は使われています",
                    "That account name is already in use",
                )
                .into(),
            )));
        }
        let write = |source| AccountsError::Db {
            path: path.clone(),
            what: "make the administrator",
            source,
        };
        tx.execute(
            "INSERT INTO account (name, role, password, totp_secret, last_step, created_at)
             VALUES (?1, 'admin', ?2, ?3, ?4, ?5)",
            params![
                name,
                hash,
                secret,
                i64::try_from(step).unwrap_or(i64::MAX),
                now
            ],
        )
        .map_err(write)?;
        tx.execute("DELETE FROM setup_code", []).map_err(write)?;
        tx.commit().map_err(write)?;
        Ok(Ok(()))
    }

    /// A login with `name`, `password` and a TOTP `code` at `now`: a new session, or why
    /// not (a failure counts towards the lockout).
    pub fn login(
        &mut self,
        name: &str,
        password: &str,
        code: &str,
        now: i64,
        policy: &Policy,
    ) -> Result<Result<NewSession, Refused>, AccountsError> {
        type Row = (String, String, Vec<u8>, u32, i64, i64);
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT role, password, totp_secret, failures, locked_until, last_step
                 FROM account WHERE name = ?1",
                [name],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()
            .map_err(self.db("read the account"))?;
        let Some((role, phc, secret, failures, locked_until, last_step)) = row else {
            // As long as a wrong password takes.
            let _ = verify_secret(password, decoy());
            return Ok(Err(Refused::Credentials));
        };
        if locked_until > now {
            return Ok(Err(Refused::Locked {
                until: locked_until,
                now: false,
            }));
        }
        let password_ok = verify_secret(password, &phc);
        let step = totp_step(&secret, code, now)
            .filter(|s| i64::try_from(*s).is_ok_and(|s| s > last_step));
        let (Some(step), true, Some(role)) = (step, password_ok, Role::parse(&role)) else {
            let failures = failures + 1;
            if failures >= policy.lockout_after {
                let until = now + policy.lockout_for_secs;
                self.conn
                    .execute(
                        "UPDATE account SET failures = 0, locked_until = ?2 WHERE name = ?1",
                        params![name, until],
                    )
                    .map_err(self.db("lock the account"))?;
                return Ok(Err(Refused::Locked { until, now: true }));
            }
            self.conn
                .execute(
                    "UPDATE account SET failures = ?2 WHERE name = ?1",
                    params![name, failures],
                )
                .map_err(self.db("count a failed login"))?;
            return Ok(Err(Refused::Credentials));
        };
        let token = random_token()?;
        let csrf = random_token()?;
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|source| AccountsError::Db {
                path: path.clone(),
                what: "begin",
                source,
            })?;
        let write = |source| AccountsError::Db {
            path: path.clone(),
            what: "start a session",
            source,
        };
        tx.execute(
            "UPDATE account SET failures = 0, locked_until = 0, last_step = ?2 WHERE name = ?1",
            params![name, i64::try_from(step).unwrap_or(i64::MAX)],
        )
        .map_err(write)?;
        // Sessions long idle go with each login.
        tx.execute(
            "DELETE FROM session WHERE last_seen <= ?1",
            [now - policy.idle_timeout_secs],
        )
        .map_err(write)?;
        tx.execute(
            "INSERT INTO session (token_sha256, account, csrf, created_at, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![sha256(&token), name, csrf, now],
        )
        .map_err(write)?;
        tx.commit().map_err(write)?;
        Ok(Ok(NewSession {
            token,
            session: Session {
                account: name.to_owned(),
                role,
                csrf,
            },
        }))
    }

    /// The session of cookie `token` at `now`, which counts as a use; `None` for an
    /// unknown, ended or idle one (an idle one ends here).
    pub fn session(
        &self,
        token: &str,
        now: i64,
        policy: &Policy,
    ) -> Result<Option<Session>, AccountsError> {
        let hash = sha256(token);
        let row: Option<(String, String, String, i64)> = self
            .conn
            .query_row(
                "SELECT s.account, a.role, s.csrf, s.last_seen
                 FROM session s JOIN account a ON a.name = s.account
                 WHERE s.token_sha256 = ?1",
                [&hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(self.db("read the session"))?;
        let Some((account, role, csrf, last_seen)) = row else {
            return Ok(None);
        };
        if last_seen + policy.idle_timeout_secs <= now {
            self.conn
                .execute("DELETE FROM session WHERE token_sha256 = ?1", [&hash])
                .map_err(self.db("end an idle session"))?;
            return Ok(None);
        }
        self.conn
            .execute(
                "UPDATE session SET last_seen = ?2 WHERE token_sha256 = ?1",
                params![hash, now],
            )
            .map_err(self.db("use the session"))?;
        Ok(Role::parse(&role).map(|role| Session {
            account,
            role,
            csrf,
        }))
    }

    /// Ends the session of cookie `token`; whose it was.
    pub fn logout(&self, token: &str) -> Result<Option<String>, AccountsError> {
        let hash = sha256(token);
        let account: Option<String> = self
            .conn
            .query_row(
                "DELETE FROM session WHERE token_sha256 = ?1 RETURNING account",
                [&hash],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db("end the session"))?;
        Ok(account)
    }
}

/// An account as the administrator's list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    pub name: String,
    pub role: Role,
    /// Locked until then (Unix seconds), if locked now.
    pub locked_until: Option<i64>,
    pub created_at: i64,
}

impl Accounts {
    /// Every account, by name.
    pub fn list(&self, now: i64) -> Result<Vec<AccountInfo>, AccountsError> {
        let mut statement = self
            .conn
            .prepare("SELECT name, role, locked_until, created_at FROM account ORDER BY name")
            .map_err(self.db("list accounts"))?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(self.db("list accounts"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, role, locked_until, created_at)| {
                Some(AccountInfo {
                    name,
                    role: Role::parse(&role)?,
                    locked_until: (locked_until > now).then_some(locked_until),
                    created_at,
                })
            })
            .collect())
    }

    /// Adds an account with `role`, an initial `password` and the TOTP `secret` the
    /// administrator hands to its owner.
    pub fn add(
        &self,
        name: &str,
        role: Role,
        password: &str,
        secret: &[u8],
        now: i64,
    ) -> Result<Result<(), Refused>, AccountsError> {
        if let Err(r) = valid_name(name).and_then(|()| valid_password(password)) {
            return Ok(Err(r));
        }
        if secret.len() != TOTP_SECRET_LEN {
            return Ok(Err(Refused::Invalid(
                t(
                    "二要素認証の鍵が正しくありません",
                    "The two-factor key is not valid",
                )
                .into(),
            )));
        }
        let hash = hash_secret(password)?;
        let added = self
            .conn
            .execute(
                "INSERT INTO account (name, role, password, totp_secret, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO NOTHING",
                params![name, role.as_str(), hash, secret, now],
            )
            .map_err(self.db("add an account"))?;
        Ok(if added == 1 {
            Ok(())
        } else {
            Err(Refused::Invalid(
                t(
                    "そのアカウント名は使われています",
                    "That account name is already in use",
                )
                .into(),
            ))
        })
    }

    /// The administrators but `except`.
    fn other_admins(&self, except: &str) -> Result<i64, AccountsError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM account WHERE role = 'admin' AND name != ?1",
                [except],
                |r| r.get(0),
            )
            .map_err(self.db("count administrators"))
    }

    /// Gives `name` the role `role`; its sessions end (they carried the old role). The last
    /// administrator stays one.
    pub fn set_role(&self, name: &str, role: Role) -> Result<Result<(), Refused>, AccountsError> {
        if role != Role::Admin && self.other_admins(name)? == 0 {
            return Ok(Err(Refused::Invalid(
                t(
                    "最後の管理者の役割は変えられません",
                    "The last administrator's role cannot be changed",
                )
                .into(),
            )));
        }
        let changed = self
            .conn
            .execute(
                "UPDATE account SET role = ?2 WHERE name = ?1",
                params![name, role.as_str()],
            )
            .map_err(self.db("change a role"))?;
        if changed == 0 {
            return Ok(Err(Refused::Invalid(
                t("そのアカウントはありません", "There is no such account").into(),
            )));
        }
        self.conn
            .execute("DELETE FROM session WHERE account = ?1", [name])
            .map_err(self.db("end the sessions"))?;
        Ok(Ok(()))
    }

    /// Lifts `name`'s lockout.
    pub fn unlock(&self, name: &str) -> Result<Result<(), Refused>, AccountsError> {
        let changed = self
            .conn
            .execute(
                "UPDATE account SET failures = 0, locked_until = 0 WHERE name = ?1",
                [name],
            )
            .map_err(self.db("unlock an account"))?;
        Ok(if changed == 1 {
            Ok(())
        } else {
            Err(Refused::Invalid(
                t("そのアカウントはありません", "There is no such account").into(),
            ))
        })
    }

    /// Removes `name` and its sessions; never the last administrator.
    pub fn remove(&self, name: &str) -> Result<Result<(), Refused>, AccountsError> {
        if self.other_admins(name)? == 0 {
            return Ok(Err(Refused::Invalid(
                t(
                    "最後の管理者は削除できません",
                    "The last administrator cannot be removed",
                )
                .into(),
            )));
        }
        let removed = self
            .conn
            .execute("DELETE FROM account WHERE name = ?1", [name])
            .map_err(self.db("remove an account"))?;
        Ok(if removed == 1 {
            Ok(())
        } else {
            Err(Refused::Invalid(
                t("そのアカウントはありません", "There is no such account").into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        lockout_after: 3,
        lockout_for_secs: 600,
        idle_timeout_secs: 900,
    };
    const T0: i64 = 1_800_000_000;

    fn code_at(secret: &[u8], now: i64) -> String {
        totp_code(secret, u64::try_from(now).unwrap() / TOTP_STEP)
    }

    fn admin(dir: &Path) -> (Accounts, Vec<u8>) {
        let mut a = Accounts::open(&dir.join("console.db")).unwrap();
        let setup = a.new_setup_code(T0 + 3600).unwrap();
        let secret = random(TOTP_SECRET_LEN).unwrap();
        a.setup_admin(
            &setup.to_lowercase(),
            "admin",
            "correct horse battery",
            &secret,
            &code_at(&secret, T0),
            T0,
        )
        .unwrap()
        .unwrap();
        (a, secret)
    }

    #[test]
    fn totp_matches_rfc_6238s_sha1_vectors() {
        // RFC 6238 appendix B, SHA-1, the last 6 of its 8 digits.
        let secret = b"12345678901234567890";
        for (time, code) in [
            (59u64, "287082"),
            (1_111_111_109, "081804"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
        ] {
            assert_eq!(totp_code(secret, time / TOTP_STEP), code, "at {time}");
        }
        assert_eq!(totp_base32(secret), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        let uri = otpauth_uri(secret, "tsunagi 1312345678", "admin");
        assert!(
            uri.starts_with("otpauth://totp/tsunagi%201312345678:admin?secret=GEZDG"),
            "{uri}"
        );
    }

    #[test]
    fn the_setup_code_makes_one_administrator_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Accounts::open(&dir.path().join("console.db")).unwrap();
        let secret = random(TOTP_SECRET_LEN).unwrap();
        let good = code_at(&secret, T0);
        assert_eq!(
            a.setup_admin("AAAA", "admin", "correct horse battery", &secret, &good, T0)
                .unwrap(),
            Err(Refused::SetupCode)
        );
        let setup = a.new_setup_code(T0 + 60).unwrap();
        assert!(a.setup_pending(T0).unwrap());
        assert!(!a.setup_pending(T0 + 60).unwrap());
        // Expired.
        assert_eq!(
            a.setup_admin(
                &setup,
                "admin",
                "correct horse battery",
                &secret,
                &good,
                T0 + 61
            )
            .unwrap(),
            Err(Refused::SetupCode)
        );
        assert!(matches!(
            a.setup_admin(
                &setup,
                "Admin!",
                "correct horse battery",
                &secret,
                &good,
                T0
            )
            .unwrap(),
            Err(Refused::Invalid(_))
        ));
        assert!(matches!(
            a.setup_admin(&setup, "admin", "short", &secret, &good, T0)
                .unwrap(),
            Err(Refused::Invalid(_))
        ));
        assert!(matches!(
            a.setup_admin(
                &setup,
                "admin",
                "correct horse battery",
                &secret,
                "000000",
                T0
            )
            .unwrap(),
            Err(Refused::Invalid(_))
        ));
        a.setup_admin(&setup, "admin", "correct horse battery", &secret, &good, T0)
            .unwrap()
            .unwrap();
        assert_eq!(a.count().unwrap(), 1);
        // Used: gone.
        assert_eq!(
            a.setup_admin(&setup, "other", "correct horse battery", &secret, &good, T0)
                .unwrap(),
            Err(Refused::SetupCode)
        );
        // The password is kept as an Argon2id hash only.
        let stored: String = a
            .conn
            .query_row("SELECT password FROM account", [], |r| r.get(0))
            .unwrap();
        assert!(stored.starts_with("$argon2id$"), "{stored}");
    }

    #[test]
    fn a_login_needs_the_password_and_a_fresh_code_and_failures_lock_the_account() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, secret) = admin(dir.path());
        let now = T0 + 120;
        let pw = "correct horse battery";
        // The setup's own code (an older step) cannot log in.
        assert_eq!(
            a.login("admin", pw, &code_at(&secret, T0), T0 + 10, &POLICY)
                .unwrap(),
            Err(Refused::Credentials)
        );
        let s = a
            .login("admin", pw, &code_at(&secret, now), now, &POLICY)
            .unwrap()
            .unwrap();
        assert_eq!(s.session.role, Role::Admin);
        // The same code again: refused (replay).
        assert_eq!(
            a.login("admin", pw, &code_at(&secret, now), now + 1, &POLICY)
                .unwrap(),
            Err(Refused::Credentials)
        );
        // A wrong name is as refused as a wrong password.
        assert_eq!(
            a.login("nobody", pw, &code_at(&secret, now + 30), now + 30, &POLICY)
                .unwrap(),
            Err(Refused::Credentials)
        );
        // That replay was the first failure; two more lock the account.
        let later = now + 60;
        assert_eq!(
            a.login(
                "admin",
                "wrong password!",
                &code_at(&secret, later),
                later,
                &POLICY
            )
            .unwrap(),
            Err(Refused::Credentials)
        );
        assert_eq!(
            a.login("admin", pw, "123456", later, &POLICY).unwrap(),
            Err(Refused::Locked {
                until: later + 600,
                now: true
            })
        );
        // Locked: even the right password and code fail, until it ends.
        let t = later + 90;
        assert_eq!(
            a.login("admin", pw, &code_at(&secret, t), t, &POLICY)
                .unwrap(),
            Err(Refused::Locked {
                until: later + 600,
                now: false
            })
        );
        let t = later + 601;
        assert!(
            a.login("admin", pw, &code_at(&secret, t), t, &POLICY)
                .unwrap()
                .is_ok()
        );
    }

    #[test]
    fn the_administrator_adds_changes_unlocks_and_removes_accounts_but_never_the_last_admin() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _) = admin(dir.path());
        let secret = random(TOTP_SECRET_LEN).unwrap();
        let pw = "a desk password";
        a.add("desk1", Role::Desk, pw, &secret, T0)
            .unwrap()
            .unwrap();
        assert!(matches!(
            a.add("desk1", Role::Desk, pw, &secret, T0).unwrap(),
            Err(Refused::Invalid(_))
        ));
        assert!(matches!(
            a.add("desk2", Role::Desk, "short", &secret, T0).unwrap(),
            Err(Refused::Invalid(_))
        ));
        let names: Vec<(String, Role)> = a
            .list(T0)
            .unwrap()
            .into_iter()
            .map(|i| (i.name, i.role))
            .collect();
        assert_eq!(
            names,
            [
                ("admin".to_owned(), Role::Admin),
                ("desk1".to_owned(), Role::Desk)
            ]
        );
        // The new account logs in with its own secret; a role change ends its session.
        let t = T0 + 300;
        let s = a
            .login("desk1", pw, &code_at(&secret, t), t, &POLICY)
            .unwrap()
            .unwrap();
        a.set_role("desk1", Role::Physician).unwrap().unwrap();
        assert!(a.session(&s.token, t + 1, &POLICY).unwrap().is_none());
        // The last administrator stays one, and stays.
        assert!(matches!(
            a.set_role("admin", Role::Desk).unwrap(),
            Err(Refused::Invalid(_))
        ));
        assert!(matches!(
            a.remove("admin").unwrap(),
            Err(Refused::Invalid(_))
        ));
        // A locked account is unlocked by the administrator.
        for i in 0..3 {
            let _ = a.login("desk1", "wrong password!", "000000", t + 60 + i, &POLICY);
        }
        assert!(a.list(t + 70).unwrap()[1].locked_until.is_some());
        a.unlock("desk1").unwrap().unwrap();
        assert!(a.list(t + 70).unwrap()[1].locked_until.is_none());
        let t = t + 90;
        assert!(
            a.login("desk1", pw, &code_at(&secret, t), t, &POLICY)
                .unwrap()
                .is_ok()
        );
        a.remove("desk1").unwrap().unwrap();
        assert_eq!(a.count().unwrap(), 1);
        assert!(matches!(
            a.unlock("desk1").unwrap(),
            Err(Refused::Invalid(_))
        ));
    }

    #[test]
    fn a_session_ends_at_logout_or_when_idle() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, secret) = admin(dir.path());
        let now = T0 + 120;
        let s = a
            .login(
                "admin",
                "correct horse battery",
                &code_at(&secret, now),
                now,
                &POLICY,
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            a.session(&s.token, now + 800, &POLICY).unwrap(),
            Some(s.session.clone())
        );
        // Used at +800: still alive at +1600, idle after.
        assert!(a.session(&s.token, now + 1600, &POLICY).unwrap().is_some());
        assert!(a.session(&s.token, now + 2500, &POLICY).unwrap().is_none());
        assert!(a.session(&s.token, now + 2501, &POLICY).unwrap().is_none());
        let t = now + 3000;
        let s = a
            .login(
                "admin",
                "correct horse battery",
                &code_at(&secret, t),
                t,
                &POLICY,
            )
            .unwrap()
            .unwrap();
        assert_eq!(a.logout(&s.token).unwrap().as_deref(), Some("admin"));
        assert!(a.session(&s.token, t + 1, &POLICY).unwrap().is_none());
        assert_eq!(a.logout(&s.token).unwrap(), None);
        assert!(a.session("not a token", t, &POLICY).unwrap().is_none());
    }
}
