//! A TCP relay that delays every byte by a fixed time in each direction: a link's delay for
//! kernels without the netem qdisc (`benches/link.sh` puts it on the receiving side of the
//! shaped link). A request and its answer then wait twice the delay more, as over a link with
//! that much more round-trip time. It is an approximation: the relay ends TCP on both sides,
//! so the sender's congestion window grows at the link's own (sub-millisecond) round trip,
//! not at the emulated one; what it emulates is the wait of each request.
//!
//!     delay-relay --listen 127.0.0.1:8001 --to 10.77.0.2:8000 --delay-ms 10
//!
//! Prints `listening on ADDR` once it listens, then runs until killed; each accepted
//! connection gets its own connection to `--to`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// A TCP relay that delays each direction.
#[derive(clap::Parser)]
struct Args {
    /// Address to listen on (port 0: any; the address is printed).
    #[arg(long)]
    listen: SocketAddr,
    /// Address each accepted connection is relayed to.
    #[arg(long)]
    to: SocketAddr,
    /// Delay of each direction, in milliseconds.
    #[arg(long = "delay-ms", value_parser = clap::value_parser!(u64).range(0..=10_000))]
    delay_ms: u64,
}

/// Copies `from` to `to`, each read delivered `delay` after it arrived; `from`'s end shuts
/// `to` for writing, a failed write shuts `from` for reading.
fn pump(from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let mut reader = match from.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let read = thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    for (due, bytes) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if to.write_all(&bytes).is_err() {
            let _ = from.shutdown(Shutdown::Read);
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = read.join();
}

fn main() -> Result<()> {
    let args = <Args as clap::Parser>::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let listener = TcpListener::bind(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    // The address, for a caller that asked for port 0.
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let to = args.to;
        thread::spawn(move || {
            let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(10)) else {
                eprintln!("delay-relay: cannot connect to {to}");
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
            let up = thread::spawn(move || pump(client, server, delay));
            pump(s2, c2, delay);
            let _ = up.join();
        });
    }
    Ok(())
}
