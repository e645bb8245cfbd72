//! The hub's WireGuard interface, as enrollment and revocation change it: one peer per
//! clinic, allowed only the clinic's tunnel address. Through wireguard-control, on the
//! kernel's interface or wireguard-go's (userspace) one. Routing to the pool is the hub
//! interface's own (its address carries the pool's prefix); nothing here touches routes.

use std::net::Ipv4Addr;

use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

/// The hub's peers, as the enrollment server changes them.
pub trait HubPeers: Send + Sync {
    /// Makes `public_key` the peer of the clinic at `address` (allowed that address only),
    /// removing `previous` (the clinic's earlier box key) if given and different.
    fn set(
        &self,
        public_key: &str,
        address: Ipv4Addr,
        previous: Option<&str>,
    ) -> Result<(), String>;
    /// Removes a peer; a peer that is not there is not an error.
    fn remove(&self, public_key: &str) -> Result<(), String>;
}

/// A WireGuard interface at the hub.
#[derive(Debug, Clone)]
pub struct WgInterface {
    name: InterfaceName,
    backend: Backend,
}

fn key(text: &str) -> Result<Key, String> {
    Key::from_base64(text.trim()).map_err(|_| "not a WireGuard key (32 bytes in base64)".into())
}

impl WgInterface {
    /// The interface `name` (kernel, or wireguard-go's with `userspace`); it must exist.
    pub fn open(name: &str, userspace: bool) -> Result<WgInterface, String> {
        let name: InterfaceName = name
            .parse()
            .map_err(|e| format!("interface name {name}: {e}"))?;
        let backend = if userspace {
            Backend::Userspace
        } else {
            Backend::Kernel
        };
        Device::get(&name, backend)
            .map_err(|e| format!("the hub's WireGuard interface {name}: {e}"))?;
        Ok(WgInterface { name, backend })
    }

    /// The peers' public keys (base64).
    pub fn peers(&self) -> Result<Vec<String>, String> {
        let device = Device::get(&self.name, self.backend).map_err(|e| e.to_string())?;
        Ok(device
            .peers
            .iter()
            .map(|p| p.config.public_key.to_base64())
            .collect())
    }

    fn apply(&self, update: DeviceUpdate) -> Result<(), String> {
        update
            .apply(&self.name, self.backend)
            .map_err(|e| format!("the hub's WireGuard interface {}: {e}", self.name))
    }
}

impl HubPeers for WgInterface {
    fn set(
        &self,
        public_key: &str,
        address: Ipv4Addr,
        previous: Option<&str>,
    ) -> Result<(), String> {
        let new = key(public_key)?;
        let mut update = DeviceUpdate::new().add_peer(
            PeerConfigBuilder::new(&new)
                .replace_allowed_ips()
                .add_allowed_ip(address.into(), 32),
        );
        if let Some(old) = previous
            && old.trim() != public_key.trim()
            && let Ok(old) = key(old)
        {
            update = update.remove_peer_by_key(&old);
        }
        self.apply(update)
    }

    fn remove(&self, public_key: &str) -> Result<(), String> {
        let key = key(public_key)?;
        self.apply(DeviceUpdate::new().remove_peer_by_key(&key))
    }
}
