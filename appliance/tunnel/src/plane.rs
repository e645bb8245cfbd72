//! The WireGuard data plane: the interface, and for the userspace backend the daemon.
//!
//! The userspace daemon (`wireguard-go -f IFACE`) is this service's own child, in its
//! process group, with a clean environment (`LOG_LEVEL` or `WG_PROCESS_FOREGROUND` in the
//! environment make wireguard-control hang). wireguard-control never starts a daemon
//! itself: the supervisor sets `WG_USERSPACE_IMPLEMENTATION=/bin/false` for this service.
//! Every control call runs on a blocking thread under a deadline (the library has none).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Child;
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName};

/// Where the userspace daemon puts its control socket (fixed by the UAPI convention).
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("invalid interface name {iface}")]
    InterfaceName { iface: String },
    #[error("cannot start {program} for {iface}")]
    Spawn {
        program: String,
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} for {iface} exited before its control socket appeared")]
    DaemonExited { program: String, iface: String },
    #[error("the control socket of {iface} did not appear within {timeout:?}")]
    NoSocket { iface: String, timeout: Duration },
    #[error("another process already serves {iface} (its control socket answers)")]
    Busy { iface: String },
    #[error("WireGuard control call `{call}` on {iface} did not finish within {timeout:?}")]
    Deadline {
        call: &'static str,
        iface: String,
        timeout: Duration,
    },
    #[error("WireGuard control call `{call}` on {iface} failed")]
    Control {
        call: &'static str,
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the blocking task of `{call}` failed")]
    Task {
        call: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// One WireGuard interface and, for userspace, its daemon.
#[derive(Debug)]
pub struct Plane {
    iface: String,
    name: InterfaceName,
    backend: Backend,
    program: String,
    timeout: Duration,
    daemon: Option<Child>,
}

impl Plane {
    pub fn new(
        iface: &str,
        backend: Backend,
        program: &str,
        timeout: Duration,
    ) -> Result<Plane, PlaneError> {
        let name = iface
            .parse::<InterfaceName>()
            .map_err(|_| PlaneError::InterfaceName {
                iface: iface.to_owned(),
            })?;
        Ok(Plane {
            iface: iface.to_owned(),
            name,
            backend,
            program: program.to_owned(),
            timeout,
            daemon: None,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(SOCKET_DIR).join(format!("{}.sock", self.iface))
    }

    /// Starts the data plane (the daemon, for userspace). The kernel interface is created by
    /// the first `apply`.
    pub async fn start(&mut self) -> Result<(), PlaneError> {
        if self.backend != Backend::Userspace {
            return Ok(());
        }
        let socket = self.socket();
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Err(PlaneError::Busy {
                iface: self.iface.clone(),
            });
        }
        // A socket left by a daemon that died: it refuses connections and is ours to remove.
        let _ = std::fs::remove_file(&socket);
        let child = tokio::process::Command::new(&self.program)
            .arg("-f")
            .arg(&self.iface)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| PlaneError::Spawn {
                program: self.program.clone(),
                iface: self.iface.clone(),
                source,
            })?;
        self.daemon = Some(child);
        let deadline = tokio::time::Instant::now() + self.timeout.max(Duration::from_secs(2));
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                tracing::debug!(iface = %self.iface, "userspace daemon ready");
                return Ok(());
            }
            if let Some(daemon) = self.daemon.as_mut()
                && let Ok(Some(_)) = daemon.try_wait()
            {
                self.daemon = None;
                return Err(PlaneError::DaemonExited {
                    program: self.program.clone(),
                    iface: self.iface.clone(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                self.stop().await;
                return Err(PlaneError::NoSocket {
                    iface: self.iface.clone(),
                    timeout: self.timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the data plane: the daemon (userspace) or the interface (kernel). Its routes go
    /// with the interface.
    pub async fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), daemon.wait()).await;
            let _ = std::fs::remove_file(self.socket());
        }
        if self.backend == Backend::Kernel
            && let Ok(device) = self.get().await
        {
            let timeout = self.timeout;
            let _ = tokio::time::timeout(
                timeout,
                tokio::task::spawn_blocking(move || device.delete()),
            )
            .await;
        }
    }

    /// Whether the userspace daemon has exited since it was started.
    pub fn daemon_died(&mut self) -> bool {
        match self.daemon.as_mut() {
            Some(daemon) => matches!(daemon.try_wait(), Ok(Some(_))),
            None => self.backend == Backend::Userspace,
        }
    }

    async fn blocking<T, F>(&self, call: &'static str, f: F) -> Result<T, PlaneError>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        match tokio::time::timeout(self.timeout, tokio::task::spawn_blocking(f)).await {
            Err(_) => Err(PlaneError::Deadline {
                call,
                iface: self.iface.clone(),
                timeout: self.timeout,
            }),
            Ok(Err(source)) => Err(PlaneError::Task { call, source }),
            Ok(Ok(Err(source))) => Err(PlaneError::Control {
                call,
                iface: self.iface.clone(),
                source,
            }),
            Ok(Ok(Ok(value))) => Ok(value),
        }
    }

    /// Applies a configuration update.
    pub async fn apply(&self, update: DeviceUpdate) -> Result<(), PlaneError> {
        let (name, backend) = (self.name, self.backend);
        self.blocking("set", move || update.apply(&name, backend))
            .await
    }

    /// Reads the device (keys, peers, handshake times, counters).
    pub async fn get(&self) -> Result<Device, PlaneError> {
        let (name, backend) = (self.name, self.backend);
        self.blocking("get", move || Device::get(&name, backend))
            .await
    }
}
