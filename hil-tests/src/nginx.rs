//! A real nginx WebDAV server over HTTPS with client certificates, for tests of the
//! SS-MIX2 replica's WebDAV transport.
//!
//! [`Nginx::start`] makes a temporary directory it owns and, in it:
//!
//! - a test PKI ([`Pki`], made with the `openssl` command line): a CA, a server
//!   certificate for `127.0.0.1` and `localhost` (and the [`Options::listen`] address),
//!   and a client certificate, both signed by the CA (P-256 keys, valid for 7 days);
//! - `nginx.conf`: `daemon off`, one worker, pid file, logs and temp paths in the
//!   directory; `listen 127.0.0.1:PORT ssl` on a free loopback port (or `listen ADDR ssl`
//!   for [`Options::listen`]); `ssl_verify_client on` against the CA; WebDAV
//!   (`dav_methods PUT DELETE MKCOL COPY MOVE`, `create_full_put_path on` unless
//!   [`Options`] say otherwise) under [`LOCATION`], stored in `www/ssmix2/`
//!   ([`Nginx::data_root`]); `client_max_body_size 64m` unless [`Options`] says otherwise. As root, `user root;` lets the
//!   worker write the data root (the directory is mode 0700).
//!
//! It then runs `nginx -p DIR -c DIR/nginx.conf -e DIR/error.log` as a child in its own
//! process group and waits until a TLS handshake with the client certificate succeeds.
//! Dropping the guard sends SIGTERM to that nginx master (by pid), waits up to 5 s, then
//! SIGKILLs its process group, and removes the directory.
//!
//! With [`Options::netns`] nginx runs inside a named network namespace (`ip netns exec
//! NAME nginx ...`; `ip` execs, so the child is nginx's master), typically the test
//! network's hub on the hub network's address, so the box reaches it through the tunnel:
//!
//! ```ignore
//! let nginx = Nginx::start_with(&Options {
//!     listen: Some(SocketAddrV4::new(net.plan().hub_net_addr.addr, 8443)),
//!     netns: Some(net.ns(Host::Hub).to_owned()),
//!     ..Options::default()
//! })?;
//! // nginx.base_url() == "https://10.98.0.1:8443/ssmix2/"
//! ```
//!
//! The readiness handshake then runs on a short-lived thread that joined that namespace
//! (`setns`), and the free-port probe too when no address is given. The test network does
//! not track this nginx: declare the guard after the `TestNet`, so it is dropped first.
//!
//! Needs the Debian packages `nginx` (its DAV module is built in) and `openssl`; no root
//! and no network beyond loopback, except for [`Options::netns`] (root and `ip`).

use crate::testnet::cmd::display;
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::unistd::geteuid;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::testnet::error_chain;

/// The protocols the test network's TLS servers offer: the appliance's policy (TLS 1.3, or
/// 1.2 with ECDHE and AEAD ciphers only), which `hil_tests::testssl` checks.
pub const POLICY_PROTOCOLS: &str = "TLSv1.2 TLSv1.3";
/// The TLS 1.2 ciphers they offer (TLS 1.3's are all AEAD).
pub const POLICY_CIPHERS: &str = "ECDHE+AESGCM:ECDHE+CHACHA20";

/// The URL path under which nginx serves WebDAV.
pub const LOCATION: &str = "/ssmix2/";

/// Where the tools are looked up (and the only `PATH` they get).
const TOOL_PATH: &str = crate::testnet::cmd::CLEAN_PATH;

/// How long nginx may take to serve after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long nginx may take to stop after SIGTERM before its group is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Start attempts (a new port each) when the free port was taken in the meantime.
const START_ATTEMPTS: usize = 5;

/// How much of nginx's error log goes into an error.
const LOG_IN_ERROR: usize = 2000;

/// Why the nginx guard could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum NginxError {
    #[error(
        "{program} is not installed: not found in {TOOL_PATH} (Debian package `{package}`; \
         `cargo xtask test` installs it, or: apt-get install -y --no-install-recommends {package})"
    )]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("{nginx} has no WebDAV module (`nginx -V` lacks --with-http_dav_module)")]
    NoDav { nginx: PathBuf },
    #[error("cannot set up {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("the path {0} is not plain enough for nginx.conf (use letters, digits, `/._-`)")]
    OddPath(PathBuf),
    #[error("bad nginx option {option} = {value}: {reason}")]
    BadOption {
        option: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("cannot enter the network namespace {name}")]
    Netns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("nginx exited while starting ({status}); error log and stderr: {log}")]
    Exited { status: ExitStatus, log: String },
    #[error(
        "nginx did not accept a TLS connection within {timeout:?} (last attempt: {last}); \
         error log: {log}"
    )]
    NotReady {
        timeout: Duration,
        last: String,
        log: String,
    },
    #[error("cannot load the test client certificate for the readiness check")]
    Tls(#[source] rustls::Error),
    #[error("cannot stop nginx (pid {pid})")]
    Stop {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// A test PKI in a directory: a CA and two certificates it signed (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Generates, in `dir` (created if missing): `ca.pem`/`ca.key`, `server.pem`/
    /// `server.key` (SAN `IP:127.0.0.1`, `DNS:localhost`; serverAuth) and `client.pem`/
    /// `client.key` (clientAuth). Every call makes a new CA.
    pub fn generate(dir: &Path) -> Result<Pki, NginxError> {
        Pki::generate_for(dir, &[])
    }

    /// [`Pki::generate`] with `server_ips` in the server certificate's SAN too (after
    /// `IP:127.0.0.1, DNS:localhost`; 127.0.0.1 and duplicates are left out).
    pub fn generate_for(dir: &Path, server_ips: &[Ipv4Addr]) -> Result<Pki, NginxError> {
        let openssl = find_tool("openssl", "openssl")?;
        fs::create_dir_all(dir).map_err(io_err("the PKI directory", dir))?;
        let cnf = dir.join("openssl.cnf");
        fs::write(&cnf, openssl_cnf(server_ips))
            .map_err(io_err("the OpenSSL configuration", &cnf))?;
        let pki = Pki {
            dir: dir.to_owned(),
        };
        let run = |args: &[&str]| -> Result<(), NginxError> {
            let mut command = Command::new(&openssl);
            command
                .env_clear()
                .env("PATH", TOOL_PATH)
                .env("OPENSSL_CONF", &cnf)
                .current_dir(dir)
                .args(args);
            run_quietly(&mut command)
        };
        let new_key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let cnf_arg = ["-config", "openssl.cnf"];
        run(&[
            &["req", "-x509", "-new"][..],
            &new_key,
            &cnf_arg,
            &["-extensions", "ca", "-subj", "/CN=tsunagi test CA"],
            &["-days", "7", "-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat())?;
        for (name, cn, serial) in [
            ("server", "localhost", "0x5e11"),
            ("client", "tsunagi test client", "0xc11e"),
        ] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let subject = format!("/CN={cn}");
            run(&[
                &["req", "-new"][..],
                &new_key,
                &cnf_arg,
                &["-subj", &subject, "-keyout", &key, "-out", &csr],
            ]
            .concat())?;
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                serial,
                "-days",
                "7",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                name,
                "-out",
                &pem,
            ])?;
        }
        Ok(pki)
    }

    /// Issues another server certificate from this CA, `NAME.pem`/`NAME.key` in the PKI's
    /// directory, naming only `ips` (SAN). `expired`: valid for a day that ended 29 days
    /// ago (openssl runs under libfaketime, Debian package `faketime`). For the refusal
    /// tests: a certificate for another address, or an expired one.
    pub fn issue_server(
        &self,
        name: &str,
        ips: &[Ipv4Addr],
        expired: bool,
    ) -> Result<(PathBuf, PathBuf), NginxError> {
        let openssl = find_tool("openssl", "openssl")?;
        let san = ips
            .iter()
            .map(|ip| format!("IP:{ip}"))
            .collect::<Vec<_>>()
            .join(", ");
        let cnf = self.dir.join(format!("{name}.cnf"));
        fs::write(&cnf, OPENSSL_CNF.replace("@SAN@", &san))
            .map_err(io_err("the OpenSSL configuration", &cnf))?;
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let cnf_name = format!("{name}.cnf");
        let mut req = Command::new(&openssl);
        req.args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-config",
            &cnf_name,
            "-subj",
            "/CN=tsunagi test server",
        ])
        .args(["-keyout", &key, "-out", &csr]);
        let mut sign = if expired {
            let mut c = Command::new(find_tool("faketime", "faketime")?);
            c.arg("30 days ago").arg(&openssl);
            c
        } else {
            Command::new(&openssl)
        };
        sign.args([
            "x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key",
        ])
        .args([
            "-set_serial",
            "0x5e12",
            "-days",
            if expired { "1" } else { "7" },
        ])
        .args(["-extfile", &cnf_name, "-extensions", "server", "-out", &pem]);
        for command in [&mut req, &mut sign] {
            command
                .env_clear()
                .env("PATH", TOOL_PATH)
                .env("OPENSSL_CONF", &cnf)
                .current_dir(&self.dir);
            run_quietly(command)?;
        }
        Ok((self.dir.join(pem), self.dir.join(key)))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The CA certificate (PEM): what clients and nginx trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
}

/// The OpenSSL configuration of [`Pki::generate_for`] (the server's SAN: 127.0.0.1,
/// localhost and `server_ips`): no dependence on the system's file.
fn openssl_cnf(server_ips: &[Ipv4Addr]) -> String {
    let mut san = String::from("IP:127.0.0.1, DNS:localhost");
    let mut seen = vec![Ipv4Addr::LOCALHOST];
    for &ip in server_ips {
        if !seen.contains(&ip) {
            seen.push(ip);
            san.push_str(&format!(", IP:{ip}"));
        }
    }
    OPENSSL_CNF.replace("@SAN@", &san)
}

/// [`openssl_cnf`] before the SAN is filled in.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = @SAN@
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// How the server behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `create_full_put_path on` (the default): a `PUT` makes missing folders. Off: a
    /// `PUT` into a missing folder fails (nginx 1.22 answers `500`), so a client must
    /// `MKCOL` first. nginx's `MOVE` makes the destination's folders either way.
    pub create_full_put_path: bool,
    /// Where nginx listens. `None` (the default): `127.0.0.1` on a free port, probed
    /// first and retried with a new one if it was taken meanwhile. `Some(addr)`: exactly
    /// there, no probe and no retry (a taken port is an error, [`NginxError::Exited`]
    /// with "Address already in use" in its log); the port must not be 0. The address
    /// goes into the server certificate's SAN, [`Nginx::base_url`] and the readiness
    /// check (for `0.0.0.0` those use `127.0.0.1`).
    pub listen: Option<SocketAddrV4>,
    /// The named network namespace (`/run/netns/NAME`, as `ip netns add` makes them) to
    /// run nginx in: `ip netns exec NAME nginx ...` (needs root and `ip`). The readiness
    /// check (and the free-port probe) run inside it too. `None` (the default): the
    /// current namespace.
    pub netns: Option<String>,
    /// The PKI whose server certificate nginx presents (it must name the listen address),
    /// and whose CA it trusts for clients: a network's own, shared with its other servers.
    /// `None` (the default): a new one in nginx's directory.
    pub pki: Option<Pki>,
    /// Another CA (PEM file) whose client certificates nginx accepts too, beside the
    /// PKI's: e.g. the network's box-identity CA, for boxes that present the certificate
    /// they enrolled for.
    pub extra_client_ca: Option<PathBuf>,
    /// A TLS front for a plain HTTP server instead of WebDAV: every request goes to this
    /// upstream (`proxy_pass`, HTTP/1.1, with the client's `Host` and
    /// `X-Forwarded-Proto: https`), after the same client-certificate check. E.g. the test
    /// network's FHIR server.
    pub proxy_to: Option<SocketAddr>,
    /// What TLS nginx offers, `(ssl_protocols, ssl_ciphers)` in nginx's words. `None` (the
    /// default): the appliance's policy, [`POLICY_PROTOCOLS`] and [`POLICY_CIPHERS`]. A
    /// weaker offer is for the refusal tests (the readiness check then waits for the port
    /// only).
    pub tls_offer: Option<(String, String)>,
    /// A server certificate and key (PEM files) presented instead of the PKI's: a bad one
    /// (expired, for another name, from another CA) for the refusal tests. The readiness
    /// check then waits for the port only.
    pub server_cert: Option<(PathBuf, PathBuf)>,
    /// `client_max_body_size` in bytes: a larger `PUT` is refused with `413`. `None` (the
    /// default): 64 MiB.
    pub max_body_bytes: Option<u64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            create_full_put_path: true,
            listen: None,
            netns: None,
            pki: None,
            extra_client_ca: None,
            proxy_to: None,
            tls_offer: None,
            server_cert: None,
            max_body_bytes: None,
        }
    }
}

/// A running nginx WebDAV server (see the module docs). Stops on drop.
#[derive(Debug)]
pub struct Nginx {
    child: Option<Child>,
    /// Where clients connect: the listen address (`127.0.0.1` for `0.0.0.0`).
    addr: SocketAddrV4,
    netns: Option<String>,
    pki: Pki,
    data_root: PathBuf,
    path: PathBuf,
    /// Removes the directory on drop (after the process is stopped); taken by `stop`.
    dir: Option<tempfile::TempDir>,
}

impl Nginx {
    /// [`Nginx::start_with`] the default [`Options`].
    pub fn start() -> Result<Nginx, NginxError> {
        Nginx::start_with(&Options::default())
    }

    /// Generates the PKI, writes the configuration, starts nginx on a free loopback port
    /// (or [`Options::listen`], in [`Options::netns`]) and waits until it serves TLS (at
    /// most 10 s).
    pub fn start_with(options: &Options) -> Result<Nginx, NginxError> {
        let nginx = find_tool("nginx", "nginx")?;
        check_dav_module(&nginx)?;
        if let Some(listen) = options.listen
            && listen.port() == 0
        {
            return Err(NginxError::BadOption {
                option: "listen",
                value: listen.to_string(),
                reason: "the port must not be 0 (leave `listen` unset for a free port)",
            });
        }
        let netns = match &options.netns {
            Some(name) => Some(Netns::open(name, find_tool("ip", "iproute2")?)?),
            None => None,
        };
        let dir = tempfile::Builder::new()
            .prefix("tsunagi-nginx-")
            .tempdir()
            .map_err(io_err("the temporary directory", &std::env::temp_dir()))?;
        let path = dir.path().to_owned();
        plain(&path)?;
        let server_ips: Vec<Ipv4Addr> = options
            .listen
            .map(|listen| *listen.ip())
            .filter(|ip| !ip.is_unspecified())
            .into_iter()
            .collect();
        let pki = match &options.pki {
            Some(pki) => pki.clone(),
            None => Pki::generate_for(&path.join("pki"), &server_ips)?,
        };
        // The client CAs nginx trusts: the PKI's, and the extra one.
        let client_cas = path.join("client-cas.pem");
        let mut cas = fs::read(pki.ca_cert()).map_err(io_err("the PKI's CA", &pki.ca_cert()))?;
        if let Some(extra) = &options.extra_client_ca {
            cas.extend(fs::read(extra).map_err(io_err("the extra client CA", extra))?);
        }
        fs::write(&client_cas, cas).map_err(io_err("the client CAs", &client_cas))?;
        let data_root = path.join("www").join(LOCATION.trim_matches('/'));
        for sub in [data_root.clone(), path.join("tmp")] {
            fs::create_dir_all(&sub).map_err(io_err("a directory for nginx", &sub))?;
        }
        let client = readiness_client(&pki)?;
        let conf = path.join("nginx.conf");

        let mut attempt = 0;
        loop {
            attempt += 1;
            let listen = match options.listen {
                Some(listen) => listen,
                None => {
                    let port = in_netns(netns.as_ref(), free_port)?
                        .map_err(io_err("a free port on", Path::new("127.0.0.1")))?;
                    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
                }
            };
            let addr = if listen.ip().is_unspecified() {
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, listen.port())
            } else {
                listen
            };
            fs::write(&conf, render_conf(&path, &pki, listen, options))
                .map_err(io_err("the nginx configuration", &conf))?;
            // A fresh error log per attempt: a clash is recognised by its message.
            let log = path.join("error.log");
            fs::write(&log, "").map_err(io_err("nginx's error log", &log))?;
            let mut child = spawn_nginx(&nginx, &path, &conf, netns.as_ref())?;
            // A deliberately bad certificate or offer fails the rustls handshake: the port.
            let client =
                (options.server_cert.is_none() && options.tls_offer.is_none()).then_some(&client);
            let ready = in_netns(netns.as_ref(), || {
                wait_ready(&mut child, &path, addr, client)
            })
            .and_then(|ready| ready);
            match ready {
                Ok(()) => {
                    return Ok(Nginx {
                        child: Some(child),
                        addr,
                        netns: options.netns.clone(),
                        pki,
                        data_root,
                        path,
                        dir: Some(dir),
                    });
                }
                // Someone took the port between our probe and nginx's bind: a new one.
                Err(NginxError::Exited { log, .. })
                    if options.listen.is_none()
                        && attempt < START_ATTEMPTS
                        && log.contains("Address already in use") => {}
                Err(e) => {
                    let _ = stop_child(child);
                    return Err(e);
                }
            }
        }
    }

    /// [`Nginx::start`], panicking with the whole error chain (for tests: a missing nginx
    /// is a failure, never a skip).
    pub fn start_for_test() -> Nginx {
        Nginx::start_for_test_with(&Options::default())
    }

    /// [`Nginx::start_with`], panicking like [`Nginx::start_for_test`].
    pub fn start_for_test_with(options: &Options) -> Nginx {
        match Nginx::start_with(options) {
            Ok(nginx) => nginx,
            Err(e) => panic!(
                "the nginx WebDAV test server did not start: {}",
                error_chain(&e)
            ),
        }
    }

    /// `https://ADDR:PORT/ssmix2/` (`https://127.0.0.1:PORT/ssmix2/` by default, else
    /// the [`Options::listen`] address): the WebDAV root, backed by [`Nginx::data_root`].
    pub fn base_url(&self) -> String {
        format!("https://{}{LOCATION}", self.addr)
    }

    /// Where clients connect (the listen address; `127.0.0.1` for `0.0.0.0`).
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The network namespace nginx runs in ([`Options::netns`]), `None` for the current.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The directory on nginx's disk where a request to `base_url() + "a/b"` lands
    /// (`data_root()/a/b`).
    pub fn data_root(&self) -> &Path {
        &self.data_root
    }

    /// The CA that signed the server and client certificates (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.pki.ca_cert()
    }

    /// A client certificate nginx accepts (PEM).
    pub fn client_cert_file(&self) -> PathBuf {
        self.pki.client_cert()
    }

    /// The key of [`Nginx::client_cert_file`] (PEM, PKCS#8).
    pub fn client_key_file(&self) -> PathBuf {
        self.pki.client_key()
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The guard's directory (configuration, PKI, data, logs).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The nginx master's pid (`None` once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// nginx's access log so far: one line per request (`"METHOD URI HTTP/1.1" STATUS`).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.path.join("access.log")).unwrap_or_default()
    }

    /// nginx's error log so far (for messages when a test fails).
    pub fn error_log(&self) -> String {
        read_log(&self.path)
    }

    /// Stops nginx and removes the directory, reporting problems (drop does the same and
    /// ignores them).
    pub fn stop(mut self) -> Result<(), NginxError> {
        if let Some(child) = self.child.take() {
            stop_child(child)?;
        }
        match self.dir.take() {
            Some(dir) => dir.close().map_err(io_err("the removal of", &self.path)),
            None => Ok(()),
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.error_log();
            if !log.is_empty() {
                eprintln!(
                    "nginx error log ({}):\n{}",
                    self.path.display(),
                    crate::testnet::cmd::tail(&log, LOG_IN_ERROR)
                );
            }
        }
        if let Some(child) = self.child.take() {
            let _ = stop_child(child);
        }
        // Then the TempDir field removes the directory.
    }
}

fn read_log(dir: &Path) -> String {
    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
}

/// The error log, then what nginx (or `ip netns exec`) wrote to stderr: why a start
/// failed.
fn startup_log(dir: &Path) -> String {
    let mut log = read_log(dir);
    let stderr = fs::read_to_string(dir.join("nginx.stderr")).unwrap_or_default();
    if !stderr.trim().is_empty() {
        log.push_str("stderr: ");
        log.push_str(&stderr);
    }
    log
}

/// A named network namespace to run nginx and its readiness check in.
struct Netns {
    name: String,
    /// `/run/netns/NAME`, open for `setns`.
    file: File,
    /// The `ip` tool, for `ip netns exec`.
    ip: PathBuf,
}

impl Netns {
    fn open(name: &str, ip: PathBuf) -> Result<Netns, NginxError> {
        if !crate::netns::is_plain_name(name) {
            return Err(NginxError::BadOption {
                option: "netns",
                value: name.to_owned(),
                reason: "not a namespace name (letters, digits, `._-`)",
            });
        }
        let file = crate::netns::open(name).map_err(|source| NginxError::Netns {
            name: name.to_owned(),
            source,
        })?;
        Ok(Netns {
            name: name.to_owned(),
            file,
            ip,
        })
    }
}

/// Runs `f` here (`netns` is `None`), or on a thread in the network namespace
/// ([`crate::netns::run_in`]).
fn in_netns<T: Send>(netns: Option<&Netns>, f: impl FnOnce() -> T + Send) -> Result<T, NginxError> {
    let Some(netns) = netns else {
        return Ok(f());
    };
    crate::netns::run_in(&netns.file, f).map_err(|source| NginxError::Netns {
        name: netns.name.clone(),
        source,
    })
}

/// Polls until a TLS handshake (with the client certificate, checking the server
/// certificate for `addr`'s IP) succeeds; without a client (a deliberately bad server
/// certificate), until a TCP connection is accepted.
fn wait_ready(
    child: &mut Child,
    dir: &Path,
    addr: SocketAddrV4,
    client: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(), NginxError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NginxError::Exited {
                status,
                log: crate::testnet::cmd::tail(&startup_log(dir), LOG_IN_ERROR),
            });
        }
        let attempt = match client {
            Some(client) => handshake(addr, client),
            None => {
                TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(1)).map(drop)
            }
        };
        let last = match attempt {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(NginxError::NotReady {
                timeout: START_TIMEOUT,
                last: format!("{addr}: {last}"),
                log: crate::testnet::cmd::tail(&startup_log(dir), LOG_IN_ERROR),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to the master, wait; SIGKILL its process group at the deadline; reap.
fn stop_child(child: Child) -> Result<(), NginxError> {
    let pid = child.id();
    crate::testnet::cmd::stop_child(child, STOP_TIMEOUT, true)
        .map_err(|source| NginxError::Stop { pid, source })
}

/// `program` in [`TOOL_PATH`], or [`NginxError::Missing`].
fn find_tool(program: &'static str, package: &'static str) -> Result<PathBuf, NginxError> {
    crate::testnet::cmd::find_in_clean_path(program).ok_or(NginxError::Missing { program, package })
}

fn check_dav_module(nginx: &Path) -> Result<(), NginxError> {
    let mut command = Command::new(nginx);
    command.env_clear().env("PATH", TOOL_PATH).arg("-V");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NginxError::Spawn {
            command: format!("{} -V", nginx.display()),
            source,
        })?;
    // nginx -V prints to stderr.
    let text = String::from_utf8_lossy(&output.stderr);
    if text.contains("--with-http_dav_module") {
        Ok(())
    } else {
        Err(NginxError::NoDav {
            nginx: nginx.to_owned(),
        })
    }
}

/// Runs a command to completion with stdin closed; a failure carries its stderr.
fn run_quietly(command: &mut Command) -> Result<(), NginxError> {
    let line = display(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NginxError::Spawn {
            command: line.clone(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(NginxError::Command {
        command: line,
        status: output.status,
        stderr: crate::testnet::cmd::tail(
            String::from_utf8_lossy(&output.stderr).trim(),
            LOG_IN_ERROR,
        ),
    })
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NginxError + 'a {
    move |source| NginxError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Paths go into nginx.conf unquoted-safe: only letters, digits and `/._-` (nginx would
/// expand `$` as a variable, and quotes or spaces would need escaping).
fn plain(path: &Path) -> Result<(), NginxError> {
    let ok = path.to_str().is_some_and(|s| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
    });
    if ok {
        Ok(())
    } else {
        Err(NginxError::OddPath(path.to_owned()))
    }
}

/// A port that was free a moment ago (nginx binds it itself; a clash is retried).
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn render_conf(dir: &Path, pki: &Pki, listen: SocketAddrV4, options: &Options) -> String {
    let d = dir.display();
    let mut server_names = String::from("localhost 127.0.0.1");
    let ip = *listen.ip();
    if ip != Ipv4Addr::LOCALHOST && !ip.is_unspecified() {
        server_names.push_str(&format!(" {ip}"));
    }
    let full_path = if options.create_full_put_path {
        "on"
    } else {
        "off"
    };
    let (server_cert, server_key) = options
        .server_cert
        .clone()
        .unwrap_or_else(|| (pki.server_cert(), pki.server_key()));
    let (protocols, ciphers) = options
        .tls_offer
        .clone()
        .unwrap_or_else(|| (POLICY_PROTOCOLS.to_owned(), POLICY_CIPHERS.to_owned()));
    let location = match options.proxy_to {
        Some(upstream) => format!(
            "        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto https;
        }}"
        ),
        None => format!(
            "        location {LOCATION} {{
            dav_methods PUT DELETE MKCOL COPY MOVE;
            create_full_put_path {full_path};
            dav_access user:rw;
        }}"
        ),
    };
    let max_body = options
        .max_body_bytes
        .map_or_else(|| "64m".to_owned(), |b| b.to_string());
    // As root, nginx's workers would run as `nobody`, who cannot enter the 0700 directory.
    let user = if geteuid().is_root() {
        "user root root;\n"
    } else {
        ""
    };
    format!(
        "# Written by hil_tests::nginx for one test run.
{user}daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;

events {{
    worker_connections 64;
}}

http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    client_max_body_size {max_body};

    server {{
        listen {listen} ssl;
        server_name {server_names};

        ssl_certificate {server_cert};
        ssl_certificate_key {server_key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_protocols {protocols};
        ssl_ciphers {ciphers};
        ssl_ecdh_curve X25519:prime256v1:secp384r1;

        root {d}/www;

{location}
    }}
}}
",
        server_cert = server_cert.display(),
        server_key = server_key.display(),
        ca = dir.join("client-cas.pem").display(),
    )
}

/// nginx in the foreground, in `netns` if given (`ip netns exec` execs nginx, so the
/// child's pid is nginx's master).
fn spawn_nginx(
    nginx: &Path,
    dir: &Path,
    conf: &Path,
    netns: Option<&Netns>,
) -> Result<Child, NginxError> {
    let stderr_path = dir.join("nginx.stderr");
    let stderr = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&stderr_path)
        .map_err(io_err("nginx's stderr file", &stderr_path))?;
    let mut command = match netns {
        Some(netns) => {
            let mut command = Command::new(&netns.ip);
            command.args(["netns", "exec", &netns.name]).arg(nginx);
            command
        }
        None => Command::new(nginx),
    };
    command
        .env_clear()
        .env("PATH", TOOL_PATH)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        // Its own process group (master and workers), so a stuck nginx can be killed as a
        // whole without touching anything else.
        .process_group(0);
    let line = display(&command);
    command.spawn().map_err(|source| NginxError::Spawn {
        command: line,
        source,
    })
}

/// The rustls client the readiness check uses: the guard's CA and client certificate.
fn readiness_client(pki: &Pki) -> Result<Arc<rustls::ClientConfig>, NginxError> {
    let read = |path: PathBuf| fs::read(&path).map_err(io_err("a PKI file", &path));
    let ca = read(pki.ca_cert())?;
    let cert = read(pki.client_cert())?;
    let key = read(pki.client_key())?;
    let pem_err = |path: PathBuf| {
        move |e: rustls::pki_types::pem::Error| NginxError::Io {
            what: "a PEM file",
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots
            .add(c.map_err(pem_err(pki.ca_cert()))?)
            .map_err(NginxError::Tls)?;
    }
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(pki.client_cert()))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(pem_err(pki.client_key()))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(NginxError::Tls)?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(NginxError::Tls)?;
    Ok(Arc::new(config))
}

/// One TLS handshake with `addr` (the server certificate must name its IP), then a
/// close_notify.
fn handshake(addr: SocketAddrV4, client: &Arc<rustls::ClientConfig>) -> io::Result<()> {
    let mut tcp = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(1))?;
    tcp.set_read_timeout(Some(Duration::from_secs(1)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(1)))?;
    let name = ServerName::IpAddress((*addr.ip()).into());
    let mut tls =
        rustls::ClientConnection::new(Arc::clone(client), name).map_err(io::Error::other)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp)?;
    }
    tls.send_close_notify();
    let _ = tls.complete_io(&mut tcp);
    Ok(())
}
