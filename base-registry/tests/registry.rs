//! Registry behaviour, including concurrent writers and crashes at every registration step.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use base_registry::*;
use overlay_format::{DiskSpec, ImageDigest};

const MEM: u64 = 4 << 20;
const DISK: u64 = 1 << 20;

fn spec() -> VmSpec {
    VmSpec {
        machine_type: "pc-q35-10.0".into(),
        cpu_model: "qemu64".into(),
        vcpus: 1,
        ram_bytes: MEM,
        qemu_version: "10.0.2".into(),
        accelerator: "tcg".into(),
        disks: vec![DiskSpec { name: "disk0".into(), size_bytes: DISK }],
        kernel_cmdline: Some("console=ttyS0".into()),
    }
}

/// Source files of a base distinguished by `seed`: a sparse memory image with a few pages.
fn files(dir: &Path, seed: u8) -> Vec<(String, PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    let mem = dir.join("memory");
    let f = std::fs::File::create(&mem).unwrap();
    f.set_len(MEM).unwrap();
    for i in 0..8u64 {
        f.write_all_at(&[seed.wrapping_add(i as u8 + 1); 4096], i * 65536).unwrap();
    }
    std::fs::write(dir.join("disk0"), vec![seed; DISK as usize]).unwrap();
    std::fs::write(dir.join("device-state"), [b"QEVM".as_slice(), &[seed]].concat()).unwrap();
    std::fs::write(dir.join("kernel"), b"kernel").unwrap();
    ["memory", "disk0", "device-state", "kernel"].iter().map(|n| (n.to_string(), dir.join(n))).collect()
}

fn new_base(dir: &Path, name: &str, seed: u8, mode: Mode) -> NewBase {
    NewBase {
        name: name.into(),
        source_image: Some("test".into()),
        spec: spec(),
        files: files(dir, seed),
        mode,
        labels: Default::default(),
        snapshot: None,
    }
}

fn staging_entries(root: &Path) -> usize {
    std::fs::read_dir(root.join("staging")).unwrap().count()
}

#[test]
fn register_find_verify_remove() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::open(&t.path().join("reg")).unwrap();
    let a = reg.register(new_base(&t.path().join("a"), "alpha", 1, Mode::Copy)).unwrap();
    let b = reg.register(new_base(&t.path().join("b"), "beta", 2, Mode::Move)).unwrap();
    assert!(!t.path().join("b/memory").exists(), "move mode removes the sources");
    assert!(t.path().join("a/memory").exists(), "copy mode keeps the sources");
    let names: Vec<String> = reg.list().unwrap().into_iter().map(|e| e.manifest.name).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert_eq!(reg.find("alpha").unwrap().id(), a.id());
    assert_eq!(reg.find(&b.id().to_hex()).unwrap().id(), b.id());
    assert_eq!(reg.find(&b.id().to_hex()[..6]).unwrap().id(), b.id());
    assert!(matches!(reg.find("gamma"), Err(RegistryError::NotFound { .. })));
    assert!(reg.verify(&a.id()).unwrap().is_ok());
    // Files are read-only and sparse copies stay sparse.
    let m = std::fs::metadata(a.memory_path()).unwrap();
    assert_eq!(m.mode() & 0o222, 0);
    assert!(m.blocks() * 512 < MEM / 2, "memory image lost its holes");
    // The same content again, or the same name, is refused.
    let again = reg.register(new_base(&t.path().join("a2"), "alpha2", 1, Mode::Copy)).unwrap_err();
    assert!(matches!(again, RegistryError::AlreadyRegistered { .. }), "{again}");
    let taken = reg.register(new_base(&t.path().join("c"), "alpha", 3, Mode::Copy)).unwrap_err();
    assert!(matches!(taken, RegistryError::NameTaken { .. }), "{taken}");
    // A flipped byte is found and named.
    let disk = a.disk_path("disk0").unwrap();
    let mut perm = std::fs::metadata(&disk).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&disk, perm).unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().write_all_at(&[0xff], 12345).unwrap();
    let rep = reg.verify(&a.id()).unwrap();
    assert_eq!(rep.problems.len(), 1, "{rep:?}");
    assert_eq!(rep.problems[0].0, "disk0");
    reg.remove(&a.id()).unwrap();
    assert!(matches!(reg.get(&a.id()), Err(RegistryError::NotFound { .. })));
    assert_eq!(reg.list().unwrap().len(), 1);
    // Index attach.
    let idx = t.path().join("index");
    std::fs::write(&idx, b"an index").unwrap();
    let b2 = reg.set_index(&b.id(), &idx).unwrap();
    assert!(b2.path("index").is_some());
    assert!(reg.verify(&b.id()).unwrap().is_ok());
}

#[test]
fn bad_inputs_leave_the_registry_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::open(&t.path().join("reg")).unwrap();
    let mut nb = new_base(&t.path().join("a"), "a", 1, Mode::Copy);
    nb.files.retain(|(n, _)| n != "device-state");
    assert!(matches!(reg.register(nb), Err(RegistryError::BadInput { .. })));
    let mut nb = new_base(&t.path().join("b"), "b", 1, Mode::Copy);
    nb.spec.ram_bytes = MEM * 2;
    let e = reg.register(nb).unwrap_err();
    assert!(e.to_string().contains("memory image"), "{e}");
    let mut nb = new_base(&t.path().join("c"), "c", 1, Mode::Copy);
    nb.spec.disks.push(DiskSpec { name: "disk1".into(), size_bytes: 1 });
    assert!(reg.register(nb).unwrap_err().to_string().contains("missing file 'disk1'"));
    let mut nb = new_base(&t.path().join("d"), "d", 1, Mode::Copy);
    nb.files[0].1 = t.path().join("nope");
    assert!(matches!(reg.register(nb), Err(RegistryError::BadInput { .. })));
    let nb = new_base(&t.path().join("e"), "../evil", 1, Mode::Copy);
    assert!(matches!(reg.register(nb), Err(RegistryError::BadInput { .. })));
    assert!(reg.list().unwrap().is_empty());
    assert_eq!(staging_entries(reg.root()), 0);
}

#[test]
fn ambiguous_prefix_lists_candidates() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("reg");
    let reg = Registry::open(&root).unwrap();
    let a = reg.register(new_base(&t.path().join("a"), "alpha", 1, Mode::Copy)).unwrap();
    // Two more entries whose ids share a prefix: copies of alpha's entry under crafted ids.
    for (i, name) in ["x1", "x2"].iter().enumerate() {
        let id = format!("abcd{}{}", i, "0".repeat(59));
        let dir = root.join("bases").join(&id);
        std::fs::create_dir(&dir).unwrap();
        let mut m = a.manifest.clone();
        m.id = BaseId::from_hex(&id).unwrap();
        m.name = name.to_string();
        m.checksum = String::new();
        m.checksum = blake3::hash(&serde_json::to_vec(&m).unwrap()).to_hex().to_string();
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    }
    match reg.find("abcd") {
        Err(RegistryError::Ambiguous { candidates, .. }) => assert_eq!(candidates.len(), 2),
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    assert_eq!(reg.find("abcd0").unwrap().manifest.name, "x1");
}

#[test]
fn newer_registry_format_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("reg");
    Registry::open(&root).unwrap();
    std::fs::write(root.join("registry.json"), "{\"format\": 99}").unwrap();
    assert!(matches!(Registry::open(&root), Err(RegistryError::NewerFormat { found: 99, .. })));
    assert_eq!(std::fs::read_to_string(root.join("registry.json")).unwrap(), "{\"format\": 99}");
}

#[test]
fn export_import_round_trip_and_damage() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::open(&t.path().join("reg")).unwrap();
    let a = reg.register(new_base(&t.path().join("a"), "alpha", 1, Mode::Copy)).unwrap();
    let mut export = Vec::new();
    reg.export(&a.id(), &mut export).unwrap();
    assert!((export.len() as u64) < MEM / 4, "export of a sparse base should be small: {}", export.len());
    let reg2 = Registry::open(&t.path().join("reg2")).unwrap();
    for (what, bytes) in [
        ("truncated", export[..export.len() / 2].to_vec()),
        ("truncated end", export[..export.len() - 3].to_vec()),
        ("flipped", {
            let mut b = export.clone();
            let n = b.len();
            b[n / 2] ^= 0x10;
            b
        }),
        ("empty", vec![]),
    ] {
        assert!(reg2.import(&bytes[..]).is_err(), "{what} export was accepted");
        assert!(reg2.list().unwrap().is_empty(), "{what}");
        assert_eq!(staging_entries(reg2.root()), 0, "{what}");
    }
    let b = reg2.import(&export[..]).unwrap();
    assert_eq!(b.id(), a.id());
    assert!(reg2.verify(&b.id()).unwrap().is_ok());
    let m = std::fs::metadata(b.memory_path()).unwrap();
    assert!(m.blocks() * 512 < MEM / 2, "import lost the holes");
    assert!(matches!(reg2.import(&export[..]), Err(RegistryError::AlreadyRegistered { .. })));
}

/// Child process entry: registers a base as told by CLOUDLET_TEST_CHILD (and may crash at
/// CLOUDLET_REGISTRY_CRASH_AT).
#[test]
fn child_role() {
    let Ok(spec) = std::env::var("CLOUDLET_TEST_CHILD") else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let (root, src, name, seed) = (parts[0], parts[1], parts[2], parts[3].parse::<u8>().unwrap());
    let reg = Registry::open(Path::new(root)).unwrap();
    reg.register(new_base(Path::new(src), name, seed, Mode::Move)).unwrap();
}

fn child(root: &Path, src: &Path, name: &str, seed: u8, crash: Option<&str>) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env("CLOUDLET_TEST_CHILD", format!("{}|{}|{name}|{seed}", root.display(), src.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(step) = crash {
        c.env("CLOUDLET_REGISTRY_CRASH_AT", step);
    }
    c
}

#[test]
fn concurrent_writers_and_readers() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("reg");
    let reg = Registry::open(&root).unwrap();
    let mut kids: Vec<_> = (0..6u8)
        .map(|i| child(&root, &t.path().join(format!("src{i}")), &format!("b{i}"), i * 10, None).spawn().unwrap())
        .collect();
    // Read while they write: every listed entry must be complete.
    for _ in 0..50 {
        for e in reg.list().unwrap() {
            for f in &e.manifest.files {
                assert_eq!(std::fs::metadata(e.dir.join(&f.name)).unwrap().len(), f.size);
            }
        }
    }
    for k in &mut kids {
        assert!(k.wait().unwrap().success());
    }
    let all = reg.list().unwrap();
    assert_eq!(all.len(), 6);
    for e in all {
        assert!(reg.verify(&e.id()).unwrap().is_ok());
    }
    assert_eq!(staging_entries(&root), 0);
}

#[test]
fn a_crash_at_any_step_leaves_no_partial_entry() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("reg");
    let reg = Registry::open(&root).unwrap();
    let steps = ["locked", "staging-created", "file-placed", "files-placed", "manifest-written", "renamed"];
    for (i, step) in steps.iter().enumerate() {
        let src = t.path().join(format!("src-{step}"));
        let name = format!("crash-{i}");
        let st = child(&root, &src, &name, 100 + i as u8, Some(step)).status().unwrap();
        assert!(!st.success(), "the child should have crashed at {step}");
        let listed: Vec<_> = reg.list().unwrap().into_iter().filter(|e| e.manifest.name == name).collect();
        if *step == "renamed" {
            assert_eq!(listed.len(), 1, "after the rename the entry is complete");
            assert!(reg.verify(&listed[0].id()).unwrap().is_ok());
        } else {
            assert!(listed.is_empty(), "partial entry listed after a crash at {step}");
            // The sources survive a crash before the entry exists (move mode links first).
            assert!(src.join("memory").exists(), "crash at {step} lost the source");
        }
        reg.gc().unwrap();
        assert_eq!(staging_entries(&root), 0);
        if *step != "renamed" {
            let nb = NewBase {
                name: name.clone(),
                source_image: None,
                spec: spec(),
                files: files(&src, 100 + i as u8),
                mode: Mode::Copy,
                labels: Default::default(),
                snapshot: None,
            };
            reg.register(nb).unwrap();
        }
    }
    assert_eq!(reg.list().unwrap().len(), steps.len());
}

/// `m` with its checksum recomputed, as a tamperer would.
fn sealed(mut m: Manifest) -> Manifest {
    m.checksum = String::new();
    m.checksum = blake3::hash(&serde_json::to_vec(&m).unwrap()).to_hex().to_string();
    m
}

/// An export file in the documented layout, holding `files` under a manifest built for them:
/// digests, id and checksums all consistent, so only the names can be refused.
fn crafted_export(spec: VmSpec, files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let entries: Vec<FileEntry> = files
        .iter()
        .map(|(n, b)| FileEntry {
            name: n.to_string(),
            size: b.len() as u64,
            digest: ImageDigest::of_bytes(b).to_string(),
        })
        .collect();
    let refs: Vec<(&str, ImageDigest)> = files.iter().map(|(n, b)| (*n, ImageDigest::of_bytes(b))).collect();
    let m = sealed(Manifest {
        format: 1,
        id: BaseId::compute(&spec, &refs),
        name: "crafted".into(),
        source_image: None,
        created_unix: 0,
        spec,
        files: entries,
        index: None,
        labels: Default::default(),
        snapshot: None,
        checksum: String::new(),
    });
    let mj = serde_json::to_vec(&m).unwrap();
    let mut raw = b"CLDBASE1".to_vec();
    raw.extend((mj.len() as u32).to_le_bytes());
    raw.extend(&mj);
    for (n, b) in files {
        raw.extend((n.len() as u16).to_le_bytes());
        raw.extend(n.as_bytes());
        raw.extend((b.len() as u64).to_le_bytes());
        raw.extend(b);
    }
    let sum = *blake3::hash(&raw).as_bytes();
    raw.extend(sum);
    zstd::encode_all(&raw[..], 3).unwrap()
}

/// A crafted export whose names would lead outside the entry directory (an absolute disk path,
/// `..`, a NUL, a disk that shadows another file) is refused before any file is written, with
/// an error naming the field and the value, and leaves the registry as it was.
#[test]
fn import_refuses_hostile_names() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::open(&t.path().join("reg")).unwrap();
    let outside = t.path().join("host-file");
    std::fs::write(&outside, vec![1u8; DISK as usize]).unwrap();
    let mem = vec![0u8; MEM as usize];
    let hostile_disks = [
        outside.display().to_string(),
        "/etc/passwd".to_string(),
        "../../host-file".to_string(),
        "..".to_string(),
        "sub/disk".to_string(),
        "disk\0x".to_string(),
        "memory".to_string(),
        "x".repeat(65),
    ];
    for disk in &hostile_disks {
        // The disk is named in the spec only (the files need not hold it for the id to check out).
        let mut sp = spec();
        sp.disks = vec![DiskSpec { name: disk.clone(), size_bytes: DISK }];
        let e = reg
            .import(&crafted_export(sp.clone(), &[("memory", mem.clone()), ("device-state", b"QEVM".to_vec())])[..])
            .unwrap_err();
        assert!(matches!(e, RegistryError::BadExport { offset: 12, .. }), "{disk:?}: {e}");
        assert!(e.to_string().contains("disk"), "{disk:?}: the error should name the field: {e}");
        // Also with the hostile name as a file of the export.
        let e = reg
            .import(
                &crafted_export(
                    sp,
                    &[
                        ("memory", mem.clone()),
                        ("device-state", b"QEVM".to_vec()),
                        (disk.as_str(), vec![1; DISK as usize]),
                    ],
                )[..],
            )
            .unwrap_err();
        assert!(matches!(e, RegistryError::BadExport { offset: 12, .. }), "{disk:?}: {e}");
        assert!(reg.list().unwrap().is_empty());
        assert_eq!(staging_entries(reg.root()), 0, "{disk:?}");
    }
    // A file the spec does not call for, and a memory image of the wrong size.
    let e = reg
        .import(
            &crafted_export(
                spec(),
                &[
                    ("memory", mem.clone()),
                    ("device-state", vec![1]),
                    ("disk0", vec![0; DISK as usize]),
                    ("extra", vec![1]),
                ],
            )[..],
        )
        .unwrap_err();
    assert!(e.to_string().contains("unexpected file 'extra'"), "{e}");
    let e = reg
        .import(
            &crafted_export(
                spec(),
                &[("memory", vec![0; 4096]), ("device-state", vec![1]), ("disk0", vec![0; DISK as usize])],
            )[..],
        )
        .unwrap_err();
    assert!(e.to_string().contains("memory image is 4096 bytes"), "{e}");
    // The same export with sane names imports.
    let ok = reg
        .import(&crafted_export(spec(), &[("memory", mem), ("device-state", vec![1]), ("disk0", vec![0; DISK as usize])])[..])
        .unwrap();
    assert!(reg.verify(&ok.id()).unwrap().is_ok());
    assert_eq!(std::fs::read(&outside).unwrap(), vec![1u8; DISK as usize], "the host file was touched");
}

/// An entry tampered with on disk (a disk replaced by a symlink to a host file, or a manifest
/// resealed with a hostile disk name) is refused when opened, naming what is wrong.
#[test]
fn opening_a_tampered_entry_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::open(&t.path().join("reg")).unwrap();
    let a = reg.register(new_base(&t.path().join("a"), "alpha", 1, Mode::Copy)).unwrap();
    let b = reg.register(new_base(&t.path().join("b"), "beta", 2, Mode::Copy)).unwrap();
    // A symlink in place of a disk.
    let outside = t.path().join("host-file");
    std::fs::write(&outside, vec![2u8; DISK as usize]).unwrap();
    std::fs::remove_file(a.dir.join("disk0")).unwrap();
    std::os::unix::fs::symlink(&outside, a.dir.join("disk0")).unwrap();
    let e = reg.get(&a.id()).unwrap_err();
    assert!(matches!(e, RegistryError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("'disk0' is a symlink"), "{e}");
    assert!(e.to_string().contains(&a.dir.display().to_string()), "the error should name the entry: {e}");
    assert!(matches!(reg.find("alpha"), Err(RegistryError::NotFound { .. })), "a tampered entry is not listed");
    // A resealed manifest whose disk leaves the directory.
    let mut m = b.manifest.clone();
    m.spec.disks[0].name = "../../../host-file".into();
    m.files.retain(|f| f.name != "disk0");
    let p = b.dir.join("manifest.json");
    let mut perm = std::fs::metadata(&p).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&p, perm).unwrap();
    std::fs::write(&p, serde_json::to_vec(&sealed(m)).unwrap()).unwrap();
    let e = reg.get(&b.id()).unwrap_err();
    assert!(e.to_string().contains("\"../../../host-file\" is not a valid name"), "{e}");
    assert!(reg.list().unwrap().is_empty());
}

/// `open_existing` creates nothing: a missing directory, a file, or a directory that is not a
/// registry is refused naming the path; an existing registry opens.
#[test]
fn open_existing_never_creates() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("no-such-registry");
    let e = Registry::open_existing(&missing).unwrap_err();
    assert!(matches!(e, RegistryError::NoRegistry { .. }), "{e}");
    assert!(e.to_string().contains(&missing.display().to_string()) && e.to_string().contains("does not exist"), "{e}");
    assert!(!missing.exists(), "open_existing created the directory");
    let plain = t.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let e = Registry::open_existing(&plain).unwrap_err();
    assert!(e.to_string().contains("no registry.json"), "{e}");
    assert_eq!(std::fs::read_dir(&plain).unwrap().count(), 0, "open_existing wrote into a plain directory");
    let file = t.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(Registry::open_existing(&file), Err(RegistryError::NoRegistry { .. })));
    let root = t.path().join("reg");
    let reg = Registry::open(&root).unwrap();
    reg.register(new_base(&t.path().join("a"), "alpha", 1, Mode::Copy)).unwrap();
    let again = Registry::open_existing(&root).unwrap();
    assert_eq!(again.root(), reg.root());
    assert_eq!(again.list().unwrap().len(), 1);
    std::fs::write(root.join("registry.json"), "{\"format\": 99}").unwrap();
    assert!(matches!(Registry::open_existing(&root), Err(RegistryError::NewerFormat { found: 99, .. })));
}

/// The snapshot record is stored typed, carried by export and import, checked on registration,
/// and absent (not even a key) from a manifest registered without one, as manifests written
/// before it existed are.
#[test]
fn the_snapshot_record_round_trips_and_is_checked() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::open(&t.path().join("reg")).unwrap();
    let record =
        SnapshotRecord { state_hash: "ab".repeat(32), free_page_reporting: false, display: true, guest_agent: true };
    let mut nb = new_base(&t.path().join("a"), "alpha", 1, Mode::Copy);
    nb.snapshot = Some(record.clone());
    let a = reg.register(nb).unwrap();
    assert_eq!(reg.find("alpha").unwrap().manifest.snapshot.as_ref(), Some(&record));
    let mut export = Vec::new();
    reg.export(&a.id(), &mut export).unwrap();
    let reg2 = Registry::open(&t.path().join("reg2")).unwrap();
    assert_eq!(reg2.import(&export[..]).unwrap().manifest.snapshot, Some(record.clone()));

    let b = reg.register(new_base(&t.path().join("b"), "beta", 2, Mode::Copy)).unwrap();
    let json = std::fs::read_to_string(b.dir.join("manifest.json")).unwrap();
    assert!(!json.contains("\"snapshot\""), "{json}");
    // Without a guest agent the record is written as before the field existed.
    let mut nb = new_base(&t.path().join("d"), "delta", 4, Mode::Copy);
    nb.snapshot = Some(SnapshotRecord { guest_agent: false, ..record.clone() });
    let d = reg.register(nb).unwrap();
    let json = std::fs::read_to_string(d.dir.join("manifest.json")).unwrap();
    assert!(json.contains("\"snapshot\"") && !json.contains("guest_agent"), "{json}");
    assert_eq!(reg.find("beta").unwrap().manifest.snapshot, None);

    let mut bad = new_base(&t.path().join("c"), "gamma", 3, Mode::Copy);
    bad.snapshot = Some(SnapshotRecord {
        state_hash: "not hex".into(),
        free_page_reporting: true,
        display: false,
        guest_agent: false,
    });
    let e = reg.register(bad).unwrap_err();
    assert!(e.to_string().contains("state_hash \"not hex\""), "{e}");
    assert!(reg.find("gamma").is_err());
}

/// A UEFI base keeps its firmware files (code and variables), which the id covers; they come
/// in pairs, and export and import carry them.
#[test]
fn firmware_files_are_registered_in_pairs() {
    let t = tempfile::tempdir().unwrap();
    let reg = Registry::open(&t.path().join("reg")).unwrap();
    let firmware = |dir: &Path, names: &[&str]| {
        let mut nb = new_base(dir, dir.file_name().unwrap().to_str().unwrap(), 5, Mode::Copy);
        for n in names {
            std::fs::write(dir.join(n), format!("{n} bytes")).unwrap();
            nb.files.push((n.to_string(), dir.join(n)));
        }
        nb
    };
    let plain = reg.register(new_base(&t.path().join("plain"), "plain", 5, Mode::Copy)).unwrap();
    let uefi = reg.register(firmware(&t.path().join("uefi"), &["firmware-code", "firmware-vars"])).unwrap();
    assert_ne!(plain.id(), uefi.id(), "the id covers the firmware");
    assert!(uefi.path("firmware-code").is_some() && uefi.path("firmware-vars").is_some());
    assert!(reg.verify(&uefi.id()).unwrap().is_ok());
    let mut export = Vec::new();
    reg.export(&uefi.id(), &mut export).unwrap();
    let reg2 = Registry::open(&t.path().join("reg2")).unwrap();
    let back = reg2.import(&export[..]).unwrap();
    assert_eq!(std::fs::read(back.path("firmware-vars").unwrap()).unwrap(), b"firmware-vars bytes");

    let e = reg.register(firmware(&t.path().join("half"), &["firmware-vars"])).unwrap_err();
    assert!(e.to_string().contains("firmware-code and firmware-vars, or neither"), "{e}");
}
