//! When a freshly booted base VM is ready for its snapshot: a text on its serial console, a
//! guest TCP port that accepts connections, or the guest agent answering.
//!
//! # A guest port through QEMU's user networking
//!
//! A host connection to a forwarded port always succeeds: QEMU's user network stack (slirp)
//! accepts it first, then connects to the guest. If the guest refuses, slirp closes the host
//! connection (an end of file within milliseconds); if the guest's network is not up yet (the
//! firmware, an early kernel), slirp holds the host connection open, silent, as it would a
//! connection to a listening service that waits for the client to speak. So an open, silent
//! connection alone proves nothing. The wait also connects to a guest port where nothing
//! listens ([`CANARY_PORT`]): once the guest refuses that one, its network is up, and from
//! then on a connection to the awaited port that stays open (or yields data) means a service
//! accepted it. A guest that drops connections to closed ports instead of refusing them (a
//! firewall) never passes this wait: use a serial text or the guest agent there.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::http::secs;
use crate::FlowError;

/// A guest port nothing should listen on (TCP port 1, tcpmux): the guest refusing it proves its
/// network is up.
pub const CANARY_PORT: u16 = 1;

/// How long an accepted connection must stay open, silent, to count (at least; longer when the
/// guest is slow to refuse the canary).
const SETTLE: Duration = Duration::from_millis(300);

/// How long the canary may take to be refused before the guest's network counts as not up.
const CANARY_WAIT: Duration = Duration::from_secs(2);

/// How often the wait tries again.
const POLL: Duration = Duration::from_millis(200);

/// What says that a booted base VM is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadyCheck {
    /// The guest prints this text on its serial console.
    SerialText(String),
    /// The guest accepts TCP connections on this port (forwarded from the host for the wait).
    TcpPort(u16),
    /// The QEMU guest agent in the guest answers `guest-ping` (the VM gets the agent's
    /// channel).
    Agent,
}

impl ReadyCheck {
    /// Says what the wait is, for an event line.
    pub fn describe(&self, timeout: Duration) -> String {
        match self {
            ReadyCheck::SerialText(t) => format!("waiting up to {} for {t:?} on the serial console", secs(timeout)),
            ReadyCheck::TcpPort(p) => {
                format!("waiting up to {} for guest port {p} to accept connections", secs(timeout))
            }
            ReadyCheck::Agent => format!("waiting up to {} for the guest agent to answer", secs(timeout)),
        }
    }
}

/// What one look at a connection saw.
enum Seen {
    /// Data arrived, or the connection stayed open for the whole wait.
    Open,
    /// The connection was closed or reset after this long.
    Closed(Duration),
    /// No connection to the forward at all.
    NoConnection(std::io::Error),
}

/// Connects to `addr` and watches the connection for up to `wait`.
fn look(addr: SocketAddr, wait: Duration) -> Seen {
    let t0 = Instant::now();
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return Seen::NoConnection(e),
    };
    let mut buf = [0u8; 64];
    loop {
        let left = wait.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Seen::Open;
        }
        if s.set_read_timeout(Some(left)).is_err() {
            return Seen::Closed(t0.elapsed());
        }
        return match s.read(&mut buf) {
            Ok(0) => Seen::Closed(t0.elapsed()),
            Ok(_) => Seen::Open,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Seen::Open,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => Seen::Closed(t0.elapsed()),
        };
    }
}

/// One round: `Ok` when ready, else what was seen.
fn round(host: &str, target: (u16, u16), canary: (u16, u16)) -> Result<(), String> {
    let addr = |port: u16| -> Result<SocketAddr, String> {
        format!("{host}:{port}").parse().map_err(|e| format!("bad forward address {host}:{port}: {e}"))
    };
    let refused_after = match look(addr(canary.1)?, CANARY_WAIT) {
        Seen::Closed(d) => d,
        Seen::Open => {
            return Err(format!(
                "the guest's network does not answer yet (a connection to guest port {}, where nothing should \
                 listen, was neither refused nor answered within {})",
                canary.0,
                secs(CANARY_WAIT)
            ))
        }
        Seen::NoConnection(e) => return Err(format!("no connection to the forward {host}:{} ({e})", canary.1)),
    };
    match look(addr(target.1)?, SETTLE.max(refused_after * 4)) {
        Seen::Open => Ok(()),
        Seen::Closed(_) => Err(format!("guest port {} refuses connections", target.0)),
        Seen::NoConnection(e) => Err(format!("no connection to the forward {host}:{} ({e})", target.1)),
    }
}

/// Waits until guest port `target.0` accepts connections, through its forward on
/// `host:target.1`, with the forward of [`CANARY_PORT`] on `host:canary.1` telling a guest
/// whose network is up from one whose network is not (see the module docs). Fails after
/// `timeout` with what the last attempt saw.
pub(crate) fn tcp_wait(
    host: &str,
    target: (u16, u16),
    canary: (u16, u16),
    timeout: Duration,
) -> Result<Duration, FlowError> {
    let start = Instant::now();
    loop {
        let last = match round(host, target, canary) {
            Ok(()) => return Ok(start.elapsed()),
            Err(last) => last,
        };
        if start.elapsed() >= timeout {
            return Err(FlowError::NotReady {
                waiting_for: format!(
                    "guest port {} to accept connections (forwarded to {host}:{})",
                    target.0, target.1
                ),
                timeout,
                last,
            });
        }
        std::thread::sleep(POLL.min(timeout.saturating_sub(start.elapsed())).max(Duration::from_millis(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A loopback listener that treats each connection as `how` says: hold it open silently,
    /// close it at once, or say hello.
    fn listener(how: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                match how {
                    "hold" => held.push(s),
                    "hello" => {
                        let _ = std::io::Write::write_all(&mut s, b"SSH-2.0-guest\r\n");
                        held.push(s);
                    }
                    _ => drop(s),
                }
            }
        });
        port
    }

    #[test]
    fn an_open_connection_counts_only_once_the_guest_refuses_the_canary() {
        let t = Duration::from_secs(5);
        let (hold, close, hello) = (listener("hold"), listener("close"), listener("hello"));
        // The guest's network is up (the canary is refused) and a service holds the connection.
        tcp_wait("127.0.0.1", (80, hold), (1, close), t).unwrap();
        // ... or speaks first.
        tcp_wait("127.0.0.1", (22, hello), (1, close), t).unwrap();
        // The network is up and the port refuses.
        let e = tcp_wait("127.0.0.1", (81, close), (1, close), Duration::from_millis(500)).unwrap_err().to_string();
        assert!(
            e.contains("guest port 81 to accept connections") && e.ends_with("guest port 81 refuses connections"),
            "{e}"
        );
        // Everything is held open, the canary too: the network is not up, nothing counts.
        let e = tcp_wait("127.0.0.1", (80, hold), (1, hold), Duration::from_millis(500)).unwrap_err().to_string();
        assert!(e.contains("the guest's network does not answer yet"), "{e}");
    }

    #[test]
    fn no_listener_says_so() {
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = tcp_wait("127.0.0.1", (80, free), (1, free), Duration::from_millis(300)).unwrap_err().to_string();
        assert!(
            e.contains("within 0.3 s") && e.contains(&format!("no connection to the forward 127.0.0.1:{free}")),
            "{e}"
        );
    }
}
