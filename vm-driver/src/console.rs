//! The guest's serial console: run a command and get its output and exit status.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{DriverError, SerialConsole};

/// A connection to the guest's serial console (a shell on ttyS0 that does not echo).
pub struct Console {
    stream: UnixStream,
    log: PathBuf,
    pending: Vec<u8>,
    seq: u64,
}

impl Console {
    pub(crate) fn connect(socket: &Path, log: &Path) -> Result<Self, DriverError> {
        let stream = UnixStream::connect(socket).map_err(|source| DriverError::Io {
            what: format!("connect to the serial console {}", socket.display()),
            source,
        })?;
        Ok(Console { stream, log: log.to_owned(), pending: Vec::new(), seq: 0 })
    }

    /// Everything the guest printed on the console since the VM started (from the log file).
    pub fn log(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Waits until the console log contains `text`.
    pub fn wait_for_text(&self, text: &str, timeout: Duration) -> Result<(), DriverError> {
        let start = Instant::now();
        loop {
            if self.log().contains(text) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(DriverError::Timeout { waiting_for: format!("'{text}' on the serial console"), timeout });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `command` in the guest shell; returns its output (stdout and stderr) and exit status.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<(String, i32), DriverError> {
        self.seq += 1;
        let n = self.seq;
        // The markers are split by quotes in the command so that an echoed command line can
        // never look like the markers themselves.
        let line =
            format!("echo '__CLB''{n}__'; {command}\necho \"__CLE''{n}__ $?\"\n").replace("__CLE''", "__CLE\"\"");
        self.stream
            .write_all(line.as_bytes())
            .map_err(|source| DriverError::Io { what: "write to the serial console".into(), source })?;
        let begin = format!("__CLB{n}__\n");
        let end = format!("__CLE{n}__ ");
        let deadline = Instant::now() + timeout;
        loop {
            let text = String::from_utf8_lossy(&self.pending).replace('\r', "");
            if let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) {
                if e > b {
                    if let Some(nl) = text[e..].find('\n') {
                        let status: i32 = text[e + end.len()..e + nl].trim().parse().unwrap_or(-1);
                        let output = text[b + begin.len()..e].to_string();
                        let rest = text.as_bytes()[e + nl + 1..].to_vec();
                        self.pending = rest;
                        return Ok((output, status));
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DriverError::Timeout {
                    waiting_for: format!("command '{command}' on the console"),
                    timeout,
                });
            }
            self.stream
                .set_read_timeout(Some((deadline - now).min(Duration::from_millis(200))))
                .map_err(|source| DriverError::Io { what: "serial console".into(), source })?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(DriverError::Io {
                        what: "serial console closed".into(),
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(k) => {
                    self.pending.extend_from_slice(&buf[..k]);
                    if self.pending.len() > 16 << 20 {
                        let cut = self.pending.len() - (8 << 20);
                        self.pending.drain(..cut);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) => {}
                Err(source) => return Err(DriverError::Io { what: "read the serial console".into(), source }),
            }
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
