//! `delay-relay` carries every byte both ways, each direction late by its delay.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_relay_carries_every_byte_both_ways_after_its_delay() {
    // An echo server.
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                std::io::copy(&mut r, &mut s).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
            });
        }
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_delay-relay"))
        .args(["--listen", "127.0.0.1:0", "--to", &echo_addr.to_string(), "--delay-ms", "40"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let _relay = Relay(child);
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("relay said {line:?}")).to_string();

    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // A small request answered: one round trip, twice the delay.
    let t = Instant::now();
    s.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).unwrap();
    let rtt = t.elapsed();
    assert_eq!(&pong, b"ping");
    assert!(rtt >= Duration::from_millis(80), "a round trip through a 40 ms relay took {rtt:?}");
    assert!(rtt < Duration::from_secs(5), "{rtt:?}");

    // 4 MiB of varied bytes come back whole and in order, and the end of the stream passes.
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the bytes came back changed");
}
