//! Waiting for a guest's HTTP answer through its forwarded port: what `--wait-http` and
//! `--probe` do.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::FlowError;

/// How often a wait asks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The largest answer read (the rest is not read).
const MAX_ANSWER: u64 = 1 << 20;

/// What an HTTP wait asks of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// Guest port.
    pub port: u16,
    /// The path to GET (starts with `/`).
    pub path: String,
    /// Accept only this status; `None` accepts any HTTP answer.
    pub expect_status: Option<u16>,
    /// How long to keep asking.
    pub timeout: Duration,
}

impl HttpCheck {
    /// GET `/` on `port`, any HTTP answer, for up to `timeout`.
    pub fn new(port: u16, timeout: Duration) -> Self {
        HttpCheck { port, path: "/".into(), expect_status: None, timeout }
    }

    /// Says what the wait is, for an event line: "waiting up to 300 s for an HTTP answer on
    /// guest port 8080 (GET /)".
    pub fn describe(&self) -> String {
        let what = match self.expect_status {
            Some(s) => format!("an HTTP {s} answer"),
            None => "an HTTP answer".into(),
        };
        format!("waiting up to {} for {what} on guest port {} (GET {})", secs(self.timeout), self.port, self.path)
    }
}

/// A duration as the user gave it: "300 s", "1.5 s".
pub(crate) fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The reason phrase (may be empty).
    pub reason: String,
    /// The whole answer as read (headers and body, at most 1 MiB; invalid UTF-8 replaced).
    pub raw: String,
}

impl HttpAnswer {
    /// The body: what follows the headers.
    pub fn body(&self) -> &str {
        body_of(&self.raw)
    }

    /// The first line of the body, as shown to a person ("the app answered: ...").
    pub fn first_body_line(&self) -> &str {
        first_body_line(&self.raw)
    }
}

/// The body of a raw HTTP answer: what follows the headers (empty without a header end).
fn body_of(raw: &str) -> &str {
    raw.split_once("\r\n\r\n").or_else(|| raw.split_once("\n\n")).map(|(_, b)| b).unwrap_or("")
}

/// The first line of a raw HTTP answer's body (what [`http_get_from`] returns), without its
/// line end; empty when there is no body.
pub fn first_body_line(raw: &str) -> &str {
    body_of(raw).lines().next().unwrap_or("")
}

/// Parses an HTTP/1.x status line (`HTTP/1.1 404 Not Found`): the status and the reason.
/// Anything else (another protocol, a status that is not three digits) is `None`.
pub fn parse_status_line(line: &str) -> Option<(u16, String)> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let rest = line.strip_prefix("HTTP/1.")?;
    let mut chars = rest.chars();
    if !chars.next()?.is_ascii_digit() || chars.next()? != ' ' {
        return None;
    }
    let rest = chars.as_str();
    let code = rest.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let reason = match rest.get(3..)? {
        "" => "",
        r => r.strip_prefix(' ')?,
    };
    let status: u16 = code.parse().ok()?;
    (100..=599).contains(&status).then(|| (status, reason.to_string()))
}

/// One GET; the answer, or what happened instead.
fn get_once(host: &str, port: u16, path: &str) -> Result<HttpAnswer, String> {
    let mut s = TcpStream::connect((host, port)).map_err(|e| format!("no connection ({e})"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())
        .map_err(|e| format!("the connection failed ({e})"))?;
    let mut bytes = Vec::new();
    // A read error after some bytes (a timeout, a reset) keeps what arrived.
    let read = (&mut s).take(MAX_ANSWER).read_to_end(&mut bytes);
    if bytes.is_empty() {
        return Err(match read {
            Ok(_) => "the connection closed without an answer".into(),
            Err(e) => format!("no answer ({e})"),
        });
    }
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    let first = raw.lines().next().unwrap_or("");
    match parse_status_line(first) {
        Some((status, reason)) => Ok(HttpAnswer { status, reason, raw }),
        None => {
            let shown: String = first.chars().take(60).collect();
            Err(format!("an answer that is not HTTP ({shown:?})"))
        }
    }
}

/// GETs `check.path` on `host`:`host_port` (the forward of guest port `check.port`) every
/// [`POLL_INTERVAL`] until an HTTP answer with the expected status arrives, or fails after
/// `check.timeout` with what the last attempt saw (e.g. "answers 404 Not Found").
pub fn http_wait(host: &str, host_port: u16, check: &HttpCheck) -> Result<HttpAnswer, FlowError> {
    let start = Instant::now();
    loop {
        let last = match get_once(host, host_port, &check.path) {
            Ok(a) if check.expect_status.is_none_or(|s| s == a.status) => return Ok(a),
            Ok(a) => format!("answers {} {}", a.status, a.reason).trim_end().to_string(),
            Err(e) => e,
        };
        if start.elapsed() >= check.timeout {
            return Err(FlowError::NoAnswer {
                guest_port: Some(check.port),
                address: format!("{host}:{host_port}"),
                path: check.path.clone(),
                expect_status: check.expect_status,
                timeout: check.timeout,
                last,
            });
        }
        std::thread::sleep(
            POLL_INTERVAL.min(check.timeout.saturating_sub(start.elapsed())).max(Duration::from_millis(1)),
        );
    }
}

/// GETs `/` on 127.0.0.1:`port` until a 200 answer arrives.
pub fn http_get_until(port: u16, timeout: Duration) -> Result<String, FlowError> {
    http_get_from("127.0.0.1", port, timeout)
}

/// GETs `/` on `host`:`port` until a 200 answer arrives; the whole answer. (The guest port is
/// not known here: errors name `port` for it.)
pub fn http_get_from(host: &str, port: u16, timeout: Duration) -> Result<String, FlowError> {
    let check = HttpCheck { expect_status: Some(200), ..HttpCheck::new(port, timeout) };
    http_wait(host, port, &check).map(|a| a.raw).map_err(|e| match e {
        FlowError::NoAnswer { address, path, expect_status, timeout, last, .. } => {
            FlowError::NoAnswer { guest_port: None, address, path, expect_status, timeout, last }
        }
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn first_body_lines() {
        assert_eq!(first_body_line("HTTP/1.1 200 OK\r\nA: b\r\n\r\nhello\r\nworld\r\n"), "hello");
        assert_eq!(first_body_line("HTTP/1.0 200 OK\n\nhi\n"), "hi");
        assert_eq!(first_body_line("HTTP/1.1 204 No Content\r\n\r\n"), "");
        assert_eq!(first_body_line("HTTP/1.1 200 OK\r\nno header end"), "");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 404 Not Found\r"), Some((404, "Not Found".into())));
        assert_eq!(parse_status_line("HTTP/1.0 200 OK"), Some((200, "OK".into())));
        assert_eq!(parse_status_line("HTTP/1.1 204"), Some((204, String::new())));
        for bad in [
            "",
            "HTTP/1.1",
            "HTTP/2 200 OK",
            "HTTP/1.1 20 OK",
            "HTTP/1.1 2000 OK",
            "HTTP/1.1 abc OK",
            "HTTP/1.1  200 OK",
            "SSH-2.0-OpenSSH 200 ",
            "<html> 200 </html>",
            "HTTP/1.1 999 Nope",
            "HTTP/1.1 200OK",
        ] {
            assert_eq!(parse_status_line(bad), None, "{bad:?}");
        }
    }

    /// A loopback server that answers every connection with `answer` and records the request
    /// lines it saw.
    fn server(answer: &'static str) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or("").to_string();
                seen2.lock().unwrap().push(req);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        (port, seen)
    }

    #[test]
    fn any_answer_is_accepted_unless_a_status_is_expected() {
        let (port, seen) = server("HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope");
        let check = HttpCheck { path: "/health".into(), ..HttpCheck::new(8081, Duration::from_secs(10)) };
        let a = http_wait("127.0.0.1", port, &check).unwrap();
        assert_eq!((a.status, a.reason.as_str(), a.body()), (404, "Not Found", "nope"));
        assert_eq!(a.first_body_line(), "nope");
        assert_eq!(seen.lock().unwrap()[0], "GET /health HTTP/1.0");
        let check = HttpCheck { expect_status: Some(200), ..HttpCheck::new(8081, Duration::from_millis(300)) };
        let e = http_wait("127.0.0.1", port, &check).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("guest port 8081 (forwarded to 127.0.0.1:{port}) answers 404 Not Found on /, not 200, after 0.3 s")
        );
    }

    #[test]
    fn a_200_somewhere_in_the_body_is_not_a_200() {
        let (port, _) = server("HTTP/1.1 500 Internal Server Error\r\n\r\nupstream said HTTP/1.1 200 OK");
        let e = http_get_from("127.0.0.1", port, Duration::from_millis(200)).unwrap_err().to_string();
        assert!(e.contains("answers 500 Internal Server Error on /, not 200"), "{e}");
        let (port, _) = server("hello 200 world\r\n");
        let check = HttpCheck::new(80, Duration::from_millis(200));
        let e = http_wait("127.0.0.1", port, &check).unwrap_err().to_string();
        assert!(e.contains("no HTTP answer from guest port 80") && e.contains("not HTTP (\"hello 200 world\")"), "{e}");
    }

    #[test]
    fn no_listener_says_so() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let check = HttpCheck::new(8080, Duration::from_millis(300));
        assert_eq!(check.describe(), "waiting up to 0.3 s for an HTTP answer on guest port 8080 (GET /)");
        let e = http_wait("127.0.0.1", port, &check).unwrap_err().to_string();
        assert!(
            e.starts_with("no HTTP answer from guest port 8080")
                && e.contains("within 0.3 s; the last attempt: no connection"),
            "{e}"
        );
    }
}
