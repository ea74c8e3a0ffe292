//! Finding a nearby cloudlet: `_cloudlet._tcp` over mDNS / DNS-SD (the modern form of the
//! original client's UPnP search).
//!
//! A server [`advertise`]s its address and port with TXT records `version` and `api`; a client
//! [`discover`]s the servers that answer within a timeout.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_cloudlet._tcp.local.";

/// Errors of discovery.
#[derive(Debug, thiserror::Error)]
#[error("mDNS: {0}")]
pub struct DiscoveryError(String);

impl From<mdns_sd::Error> for DiscoveryError {
    fn from(e: mdns_sd::Error) -> Self {
        DiscoveryError(e.to_string())
    }
}

/// A running advertisement; dropping it withdraws the service.
pub struct Advertisement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Advertisement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Advertisement").field("fullname", &self.fullname).finish()
    }
}

impl Drop for Advertisement {
    fn drop(&mut self) {
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        let _ = self.daemon.shutdown();
    }
}

fn host_name() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    if h.is_empty() {
        "cloudlet".into()
    } else {
        h
    }
}

/// Advertises a synthesis server listening on `addr` as instance `instance`. An unspecified
/// address (0.0.0.0) advertises every address of the host.
pub fn advertise(instance: &str, addr: SocketAddr) -> Result<Advertisement, DiscoveryError> {
    let daemon = ServiceDaemon::new()?;
    let host = format!("{}.local.", host_name());
    let props = [("version", env!("CARGO_PKG_VERSION")), ("api", "/v1")];
    let info = if addr.ip().is_unspecified() {
        ServiceInfo::new(SERVICE_TYPE, instance, &host, "", addr.port(), &props[..])?.enable_addr_auto()
    } else {
        ServiceInfo::new(SERVICE_TYPE, instance, &host, addr.ip(), addr.port(), &props[..])?
    };
    let fullname = info.get_fullname().to_string();
    daemon.register(info)?;
    Ok(Advertisement { daemon, fullname })
}

/// A server found by [`discover`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Found {
    /// Instance name.
    pub instance: String,
    /// Addresses it advertised.
    pub addresses: Vec<IpAddr>,
    /// Its port.
    pub port: u16,
    /// Its version (TXT `version`).
    pub version: Option<String>,
    /// `http://ADDRESS:PORT` with the first address.
    pub url: String,
}

/// Browses for servers for up to `timeout`; with `first`, returns as soon as one resolves.
pub fn discover(timeout: Duration, first: bool) -> Result<Vec<Found>, DiscoveryError> {
    let daemon = ServiceDaemon::new()?;
    let rx = daemon.browse(SERVICE_TYPE)?;
    let deadline = Instant::now() + timeout;
    let mut found: Vec<Found> = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(s)) => {
                let mut addresses: Vec<IpAddr> = s.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
                addresses.sort_by_key(|a| (a.is_ipv6(), *a));
                let Some(a) = addresses.first().copied() else { continue };
                let instance = s.get_fullname().trim_end_matches(SERVICE_TYPE).trim_end_matches('.').to_string();
                if found.iter().any(|f| f.instance == instance) {
                    continue;
                }
                let url = match a {
                    IpAddr::V4(v4) => format!("http://{v4}:{}", s.get_port()),
                    IpAddr::V6(v6) => format!("http://[{v6}]:{}", s.get_port()),
                };
                found.push(Found {
                    instance,
                    addresses,
                    port: s.get_port(),
                    version: s.get_property_val_str("version").map(str::to_string),
                    url,
                });
                if first {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    Ok(found)
}
