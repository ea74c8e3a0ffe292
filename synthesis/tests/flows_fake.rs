//! The flows over an in-memory hypervisor: what they leave behind when a step fails, the
//! order of their events, and the errors they report. No QEMU; each test takes milliseconds.

mod fake;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base_registry::Registry;
use fake::{recorder, tree, Setup};
use synthesis::{
    create_base, create_overlay_file, synthesize_with, BaseRequest, FlowError, OverlayRequest, RegisteredBase,
    SynthesisOptions,
};
use vm_driver::{DriverError, Vm};

impl Setup {
    fn base_request(&self) -> BaseRequest {
        fake::base_request(self.tmp.path())
    }

    fn base(&self) -> RegisteredBase {
        create_base(&self.hv, &self.registry, &self.base_request(), &|_| {}).unwrap().0
    }

    fn overlay_request(&self, out: &Path) -> OverlayRequest {
        fake::overlay_request(out)
    }

    /// A base and an overlay of it at `out/app.overlay`.
    fn overlay(&self) -> PathBuf {
        let base = self.base();
        let out = self.path("out/app.overlay");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        create_overlay_file(&self.hv, &base, &self.overlay_request(&out), &|_| {}).unwrap();
        out
    }
}

fn live(s: &Setup) -> usize {
    s.hv.live.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn base_overlay_and_synthesis_run_in_order_and_leave_only_their_outputs() {
    let s = Setup::new();
    let (events, on) = recorder();
    let (base, _) = create_base(&s.hv, &s.registry, &s.base_request(), &on).unwrap();
    let steps = events.steps();
    assert_eq!(
        steps[..2],
        ["booting the base VM", "waiting up to 5 s for \"fake guest: ready\" on the serial console"]
    );
    assert!(steps[2].starts_with("the guest is ready after "), "{steps:?}");
    assert_eq!(steps[3..], ["guest$ echo prepared", "snapshotting the base VM", "indexing and registering the base"]);
    assert!(!s.path("work").exists(), "the base flow's work directory is left behind");
    assert_eq!(base.snapshot.layout(), vm_driver::DeviceLayout::default());

    let out = s.path("out/app.overlay");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let (events, on) = recorder();
    create_overlay_file(&s.hv, &base, &s.overlay_request(&out), &on).unwrap();
    assert_eq!(
        events.steps()[1..],
        ["guest$ install the app", "guest$ sync", "snapshotting the custom VM", "computing the overlay"]
    );
    assert!(events.steps()[0].starts_with("resuming base "), "{:?}", events.steps());
    assert_eq!(tree(&s.path("out")), ["app.overlay"], "only the overlay is left next to it");

    let (events, on) = recorder();
    let mut opts = SynthesisOptions::new(&s.path("vms/app"));
    opts.probe_port = Some(8080);
    let synth = synthesize_with(&s.hv, &s.registry, std::fs::File::open(&out).unwrap(), &opts, &on).unwrap();
    let steps = events.steps();
    assert_eq!(steps[..2], ["rebuilding the custom VM", "resuming the custom VM"]);
    assert_eq!(steps.len(), 3, "{steps:?}");
    assert!(steps[2].starts_with("waiting up to 60 s for ") && steps[2].contains("guest port 8080"), "{steps:?}");
    assert!(synth.answer.as_deref().unwrap().contains("fake app"), "{:?}", synth.answer);
    assert_eq!(synth.ports.len(), 1);
    // The rebuilt RAM is the custom VM's: the command the overlay flow ran is in it.
    let ram = std::fs::read(synth.dir.join("memory")).unwrap();
    assert!(ram.windows(15).any(|w| w == b"install the app"));
    let saved = vm_driver::Snapshot::load(&synth.dir).unwrap();
    assert_eq!(saved.state_hash, vm_driver::state_hash(&saved.memory_path(), &saved.device_state_path()).unwrap());
    assert_eq!(live(&s), 1);
    synth.vm.shutdown().unwrap();
    assert_eq!(live(&s), 0);
    assert_eq!(
        s.hv.calls().iter().filter(|c| !c.starts_with("run ")).cloned().collect::<Vec<_>>(),
        ["launch", "snapshot snapshot", "drop", "restore", "snapshot custom", "drop", "restore", "shutdown"]
    );
}

#[test]
fn a_failed_launch_leaves_no_work_directory_and_no_base() {
    let s = Setup::new();
    s.hv.set(|f| f.launch = true);
    let e = create_base(&s.hv, &s.registry, &s.base_request(), &|_| {}).unwrap_err();
    assert!(matches!(e, FlowError::Driver(DriverError::QemuDied { .. })), "{e:?}");
    assert!(!s.path("work").exists());
    assert!(s.registry.list().unwrap().is_empty());
}

#[test]
fn a_failing_guest_command_is_named_and_the_base_is_not_registered() {
    let s = Setup::new();
    s.hv.set(|f| {
        f.failing_commands.insert("echo prepared".into(), (3, "no space left".into()));
    });
    let e = create_base(&s.hv, &s.registry, &s.base_request(), &|_| {}).unwrap_err();
    match &e {
        FlowError::GuestCommand { command, status, output } => {
            assert_eq!((command.as_str(), *status, output.as_str()), ("echo prepared", 3, "no space left"));
        }
        e => panic!("{e:?}"),
    }
    assert!(e.to_string().contains("'echo prepared' exited with 3"), "{e}");
    assert!(!s.path("work").exists());
    assert!(s.registry.list().unwrap().is_empty());
    assert_eq!(live(&s), 0, "the VM is stopped");
    assert!(!s.hv.calls().iter().any(|c| c.starts_with("snapshot")), "{:?}", s.hv.calls());
}

#[test]
fn a_base_without_the_ready_text_times_out_naming_it() {
    let s = Setup::new();
    let mut req = s.base_request();
    req.ready = synthesis::ReadyCheck::SerialText("never printed".into());
    let e = create_base(&s.hv, &s.registry, &req, &|_| {}).unwrap_err();
    assert!(
        matches!(&e, FlowError::Driver(DriverError::Timeout { waiting_for, .. }) if waiting_for.contains("never printed")),
        "{e:?}"
    );
    assert!(!s.path("work").exists());
}

#[test]
fn a_failed_snapshot_leaves_no_work_or_partial_files_next_to_the_overlay() {
    let s = Setup::new();
    let base = s.base();
    let out = s.path("out/app.overlay");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    // The user's own files with names like the flow's are never touched.
    std::fs::write(s.path("out/app.overlay.partial"), b"mine").unwrap();
    std::fs::create_dir(s.path("out/app.overlay.work")).unwrap();
    s.hv.set(|f| f.snapshot = true);
    let e = create_overlay_file(&s.hv, &base, &s.overlay_request(&out), &|_| {}).unwrap_err();
    assert!(
        matches!(&e, FlowError::Driver(DriverError::Migration { reason }) if reason.contains("fake snapshot")),
        "{e:?}"
    );
    assert_eq!(tree(&s.path("out")), ["app.overlay.partial", "app.overlay.work"]);
    assert_eq!(live(&s), 0);
}

#[test]
fn a_failed_restore_of_the_base_leaves_nothing() {
    let s = Setup::new();
    let base = s.base();
    let out = s.path("out/app.overlay");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    s.hv.set(|f| f.restore = true);
    let e = create_overlay_file(&s.hv, &base, &s.overlay_request(&out), &|_| {}).unwrap_err();
    assert!(matches!(e, FlowError::Driver(DriverError::Migration { .. })), "{e:?}");
    assert!(tree(&s.path("out")).is_empty(), "{:?}", tree(&s.path("out")));
}

#[test]
fn a_failed_restore_in_synthesis_removes_the_vm_directory() {
    let s = Setup::new();
    let overlay = s.overlay();
    s.hv.set(|f| f.restore = true);
    let opts = SynthesisOptions::new(&s.path("vms/app"));
    let e = synthesize_with(&s.hv, &s.registry, std::fs::File::open(&overlay).unwrap(), &opts, &|_| {})
        .err()
        .expect("the restore fails");
    assert!(matches!(e, FlowError::Driver(DriverError::Migration { .. })), "{e:?}");
    assert!(!s.path("vms/app").exists(), "the VM directory is left behind");
    assert!(s.path("vms").exists(), "the parent the flow made is kept");
}

#[test]
fn a_probe_that_never_answers_names_the_port_and_stops_the_vm() {
    let s = Setup::new();
    let overlay = s.overlay();
    s.hv.set(|f| f.http_silent = true);
    let mut opts = SynthesisOptions::new(&s.path("vms/app"));
    opts.probe_port = Some(8080);
    opts.probe_timeout = Duration::from_millis(600);
    let e = synthesize_with(&s.hv, &s.registry, std::fs::File::open(&overlay).unwrap(), &opts, &|_| {})
        .err()
        .expect("the probe fails");
    match &e {
        FlowError::NoAnswer { guest_port, path, .. } => assert_eq!((*guest_port, path.as_str()), (Some(8080), "/")),
        e => panic!("{e:?}"),
    }
    assert!(e.to_string().contains("guest port 8080"), "{e}");
    assert!(!s.path("vms/app").exists());
    assert_eq!(live(&s), 0, "the VM is stopped");
}

#[test]
fn a_taken_host_port_is_replaced_by_a_free_one() {
    let s = Setup::new();
    let base = s.base();
    let out = s.path("app.overlay");
    let mut req = s.overlay_request(&out);
    req.forwards[0].host_port = 1;
    create_overlay_file(&s.hv, &base, &req, &|_| {}).unwrap();
    s.hv.set(|f| f.port_in_use = true);
    let opts = SynthesisOptions::new(&s.path("vm"));
    let synth = synthesize_with(&s.hv, &s.registry, std::fs::File::open(&out).unwrap(), &opts, &|_| {}).unwrap();
    assert_ne!(synth.ports[0].1, 1);
    assert_eq!(s.hv.calls().iter().filter(|c| *c == "restore").count(), 3, "{:?}", s.hv.calls());
}

#[test]
fn an_interactive_flow_needs_a_serial_socket() {
    let s = Setup::new();
    let mut req = s.base_request();
    req.interactive = true;
    let e = create_base(&s.hv, &s.registry, &req, &|_| {}).unwrap_err();
    assert!(matches!(&e, FlowError::Unsupported { what } if what.contains("console")), "{e:?}");
    assert!(!s.path("work").exists());
}

#[test]
fn an_overlay_for_another_base_names_the_missing_base_before_any_work() {
    let s = Setup::new();
    let overlay = s.overlay();
    let other = Setup::new();
    let opts = SynthesisOptions::new(&other.path("vm"));
    let e = synthesize_with(&other.hv, &other.registry, std::fs::File::open(&overlay).unwrap(), &opts, &|_| {})
        .err()
        .expect("no base");
    assert!(matches!(e, FlowError::UnknownBase { .. }), "{e:?}");
    assert!(!other.path("vm").exists());
    assert!(other.hv.calls().is_empty());
}

#[test]
fn a_base_records_its_snapshot_typed_and_labels_of_older_bases_still_read() {
    let s = Setup::new();
    let base = s.base();
    let record = base.entry.manifest.snapshot.clone().expect("a typed snapshot record");
    assert_eq!(record.state_hash, base.snapshot.state_hash);
    assert!(base.entry.manifest.labels.is_empty(), "{:?}", base.entry.manifest.labels);

    // The same files registered as earlier versions did: the record in labels.
    let old_style = |registry: &Registry, display: &str| {
        let files = ["memory", "device-state", "disk0", "kernel", "initrd"]
            .iter()
            .map(|n| (n.to_string(), base.entry.path(n).unwrap()))
            .collect();
        let labels = [
            ("state_hash".to_string(), record.state_hash.clone()),
            ("free_page_reporting".to_string(), "false".to_string()),
            ("display".to_string(), display.to_string()),
        ];
        let entry = registry
            .register(base_registry::NewBase {
                name: "old".into(),
                source_image: None,
                spec: base.entry.manifest.spec.clone(),
                files,
                mode: base_registry::Mode::Copy,
                labels: labels.into(),
                snapshot: None,
            })
            .unwrap();
        RegisteredBase::from_entry(entry)
    };
    let other = Setup::new();
    let old = old_style(&other.registry, "true").unwrap();
    assert_eq!(old.snapshot.state_hash, record.state_hash);
    assert_eq!(
        old.snapshot.layout(),
        vm_driver::DeviceLayout { free_page_reporting: false, display: true, guest_agent: false }
    );
    // It resumes: the hash from the labels matches the files.
    let out = other.path("app.overlay");
    create_overlay_file(&other.hv, &old, &other.overlay_request(&out), &|_| {}).unwrap();

    let third = Setup::new();
    let e = old_style(&third.registry, "yes").unwrap_err();
    assert!(e.to_string().contains("label display is \"yes\""), "{e}");
}
