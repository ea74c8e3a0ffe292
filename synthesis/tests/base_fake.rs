//! The base flow's inputs over the in-memory hypervisor: disk images (raw, qcow2, several, bad
//! ones), readiness by a guest TCP port, and the trim step. No QEMU (`qemu-img` converts the
//! qcow2 input).

mod fake;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use fake::{recorder, Setup};
use synthesis::{
    create_base, create_overlay_file, synthesize_with, CommandChannel, FlowError, ReadyCheck, SynthesisOptions,
};
use vm_driver::Vm;

impl Setup {
    /// Nothing of a failed base flow is left: no work directory, no base, no VM.
    fn assert_nothing_left(&self) {
        assert!(!self.path("work").exists(), "the work directory is left behind");
        assert!(self.registry.list().unwrap().is_empty(), "a base was registered");
        assert_eq!(self.hv.live.load(Ordering::SeqCst), 0, "a VM is still running");
    }
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn hash(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

#[test]
fn a_guest_port_that_accepts_connections_makes_the_guest_ready() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.ready = ReadyCheck::TcpPort(8080);
    let (events, on) = recorder();
    create_base(&s.hv, &s.registry, &req, &on).unwrap();
    let steps = events.steps();
    assert_eq!(steps[1], "waiting up to 5 s for guest port 8080 to accept connections", "{steps:?}");
    assert!(steps[2].starts_with("the guest is ready after "), "{steps:?}");
}

#[test]
fn a_guest_port_that_refuses_is_not_ready_and_nothing_is_left() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.ready = ReadyCheck::TcpPort(8081);
    req.ready_timeout = Duration::from_millis(800);
    s.hv.set(|f| {
        f.refused_ports.insert(8081);
    });
    let e = create_base(&s.hv, &s.registry, &req, &|_| {}).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, FlowError::NotReady { .. }), "{e:?}");
    assert!(text.starts_with("the guest was not ready within 0.8 s: waiting for guest port 8081"), "{text}");
    assert!(text.ends_with("the last attempt: guest port 8081 refuses connections"), "{text}");
    s.assert_nothing_left();
}

/// QEMU's user networking holds a connection open while the guest's network is down: that is
/// not a guest service accepting it.
#[test]
fn a_connection_held_while_the_network_is_down_does_not_count() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.ready = ReadyCheck::TcpPort(8080);
    req.ready_timeout = Duration::from_millis(500);
    s.hv.set(|f| f.network_down = true);
    let e = create_base(&s.hv, &s.registry, &req, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("the guest's network does not answer yet"), "{e}");
    s.assert_nothing_left();
}

#[test]
fn a_qcow2_and_a_raw_disk_become_two_raw_disks_and_the_inputs_are_unchanged() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    let raw = req.disks[0].clone();
    let qcow2 = s.path("guest/data.qcow2");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), qcow2.to_str().unwrap()]);
    let sparse = s.path("guest/big.raw");
    std::fs::File::create(&sparse).unwrap().set_len(64 << 20).unwrap();
    req.disks = vec![qcow2.clone(), raw.clone(), sparse.clone()];
    let before = [hash(&qcow2), hash(&raw), hash(&sparse)];
    let (events, on) = recorder();
    let (base, _) = create_base(&s.hv, &s.registry, &req, &on).unwrap();
    assert_eq!(before, [hash(&qcow2), hash(&raw), hash(&sparse)], "an input disk was modified");
    assert!(events.steps().iter().any(|e| e.starts_with("converting ") && e.ends_with("(qcow2) to a raw disk0")));
    let disks: Vec<(String, u64)> =
        base.entry.manifest.spec.disks.iter().map(|d| (d.name.clone(), d.size_bytes)).collect();
    assert_eq!(disks, [("disk0".into(), 1 << 20), ("disk1".into(), 1 << 20), ("disk2".into(), 64 << 20)]);
    // The converted disk holds the raw image's bytes.
    assert_eq!(hash(&base.entry.path("disk0").unwrap()), hash(&raw));
    assert!(base.entry.manifest.source_image.as_deref().unwrap().contains("data.qcow2"));

    // An overlay of it and a synthesis: every disk goes through.
    let out = s.path("app.overlay");
    create_overlay_file(&s.hv, &base, &fake::overlay_request(&out), &|_| {}).unwrap();
    let synth = synthesize_with(
        &s.hv,
        &s.registry,
        std::fs::File::open(&out).unwrap(),
        &SynthesisOptions::new(&s.path("vm")),
        &|_| {},
    )
    .unwrap();
    for d in ["disk0", "disk1", "disk2"] {
        assert!(synth.dir.join(format!("{d}.qcow2")).is_file(), "{d} was not rebuilt");
    }
    synth.vm.shutdown().unwrap();
}

#[test]
fn unusable_inputs_are_refused_before_anything_starts() {
    let s = Setup::new();
    let req = fake::base_request(s.tmp.path());
    let try_disks = |disks: Vec<PathBuf>| {
        let mut r = req.clone();
        r.disks = disks;
        create_base(&s.hv, &s.registry, &r, &|_| {}).unwrap_err()
    };
    let good = req.disks[0].clone();
    let missing = s.path("guest/missing.raw");
    let e = try_disks(vec![good.clone(), missing]);
    assert!(matches!(&e, FlowError::Io { path, .. } if path.ends_with("missing.raw")), "{e:?}");

    let backed = s.path("guest/layer.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", good.to_str().unwrap(), backed.to_str().unwrap()]);
    let e = try_disks(vec![backed]).to_string();
    assert!(e.contains("layer.qcow2: a qcow2 image with a backing file"), "{e}");

    let odd = s.path("guest/odd.img");
    std::fs::write(&odd, vec![7u8; 1000]).unwrap();
    let e = try_disks(vec![odd]).to_string();
    assert!(e.contains("odd.img: 1000 bytes is not a whole number of 512-byte sectors"), "{e}");

    let e = try_disks(vec![]).to_string();
    assert!(e.contains("a base without a disk"), "{e}");

    let mut r = req.clone();
    r.kernel.as_mut().unwrap().initrd = Some(s.path("guest/no-initrd"));
    let e = create_base(&s.hv, &s.registry, &r, &|_| {}).unwrap_err();
    assert!(matches!(&e, FlowError::Io { path, .. } if path.ends_with("no-initrd")), "{e:?}");

    assert!(s.hv.calls().is_empty(), "a VM was started: {:?}", s.hv.calls());
    s.assert_nothing_left();
}

#[test]
fn trim_runs_last_before_the_snapshot_and_a_missing_fstrim_says_what_is_needed() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.trim = true;
    let (events, on) = recorder();
    create_base(&s.hv, &s.registry, &req, &on).unwrap();
    let steps = events.steps();
    let at = steps.iter().position(|e| e == "guest$ echo prepared").unwrap();
    let mut want = vec!["guest$ echo prepared".to_string()];
    want.extend(synthesis::TRIM_COMMANDS.iter().map(|c| format!("guest$ {c}")));
    want.push("snapshotting the base VM".into());
    assert_eq!(steps[at..at + want.len()], want[..]);
    assert!(want[1..].iter().any(|c| c.contains("fstrim -av")) && want[1..].iter().any(|c| c.contains("drop_caches")));

    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.trim = true;
    s.hv.set(|f| {
        f.failing_commands.insert("sync && fstrim -av".into(), (127, "sh: fstrim: not found".into()));
    });
    let e = create_base(&s.hv, &s.registry, &req, &|_| {}).unwrap_err().to_string();
    assert!(e.contains("exited with 127: sh: fstrim: not found") && e.contains("needs fstrim from util-linux"), "{e}");
    s.assert_nothing_left();
}

#[test]
fn through_the_guest_agent_the_base_is_ready_prepared_and_its_overlays_customized() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.ready = ReadyCheck::Agent;
    req.via = CommandChannel::Agent;
    req.trim = true;
    let (events, on) = recorder();
    let (base, _) = create_base(&s.hv, &s.registry, &req, &on).unwrap();
    assert!(base.snapshot.layout().guest_agent, "the base lost its agent channel");
    let steps = events.steps();
    assert_eq!(steps[1], "waiting up to 5 s for the guest agent to answer", "{steps:?}");
    assert!(steps.contains(&"guest (agent)$ echo prepared".to_string()), "{steps:?}");
    let calls = s.hv.calls();
    assert!(calls.contains(&"ping".to_string()) && calls.contains(&"exec echo prepared".to_string()), "{calls:?}");
    assert!(calls.contains(&"exec sync && fstrim -av".to_string()), "trim goes the same way: {calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("run ")), "a command went over the console: {calls:?}");

    let out = s.path("app.overlay");
    let mut o = fake::overlay_request(&out);
    o.via = CommandChannel::Agent;
    let (events, on) = recorder();
    create_overlay_file(&s.hv, &base, &o, &on).unwrap();
    assert!(events.steps().contains(&"guest (agent)$ install the app".to_string()), "{:?}", events.steps());
    assert!(s.hv.calls().contains(&"exec sync".to_string()), "{:?}", s.hv.calls());
}

#[test]
fn a_command_failing_through_the_agent_is_named_with_its_output() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.via = CommandChannel::Agent;
    s.hv.set(|f| {
        f.failing_commands.insert("echo prepared".into(), (2, "apt: no such package".into()));
    });
    let e = create_base(&s.hv, &s.registry, &req, &|_| {}).unwrap_err();
    assert!(matches!(&e, FlowError::GuestCommand { status: 2, .. }), "{e:?}");
    assert!(e.to_string().contains("'echo prepared' exited with 2: apt: no such package"), "{e}");
    s.assert_nothing_left();
}

#[test]
fn a_silent_agent_is_not_ready_and_an_agentless_base_refuses_agent_commands() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.ready = ReadyCheck::Agent;
    req.ready_timeout = Duration::from_millis(500);
    s.hv.set(|f| f.agent_silent = true);
    let e = create_base(&s.hv, &s.registry, &req, &|_| {}).unwrap_err().to_string();
    assert!(e.contains("waiting for the guest agent to answer guest-ping") && e.contains("timed out"), "{e}");
    s.assert_nothing_left();

    let s = Setup::new();
    let (base, _) = create_base(&s.hv, &s.registry, &fake::base_request(s.tmp.path()), &|_| {}).unwrap();
    let calls = s.hv.calls().len();
    let mut o = fake::overlay_request(&s.path("app.overlay"));
    o.via = CommandChannel::Agent;
    let e = create_overlay_file(&s.hv, &base, &o, &|_| {}).unwrap_err().to_string();
    assert!(e.contains("has no guest agent channel") && e.contains("--guest-agent"), "{e}");
    assert_eq!(s.hv.calls().len(), calls, "a VM was started");
}

#[test]
fn missing_uefi_firmware_says_where_to_get_it() {
    let s = Setup::new();
    let mut req = fake::base_request(s.tmp.path());
    req.firmware = vm_driver::Firmware::Uefi { code: s.path("guest/vmlinuz"), vars: s.path("no/OVMF_VARS.fd") };
    let e = create_base(&s.hv, &s.registry, &req, &|_| {}).unwrap_err();
    assert!(matches!(&e, FlowError::MissingFirmware { what: "variable store", .. }), "{e:?}");
    assert!(e.to_string().contains("OVMF_VARS.fd cannot be read") && e.to_string().contains("apt-get install ovmf"));
    assert!(s.hv.calls().is_empty());
    s.assert_nothing_left();
}
