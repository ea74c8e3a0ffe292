//! A small base registered from made-up images, and overlays of it by the real writer.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use base_registry::{Mode, NewBase, Registry};
use delta_engine::{create_overlay, CreateOptions, CustomImage, CustomSource, OverlayInfo};
use overlay_format::{DiskSpec, PortForward, Protocol, VmSpec};
use synthesis::RegisteredBase;

/// A mebibyte.
pub const MIB: u64 = 1 << 20;

/// The made-up base's spec.
pub fn spec() -> VmSpec {
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

pub fn pattern(len: u64, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8).collect()
}

/// A registry at `dir/registry` holding one small base; returns it.
pub fn fake_base(dir: &Path) -> (Registry, RegisteredBase) {
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
            snapshot: None,
        })
        .unwrap();
    let base = RegisteredBase::from_entry(entry).unwrap();
    (registry, base)
}

/// An overlay of `base` written by the real writer, claiming `spec`; its images are the
/// base's with a few bytes changed, sized as `spec` says.
pub fn overlay_with_spec(dir: &Path, base: &RegisteredBase, spec: &VmSpec) -> Vec<u8> {
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
