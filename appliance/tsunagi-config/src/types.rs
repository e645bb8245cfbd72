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
        Ok(Self(value))
    }
}

string_newtype!(FacilityCode);

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
