//! QEMU's own live migration of a synthesized VM, for comparison with `cloudlet handoff`:
//! the VM is synthesized from `--overlay` (its base registered in `--registry`), a second QEMU
//! waits for it on `--listen`, and the first migrates to `--connect` (the same address, or a
//! relay across an emulated link: `benches/link.sh --handoff`). Its RAM and device state go
//! over the migration stream (pre-copy, zero pages as flags only); its disks are shared
//! storage (the destination opens the same qcow2 layers), which QEMU needs no transfer for and
//! the handoff does send. Prints one JSON line: QEMU's total time and its own downtime, the
//! downtime from the source's stop to the destination's run (both polled every 5 ms), the bytes
//! sent, and the time from `migrate` to the app's first answer on the destination.
//!
//!     qemu-migrate --registry DIR --overlay FILE --probe 8080 --listen 10.77.0.1:4445 \
//!                  --connect 10.77.0.2:4444 [--multifd 4 --zstd]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use synthesis::{HttpCheck, SynthesisOptions};
use vm_driver::{Forward, Hypervisor, Qemu, QemuVm, RamMode, RestoreOptions, Snapshot, Vm};

/// QEMU's live migration of a synthesized VM.
#[derive(clap::Parser)]
struct Args {
    /// The base registry.
    #[arg(long)]
    registry: PathBuf,
    /// The overlay to synthesize the VM from.
    #[arg(long)]
    overlay: PathBuf,
    /// Guest port of the app, probed after synthesis and on the destination.
    #[arg(long)]
    probe: u16,
    /// Where the destination QEMU listens for the migration.
    #[arg(long)]
    listen: SocketAddr,
    /// Where the source QEMU connects (default: --listen).
    #[arg(long)]
    connect: Option<SocketAddr>,
    /// Multifd channels (0: one migration stream, no multifd).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=16))]
    multifd: u8,
    /// With --multifd: compress pages with zstd.
    #[arg(long, requires = "multifd")]
    zstd: bool,
}

/// The same capabilities and parameters on both ends, as QEMU requires.
fn configure(vm: &mut QemuVm, a: &Args) -> Result<()> {
    // The source loaded its own state with x-ignore-shared: off here, so that RAM is sent.
    let mut caps =
        vec![json!({"capability": "events", "state": true}), json!({"capability": "x-ignore-shared", "state": false})];
    if a.multifd > 0 {
        caps.push(json!({"capability": "multifd", "state": true}));
    }
    vm.qmp("migrate-set-capabilities", Some(json!({ "capabilities": caps })))?;
    if a.multifd > 0 {
        let compression = if a.zstd { "zstd" } else { "none" };
        vm.qmp(
            "migrate-set-parameters",
            Some(json!({"multifd-channels": a.multifd, "multifd-compression": compression})),
        )?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let a: Args = clap::Parser::parse();
    let qemu = Qemu::new()?;
    let registry = base_registry::Registry::open_existing(&a.registry)?;
    let work = tempfile::tempdir()?;
    let dir = work.path().join("vm");
    let f = std::fs::File::open(&a.overlay).with_context(|| format!("opening {}", a.overlay.display()))?;
    let check = HttpCheck::new(a.probe, Duration::from_secs(120));
    let opts = SynthesisOptions::new(&dir).probe(check.clone());
    let mut source = synthesis::synthesize_with(&qemu, &registry, std::io::BufReader::new(f), &opts, &|_| {})
        .context("synthesizing the VM to migrate")?;

    // The destination: the same machine and the same disk layers, waiting for the migration.
    let snap = Snapshot::load(&source.dir)?;
    let disks = snap.disks.iter().map(|d| vm_driver::Disk { path: snap.dir.join(&d.path), ..d.clone() }).collect();
    let forwards = snap.guest_ports.iter().map(|&g| Forward { host_port: 0, guest_port: g }).collect();
    let mut dest = qemu.restore(
        &snap,
        &RestoreOptions {
            ram: RamMode::PrivateCopy,
            disks: Some(disks),
            forwards: Some(forwards),
            await_migration: true,
            ..Default::default()
        },
    )?;
    configure(&mut dest, &a)?;
    dest.qmp("migrate-incoming", Some(json!({"uri": format!("tcp:{}", a.listen)})))?;

    configure(&mut source.vm, &a)?;
    let t0 = Instant::now();
    let to = a.connect.unwrap_or(a.listen);
    source.vm.qmp("migrate", Some(json!({"uri": format!("tcp:{to}")})))?;
    // QEMU's own `downtime` ends when the source has written its last bytes, which a relay
    // or a socket buffer takes at once: the downtime here runs from the source's stop to the
    // destination's run, both polled.
    let (mut stopped, mut running) = (None, None);
    let mut info = None;
    while running.is_none() || info.is_none() {
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("the migration did not complete in 1800 s: {:?}", source.vm.qmp("query-migrate", None)?);
        }
        if info.is_none() {
            let q = source.vm.qmp("query-migrate", None)?;
            match q.get("status").and_then(|s| s.as_str()) {
                Some("completed") => info = Some(q),
                Some("failed" | "cancelled") => {
                    bail!("the migration failed: {q}\ndestination QEMU said: {}", dest.stderr(4096))
                }
                _ => {}
            }
        }
        if stopped.is_none() && source.vm.status()? != "running" {
            stopped = Some(t0.elapsed());
        }
        if running.is_none() {
            match dest.status()?.as_str() {
                "running" => running = Some(t0.elapsed()),
                // Loaded, and waiting for a `cont` (QEMU does not always start by itself).
                "paused" if info.is_some() => dest.resume()?,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = info.expect("loop ends with it");
    let (stopped, running) = (stopped.unwrap_or_default(), running.expect("loop ends with it"));
    let port = dest.host_port(a.probe).context("the probed port is not forwarded")?;
    synthesis::http_wait("127.0.0.1", port, &check)?;
    let answered = t0.elapsed();
    let ram = &info["ram"];
    println!(
        "{}",
        json!({
            "multifd": a.multifd,
            "zstd": a.zstd,
            "total_ms": info["total-time"],
            "qemu_downtime_ms": info["downtime"],
            "downtime_ms": running.saturating_sub(stopped).as_millis() as u64,
            "bytes": ram["transferred"],
            "running_ms": running.as_millis() as u64,
            "first_answer_ms": answered.as_millis() as u64,
        })
    );
    drop(dest);
    drop(source);
    Ok(())
}
