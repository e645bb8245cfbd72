//! Validated value types ("parse, don't validate").
//!
//! Each type checks its invariant once, when it is built from a string (or number), and
//! cannot hold a bad value afterwards. Serde goes through the same constructors
//! (`#[serde(try_from = "String", into = "String")]`), so a [`crate::Config`] that
//! deserialized is made of valid values only.
//!
//! Failure reasons are lowercase, one line, and never contain a secret value.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a value was rejected: a short, lowercase, one-line reason for a human.
///
/// The reason never contains the value of a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ValueError {
    reason: String,
}

impl ValueError {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    /// The reason, as shown in `config check` output.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Quotes a non-secret value for a reason: escaped to one line and cut to a sane length.
fn quoted(value: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = value
        .chars()
        .take(MAX)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().count() > MAX {
        out.push('…');
    }
    format!("`{out}`")
}

/// Implements the string plumbing shared by the string-backed newtypes: `TryFrom<&str>`,
/// `FromStr`, `Display`, `AsRef<str>`, `as_str` and `From<T> for String`. The type itself
/// implements `TryFrom<String>`, where the check lives.
macro_rules! string_newtype {
    ($name:ident) => {
        impl $name {
            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ValueError;
            fn try_from(value: &str) -> Result<Self, ValueError> {
                Self::try_from(value.to_owned())
            }
        }

        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(value: &str) -> Result<Self, ValueError> {
                Self::try_from(value.to_owned())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// AeTitle

/// A DICOM application entity title (AE title).
///
/// 1 to 16 characters from the DICOM default character repertoire (printable ASCII,
/// 0x20–0x7E), no backslash, not all spaces. Leading and trailing spaces are not
/// significant (PS3.5 §6.2): the value is stored trimmed, and the length limit applies to
/// the trimmed value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AeTitle(String);

impl AeTitle {
    /// The longest AE title, in characters.
    pub const MAX_LEN: usize = 16;
}

impl TryFrom<String> for AeTitle {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        for c in value.chars() {
            if !c.is_ascii() {
                return Err(ValueError::new(
                    "an AE title may only contain ASCII characters (DICOM default character repertoire)",
                ));
            }
            if c.is_ascii_control() {
                return Err(ValueError::new(
                    "an AE title must not contain control characters (tab, newline, ...)",
                ));
            }
            if c == '\\' {
                return Err(ValueError::new("an AE title must not contain a backslash"));
            }
        }
        let trimmed = value.trim_matches(' ');
        if trimmed.is_empty() {
            return Err(ValueError::new(
                "an AE title must not be empty or all spaces",
            ));
        }
        // All characters are ASCII here, so bytes are characters.
        if trimmed.len() > Self::MAX_LEN {
            return Err(ValueError::new(format!(
                "an AE title is at most {} characters (got {})",
                Self::MAX_LEN,
                trimmed.len()
            )));
        }
        Ok(Self(trimmed.to_owned()))
    }
}

string_newtype!(AeTitle);

// ---------------------------------------------------------------------------------------
// FacilityCode

/// A 医療機関コード (medical institution code): exactly 10 ASCII digits.
///
/// Kept as a string: leading zeros are significant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FacilityCode(String);

impl FacilityCode {
    /// The number of digits in a 医療機関コード.
    pub const LEN: usize = 10;
}

impl TryFrom<String> for FacilityCode {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        let count = value.chars().count();
        if count != Self::LEN {
            return Err(ValueError::new(format!(
                "a 医療機関コード is exactly {} digits (got {count} characters)",
                Self::LEN
            )));
        }
        if !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValueError::new(format!(
                "a 医療機関コード is exactly {} digits (got a character that is not 0-9)",
                Self::LEN
            )));
        }
        // Structure: prefecture (01–47), point-table number (1 medical, 3 dental, 4 pharmacy),
        // then the 7-digit facility number.
        let prefecture: u8 = value[..2].parse().unwrap_or(0);
        if !(1..=47).contains(&prefecture) {
            return Err(ValueError::new(format!(
                "a 医療機関コード starts with a prefecture number 01–47 (got {})",
                &value[..2]
            )));
        }
        if !matches!(&value[2..3], "1" | "3" | "4") {
            return Err(ValueError::new(format!(
                "the 3rd digit of a 医療機関コード is the point-table number: 1 (medical), 3 (dental) or 4 (pharmacy) (got {})",
                &value[2..3]
            )));
        }
        Ok(Self(value))
    }
}

string_newtype!(FacilityCode);

// ---------------------------------------------------------------------------------------
// Oid, IssuerName

/// An ISO object identifier in dotted decimal form (`1.2.392.100495`): at least two arcs,
/// digits and dots, no arc with a leading zero, at most 64 characters (it travels as a DICOM
/// UI value, and as `urn:oid:` in FHIR).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Oid(String);

impl Oid {
    /// The longest OID (a DICOM UI value).
    pub const MAX_LEN: usize = 64;
}

impl TryFrom<String> for Oid {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        if value.len() > Self::MAX_LEN {
            return Err(ValueError::new(format!(
                "an OID is at most {} characters (got {})",
                Self::MAX_LEN,
                value.len()
            )));
        }
        let arcs: Vec<&str> = value.split('.').collect();
        if arcs.len() < 2 {
            return Err(ValueError::new(format!(
                "an OID has at least two arcs separated by dots, like 1.2.392 (got {})",
                quoted(&value)
            )));
        }
        for arc in arcs {
            if arc.is_empty() || !arc.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ValueError::new(format!(
                    "an OID is digits separated by single dots (got {})",
                    quoted(&value)
                )));
            }
            if arc.len() > 1 && arc.starts_with('0') {
                return Err(ValueError::new(format!(
                    "an OID arc has no leading zero (got {})",
                    quoted(&value)
                )));
            }
        }
        Ok(Self(value))
    }
}

string_newtype!(Oid);

/// The name of an assigning authority as DICOM writes it in Issuer of Patient ID (LO):
/// 1–64 characters of the default repertoire (printable ASCII), no backslash, no leading or
/// trailing space.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IssuerName(String);

impl IssuerName {
    /// The longest issuer name (a DICOM LO value).
    pub const MAX_LEN: usize = 64;
}

impl TryFrom<String> for IssuerName {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(ValueError::new(format!(
                "an issuer name is 1 to {} characters (got {})",
                Self::MAX_LEN,
                value.chars().count()
            )));
        }
        if !value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'\\')
        {
            return Err(ValueError::new(
                "an issuer name may only contain printable ASCII characters, without a backslash",
            ));
        }
        if value.starts_with(' ') || value.ends_with(' ') {
            return Err(ValueError::new(
                "an issuer name has no leading or trailing space",
            ));
        }
        Ok(Self(value))
    }
}

string_newtype!(IssuerName);

// ---------------------------------------------------------------------------------------
// ServiceName

/// The name of a service managed by the supervisor: `[a-z][a-z0-9-]{0,15}`, not ending in
/// `-`.
///
/// Drills use it as `drill-NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl ServiceName {
    /// The longest service name, in characters.
    pub const MAX_LEN: usize = 16;
}

impl TryFrom<String> for ServiceName {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        let count = value.chars().count();
        if count == 0 || count > Self::MAX_LEN {
            return Err(ValueError::new(format!(
                "a service name is 1 to {} characters (got {count})",
                Self::MAX_LEN
            )));
        }
        if !value.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(ValueError::new(format!(
                "service name {} must start with a lowercase letter a-z",
                quoted(&value)
            )));
        }
        if !value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(ValueError::new(format!(
                "service name {} may only contain a-z, 0-9 and '-'",
                quoted(&value)
            )));
        }
        if value.ends_with('-') {
            return Err(ValueError::new(format!(
                "service name {} must not end with '-'",
                quoted(&value)
            )));
        }
        Ok(Self(value))
    }
}

string_newtype!(ServiceName);

// ---------------------------------------------------------------------------------------
// SmbName

/// A name in an SMB mount: a share, a user or a domain. 1 to 64 characters, printable,
/// none of `, = / \ " : ; * ? < > |` (the kernel client's option list is comma-separated,
/// and Windows forbids the rest in share and account names), no leading or trailing space.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SmbName(String);

impl SmbName {
    /// The longest name, in characters.
    pub const MAX_LEN: usize = 64;
}

impl TryFrom<String> for SmbName {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        let count = value.chars().count();
        if count == 0 || count > Self::MAX_LEN {
            return Err(ValueError::new(format!(
                "an SMB share, user or domain name is 1 to {} characters (got {count})",
                Self::MAX_LEN
            )));
        }
        if let Some(c) = value
            .chars()
            .find(|c| c.is_control() || ",=/\\\":;*?<>|".contains(*c))
        {
            return Err(ValueError::new(format!(
                "SMB name {} must not contain {}",
                quoted(&value),
                quoted(&c.to_string())
            )));
        }
        if value.trim() != value {
            return Err(ValueError::new(format!(
                "SMB name {} must not start or end with a space",
                quoted(&value)
            )));
        }
        Ok(Self(value))
    }
}

string_newtype!(SmbName);

// ---------------------------------------------------------------------------------------
// AbsPath

/// An absolute filesystem path: valid UTF-8, not empty, no NUL byte, no `..` component.
///
/// Reasons never contain the path itself (so [`SecretFile`] can reuse them safely).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AbsPath(PathBuf);

impl AbsPath {
    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// The path as a string (always valid UTF-8).
    pub fn as_str(&self) -> &str {
        // Only built from a `String` (see `TryFrom` impls), so this is always `Some`.
        self.0.to_str().unwrap_or_default()
    }
}

impl TryFrom<String> for AbsPath {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        if value.is_empty() {
            return Err(ValueError::new("a path must not be empty"));
        }
        if value.contains('\0') {
            return Err(ValueError::new("a path must not contain a NUL byte"));
        }
        if !value.starts_with('/') {
            return Err(ValueError::new("a path must be absolute (start with /)"));
        }
        if Path::new(&value)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(ValueError::new("a path must not contain a `..` component"));
        }
        Ok(Self(PathBuf::from(value)))
    }
}

impl TryFrom<&str> for AbsPath {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl TryFrom<PathBuf> for AbsPath {
    type Error = ValueError;
    fn try_from(value: PathBuf) -> Result<Self, ValueError> {
        match value.into_os_string().into_string() {
            Ok(s) => Self::try_from(s),
            Err(_) => Err(ValueError::new("a path must be valid UTF-8")),
        }
    }
}

impl FromStr for AbsPath {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for AbsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<Path> for AbsPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<str> for AbsPath {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<AbsPath> for String {
    fn from(value: AbsPath) -> String {
        value.as_str().to_owned()
    }
}

impl From<AbsPath> for PathBuf {
    fn from(value: AbsPath) -> PathBuf {
        value.0
    }
}

// ---------------------------------------------------------------------------------------
// SecretFile

/// The absolute path of a file holding a secret (the config never holds the secret itself).
///
/// A value that is not an absolute path is taken to be an inline secret and refused with a
/// reason that does not repeat it. Whether the file exists and has a safe mode is checked
/// at load time ([`crate::check_secret_files`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretFile(AbsPath);

impl SecretFile {
    /// The reason given when the value looks like an inline secret.
    pub const INLINE_REASON: &'static str = "inline secrets are not accepted: put the secret in a file (mode 0600) and give its absolute path";

    /// The path of the file.
    pub fn as_path(&self) -> &Path {
        self.0.as_path()
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl TryFrom<String> for SecretFile {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        if !value.starts_with('/') {
            return Err(ValueError::new(Self::INLINE_REASON));
        }
        // `AbsPath` reasons never repeat the value, so a secret cannot leak through them.
        AbsPath::try_from(value)
            .map(Self)
            .map_err(|e| ValueError::new(format!("secret file path: {}", e.reason())))
    }
}

impl TryFrom<&str> for SecretFile {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl FromStr for SecretFile {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for SecretFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl AsRef<Path> for SecretFile {
    fn as_ref(&self) -> &Path {
        self.as_path()
    }
}

impl From<SecretFile> for String {
    fn from(value: SecretFile) -> String {
        value.0.into()
    }
}

// ---------------------------------------------------------------------------------------
// ConfigDuration

/// A positive duration, written in humantime syntax: `"30s"`, `"5m"`, `"200ms"`, `"1h 30m"`.
///
/// Displays back in the same syntax. Zero is refused (a zero interval or timeout is always
/// a mistake, and `tokio::time::interval` panics on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConfigDuration(Duration);

impl ConfigDuration {
    /// Builds a duration of `secs` seconds from a constant.
    ///
    /// Private: only for the defaults in this crate, which are all non-zero literals.
    pub(crate) const fn secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// The duration.
    pub fn get(&self) -> Duration {
        self.0
    }
}

impl TryFrom<Duration> for ConfigDuration {
    type Error = ValueError;

    fn try_from(value: Duration) -> Result<Self, ValueError> {
        if value.is_zero() {
            return Err(ValueError::new("a duration must be greater than zero"));
        }
        Ok(Self(value))
    }
}

impl TryFrom<String> for ConfigDuration {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        const HINT: &str = "write e.g. \"30s\", \"5m\", \"200ms\" or \"1h 30m\"";
        let duration = humantime::parse_duration(&value).map_err(|e| {
            ValueError::new(match e {
                humantime::DurationError::Empty => format!("a duration must not be empty ({HINT})"),
                humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
                    format!("a duration needs a unit ({HINT})")
                }
                humantime::DurationError::UnknownUnit { unit, .. } => format!(
                    "unknown time unit {} in duration (use ms, s, m, h or d)",
                    quoted(&unit)
                ),
                humantime::DurationError::NumberOverflow => {
                    "duration is too large or finer than 1ns".to_owned()
                }
                _ => format!("invalid duration ({HINT})"),
            })
        })?;
        Self::try_from(duration)
    }
}

impl TryFrom<&str> for ConfigDuration {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl FromStr for ConfigDuration {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl From<ConfigDuration> for String {
    fn from(value: ConfigDuration) -> String {
        value.to_string()
    }
}

impl From<ConfigDuration> for Duration {
    fn from(value: ConfigDuration) -> Duration {
        value.0
    }
}

// ---------------------------------------------------------------------------------------
// Port

/// A TCP/UDP port number, 1–65535 (0, "any port", is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct Port(u16);

impl Port {
    /// The port number.
    pub fn get(&self) -> u16 {
        self.0
    }
}

impl TryFrom<u16> for Port {
    type Error = ValueError;

    fn try_from(value: u16) -> Result<Self, ValueError> {
        if value == 0 {
            return Err(ValueError::new("port 0 is not allowed (use 1 to 65535)"));
        }
        Ok(Self(value))
    }
}

impl FromStr for Port {
    type Err = ValueError;

    fn from_str(value: &str) -> Result<Self, ValueError> {
        let n: u16 = value
            .parse()
            .map_err(|_| ValueError::new("a port is a number from 1 to 65535"))?;
        Self::try_from(n)
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Port> for u16 {
    fn from(value: Port) -> u16 {
        value.0
    }
}

// ---------------------------------------------------------------------------------------
// LogFilter

/// A `tracing` filter directive such as `"info"` or `"info,tsunagi_runtime=debug"`.
///
/// Only the shape is checked here (non-empty, one line, at most 512 characters); the
/// runtime checks the full `EnvFilter` syntax.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LogFilter(String);

impl LogFilter {
    /// The longest filter, in characters.
    pub const MAX_LEN: usize = 512;
}

impl Default for LogFilter {
    /// `"info"`.
    fn default() -> Self {
        Self("info".to_owned())
    }
}

impl TryFrom<String> for LogFilter {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        if value.trim().is_empty() {
            return Err(ValueError::new("a log filter must not be empty"));
        }
        if value.contains(['\n', '\r']) {
            return Err(ValueError::new("a log filter must be one line"));
        }
        let count = value.chars().count();
        if count > Self::MAX_LEN {
            return Err(ValueError::new(format!(
                "a log filter is at most {} characters (got {count})",
                Self::MAX_LEN
            )));
        }
        Ok(Self(value))
    }
}

string_newtype!(LogFilter);

// ---------------------------------------------------------------------------------------
// Capability

/// A Linux capability name, stored in upper case with the `CAP_` prefix.
///
/// Input is case-insensitive and the prefix is optional: `"net_admin"`, `"CAP_NET_ADMIN"`
/// and `"cap_net_admin"` are the same capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct Capability(&'static str);

// By hand: the derived impl with `try_from` would tie the `'static` name to `'de`.
impl<'de> Deserialize<'de> for Capability {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        Self::try_from(value).map_err(serde::de::Error::custom)
    }
}

impl Capability {
    /// Every capability name known to this software, indexed by capability number
    /// (`CAP_CHOWN` = 0 … `CAP_CHECKPOINT_RESTORE` = 40, as in `linux/capability.h`).
    pub const NAMES: [&'static str; 41] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];

    /// The canonical name, e.g. `"CAP_NET_ADMIN"`.
    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl TryFrom<String> for Capability {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, ValueError> {
        let upper = value.to_ascii_uppercase();
        let wanted = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        Self::NAMES
            .iter()
            .find(|name| **name == wanted)
            .map(|name| Self(name))
            .ok_or_else(|| {
                ValueError::new(format!(
                    "unknown capability {} (expected a Linux capability name such as CAP_NET_BIND_SERVICE)",
                    quoted(&value)
                ))
            })
    }
}

impl TryFrom<&str> for Capability {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl FromStr for Capability {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl AsRef<str> for Capability {
    fn as_ref(&self) -> &str {
        self.0
    }
}

impl From<Capability> for String {
    fn from(value: Capability) -> String {
        value.0.to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// Network values (the tunnel)

/// A Linux network interface name: 1–15 characters of `A–Z a–z 0–9 _ . -`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfaceName(String);

impl TryFrom<String> for IfaceName {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let len = value.chars().count();
        if len == 0 || len > 15 {
            return Err(ValueError::new(format!(
                "an interface name is 1 to 15 characters (got {len})"
            )));
        }
        if value == "." || value == ".." {
            return Err(ValueError::new("an interface name cannot be `.` or `..`"));
        }
        if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
        {
            return Err(ValueError::new(format!(
                "an interface name may only contain letters, digits, `_`, `.` and `-` (found {})",
                quoted(&bad.to_string())
            )));
        }
        Ok(Self(value))
    }
}

string_newtype!(IfaceName);

/// A `host:port` endpoint: the host is an IPv4 or IPv6 literal (`[::1]:51820`) or a DNS
/// name; the port is 1–65535. DNS names are resolved by the user of the value, each time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    /// The host: an IP literal (without brackets) or a DNS name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address, when the host is an IP literal.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.host.parse().ok()
    }
}

fn valid_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl TryFrom<String> for Endpoint {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let shape = || {
            ValueError::new(format!(
                "an endpoint is host:port, e.g. hub.example.jp:51820 or [2001:db8::1]:51820 (got {})",
                quoted(&value)
            ))
        };
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(shape)?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(shape());
            }
            (host, port)
        } else {
            let (host, port) = value.rsplit_once(':').ok_or_else(shape)?;
            if host.parse::<std::net::Ipv4Addr>().is_err() && !valid_dns_name(host) {
                return Err(ValueError::new(format!(
                    "{} is neither an IPv4 address nor a DNS name",
                    quoted(host)
                )));
            }
            (host, port)
        };
        let port: u16 =
            port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                ValueError::new(format!("{} is not a port (1–65535)", quoted(port)))
            })?;
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl TryFrom<&str> for Endpoint {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl FromStr for Endpoint {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl From<Endpoint> for String {
    fn from(value: Endpoint) -> String {
        value.to_string()
    }
}

/// A WireGuard public key: 32 bytes in standard base64 (44 characters ending in `=`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WgPublicKey(String);

impl TryFrom<String> for WgPublicKey {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let bytes = value.as_bytes();
        let base64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
        // 32 bytes = 42 full characters + one carrying 4 bits (its low 2 bits are zero) + `=`.
        let ok = bytes.len() == 44
            && bytes[..43].iter().all(base64)
            && bytes[43] == b'='
            && b"AEIMQUYcgkosw048".contains(&bytes[42]);
        if !ok {
            return Err(ValueError::new(
                "a WireGuard public key is 32 bytes in base64: 44 characters ending in `=` (as `wg pubkey` prints)",
            ));
        }
        Ok(Self(value))
    }
}

string_newtype!(WgPublicKey);

/// An IPv4 address with a prefix length, e.g. `10.99.0.2/24` (an interface address) or
/// `10.98.0.0/24` (a subnet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    addr: std::net::Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The address as written.
    pub fn addr(&self) -> std::net::Ipv4Addr {
        self.addr
    }

    /// The prefix length, 0–32.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    /// The subnet mask, e.g. 255.255.255.0 for /24.
    pub fn network_mask(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(self.mask())
    }

    /// Whether the two subnets share an address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: std::net::Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let shape = || {
            ValueError::new(format!(
                "expected an IPv4 address with a prefix length, e.g. 10.98.0.0/24 (got {})",
                quoted(&value)
            ))
        };
        let (addr, prefix) = value.split_once('/').ok_or_else(shape)?;
        let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| shape())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(shape)?;
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<&str> for Ipv4Cidr {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl FromStr for Ipv4Cidr {
    type Err = ValueError;
    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl From<Ipv4Cidr> for String {
    fn from(value: Ipv4Cidr) -> String {
        value.to_string()
    }
}

/// A plain-HTTP health URL on an IPv4 literal, e.g. `http://10.98.0.1:8080/health`. It is
/// probed through the tunnel, so it needs no TLS and no DNS.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HealthUrl {
    addr: std::net::SocketAddrV4,
    path: String,
}

impl HealthUrl {
    /// Where to connect.
    pub fn addr(&self) -> std::net::SocketAddrV4 {
        self.addr
    }

    /// The request path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl TryFrom<String> for HealthUrl {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let shape = || {
            ValueError::new(format!(
                "expected http://IPV4:PORT/PATH, e.g. http://10.98.0.1:8080/health (got {})",
                quoted(&value)
            ))
        };
        let rest = value.strip_prefix("http://").ok_or_else(shape)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: std::net::SocketAddrV4 = authority.parse().map_err(|_| shape())?;
        if addr.port() == 0 || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(shape());
        }
        Ok(Self {
            addr,
            path: path.to_owned(),
        })
    }
}

impl TryFrom<&str> for HealthUrl {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for HealthUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.addr, self.path)
    }
}

impl From<HealthUrl> for String {
    fn from(value: HealthUrl) -> String {
        value.to_string()
    }
}

/// The network FHIR server's base, `http://IPV4:PORT/PATH` or `https://IPV4:PORT/PATH`: an
/// address literal (checked against the hub subnets), a port, a path. With `https` the
/// server's certificate must name that address (an IP SAN).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FhirUrl {
    tls: bool,
    addr: std::net::SocketAddrV4,
    path: String,
}

impl FhirUrl {
    /// Whether the server is spoken to over TLS (`https`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Where to connect.
    pub fn addr(&self) -> std::net::SocketAddrV4 {
        self.addr
    }

    /// The base path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl TryFrom<String> for FhirUrl {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let shape = || {
            ValueError::new(format!(
                "expected https://IPV4:PORT/PATH (or http:// inside the tunnel), e.g. https://10.98.0.1:8443/fhir (got {})",
                quoted(&value)
            ))
        };
        let (tls, rest) = match (
            value.strip_prefix("https://"),
            value.strip_prefix("http://"),
        ) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(shape()),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr: std::net::SocketAddrV4 = authority.parse().map_err(|_| shape())?;
        if addr.port() == 0
            || path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return Err(shape());
        }
        Ok(Self {
            tls,
            addr,
            path: path.to_owned(),
        })
    }
}

impl TryFrom<&str> for FhirUrl {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for FhirUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.addr, self.path)
    }
}

impl From<FhirUrl> for String {
    fn from(value: FhirUrl) -> String {
        value.to_string()
    }
}

/// An HTTPS URL of a WebDAV collection, e.g. `https://10.98.0.1:8443/ssmix2/1311234567/`:
/// `https://` only, a host (IPv4 literal or DNS name) and port, a path ending in `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReplicaUrl(String);

impl ReplicaUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host as written: an IPv4 literal or a DNS name.
    pub fn host(&self) -> &str {
        let rest = self.0.strip_prefix("https://").unwrap_or(&self.0);
        let authority = rest.split('/').next().unwrap_or(rest);
        authority
            .rsplit_once(':')
            .map_or(authority, |(host, _port)| host)
    }
}

impl TryFrom<String> for ReplicaUrl {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let shape = || {
            ValueError::new(format!(
                "expected https://HOST:PORT/PATH/ ending in /, e.g. https://10.98.0.1:8443/ssmix2/ (got {})",
                quoted(&value)
            ))
        };
        let rest = value.strip_prefix("https://").ok_or_else(shape)?;
        let (authority, path) = rest.find('/').map(|i| rest.split_at(i)).ok_or_else(shape)?;
        let (host, port) = authority.rsplit_once(':').ok_or_else(shape)?;
        let port: u16 = port.parse().map_err(|_| shape())?;
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if port == 0
            || !host_ok
            || !path.ends_with('/')
            || path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(shape());
        }
        Ok(Self(value))
    }
}

impl TryFrom<&str> for ReplicaUrl {
    type Error = ValueError;
    fn try_from(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for ReplicaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ReplicaUrl> for String {
    fn from(value: ReplicaUrl) -> String {
        value.0
    }
}

// ---------------------------------------------------------------------------------------
// The box's own links (`[network]`)

/// An Ethernet MAC address, `52:54:00:74:73:01` (six pairs of hex digits, `:` between;
/// kept in lower case). A unicast address: the low bit of the first octet is clear.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(String);

impl TryFrom<String> for MacAddr {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let shape = || {
            ValueError::new(format!(
                "expected a MAC address, six pairs of hex digits with `:` between, e.g. 52:54:00:74:73:01 (got {})",
                quoted(&value)
            ))
        };
        let pairs: Vec<&str> = value.split(':').collect();
        if pairs.len() != 6
            || pairs
                .iter()
                .any(|p| p.len() != 2 || !p.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(shape());
        }
        let first = u8::from_str_radix(pairs[0], 16).map_err(|_| shape())?;
        if first & 1 == 1 {
            return Err(ValueError::new(format!(
                "{} is a multicast address, not a port's",
                quoted(&value)
            )));
        }
        Ok(Self(value.to_ascii_lowercase()))
    }
}

string_newtype!(MacAddr);

/// How a link gets its address: `dhcp`, or a fixed IPv4 address with its prefix length
/// (`192.168.50.1/24`; prefix 8 to 30, neither the subnet's network nor its broadcast
/// address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum LinkAddress {
    Dhcp,
    Fixed(Ipv4Cidr),
}

impl TryFrom<String> for LinkAddress {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        if value == "dhcp" {
            return Ok(Self::Dhcp);
        }
        let cidr = Ipv4Cidr::try_from(value.clone()).map_err(|_| {
            ValueError::new(format!(
                "expected `dhcp` or an IPv4 address with its prefix length, e.g. 192.168.50.1/24 (got {})",
                quoted(&value)
            ))
        })?;
        if !(8..=30).contains(&cidr.prefix()) {
            return Err(ValueError::new(format!(
                "a link's prefix length is 8 to 30 (got {})",
                cidr.prefix()
            )));
        }
        let host = u32::from(cidr.addr()) & !u32::from(cidr.network_mask());
        if host == 0 || host == !u32::from(cidr.network_mask()) {
            return Err(ValueError::new(format!(
                "{} is the subnet's network or broadcast address, not a host's",
                quoted(&value)
            )));
        }
        Ok(Self::Fixed(cidr))
    }
}

impl fmt::Display for LinkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dhcp => f.write_str("dhcp"),
            Self::Fixed(c) => write!(f, "{c}"),
        }
    }
}

impl From<LinkAddress> for String {
    fn from(value: LinkAddress) -> String {
        value.to_string()
    }
}

/// The update channel's base, `https://HOST:PORT/PATH/` (the same shape as a WebDAV
/// replica's): `metadata/` and `targets/` of the TUF repository are below it.
pub type ChannelUrl = ReplicaUrl;

/// A time of day in minutes since midnight, written `HH:MM`.
fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && (h < 24 || m == 0)).then_some(h * 60 + m)
}

/// A window of each day, local time, `HH:MM-HH:MM` (`22:00-05:00` passes midnight;
/// `00:00-24:00` is the whole day). Start and end differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DailyWindow {
    start: u16,
    end: u16,
}

impl DailyWindow {
    /// Built from minutes since midnight (a default of this crate).
    pub(crate) const fn minutes(start: u16, end: u16) -> DailyWindow {
        DailyWindow { start, end }
    }

    /// Whether minute `m` of a day (0..1440) is inside, and if it is because the window
    /// began the day before (it passes midnight).
    pub fn contains(&self, m: u16) -> Option<bool> {
        if self.start < self.end {
            (self.start..self.end).contains(&m).then_some(false)
        } else if m >= self.start {
            Some(false)
        } else if m < self.end {
            Some(true)
        } else {
            None
        }
    }
}

impl TryFrom<String> for DailyWindow {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let shape = || {
            ValueError::new(format!(
                "expected HH:MM-HH:MM (local time, e.g. 01:00-05:00; 22:00-05:00 passes midnight) (got {})",
                quoted(&value)
            ))
        };
        let (a, b) = value.split_once('-').ok_or_else(shape)?;
        let (start, end) = (
            parse_hhmm(a).ok_or_else(shape)?,
            parse_hhmm(b).ok_or_else(shape)?,
        );
        if start == end || start == 24 * 60 {
            return Err(shape());
        }
        Ok(DailyWindow { start, end })
    }
}

impl fmt::Display for DailyWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

impl From<DailyWindow> for String {
    fn from(value: DailyWindow) -> String {
        value.to_string()
    }
}

/// A day of the week, `mon` … `sun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    /// Monday is 0.
    pub fn from_monday(n: u8) -> Weekday {
        match n % 7 {
            0 => Weekday::Mon,
            1 => Weekday::Tue,
            2 => Weekday::Wed,
            3 => Weekday::Thu,
            4 => Weekday::Fri,
            5 => Weekday::Sat,
            _ => Weekday::Sun,
        }
    }
}

/// An offset from UTC, `+HH:MM` or `-HH:MM` (at most 14 hours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UtcOffset(i32);

impl UtcOffset {
    /// Built from seconds (a default of this crate).
    pub(crate) const fn seconds(s: i32) -> UtcOffset {
        UtcOffset(s)
    }

    /// The offset in seconds (east of UTC positive).
    pub fn get(&self) -> i32 {
        self.0
    }
}

impl TryFrom<String> for UtcOffset {
    type Error = ValueError;
    fn try_from(value: String) -> Result<Self, ValueError> {
        let shape = || {
            ValueError::new(format!(
                "expected +HH:MM or -HH:MM, e.g. +09:00 (got {})",
                quoted(&value)
            ))
        };
        let (sign, rest) = match value.as_bytes().first() {
            Some(b'+') => (1, &value[1..]),
            Some(b'-') => (-1, &value[1..]),
            _ => return Err(shape()),
        };
        let minutes = parse_hhmm(rest).ok_or_else(shape)?;
        if minutes > 14 * 60 {
            return Err(shape());
        }
        Ok(UtcOffset(sign * i32::from(minutes) * 60))
    }
}

impl fmt::Display for UtcOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { '-' } else { '+' };
        let m = self.0.unsigned_abs() / 60;
        write!(f, "{sign}{:02}:{:02}", m / 60, m % 60)
    }
}

impl From<UtcOffset> for String {
    fn from(value: UtcOffset) -> String {
        value.to_string()
    }
}
