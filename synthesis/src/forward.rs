//! Port-forward specifications (`tcp:HOST:GUEST` and the old tool's `tcp:HOST::GUEST`) and
//! HTTP targets (`PORT[/PATH]`).

use overlay_format::{PortForward, Protocol};

/// Error parsing a forward: what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardParseError {
    /// Not `[tcp:]HOST:GUEST` or `[tcp:]HOST::GUEST`.
    #[error("bad port forward '{spec}': expected tcp:HOST_PORT:GUEST_PORT (or the old tcp:HOST_PORT::GUEST_PORT)")]
    Shape {
        /// The text given.
        spec: String,
    },
    /// A protocol other than tcp.
    #[error("bad port forward '{spec}': unknown protocol '{protocol}' (tcp is the only one)")]
    UnknownProtocol {
        /// The text given.
        spec: String,
        /// The protocol named.
        protocol: String,
    },
    /// `udp:` (QEMU could forward it, but the flows forward and probe TCP only).
    #[error("bad port forward '{spec}': udp forwards are not supported, only tcp")]
    Udp {
        /// The text given.
        spec: String,
    },
    /// A port that is empty, not a number or out of range.
    #[error("bad port forward '{spec}': {field} port '{value}' is {problem}")]
    Port {
        /// The text given.
        spec: String,
        /// `host` or `guest`.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong: "missing", "not a number", "out of range (0..=65535)", ...
        problem: &'static str,
    },
}

fn port(spec: &str, field: &'static str, value: &str, min: u32) -> Result<u16, ForwardParseError> {
    let err = |problem| ForwardParseError::Port { spec: spec.into(), field, value: value.into(), problem };
    if value.is_empty() {
        return Err(err("missing"));
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("not a number"));
    }
    match value.parse::<u32>() {
        Ok(p) if p <= 65535 && p >= min => Ok(p as u16),
        _ if min == 0 => Err(err("out of range (0..=65535, 0 lets the host choose)")),
        _ => Err(err("out of range (1..=65535)")),
    }
}

/// Parses `tcp:2222:22`, `tcp:2222::22` (the seed's `-redir` spelling) or `2222:22`.
/// Host port 0 lets the host choose. `udp:` is refused: the flows forward TCP only.
pub fn parse_forward(spec: &str) -> Result<PortForward, ForwardParseError> {
    let rest = match spec.split_once(':') {
        Some(("tcp", r)) => r,
        Some(("udp", _)) => return Err(ForwardParseError::Udp { spec: spec.into() }),
        Some((p, _)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphabetic()) => {
            return Err(ForwardParseError::UnknownProtocol { spec: spec.into(), protocol: p.into() })
        }
        _ => spec,
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (h, g) = match parts.as_slice() {
        [h, g] => (*h, *g),
        [h, "", g] => (*h, *g),
        _ => return Err(ForwardParseError::Shape { spec: spec.into() }),
    };
    let host_port = port(spec, "host", h, 0)?;
    let guest_port = port(spec, "guest", g, 1)?;
    Ok(PortForward { protocol: Protocol::Tcp, host_port, guest_port })
}

/// A guest port and the path to GET there: `8080` or `8080/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// Guest port.
    pub port: u16,
    /// The path, starting with `/`.
    pub path: String,
}

impl HttpTarget {
    /// The wait for an answer here: up to `timeout`, for `expect_status` or (`None`) any HTTP
    /// answer.
    pub fn check(&self, timeout: std::time::Duration, expect_status: Option<u16>) -> crate::HttpCheck {
        crate::HttpCheck { port: self.port, path: self.path.clone(), expect_status, timeout }
    }
}

/// Error parsing an [`HttpTarget`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad HTTP target '{spec}': {problem} (expected PORT or PORT/PATH, e.g. 8080 or 8080/healthz, port 1..=65535)")]
pub struct HttpTargetError {
    /// The text given.
    pub spec: String,
    /// What is wrong.
    pub problem: &'static str,
}

impl std::str::FromStr for HttpTarget {
    type Err = HttpTargetError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |problem| HttpTargetError { spec: spec.into(), problem };
        let (p, path) = match spec.find('/') {
            Some(i) => (&spec[..i], &spec[i..]),
            None => (spec, "/"),
        };
        if p.is_empty() {
            return Err(err("the port is missing"));
        }
        if !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("the port is not a number"));
        }
        let port = match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => n as u16,
            _ => return Err(err("the port is out of range")),
        };
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(err("the path has spaces or control characters"));
        }
        Ok(HttpTarget { port, path: path.into() })
    }
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
        for bad in ["tcp:22", "tcp:x:22", "tcp:1:0", "sctp:1:2", "tcp:1:::2", "tcp:70000:22", "udp:53:53", ""] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let msg = |s: &str| parse_forward(s).unwrap_err().to_string();
        assert!(msg("udp:5353:53").contains("udp forwards are not supported"), "{}", msg("udp:5353:53"));
        assert!(msg("sctp:1:2").contains("unknown protocol 'sctp'"), "{}", msg("sctp:1:2"));
        assert!(msg("tcp:70000:22").contains("host port '70000' is out of range"), "{}", msg("tcp:70000:22"));
        assert!(msg("tcp:80:0").contains("guest port '0' is out of range (1..=65535)"), "{}", msg("tcp:80:0"));
        assert!(msg("tcp::80").contains("host port '' is missing"), "{}", msg("tcp::80"));
        assert!(msg("tcp:8080:").contains("guest port '' is missing"), "{}", msg("tcp:8080:"));
        assert!(msg("tcp:x:80").contains("host port 'x' is not a number"), "{}", msg("tcp:x:80"));
        assert!(msg("tcp:80").contains("expected tcp:HOST_PORT:GUEST_PORT"), "{}", msg("tcp:80"));
    }

    #[test]
    fn http_targets() {
        let t: HttpTarget = "8080".parse().unwrap();
        assert_eq!(t, HttpTarget { port: 8080, path: "/".into() });
        let t: HttpTarget = "80/healthz?x=1".parse().unwrap();
        assert_eq!(t, HttpTarget { port: 80, path: "/healthz?x=1".into() });
        for (bad, why) in [
            ("", "missing"),
            ("/x", "missing"),
            ("0", "out of range"),
            ("70000", "out of range"),
            ("http", "not a number"),
            ("80/a b", "spaces"),
        ] {
            let e = bad.parse::<HttpTarget>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
