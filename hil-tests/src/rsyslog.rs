//! A real rsyslog as the ATNA audit repository (issue 17): syslog over TLS (RFC 5425) with
//! rsyslog's gnutls driver, the client's certificate required and checked against a CA
//! (`x509/certvalid`), every message written as received (`%rawmsg%`, one per line) to a
//! file the test reads.
//!
//! rsyslogd runs in the foreground (`-n`) with its own configuration, pid file and work
//! directory in a temporary directory, so it never touches the machine's syslog; it is
//! ended by its pid. It listens on a free port of 127.0.0.1 (rsyslog picks it and writes it
//! to a file), or on [`Options::listen`] inside [`Options::netns`]. [`Rsyslog::stop`] and
//! [`Rsyslog::start_again`] make an outage on the same port.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long rsyslogd may take to listen, and to exit after SIGTERM.
const WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum RsyslogError {
    #[error("rsyslogd is not installed (`cargo xtask test` installs rsyslog and rsyslog-gnutls)")]
    Missing,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rsyslogd did not listen within {WAIT:?}; its output:\n{log}")]
    NotListening { log: String },
    #[error("rsyslogd did not exit within {WAIT:?} of SIGTERM")]
    NoExit,
}

/// Where and how the repository listens.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The network namespace to run in (`ip netns exec`); the machine's own when `None`.
    pub netns: Option<String>,
    /// The address to listen on; a free port of 127.0.0.1 when `None`.
    pub listen: Option<SocketAddrV4>,
}

/// The TLS files of the repository: its certificate and key, and the CA its clients'
/// certificates must come from.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A running rsyslogd (or one stopped for an outage).
pub struct Rsyslog {
    child: Option<Child>,
    addr: SocketAddrV4,
    options: Options,
    dir: tempfile::TempDir,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RsyslogError {
    let path = path.to_owned();
    move |source| RsyslogError::Io { what, path, source }
}

impl Rsyslog {
    /// Writes the configuration and starts rsyslogd; returns once it accepts connections.
    pub fn start(tls: &Tls, options: &Options) -> Result<Rsyslog, RsyslogError> {
        if !Path::new("/usr/sbin/rsyslogd").exists()
            || !Path::new("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so").exists()
        {
            return Err(RsyslogError::Missing);
        }
        let dir = tempfile::Builder::new()
            .prefix("tsunagi-rsyslog-")
            .tempdir()
            .map_err(io_err("the temporary directory", &std::env::temp_dir()))?;
        let work = dir.path().join("work");
        fs::create_dir_all(&work).map_err(io_err("the work directory", &work))?;
        let (address, port) = match options.listen {
            Some(listen) => (*listen.ip(), listen.port()),
            None => (Ipv4Addr::LOCALHOST, 0),
        };
        let conf = format!(
            r#"global(
  workDirectory="{work}"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{ca}"
  DefaultNetstreamDriverCertFile="{cert}"
  DefaultNetstreamDriverKeyFile="{key}"
  maxMessageSize="64k"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" address="{address}" port="{port}" listenPortFileName="{portfile}")
template(name="raw" type="string" string="%rawmsg%\n")
action(type="omfile" file="{out}" template="raw" flushOnTXEnd="on")
"#,
            work = work.display(),
            ca = tls.client_ca.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
            portfile = dir.path().join("port").display(),
            out = dir.path().join("messages").display(),
        );
        let path = dir.path().join("rsyslog.conf");
        fs::write(&path, conf).map_err(io_err("the configuration", &path))?;
        let mut rsyslog = Rsyslog {
            child: None,
            addr: SocketAddrV4::new(address, port),
            options: options.clone(),
            dir,
        };
        rsyslog.spawn()?;
        Ok(rsyslog)
    }

    fn spawn(&mut self) -> Result<(), RsyslogError> {
        let dir = self.dir.path();
        let port_file = dir.join("port");
        let _ = fs::remove_file(&port_file);
        let mut command = match &self.options.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "/usr/sbin/rsyslogd"]);
                c
            }
            None => Command::new("/usr/sbin/rsyslogd"),
        };
        let log = dir.join("rsyslogd.log");
        let out = fs::File::create(&log).map_err(io_err("rsyslogd's log", &log))?;
        let err = out.try_clone().map_err(io_err("rsyslogd's log", &log))?;
        command
            .arg("-n")
            .arg("-f")
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        self.child = Some(command.spawn().map_err(io_err("rsyslogd", &log))?);
        let deadline = Instant::now() + WAIT;
        loop {
            // A free port: rsyslog writes it to the file once the listener is bound. A given
            // one (and the same one again after an outage): seen listening with `ss`.
            if self.addr.port() == 0 {
                if let Ok(text) = fs::read_to_string(&port_file)
                    && let Ok(port) = text.trim().parse::<u16>()
                    && port != 0
                {
                    self.addr.set_port(port);
                    return Ok(());
                }
            } else if self.listening() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() > deadline {
                self.stop_child();
                return Err(RsyslogError::NotListening {
                    log: fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether something listens on the address (in the namespace).
    fn listening(&self) -> bool {
        let filter = format!("sport = :{}", self.addr.port());
        let mut ss = match &self.options.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "ss"]);
                c
            }
            None => Command::new("ss"),
        };
        ss.args(["-Hltn", &filter]);
        ss.output()
            .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
            .unwrap_or(false)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The messages received so far, as received (the RFC 5424 text), one per line.
    pub fn messages(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("messages"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// What rsyslogd printed.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("rsyslogd.log")).unwrap_or_default()
    }

    /// Stops rsyslogd (SIGTERM by its pid): an outage of the repository.
    pub fn stop(&mut self) -> Result<(), RsyslogError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RsyslogError::NoExit);
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Starts rsyslogd again on the same address, after [`Rsyslog::stop`]; what it had
    /// received stays.
    pub fn start_again(&mut self) -> Result<(), RsyslogError> {
        self.stop()?;
        // The same port: written into the configuration this time.
        let path = self.dir.path().join("rsyslog.conf");
        let conf = fs::read_to_string(&path).map_err(io_err("the configuration", &path))?;
        let conf = conf.replace(
            &format!("port=\"{}\"", 0),
            &format!("port=\"{}\"", self.addr.port()),
        );
        fs::write(&path, conf).map_err(io_err("the configuration", &path))?;
        self.spawn()
    }

    fn stop_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("rsyslogd ({}):\n{}", self.dir.path().display(), self.log());
        }
        let _ = self.stop();
        self.stop_child();
    }
}
