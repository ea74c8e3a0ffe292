//! How much of a synthesized VM's memory its app touches before it answers, and how much of
//! that the overlay carries: the bytes an early start has to fetch before the first answer.
//!
//! Synthesizes the overlay the ordinary way (its first answer is today's, with the whole
//! overlay applied), then resumes the rebuilt VM again with its RAM image served through FUSE
//! and its disks as raw files served the same way (`lazy-image`, 4 KiB requests, nothing
//! pending), probes the app, waits `--tail` seconds more, and counts the 4 KiB chunks the guest
//! touched in each, against those that differ from the base.
//!
//! `cargo run --release -p cloudlet-benches --bin working-set -- --registry DIR --overlay FILE --port GUEST_PORT [--path /] [--tail SECS] [--workdir DIR]`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazy_image::{ImageSpec, LazyFs, LazyOptions, CHUNK_SIZE};
use synthesis::{http_wait, HttpCheck, SynthesisOptions};
use vm_driver::{Disk, DiskFormat, Forward, Hypervisor, Qemu, RamMode, RestoreOptions, Snapshot, Vm};

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

/// The chunks in which `custom` differs from `base` (zeros past the base's end).
fn differing(base: &Path, custom: &Path) -> Result<Vec<bool>> {
    let (fa, fb) = (File::open(base)?, File::open(custom)?);
    let (base_len, len) = (fa.metadata()?.len(), fb.metadata()?.len());
    let mut out = Vec::with_capacity(len.div_ceil(CHUNK_SIZE) as usize);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0;
    while at < len {
        let n = ((len - at) as usize).min(ba.len());
        let have = (base_len.saturating_sub(at) as usize).min(n);
        fa.read_exact_at(&mut ba[..have], at)?;
        ba[have..n].fill(0);
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
        // The rebuilt images are read below: the VM must not change them.
        &SynthesisOptions { in_place: false, ..SynthesisOptions::new(&out) }.probe(check.clone()),
        &|_| {},
    )?;
    let first_answer = syn.timeline.first_answer.unwrap_or_default();
    let base_memory = syn.base.snapshot.memory_path();
    drop(syn.vm);
    let custom = Snapshot::load(&out)?;
    let changed = differing(&base_memory, &custom.memory_path())?;

    // The disks as raw files (what the served disks read from), and what differs in them.
    let mut images = vec![("memory".to_string(), custom.memory_path(), changed)];
    for (d, b) in custom.disks.iter().zip(&syn.base.snapshot.disks) {
        let raw = work.path().join(format!("{}.raw", d.name));
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(out.join(&d.path))
            .arg(&raw)
            .status()?;
        if !st.success() {
            bail!("qemu-img convert of disk {} failed", d.name);
        }
        let changed = differing(&syn.base.entry.dir.join(&b.path), &raw)?;
        images.push((d.name.clone(), raw, changed));
    }

    // Again, with RAM and disks served, every chunk the guest reads or writes recorded.
    let (mnt, store) = (work.path().join("mnt"), work.path().join("store"));
    std::fs::create_dir_all(&mnt)?;
    std::fs::create_dir_all(&store)?;
    let specs = images
        .iter()
        .map(|(name, path, _)| -> Result<ImageSpec> {
            Ok(ImageSpec {
                name: name.clone(),
                size: std::fs::metadata(path)?.len(),
                base: Some(path.clone()),
                pending: vec![],
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let fs = LazyFs::mount(&mnt, &store, specs, LazyOptions { max_readahead: 4096, ..LazyOptions::default() })?;
    let forwards = custom.guest_ports.iter().map(|&g| Forward { host_port: 0, guest_port: g }).collect();
    let disks = custom
        .disks
        .iter()
        .map(|d| Disk { name: d.name.clone(), path: fs.path(&d.name).unwrap(), format: DiskFormat::Raw })
        .collect();
    let t = Instant::now();
    let vm = qemu.restore(
        &custom,
        &RestoreOptions {
            ram: RamMode::Served(fs.path("memory").unwrap()),
            forwards: Some(forwards),
            disks: Some(disks),
            ..Default::default()
        },
    )?;
    let resumed = t.elapsed();
    let host_port = vm.host_port(a.port).with_context(|| format!("guest port {} is not forwarded", a.port))?;
    http_wait("127.0.0.1", host_port, &check)?;
    let answered = t.elapsed();
    let at_answer: Vec<Vec<u64>> = fs.images().iter().map(|i| i.touched()).collect();
    std::thread::sleep(a.tail);
    let after_tail: Vec<Vec<u64>> = fs.images().iter().map(|i| i.touched()).collect();
    drop(vm);
    drop(fs);

    let all_changed: usize = images.iter().map(|(_, _, c)| c.iter().filter(|x| **x).count()).sum();
    let ratio = overlay_bytes as f64 / (all_changed.max(1) as u64 * CHUNK_SIZE) as f64;
    println!(
        "overlay: {} ({:.1} MiB), {:.2} overlay bytes per changed byte",
        a.overlay.display(),
        overlay_bytes as f64 / (1 << 20) as f64,
        ratio
    );
    println!("today's synthesis: first answer {:.2} s after the resume", first_answer.as_secs_f64());
    println!(
        "served resume: restored in {:.2} s, answered after {:.2} s",
        resumed.as_secs_f64(),
        answered.as_secs_f64()
    );
    let tail = format!("and {:?} more", a.tail);
    let whens = ["until the first answer", tail.as_str()];
    let mut needed = [0usize; 2];
    for (k, (name, _, changed)) in images.iter().enumerate() {
        let n_changed = changed.iter().filter(|c| **c).count();
        println!(
            "{name}: {} chunks ({:.0} MiB), {n_changed} differ from the base ({:.1} MiB)",
            changed.len(),
            mib(changed.len()),
            mib(n_changed)
        );
        for (w, touched) in [&at_answer[k], &after_tail[k]].into_iter().enumerate() {
            let c = touched.iter().filter(|c| changed[**c as usize]).count();
            needed[w] += c;
            println!(
                "  touched {}: {} chunks ({:.1} MiB, {:.1}%); of them changed: {c} ({:.1} MiB, {:.1}% of the changed ones)",
                whens[w],
                touched.len(),
                mib(touched.len()),
                100.0 * touched.len() as f64 / changed.len() as f64,
                mib(c),
                100.0 * c as f64 / n_changed.max(1) as f64,
            );
        }
    }
    for (w, when) in whens.iter().enumerate() {
        println!(
            "changed chunks touched {when}: {} ({:.1} MiB, {:.1}% of all changed); ~{:.2} MiB of overlay, {:.2} s at 38 Mbit/s",
            needed[w],
            mib(needed[w]),
            100.0 * needed[w] as f64 / all_changed.max(1) as f64,
            mib(needed[w]) * ratio,
            mib(needed[w]) * ratio * 8.0 * 1.048576 / 38.0
        );
    }
    Ok(())
}
