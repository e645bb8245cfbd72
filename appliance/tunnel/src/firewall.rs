//! The box's nftables ruleset, owned by the tunnel service.
//!
//! Why here: loading rules needs `CAP_NET_ADMIN`, which only this service holds, and the rules
//! depend on what it knows (the tunnel interface, the WireGuard port, the hub subnets). The
//! image loads a fail-closed baseline at boot; this service replaces the `inet tsunagi` table
//! atomically (one `nft -f` transaction) when it starts, and leaves it in place when it stops.
//!
//! Policy: inbound is dropped except established traffic, loopback, the WireGuard port (from
//! anywhere but the tunnel), ICMP errors (path MTU discovery) and IPv6 neighbour discovery,
//! the listed LAN ports on the LAN interfaces, and the listed tunnel ports from the hub
//! subnets. Forwarding is dropped: the box is never a router between the clinic and the
//! network.

use std::fmt::Write as _;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tsunagi_config::{Firewall, Tunnel};

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

/// Renders the ruleset for a tunnel configuration.
pub fn render(tunnel: &Tunnel) -> String {
    let fw: &Firewall = &tunnel.firewall;
    let iface = tunnel.interface.as_str();
    let mut out = String::new();
    // Creating the table first makes the delete valid on a fresh box; the whole file is one
    // transaction, so there is no moment without rules.
    let _ = writeln!(out, "table inet {TABLE}\ndelete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
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
        let nets: Vec<String> = tunnel
            .hub_subnets
            .iter()
            .map(|n| format!("{}/{}", n.network(), n.prefix()))
            .collect();
        let _ = writeln!(out, "    # the box's own services, for the hub networks");
        let _ = writeln!(
            out,
            "    iifname \"{iface}\" ip saddr {} tcp dport {} accept",
            set(&nets, false),
            set(&fw.tunnel_tcp_ports, false)
        );
    }
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "  chain forward {{");
    let _ = writeln!(
        out,
        "    type filter hook forward priority filter; policy drop;"
    );
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
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

    fn tunnel(extra: &str) -> Tunnel {
        let text = format!(
            "version = 1\n[site]\nfacility-code = \"1312345678\"\nae-title = \"T\"\n[paths]\nstate-dir = \"/s\"\nruntime-dir = \"/r\"\n[tunnel]\ninterface = \"wg9\"\nhub-endpoint = \"10.250.0.1:51820\"\nhub-public-key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\naddress = \"10.99.0.2/24\"\nhub-subnets = [\"10.98.0.0/24\", \"10.97.1.7/16\"]\nhealth-url = \"http://10.98.0.1:8080/health\"\n{extra}"
        );
        tsunagi_config::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .tunnel
            .unwrap()
    }

    #[test]
    fn default_ruleset_opens_only_wireguard_and_never_forwards() {
        let rules = render(&tunnel(""));
        assert!(rules.starts_with("table inet tsunagi\ndelete table inet tsunagi\n"));
        assert!(rules.contains("policy drop;\n    ct state established,related accept"));
        assert!(rules.contains("iifname != \"wg9\" udp dport 51820 accept"));
        assert!(rules.contains(
            "chain forward {\n    type filter hook forward priority filter; policy drop;\n  }"
        ));
        assert!(!rules.contains("tcp dport"), "{rules}");
    }

    #[test]
    fn listed_ports_open_on_their_side_only() {
        let rules = render(&tunnel(
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
}
