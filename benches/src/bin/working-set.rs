//! How much of a synthesized VM's memory its app touches before it answers, and how much of
//! that the overlay carries: the bytes an early start has to fetch before the first answer.
//!
//! Synthesizes the overlay the ordinary way (its first answer is today's, with the whole
//! overlay applied), then resumes the rebuilt VM again with its RAM image served through FUSE
//! (`lazy-image`, 4 KiB requests, nothing pending), probes the app, waits `--tail` seconds more,
//! and counts the 4 KiB chunks the guest touched, against those that differ from the base.
//!
//! `cargo run --release -p cloudlet-benches --bin working-set -- --registry DIR --overlay FILE --port GUEST_PORT [--path /] [--tail SECS] [--workdir DIR]`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazy_image::{ImageSpec, LazyFs, LazyOptions, CHUNK_SIZE};
use synthesis::{http_wait, HttpCheck, SynthesisOptions};
use vm_driver::{Forward, Hypervisor, Qemu, RamMode, RestoreOptions, Snapshot, Vm};

const USAGE: &str =
    "usage: working-set --registry DIR --overlay FILE --port GUEST_PORT [--path /] [--tail SECS] [--workdir DIR]";

struct Args {
    registry: PathBuf,
    overlay: PathBuf,
    port: u16,
    path: String,
    tail: Duration,
    workdir: PathBuf,
}

fn parse_args() -> Result<Args> {
    let (mut registry, mut overlay, mut port) = (None, None, None);
    let (mut path, mut tail, mut workdir) =
        ("/".to_string(), Duration::from_secs(2), PathBuf::from("target/working-set"));
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut value = || it.next().with_context(|| format!("{x} needs a value\n{USAGE}"));
        match x.as_str() {
            "--registry" => registry = Some(PathBuf::from(value()?)),
            "--overlay" => overlay = Some(PathBuf::from(value()?)),
            "--port" => port = Some(value()?.parse().context("--port")?),
            "--path" => path = value()?,
            "--tail" => tail = Duration::from_secs_f64(value()?.parse().context("--tail")?),
            "--workdir" => workdir = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {x}\n{USAGE}"),
        }
    }
    match (registry, overlay, port) {
        (Some(registry), Some(overlay), Some(port)) => Ok(Args { registry, overlay, port, path, tail, workdir }),
        _ => bail!("--registry, --overlay and --port are needed\n{USAGE}"),
    }
}

/// The chunks in which `a` and `b` (the same size) differ.
fn differing(a: &Path, b: &Path) -> Result<Vec<bool>> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let len = fa.metadata()?.len();
    let mut out = Vec::with_capacity(len.div_ceil(CHUNK_SIZE) as usize);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0;
    while at < len {
        let n = ((len - at) as usize).min(ba.len());
        fa.read_exact_at(&mut ba[..n], at)?;
        fb.read_exact_at(&mut bb[..n], at)?;
        for (x, y) in ba[..n].chunks(CHUNK_SIZE as usize).zip(bb[..n].chunks(CHUNK_SIZE as usize)) {
            out.push(x != y);
        }
        at += n as u64;
    }
    Ok(out)
}

fn mib(chunks: usize) -> f64 {
    (chunks as u64 * CHUNK_SIZE) as f64 / (1 << 20) as f64
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let registry = base_registry::Registry::open_existing(&a.registry).context("open the registry")?;
    let qemu = Qemu::new()?;
    std::fs::create_dir_all(&a.workdir)?;
    let work = tempfile::tempdir_in(&a.workdir)?;
    let out = work.path().join("vm");
    let check =
        HttpCheck { port: a.port, path: a.path.clone(), expect_status: None, timeout: Duration::from_secs(120) };
    let overlay_bytes = std::fs::metadata(&a.overlay)?.len();

    // Today's synthesis: the whole overlay applied, then the resume.
    let syn = synthesis::synthesize_with(
        &qemu,
        &registry,
        File::open(&a.overlay).context("open the overlay")?,
        &SynthesisOptions::new(&out).probe(check.clone()),
        &|_| {},
    )?;
    let first_answer = syn.timeline.first_answer.unwrap_or_default();
    let base_memory = syn.base.snapshot.memory_path();
    drop(syn.vm);
    let custom = Snapshot::load(&out)?;
    let changed = differing(&base_memory, &custom.memory_path())?;
    let n_changed = changed.iter().filter(|c| **c).count();

    // Again, with the RAM image served, every page the guest reads or writes recorded.
    let (mnt, store) = (work.path().join("mnt"), work.path().join("store"));
    std::fs::create_dir_all(&mnt)?;
    std::fs::create_dir_all(&store)?;
    let spec =
        ImageSpec { name: "memory".into(), size: custom.ram_bytes, base: Some(custom.memory_path()), pending: vec![] };
    let fs = LazyFs::mount(&mnt, &store, vec![spec], LazyOptions { max_readahead: 4096, ..LazyOptions::default() })?;
    let image = fs.image("memory").unwrap().clone();
    let forwards = custom.guest_ports.iter().map(|&g| Forward { host_port: 0, guest_port: g }).collect();
    let t = Instant::now();
    let vm = qemu.restore(
        &custom,
        &RestoreOptions {
            ram: RamMode::Served(fs.path("memory").unwrap()),
            forwards: Some(forwards),
            ..Default::default()
        },
    )?;
    let resumed = t.elapsed();
    let host_port = vm.host_port(a.port).with_context(|| format!("guest port {} is not forwarded", a.port))?;
    http_wait("127.0.0.1", host_port, &check)?;
    let answered = t.elapsed();
    let at_answer = image.touched();
    std::thread::sleep(a.tail);
    let after_tail = image.touched();
    drop(vm);
    drop(fs);

    let carried = |touched: &[u64]| touched.iter().filter(|c| changed[**c as usize]).count();
    let total = changed.len();
    let ratio = overlay_bytes as f64 / (n_changed.max(1) as u64 * CHUNK_SIZE) as f64;
    println!(
        "overlay: {} ({:.1} MiB), {:.2} overlay bytes per changed memory byte (disk included)",
        a.overlay.display(),
        overlay_bytes as f64 / (1 << 20) as f64,
        ratio
    );
    println!(
        "memory: {total} chunks ({:.0} MiB), {n_changed} differ from the base ({:.1} MiB)",
        mib(total),
        mib(n_changed)
    );
    println!("today's synthesis: first answer {:.2} s after the resume", first_answer.as_secs_f64());
    println!(
        "served resume: restored in {:.2} s, answered after {:.2} s",
        resumed.as_secs_f64(),
        answered.as_secs_f64()
    );
    for (when, touched) in [("until the first answer", &at_answer), (&*format!("and {:?} more", a.tail), &after_tail)] {
        let c = carried(touched);
        println!(
            "touched {when}: {} chunks ({:.1} MiB, {:.1}% of memory); of them in the overlay: {c} ({:.1} MiB, {:.1}% of the changed ones; ~{:.2} MiB of overlay, {:.2} s at 38 Mbps)",
            touched.len(),
            mib(touched.len()),
            100.0 * touched.len() as f64 / total as f64,
            mib(c),
            100.0 * c as f64 / n_changed.max(1) as f64,
            mib(c) * ratio,
            mib(c) * ratio * 8.0 * 1.048576 / 38.0,
        );
    }
    Ok(())
}
