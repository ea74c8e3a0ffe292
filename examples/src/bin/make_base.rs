//! Makes a base VM and registers it: boots a kernel, initrd and raw disk, waits until the guest
//! prints its ready text on the serial console, snapshots memory, disk and device state, indexes
//! the snapshot and stores it in a registry directory.
//!
//! ```text
//! make_base REGISTRY NAME KERNEL INITRD DISK [READY_TEXT]
//! make_base /tmp/reg deb .cache/guest/vmlinuz .cache/guest/initrd.img .cache/guest/disk.raw
//! ```
//!
//! Prints `base ID NAME` and the registry on success.
use base_registry::Registry;
use synthesis::{create_base, BaseRequest, Event, ReadyCheck};
use vm_driver::Qemu;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [registry, name, kernel, initrd, disk, rest @ ..] = args.as_slice() else {
        return Err("usage: make_base REGISTRY NAME KERNEL INITRD DISK [READY_TEXT]".into());
    };
    let ready_text = rest.first().cloned().unwrap_or_else(|| "cloudlet-guest: ready".into());

    // The registry is created if it does not exist; several programs may share it.
    let registry = Registry::open(registry.as_ref())?;
    // Finds QEMU and decides between KVM and TCG.
    let qemu = Qemu::new()?;

    // The disk is copied into the base; the original is never modified. The scratch directory
    // for the snapshot must not exist, and is removed afterwards.
    let work_dir = format!("{}.work-{}", registry.root().display(), std::process::id());
    let mut request =
        BaseRequest::new(name, disk, work_dir).kernel(kernel, Some(initrd.into()), "console=ttyS0 quiet panic=-1");
    request.ram_bytes = 256 << 20;
    // The guest is ready when it prints this on its serial console.
    request.ready = ReadyCheck::SerialText(ready_text);
    // Shell commands to run in the guest before the snapshot would go in `request.prepare`.

    // The flow reports its steps; a real program might log them.
    let (base, timings) = create_base(&qemu, &registry, &request, &|e| {
        if let Event::Step(step) = e {
            eprintln!("  - {step}");
        }
    })?;

    println!("base {} {}", base.entry.manifest.id, base.entry.manifest.name);
    println!("registry {}", registry.root().display());
    eprintln!("booted in {:?}, snapshot {:?}, index {:?}", timings.boot, timings.snapshot, timings.index);
    Ok(())
}
