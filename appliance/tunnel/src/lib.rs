//! `tunnel`: the WireGuard tunnel from the box to the network hub.
//!
//! One interface, one peer (the hub), split tunnel: only `hub-subnets` are routed through
//! it. The service brings the interface up ([`plane`] for WireGuard, [`netlink`] for the
//! address, MTU, link state and routes), then probes the hub's health address through the
//! tunnel every `probe-interval` and climbs the recovery [`ladder`] when probes fail. The
//! private key is generated on the box when absent and never leaves it ([`key`]). With a
//! `time-server`, it also checks the box's clock against the hub's (`clock`).
//!
//! Needs `CAP_NET_ADMIN` (declared in the service registry); the userspace daemon inherits it
//! as an ambient capability.
#![forbid(unsafe_code)]

mod clock;
pub mod firewall;
pub mod key;
pub mod ladder;
pub mod netlink;
pub mod plane;
mod probe;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tsunagi_config::{Endpoint, Tunnel, TunnelBackend};
use tsunagi_runtime::child::ServiceCtx;
use tsunagi_runtime::service::{self, Capability, Launch, NotEnabled, Service};
use tsunagi_runtime::status::Health;
use wireguard_control::{Backend, DeviceUpdate, Key, PeerConfigBuilder};

use crate::key::{BoxKey, KeyError, Origin};
use crate::ladder::{Ladder, LadderConfig, Link, Observation, Step};
use crate::netlink::NetlinkError;
use crate::plane::{Plane, PlaneError};

/// The service name.
pub const NAME: &str = "tunnel";

/// The tunnel as the binary lists it.
pub const SERVICE: Service = Service {
    name: NAME,
    user: "tsunagi-tunnel",
    description: "tsunagi WireGuard tunnel",
    // Interface, addresses, routes and firewall; the userspace daemon inherits it.
    capabilities: &[Capability::CAP_NET_ADMIN],
    // Records the clock's changes in the ATNA audit trail.
    groups: &[audit::service::CLIENT_GROUP],
    worker_threads: 2,
    launch: |cfg| {
        let t = cfg.tunnel.as_ref().filter(|t| t.enabled)?;
        Some(Launch {
            // wireguard-control must never start a daemon itself: this service runs and
            // watches it.
            env: vec![(
                "WG_USERSPACE_IMPLEMENTATION".to_owned(),
                "/bin/false".to_owned(),
            )],
            extra_dirs: vec![PathBuf::from(plane::SOCKET_DIR)],
            // The userspace daemon creates its interface through the TUN device.
            devices: vec![PathBuf::from("/dev/net/tun")],
            ..Launch::reading(cfg, t)
        })
    },
    main: |cfg, ctx| match cfg.tunnel.clone() {
        Some(t) => service::boxed(run(
            ctx,
            t,
            cfg.audit.enabled.then(|| audit::service::socket_path(cfg)),
        )),
        None => service::boxed(std::future::ready(Err(NotEnabled { service: NAME }))),
    },
};

/// Errors that stop the tunnel service (everything else is a recovery step).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    AuditEvents(#[from] audit::pending::PendingError),
    #[error("the tunnel service cannot go on")]
    Background(#[source] tsunagi_runtime::tasks::TaskEnded),
    #[error("cannot read the preshared key file {path}")]
    Psk {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error(transparent)]
    Plane(#[from] PlaneError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Firewall(#[from] firewall::FirewallError),
    #[error("the kernel has no WireGuard module (tunnel.backend = \"kernel\")")]
    NoKernelModule,
}

/// The private key file: configured, or `private.key` in the service's state directory.
pub fn private_key_path(cfg: &Tunnel, state_dir: &Path) -> PathBuf {
    cfg.private_key_file
        .as_ref()
        .map_or_else(|| state_dir.join("private.key"), |f| f.as_path().to_owned())
}

fn kernel_has_wireguard() -> bool {
    Path::new("/sys/module/wireguard").exists()
}

fn backend(cfg: &Tunnel) -> Result<Backend, TunnelError> {
    match cfg.backend {
        TunnelBackend::Userspace => Ok(Backend::Userspace),
        TunnelBackend::Kernel if kernel_has_wireguard() => Ok(Backend::Kernel),
        TunnelBackend::Kernel => Err(TunnelError::NoKernelModule),
        TunnelBackend::Auto if kernel_has_wireguard() => Ok(Backend::Kernel),
        TunnelBackend::Auto => Ok(Backend::Userspace),
    }
}

/// Resolves an endpoint now (DNS names every time: the hub may have moved). IPv4 first.
async fn resolve(endpoint: &Endpoint, timeout: Duration) -> Option<SocketAddr> {
    if let Some(ip) = endpoint.ip() {
        return Some(SocketAddr::new(ip, endpoint.port()));
    }
    let lookup = tokio::net::lookup_host((endpoint.host().to_owned(), endpoint.port()));
    let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, lookup)
        .await
        .ok()?
        .ok()?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}

struct Tun<'a> {
    cfg: &'a Tunnel,
    key: BoxKey,
    psk: Option<Key>,
    hub: Key,
    plane: Plane,
    endpoints: Vec<Endpoint>,
    current: Option<SocketAddr>,
}

impl Tun<'_> {
    fn hub_peer(&self, endpoint: Option<SocketAddr>) -> PeerConfigBuilder {
        let keepalive =
            u16::try_from(self.cfg.persistent_keepalive.get().as_secs()).unwrap_or(u16::MAX);
        let mut peer = PeerConfigBuilder::new(&self.hub)
            .set_persistent_keepalive_interval(keepalive)
            .replace_allowed_ips();
        for net in &self.cfg.hub_subnets {
            peer = peer.add_allowed_ip(net.network().into(), net.prefix());
        }
        if let Some(psk) = &self.psk {
            peer = peer.set_preshared_key(psk.clone());
        }
        if let Some(endpoint) = endpoint {
            peer = peer.set_endpoint(endpoint);
        }
        peer
    }

    /// Sets the hub peer again from scratch: a new session, so the handshake happens now.
    async fn reconnect(&mut self, endpoint_index: usize) -> Result<(), TunnelError> {
        let endpoint = &self.endpoints[endpoint_index];
        let resolved = resolve(endpoint, self.cfg.control_timeout.get()).await;
        if resolved.is_none() {
            tracing::warn!(endpoint = %endpoint, "cannot resolve the hub endpoint; keeping the last address");
        }
        if resolved.is_some() {
            self.current = resolved;
        }
        let update = DeviceUpdate::new()
            .replace_peers()
            .add_peer(self.hub_peer(self.current));
        self.plane.apply(update).await?;
        Ok(())
    }

    /// Everything from nothing: data plane, keys, peer, address, MTU, link, routes.
    async fn bring_up(&mut self, endpoint_index: usize) -> Result<(), TunnelError> {
        self.plane.start().await?;
        let update = DeviceUpdate::new()
            .set_private_key(self.key.private().clone())
            .set_listen_port(self.cfg.listen_port.get());
        self.plane.apply(update).await?;
        self.reconnect(endpoint_index).await?;
        let (iface, mtu, address, subnets) = (
            self.cfg.interface.as_str().to_owned(),
            self.cfg.mtu,
            self.cfg.address,
            self.cfg.hub_subnets.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<(), NetlinkError> {
            netlink::set_address(&iface, address)?;
            netlink::link_up(&iface, mtu)?;
            for net in subnets {
                netlink::add_route(&iface, net)?;
            }
            Ok(())
        })
        .await
        .map_err(|source| PlaneError::Task {
            call: "netlink",
            source,
        })??;
        Ok(())
    }

    async fn restart(&mut self, endpoint_index: usize) -> Result<(), TunnelError> {
        self.plane.stop().await;
        self.bring_up(endpoint_index).await
    }

    /// The hub peer's handshake age and counters, if the control socket answers.
    async fn peer_stats(&self) -> Option<(Option<Duration>, u64, u64)> {
        let device = self.plane.get().await.ok()?;
        let peer = device
            .peers
            .iter()
            .find(|p| p.config.public_key == self.hub)?;
        let age = peer
            .stats
            .last_handshake_time
            .and_then(|t| t.elapsed().ok());
        Some((age, peer.stats.rx_bytes, peer.stats.tx_bytes))
    }
}

fn read_psk(path: &Path) -> Result<Key, TunnelError> {
    // Same rules as the private key: a file of mode 0600 holding one base64 key.
    match key::load_or_generate_existing(path) {
        Ok(k) => Ok(k),
        Err(source) => Err(TunnelError::Psk {
            path: path.to_owned(),
            source,
        }),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Runs the tunnel service until shutdown.
pub async fn run(
    ctx: ServiceCtx,
    cfg: Tunnel,
    audit_socket: Option<PathBuf>,
) -> Result<(), TunnelError> {
    let started = Instant::now();
    // The clock's changes, kept until the ATNA audit trail has them.
    let keep = std::sync::Arc::new(audit::pending::Store::open(
        &ctx.state_dir.join("audit-pending.db"),
    )?);
    let mut tasks = tsunagi_runtime::tasks::Tasks::new(ctx.shutdown.clone());
    let audit_error: std::sync::Arc<std::sync::Mutex<Option<String>>> = Default::default();
    tasks.spawn(
        "audit-trail",
        audit::client::hand_over(
            audit::client::Sources::new().with(keep.clone()),
            audit_socket,
            audit_error.clone(),
            ctx.shutdown.clone(),
        ),
    );
    let key_path = private_key_path(&cfg, &ctx.state_dir);
    let (key, origin) = key::load_or_generate(&key_path)?;
    tracing::info!(
        public_key = %key.public_base64(),
        generated = origin == Origin::Generated,
        "tunnel key ready"
    );
    let psk = match &cfg.preshared_key_file {
        Some(file) => Some(read_psk(file.as_path())?),
        None => None,
    };
    let hub = Key::from_base64(cfg.hub_public_key.as_str()).map_err(|_| KeyError::Invalid {
        path: PathBuf::from("tunnel.hub-public-key"),
    })?;
    let backend = backend(&cfg)?;
    let plane = Plane::new(
        cfg.interface.as_str(),
        backend,
        &cfg.userspace_implementation,
        cfg.control_timeout.get(),
    )?;
    let mut endpoints = vec![cfg.hub_endpoint.clone()];
    endpoints.extend(cfg.alternative_endpoints.iter().cloned());
    let mut ladder = Ladder::new(LadderConfig {
        probe_failures: cfg.probe_failures,
        endpoints: endpoints.len(),
        min_pause: cfg.probe_interval.get(),
        max_pause: Duration::from_secs(60),
        failback: Duration::from_secs(600),
    });
    let mut tun = Tun {
        cfg: &cfg,
        key,
        psk,
        hub,
        plane,
        endpoints,
        current: None,
    };
    if cfg.firewall.enabled {
        let enrollment = ctx
            .state_dir
            .parent()
            .and_then(firewall::Enrollment::recorded);
        firewall::load(&firewall::render(&cfg, enrollment.as_ref())).await?;
        tracing::info!(table = firewall::TABLE, "firewall loaded");
    }
    tracing::info!(iface = %cfg.interface, backend = ?backend, "bringing the tunnel up");
    // A stop cancels the bring-up too (it resolves the hub's name, waits for the data plane).
    tokio::select! {
        _ = ctx.shutdown.cancelled() => {
            tracing::info!("stopping the tunnel before it was up");
            tun.plane.stop().await;
            return Ok(());
        }
        up = tun.bring_up(0) => up?,
    }
    ctx.reporter.ready();

    // The first handshake: wait for it briefly so its timing can be reported.
    let mut first_handshake: Option<Duration> = None;
    let wait_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < wait_until && !ctx.shutdown.is_cancelled() {
        if let Some((Some(_), _, _)) = tun.peer_stats().await {
            first_handshake = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(took) = first_handshake {
        tracing::info!(ms = took.as_millis(), "first handshake with the hub");
    }

    let mut clock = cfg.time_server.map(|server| {
        clock::Clock::new(
            server,
            cfg.time_check_interval.get(),
            cfg.probe_timeout.get(),
        )
    });
    // The clock state last put in the audit trail.
    let mut audited_clock: Option<&'static str> = None;
    let mut last_step: Option<(Step, Instant)> = None;
    let mut steps = StepCounts::default();
    let mut link = Link::Down;
    // When the link entered its state (down from the start), for status: the console's
    // "connected since".
    let mut link_since = std::time::SystemTime::now();
    let mut ticker = tokio::time::interval(cfg.probe_interval.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            ended = tasks.failed() => {
                tun.plane.stop().await;
                return Err(TunnelError::Background(ended));
            }
            _ = ticker.tick() => {}
        }
        // Every step below may wait on the hub or the data plane: a stop cancels it where it
        // waits (the data plane is stopped below in any case).
        if tun.plane.daemon_died() {
            tracing::warn!("the userspace WireGuard daemon died; restarting the data plane");
            let restart = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                r = tun.restart(ladder.endpoint()) => r,
            };
            if let Err(e) = restart {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "data plane restart failed"
                );
            }
        }
        let stats = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            stats = tun.peer_stats() => stats,
        };
        let age = stats.and_then(|(age, _, _)| age);
        if first_handshake.is_none() && age.is_some() {
            let took = started.elapsed();
            first_handshake = Some(took);
            tracing::info!(ms = took.as_millis(), "first handshake with the hub");
        }
        let probe_ok = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            ok = probe::health(&cfg.health_url, cfg.probe_timeout.get()) => ok,
        };
        if let Some(clock) = clock.as_mut() {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                () = clock.check_if_due() => {}
            }
            // A change to off or lost is audited, and the return to in step after one.
            if let Some((state, offset_ms)) = clock.audit_state()
                && audited_clock != Some(state)
                && (state != "in-step" || audited_clock.is_some())
            {
                let event = audit::protocol::Event::Clock {
                    state: state.to_owned(),
                    server: clock.server().to_string(),
                    offset_ms,
                };
                match keep.record(&event) {
                    Ok(()) => audited_clock = Some(state),
                    Err(e) => tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "cannot keep the clock's change for the audit trail; trying again"
                    ),
                }
            }
        }
        let now = Instant::now();
        let (state, step) = ladder.observe(
            Observation {
                probe_ok,
                handshake_age: age,
            },
            now,
        );
        if state != link {
            match state {
                Link::Up => tracing::info!(endpoint = ?tun.current, "tunnel up"),
                Link::Degraded => tracing::warn!("tunnel degraded"),
                Link::Down => tracing::warn!("tunnel down"),
            }
            link = state;
            link_since = std::time::SystemTime::now();
        }
        if let Some(step) = step {
            tracing::info!(step = %step.describe(), "tunnel recovery step");
            let endpoint = ladder.endpoint();
            let taken = async {
                match step {
                    Step::Reconnect => tun.reconnect(endpoint).await,
                    Step::RestartDataPlane => tun.restart(endpoint).await,
                    Step::UseEndpoint(n) => tun.reconnect(n).await,
                }
            };
            let result = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                r = taken => r,
            };
            if let Err(e) = result {
                tracing::warn!(error = &e as &dyn std::error::Error, step = %step.describe(), "recovery step failed");
            }
            last_step = Some((step, now));
            steps.count(step);
        }
        let summary = summary(
            &tun,
            link,
            stats,
            first_handshake,
            &ladder,
            last_step,
            probe_ok,
        );
        let summary = match clock.as_ref() {
            Some(clock) => format!("{summary}; {}", clock.describe()),
            None => summary,
        };
        let health = if link == Link::Up && !clock.as_ref().is_some_and(clock::Clock::is_bad) {
            Health::Ok
        } else {
            Health::Degraded
        };
        let (rx, tx) = stats.map_or((0, 0), |(_, rx, tx)| (rx, tx));
        let mut metrics = vec![
            ("up", f64::from(u8::from(link == Link::Up))),
            ("probe_ok", f64::from(u8::from(probe_ok))),
            ("consecutive_probe_failures", f64::from(ladder.failures())),
            ("endpoint_index", ladder.endpoint() as f64),
            ("rx_bytes_total", rx as f64),
            ("tx_bytes_total", tx as f64),
            ("recovery_reconnect_total", steps.reconnect as f64),
            ("recovery_restart_total", steps.restart as f64),
            ("recovery_switch_endpoint_total", steps.switch as f64),
        ];
        if let Ok(since) = link_since.duration_since(std::time::UNIX_EPOCH) {
            metrics.push(("link_since_timestamp_seconds", since.as_secs_f64().floor()));
        }
        if let Some(age) = age {
            metrics.push(("handshake_age_seconds", age.as_secs_f64()));
        }
        if let Some(took) = first_handshake {
            metrics.push(("first_handshake_seconds", took.as_secs_f64()));
        }
        if let Some(clock) = clock.as_ref() {
            metrics.extend(clock.metrics());
        }
        ctx.reporter.status_with_metrics(health, &summary, &metrics);
    }
    tracing::info!("stopping the tunnel");
    tun.plane.stop().await;
    tasks.join(Duration::from_millis(300)).await;
    Ok(())
}

/// How many recovery steps of each kind were taken since the service started.
#[derive(Debug, Default)]
struct StepCounts {
    reconnect: u64,
    restart: u64,
    switch: u64,
}

impl StepCounts {
    fn count(&mut self, step: Step) {
        match step {
            Step::Reconnect => self.reconnect += 1,
            Step::RestartDataPlane => self.restart += 1,
            Step::UseEndpoint(_) => self.switch += 1,
        }
    }
}

fn summary(
    tun: &Tun<'_>,
    link: Link,
    stats: Option<(Option<Duration>, u64, u64)>,
    first_handshake: Option<Duration>,
    ladder: &Ladder,
    last_step: Option<(Step, Instant)>,
    probe_ok: bool,
) -> String {
    let endpoint = tun
        .current
        .map_or_else(|| "unresolved".to_owned(), |a| a.to_string());
    let mut parts = Vec::new();
    match (link, stats) {
        (Link::Up, _) => parts.push(format!("up via {endpoint}")),
        (_, None) => parts.push(format!(
            "down: the WireGuard control socket does not answer (endpoint {endpoint})"
        )),
        (_, Some((None, _, _))) => parts.push(format!(
            "down: no handshake with the hub at {endpoint} (check tunnel.hub-public-key, and that the hub has this box's key: tsunagi vpn pubkey)"
        )),
        (_, Some((Some(age), _, _))) if !probe_ok => parts.push(format!(
            "{}: handshake {}s ago but the hub's health address does not answer (endpoint {endpoint})",
            if link == Link::Degraded { "degraded" } else { "down" },
            age.as_secs()
        )),
        (_, Some(_)) => parts.push(format!("degraded via {endpoint}")),
    }
    if let Some((Some(age), rx, tx)) = stats {
        parts.push(format!(
            "handshake {}s ago, rx {} tx {}",
            age.as_secs(),
            bytes(rx),
            bytes(tx)
        ));
    }
    if let Some(took) = first_handshake {
        parts.push(format!("first handshake after {} ms", took.as_millis()));
    }
    if ladder.endpoint() != 0 {
        parts.push(format!("on alternative endpoint {}", ladder.endpoint()));
    }
    if let Some((step, at)) = last_step {
        parts.push(format!(
            "last recovery step: {} ({}s ago)",
            step.describe(),
            at.elapsed().as_secs()
        ));
    }
    parts.join("; ")
}
