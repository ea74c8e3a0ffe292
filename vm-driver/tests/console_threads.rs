//! The serial console's reader thread and connection: one per connected console, gone when the
//! console is released, when QEMU exits and when the VM is dropped. A binary of its own, so
//! that no other test's VMs are counted.

mod common;

use std::time::{Duration, Instant};

use common::guest;
use vm_driver::*;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_thread_or_descriptor_outlives_its_console() {
    let g = guest();
    let spec = LaunchSpec::new(128 << 20).kernel(g.join("vmlinuz"), g.join("initrd.img"), "console=ttyS0 quiet");
    let qemu = Qemu::new().unwrap();
    // Warm-up: whatever a first launch opens for good (the accelerator probe's cache, ...).
    drop(qemu.launch(&spec).unwrap());
    let (threads, fds) = (count("/proc/self/task"), count("/proc/self/fd"));
    // The threads this process has beyond those it had with no VM.
    let console_threads = || count("/proc/self/task") - threads;

    for _ in 0..15 {
        let mut vm = qemu.launch(&spec).unwrap();
        assert_eq!(console_threads(), 1, "a launched VM's console is drained from the start");
        vm.release_console();
        assert_eq!(console_threads(), 0, "release_console stops the reader");
        vm.console().unwrap();
        assert_eq!(console_threads(), 1, "console() reconnects and drains again");
        drop(vm);
        assert_eq!(console_threads(), 0, "dropping the VM stops the reader");
    }
    // QEMU exiting on its own ends the reader too (EOF on the socket).
    let vm = qemu.launch(&spec).unwrap();
    let pid = vm.pid().unwrap();
    // SAFETY: kill(2) on the QEMU child this test just started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    wait_until("the console reader to end after QEMU was killed", Duration::from_secs(10), || console_threads() == 0);
    drop(vm);

    assert_eq!(count("/proc/self/task"), threads, "threads after 16 VMs");
    assert_eq!(count("/proc/self/fd"), fds, "file descriptors after 16 VMs");
}
