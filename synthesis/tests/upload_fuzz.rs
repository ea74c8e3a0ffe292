//! Random and mutated uploads against an in-process server: every one is answered (4xx for
//! what the client sent, 5xx for the server's own failures), the server stays up, and no file
//! of a refused upload stays in its work directory. No guest boots: the made-up base cannot
//! resume, and nearly every mutation is refused while the overlay is read.
#![cfg(feature = "server")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{fake_base, overlay_with_spec, spec};
use synthesis::server::{Server, ServerConfig};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// POSTs `body`; returns the status (0 when the server gave no answer).
fn post(addr: SocketAddr, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST /v1/synthesis HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

#[test]
fn random_and_mutated_uploads_never_kill_the_server() {
    let work = tempfile::tempdir().unwrap();
    let (_, base) = fake_base(work.path());
    let valid = overlay_with_spec(work.path(), &base, &spec());
    let vms = work.path().join("vms");
    let mut cfg = ServerConfig::new(work.path().join("registry"), vms.clone());
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.max_overlay_bytes = 4 << 20;
    cfg.max_syntheses = 4;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let s = Server::bind(cfg).await.unwrap();
            addr_tx.send(s.local_addr()).unwrap();
            s.run(async move {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(30)).expect("the server did not start within 30 s");

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seen = std::collections::BTreeMap::<u16, usize>::new();
    for i in 0..300 {
        let body: Vec<u8> = match i % 5 {
            // Noise.
            0 => (0..rng.below(100_000)).map(|_| rng.next() as u8).collect(),
            // The overlay with a few bytes flipped.
            1 => {
                let mut b = valid.clone();
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(b.len());
                    b[at] ^= 1 << rng.below(8);
                }
                b
            }
            // Cut short.
            2 => valid[..rng.below(valid.len())].to_vec(),
            // A real beginning, then noise.
            3 => {
                let keep = rng.below(valid.len());
                let mut b = valid[..keep].to_vec();
                b.extend((0..rng.below(50_000)).map(|_| rng.next() as u8));
                b
            }
            // A run of bytes of the overlay moved elsewhere.
            _ => {
                let mut b = valid.clone();
                let (from, to) = (rng.below(b.len()), rng.below(b.len()));
                let n = rng.below(256).min(b.len() - from.max(to));
                b.copy_within(from..from + n, to);
                b
            }
        };
        let (status, answer) = post(addr, &body);
        assert!(
            (400..600).contains(&status) || status == 201,
            "request {i} ({} bytes) got no HTTP answer: {answer:?}",
            body.len()
        );
        if status >= 500 {
            eprintln!("request {i}: {answer}");
        }
        *seen.entry(status).or_default() += 1;
    }
    eprintln!("statuses: {seen:?}");
    assert!(seen.get(&400).copied().unwrap_or(0) > 200, "{seen:?}");
    // Still alive, and nothing of the refused uploads is left.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let t0 = std::time::Instant::now();
    loop {
        let left: Vec<_> = std::fs::read_dir(&vms)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "server.pid")
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "after 30 s the work directory still holds {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_tx.send(()).unwrap();
    server.join().unwrap();
}
