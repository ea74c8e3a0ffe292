//! A client of the QEMU guest agent (`qemu-ga`) on its virtio-serial channel: ping, and run a
//! program in the guest and collect its exit status and output.
//!
//! The protocol is QMP's without a greeting: one JSON object per line each way. The channel
//! outlives connections and guest restarts, so it may hold stale bytes (half a request the
//! agent is still parsing, a reply meant for an earlier client); a session therefore starts by
//! resynchronising, as the agent's documentation prescribes:
//!
//! ```text
//! client -> agent   0xFF {"execute": "guest-sync-delimited", "arguments": {"id": N}}\n
//! agent  -> client  ... stale bytes ... 0xFF {"return": N}\n
//! ```
//!
//! The client's 0xFF (never part of UTF-8 JSON) makes the agent drop any partial input; the
//! agent's 0xFF marks where its answer starts, and everything before it is discarded, as is
//! any line until the one that returns `N`, a fresh random id. After an error or a timeout
//! the next call resynchronises again.
//!
//! The guest is untrusted: lines are bounded ([`MAX_LINE`]) before they are buffered, decoded
//! output is bounded ([`MAX_OUTPUT`]), and nothing the agent sends can make the client panic.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::DriverError;

/// Longest line accepted from the agent (a `guest-exec-status` reply carries the output in
/// base64).
pub const MAX_LINE: usize = 8 << 20;
/// Most bytes of stdout, and of stderr, kept of a command's output; the rest is dropped and
/// [`ExecOutput::truncated`] says so.
pub const MAX_OUTPUT: usize = 4 << 20;

/// What a program run with [`GuestAgent::exec`] left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its exit code, or 128 + the signal that killed it, as a shell reports it (-1 when the
    /// agent says neither).
    pub status: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// Some output was dropped: by the agent (its own limit) or by [`MAX_OUTPUT`].
    pub truncated: bool,
}

/// A connection to a guest agent.
pub struct GuestAgent {
    reader: BufReader<UnixStream>,
    synced: bool,
    next_id: u64,
}

impl std::fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAgent").field("synced", &self.synced).finish()
    }
}

static SYNC_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A sync id no earlier session used: time, process and a counter mixed, kept positive in
/// the agent's 64-bit integers.
fn fresh_id() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = SYNC_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mixed =
        blake3::hash(&[nanos.to_le_bytes(), u64::from(std::process::id()).to_le_bytes(), n.to_le_bytes()].concat());
    let b = mixed.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], 0, 0])
}

fn protocol(reason: impl Into<String>) -> DriverError {
    DriverError::GuestAgent { reason: reason.into() }
}

impl GuestAgent {
    /// Connects to the agent's channel (QEMU's chardev socket).
    pub fn connect(socket: &Path) -> Result<Self, DriverError> {
        let stream = UnixStream::connect(socket).map_err(|source| DriverError::Io {
            what: format!("connect to the guest agent channel {}", socket.display()),
            source,
        })?;
        Ok(Self::from_stream(stream))
    }

    /// A client on an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Self {
        GuestAgent { reader: BufReader::new(stream), synced: false, next_id: 1 }
    }

    /// Resynchronises the channel (see the module docs), waiting up to `timeout`.
    pub fn sync(&mut self, timeout: Duration) -> Result<(), DriverError> {
        self.synced = false;
        let deadline = Instant::now() + timeout;
        let id = fresh_id();
        let mut msg = vec![0xFF];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}).to_string().as_bytes(),
        );
        msg.push(b'\n');
        self.write(&msg, timeout)?;
        let waiting = |timeout| DriverError::Timeout {
            waiting_for: "the guest agent's answer to guest-sync-delimited (is qemu-ga running in the guest?)".into(),
            timeout,
        };
        // Everything up to the agent's 0xFF is stale.
        loop {
            let buf = match self.fill(deadline) {
                Ok(b) => b,
                Err(None) => return Err(waiting(timeout)),
                Err(Some(e)) => return Err(e),
            };
            match buf.iter().position(|&b| b == 0xFF) {
                Some(i) => {
                    self.reader.consume(i + 1);
                    break;
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                }
            }
        }
        loop {
            let line = match self.read_line(deadline) {
                Ok(l) => l,
                Err(None) => return Err(waiting(timeout)),
                Err(Some(e)) => return Err(e),
            };
            // A line that is not the answer (stale, or garbage) is skipped.
            if serde_json::from_slice::<Value>(&line).ok().and_then(|v| v.get("return").and_then(Value::as_u64))
                == Some(id)
            {
                self.synced = true;
                return Ok(());
            }
        }
    }

    /// Asks the agent whether it is there, waiting up to `timeout` for the answer.
    pub fn ping(&mut self, timeout: Duration) -> Result<(), DriverError> {
        let deadline = Instant::now() + timeout;
        self.ensure_synced(deadline, timeout)?;
        self.execute("guest-ping", None, deadline, timeout).map(|_| ())
    }

    /// Runs `argv` (a program and its arguments, no shell) in the guest, waiting up to
    /// `timeout` for it to exit. On a timeout the program is left running in the guest.
    pub fn exec(&mut self, argv: &[&str], timeout: Duration) -> Result<ExecOutput, DriverError> {
        let Some((path, args)) = argv.split_first() else {
            return Err(DriverError::BadImage {
                what: "guest command",
                path: Default::default(),
                reason: "no program to run".into(),
            });
        };
        let deadline = Instant::now() + timeout;
        self.ensure_synced(deadline, timeout)?;
        let started = self.execute(
            "guest-exec",
            Some(json!({"path": path, "arg": args, "capture-output": true})),
            deadline,
            timeout,
        )?;
        let pid = started
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| protocol(format!("guest-exec returned no pid: {}", brief(&started))))?;
        let mut pause = Duration::from_millis(5);
        loop {
            let status = self.execute("guest-exec-status", Some(json!({"pid": pid})), deadline, timeout)?;
            match parse_exec_status(&status) {
                Ok(Some(out)) => return Ok(out),
                Ok(None) => {}
                Err(e) => {
                    self.synced = false;
                    return Err(e);
                }
            }
            let now = Instant::now();
            if now + pause >= deadline {
                return Err(DriverError::Timeout {
                    waiting_for: format!("{} (guest pid {pid}) to exit in the guest", argv.join(" ")),
                    timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    fn ensure_synced(&mut self, deadline: Instant, timeout: Duration) -> Result<(), DriverError> {
        if !self.synced {
            let left = deadline.saturating_duration_since(Instant::now());
            self.sync(left).map_err(|e| match e {
                DriverError::Timeout { waiting_for, .. } => DriverError::Timeout { waiting_for, timeout },
                e => e,
            })?;
        }
        Ok(())
    }

    /// Runs `command` and returns its `return` value; any failure leaves the session to be
    /// resynchronised.
    fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value, DriverError> {
        let r = self.execute_synced(command, args, deadline, timeout);
        if r.is_err() {
            self.synced = false;
        }
        r
    }

    fn execute_synced(
        &mut self,
        command: &str,
        args: Option<Value>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value, DriverError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.write(&bytes, deadline.saturating_duration_since(Instant::now()))?;
        loop {
            let line = match self.read_line(deadline) {
                Ok(l) => l,
                Err(None) => {
                    return Err(DriverError::Timeout {
                        waiting_for: format!("the guest agent's answer to {command}"),
                        timeout,
                    })
                }
                Err(Some(e)) => return Err(e),
            };
            let v: Value =
                serde_json::from_slice(&line).map_err(|e| protocol(format!("answer to {command} is not JSON: {e}")))?;
            if !v.is_object() {
                return Err(protocol(format!("answer to {command} is not a JSON object")));
            }
            match v.get("id") {
                // A stale answer to a request that timed out earlier.
                Some(other) if other.as_u64() != Some(id) => continue,
                _ => {}
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let class = e.get("class").and_then(Value::as_str).unwrap_or("?");
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("?");
                return Err(protocol(format!("{command} failed: {class}: {}", clip(desc))));
            }
            return Err(protocol(format!("answer to {command} has neither return nor error: {}", brief(&v))));
        }
    }

    fn write(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), DriverError> {
        let io = |source| DriverError::Io { what: "write to the guest agent channel".into(), source };
        let s = self.reader.get_mut();
        s.set_write_timeout(Some(timeout.max(Duration::from_millis(1)))).map_err(io)?;
        s.write_all(bytes).map_err(io)
    }

    /// The buffered bytes, reading more if there are none: `Err(None)` once `deadline` has
    /// passed.
    fn fill(&mut self, deadline: Instant) -> Result<&[u8], Option<DriverError>> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(None);
            }
            let io = |source| Some(DriverError::Io { what: "read the guest agent channel".into(), source });
            self.reader.get_ref().set_read_timeout(Some(deadline - now)).map_err(io)?;
            match self.reader.fill_buf() {
                Ok([]) => {
                    return Err(Some(DriverError::Io {
                        what: "read the guest agent channel".into(),
                        source: io::ErrorKind::UnexpectedEof.into(),
                    }))
                }
                Ok(_) => break,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Err(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(self.reader.buffer())
    }

    /// One non-empty line, without its end, at most [`MAX_LINE`] bytes; `Err(None)` once
    /// `deadline` has passed. A 0xFF (a delimiter the agent sent) starts the line afresh.
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, Option<DriverError>> {
        let mut line = Vec::new();
        loop {
            let buf = self.fill(deadline)?;
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if line.len() + take > MAX_LINE {
                return Err(Some(protocol(format!("the guest agent sent a line longer than {MAX_LINE} bytes"))));
            }
            line.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            if let Some(i) = line.iter().rposition(|&b| b == 0xFF) {
                line.drain(..=i);
            }
            if done {
                let text = line.trim_ascii();
                if !text.is_empty() {
                    return Ok(text.to_vec());
                }
                line.clear();
            }
        }
    }
}

/// A `guest-exec-status` answer: `None` while the program runs.
fn parse_exec_status(v: &Value) -> Result<Option<ExecOutput>, DriverError> {
    let exited = v
        .get("exited")
        .and_then(Value::as_bool)
        .ok_or_else(|| protocol(format!("guest-exec-status without 'exited': {}", brief(v))))?;
    if !exited {
        return Ok(None);
    }
    let code = v.get("exitcode").and_then(Value::as_i64);
    let signal = v.get("signal").and_then(Value::as_i64);
    let status = match (code, signal) {
        (Some(c), _) => i32::try_from(c).unwrap_or(-1),
        (None, Some(s)) => i32::try_from(s).ok().and_then(|s| s.checked_add(128)).unwrap_or(-1),
        (None, None) => -1,
    };
    let mut truncated = false;
    let mut data = |key: &str, flag: &str| -> Result<Vec<u8>, DriverError> {
        truncated |= v.get(flag).and_then(Value::as_bool).unwrap_or(false);
        match v.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => {
                let (bytes, cut) =
                    decode_base64(s, MAX_OUTPUT).map_err(|e| protocol(format!("guest-exec-status {key}: {e}")))?;
                truncated |= cut;
                Ok(bytes)
            }
            Some(_) => Err(protocol(format!("guest-exec-status {key} is not a string"))),
        }
    };
    let stdout = data("out-data", "out-truncated")?;
    let stderr = data("err-data", "err-truncated")?;
    Ok(Some(ExecOutput { status, stdout, stderr, truncated }))
}

/// Decodes standard base64 (padding optional), keeping at most `max` bytes: the bytes, and
/// whether some were dropped.
fn decode_base64(s: &str, max: usize) -> Result<(Vec<u8>, bool), String> {
    let body = s.trim_end_matches('=');
    let pad = s.len() - body.len();
    if pad > 2 || body.len() % 4 == 1 || (pad > 0 && !s.len().is_multiple_of(4)) {
        return Err("malformed base64 (bad length or padding)".into());
    }
    let mut out = Vec::with_capacity((body.len() / 4 * 3 + 2).min(max));
    let mut truncated = false;
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in body.as_bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("invalid base64 byte {c:#04x}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            let byte = (acc >> bits) as u8;
            acc &= (1 << bits) - 1;
            if out.len() < max {
                out.push(byte);
            } else {
                truncated = true;
            }
        }
    }
    Ok((out, truncated))
}

/// At most 200 characters of `s`, for error messages.
fn clip(s: &str) -> String {
    let mut c: String = s.chars().take(200).collect();
    if c.len() < s.len() {
        c.push_str("...");
    }
    c
}

/// A value in an error message, clipped.
fn brief(v: &Value) -> String {
    clip(&v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const T: Duration = Duration::from_secs(10);

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in bytes.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    /// A fake agent on the other end of a socket pair: strips the client's 0xFF, parses each
    /// request line and writes what `answer` returns for it (raw bytes, so tests can send
    /// anything). Ends when the client hangs up.
    fn agent(answer: impl Fn(&Value) -> Vec<u8> + Send + 'static) -> (GuestAgent, std::thread::JoinHandle<Vec<Value>>) {
        let (client, mut peer) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut pending = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = match peer.read(&mut buf) {
                    Ok(0) | Err(_) => return seen,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).filter(|&b| b != 0xFF).collect();
                    let req: Value = serde_json::from_slice(&line).unwrap();
                    let out = answer(&req);
                    seen.push(req);
                    if peer.write_all(&out).is_err() {
                        return seen;
                    }
                }
            }
        });
        (GuestAgent::from_stream(client), t)
    }

    /// What a well-behaved agent answers; `exec_polls` "still running" answers first.
    fn well_behaved(req: &Value, stale: &[u8]) -> Vec<u8> {
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let reply = |r: Value| format!("{}\n", json!({"return": r, "id": id})).into_bytes();
        match req["execute"].as_str().unwrap() {
            "guest-sync-delimited" => {
                let mut out = stale.to_vec();
                out.push(0xFF);
                out.extend_from_slice(format!("{}\n", json!({"return": req["arguments"]["id"]})).as_bytes());
                out
            }
            "guest-ping" => reply(json!({})),
            "guest-exec" => reply(json!({"pid": 42})),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn sync_discards_stale_bytes_then_ping_and_exec_work() {
        let polls = std::sync::atomic::AtomicUsize::new(0);
        let (mut a, t) = agent(move |req| {
            if req["execute"] == "guest-exec-status" {
                assert_eq!(req["arguments"]["pid"], 42);
                let id = &req["id"];
                // Running twice, then exited, with a stale answer of another id in between.
                return match polls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => format!("{}\n", json!({"return": {"exited": false}, "id": id})).into_bytes(),
                    _ => format!(
                        "{}\n\n{}\n",
                        json!({"return": {"exited": true, "exitcode": 0}, "id": 9999}),
                        json!({"return": {"exited": true, "exitcode": 3, "out-data": b64(b"hello\n"),
                               "err-data": b64(b"oops"), "out-truncated": false}, "id": id})
                    )
                    .into_bytes(),
                };
            }
            well_behaved(req, b"{\"return\": 12345}\n half a line {{{\xc3")
        });
        a.ping(T).unwrap();
        let out = a.exec(&["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"], T).unwrap();
        assert_eq!(
            out,
            ExecOutput { status: 3, stdout: b"hello\n".to_vec(), stderr: b"oops".to_vec(), truncated: false }
        );
        drop(a);
        let seen = t.join().unwrap();
        let names: Vec<&str> = seen.iter().map(|r| r["execute"].as_str().unwrap()).collect();
        assert_eq!(names[..3], ["guest-sync-delimited", "guest-ping", "guest-exec"]);
        assert_eq!(
            seen[2]["arguments"],
            json!({"path": "/bin/sh", "arg": ["-c", "echo hello; echo oops >&2; exit 3"], "capture-output": true})
        );
    }

    #[test]
    fn a_silent_channel_times_out_saying_what_it_waited_for() {
        let (client, _peer) = UnixStream::pair().unwrap();
        let mut a = GuestAgent::from_stream(client);
        let start = Instant::now();
        let e = a.ping(Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("guest-sync-delimited") && e.to_string().contains("qemu-ga"), "{e}");
    }

    #[test]
    fn an_agent_error_is_reported_with_its_description() {
        let (mut a, _t) = agent(|req| {
            if req["execute"] == "guest-exec" {
                return format!(
                    "{}\n",
                    json!({"error": {"class": "GenericError", "desc": "Failed to execute child process"}, "id": req["id"]})
                )
                .into_bytes();
            }
            well_behaved(req, b"")
        });
        let e = a.exec(&["/nonexistent"], T).unwrap_err();
        assert!(matches!(e, DriverError::GuestAgent { .. }), "{e}");
        assert!(e.to_string().contains("Failed to execute child process"), "{e}");
        // The session resynchronises and goes on.
        a.ping(T).unwrap();
    }

    #[test]
    fn a_program_killed_by_a_signal_has_the_shell_status() {
        let (mut a, _t) = agent(|req| {
            if req["execute"] == "guest-exec-status" {
                return format!("{}\n", json!({"return": {"exited": true, "signal": 9}, "id": req["id"]})).into_bytes();
            }
            well_behaved(req, b"")
        });
        assert_eq!(a.exec(&["sleep", "100"], T).unwrap().status, 137);
    }

    #[test]
    fn a_program_that_does_not_exit_times_out_naming_it() {
        let (mut a, _t) = agent(|req| {
            if req["execute"] == "guest-exec-status" {
                return format!("{}\n", json!({"return": {"exited": false}, "id": req["id"]})).into_bytes();
            }
            well_behaved(req, b"")
        });
        let e = a.exec(&["sleep", "100"], Duration::from_millis(500)).unwrap_err();
        assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("sleep 100 (guest pid 42)"), "{e}");
    }

    /// Garbage of every kind is an error, never a panic, and the next call resynchronises.
    #[test]
    fn garbage_and_oversized_answers_are_errors() {
        let replies: Vec<Vec<u8>> = vec![
            b"not json\n".to_vec(),
            b"[1, 2]\n".to_vec(),
            b"\"text\"\n".to_vec(),
            b"{\"neither\": 1}\n".to_vec(),
            b"{\"return\": {\"exited\": true, \"exitcode\": 0, \"out-data\": \"!!!!\"}}\n".to_vec(),
            b"{\"return\": {\"exited\": true, \"exitcode\": 0, \"out-data\": 5}}\n".to_vec(),
            b"{\"return\": {\"exited\": true, \"exitcode\": 0, \"out-data\": \"QUJD=\"}}\n".to_vec(),
            b"{\"return\": {\"exitcode\": 0}}\n".to_vec(),
            b"{\"return\": {\"exited\": true, \"exitcode\": 99999999999, \"signal\": 1e300}}\n".to_vec(),
            b"\xc3\x28\xff\n".to_vec(),
            [b"{\"return\": \"".to_vec(), vec![b'a'; MAX_LINE + 10], b"\"}\n".to_vec()].concat(),
        ];
        for (i, reply) in replies.into_iter().enumerate() {
            let (mut a, _t) = agent(move |req| {
                if req["execute"] == "guest-exec-status" {
                    return reply.clone();
                }
                well_behaved(req, b"")
            });
            match a.exec(&["true"], Duration::from_secs(2)) {
                // A huge exit code or signal is a status of -1, not a panic.
                Ok(out) => assert_eq!((i, out.status), (8, -1)),
                Err(e) => {
                    assert!(matches!(e, DriverError::GuestAgent { .. } | DriverError::Timeout { .. }), "reply {i}: {e}")
                }
            }
            assert!(!a.synced || i == 8, "reply {i}: an error leaves the session to be resynchronised");
        }
    }

    #[test]
    fn base64_decodes_bounded() {
        for sample in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar", &[0xFF, 0, 0x80, 7]] {
            assert_eq!(decode_base64(&b64(sample), 100).unwrap(), (sample.to_vec(), false));
            let unpadded = b64(sample).trim_end_matches('=').to_string();
            assert_eq!(decode_base64(&unpadded, 100).unwrap(), (sample.to_vec(), false));
        }
        assert_eq!(decode_base64(&b64(b"foobar"), 4).unwrap(), (b"foob".to_vec(), true));
        for bad in ["Zg===", "Z", "Zm9v!", "Zm 9v", "é"] {
            assert!(decode_base64(bad, 100).is_err(), "{bad}");
        }
    }
}
