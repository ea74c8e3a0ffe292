//! Port-forward specifications: `tcp:HOST:GUEST` and the old tool's `tcp:HOST::GUEST`.

use overlay_format::{PortForward, Protocol};

/// Error parsing a forward.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad port forward '{spec}': expected tcp:HOST_PORT:GUEST_PORT (or the old tcp:HOST_PORT::GUEST_PORT)")]
pub struct ForwardParseError {
    /// The text given.
    pub spec: String,
}

/// Parses `tcp:2222:22`, `tcp:2222::22` (the seed's `-redir` spelling) or `2222:22`.
/// Host port 0 lets the host choose.
pub fn parse_forward(spec: &str) -> Result<PortForward, ForwardParseError> {
    let err = || ForwardParseError { spec: spec.into() };
    let (proto, rest) = match spec.split_once(':') {
        Some(("tcp", r)) => (Protocol::Tcp, r),
        Some(("udp", r)) => (Protocol::Udp, r),
        _ => (Protocol::Tcp, spec),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (h, g) = match parts.as_slice() {
        [h, g] => (*h, *g),
        [h, "", g] => (*h, *g),
        _ => return Err(err()),
    };
    let host_port: u16 = h.parse().map_err(|_| err())?;
    let guest_port: u16 = g.parse().map_err(|_| err())?;
    if guest_port == 0 {
        return Err(err());
    }
    Ok(PortForward { protocol: proto, host_port, guest_port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings() {
        let f = PortForward { protocol: Protocol::Tcp, host_port: 2222, guest_port: 22 };
        assert_eq!(parse_forward("tcp:2222:22"), Ok(f));
        assert_eq!(parse_forward("tcp:2222::22"), Ok(f));
        assert_eq!(parse_forward("2222:22"), Ok(f));
        for bad in ["tcp:22", "tcp:x:22", "tcp:1:0", "sctp:1:2", "tcp:1:::2", "tcp:70000:22"] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }
}
