//! The box's nftables ruleset, owned by the tunnel service.
//!
//! Why here: loading rules needs `CAP_NET_ADMIN`, which only this service holds, and the rules
//! depend on what it knows (the tunnel interface, the WireGuard port, the hub subnets). The
//! image loads a fail-closed baseline at boot; this service replaces the `inet tsunagi` table
//! atomically (one `nft -f` transaction) when it starts, and leaves it in place when it stops.
//!
//! Inbound is dropped except established traffic, loopback, the WireGuard port (from
//! anywhere but the tunnel), ICMP errors (path MTU discovery) and IPv6 neighbour discovery,
//! the listed LAN ports on the LAN interfaces, and the listed tunnel ports from the hub
//! subnets. On the tunnel and LAN interfaces, a TCP segment of a connection the box does not
//! know (it restarted since) is answered with a reset rather than dropped, so that the peer
//! learns at once that the connection is gone; a SYN to a closed port stays unanswered.
//! Forwarding is dropped: the box is never a router between the clinic and the network.
//!
//! Outbound is the egress kill switch (issue 13). The first rule drops every packet to a hub
//! subnet that would leave by any interface but the tunnel (or loopback), before any
//! `ct state established` accept: when the tunnel interface goes away, hub-subnet traffic
//! (FHIR, DICOM, WebDAV) would otherwise follow the default route in cleartext, connections
//! established through the tunnel included. Matching is by interface *name*, so the rule
//! holds while the interface is absent or being recreated. Then loopback, the tunnel and the
//! LAN interfaces are open. On every other interface (the WAN) the box sends only:
//! - WireGuard to the hub: UDP from the box's WireGuard port to each endpoint. For an IP
//!   endpoint, to that address and port. A DNS-name endpoint cannot be matched by address
//!   when the rules are rendered (and the service re-resolves it on failure), so it is
//!   allowed to its port at any address; that is safe because only WireGuard owns the
//!   source port, so whatever leaves from it is encrypted.
//! - DHCP and DHCPv6 client traffic, IPv6 router and neighbour solicitations and
//!   advertisements (and MLD reports, which neighbour discovery needs on snooping
//!   switches), and ICMP errors.
//! - DNS to `dns-servers`, or, when none are listed and an endpoint is a DNS name, DNS to any
//!   address (the box must resolve its hub; resolvers usually come from DHCP). NTP only to
//!   `ntp-servers`.
//! - Enrollment (issue 16): once a provisioning medium named an enrollment server, TCP to
//!   that server's address and port, from the identity service's user only ([`Enrollment`],
//!   `meta skuid`): the box enrolls over the WAN before its tunnel can carry anything, and
//!   renews through the tunnel afterwards. A server named by DNS is allowed at that port at
//!   any address (and DNS with it), still only for that user.
//! - Replies within connections already accepted (the hub answering from another address,
//!   after a roaming handshake that came in on the WireGuard port).
//!
//! Everything else is dropped, so a service misconfigured to an address outside the hub
//! subnets cannot reach it by the WAN either (`config check` refuses that too).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tsunagi_config::{Firewall, Ipv4Cidr, Tunnel};

/// The table this service owns.
pub const TABLE: &str = "tsunagi";

/// Errors while loading the ruleset.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run nft to load the firewall")]
    Spawn(#[source] std::io::Error),
    #[error("nft rejected the firewall ruleset: {stderr}")]
    Rejected { stderr: String },
}

fn set<T: std::fmt::Display>(items: &[T], quote: bool) -> String {
    let items: Vec<String> = items
        .iter()
        .map(|i| {
            if quote {
                format!("\"{i}\"")
            } else {
                i.to_string()
            }
        })
        .collect();
    format!("{{ {} }}", items.join(", "))
}

fn cidrs(nets: &[Ipv4Cidr]) -> String {
    let nets: Vec<String> = nets
        .iter()
        .map(|n| format!("{}/{}", n.network(), n.prefix()))
        .collect();
    set(&nets, false)
}

/// The user the identity service runs as: the only one that may reach the enrollment server
/// on the WAN.
pub const ENROLLING_USER: &str = "tsunagi-identity";

/// The enrollment server the box may reach on the WAN, and who may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// An address, or a DNS name (allowed at any address then).
    pub host: EnrollmentHost,
    pub port: u16,
    /// The identity service's user.
    pub uid: u32,
}

/// Where the enrollment server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollmentHost {
    Address(IpAddr),
    Name(String),
}

impl Enrollment {
    /// From the enrollment URL the last medium recorded (`STATE/provisioning/applied.json`,
    /// `enrollment-url`) and the identity service's user; `None` without either.
    pub fn recorded(state_root: &std::path::Path) -> Option<Enrollment> {
        let bytes = std::fs::read(state_root.join("provisioning/applied.json")).ok()?;
        let applied: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let url = reqwest::Url::parse(applied.get("enrollment-url")?.as_str()?).ok()?;
        if url.scheme() != "https" {
            return None;
        }
        let uid = nix::unistd::User::from_name(ENROLLING_USER).ok()??.uid;
        let host = url.host_str()?;
        let host = match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => EnrollmentHost::Address(ip),
            Err(_) => EnrollmentHost::Name(host.to_owned()),
        };
        Some(Enrollment {
            host,
            port: url.port_or_known_default()?,
            uid: uid.as_raw(),
        })
    }
}

/// Renders the ruleset for a tunnel configuration (and the enrollment server, if any).
pub fn render(tunnel: &Tunnel, enrollment: Option<&Enrollment>) -> String {
    let fw: &Firewall = &tunnel.firewall;
    let iface = tunnel.interface.as_str();
    let mut out = String::new();
    // Creating the table first makes the delete valid on a fresh box; the whole file is one
    // transaction, so there is no moment without rules.
    let _ = writeln!(out, "table inet {TABLE}\ndelete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    input(&mut out, tunnel);
    let _ = writeln!(out, "  chain forward {{");
    let _ = writeln!(
        out,
        "    type filter hook forward priority filter; policy drop;"
    );
    let _ = writeln!(out, "  }}");
    output(&mut out, tunnel, fw, iface, enrollment);
    let _ = writeln!(out, "}}");
    out
}

fn input(out: &mut String, tunnel: &Tunnel) {
    let fw = &tunnel.firewall;
    let iface = tunnel.interface.as_str();
    let _ = writeln!(out, "  chain input {{");
    let _ = writeln!(
        out,
        "    type filter hook input priority filter; policy drop;"
    );
    let _ = writeln!(out, "    ct state established,related accept");
    let _ = writeln!(out, "    ct state invalid drop");
    let _ = writeln!(out, "    iif \"lo\" accept");
    let _ = writeln!(out, "    # WireGuard: the only port open on the WAN side");
    let _ = writeln!(
        out,
        "    iifname != \"{iface}\" udp dport {} accept",
        tunnel.listen_port
    );
    let _ = writeln!(
        out,
        "    # ICMP errors (path MTU discovery) and IPv6 neighbour discovery"
    );
    let _ = writeln!(
        out,
        "    icmp type {{ destination-unreachable, time-exceeded, parameter-problem }} accept"
    );
    let _ = writeln!(
        out,
        "    icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} accept"
    );
    if !fw.lan_interfaces.is_empty() {
        let lan = set(&fw.lan_interfaces, true);
        let _ = writeln!(out, "    # the box's own services, for clinic devices");
        if !fw.lan_tcp_ports.is_empty() {
            let _ = writeln!(
                out,
                "    iifname {lan} tcp dport {} accept",
                set(&fw.lan_tcp_ports, false)
            );
        }
        let _ = writeln!(
            out,
            "    iifname {lan} icmp type echo-request limit rate 10/second accept"
        );
    }
    if !fw.tunnel_tcp_ports.is_empty() && !tunnel.hub_subnets.is_empty() {
        let _ = writeln!(out, "    # the box's own services, for the hub networks");
        let _ = writeln!(
            out,
            "    iifname \"{iface}\" ip saddr {} tcp dport {} accept",
            cidrs(&tunnel.hub_subnets),
            set(&fw.tunnel_tcp_ports, false)
        );
    }
    // Last, on the links the box holds TCP conversations on: a segment that is neither a SYN
    // nor a reset and was not accepted above belongs to no connection the box knows (it
    // restarted, or lost power, since). It is answered with a reset, as any TCP host does,
    // so that the peer gives that connection up at once instead of retransmitting into
    // silence. A PACS that takes its associations one at a time (Orthanc with DICOM TLS)
    // would otherwise stall on a dead one for a minute per connection the box left behind.
    // A SYN to a closed port is still dropped without an answer.
    let mut links = vec![iface.to_owned()];
    links.extend(fw.lan_interfaces.iter().map(ToString::to_string));
    let _ = writeln!(
        out,
        "    # a connection the box no longer knows (it restarted): reset, not silence"
    );
    let _ = writeln!(
        out,
        "    iifname {} tcp flags & (syn | rst) == 0 reject with tcp reset",
        set(&links, true)
    );
    let _ = writeln!(out, "  }}");
}

/// `ip daddr` or `ip6 daddr`, for one address or a set of them.
fn daddr(addrs: &[IpAddr]) -> Vec<String> {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = addrs.iter().partition(|a| a.is_ipv4());
    let mut out = Vec::new();
    if !v4.is_empty() {
        out.push(format!("ip daddr {}", set(&v4, false)));
    }
    if !v6.is_empty() {
        out.push(format!("ip6 daddr {}", set(&v6, false)));
    }
    out
}

fn output(
    out: &mut String,
    tunnel: &Tunnel,
    fw: &Firewall,
    iface: &str,
    enrollment: Option<&Enrollment>,
) {
    let wg = tunnel.listen_port;
    let _ = writeln!(out, "  chain output {{");
    let _ = writeln!(
        out,
        "    type filter hook output priority filter; policy drop;"
    );
    if !tunnel.hub_subnets.is_empty() {
        // First, before any established accept: a connection made through the tunnel must
        // not carry on over the WAN once the tunnel interface is gone. By name, so it holds
        // while the interface is absent.
        let _ = writeln!(
            out,
            "    # the kill switch: the hub networks only through the tunnel, never in cleartext"
        );
        let _ = writeln!(
            out,
            "    ip daddr {} oifname != {{ \"lo\", \"{iface}\" }} counter drop",
            cidrs(&tunnel.hub_subnets)
        );
    }
    let _ = writeln!(out, "    oif \"lo\" accept");
    let _ = writeln!(out, "    oifname \"{iface}\" accept");
    if !fw.lan_interfaces.is_empty() {
        let _ = writeln!(out, "    # the clinic's devices");
        let _ = writeln!(out, "    oifname {} accept", set(&fw.lan_interfaces, true));
    }
    let _ = writeln!(out, "    # the WAN: nothing but what follows");
    let _ = writeln!(out, "    ct state established,related accept");
    let _ = writeln!(
        out,
        "    # WireGuard to the hub, only from the WireGuard port (encrypted by construction)"
    );
    let mut endpoints = vec![&tunnel.hub_endpoint];
    endpoints.extend(&tunnel.alternative_endpoints);
    let mut any_name = false;
    let mut rendered = Vec::new();
    for endpoint in endpoints {
        let rule = match endpoint.ip() {
            Some(ip) => {
                let family = if ip.is_ipv4() { "ip" } else { "ip6" };
                format!(
                    "    {family} daddr {ip} udp sport {wg} udp dport {} accept",
                    endpoint.port()
                )
            }
            None => {
                // A name: its address is known only when it is resolved, and it changes.
                any_name = true;
                format!(
                    "    # {}: any address, it is resolved at run time\n    udp sport {wg} udp dport {} accept",
                    endpoint.host(),
                    endpoint.port()
                )
            }
        };
        if !rendered.contains(&rule) {
            rendered.push(rule);
        }
    }
    for rule in rendered {
        let _ = writeln!(out, "{rule}");
    }
    if let Some(e) = enrollment {
        let _ = writeln!(
            out,
            "    # enrollment: the identity service's user to the enrollment server only"
        );
        let to = match &e.host {
            EnrollmentHost::Address(IpAddr::V4(ip)) => format!("ip daddr {ip} "),
            EnrollmentHost::Address(IpAddr::V6(ip)) => format!("ip6 daddr {ip} "),
            EnrollmentHost::Name(name) => {
                any_name = true;
                let _ = writeln!(out, "    # {name}: any address, it is resolved at run time");
                String::new()
            }
        };
        let _ = writeln!(
            out,
            "    {to}tcp dport {} meta skuid {} accept",
            e.port, e.uid
        );
    }
    let _ = writeln!(out, "    # DHCP and DHCPv6 clients");
    let _ = writeln!(out, "    udp sport 68 udp dport 67 accept");
    let _ = writeln!(out, "    udp sport 546 udp dport 547 accept");
    if !fw.dns_servers.is_empty() {
        let _ = writeln!(out, "    # DNS, to the configured resolvers");
        for to in daddr(&fw.dns_servers) {
            let _ = writeln!(
                out,
                "    {to} meta l4proto {{ udp, tcp }} th dport 53 accept"
            );
        }
    } else if any_name {
        let _ = writeln!(
            out,
            "    # DNS: a hub endpoint is a name, and no resolvers are listed (DHCP's)"
        );
        let _ = writeln!(out, "    meta l4proto {{ udp, tcp }} th dport 53 accept");
    }
    if !fw.ntp_servers.is_empty() {
        let _ = writeln!(out, "    # NTP, to the configured servers");
        for to in daddr(&fw.ntp_servers) {
            let _ = writeln!(out, "    {to} udp dport 123 accept");
        }
    }
    let _ = writeln!(
        out,
        "    # ICMP errors, IPv6 router and neighbour discovery (with the MLD reports it needs)"
    );
    let _ = writeln!(
        out,
        "    icmp type {{ destination-unreachable, time-exceeded, parameter-problem }} accept"
    );
    let _ = writeln!(
        out,
        "    icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report }} accept"
    );
    let _ = writeln!(out, "  }}");
}

/// Loads `ruleset` with `nft -f -` (one atomic transaction).
pub async fn load(ruleset: &str) -> Result<(), FirewallError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(FirewallError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .await
            .map_err(FirewallError::Spawn)?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(FirewallError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Rejected {
            stderr: String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" / "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_plain(tunnel: &Tunnel) -> String {
        render(tunnel, None)
    }

    /// Issue 16: the enrollment server, by address or by name, for the identity service's
    /// user only; nothing else opens.
    #[test]
    fn the_enrollment_server_is_open_to_the_identity_user_only() {
        let by_address = Enrollment {
            host: EnrollmentHost::Address("192.0.2.7".parse().unwrap()),
            port: 8443,
            uid: 990,
        };
        let plain = render_plain(&tunnel(""));
        let rules = render(&tunnel(""), Some(&by_address));
        let added: Vec<&str> = rules
            .lines()
            .filter(|l| !plain.lines().any(|p| p == *l))
            .collect();
        assert_eq!(
            added,
            [
                "    # enrollment: the identity service's user to the enrollment server only",
                "    ip daddr 192.0.2.7 tcp dport 8443 meta skuid 990 accept",
            ]
        );
        let by_name = Enrollment {
            host: EnrollmentHost::Name("hub.example.jp".into()),
            ..by_address
        };
        let rules = render(&tunnel(""), Some(&by_name));
        assert!(
            rules.contains("    tcp dport 8443 meta skuid 990 accept"),
            "{rules}"
        );
        assert!(
            rules.contains("    meta l4proto { udp, tcp } th dport 53 accept"),
            "{rules}"
        );
        // Recorded by a medium: read back from applied.json.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("provisioning")).unwrap();
        assert_eq!(Enrollment::recorded(dir.path()), None);
        if nix::unistd::User::from_name(ENROLLING_USER)
            .ok()
            .flatten()
            .is_some()
        {
            std::fs::write(
                dir.path().join("provisioning/applied.json"),
                r#"{"serial":3,"facility-code":"1312345678","applied-at":1,"enrollment-url":"https://[2001:db8::7]:8443"}"#,
            )
            .unwrap();
            let e = Enrollment::recorded(dir.path()).unwrap();
            assert_eq!(
                e.host,
                EnrollmentHost::Address("2001:db8::7".parse().unwrap())
            );
            assert_eq!(e.port, 8443);
        }
    }

    fn tunnel(extra: &str) -> Tunnel {
        tunnel_at("10.250.0.1:51820", extra)
    }

    fn tunnel_at(endpoint: &str, extra: &str) -> Tunnel {
        let text = format!(
            "version = 1\n[site]\nfacility-code = \"1312345678\"\nae-title = \"T\"\n[paths]\nstate-dir = \"/s\"\nruntime-dir = \"/r\"\n[tunnel]\ninterface = \"wg9\"\nhub-endpoint = \"{endpoint}\"\nhub-public-key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\naddress = \"10.99.0.2/24\"\nhub-subnets = [\"10.98.0.0/24\", \"10.97.1.7/16\"]\nhealth-url = \"http://10.98.0.1:8080/health\"\n{extra}"
        );
        tsunagi_config::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .tunnel
            .unwrap()
    }

    #[test]
    fn default_ruleset_opens_only_wireguard_and_never_forwards() {
        let rules = render_plain(&tunnel(""));
        assert!(rules.starts_with("table inet tsunagi\ndelete table inet tsunagi\n"));
        assert!(rules.contains("policy drop;\n    ct state established,related accept"));
        assert!(rules.contains("iifname != \"wg9\" udp dport 51820 accept"));
        assert!(rules.contains(
            "chain forward {\n    type filter hook forward priority filter; policy drop;\n  }"
        ));
        assert!(!rules.contains("tcp dport"), "{rules}");
    }

    #[test]
    fn segments_of_unknown_connections_are_reset_on_the_tunnel_and_the_lan_only() {
        let rules = render_plain(&tunnel(
            "[tunnel.firewall]\nlan-interfaces = [\"eth1\"]\nlan-tcp-ports = [11112]\n",
        ));
        let input = chain(&rules, "input");
        // The last rule: after every accept, and never for a SYN (closed ports stay silent)
        // or a reset (never answered).
        assert_eq!(
            input.last().copied(),
            Some(
                "iifname { \"wg9\", \"eth1\" } tcp flags & (syn | rst) == 0 reject with tcp reset"
            ),
            "{rules}"
        );
        assert_eq!(rules.matches("reject").count(), 1, "{rules}");
        let without_lan = render_plain(&tunnel(""));
        assert!(
            without_lan
                .contains("iifname { \"wg9\" } tcp flags & (syn | rst) == 0 reject with tcp reset"),
            "{without_lan}"
        );
    }

    #[test]
    fn listed_ports_open_on_their_side_only() {
        let rules = render_plain(&tunnel(
            "[tunnel.firewall]\nlan-interfaces = [\"eth1\"]\nlan-tcp-ports = [104, 11112]\ntunnel-tcp-ports = [8443]\n",
        ));
        assert!(
            rules.contains("iifname { \"eth1\" } tcp dport { 104, 11112 } accept"),
            "{rules}"
        );
        assert!(
            rules.contains(
                "iifname \"wg9\" ip saddr { 10.98.0.0/24, 10.97.0.0/16 } tcp dport { 8443 } accept"
            ),
            "{rules}"
        );
    }

    /// The rules of one chain, without its type line and comments.
    fn chain<'a>(rules: &'a str, name: &str) -> Vec<&'a str> {
        let start = format!("  chain {name} {{");
        rules
            .lines()
            .skip_while(|l| *l != start)
            .skip(2)
            .take_while(|l| *l != "  }")
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect()
    }

    #[test]
    fn hub_subnets_leave_only_by_the_tunnel_before_any_established_accept() {
        let rules = render_plain(&tunnel("[tunnel.firewall]\nlan-interfaces = [\"eth1\"]\n"));
        assert!(
            rules.contains(
                "chain output {\n    type filter hook output priority filter; policy drop;\n"
            ),
            "{rules}"
        );
        let output = chain(&rules, "output");
        // The very first rule: nothing is accepted before it, established traffic included,
        // and it matches the tunnel by name (it holds while the interface is gone).
        assert_eq!(
            output[0],
            "ip daddr { 10.98.0.0/24, 10.97.0.0/16 } oifname != { \"lo\", \"wg9\" } counter drop"
        );
        assert_eq!(
            output[1..4],
            [
                "oif \"lo\" accept",
                "oifname \"wg9\" accept",
                "oifname { \"eth1\" } accept"
            ]
        );
        let established = output
            .iter()
            .position(|r| r.contains("ct state established"))
            .unwrap();
        assert!(established > 0);
    }

    #[test]
    fn the_wan_gets_only_wireguard_dhcp_and_icmp_by_default() {
        let rules = render_plain(&tunnel(""));
        assert_eq!(
            chain(&rules, "output"),
            [
                "ip daddr { 10.98.0.0/24, 10.97.0.0/16 } oifname != { \"lo\", \"wg9\" } counter drop",
                "oif \"lo\" accept",
                "oifname \"wg9\" accept",
                "ct state established,related accept",
                "ip daddr 10.250.0.1 udp sport 51820 udp dport 51820 accept",
                "udp sport 68 udp dport 67 accept",
                "udp sport 546 udp dport 547 accept",
                "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
                "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld2-listener-report } accept",
            ],
            "{rules}"
        );
        // No DNS and no NTP: the only endpoint is an address, and no servers are listed.
        assert!(!rules.contains("dport 53") && !rules.contains("dport 123"));
    }

    #[test]
    fn a_dns_name_endpoint_is_allowed_by_port_from_the_wireguard_port_with_dns() {
        let rules = render_plain(&tunnel(
            "alternative-endpoints = [\"hub.example.jp:443\", \"[2001:db8::1]:51820\", \"10.250.0.1:51820\"]\n",
        ));
        let output = chain(&rules, "output");
        let wireguard: Vec<&str> = output
            .iter()
            .copied()
            .filter(|r| r.contains("udp sport 51820"))
            .collect();
        // The duplicate literal is rendered once.
        assert_eq!(
            wireguard,
            [
                "ip daddr 10.250.0.1 udp sport 51820 udp dport 51820 accept",
                "udp sport 51820 udp dport 443 accept",
                "ip6 daddr 2001:db8::1 udp sport 51820 udp dport 51820 accept",
            ]
        );
        assert!(rules.contains("# hub.example.jp: any address"), "{rules}");
        assert!(
            output.contains(&"meta l4proto { udp, tcp } th dport 53 accept"),
            "{rules}"
        );
    }

    #[test]
    fn listed_dns_and_ntp_servers_are_the_only_ones() {
        let rules = render_plain(&tunnel_at(
            "hub.example.jp:51820",
            "[tunnel.firewall]\ndns-servers = [\"192.0.2.53\", \"2001:db8::53\"]\nntp-servers = [\"192.0.2.123\"]\n",
        ));
        let output = chain(&rules, "output");
        let named: Vec<&str> = output
            .iter()
            .copied()
            .filter(|r| r.contains("dport 53") || r.contains("dport 123"))
            .collect();
        assert_eq!(
            named,
            [
                "ip daddr { 192.0.2.53 } meta l4proto { udp, tcp } th dport 53 accept",
                "ip6 daddr { 2001:db8::53 } meta l4proto { udp, tcp } th dport 53 accept",
                "ip daddr { 192.0.2.123 } udp dport 123 accept",
            ],
            "{rules}"
        );
    }

    /// nft itself accepts every shape of the ruleset (checked in a network namespace of the
    /// test's own, `unshare -n`, which goes when nft exits). Needs root: CI runs it.
    #[test]
    fn nft_accepts_every_shape_of_the_ruleset() {
        if !nix::unistd::Uid::effective().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs root and CI must run it"
            );
            eprintln!("skipped: needs root (CI runs it as root)");
            return;
        }
        let shapes = [
            tunnel(""),
            tunnel(
                "alternative-endpoints = [\"hub.example.jp:443\", \"[2001:db8::1]:51820\"]\n[tunnel.firewall]\nlan-interfaces = [\"eth1\", \"eth2\"]\nlan-tcp-ports = [104]\ntunnel-tcp-ports = [8443]\n",
            ),
            tunnel_at(
                "hub.example.jp:51820",
                "[tunnel.firewall]\ndns-servers = [\"192.0.2.53\", \"2001:db8::53\"]\nntp-servers = [\"192.0.2.123\", \"2001:db8::123\"]\n",
            ),
        ];
        for shape in &shapes {
            let rules = render(shape, None);
            let mut child = std::process::Command::new("unshare")
                .args(["--net", "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), rules.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}\n{rules}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
