//! Layer 3 for the tunnel interface over rtnetlink: link up with an MTU, the box's address,
//! and one route per hub subnet (split tunnel: nothing else is routed there). Blocking: call
//! from a blocking task.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_request::netlink_request_rtnl;
use tsunagi_config::Ipv4Cidr;

/// Errors of one netlink operation.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("interface {iface} does not exist")]
    NoInterface {
        iface: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot {what} on {iface}")]
    Request {
        what: String,
        iface: String,
        #[source]
        source: io::Error,
    },
}

fn index(iface: &str) -> Result<u32, NetlinkError> {
    nix::net::if_::if_nametoindex(iface).map_err(|source| NetlinkError::NoInterface {
        iface: iface.to_owned(),
        source,
    })
}

/// Sets the MTU and brings the link up.
pub fn link_up(iface: &str, mtu: u32) -> Result<(), NetlinkError> {
    let mut message = LinkMessage::default();
    message.header.index = index(iface)?;
    message.header.flags = LinkFlags::Up;
    message.header.change_mask = LinkFlags::Up;
    message.attributes = vec![LinkAttribute::Mtu(mtu)];
    netlink_request_rtnl(RouteNetlinkMessage::SetLink(message), None).map_err(|source| {
        NetlinkError::Request {
            what: format!("set MTU {mtu} and bring the link up"),
            iface: iface.to_owned(),
            source,
        }
    })?;
    Ok(())
}

/// Sets the interface address (replacing an identical one).
pub fn set_address(iface: &str, cidr: Ipv4Cidr) -> Result<(), NetlinkError> {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = cidr.prefix();
    message.header.scope = AddressScope::Universe;
    message.header.index = index(iface)?;
    let ip = IpAddr::V4(cidr.addr());
    message.attributes = vec![AddressAttribute::Local(ip), AddressAttribute::Address(ip)];
    netlink_request_rtnl(
        RouteNetlinkMessage::NewAddress(message),
        Some(NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE),
    )
    .map_err(|source| NetlinkError::Request {
        what: format!("set address {cidr}"),
        iface: iface.to_owned(),
        source,
    })?;
    Ok(())
}

/// Routes `net` through the interface. An existing identical route is fine.
pub fn add_route(iface: &str, net: Ipv4Cidr) -> Result<(), NetlinkError> {
    let mut message = RouteMessage::default();
    message.header.address_family = AddressFamily::Inet;
    message.header.destination_prefix_length = net.prefix();
    message.header.table = RouteHeader::RT_TABLE_MAIN;
    message.header.protocol = RouteProtocol::Static;
    message.header.scope = RouteScope::Link;
    message.header.kind = RouteType::Unicast;
    message.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet(net.network())),
        RouteAttribute::Oif(index(iface)?),
    ];
    match netlink_request_rtnl(
        RouteNetlinkMessage::NewRoute(message),
        Some(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE),
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(NetlinkError::Request {
            what: format!("add route {net}"),
            iface: iface.to_owned(),
            source,
        }),
    }
}
