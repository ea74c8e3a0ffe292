//! Helpers shared by the CLI and server tests: the binary, the test guest, a base made through
//! the CLI, and a look at running processes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The `cloudlet` binary.
pub fn cloudlet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloudlet"))
}

/// `cloudlet --registry REGISTRY`.
pub fn cloudlet_in(registry: &Path) -> Command {
    let mut c = cloudlet();
    c.arg("--registry").arg(registry);
    c
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test guest, built if missing.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("CLOUDLET_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| root().join(".cache/guest"));
    if !dir.join("stamp").exists() {
        let st = Command::new(root().join("scripts/build-guest.sh")).stdout(Stdio::null()).status().unwrap();
        assert!(st.success(), "scripts/build-guest.sh failed");
    }
    dir
}

/// `cloudlet base` in `registry` with `args`, booting the test guest's kernel and initrd from
/// its `disk.raw`, to be run.
pub fn test_guest_base(registry: &Path, args: &[&str]) -> Command {
    let guest = guest_dir();
    let mut c = cloudlet_in(registry);
    c.arg("base").args(args).arg("--kernel").arg(guest.join("vmlinuz"));
    c.arg("--initrd").arg(guest.join("initrd.img")).arg(guest.join("disk.raw"));
    c
}

/// Registers the test guest as base `deb` in `registry` through `cloudlet base`.
pub fn make_base(registry: &Path) {
    let out = test_guest_base(registry, &["--name", "deb"]).output().unwrap();
    assert!(out.status.success(), "base: {}", String::from_utf8_lossy(&out.stderr));
}

/// `cloudlet synthesis --overlay OVERLAY --out VM --json ARGS...` through `cl`, which must
/// succeed; its JSON result.
pub fn synthesize_json(mut cl: Command, overlay: &Path, vm: &Path, args: &[&str]) -> serde_json::Value {
    let out = cl
        .args(["synthesis", "--overlay"])
        .arg(overlay)
        .arg("--out")
        .arg(vm)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "synthesis: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap()
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("cargo") {
                out.push(cmd);
            }
        }
    }
    out
}
