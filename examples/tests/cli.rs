//! The `cloudlet` binary, run as a user would.

use std::path::PathBuf;
use std::process::Command;

fn cloudlet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloudlet"))
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../overlay-format/tests/golden")
        .join(name)
}

#[test]
fn overlay_info_reads_golden_files() {
    for name in ["v1-none.ovl", "v1-zstd.ovl", "v1-xz.ovl"] {
        let out = cloudlet()
            .arg("overlay-info")
            .arg(golden(name))
            .arg("--verify")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("base id        4242424242"), "{stdout}");
        assert!(stdout.contains("verify         OK"), "{stdout}");
        assert!(stdout.contains("records        7"), "{stdout}");
    }
    let out = cloudlet()
        .args(["overlay-info", "--json"])
        .arg(golden("v1-zstd.ovl"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["compression"], "zstd");
    assert_eq!(v["raw"]["records"], 2);
    assert_eq!(v["error"], serde_json::Value::Null);
}

#[test]
fn overlay_info_exits_2_on_damage() {
    let dir = std::env::temp_dir().join(format!("cloudlet-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut bytes = std::fs::read(golden("v1-zstd.ovl")).unwrap();
    let n = bytes.len();
    bytes[n - 60] ^= 0x10;
    let bad = dir.join("damaged.ovl");
    std::fs::write(&bad, &bytes).unwrap();
    let out = cloudlet()
        .arg("overlay-info")
        .arg(&bad)
        .arg("--verify")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED"));
    let truncated = dir.join("truncated.ovl");
    std::fs::write(&truncated, &bytes[..n / 2]).unwrap();
    let out = cloudlet()
        .arg("overlay-info")
        .arg(&truncated)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let missing = cloudlet()
        .arg("overlay-info")
        .arg(dir.join("nope.ovl"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.ovl"));
    std::fs::remove_dir_all(&dir).unwrap();
}
