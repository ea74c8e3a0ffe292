//! A QMP client over a unix socket: greeting, `qmp_capabilities`, id-matched replies, and
//! events buffered whenever they arrive. Replies are untrusted: lines are bounded before they
//! are buffered, and nothing in them can make the client panic.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest QMP line accepted.
pub const MAX_LINE: usize = 1 << 20;

/// A QMP protocol failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP socket I/O")]
    Io(#[source] io::Error),
    /// Nothing arrived in time.
    #[error("QMP: no {waiting_for} within {timeout:?}")]
    Timeout {
        /// What was awaited.
        waiting_for: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// QEMU closed the socket.
    #[error("QMP: QEMU closed the connection")]
    Closed,
    /// A line that is not valid QMP.
    #[error("QMP: bad message: {reason}")]
    Protocol {
        /// What is wrong.
        reason: String,
    },
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// An event QEMU sent.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event name, e.g. `MIGRATION`.
    pub name: String,
    /// Its data.
    pub data: Value,
}

/// A connected QMP session.
pub struct Qmp<S: Read + Write = UnixStream> {
    reader: BufReader<S>,
    next_id: u64,
    events: VecDeque<Event>,
    set_timeout: fn(&S, Option<Duration>) -> io::Result<()>,
}

fn unix_timeout(s: &UnixStream, t: Option<Duration>) -> io::Result<()> {
    s.set_read_timeout(t)
}

impl Qmp<UnixStream> {
    /// Connects to `path`, retrying until `timeout` (QEMU creates the socket shortly after
    /// start), reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Self::connect_while(path, timeout, || true)
    }

    /// [`Qmp::connect`], giving up on the socket as soon as `alive` says its server is gone
    /// (a QEMU that exited before it listened).
    pub fn connect_while(path: &Path, timeout: Duration, mut alive: impl FnMut() -> bool) -> Result<Self, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout && alive() => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(QmpError::Io(e)),
            }
        };
        let mut q = Qmp::new(stream, unix_timeout);
        q.handshake(timeout)?;
        Ok(q)
    }
}

impl<S: Read + Write> Qmp<S> {
    /// A session over any stream (tests use an in-memory peer).
    pub fn new(stream: S, set_timeout: fn(&S, Option<Duration>) -> io::Result<()>) -> Self {
        Qmp { reader: BufReader::new(stream), next_id: 1, events: VecDeque::new(), set_timeout }
    }

    /// Reads the greeting and sends `qmp_capabilities`.
    pub fn handshake(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + timeout;
        let greeting = self.read_message(deadline, "greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol { reason: "first message is not a QMP greeting".into() });
        }
        self.execute("qmp_capabilities", None, timeout)?;
        Ok(())
    }

    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout { waiting_for: what.into(), timeout: Duration::ZERO });
            }
            (self.set_timeout)(self.reader.get_ref(), Some(deadline - now)).map_err(QmpError::Io)?;
            let buf = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(QmpError::Timeout { waiting_for: what.into(), timeout: Duration::ZERO });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(QmpError::Io(e)),
            };
            if buf.is_empty() {
                return Err(QmpError::Closed);
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if line.len() + take > MAX_LINE {
                return Err(QmpError::Protocol { reason: format!("line longer than {MAX_LINE} bytes") });
            }
            line.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if done {
                let text = std::str::from_utf8(&line)
                    .map_err(|_| QmpError::Protocol { reason: "line is not UTF-8".into() })?
                    .trim();
                if text.is_empty() {
                    line.clear();
                    continue;
                }
                let v: Value = serde_json::from_str(text)
                    .map_err(|e| QmpError::Protocol { reason: format!("invalid JSON: {e}") })?;
                if !v.is_object() {
                    return Err(QmpError::Protocol { reason: "message is not a JSON object".into() });
                }
                return Ok(v);
            }
        }
    }

    fn stash_event(&mut self, v: &Value) -> bool {
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let data = v.get("data").cloned().unwrap_or(Value::Null);
            if self.events.len() >= 1024 {
                self.events.pop_front();
            }
            self.events.push_back(Event { name: name.to_string(), data });
            true
        } else {
            false
        }
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, args: Option<Value>, timeout: Duration) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("serialising a JSON value cannot fail");
        bytes.push(b'\n');
        self.reader.get_mut().write_all(&bytes).map_err(QmpError::Io)?;
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.read_message(deadline, &format!("reply to {command}")).map_err(|e| match e {
                QmpError::Timeout { waiting_for, .. } => QmpError::Timeout { waiting_for, timeout },
                other => other,
            })?;
            if self.stash_event(&v) {
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // a stale reply to a command that timed out earlier
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: e.get("class").and_then(Value::as_str).unwrap_or("?").into(),
                    desc: e.get("desc").and_then(Value::as_str).unwrap_or("?").into(),
                });
            }
            return Err(QmpError::Protocol { reason: format!("reply to {command} has neither return nor error") });
        }
    }

    /// Waits for an event named `name` whose data satisfies `pred`, looking first at events
    /// already buffered (they are consumed up to and including the match).
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Event, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e.name == name && pred(&e.data)) {
            let e = self.events.remove(i).expect("index found");
            return Ok(e);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.read_message(deadline, &format!("event {name}")).map_err(|e| match e {
                QmpError::Timeout { waiting_for, .. } => QmpError::Timeout { waiting_for, timeout },
                other => other,
            })?;
            if v.get("event").and_then(Value::as_str) == Some(name) {
                let data = v.get("data").cloned().unwrap_or(Value::Null);
                if pred(&data) {
                    return Ok(Event { name: name.into(), data });
                }
            }
            self.stash_event(&v);
        }
    }

    /// Events received and not consumed yet.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A peer that replays canned bytes and records what was written.
    struct Peer {
        input: Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Read for Peer {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Peer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn qmp(script: &str) -> Qmp<Peer> {
        Qmp::new(Peer { input: Cursor::new(script.as_bytes().to_vec()), written: Vec::new() }, |_, _| Ok(()))
    }

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn handshake_and_id_matched_reply_with_interleaved_events() {
        let mut q = qmp(concat!(
            "{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n",
            "{\"return\": {}, \"id\": 1}\n",
            "{\"event\": \"STOP\", \"data\": {}}\n",
            "{\"return\": {\"x\": 1}, \"id\": 99}\n",
            "{\"return\": {\"status\": \"paused\"}, \"id\": 2}\n",
        ));
        q.handshake(T).unwrap();
        let r = q.execute("query-status", None, T).unwrap();
        assert_eq!(r["status"], "paused");
        let e = q.wait_event("STOP", T, |_| true).unwrap();
        assert_eq!(e.name, "STOP");
        let w = String::from_utf8(q.reader.get_ref().written.clone()).unwrap();
        assert!(w.contains("qmp_capabilities") && w.contains("query-status"));
    }

    #[test]
    fn errors_and_garbage_are_typed() {
        let mut q = qmp("{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 1}\n");
        assert!(matches!(q.execute("stop", None, T), Err(QmpError::Command { .. })));
        let mut q = qmp("not json\n");
        assert!(matches!(q.execute("stop", None, T), Err(QmpError::Protocol { .. })));
        let mut q = qmp("[1,2]\n");
        assert!(matches!(q.execute("stop", None, T), Err(QmpError::Protocol { .. })));
        let mut q = qmp("{\"return\": {}, \"id\": 1");
        assert!(matches!(q.execute("stop", None, T), Err(QmpError::Closed)));
        let mut q = qmp("");
        assert!(matches!(q.handshake(T), Err(QmpError::Closed)));
        let mut q = qmp("{\"id\": 1}\n");
        assert!(matches!(q.execute("stop", None, T), Err(QmpError::Protocol { .. })));
        let mut q = qmp("\u{ff}\n");
        assert!(q.execute("stop", None, T).is_err());
    }

    #[test]
    fn oversized_lines_are_rejected() {
        let long = format!("{{\"return\": \"{}\", \"id\": 1}}\n", "a".repeat(MAX_LINE + 10));
        let mut q = qmp(&long);
        assert!(matches!(q.execute("stop", None, T), Err(QmpError::Protocol { .. })));
    }
}
