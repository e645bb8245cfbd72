//! The fixed address plan of a test network, as data.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;

/// One of the three namespaces of a test network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// The regional hub: WAN side, WireGuard server, "hub network" and its health server.
    Hub,
    /// The clinic box, where the product runs: WAN towards the hub, LAN towards the clinic.
    Box,
    /// A device on the clinic LAN. It reaches only the box.
    Clinic,
}

impl Host {
    /// All hosts, in the order the harness creates them.
    pub const ALL: [Host; 3] = [Host::Hub, Host::Box, Host::Clinic];

    /// The lowercase name used in namespace names: `hub`, `box`, `clinic`.
    pub fn name(self) -> &'static str {
        match self {
            Host::Hub => "hub",
            Host::Box => "box",
            Host::Clinic => "clinic",
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An IPv4 address with a prefix length, as `ip` writes it (`10.250.0.1/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address (host bits may be set: an interface address).
    pub addr: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub prefix_len: u8,
}

impl Cidr {
    /// `addr/prefix_len`.
    ///
    /// # Panics
    ///
    /// If `prefix_len > 32`; only used with constants.
    pub const fn new(addr: Ipv4Addr, prefix_len: u8) -> Cidr {
        assert!(prefix_len <= 32, "IPv4 prefix length is at most 32");
        Cidr { addr, prefix_len }
    }

    /// The netmask as an integer.
    fn mask(self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    /// The same prefix with the host bits cleared (`10.250.0.1/24` → `10.250.0.0/24`).
    pub fn network(self) -> Cidr {
        Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix_len: self.prefix_len,
        }
    }

    /// The broadcast address of the prefix.
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// Whether `ip` lies inside this prefix.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Why a string is not a [`Cidr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrParseError {
    /// No `/`.
    #[error("expected ADDRESS/PREFIX_LEN")]
    MissingSlash,
    /// The address part is not IPv4.
    #[error("not an IPv4 address")]
    BadAddress,
    /// The prefix length is not 0..=32.
    #[error("prefix length must be 0..=32")]
    BadPrefixLen,
}

impl FromStr for Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Cidr, CidrParseError> {
        let (addr, len) = s.split_once('/').ok_or(CidrParseError::MissingSlash)?;
        let addr = addr.parse().map_err(|_| CidrParseError::BadAddress)?;
        let prefix_len: u8 = len.parse().map_err(|_| CidrParseError::BadPrefixLen)?;
        if prefix_len > 32 {
            return Err(CidrParseError::BadPrefixLen);
        }
        Ok(Cidr { addr, prefix_len })
    }
}

/// The hub's WireGuard listen port.
pub const HUB_WG_PORT: u16 = 51820;
/// MTU of the tunnel interfaces (vpn.md §5.3).
pub const TUNNEL_MTU: u16 = 1280;
/// Port of the health server on the hub network.
pub const HEALTH_PORT: u16 = 8080;
/// Path the health server answers.
pub const HEALTH_PATH: &str = "/health";

/// Every name, address and port of one test network.
///
/// The addresses are the same in every set (each set has its own namespaces, so they never
/// clash); the names carry the set's id. All addresses are private and exist only inside
/// the set's namespaces.
///
/// ```text
///  [<id>-clinic]                 [<id>-box]                          [<id>-hub]
///  <id>l1 192.168.50.10/24 ─veth─ <id>l0 192.168.50.1/24
///                                 <id>w1 10.250.0.2/24 ───────veth─── <id>w0 10.250.0.1/24
///                                 (<id>box 10.99.0.2/24: the product's) <id>hub 10.99.0.1/24 :51820
///                                                                     lo 10.98.0.1/24, health :8080
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AddressPlan {
    /// The set's id (`tn` + 6 hex digits), the prefix of every name below.
    pub id: String,
    /// Namespace of the hub: `<id>-hub`.
    pub hub_ns: String,
    /// Namespace of the box: `<id>-box`.
    pub box_ns: String,
    /// Namespace of the clinic LAN device: `<id>-clinic`.
    pub clinic_ns: String,

    /// The hub's end of the WAN veth: `<id>w0`.
    pub wan_hub_iface: String,
    /// The hub's WAN address at bring-up: 10.250.0.1/24 (see `TestNet::hub_set_wan_address`).
    pub wan_hub_addr: Cidr,
    /// The box's end of the WAN veth: `<id>w1`.
    pub wan_box_iface: String,
    /// The box's WAN address: 10.250.0.2/24.
    pub wan_box_addr: Cidr,

    /// The box's end of the LAN veth: `<id>l0`.
    pub lan_box_iface: String,
    /// The box's LAN address: 192.168.50.1/24.
    pub lan_box_addr: Cidr,
    /// The clinic device's end of the LAN veth: `<id>l1`.
    pub lan_clinic_iface: String,
    /// The clinic device's address: 192.168.50.10/24. It has no default route.
    pub lan_clinic_addr: Cidr,

    /// The hub's WireGuard interface: `<id>hub`.
    pub hub_wg_iface: String,
    /// The hub's tunnel address: 10.99.0.1/24.
    pub hub_tunnel_addr: Cidr,
    /// The hub's WireGuard listen port: 51820.
    pub hub_wg_port: u16,
    /// Extra UDP ports on the hub's WAN address redirected to `hub_wg_port` (nft).
    pub hub_extra_udp_ports: Vec<u16>,
    /// MTU of the hub's tunnel interface, and the one the box should use: 1280.
    pub tunnel_mtu: u16,

    /// A free name for the box's tunnel interface: `<id>box`. The harness creates nothing
    /// for the tunnel in the box; the product (or a test) does.
    pub box_wg_iface: String,
    /// The box's tunnel address the hub expects: 10.99.0.2/24 (the hub peer gets the /32).
    pub box_tunnel_addr: Cidr,

    /// Where the "hub network" address lives in the hub namespace: `lo` (this kernel has
    /// no `dummy` link type).
    pub hub_net_iface: String,
    /// The hub network address: 10.98.0.1/24.
    pub hub_net_addr: Cidr,
    /// The health server: 10.98.0.1:8080, `GET /health` → `200 ok\n`.
    pub health_addr: SocketAddrV4,
    /// The health server's path: `/health`.
    pub health_path: String,
}

impl AddressPlan {
    /// The plan of the set `id`.
    pub fn new(id: &str, hub_extra_udp_ports: &[u16]) -> AddressPlan {
        let hub_net_addr = Cidr::new(Ipv4Addr::new(10, 98, 0, 1), 24);
        AddressPlan {
            id: id.to_owned(),
            hub_ns: format!("{id}-hub"),
            box_ns: format!("{id}-box"),
            clinic_ns: format!("{id}-clinic"),
            wan_hub_iface: format!("{id}w0"),
            wan_hub_addr: Cidr::new(Ipv4Addr::new(10, 250, 0, 1), 24),
            wan_box_iface: format!("{id}w1"),
            wan_box_addr: Cidr::new(Ipv4Addr::new(10, 250, 0, 2), 24),
            lan_box_iface: format!("{id}l0"),
            lan_box_addr: Cidr::new(Ipv4Addr::new(192, 168, 50, 1), 24),
            lan_clinic_iface: format!("{id}l1"),
            lan_clinic_addr: Cidr::new(Ipv4Addr::new(192, 168, 50, 10), 24),
            hub_wg_iface: format!("{id}hub"),
            hub_tunnel_addr: Cidr::new(Ipv4Addr::new(10, 99, 0, 1), 24),
            hub_wg_port: HUB_WG_PORT,
            hub_extra_udp_ports: hub_extra_udp_ports.to_vec(),
            tunnel_mtu: TUNNEL_MTU,
            box_wg_iface: format!("{id}box"),
            box_tunnel_addr: Cidr::new(Ipv4Addr::new(10, 99, 0, 2), 24),
            hub_net_iface: "lo".to_owned(),
            hub_net_addr,
            health_addr: SocketAddrV4::new(hub_net_addr.addr, HEALTH_PORT),
            health_path: HEALTH_PATH.to_owned(),
        }
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: Host) -> &str {
        match host {
            Host::Hub => &self.hub_ns,
            Host::Box => &self.box_ns,
            Host::Clinic => &self.clinic_ns,
        }
    }

    /// The hub's WireGuard endpoint as the box sees it at bring-up: 10.250.0.1:51820.
    pub fn hub_endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.wan_hub_addr.addr, self.hub_wg_port)
    }

    /// The hub network prefix the box routes into the tunnel: 10.98.0.0/24.
    pub fn hub_network(&self) -> Cidr {
        self.hub_net_addr.network()
    }

    /// The allowed IPs of the hub peer on the box: the hub's tunnel /32 and the hub network.
    pub fn box_allowed_ips(&self) -> [Cidr; 2] {
        [Cidr::new(self.hub_tunnel_addr.addr, 32), self.hub_network()]
    }

    /// `http://10.98.0.1:8080/health`.
    pub fn health_url(&self) -> String {
        format!("http://{}{}", self.health_addr, self.health_path)
    }

    /// Every interface name of the set (all ≤ 15 bytes, the kernel's limit).
    pub fn interface_names(&self) -> [&str; 6] {
        [
            &self.wan_hub_iface,
            &self.wan_box_iface,
            &self.lan_box_iface,
            &self.lan_clinic_iface,
            &self.hub_wg_iface,
            &self.box_wg_iface,
        ]
    }

    /// The plan as one line of JSON (a flat object; `hub_public_key` is added when given).
    pub fn to_json(&self, hub_public_key: Option<&str>) -> String {
        let mut o = JsonObject::default();
        o.str("id", &self.id);
        o.str("hub_ns", &self.hub_ns);
        o.str("box_ns", &self.box_ns);
        o.str("clinic_ns", &self.clinic_ns);
        if let Some(key) = hub_public_key {
            o.str("hub_public_key", key);
        }
        o.str("hub_endpoint", &self.hub_endpoint().to_string());
        o.str("wan_hub_iface", &self.wan_hub_iface);
        o.str("wan_hub_addr", &self.wan_hub_addr.to_string());
        o.str("wan_box_iface", &self.wan_box_iface);
        o.str("wan_box_addr", &self.wan_box_addr.to_string());
        o.str("lan_box_iface", &self.lan_box_iface);
        o.str("lan_box_addr", &self.lan_box_addr.to_string());
        o.str("lan_clinic_iface", &self.lan_clinic_iface);
        o.str("lan_clinic_addr", &self.lan_clinic_addr.to_string());
        o.str("hub_wg_iface", &self.hub_wg_iface);
        o.str("hub_tunnel_addr", &self.hub_tunnel_addr.to_string());
        o.num("hub_wg_port", self.hub_wg_port.into());
        o.nums("hub_extra_udp_ports", &self.hub_extra_udp_ports);
        o.num("tunnel_mtu", self.tunnel_mtu.into());
        o.str("box_wg_iface", &self.box_wg_iface);
        o.str("box_tunnel_addr", &self.box_tunnel_addr.to_string());
        o.str("hub_net_iface", &self.hub_net_iface);
        o.str("hub_net_addr", &self.hub_net_addr.to_string());
        o.str("hub_network", &self.hub_network().to_string());
        o.str("health_addr", &self.health_addr.to_string());
        o.str("health_url", &self.health_url());
        o.finish()
    }
}

/// The readable block `testnet up` prints.
impl fmt::Display for AddressPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = if self.hub_extra_udp_ports.is_empty() {
            String::from("none")
        } else {
            let list: Vec<String> = self
                .hub_extra_udp_ports
                .iter()
                .map(u16::to_string)
                .collect();
            format!("{} -> {}", list.join(", "), self.hub_wg_port)
        };
        writeln!(
            f,
            "namespaces      hub {}  box {}  clinic {}",
            self.hub_ns, self.box_ns, self.clinic_ns
        )?;
        writeln!(
            f,
            "WAN (veth)      hub {} {}  <->  box {} {}",
            self.wan_hub_iface, self.wan_hub_addr, self.wan_box_iface, self.wan_box_addr
        )?;
        writeln!(
            f,
            "LAN (veth)      box {} {}  <->  clinic {} {}  (box ip_forward=0, clinic has no default route)",
            self.lan_box_iface, self.lan_box_addr, self.lan_clinic_iface, self.lan_clinic_addr
        )?;
        writeln!(
            f,
            "hub WireGuard   {} {}  listen {}  mtu {}  endpoint {}",
            self.hub_wg_iface,
            self.hub_tunnel_addr,
            self.hub_wg_port,
            self.tunnel_mtu,
            self.hub_endpoint()
        )?;
        writeln!(f, "hub extra UDP   {ports}")?;
        writeln!(
            f,
            "hub network     {} on {}  health {}",
            self.hub_net_addr,
            self.hub_net_iface,
            self.health_url()
        )?;
        write!(
            f,
            "box tunnel      {} {} (not created: the product's job)  allowed {}, {}",
            self.box_wg_iface,
            self.box_tunnel_addr,
            self.box_allowed_ips()[0],
            self.box_allowed_ips()[1]
        )
    }
}

/// A minimal writer for a flat JSON object of strings and numbers.
#[derive(Default)]
struct JsonObject {
    text: String,
}

impl JsonObject {
    fn key(&mut self, key: &str) {
        self.text.push(if self.text.is_empty() { '{' } else { ',' });
        push_json_string(&mut self.text, key);
        self.text.push(':');
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        push_json_string(&mut self.text, value);
    }

    fn num(&mut self, key: &str, value: u64) {
        self.key(key);
        self.text.push_str(&value.to_string());
    }

    fn nums(&mut self, key: &str, values: &[u16]) {
        self.key(key);
        let list: Vec<String> = values.iter().map(u16::to_string).collect();
        self.text.push('[');
        self.text.push_str(&list.join(","));
        self.text.push(']');
    }

    fn finish(mut self) -> String {
        if self.text.is_empty() {
            self.text.push('{');
        }
        self.text.push('}');
        self.text
    }
}

fn push_json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit_and_are_distinct() {
        let plan = AddressPlan::new("tnffffff", &[]);
        let names = plan.interface_names();
        for (i, name) in names.iter().enumerate() {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
            assert!(!names[..i].contains(name), "{name} used twice");
        }
        assert_eq!(plan.ns(Host::Clinic), "tnffffff-clinic");
    }

    #[test]
    fn cidr_arithmetic() {
        let c: Cidr = "10.98.0.1/24".parse().unwrap();
        assert_eq!(c.network().to_string(), "10.98.0.0/24");
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 98, 0, 255));
        assert!(c.contains(Ipv4Addr::new(10, 98, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 99, 0, 1)));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(
            "10.0.0.1".parse::<Cidr>(),
            Err(CidrParseError::MissingSlash)
        );
        assert_eq!(
            "10.0.0.1/33".parse::<Cidr>(),
            Err(CidrParseError::BadPrefixLen)
        );
        assert_eq!("x/3".parse::<Cidr>(), Err(CidrParseError::BadAddress));
    }

    #[test]
    fn json_line_parses_and_has_the_plan() {
        let plan = AddressPlan::new("tn0a1b2c", &[443, 8443]);
        let line = plan.to_json(Some("key\"with\\odd\ncharacters"));
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["hub_ns"], "tn0a1b2c-hub");
        assert_eq!(value["hub_endpoint"], "10.250.0.1:51820");
        assert_eq!(value["hub_extra_udp_ports"], serde_json::json!([443, 8443]));
        assert_eq!(value["hub_public_key"], "key\"with\\odd\ncharacters");
        assert_eq!(value["health_url"], "http://10.98.0.1:8080/health");
    }

    #[test]
    fn readable_block_names_everything() {
        let text = AddressPlan::new("tn0a1b2c", &[443]).to_string();
        for needle in [
            "tn0a1b2c-hub",
            "10.250.0.2/24",
            "192.168.50.10/24",
            "443 -> 51820",
            "http://10.98.0.1:8080/health",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
