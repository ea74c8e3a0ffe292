//! Arbitrary bytes as a guest agent's answers: a fake agent answers each request of a
//! `vm_driver::GuestAgent` with the next piece of the input (pieces split at NUL bytes, the
//! text `SYNCID` replaced by the id of the pending `guest-sync-delimited`, so that the fuzzer
//! can get past the resynchronisation), then hangs up. `ping` and `exec` end in an answer or
//! an error, never a panic, and stay within their bounds.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vm_driver::qga::{GuestAgent, MAX_OUTPUT};

/// `hay` with every `from` replaced by `to`, byte for byte (the pieces need not be UTF-8).
fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn answer(mut peer: UnixStream, pieces: Vec<Vec<u8>>) {
    let mut pieces = pieces.into_iter();
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match peer.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).filter(|&b| b != 0xFF).collect();
            let id = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.split("\"id\":").nth(1))
                .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect::<String>())
                .unwrap_or_default();
            let Some(piece) = pieces.next() else { return };
            let out = replace(&piece, b"SYNCID", id.as_bytes());
            if peer.write_all(&out).is_err() {
                return;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let pieces: Vec<Vec<u8>> = data.split(|&b| b == 0).take(32).map(<[u8]>::to_vec).collect();
    let (client, peer) = UnixStream::pair().unwrap();
    let agent = std::thread::spawn(move || answer(peer, pieces));
    let mut a = GuestAgent::from_stream(client);
    let t = Duration::from_millis(50);
    let _ = a.ping(t);
    if let Ok(out) = a.exec(&["/bin/true"], t) {
        assert!(out.stdout.len() <= MAX_OUTPUT && out.stderr.len() <= MAX_OUTPUT);
    }
    drop(a);
    agent.join().unwrap();
});
