//! Once an early start's overlay is complete, does the VM run as fast as one synthesized the
//! old way? Times a short loop in the guest (through its serial console shell, so for guests
//! with one: the test guest) in both: the early-start VM keeps running from its FUSE mount
//! (memory chunks cross FUSE at their first touch, disk I/O always), the other from its
//! rebuilt RAM file and qcow2 disks. The two are run in turn, `--runs` times each, and the
//! fastest of each step is printed.
//!
//!     complete-loop --registry DIR --overlay PLAIN --segmented SEGMENTED --port GUEST_PORT [--runs 3]
//!
//! The loop, each step timed from the host: a shell arithmetic loop (CPU), writing 48 MiB to
//! guest memory (tmpfs: fresh guest pages), writing 24 MiB to the guest's disk with `fsync`,
//! and reading it back after dropping the guest's caches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use synthesis::early::{synthesize_early, EarlyOptions, FileSource};
use synthesis::{HttpCheck, SynthesisOptions};
use vm_driver::{Qemu, SerialConsole, Vm};

/// The steps: (name, command).
const STEPS: [(&str, &str); 4] = [
    ("cpu: 40000 shell additions", "i=0; while [ $i -lt 40000 ]; do i=$((i+1)); done"),
    ("memory: 48 MiB into tmpfs", "dd if=/dev/zero of=/tmp/loop bs=1M count=48 2>/dev/null; rm -f /tmp/loop"),
    ("disk write: 24 MiB + fsync", "dd if=/dev/urandom of=/mnt/disk/loop bs=1M count=24 conv=fsync 2>/dev/null"),
    (
        "disk read: 24 MiB, caches dropped",
        "sync; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/disk/loop > /dev/null; rm -f /mnt/disk/loop; sync",
    ),
];

/// Times a loop in a completed early-start VM and in one synthesized the old way.
#[derive(clap::Parser)]
struct Args {
    /// The registry that holds the overlays' base.
    #[arg(long)]
    registry: PathBuf,
    /// The overlay, for the synthesis the old way.
    #[arg(long)]
    overlay: PathBuf,
    /// The same overlay segmented (`cloudlet segment`), for the early start.
    #[arg(long)]
    segmented: PathBuf,
    /// The app's guest port, probed before the loop.
    #[arg(long)]
    port: u16,
    /// Runs of each, in turn.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
}

/// Runs every step once in `vm`'s shell; the wall time of each.
fn steps<V: Vm>(vm: &mut V) -> Result<Vec<Duration>> {
    let console = vm.console()?;
    // The shell answers before the clock starts.
    console.run("true", Duration::from_secs(30))?;
    let mut out = Vec::new();
    for (name, cmd) in STEPS {
        let t = Instant::now();
        let (text, status) = console.run(cmd, Duration::from_secs(300))?;
        if status != 0 {
            bail!("{name}: exit status {status}: {text}");
        }
        out.push(t.elapsed());
    }
    Ok(out)
}

fn main() -> Result<()> {
    let a = <Args as clap::Parser>::parse();
    let registry = base_registry::Registry::open_existing(&a.registry).context("open the registry")?;
    let qemu = Qemu::new()?;
    let work = tempfile::tempdir_in(std::env::temp_dir())?;
    let check = HttpCheck { port: a.port, path: "/".into(), expect_status: None, timeout: Duration::from_secs(120) };
    let (mut early_best, mut old_best) = (vec![Duration::MAX; STEPS.len()], vec![Duration::MAX; STEPS.len()]);
    for run in 0..a.runs {
        // Early start, complete.
        let mut opts = EarlyOptions::new(&work.path().join(format!("early-{run}")));
        opts.probe = Some(check.clone());
        let source = Arc::new(FileSource::open(&a.segmented)?);
        let mut early = synthesize_early(&qemu, &registry, source, &opts, &|_| {})?;
        let stats = early.wait_complete(Duration::from_secs(300))?;
        if !stats.complete {
            bail!("the early start did not complete: {stats:?}");
        }
        let t = steps(early.vm())?;
        drop(early);
        early_best.iter_mut().zip(&t).for_each(|(b, t)| *b = (*b).min(*t));

        // The old way.
        let dir = work.path().join(format!("old-{run}"));
        let mut syn = synthesis::synthesize_with(
            &qemu,
            &registry,
            std::fs::File::open(&a.overlay).context("open the overlay")?,
            &SynthesisOptions::new(&dir).probe(check.clone()),
            &|_| {},
        )?;
        let t = steps(&mut syn.vm)?;
        drop(syn);
        old_best.iter_mut().zip(&t).for_each(|(b, t)| *b = (*b).min(*t));
    }
    println!("| step (fastest of {}) | synthesized the old way | early start, once complete | ratio |", a.runs);
    println!("| --- | ---: | ---: | ---: |");
    for (i, (name, _)) in STEPS.iter().enumerate() {
        let (o, e) = (old_best[i].as_secs_f64(), early_best[i].as_secs_f64());
        println!("| {name} | {o:.3} s | {e:.3} s | {:.2}x |", e / o);
    }
    Ok(())
}
