//! A small HTTP/1.1 file server that answers range requests: what an early start reads a
//! segmented overlay from when no other server is at hand (`cloudlet share`).
//!
//! `GET` or `HEAD` of `/` or `/NAME` (the file's name) answers the file: whole (`200`) or the
//! one range asked for (`Range: bytes=A-B`, `bytes=A-`, `bytes=-N`: `206` with
//! `Content-Range`; a range past the end: `416`). Connections are kept alive; the file is
//! opened for every request, so it may be replaced while it is shared. Nothing else is
//! served.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest request head read.
const MAX_HEAD: u64 = 16 << 10;
/// How long a kept-alive connection may stay idle.
const IDLE: Duration = Duration::from_secs(60);

/// How [`serve_file`] serves.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShareOptions {
    /// Send at most this many bytes per second on each connection (`None`: as fast as the
    /// network takes them): a slow link, for trying an early start without one.
    pub rate: Option<u64>,
}

/// Serves `path` on `listener` until `stop` is set (checked between connections; set it and
/// connect once to wake the server). One thread per connection.
pub fn serve_file(listener: TcpListener, path: &Path, opts: ShareOptions, stop: Arc<AtomicBool>) -> io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let (path, name) = (path.to_owned(), name.clone());
        std::thread::spawn(move || {
            if let Err(e) = connection(conn, &path, &name, opts) {
                tracing::debug!(error = %e, "share: connection ended");
            }
        });
    }
    Ok(())
}

fn connection(conn: TcpStream, path: &PathBuf, name: &str, opts: ShareOptions) -> io::Result<()> {
    conn.set_read_timeout(Some(IDLE))?;
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut input = BufReader::new(conn);
    loop {
        let mut head = Vec::new();
        // The request line and headers, up to the empty line.
        loop {
            let mut line = Vec::new();
            let n = (&mut input).take(MAX_HEAD).read_until(b'\n', &mut line)?;
            if n == 0 {
                return Ok(());
            }
            if line == b"\r\n" || line == b"\n" {
                break;
            }
            head.push(String::from_utf8_lossy(&line).trim_end().to_string());
            if head.len() > 100 {
                return answer(&mut out, 431, "Request Header Fields Too Large", &[], b"");
            }
        }
        let Some(request) = head.first() else { continue };
        let mut parts = request.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let range = head[1..].iter().find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.trim().eq_ignore_ascii_case("range").then(|| v.trim().to_string())
        });
        if method != "GET" && method != "HEAD" {
            answer(&mut out, 405, "Method Not Allowed", &[("Allow", "GET, HEAD".into())], b"")?;
            continue;
        }
        let wanted = target.trim_start_matches('/');
        if !wanted.is_empty() && wanted != name {
            answer(&mut out, 404, "Not Found", &[], b"")?;
            continue;
        }
        let file = match File::open(path) {
            Ok(f) => f,
            Err(_) => {
                answer(&mut out, 404, "Not Found", &[], b"")?;
                continue;
            }
        };
        let len = file.metadata()?.len();
        let (status, reason, from, to) = match range.as_deref().map(|r| parse_range(r, len)) {
            None => (200, "OK", 0, len),
            Some(Some((a, b))) => (206, "Partial Content", a, b),
            Some(None) => {
                answer(&mut out, 416, "Range Not Satisfiable", &[("Content-Range", format!("bytes */{len}"))], b"")?;
                continue;
            }
        };
        let mut headers = vec![("Accept-Ranges", "bytes".to_string()), ("Content-Length", (to - from).to_string())];
        if status == 206 {
            headers.push(("Content-Range", format!("bytes {from}-{}/{len}", to - 1)));
        }
        write_head(&mut out, status, reason, &headers)?;
        if method == "GET" {
            let mut at = from;
            // Pieces of about 10 ms at the rate, when there is one.
            let piece = opts.rate.map_or(256 << 10, |r| (r / 100).clamp(1024, 256 << 10)) as usize;
            let mut buf = vec![0u8; piece];
            let started = std::time::Instant::now();
            while at < to {
                let n = ((to - at) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], at)?;
                out.write_all(&buf[..n])?;
                at += n as u64;
                if let Some(rate) = opts.rate.filter(|r| *r > 0) {
                    let due = Duration::from_secs_f64((at - from) as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        }
        out.flush()?;
    }
}

/// The bytes `[A, B)` a `Range` header asks for, or `None` when it cannot be served.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (from, to) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (len.saturating_sub(n), len)
    } else {
        let from: u64 = a.parse().ok()?;
        let to = if b.is_empty() { len } else { b.parse::<u64>().ok()?.saturating_add(1).min(len) };
        (from, to)
    };
    (from < to && from < len).then_some((from, to))
}

fn write_head(out: &mut TcpStream, status: u16, reason: &str, headers: &[(&str, String)]) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn answer(out: &mut TcpStream, status: u16, reason: &str, headers: &[(&str, String)], body: &[u8]) -> io::Result<()> {
    let mut h = headers.to_vec();
    h.push(("Content-Length", body.len().to_string()));
    write_head(out, status, reason, &h)?;
    out.write_all(body)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-0", 10), Some((0, 1)));
        assert_eq!(parse_range("bytes=2-", 10), Some((2, 10)));
        assert_eq!(parse_range("bytes=-3", 10), Some((7, 10)));
        assert_eq!(parse_range("bytes=5-100", 10), Some((5, 10)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=3-2", 10), None);
        assert_eq!(parse_range("bytes=0-1,4-5", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
        assert_eq!(parse_range("bytes=x-1", 10), None);
    }
}
