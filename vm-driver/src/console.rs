//! The guest's serial console: run a command and get its output and exit status.
//!
//! QEMU's serial port blocks the guest once a connected client stops reading (the socket
//! fills, the UART stops accepting bytes, and the guest's writer waits), so a [`Console`] never
//! stops reading: a thread drains the connection into a bounded buffer (the newest
//! [`CONSOLE_KEEP`] bytes at least) for as long as the console is connected, and [`Console::run`] and
//! [`Console::wait_for_text`] wait on that buffer. Dropping the console closes the connection
//! and ends the thread; the thread also ends on its own when QEMU closes the socket.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{DriverError, SerialConsole};

/// The console output kept in memory: at least the newest `CONSOLE_KEEP` bytes (at most twice that).
pub const CONSOLE_KEEP: usize = 4 << 20;

/// What the reader thread has read: a window on the byte stream since the connection opened.
struct Window {
    /// The newest bytes.
    data: Vec<u8>,
    /// Stream offset of `data[0]`.
    start: u64,
    /// Why the reader stopped, once it has (QEMU closed the socket, or a read failed).
    closed: Option<String>,
}

impl Window {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    fn push(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
        if self.data.len() > 2 * CONSOLE_KEEP {
            let cut = self.data.len() - CONSOLE_KEEP;
            self.data.drain(..cut);
            self.start += cut as u64;
        }
    }

    /// The bytes from stream offset `from` on (from the oldest kept one if `from` is older).
    fn since(&self, from: u64) -> &[u8] {
        let i = from.saturating_sub(self.start).min(self.data.len() as u64) as usize;
        &self.data[i..]
    }

    /// The stream offset of the first `needle` at or after `from`, if there is one.
    fn find(&self, needle: &[u8], from: u64) -> Option<u64> {
        let from = from.max(self.start);
        find(self.since(from), needle).map(|i| from + i as u64)
    }

    /// Where a search for `needle` resumes once it failed on everything up to the end: a
    /// match may start in the last `needle.len() - 1` bytes.
    fn resume_at(&self, needle: &[u8]) -> u64 {
        self.end().saturating_sub(needle.len().saturating_sub(1) as u64).max(self.start)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

struct Shared {
    window: Mutex<Window>,
    grew: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the window changes or `deadline` passes.
    fn wait<'a>(&self, g: MutexGuard<'a, Window>, deadline: Instant) -> MutexGuard<'a, Window> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.grew.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0
    }
}

/// Reads `stream` into the window until EOF or an error (the console's drop shuts the socket
/// down, which ends a blocked read with EOF).
fn drain(mut stream: UnixStream, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 64 << 10];
    let why = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "the serial console was closed".to_string(),
            Ok(n) => {
                shared.lock().push(&buf[..n]);
                shared.grew.notify_all();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break format!("reading the serial console failed: {e}"),
        }
    };
    shared.lock().closed = Some(why);
    shared.grew.notify_all();
}

/// A connection to the guest's serial console (a shell on ttyS0 that does not echo), drained
/// continuously while it is open.
pub struct Console {
    stream: UnixStream,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    log: PathBuf,
    /// Stream offset up to which [`Console::run`] has consumed the output.
    cursor: u64,
    seq: u64,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").field("log", &self.log).field("cursor", &self.cursor).finish()
    }
}

impl Console {
    /// Connects to the console socket and starts draining it.
    pub(crate) fn connect(socket: &Path, log: &Path) -> Result<Self, DriverError> {
        let stream = UnixStream::connect(socket).map_err(|source| DriverError::Io {
            what: format!("connect to the serial console {}", socket.display()),
            source,
        })?;
        let io = |source| DriverError::Io { what: "start the serial console reader".into(), source };
        let reading = stream.try_clone().map_err(io)?;
        let shared = Arc::new(Shared {
            window: Mutex::new(Window { data: Vec::new(), start: 0, closed: None }),
            grew: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let reader =
            std::thread::Builder::new().name("serial-console".into()).spawn(move || drain(reading, s)).map_err(io)?;
        Ok(Console { stream, shared, reader: Some(reader), log: log.to_owned(), cursor: 0, seq: 0 })
    }

    /// Everything the guest printed on the console since the VM started (from the log file).
    pub fn log(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The newest console output this connection has read (at most twice [`CONSOLE_KEEP`] bytes).
    pub fn recent(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().data).into_owned()
    }

    /// Waits until the guest has printed `text` since the VM started: already in the log
    /// file, or read by this connection before `timeout`.
    pub fn wait_for_text(&self, text: &str, timeout: Duration) -> Result<(), DriverError> {
        let deadline = Instant::now() + timeout;
        let needle = text.as_bytes();
        // QEMU writes the socket before the log: searching the whole window after the log
        // misses nothing.
        let from = self.shared.lock().start;
        if self.log().contains(text) {
            return Ok(());
        }
        let mut g = self.shared.lock();
        let mut from = from;
        loop {
            if g.find(needle, from).is_some() {
                return Ok(());
            }
            from = g.resume_at(needle);
            if let Some(why) = &g.closed {
                return Err(DriverError::Io {
                    what: format!("wait for '{text}' on the serial console: {why}"),
                    source: io::ErrorKind::UnexpectedEof.into(),
                });
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout { waiting_for: format!("'{text}' on the serial console"), timeout });
            }
            g = self.shared.wait(g, deadline);
        }
    }

    /// Runs `command` in the guest shell; returns its output (stdout and stderr; the last
    /// [`CONSOLE_KEEP`] bytes of it at least) and exit status.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<(String, i32), DriverError> {
        self.seq += 1;
        let n = self.seq;
        let deadline = Instant::now() + timeout;
        // The markers are split by quotes in the command so that an echoed command line can
        // never look like the markers themselves.
        let line =
            format!("echo '__CLB''{n}__'; {command}\necho \"__CLE''{n}__ $?\"\n").replace("__CLE''", "__CLE\"\"");
        let io = |what: &str| {
            let what = what.to_string();
            move |source| DriverError::Io { what, source }
        };
        self.stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1)))).map_err(io("serial console"))?;
        self.stream.write_all(line.as_bytes()).map_err(io("write to the serial console"))?;
        let begin = format!("__CLB{n}__");
        let end = format!("__CLE{n}__ ");
        let mut g = self.shared.lock();
        let mut from = self.cursor;
        // Stream offset just after the begin marker, once seen.
        let mut body: Option<u64> = None;
        loop {
            if body.is_none() {
                match g.find(begin.as_bytes(), from) {
                    Some(b) => {
                        body = Some(b + begin.len() as u64);
                        from = b + begin.len() as u64;
                    }
                    None => from = g.resume_at(begin.as_bytes()),
                }
            }
            if let Some(b) = body {
                match g.find(end.as_bytes(), from) {
                    Some(e) => {
                        let after = e + end.len() as u64;
                        if let Some(nl) = g.find(b"\n", after) {
                            let status = String::from_utf8_lossy(&g.since(after)[..(nl - after.max(g.start)) as usize]);
                            let status: i32 = status.trim().parse().unwrap_or(-1);
                            let out = g.since(b);
                            let out = &out[..out.len() - (g.end() - e) as usize];
                            let text = String::from_utf8_lossy(out).replace('\r', "");
                            let text = text.strip_prefix('\n').unwrap_or(&text).to_string();
                            self.cursor = nl + 1;
                            return Ok((text, status));
                        }
                        from = e;
                    }
                    None => from = g.resume_at(end.as_bytes()).max(b),
                }
            }
            if let Some(why) = &g.closed {
                return Err(DriverError::Io {
                    what: format!("run '{command}' on the serial console: {why}"),
                    source: io::ErrorKind::UnexpectedEof.into(),
                });
            }
            if Instant::now() >= deadline {
                self.cursor = from;
                return Err(DriverError::Timeout {
                    waiting_for: format!("command '{command}' on the console"),
                    timeout,
                });
            }
            g = self.shared.wait(g, deadline);
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // Ends the reader's blocked read with EOF; then the thread exits and is joined, and
        // both descriptors close.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

impl SerialConsole for Console {
    fn run(&mut self, command: &str, timeout: Duration) -> Result<(String, i32), DriverError> {
        Console::run(self, command, timeout)
    }

    fn wait_for_text(&self, text: &str, timeout: Duration) -> Result<(), DriverError> {
        Console::wait_for_text(self, text, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    const T: Duration = Duration::from_secs(20);

    /// A console connected to a listener in a fresh directory, and the peer's end.
    fn pair(dir: &Path) -> (Console, UnixStream) {
        let sock = dir.join("serial.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let c = Console::connect(&sock, &dir.join("serial.log")).unwrap();
        let (peer, _) = l.accept().unwrap();
        (c, peer)
    }

    /// Plays the guest shell for one command: reads the two lines [`Console::run`] sends and
    /// answers with `output` between the markers and `status`, in CRLF like a tty.
    fn answer(peer: &mut UnixStream, output: &str, status: i32) {
        let mut r = BufReader::new(peer.try_clone().unwrap());
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        let mut second = String::new();
        r.read_line(&mut second).unwrap();
        let n: String = first["echo '__CLB''".len()..].chars().take_while(char::is_ascii_digit).collect();
        let out = format!("__CLB{n}__\r\n{}__CLE{n}__ {status}\r\n", output.replace('\n', "\r\n"));
        peer.write_all(out.as_bytes()).unwrap();
    }

    /// The peer writes far more than a socket holds while nobody calls `run`: every byte is
    /// taken, and the buffer keeps only the newest.
    #[test]
    fn a_chatty_peer_never_blocks_and_the_newest_output_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, mut peer) = pair(dir.path());
        peer.set_write_timeout(Some(T)).unwrap();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..((3 * CONSOLE_KEEP) >> 20) {
            peer.write_all(&chunk).expect("the console drains the socket while nobody reads it");
        }
        peer.write_all(b"the end\r\n").unwrap();
        c.wait_for_text("the end", T).unwrap();
        let kept = c.shared.lock().data.len();
        assert!((CONSOLE_KEEP..=2 * CONSOLE_KEEP).contains(&kept), "{kept} bytes kept");
        assert!(c.recent().ends_with("the end\r\n"));

        let t = std::thread::spawn(move || {
            answer(&mut peer, "hello\nworld\n", 3);
            peer
        });
        let (out, st) = c.run("printf 'hello\\nworld\\n'; (exit 3)", T).unwrap();
        assert_eq!((out.as_str(), st), ("hello\nworld\n", 3));
        let mut peer = t.join().unwrap();
        let t = std::thread::spawn(move || {
            answer(&mut peer, "", 0);
            peer
        });
        assert_eq!(c.run("true", T).unwrap(), (String::new(), 0));
        t.join().unwrap();
    }

    /// Output that arrives in pieces, with markers split across reads and stale output of an
    /// earlier command before it.
    #[test]
    fn markers_split_across_reads_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, mut peer) = pair(dir.path());
        let t = std::thread::spawn(move || {
            let mut r = BufReader::new(peer.try_clone().unwrap());
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            r.read_line(&mut l).unwrap();
            let all = b"__CLB0__\r\nstale\r\n__CLE0__ 0\r\n__CLB1__\r\nslow output\r\n__CLE1__ 7\r\nrest";
            for piece in all.chunks(3) {
                peer.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            peer
        });
        let (out, st) = c.run("x", T).unwrap();
        assert_eq!((out.as_str(), st), ("slow output\n", 7));
        drop(t.join().unwrap());
    }

    #[test]
    fn a_silent_guest_times_out_saying_what_was_awaited() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _peer) = pair(dir.path());
        let e = c.run("sleep 100", Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("command 'sleep 100'"), "{e}");
        let e = c.wait_for_text("login:", Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("'login:' on the serial console"), "{e}");
    }

    /// QEMU exiting (EOF) ends the reader and fails a waiting `run` at once, not at its timeout.
    #[test]
    fn eof_ends_the_reader_and_fails_waits_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, peer) = pair(dir.path());
        drop(peer);
        let start = Instant::now();
        // Refused on writing (broken pipe) or on reading (EOF), either way as I/O.
        let e = c.run("true", Duration::from_secs(60)).unwrap_err();
        assert!(matches!(e, DriverError::Io { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(c.wait_for_text("never", Duration::from_secs(60)).is_err());
        assert!(
            c.reader.as_ref().unwrap().is_finished() || {
                std::thread::sleep(Duration::from_millis(200));
                c.reader.as_ref().unwrap().is_finished()
            }
        );
    }

    /// Dropping the console closes the connection (the peer reads EOF) and joins the reader.
    #[test]
    fn drop_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (c, mut peer) = pair(dir.path());
        drop(c);
        peer.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(peer.read(&mut buf).unwrap(), 0, "the peer sees the connection closed");
    }

    /// Text the guest printed before the connection (in the log file only) is found too.
    #[test]
    fn wait_for_text_reads_the_log_too() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _peer) = pair(dir.path());
        std::fs::write(dir.path().join("serial.log"), "early boot\r\nready\r\n").unwrap();
        c.wait_for_text("ready", Duration::from_millis(100)).unwrap();
    }
}
