//! Configuration of the tsunagi edge appliance: the types, their defaults, and loading with
//! error reports a clinic operator can act on.
//!
//! The file is TOML (`/etc/tsunagi/tsunagi.toml` by default), versioned by a top-level
//! `version = 1`. Every table refuses unknown keys; durations are humantime strings such
//! as `"30s"`; values are checked as they are parsed (see the newtypes such as [`AeTitle`]),
//! and rules that span several keys live in [`Config::validate`].
//!
//! [`load`] reads a file and returns a [`Config`] or every problem found in it at once,
//! each with its line, dotted key and a one-line reason (`tsunagi config check` prints
//! them). [`parse`] does the same for text without touching the filesystem. Secrets are
//! never inlined: the config holds the path of a file, and [`load`] refuses a secret file
//! that group or others can read.
//!
//! ```
//! # use std::path::Path;
//! let text = r#"
//! version = 1
//! [site]
//! facility-code = "0112345678"
//! ae-title = "TSUNAGI"
//! [paths]
//! state-dir = "/var/lib/tsunagi"
//! runtime-dir = "/run/tsunagi"
//! "#;
//! let cfg = tsunagi_config::parse(text, Path::new("tsunagi.toml")).unwrap();
//! assert_eq!(cfg.site.ae_title.as_str(), "TSUNAGI");
//! assert_eq!(cfg.supervisor.crash_limit, 5);
//! ```

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod load;
mod types;

pub use load::{LoadError, Problem, Problems, check_secret_files, load, parse};
pub use types::{
    AbsPath, AeTitle, Capability, ChannelUrl, ConfigDuration, DailyWindow, Endpoint, FacilityCode,
    FhirUrl, HealthUrl, IfaceName, Ipv4Cidr, IssuerName, LinkAddress, LogFilter, MacAddr, Oid,
    Port, ReplicaUrl, SecretFile, ServiceName, SmbName, UtcOffset, ValueError, Weekday,
    WgPublicKey,
};

/// The config file format version this software reads.
pub const CURRENT_VERSION: u32 = 1;

/// Where the appliance looks for its config file unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tsunagi/tsunagi.toml";

/// What the data partition keeps beside the DICOM spool's quota, in MiB: the journal (48
/// MiB), an update bundle and its download (about 150 MiB each), the services' databases
/// and the SS-MIX2 sync's work. See [`Config::capacity_problems`].
pub const DATA_RESERVE_MIB: u64 = 512;

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// File format version; must be [`CURRENT_VERSION`].
    pub version: u32,
    /// Who this appliance is on the network.
    pub site: Site,
    /// Where it keeps its files.
    pub paths: Paths,
    /// Logging.
    #[serde(default)]
    pub log: Log,
    /// Privacy of patient data in logs and diagnostics.
    #[serde(default)]
    pub privacy: Privacy,
    /// Restart and stop policy for supervised services.
    #[serde(default)]
    pub supervisor: Supervisor,
    /// Prometheus metrics endpoint; absent means metrics are off.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// The built-in diagnostic heartbeat service.
    #[serde(default)]
    pub heartbeat: Heartbeat,
    /// The box's own links (its WAN and LAN ports), written as systemd-networkd files when
    /// a provisioning medium is applied; absent means the image's own network files stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// The WireGuard tunnel to the network hub; absent means no tunnel.
    #[serde(default)]
    pub tunnel: Option<Tunnel>,
    /// The box's network identity (its certificate from enrollment), renewed over the
    /// tunnel.
    #[serde(default)]
    pub identity: Identity,
    /// The consent and patient-identity cache.
    #[serde(default)]
    pub consent: ConsentCache,
    /// The SS-MIX2 sync to the network; absent means no sync.
    #[serde(default)]
    pub ssmix2: Option<Ssmix2Sync>,
    /// The DICOM bridge; absent means no bridge.
    #[serde(default)]
    pub dicom: Option<DicomBridge>,
    /// The ATNA audit trail to the network's audit repository; off unless enabled.
    #[serde(default)]
    pub audit: Audit,
    /// Fleet updates from the network operator's update channel; off unless enabled.
    #[serde(default)]
    pub update: Update,
    /// The clinic console: the staff's web page on the clinic LAN; off unless enabled.
    #[serde(default)]
    pub console: Console,
    /// Fault drills, by name (`[drill.crashy]` runs as service `drill-crashy`).
    #[serde(default)]
    pub drill: BTreeMap<ServiceName, Drill>,
}

/// `[site]`: the clinic this appliance belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Site {
    /// The clinic's 医療機関コード (10 digits).
    pub facility_code: FacilityCode,
    /// The DICOM AE title this appliance uses on the network.
    pub ae_title: AeTitle,
    /// A human-readable name for the site, shown in status output.
    #[serde(default)]
    pub name: Option<String>,
    /// The network's patient-identity domain (名寄せ); needed to translate patient IDs.
    #[serde(default)]
    pub network_ids: Option<NetworkIds>,
}

/// `[site.network-ids]`: the domain of the network's patient IDs (the regional ID the
/// network's index assigns). The consent sync learns a patient's network ID from the
/// identifier with system `urn:oid:OID` in the network's Patient resource; the DICOM bridge
/// writes it as PatientID with IssuerOfPatientID `issuer` and the OID as its qualifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NetworkIds {
    /// IssuerOfPatientID (0010,0021) of network IDs, e.g. `TOKYO-NET`.
    pub issuer: IssuerName,
    /// The domain's ISO OID: Universal Entity ID (0040,0032), and the FHIR identifier system
    /// `urn:oid:OID`.
    pub oid: Oid,
}

/// What the DICOM bridge does with PatientID on the way to the network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatientIdPolicy {
    /// PatientID becomes the network ID (with its issuer); the clinic's ID travels in
    /// OtherPatientIDsSequence. An instance waits until the patient's network ID is known.
    #[default]
    Translate,
    /// Sent as received.
    AsIs,
}

/// `[paths]`: directories owned by the appliance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Paths {
    /// Durable state (survives reboots), e.g. `/var/lib/tsunagi`.
    pub state_dir: AbsPath,
    /// Volatile runtime files (sockets, pid files), e.g. `/run/tsunagi`.
    pub runtime_dir: AbsPath,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Log {
    /// `tracing` filter directives; default `"info"`.
    pub filter: LogFilter,
}

/// `[privacy]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Privacy {
    /// File holding the key for keyed hashes of patient IDs in logs. Optional.
    pub id_hash_key_file: Option<SecretFile>,
}

/// `[supervisor]`: how services are started, restarted and stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Supervisor {
    /// Time between SIGTERM and SIGKILL when stopping a service; default 10s.
    pub stop_timeout: ConfigDuration,
    /// A service not ready within this time counts as a crash; default 60s.
    pub ready_timeout: ConfigDuration,
    /// First restart delay; default 1s.
    pub backoff_initial: ConfigDuration,
    /// Longest restart delay; default 60s.
    pub backoff_max: ConfigDuration,
    /// This many crashes within `crash_window` put a service in state `failed`; default 5.
    pub crash_limit: u32,
    /// Window for `crash_limit`; default 5m.
    pub crash_window: ConfigDuration,
    /// How often a failed service is retried; default 10m.
    pub failed_retry: ConfigDuration,
    /// Running this long resets the backoff; default 60s.
    pub stable_after: ConfigDuration,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self {
            stop_timeout: ConfigDuration::secs(10),
            ready_timeout: ConfigDuration::secs(60),
            backoff_initial: ConfigDuration::secs(1),
            backoff_max: ConfigDuration::secs(60),
            crash_limit: 5,
            crash_window: ConfigDuration::secs(5 * 60),
            failed_retry: ConfigDuration::secs(10 * 60),
            stable_after: ConfigDuration::secs(60),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Metrics {
    /// Address to listen on, e.g. `127.0.0.1:9464`; the port must not be 0.
    pub listen: SocketAddr,
}

/// `[heartbeat]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Heartbeat {
    /// Whether services send heartbeats; default true.
    pub enabled: bool,
    /// Time between heartbeats; default 10s.
    pub interval: ConfigDuration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: ConfigDuration::secs(10),
        }
    }
}

/// `[identity]`: the box's network identity, the client certificate the enrollment server
/// issued (`tsunagi enroll`), kept renewed over the tunnel by the `identity` service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Identity {
    /// Whether the identity service runs; default false.
    pub enabled: bool,
    /// Renew when this little of the certificate's life is left (or a third of its
    /// lifetime, whichever is less); default 10d, at most 30d.
    pub renew_before: ConfigDuration,
    /// How often the certificate is looked at, and the longest wait between failed
    /// renewals; default 1h, 1s to 1d.
    pub check_interval: ConfigDuration,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            enabled: false,
            renew_before: ConfigDuration::secs(10 * 86_400),
            check_interval: ConfigDuration::secs(3600),
        }
    }
}

/// `[consent]`: the consent and patient-identity cache (同意・公開設定・名寄せ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ConsentCache {
    /// Whether the consent service runs (it answers the other services' decisions); default
    /// false until the services that ask it are enabled.
    pub enabled: bool,
    /// How old the last successful pull from the network may be before every decision for
    /// a recipient outside the clinic is denied as stale (fail closed); default 24h.
    pub freshness_bound: ConfigDuration,
    /// The network's FHIR R4 base on an address in the hub subnet (reached through the
    /// tunnel): `https://10.98.0.1:8443/fhir` (mutual TLS: `ca-file` and the box's
    /// certificate), or plain `http://` inside the tunnel. Absent: no sync, so every
    /// decision for a recipient outside the clinic is denied as stale.
    pub fhir_url: Option<FhirUrl>,
    /// The network CA the FHIR server's certificate must chain to (PEM); required with an
    /// `https` `fhir-url`.
    pub ca_file: Option<AbsPath>,
    /// The box's client certificate (PEM); with `https`, unless `client-identity`.
    pub client_cert_file: Option<AbsPath>,
    /// The box's client key (PEM, mode 0600); with `https`, unless `client-identity`.
    pub client_key_file: Option<SecretFile>,
    /// Present the box's own identity from enrollment (`[identity]`, renewed by the
    /// identity service) instead of `client-cert-file` and `client-key-file`.
    pub client_identity: bool,
    /// Time between sync rounds (push, then pull); default 60s.
    pub pull_interval: ConfigDuration,
}

impl Default for ConsentCache {
    fn default() -> Self {
        Self {
            enabled: false,
            freshness_bound: ConfigDuration::secs(24 * 3600),
            fhir_url: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            client_identity: false,
            pull_interval: ConfigDuration::secs(60),
        }
    }
}

/// `[audit]`: the ATNA audit trail (IHE ITI-20): the box's audit messages (DICOM PS3.15
/// A.5) to the network's audit repository, syslog over TLS (RFC 5425) under the one TLS
/// policy, kept in a durable queue until the repository has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Audit {
    pub enabled: bool,
    /// `IPV4:PORT` of the audit repository (RFC 5425's port is 6514); required when
    /// enabled, inside `tunnel.hub-subnets` with a tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<SocketAddr>,
    /// The network CA the repository's certificate must chain to (PEM); required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<AbsPath>,
    /// The box's client certificate (PEM), unless `client-identity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<AbsPath>,
    /// The box's client key (PEM, mode 0600), unless `client-identity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<SecretFile>,
    /// Present the box's own identity from enrollment (`[identity]`).
    pub client_identity: bool,
    /// For the connection, the handshake, each message and the close; 1s to 5m; default 10s.
    pub timeout: ConfigDuration,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            enabled: false,
            repository: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            client_identity: false,
            timeout: ConfigDuration::secs(10),
        }
    }
}

/// `[update]`: fleet updates (issue 18) from the network operator's update channel, a TUF
/// repository read over mutual TLS through the tunnel: a newer release for this box's
/// compatible is downloaded in the box's wave and installed in the clinic's maintenance
/// window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Update {
    pub enabled: bool,
    /// The repository's base, `https://HOST:PORT/PATH/` (`metadata/` and `targets/` below
    /// it); required when enabled, an IPv4 address in `tunnel.hub-subnets` with a tunnel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_url: Option<ChannelUrl>,
    /// The channel's root of trust (TUF `root.json`), built into the image.
    pub root_file: AbsPath,
    /// The network CA the server's certificate must chain to (PEM); required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<AbsPath>,
    /// The box's client certificate (PEM), unless `client-identity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<AbsPath>,
    /// The box's client key (PEM, mode 0600), unless `client-identity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<SecretFile>,
    /// Present the box's own identity from enrollment (`[identity]`).
    pub client_identity: bool,
    /// RAUC's `compatible` of this box: only bundles for it are taken; default "tsunagi".
    pub compatible: String,
    /// Where the running version is read (`IMAGE_VERSION=`, os-release(5)).
    pub os_release: AbsPath,
    /// How often the channel is looked at; 1m to 1d; default 1h.
    pub check_interval: ConfigDuration,
    /// How long the first boot of an update has to become healthy (the supervisor and
    /// every service ready, the tunnel up) before the health gate sends the box back to
    /// the old slot; 1m to 1h; default 10m.
    pub health_limit: ConfigDuration,
    /// When an update may be installed (the box restarts into it).
    pub window: MaintenanceWindow,
}

impl Default for Update {
    fn default() -> Self {
        Self {
            enabled: false,
            channel_url: None,
            root_file: AbsPath::try_from("/usr/share/tsunagi/update-root.json")
                .unwrap_or_else(|_| unreachable!("a literal absolute path")),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            client_identity: false,
            compatible: "tsunagi".to_owned(),
            os_release: AbsPath::try_from("/usr/lib/os-release")
                .unwrap_or_else(|_| unreachable!("a literal absolute path")),
            check_interval: ConfigDuration::secs(3600),
            health_limit: ConfigDuration::secs(600),
            window: MaintenanceWindow::default(),
        }
    }
}

/// `[console]`: the clinic console (issue 19), HTTPS on the clinic LAN for the staff: local
/// accounts with a password and a TOTP second factor, the box's state in Japanese.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Console {
    pub enabled: bool,
    /// The address on the clinic LAN it answers on (never the WAN); default
    /// `192.168.50.1:443`, the image's LAN address.
    pub listen: SocketAddr,
    /// A session unused this long ends; 1m to 8h; default 15m.
    pub idle_timeout: ConfigDuration,
    /// An account is locked after this many failed logins in a row; 3 to 20; default 5.
    pub lockout_after: u32,
    /// For this long; 1m to 24h; default 15m.
    pub lockout_for: ConfigDuration,
    /// The server certificate (PEM) the network CA issued for the console; without it
    /// the console makes a self-signed one at its first start, whose SHA-256 fingerprint
    /// `tsunagi console fingerprint` prints for the provisioning sheet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<AbsPath>,
    /// Its key (PEM, mode 0600); with `cert-file` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<SecretFile>,
}

impl Default for Console {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([192, 168, 50, 1], 443)),
            idle_timeout: ConfigDuration::secs(15 * 60),
            lockout_after: 5,
            lockout_for: ConfigDuration::secs(15 * 60),
            cert_file: None,
            key_file: None,
        }
    }
}

/// `[update.window]`: the clinic's maintenance window, in its local time. Default: nights
/// from 01:00 to 05:00 and all of Sunday, at +09:00.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MaintenanceWindow {
    /// Every night (or day), `HH:MM-HH:MM`; may pass midnight.
    pub nightly: DailyWindow,
    /// Whole days.
    pub all_day: Vec<Weekday>,
    /// The clinic's offset from UTC (Japan has no daylight saving time).
    pub utc_offset: UtcOffset,
}

impl Default for MaintenanceWindow {
    fn default() -> Self {
        Self {
            nightly: DailyWindow::minutes(60, 5 * 60),
            all_day: vec![Weekday::Sun],
            utc_offset: UtcOffset::seconds(9 * 3600),
        }
    }
}

impl MaintenanceWindow {
    /// Whether `unix` (seconds since the epoch, UTC) is inside the window.
    pub fn contains(&self, unix: i64) -> bool {
        let local = unix + i64::from(self.utc_offset.get());
        let day = local.div_euclid(86_400);
        let minute = u16::try_from(local.rem_euclid(86_400) / 60).unwrap_or(0);
        // 1970-01-01 was a Thursday (3, counting from Monday).
        let weekday =
            |d: i64| Weekday::from_monday(u8::try_from((d + 3).rem_euclid(7)).unwrap_or(0));
        self.all_day.contains(&weekday(day)) || self.nightly.contains(minute).is_some()
    }
}

/// A calling AE title the DICOM bridge accepts, and the address it must come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DicomCaller {
    pub ae_title: AeTitle,
    pub address: std::net::IpAddr,
}

/// `[[dicom.move-destinations]]`: a clinic viewer's storage SCP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DicomDestination {
    pub ae_title: AeTitle,
    /// `IPV4:PORT` on the clinic LAN.
    pub address: SocketAddr,
}

/// `[dicom.pacs]`: the network PACS (reached through the tunnel in production).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DicomPacs {
    pub ae_title: AeTitle,
    /// `IPV4:PORT`, e.g. `10.98.0.1:4242`.
    pub address: SocketAddr,
    /// Storage commitment (PS3.4 Annex J, Push Model); default false. When true, an
    /// instance stays in the spool after the PACS stored it until the PACS commits it
    /// (N-ACTION, then its N-EVENT-REPORT to our SCP: the PACS must know our AE title and
    /// address); one not committed within `commitment-timeout` is sent again.
    #[serde(default)]
    pub storage_commitment: bool,
    /// How long to wait for the commitment before sending again, 1s to 7 days; default 1h.
    #[serde(default = "default_commitment_timeout")]
    pub commitment_timeout: ConfigDuration,
    /// `[[dicom.pacs.commitment-reports-from]]`: the AE titles and addresses the PACS sends
    /// its commitment reports from, when that is not (only) its own AE title at its own
    /// address (a second node of a PACS cluster, a separate commitment AE). Replaces that
    /// default; 1 to 8 entries; only with `storage-commitment = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment_reports_from: Option<Vec<DicomCaller>>,
    /// DICOM TLS to the PACS (PS3.15 Annex B, the Basic TLS Secure Transport Connection
    /// Profile, under the one TLS policy): its certificate must chain to `ca-file` and name
    /// `address`'s IP; the box presents its certificate. For the forwarder's C-STORE and
    /// storage commitment and the query/retrieve proxy. Default false.
    #[serde(default)]
    pub tls: bool,
    /// The network CA the PACS's certificate must chain to (PEM); required with `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<AbsPath>,
    /// The box's client certificate (PEM); with `tls`, unless `client-identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<AbsPath>,
    /// The box's client key (PEM, mode 0600); with `tls`, unless `client-identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<SecretFile>,
    /// Present the box's own identity from enrollment (`[identity]`) instead of
    /// `client-cert-file` and `client-key-file`.
    #[serde(default)]
    pub client_identity: bool,
}

impl DicomPacs {
    /// The callers whose storage commitment reports are taken: none without storage
    /// commitment; else `commitment-reports-from`, or the PACS's AE title at its address.
    pub fn commitment_reporters(&self) -> Vec<(String, std::net::IpAddr)> {
        if !self.storage_commitment {
            return Vec::new();
        }
        match &self.commitment_reports_from {
            Some(list) => list
                .iter()
                .map(|c| (c.ae_title.as_ref().to_owned(), c.address))
                .collect(),
            None => vec![(self.ae_title.as_ref().to_owned(), self.address.ip())],
        }
    }
}

fn default_commitment_timeout() -> ConfigDuration {
    ConfigDuration::secs(3600)
}

/// `[dicom]`: the DICOM bridge (issue 6): store-and-forward with the consent gate and
/// patient-ID translation, and the query/retrieve proxy for the clinic's viewers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DicomBridge {
    /// Whether the service runs; default true when the section is present.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where the SCP listens for the clinic's modalities, e.g. `0.0.0.0:104`.
    pub listen: SocketAddr,
    /// Calling AE titles with their addresses; absent: any caller (that calls our AE title).
    #[serde(default)]
    pub allowed_callers: Option<Vec<DicomCaller>>,
    /// The largest PDU we accept, 16384–1048576 bytes; default 65536.
    #[serde(default = "default_max_pdu")]
    pub max_pdu: u32,
    /// Deadline of every read and write; default 30s.
    #[serde(default = "default_dicom_timeout")]
    pub timeout: ConfigDuration,
    /// Concurrent associations at most; default 16.
    #[serde(default = "default_max_associations")]
    pub max_associations: u32,
    /// The spool's quota in MiB; default 10240 (beyond it, C-STORE answers A700).
    #[serde(default = "default_spool_quota")]
    pub spool_quota_mib: u64,
    /// Instances not delivered after this long become dead letters (an alert); default 168h.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_after: ConfigDuration,
    /// Associations to the network PACS at once, 1–8; default 2.
    #[serde(default = "default_forward_associations")]
    pub forward_associations: u32,
    /// How far into a data set its patient elements (up to OtherPatientIDsSequence) may
    /// lie, in KiB, 64–16384; default 1024. Large private groups before them push them
    /// back; an instance whose are further is refused (C000H), because the forwarder reads
    /// this much of it to translate its patient IDs.
    #[serde(default = "default_header_limit")]
    pub header_limit_kib: u32,
    /// `translate` (default: needs `[site.network-ids]`) or `as-is`.
    #[serde(default)]
    pub patient_ids: PatientIdPolicy,
    /// SOP classes stored besides the standard storage SOP classes (e.g. a vendor's
    /// private ones); any other C-STORE is refused (0122H).
    #[serde(default)]
    pub extra_sop_classes: Vec<Oid>,
    /// The clinic's viewers a C-MOVE may name as destination (their storage SCPs).
    #[serde(default)]
    pub move_destinations: Vec<DicomDestination>,
    /// Whether the clinic's viewers may query and retrieve from the network through the box
    /// (C-FIND, C-MOVE, C-GET); default false. Needs `allowed-callers`: only listed viewers
    /// may see what the network holds about the clinic's patients.
    #[serde(default)]
    pub query_retrieve: bool,
    pub pacs: DicomPacs,
}

fn default_forward_associations() -> u32 {
    2
}

fn default_header_limit() -> u32 {
    1024
}

fn default_max_pdu() -> u32 {
    65536
}

fn default_dicom_timeout() -> ConfigDuration {
    ConfigDuration::secs(30)
}

fn default_max_associations() -> u32 {
    16
}

fn default_spool_quota() -> u64 {
    10240
}

fn default_dead_letter() -> ConfigDuration {
    ConfigDuration::secs(7 * 24 * 3600)
}

/// How the SS-MIX2 sync notices changes in the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchMode {
    /// inotify when the storage is on a local filesystem, polling on network shares.
    #[default]
    Auto,
    /// inotify (plus the periodic rescan): local filesystems only.
    Inotify,
    /// Only the periodic rescan (SMB and NFS deliver no inotify events).
    Poll,
}

/// What the SS-MIX2 sync does with a patient's files at the hub when permission ends
/// (withdrawal, disclosure or category change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WithdrawalPolicy {
    /// Remove the files from the replica.
    #[default]
    Delete,
    /// Remove the data and leave, per key, a `_0` tombstone without clinical content, so
    /// readers of the replica see the key deleted.
    Tombstone,
}

/// `[ssmix2.replica]`: where the consented subset is published (exactly one of `directory`
/// and `url`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ssmix2Replica {
    /// A local or mounted directory (e.g. an NFS export of the hub).
    #[serde(default)]
    pub directory: Option<AbsPath>,
    /// An HTTPS WebDAV collection at the hub, e.g. `https://10.98.0.1:8443/ssmix2/1311234567/`.
    #[serde(default)]
    pub url: Option<ReplicaUrl>,
    /// The CA that signed the hub's server certificate (PEM); required with `url`.
    #[serde(default)]
    pub ca_file: Option<AbsPath>,
    /// The box's client certificate (PEM); required with `url` unless `client-identity`.
    #[serde(default)]
    pub client_cert_file: Option<AbsPath>,
    /// The box's client key (PEM, mode 0600); required with `url` unless `client-identity`.
    #[serde(default)]
    pub client_key_file: Option<SecretFile>,
    /// Present the box's own identity from enrollment (`[identity]`, renewed by the
    /// identity service) instead of `client-cert-file` and `client-key-file`.
    #[serde(default)]
    pub client_identity: bool,
}

/// `[ssmix2]`: the SS-MIX2 sync. The storage is only ever read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ssmix2Sync {
    /// Whether the sync service runs; default true when the section is present.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The clinic's standardized storage root (標準化ストレージ), read-only.
    pub storage: AbsPath,
    /// The transaction storage (`TR_*.DAT`), used as the change feed when present.
    #[serde(default)]
    pub transaction_storage: Option<AbsPath>,
    /// `auto` (default), `inotify` or `poll`.
    #[serde(default)]
    pub watch: WatchMode,
    /// Time between full rescans (and sync cycles without any change noticed); default 60s.
    #[serde(default = "default_minute")]
    pub scan_interval: ConfigDuration,
    /// A file changed within this time is not read yet (EMRs write in place); default 10s.
    #[serde(default = "default_settle")]
    pub settle: ConfigDuration,
    /// A file that vanished without a rename is removed from the replica only when a later
    /// scan at least this much later confirms it; default 60s.
    #[serde(default = "default_minute")]
    pub confirm_deletion: ConfigDuration,
    /// How often published patients' permissions are asked again even without a consent
    /// change (expiry); default 1h.
    #[serde(default = "default_hour")]
    pub recheck_interval: ConfigDuration,
    /// `delete` (default) or `tombstone`.
    #[serde(default)]
    pub withdrawal: WithdrawalPolicy,
    /// The storage is an SMB share of the clinic's EMR server, mounted read-only at
    /// `storage` (by `tsunagi ssmix2 mount`); absent: `storage` is a local directory.
    #[serde(default)]
    pub share: Option<Ssmix2Share>,
    pub replica: Ssmix2Replica,
}

/// The SMB dialect of `[ssmix2.share]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SmbVersion {
    /// SMB 3.0 or newer, the newest both sides speak (default).
    #[default]
    #[serde(rename = "3")]
    V3,
    /// SMB 3.1.1 only (Windows Server 2016 and later, Samba 4.3 and later).
    #[serde(rename = "3.1.1")]
    V311,
    /// SMB 3.0 only (Windows Server 2012).
    #[serde(rename = "3.0")]
    V30,
    /// SMB 2.1 (Windows Server 2008 R2): no encryption; only for an EMR server that speaks
    /// nothing newer.
    #[serde(rename = "2.1")]
    V21,
}

impl SmbVersion {
    /// The kernel client's `vers=` value.
    pub fn mount_option(self) -> &'static str {
        match self {
            SmbVersion::V3 => "3",
            SmbVersion::V311 => "3.1.1",
            SmbVersion::V30 => "3.0",
            SmbVersion::V21 => "2.1",
        }
    }
}

/// `[ssmix2.share]`: the clinic's SS-MIX2 storage on the EMR server's SMB share (a Windows
/// or Samba server on the clinic LAN). It is mounted read-only, owned by the sync's user,
/// at `ssmix2.storage`; the sync refuses to read that path while nothing is mounted there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Ssmix2Share {
    /// The server's IP address (the kernel's SMB client resolves no names by itself).
    pub address: std::net::IpAddr,
    /// The share's name: `//ADDRESS/SHARE`.
    pub share: SmbName,
    /// The account the box reads the share with (read-only rights are enough).
    pub username: SmbName,
    /// Its domain or workgroup, if the server wants one.
    #[serde(default)]
    pub domain: Option<SmbName>,
    /// The file holding the account's password (mode 0600; a trailing newline is ignored).
    pub password_file: SecretFile,
    /// `3` (default: 3.0 or newer), `3.1.1`, `3.0` or `2.1`.
    #[serde(default)]
    pub version: SmbVersion,
}

impl Ssmix2Share {
    /// The share's UNC path as the kernel takes it: `//ADDRESS/SHARE`.
    pub fn unc(&self) -> String {
        format!("//{}/{}", self.address, self.share)
    }
}

fn default_minute() -> ConfigDuration {
    ConfigDuration::secs(60)
}

fn default_settle() -> ConfigDuration {
    ConfigDuration::secs(10)
}

fn default_hour() -> ConfigDuration {
    ConfigDuration::secs(3600)
}

/// Which WireGuard implementation the tunnel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TunnelBackend {
    /// The kernel module when the kernel has it, else the userspace implementation.
    #[default]
    Auto,
    /// The kernel module only.
    Kernel,
    /// The userspace implementation (`wireguard-go`), run and watched by the tunnel service.
    Userspace,
}

/// `[tunnel]`: the WireGuard tunnel to the network hub (split tunnel: only `hub-subnets` go
/// through it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Tunnel {
    /// Whether the tunnel service runs; default true when the section is present.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The WireGuard interface; default `tsunagi0`.
    #[serde(default = "default_interface")]
    pub interface: IfaceName,
    /// `auto` (default), `kernel` or `userspace`.
    #[serde(default)]
    pub backend: TunnelBackend,
    /// The userspace implementation to run (a command on PATH or an absolute path); default
    /// `wireguard-go`.
    #[serde(default = "default_userspace")]
    pub userspace_implementation: String,
    /// The box's private key; default `STATE-DIR/tunnel/private.key`. Generated on the box
    /// when absent (mode 0600); it never leaves the box.
    #[serde(default)]
    pub private_key_file: Option<SecretFile>,
    /// The box's WireGuard UDP port (the only port open on the WAN side); default 51820.
    #[serde(default = "default_listen_port")]
    pub listen_port: Port,
    /// The hub, as host:port (DNS names are re-resolved on failure).
    pub hub_endpoint: Endpoint,
    /// Further endpoints of the same hub, tried in order when the first fails (e.g. UDP 443).
    #[serde(default)]
    pub alternative_endpoints: Vec<Endpoint>,
    /// The hub's public key.
    pub hub_public_key: WgPublicKey,
    /// Optional preshared key shared with the hub.
    #[serde(default)]
    pub preshared_key_file: Option<SecretFile>,
    /// The box's address inside the tunnel, e.g. `10.99.0.2/24`.
    pub address: Ipv4Cidr,
    /// The hub networks routed through the tunnel; nothing else goes there.
    pub hub_subnets: Vec<Ipv4Cidr>,
    /// Keepalive towards the hub; default 25s.
    #[serde(default = "default_keepalive")]
    pub persistent_keepalive: ConfigDuration,
    /// Tunnel MTU, 1280–1420; default 1280 (1420 fails behind path-MTU black holes).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// The hub's health address, probed through the tunnel.
    pub health_url: HealthUrl,
    /// Time between health probes; default 5s.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: ConfigDuration,
    /// Consecutive failed probes before the next recovery step; default 3.
    #[serde(default = "default_probe_failures")]
    pub probe_failures: u32,
    /// Deadline of one probe; default 2s.
    #[serde(default = "default_short")]
    pub probe_timeout: ConfigDuration,
    /// Deadline of every WireGuard control call; default 2s.
    #[serde(default = "default_short")]
    pub control_timeout: ConfigDuration,
    /// The hub's NTP server as `address:port` inside `hub-subnets` (IHE Consistent Time).
    /// The tunnel service asks it (SNTP) every `time-check-interval`: the box's clock more
    /// than 1 s off the hub's, or no answer for 3 checks in a row, shows in status and
    /// metrics. The box's clock itself is kept by chrony. Default: no check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_server: Option<SocketAddr>,
    /// Time between clock checks; default 64s (chrony's shortest poll).
    #[serde(default = "default_time_check_interval")]
    pub time_check_interval: ConfigDuration,
    /// The box's firewall, loaded by the tunnel service.
    #[serde(default)]
    pub firewall: Firewall,
}

/// `[network]`: the box's two ports (issue 16). `tsunagi medium apply` writes them as
/// systemd-networkd files ([`Network::networkd_files`]); a box in a clinic then needs no
/// console to get its addresses. Both come from the signed medium, like the rest of the
/// config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Network {
    /// The port to the clinic's router and the internet: the tunnel leaves here.
    pub wan: Link,
    /// The port to the clinic's devices (modalities, viewers, the console): a fixed
    /// address, which the devices are configured with.
    pub lan: Link,
}

/// `[network.wan]`, `[network.lan]`: one port and its address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Link {
    /// The port by its MAC address (stable across kernels and slots) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// ... or by its interface name; one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<IfaceName>,
    /// `dhcp` (WAN only), or a fixed address with its prefix length.
    pub address: LinkAddress,
    /// With a fixed WAN address: the default route's gateway, inside its subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// With a fixed WAN address: DNS resolvers (with DHCP they come from the router).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::Ipv4Addr>,
}

/// The names of the networkd files [`Network::networkd_files`] writes; a directory holding
/// a file of this prefix that is no longer written has it removed.
pub const NETWORKD_PREFIX: &str = "tsunagi-";

impl Network {
    /// The systemd-networkd `.network` files for the two ports: `(file name, content)`.
    /// The LAN keeps its address without a carrier (a modality switched off must not take
    /// the DICOM listener's address away) and does not hold up `network-online.target`.
    pub fn networkd_files(&self) -> Vec<(String, String)> {
        [("10", "wan", &self.wan), ("20", "lan", &self.lan)]
            .into_iter()
            .map(|(order, role, link)| {
                let mut text = format!(
                    "# Written by `tsunagi medium apply` from [network.{role}] of the clinic's config.\n\
                     # Replaced by the next medium; do not edit.\n[Match]\n"
                );
                if let Some(mac) = &link.mac {
                    text.push_str(&format!("MACAddress={mac}\n"));
                }
                if let Some(name) = &link.interface {
                    text.push_str(&format!("Name={name}\n"));
                }
                if role == "lan" {
                    text.push_str("\n[Link]\nRequiredForOnline=no\n");
                }
                text.push_str("\n[Network]\n");
                match link.address {
                    LinkAddress::Dhcp => text.push_str("DHCP=ipv4\n"),
                    LinkAddress::Fixed(cidr) => text.push_str(&format!("Address={cidr}\n")),
                }
                if let Some(gw) = link.gateway {
                    text.push_str(&format!("Gateway={gw}\n"));
                }
                for dns in &link.dns {
                    text.push_str(&format!("DNS={dns}\n"));
                }
                text.push_str("LinkLocalAddressing=no\nIPv6AcceptRA=no\n");
                if role == "lan" {
                    text.push_str("ConfigureWithoutCarrier=yes\nIgnoreCarrierLoss=yes\n");
                } else {
                    text.push_str("\n[DHCPv4]\nUseDomains=no\n");
                }
                (format!("{order}-{NETWORKD_PREFIX}{role}.network"), text)
            })
            .collect()
    }
}

/// `[tunnel.firewall]`: what may reach the box, and what the box may send. Inbound is
/// dropped unless listed here; the box never forwards (clinic devices reach the network only
/// through the box's services). Outbound, the hub subnets are reached only through the
/// tunnel (the kill switch), the LAN interfaces are open, and on the WAN (every other
/// interface) the box sends only WireGuard to the hub, DHCP, and DNS and NTP as below.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Firewall {
    /// Load the ruleset; default true. Turn off only where another component owns nftables.
    pub enabled: bool,
    /// The interfaces facing the clinic's devices.
    pub lan_interfaces: Vec<IfaceName>,
    /// TCP ports of the box's own services that clinic devices may use (e.g. DICOM).
    pub lan_tcp_ports: Vec<Port>,
    /// TCP ports of the box's own services that the hub subnets may use through the tunnel.
    pub tunnel_tcp_ports: Vec<Port>,
    /// DNS resolvers the box may ask on the WAN (UDP and TCP 53). Empty (the default): DNS
    /// to any address on the WAN when a hub endpoint is a DNS name (the box must resolve its
    /// hub, and resolvers usually come from DHCP), else no DNS on the WAN.
    pub dns_servers: Vec<std::net::IpAddr>,
    /// NTP servers the box may ask on the WAN (UDP 123). Empty (the default): no NTP on the
    /// WAN; a hub subnet's time server is reached through the tunnel like any hub address.
    pub ntp_servers: Vec<std::net::IpAddr>,
}

impl Default for Firewall {
    fn default() -> Self {
        Self {
            enabled: true,
            lan_interfaces: Vec::new(),
            lan_tcp_ports: Vec::new(),
            tunnel_tcp_ports: Vec::new(),
            dns_servers: Vec::new(),
            ntp_servers: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_interface() -> IfaceName {
    IfaceName::try_from("tsunagi0").unwrap_or_else(|_| unreachable!("a valid literal"))
}

fn default_userspace() -> String {
    "wireguard-go".to_owned()
}

fn default_listen_port() -> Port {
    Port::try_from(51820u16).unwrap_or_else(|_| unreachable!("a valid literal"))
}

fn default_keepalive() -> ConfigDuration {
    ConfigDuration::secs(25)
}

fn default_mtu() -> u32 {
    1280
}

fn default_probe_interval() -> ConfigDuration {
    ConfigDuration::secs(5)
}

fn default_time_check_interval() -> ConfigDuration {
    ConfigDuration::secs(64)
}

fn default_probe_failures() -> u32 {
    3
}

fn default_short() -> ConfigDuration {
    ConfigDuration::secs(2)
}

/// A fault drill: a diagnostic service that runs the heartbeat loop and misbehaves on
/// purpose, so operators and tests can exercise the supervisor's restart, failure and stop
/// paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Drill {
    /// Heartbeat interval of the drill; default 1s.
    pub interval: ConfigDuration,
    /// Exit (crash) this long after becoming ready; default: never.
    pub exit_after: Option<ConfigDuration>,
    /// Exit code used by `exit_after`; default 1, must not be 0.
    pub exit_code: u8,
    /// A background task of the drill panics this long after it starts; default: never.
    /// The service must end with the panic as its error (status shows it).
    pub panic_task_after: Option<ConfigDuration>,
    /// Ignore SIGTERM, so the supervisor has to SIGKILL it; default false.
    pub ignore_sigterm: bool,
    /// Never report ready, so the ready timeout fires; default false.
    pub never_ready: bool,
    /// Spawn a long-lived child process (tests process-group cleanup); default false.
    pub subprocess: bool,
    /// Capabilities the drill asks for; default none.
    pub capabilities: Vec<Capability>,
}

impl Default for Drill {
    fn default() -> Self {
        Self {
            interval: ConfigDuration::secs(1),
            exit_after: None,
            exit_code: 1,
            panic_task_after: None,
            ignore_sigterm: false,
            never_ready: false,
            subprocess: false,
            capabilities: Vec::new(),
        }
    }
}

/// A broken cross-field rule: the key it is reported at, the reason, and every key the rule
/// reads (so a rule about a key that was removed for another problem is not reported).
pub(crate) struct Rule {
    pub(crate) path: Vec<String>,
    pub(crate) reason: String,
    pub(crate) involves: Vec<String>,
}

impl Config {
    /// Cross-field rules that no single value can check.
    ///
    /// Returns every broken rule. The problems have `line: None`: [`parse`] and [`load`]
    /// fill in the line from the file. Keys are dotted paths of bare keys
    /// (`"supervisor.backoff-initial"`, `"drill.crashy.exit-code"`).
    pub fn validate(&self) -> Vec<Problem> {
        self.rules()
            .into_iter()
            .map(|rule| Problem {
                line: None,
                key: rule.path.join("."),
                reason: rule.reason,
            })
            .collect()
    }

    /// `[network]`: each port named once, addresses that fit together, the DICOM listener on
    /// the LAN.
    fn network_rules(&self, n: &Network, broken: &mut impl FnMut(&str, String, &[&str])) {
        for (role, link) in [("wan", &n.wan), ("lan", &n.lan)] {
            let key = |field: &str| format!("network.{role}.{field}");
            if link.mac.is_some() == link.interface.is_some() {
                broken(
                    &format!("network.{role}"),
                    "names its port by `mac` or by `interface`, one of the two".into(),
                    &[&key("mac"), &key("interface")],
                );
            }
            match link.address {
                LinkAddress::Dhcp => {
                    if role == "lan" {
                        broken(
                            &key("address"),
                            "the LAN needs a fixed address (its devices are configured with it), not dhcp".into(),
                            &[&key("address")],
                        );
                    }
                    if link.gateway.is_some() || !link.dns.is_empty() {
                        broken(
                            &key("gateway"),
                            "a gateway and DNS servers go with a fixed address; with dhcp they come from the router".into(),
                            &[&key("gateway"), &key("dns")],
                        );
                    }
                }
                LinkAddress::Fixed(cidr) => {
                    if let Some(gw) = link.gateway {
                        if role == "lan" {
                            broken(
                                &key("gateway"),
                                "the LAN has no gateway: the box routes nothing to the clinic's devices".into(),
                                &[&key("gateway")],
                            );
                        } else if !cidr.contains(gw) || gw == cidr.addr() {
                            broken(
                                &key("gateway"),
                                format!("{gw} is not another host of {cidr}"),
                                &[&key("gateway"), &key("address")],
                            );
                        }
                    }
                    if role == "lan" && !link.dns.is_empty() {
                        broken(
                            &key("dns"),
                            "DNS servers belong to the WAN".into(),
                            &[&key("dns")],
                        );
                    }
                }
            }
        }
        if (n.wan.mac.is_some() && n.wan.mac == n.lan.mac)
            || (n.wan.interface.is_some() && n.wan.interface == n.lan.interface)
        {
            broken(
                "network.lan",
                "names the same port as network.wan".into(),
                &["network.wan", "network.lan"],
            );
        }
        let LinkAddress::Fixed(lan) = n.lan.address else {
            return;
        };
        if let LinkAddress::Fixed(wan) = n.wan.address
            && wan.overlaps(&lan)
        {
            broken(
                "network.lan.address",
                format!("{lan} overlaps the WAN's {wan}"),
                &["network.lan.address", "network.wan.address"],
            );
        }
        if let Some(t) = &self.tunnel
            && t.address.overlaps(&lan)
        {
            broken(
                "network.lan.address",
                format!("{lan} overlaps the tunnel's {}", t.address),
                &["network.lan.address", "tunnel.address"],
            );
        }
        if let Some(d) = &self.dicom
            && !d.listen.ip().is_unspecified()
            && d.listen.ip() != std::net::IpAddr::V4(lan.addr())
        {
            broken(
                "dicom.listen",
                format!(
                    "listens on {}, which is not the LAN's address {} (network.lan.address) nor 0.0.0.0",
                    d.listen.ip(),
                    lan.addr()
                ),
                &["dicom.listen", "network.lan.address"],
            );
        }
    }

    /// The rule that needs the size of the file system `paths.state-dir` is on (the data
    /// partition of a box), `data_mib`: the DICOM spool's quota must fit on it beside
    /// [`DATA_RESERVE_MIB`]. `tsunagi config check` and a provisioning medium apply it;
    /// the pure rules of [`Config::validate`] cannot, as they see no disk.
    pub fn capacity_problems(&self, data_mib: u64) -> Vec<Problem> {
        let Some(dicom) = self.dicom.as_ref().filter(|d| d.enabled) else {
            return Vec::new();
        };
        let room = data_mib.saturating_sub(DATA_RESERVE_MIB);
        if dicom.spool_quota_mib <= room {
            return Vec::new();
        }
        vec![Problem {
            line: None,
            key: "dicom.spool-quota-mib".into(),
            reason: format!(
                "a spool quota of {} MiB does not fit on the {data_mib} MiB file system of \
                 state-dir {} beside the {DATA_RESERVE_MIB} MiB kept for the journal, the \
                 services' databases and updates; at most {room} MiB",
                dicom.spool_quota_mib, self.paths.state_dir
            ),
        }]
    }

    pub(crate) fn rules(&self) -> Vec<Rule> {
        let mut out = Vec::new();
        let mut broken = |key: &str, reason: String, involves: &[&str]| {
            out.push(Rule {
                path: key.split('.').map(str::to_owned).collect(),
                reason,
                involves: involves.iter().map(|k| (*k).to_owned()).collect(),
            });
        };

        if self.version != CURRENT_VERSION {
            broken(
                "version",
                load::version_reason(self.version.into()),
                &["version"],
            );
        }

        let state = self.paths.state_dir.as_path();
        let runtime = self.paths.runtime_dir.as_path();
        let both = ["paths.state-dir", "paths.runtime-dir"];
        // `Path` equality and `starts_with` compare components, so `/a/` and `/a/.` match `/a`.
        if state == runtime {
            broken(
                "paths.runtime-dir",
                "runtime-dir must not be the same directory as state-dir".into(),
                &both,
            );
        } else if runtime.starts_with(state) {
            broken(
                "paths.runtime-dir",
                format!(
                    "runtime-dir {} is inside state-dir {}; they must be separate directories",
                    self.paths.runtime_dir, self.paths.state_dir
                ),
                &both,
            );
        } else if state.starts_with(runtime) {
            broken(
                "paths.state-dir",
                format!(
                    "state-dir {} is inside runtime-dir {}; they must be separate directories",
                    self.paths.state_dir, self.paths.runtime_dir
                ),
                &both,
            );
        }

        if self.identity.renew_before.get() > Duration::from_secs(30 * 86_400)
            || self.identity.renew_before.get().is_zero()
        {
            broken(
                "identity.renew-before",
                format!(
                    "must be more than 0 and at most 30d (got {})",
                    self.identity.renew_before
                ),
                &["identity.renew-before"],
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400))
            .contains(&self.identity.check_interval.get())
        {
            broken(
                "identity.check-interval",
                format!("must be 1s to 1d (got {})", self.identity.check_interval),
                &["identity.check-interval"],
            );
        }

        if let Some(t) = &self.tunnel {
            if t.hub_subnets.is_empty() {
                broken(
                    "tunnel.hub-subnets",
                    "at least one hub subnet must be routed through the tunnel".into(),
                    &["tunnel.hub-subnets"],
                );
            }
            if !(1280..=1420).contains(&t.mtu) {
                broken(
                    "tunnel.mtu",
                    format!("the tunnel MTU must be 1280 to 1420 (got {})", t.mtu),
                    &["tunnel.mtu"],
                );
            }
            if t.probe_failures == 0 {
                broken(
                    "tunnel.probe-failures",
                    "must be at least 1".into(),
                    &["tunnel.probe-failures"],
                );
            }
            let probe = *t.health_url.addr().ip();
            if !t.hub_subnets.iter().any(|net| net.contains(probe)) {
                broken(
                    "tunnel.health-url",
                    format!(
                        "{probe} is not in any of tunnel.hub-subnets, so it would not be probed through the tunnel"
                    ),
                    &["tunnel.health-url", "tunnel.hub-subnets"],
                );
            }
            if let Some(server) = t.time_server {
                let inside = match server.ip() {
                    std::net::IpAddr::V4(ip) => t.hub_subnets.iter().any(|net| net.contains(ip)),
                    std::net::IpAddr::V6(_) => false,
                };
                if !inside {
                    broken(
                        "tunnel.time-server",
                        format!(
                            "{} is not in any of tunnel.hub-subnets, so it would not be asked through the tunnel",
                            server.ip()
                        ),
                        &["tunnel.time-server", "tunnel.hub-subnets"],
                    );
                }
            }
            if t.time_check_interval.get() < Duration::from_secs(1) {
                broken(
                    "tunnel.time-check-interval",
                    "must be at least 1s".into(),
                    &["tunnel.time-check-interval"],
                );
            }
            if t.userspace_implementation.trim().is_empty()
                || t.userspace_implementation.chars().any(char::is_whitespace)
            {
                broken(
                    "tunnel.userspace-implementation",
                    "must be a command name or an absolute path, without spaces".into(),
                    &["tunnel.userspace-implementation"],
                );
            }
            if t.persistent_keepalive.get() > Duration::from_secs(65535) {
                broken(
                    "tunnel.persistent-keepalive",
                    "must be at most 65535s".into(),
                    &["tunnel.persistent-keepalive"],
                );
            }
            // The egress kill switch (issue 13): patient data goes to the network only
            // through the tunnel, so every address it goes to must be in the hub subnets
            // (the firewall lets hub subnets out only by the tunnel interface). A DNS name is
            // refused: it could resolve outside them at run time, and a check of it here
            // would prove nothing.
            let in_hub = |ip: std::net::Ipv4Addr| t.hub_subnets.iter().any(|n| n.contains(ip));
            let outside = |what: &str| {
                format!(
                    "{what} is not in any of tunnel.hub-subnets: with a tunnel, patient data goes to the network only through it"
                )
            };
            if let Some(url) = &self.consent.fhir_url {
                let ip = *url.addr().ip();
                if !in_hub(ip) {
                    broken(
                        "consent.fhir-url",
                        outside(&ip.to_string()),
                        &["consent.fhir-url", "tunnel.hub-subnets"],
                    );
                }
            }
            if let Some(d) = &self.dicom {
                let ip = d.pacs.address.ip();
                let inside = match ip {
                    std::net::IpAddr::V4(v4) => in_hub(v4),
                    // The hub subnets are IPv4.
                    std::net::IpAddr::V6(_) => false,
                };
                if !inside {
                    broken(
                        "dicom.pacs.address",
                        outside(&ip.to_string()),
                        &["dicom.pacs.address", "tunnel.hub-subnets"],
                    );
                }
            }
            if let Some(addr) = self.audit.repository.filter(|_| self.audit.enabled) {
                let inside = match addr.ip() {
                    std::net::IpAddr::V4(v4) => in_hub(v4),
                    std::net::IpAddr::V6(_) => false,
                };
                if !inside {
                    broken(
                        "audit.repository",
                        outside(&addr.ip().to_string()),
                        &["audit.repository", "tunnel.hub-subnets"],
                    );
                }
            }
            if let Some(url) = self
                .update
                .channel_url
                .as_ref()
                .filter(|_| self.update.enabled)
            {
                let host = url.host();
                match host.parse::<std::net::Ipv4Addr>() {
                    Ok(ip) if in_hub(ip) => {}
                    Ok(ip) => broken(
                        "update.channel-url",
                        outside(&ip.to_string()),
                        &["update.channel-url", "tunnel.hub-subnets"],
                    ),
                    Err(_) => broken(
                        "update.channel-url",
                        format!(
                            "{host} is a DNS name: with a tunnel, the channel must be an IPv4 address in tunnel.hub-subnets (a name could resolve outside the tunnel)"
                        ),
                        &["update.channel-url", "tunnel.hub-subnets"],
                    ),
                }
            }
            if let Some(url) = self.ssmix2.as_ref().and_then(|x| x.replica.url.as_ref()) {
                let host = url.host();
                match host.parse::<std::net::Ipv4Addr>() {
                    Ok(ip) if in_hub(ip) => {}
                    Ok(ip) => broken(
                        "ssmix2.replica.url",
                        outside(&ip.to_string()),
                        &["ssmix2.replica.url", "tunnel.hub-subnets"],
                    ),
                    Err(_) => broken(
                        "ssmix2.replica.url",
                        format!(
                            "{host} is a DNS name: with a tunnel, the replica must be an IPv4 address in tunnel.hub-subnets (a name could resolve outside the tunnel)"
                        ),
                        &["ssmix2.replica.url", "tunnel.hub-subnets"],
                    ),
                }
            }
        }

        if let Some(d) = &self.dicom
            && !(1..=8).contains(&d.forward_associations)
        {
            broken(
                "dicom.forward-associations",
                format!("must be 1 to 8 (got {})", d.forward_associations),
                &["dicom.forward-associations"],
            );
        }
        if let Some(d) = &self.dicom
            && let Some(list) = &d.pacs.commitment_reports_from
        {
            if !d.pacs.storage_commitment {
                broken(
                    "dicom.pacs.commitment-reports-from",
                    "is only for storage-commitment = true".into(),
                    &["dicom.pacs.commitment-reports-from"],
                );
            } else if !(1..=8).contains(&list.len()) {
                broken(
                    "dicom.pacs.commitment-reports-from",
                    format!("must list 1 to 8 callers (got {})", list.len()),
                    &["dicom.pacs.commitment-reports-from"],
                );
            }
        }
        if let Some(d) = &self.dicom
            && d.pacs.storage_commitment
            && !(Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600))
                .contains(&d.pacs.commitment_timeout.get())
        {
            broken(
                "dicom.pacs.commitment-timeout",
                "must be 1s to 7 days".into(),
                &["dicom.pacs.commitment-timeout"],
            );
        }
        if let Some(d) = &self.dicom
            && d.query_retrieve
            && d.allowed_callers.as_ref().is_none_or(Vec::is_empty)
        {
            broken(
                "dicom.query-retrieve",
                "query/retrieve shows the network's data of the clinic's patients: it needs [[dicom.allowed-callers]] (the viewers allowed to ask), or query-retrieve = false".into(),
                &["dicom.query-retrieve", "dicom.allowed-callers"],
            );
        }
        if let Some(d) = &self.dicom
            && d.patient_ids == PatientIdPolicy::Translate
            && self.site.network_ids.is_none()
        {
            broken(
                "dicom.patient-ids",
                "translating patient IDs needs [site.network-ids] (the network's issuer and OID); set it, or patient-ids = \"as-is\"".into(),
                &["dicom.patient-ids", "site.network-ids"],
            );
        }

        {
            let c = &self.consent;
            let files = TlsClient {
                section: "consent",
                url_key: "consent.fhir-url",
                ca_file: c.ca_file.is_some(),
                cert_file: c.client_cert_file.is_some(),
                key_file: c.client_key_file.is_some(),
                identity: c.client_identity,
            };
            tls_link_rules(
                &files,
                c.fhir_url.as_ref().is_some_and(FhirUrl::is_tls),
                "only with an https consent.fhir-url (plain http has no TLS)",
                self.identity.enabled,
                &mut broken,
            );
        }

        if let Some(p) = self.dicom.as_ref().map(|d| &d.pacs) {
            let files = TlsClient {
                section: "dicom.pacs",
                url_key: "dicom.pacs.tls",
                ca_file: p.ca_file.is_some(),
                cert_file: p.client_cert_file.is_some(),
                key_file: p.client_key_file.is_some(),
                identity: p.client_identity,
            };
            tls_link_rules(
                &files,
                p.tls,
                "only with dicom.pacs.tls = true",
                self.identity.enabled,
                &mut broken,
            );
        }

        if self.audit.enabled {
            let a = &self.audit;
            if a.repository.is_none() {
                broken(
                    "audit.repository",
                    "required with audit.enabled = true".into(),
                    &["audit.repository", "audit.enabled"],
                );
            }
            let files = TlsClient {
                section: "audit",
                url_key: "audit.repository",
                ca_file: a.ca_file.is_some(),
                cert_file: a.client_cert_file.is_some(),
                key_file: a.client_key_file.is_some(),
                identity: a.client_identity,
            };
            tls_client_rules(&files, self.identity.enabled, &mut broken);
            if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&a.timeout.get()) {
                broken(
                    "audit.timeout",
                    "must be between 1s and 5m".into(),
                    &["audit.timeout"],
                );
            }
        }

        if self.update.enabled {
            let u = &self.update;
            if u.channel_url.is_none() {
                broken(
                    "update.channel-url",
                    "required with update.enabled = true".into(),
                    &["update.channel-url", "update.enabled"],
                );
            }
            let files = TlsClient {
                section: "update",
                url_key: "update.channel-url",
                ca_file: u.ca_file.is_some(),
                cert_file: u.client_cert_file.is_some(),
                key_file: u.client_key_file.is_some(),
                identity: u.client_identity,
            };
            tls_client_rules(&files, self.identity.enabled, &mut broken);
            if u.compatible.is_empty()
                || u.compatible.len() > 64
                || !u.compatible.bytes().all(|b| b.is_ascii_graphic())
            {
                broken(
                    "update.compatible",
                    "must be 1 to 64 printable ASCII characters without spaces (RAUC's compatible)"
                        .into(),
                    &["update.compatible"],
                );
            }
            if !(Duration::from_secs(60)..=Duration::from_secs(86_400))
                .contains(&u.check_interval.get())
            {
                broken(
                    "update.check-interval",
                    "must be between 1m and 1d".into(),
                    &["update.check-interval"],
                );
            }
            if !(Duration::from_secs(60)..=Duration::from_secs(3600))
                .contains(&u.health_limit.get())
            {
                broken(
                    "update.health-limit",
                    "must be between 1m and 1h".into(),
                    &["update.health-limit"],
                );
            }
        }

        if self.console.enabled {
            let c = &self.console;
            if !(Duration::from_secs(60)..=Duration::from_secs(8 * 3600))
                .contains(&c.idle_timeout.get())
            {
                broken(
                    "console.idle-timeout",
                    "must be between 1m and 8h".into(),
                    &["console.idle-timeout"],
                );
            }
            if !(3..=20).contains(&c.lockout_after) {
                broken(
                    "console.lockout-after",
                    "must be between 3 and 20 failed logins".into(),
                    &["console.lockout-after"],
                );
            }
            if !(Duration::from_secs(60)..=Duration::from_secs(86_400))
                .contains(&c.lockout_for.get())
            {
                broken(
                    "console.lockout-for",
                    "must be between 1m and 24h".into(),
                    &["console.lockout-for"],
                );
            }
            if c.cert_file.is_some() != c.key_file.is_some() {
                broken(
                    "console.cert-file",
                    "set both cert-file and key-file, or neither (a self-signed certificate)"
                        .into(),
                    &["console.cert-file", "console.key-file"],
                );
            }
        }

        if let Some(x) = &self.ssmix2 {
            let r = &x.replica;
            match (&r.directory, &r.url) {
                (None, None) | (Some(_), Some(_)) => broken(
                    "ssmix2.replica",
                    "set exactly one of directory and url".into(),
                    &["ssmix2.replica.directory", "ssmix2.replica.url"],
                ),
                (None, Some(_)) => tls_client_rules(
                    &TlsClient {
                        section: "ssmix2.replica",
                        url_key: "ssmix2.replica.url",
                        ca_file: r.ca_file.is_some(),
                        cert_file: r.client_cert_file.is_some(),
                        key_file: r.client_key_file.is_some(),
                        identity: r.client_identity,
                    },
                    self.identity.enabled,
                    &mut broken,
                ),
                (Some(dir), None) => {
                    if r.client_identity {
                        broken(
                            "ssmix2.replica.client-identity",
                            "only with ssmix2.replica.url (a directory replica has no TLS)".into(),
                            &["ssmix2.replica.client-identity", "ssmix2.replica.directory"],
                        );
                    }
                    if dir.as_path().starts_with(x.storage.as_path())
                        || x.storage.as_path().starts_with(dir.as_path())
                    {
                        broken(
                            "ssmix2.replica.directory",
                            "the replica must not be inside the storage, nor the storage inside the replica".into(),
                            &["ssmix2.replica.directory", "ssmix2.storage"],
                        );
                    }
                }
            }
            if x.share.is_some() && x.watch == WatchMode::Inotify {
                broken(
                    "ssmix2.watch",
                    "an SMB share delivers no inotify events; use auto or poll".into(),
                    &["ssmix2.watch", "ssmix2.share"],
                );
            }
            if x.scan_interval.get() < Duration::from_secs(1) {
                broken(
                    "ssmix2.scan-interval",
                    "must be at least 1s".into(),
                    &["ssmix2.scan-interval"],
                );
            }
        }

        if let Some(d) = &self.dicom {
            if !(16384..=1_048_576).contains(&d.max_pdu) {
                broken(
                    "dicom.max-pdu",
                    "must be 16384 to 1048576".into(),
                    &["dicom.max-pdu"],
                );
            }
            if !(64..=16384).contains(&d.header_limit_kib) {
                broken(
                    "dicom.header-limit-kib",
                    format!("must be 64 to 16384 (got {})", d.header_limit_kib),
                    &["dicom.header-limit-kib"],
                );
            }
            if d.max_associations == 0 {
                broken(
                    "dicom.max-associations",
                    "must be at least 1".into(),
                    &["dicom.max-associations"],
                );
            }
            if d.listen.port() == 0 || d.pacs.address.port() == 0 {
                broken(
                    "dicom.listen",
                    "ports must not be 0".into(),
                    &["dicom.listen", "dicom.pacs.address"],
                );
            }
        }

        if let Some(n) = &self.network {
            self.network_rules(n, &mut broken);
        }

        let sup = &self.supervisor;
        if sup.backoff_initial > sup.backoff_max {
            broken(
                "supervisor.backoff-initial",
                format!(
                    "backoff-initial ({}) must not be longer than backoff-max ({})",
                    sup.backoff_initial, sup.backoff_max
                ),
                &["supervisor.backoff-initial", "supervisor.backoff-max"],
            );
        }
        if sup.crash_limit == 0 {
            broken(
                "supervisor.crash-limit",
                "crash-limit must be at least 1".into(),
                &["supervisor.crash-limit"],
            );
        }

        if let Some(metrics) = &self.metrics
            && metrics.listen.port() == 0
        {
            broken(
                "metrics.listen",
                "the metrics port must not be 0 (pick a fixed port such as 9464)".into(),
                &["metrics.listen"],
            );
        }

        for (name, drill) in &self.drill {
            if drill.exit_code == 0 {
                let key = format!("drill.{name}.exit-code");
                broken(
                    &key,
                    "exit-code must not be 0: a drill's exit is a crash".into(),
                    &[&key],
                );
            }
        }

        out
    }

    /// Every secret file named in the config, with the dotted key that names it.
    pub fn secret_files(&self) -> Vec<(&'static str, &SecretFile)> {
        let mut out = Vec::new();
        if let Some(file) = &self.privacy.id_hash_key_file {
            out.push(("privacy.id-hash-key-file", file));
        }
        if let Some(file) = &self.consent.client_key_file {
            out.push(("consent.client-key-file", file));
        }
        if let Some(file) = self
            .ssmix2
            .as_ref()
            .and_then(|x| x.replica.client_key_file.as_ref())
        {
            out.push(("ssmix2.replica.client-key-file", file));
        }
        if let Some(share) = self.ssmix2.as_ref().and_then(|x| x.share.as_ref()) {
            out.push(("ssmix2.share.password-file", &share.password_file));
        }
        if let Some(tunnel) = &self.tunnel {
            if let Some(file) = &tunnel.preshared_key_file {
                out.push(("tunnel.preshared-key-file", file));
            }
            if let Some(file) = &tunnel.private_key_file {
                out.push(("tunnel.private-key-file", file));
            }
        }
        out
    }
}

/// Which of a TLS client's settings a section gives (`[consent]`, `[ssmix2.replica]`).
struct TlsClient {
    section: &'static str,
    url_key: &'static str,
    ca_file: bool,
    cert_file: bool,
    key_file: bool,
    identity: bool,
}

impl TlsClient {
    /// Each setting's full key and whether it is given.
    fn given(&self) -> [(String, bool); 4] {
        let key = |name: &str| format!("{}.{name}", self.section);
        [
            (key("ca-file"), self.ca_file),
            (key("client-cert-file"), self.cert_file),
            (key("client-key-file"), self.key_file),
            (key("client-identity"), self.identity),
        ]
    }
}

/// The rules of a link that may run over TLS: with `tls`, [`tls_client_rules`]; without,
/// none of the TLS settings (each one given is `without_tls`).
fn tls_link_rules(
    c: &TlsClient,
    tls: bool,
    without_tls: &str,
    identity_enabled: bool,
    broken: &mut impl FnMut(&str, String, &[&str]),
) {
    if tls {
        tls_client_rules(c, identity_enabled, broken);
        return;
    }
    for (key, given) in c.given() {
        if given {
            broken(&key, without_tls.to_owned(), &[&key, c.url_key]);
        }
    }
}

/// The rules of a link with mutual TLS: the CA always; then either the box's identity from
/// enrollment (`client-identity`, which needs `[identity]`) or both a certificate and a key
/// file, never both ways.
fn tls_client_rules(
    c: &TlsClient,
    identity_enabled: bool,
    broken: &mut impl FnMut(&str, String, &[&str]),
) {
    let [ca, cert, key, identity] = c.given();
    if !c.ca_file {
        let why = if c.identity {
            format!("required with {}", c.url_key)
        } else {
            format!("required with {} (or client-identity = true)", c.url_key)
        };
        broken(&ca.0, why, &[&ca.0, c.url_key]);
    }
    if c.identity {
        for (k, given) in [&cert, &key] {
            if *given {
                broken(
                    k,
                    "not with client-identity (the box's own certificate is used)".into(),
                    &[k, &identity.0],
                );
            }
        }
        if !identity_enabled {
            broken(
                &identity.0,
                "needs [identity] enabled (the box's certificate comes from enrollment)".into(),
                &[&identity.0, "identity.enabled"],
            );
        }
    } else {
        for (k, given) in [&cert, &key] {
            if !*given {
                broken(
                    k,
                    format!("required with {} (or client-identity = true)", c.url_key),
                    &[k, c.url_key],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
