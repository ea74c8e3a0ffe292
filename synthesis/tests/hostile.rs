//! Hostile overlays against synthesis and the in-process server, without booting a guest: a
//! small base is registered from made-up images, and overlays are written by the real writer.

mod common;

use common::{fake_base, overlay_with_spec, spec, MIB};
use overlay_format::{DiskSpec, VmSpec};
use synthesis::{synthesize_with, FlowError, SynthesisOptions};

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
