//! `interrupt_cleanup` in the middle of a synthesis, over the in-memory hypervisor. A test
//! binary of its own: the interruption is for the whole process.

mod fake;

use base_registry::Registry;
use delta_engine::CreateOptions;
use fake::{guest_files, tree, FakeHypervisor};
use overlay_format::{PortForward, Protocol};
use synthesis::{
    create_base, create_overlay_file, interrupt_cleanup, interrupted, remove_on_interrupt, synthesize_with,
    BaseRequest, Event, FlowError, OverlayRequest, SynthesisOptions,
};
use vm_driver::DriverError;

#[test]
fn an_interrupted_synthesis_leaves_no_vm_directory_and_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let hv = FakeHypervisor::new();
    let registry = Registry::open(&tmp.path().join("registry")).unwrap();
    let (kernel, initrd, disk) = guest_files(&tmp.path().join("guest"));
    let req = BaseRequest {
        name: "fakebase".into(),
        kernel,
        initrd,
        cmdline: "console=ttyS0".into(),
        disk,
        ram_bytes: 1 << 20,
        ready_text: "fake guest: ready".into(),
        prepare: Vec::new(),
        interactive: false,
        vnc: false,
        wait_http: None,
        work_dir: tmp.path().join("work"),
    };
    let (base, _) = create_base(&hv, &registry, &req, &|_| {}).unwrap();
    let out = tmp.path().join("app.overlay");
    let oreq = OverlayRequest {
        name: "app".into(),
        customize: vec!["install the app".into()],
        interactive: false,
        vnc: false,
        wait_http: None,
        forwards: vec![PortForward { protocol: Protocol::Tcp, host_port: 0, guest_port: 8080 }],
        out: out.clone(),
        options: CreateOptions::default(),
    };
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
