//! Hostile overlays against synthesis and the in-process server, without booting a guest: a
//! small base is registered from made-up images, and overlays are written by the real writer.

use std::collections::BTreeMap;
use std::path::Path;

use base_registry::{Mode, NewBase, Registry};
use delta_engine::{create_overlay, CreateOptions, CustomImage, CustomSource, OverlayInfo};
use overlay_format::{DiskSpec, PortForward, Protocol, VmSpec};
use synthesis::{synthesize_with, FlowError, RegisteredBase, SynthesisOptions};

const MIB: u64 = 1 << 20;

fn spec() -> VmSpec {
    VmSpec {
        machine_type: "pc-q35-10.0".into(),
        cpu_model: "qemu64".into(),
        vcpus: 1,
        ram_bytes: MIB,
        qemu_version: "10.0.2".into(),
        accelerator: "tcg".into(),
        disks: vec![DiskSpec { name: "disk0".into(), size_bytes: MIB }],
        kernel_cmdline: Some("console=ttyS0".into()),
    }
}

fn pattern(len: u64, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8).collect()
}

/// A registry at `dir/registry` holding one small base; returns it.
fn fake_base(dir: &Path) -> (Registry, RegisteredBase) {
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("memory"), pattern(MIB, 1)).unwrap();
    std::fs::write(files.join("disk0"), pattern(MIB, 2)).unwrap();
    std::fs::write(files.join("device-state"), b"QEVM device state of a made-up VM").unwrap();
    let registry = Registry::open(&dir.join("registry")).unwrap();
    let entry = registry
        .register(NewBase {
            name: "fake".into(),
            source_image: None,
            spec: spec(),
            files: ["memory", "disk0", "device-state"].iter().map(|n| (n.to_string(), files.join(n))).collect(),
            mode: Mode::Copy,
            labels: BTreeMap::from([("state_hash".to_string(), "0".repeat(64))]),
        })
        .unwrap();
    let base = RegisteredBase::from_entry(entry).unwrap();
    (registry, base)
}

/// An overlay of `base` written by the real writer, claiming `spec`; its images are the
/// base's with a few bytes changed, sized as `spec` says.
fn overlay_with_spec(dir: &Path, base: &RegisteredBase, spec: &VmSpec) -> Vec<u8> {
    let custom = dir.join("custom");
    std::fs::create_dir_all(&custom).unwrap();
    let mut mem = pattern(spec.ram_bytes, 1);
    mem[100] ^= 0xff;
    std::fs::write(custom.join("memory"), &mem).unwrap();
    let mut images = vec![CustomImage { name: "memory".into(), source: CustomSource::Raw(custom.join("memory")) }];
    for d in &spec.disks {
        let mut disk = pattern(d.size_bytes, 2);
        disk[5000] ^= 0xff;
        std::fs::write(custom.join(&d.name), &disk).unwrap();
        images.push(CustomImage { name: d.name.clone(), source: CustomSource::Raw(custom.join(&d.name)) });
    }
    let info = OverlayInfo {
        base_id: base.id(),
        spec: spec.clone(),
        forwards: vec![PortForward { protocol: Protocol::Tcp, host_port: 0, guest_port: 8080 }],
        name: "hostile".into(),
        creator: "test".into(),
        created_unix: 0,
    };
    let (out, _) = create_overlay(
        &base.engine_base().unwrap(),
        &images,
        &info,
        b"QEVM custom device state",
        &CreateOptions::default(),
        &|_| {},
        Vec::new(),
    )
    .unwrap();
    std::fs::remove_dir_all(&custom).unwrap();
    out
}

#[test]
fn an_overlay_whose_spec_is_not_its_bases_is_refused_before_any_file() {
    let work = tempfile::tempdir().unwrap();
    let (registry, base) = fake_base(work.path());
    let qemu = vm_driver::Qemu::new().unwrap();
    let cases: Vec<(&str, VmSpec, &str, &str)> = vec![
        ("ram_bytes", VmSpec { ram_bytes: 2 * MIB, ..spec() }, "2097152", "1048576"),
        ("machine_type", VmSpec { machine_type: "pc-i440fx-10.0".into(), ..spec() }, "pc-i440fx-10.0", "pc-q35-10.0"),
        ("vcpus", VmSpec { vcpus: 4, ..spec() }, "4", "1"),
        (
            "disks",
            VmSpec { disks: vec![DiskSpec { name: "disk0".into(), size_bytes: 2 * MIB }], ..spec() },
            "[disk0 (2097152 bytes)]",
            "[disk0 (1048576 bytes)]",
        ),
    ];
    for (field, hostile, want_overlay, want_base) in cases {
        let ovl = overlay_with_spec(work.path(), &base, &hostile);
        let out = work.path().join("vm");
        let r = synthesize_with(&qemu, &registry, &ovl[..], &SynthesisOptions::new(&out), &|_| {});
        match r {
            Err(FlowError::BadOverlay { field: f, overlay, base }) => {
                assert_eq!((f, overlay.as_str(), base.as_str()), (field, want_overlay, want_base));
            }
            Err(e) => panic!("{field}: expected BadOverlay, got {e:?}"),
            Ok(_) => panic!("{field}: the hostile overlay was synthesized"),
        }
        assert!(!out.exists(), "{field}: {} was created", out.display());
    }
    // Compatible differences: another QEMU version and accelerator get past the spec check
    // (this made-up base cannot resume, so synthesis fails later, at the hypervisor).
    let ok = VmSpec { qemu_version: "10.1.0".into(), accelerator: "kvm".into(), ..spec() };
    let ovl = overlay_with_spec(work.path(), &base, &ok);
    let out = work.path().join("vm");
    let r = synthesize_with(&qemu, &registry, &ovl[..], &SynthesisOptions::new(&out), &|_| {});
    assert!(!matches!(r, Err(FlowError::BadOverlay { .. })), "{:?}", r.err());
    assert!(!out.exists());
}
