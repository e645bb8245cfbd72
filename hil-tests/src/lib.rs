//! Test network harness and hardware-in-the-loop tests.
//!
//! - [`testnet`]: [`TestNet`](testnet::TestNet), a guard that brings up a hub, the box and
//!   a clinic LAN device in network namespaces, with a WireGuard hub (wireguard-go) and a
//!   health endpoint, and tears it all down on drop. Used by this crate's tests
//!   (`tests/testnet.rs`), by other crates' network tests, and by the `testnet` binary
//!   (`testnet up` for a shell, `testnet clean`).
//! - [`health`]: the hub's health server (`testnet serve-health ADDR`) and a tiny HTTP
//!   client (`testnet get URL`) to probe it from inside a namespace.
//! - [`fhir`]: a strict, small FHIR R4 server (Patient, Organization, Consent, AuditEvent;
//!   validated against the FHIR JSON schema), the stand-in for the network's FHIR server
//!   (`testnet fhir-serve ADDR`).
//! - [`nginx`]: [`Nginx`](nginx::Nginx), a guard running a real nginx WebDAV server over
//!   HTTPS with client certificates (a test PKI of its own) on a loopback port, or on a
//!   given address inside a network namespace (the demo's hub; root), for the SS-MIX2
//!   replica's WebDAV transport; needs `nginx` and `openssl`.
//! - [`testssl`]: testssl.sh against a TLS endpoint the box connects to, and the
//!   appliance's TLS policy checked on its findings; needs `testssl.sh`.
//! - [`orthanc`]: [`Orthanc`](orthanc::Orthanc), a guard running a real Orthanc PACS in a
//!   network namespace of its own (root), with a REST helper and commands for dcmtk's
//!   tools as modality or viewer inside it, for the DICOM bridge; needs `orthanc`, `dcmtk`.
//! - [`dicom_files`]: DICOM test files: pydicom's (a pinned pip install in a cache outside
//!   the repository) and instances generated with dcmtk (a Japanese `\ISO 2022 IR 87`
//!   CT, a multi-frame instance of a requested size), and a reader of raw element bytes.
//!
//! - [`netns`]: work in a named network namespace from the test process, on a thread
//!   that joins it (`setns`), for every harness here and the DICOM benchmark's sender.
//! - [`browser`]: [`Browser`](browser::Browser), Debian's Chromium headless under
//!   chromedriver (WebDriver), with axe-core's check and screenshots, for the console.
//!
//! Everything here is test support: it needs root and `/dev/net/tun`, and it runs `ip`,
//! `nft`, `wg` and `wireguard-go`. See `hil-tests/README.md`.

#![forbid(unsafe_code)]
// Blocking waits (polling for a socket, a grace period before SIGKILL) on plain threads,
// never inside an async runtime: this crate has none.
#![expect(
    clippy::disallowed_methods,
    reason = "test harness: waits on processes from plain threads, no async runtime"
)]

pub mod browser;
pub mod dicom_files;
pub mod fhir;
pub mod health;
pub mod netns;
pub mod nginx;
pub mod orthanc;
pub mod qemu;
pub mod rsyslog;
pub mod samba;
pub mod testnet;
pub mod testssl;
