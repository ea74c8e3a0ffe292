//! `interrupt_cleanup` in the middle of a synthesis, over the in-memory hypervisor. A test
//! binary of its own: the interruption is for the whole process.

mod fake;

use base_registry::Registry;
use fake::{tree, FakeHypervisor};
use synthesis::{
    create_base, create_overlay_file, interrupt_cleanup, interrupted, remove_on_interrupt, synthesize_with, Event,
    FlowError, SynthesisOptions,
};
use vm_driver::DriverError;

#[test]
fn an_interrupted_synthesis_leaves_no_vm_directory_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let hv = FakeHypervisor::new();
    let registry = Registry::open(&tmp.path().join("registry")).unwrap();
    let req = fake::base_request(tmp.path());
    let (base, _) = create_base(&hv, &registry, &req, &|_| {}).unwrap();
    let out = tmp.path().join("app.overlay");
    let oreq = fake::overlay_request(&out);
    create_overlay_file(&hv, &base, &oreq, &|_| {}).unwrap();

    // A directory a caller asked to have removed on interruption.
    let kept = tmp.path().join("kept-vm");
    std::fs::create_dir(&kept).unwrap();
    remove_on_interrupt(&kept);

    let vm_dir = tmp.path().join("vms/app");
    let on = |e: Event| {
        if matches!(&e, Event::Step(s) if s == "resuming the custom VM") {
            assert!(vm_dir.join("memory").exists(), "the rebuild is under way");
            interrupt_cleanup();
        }
    };
    assert!(!interrupted());
    let e = synthesize_with(&hv, &registry, std::fs::File::open(&out).unwrap(), &SynthesisOptions::new(&vm_dir), &on)
        .err()
        .expect("the VM is gone");
    assert!(interrupted());
    assert!(matches!(e, FlowError::Driver(DriverError::QemuDied { .. })), "{e:?}");
    assert!(!vm_dir.exists(), "the half-made VM directory is left behind");
    assert!(!kept.exists(), "a directory given to remove_on_interrupt is left behind");
    assert_eq!(tree(&tmp.path().join("vms")), Vec::<String>::new());
    assert!(out.exists(), "a finished overlay is not touched");
    assert_eq!(hv.live.load(std::sync::atomic::Ordering::SeqCst), 0);
}
