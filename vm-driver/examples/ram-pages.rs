//! Counts the non-zero 4 KiB pages of an idle test guest's RAM image, with and without
//! virtio-balloon free page reporting, after the guest used and freed 96 MiB.
//!
//! `cargo run --release -p vm-driver --example ram-pages [GUEST_DIR]`

use std::path::PathBuf;
use std::time::Duration;

use vm_driver::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let guest = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| ".cache/guest".into());
    let qemu = Qemu::new()?;
    let tmp = std::env::temp_dir().join(format!("ram-pages-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    for reporting in [false, true] {
        let disk = tmp.join(format!("disk-{reporting}.raw"));
        std::fs::copy(guest.join("disk.raw"), &disk)?;
        let mut spec = LaunchSpec::new(256 << 20)
            .kernel(guest.join("vmlinuz"), guest.join("initrd.img"), "console=ttyS0 quiet panic=-1")
            .disk("disk0", &disk, DiskFormat::Raw);
        spec.free_page_reporting = reporting;
        let mut vm = qemu.launch(&spec)?;
        vm.console()?.wait_for_text("cloudlet-guest: ready", Duration::from_secs(120))?;
        vm.console()?.run(
            "dd if=/dev/urandom of=/tmp/x bs=1M count=96 2>/dev/null; rm /tmp/x; echo 3 > /proc/sys/vm/drop_caches",
            Duration::from_secs(120),
        )?;
        std::thread::sleep(Duration::from_secs(5)); // reporting runs after a 2 s delay
        let dir = tmp.join(format!("snap-{reporting}"));
        let snap = vm.snapshot(&dir)?;
        drop(vm);
        let ram = std::fs::read(snap.memory_path())?;
        let nonzero = ram.chunks(4096).filter(|c| c.iter().any(|&b| b != 0)).count();
        println!(
            "free page reporting {:>3}: {nonzero:>6} non-zero pages of {} ({:.1} MiB)",
            if reporting { "on" } else { "off" },
            ram.len() / 4096,
            nonzero as f64 * 4096.0 / (1 << 20) as f64
        );
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
