//! The `cloudlet` binary, run as a user would.

mod common;

use std::path::PathBuf;

use common::{cloudlet, cloudlet_in, guest_dir, make_base, processes_mentioning};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../overlay-format/tests/golden").join(name)
}

#[test]
fn overlay_info_reads_golden_files() {
    for name in [
        "v1-none.ovl",
        "v1-zstd.ovl",
        "v1-xz.ovl",
        "v1.1-zstd-chained.ovl",
        "v1.1-xz-chained.ovl",
        "v1.2-zstd-lanes.ovl",
        "v1.2-xz-lanes.ovl",
    ] {
        let out = cloudlet().arg("overlay-info").arg(golden(name)).arg("--verify").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("base id        4242424242"), "{stdout}");
        assert!(stdout.contains("verify         OK"), "{stdout}");
        assert!(stdout.contains("records        7"), "{stdout}");
        // The version is the file's, not the reader's.
        let (version, chained, lanes) = match &name[..4] {
            "v1.1" => ("v1.1", 2, 1),
            "v1.2" => ("v1.2", 2, 2),
            _ => ("v1.0", 0, 0),
        };
        assert!(stdout.contains(&format!("format         {version}\n")), "{stdout}");
        assert!(stdout.contains(&format!("blobs          2 ({chained} chained, in {lanes} lanes;")), "{stdout}");
    }
    let out = cloudlet().args(["overlay-info", "--json"]).arg(golden("v1-zstd.ovl")).output().unwrap();
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
    let out = cloudlet().arg("overlay-info").arg(&bad).arg("--verify").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED"));
    let truncated = dir.join("truncated.ovl");
    std::fs::write(&truncated, &bytes[..n / 2]).unwrap();
    let out = cloudlet().arg("overlay-info").arg(&truncated).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let missing = cloudlet().arg("overlay-info").arg(dir.join("nope.ovl")).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.ovl"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_flow_through_the_cli() {
    let work = tempfile::tempdir().unwrap();
    let guest = guest_dir();
    let g = |f: &str| guest.join(f);
    // A relative registry path (from the work dir) on purpose: entries must still resolve.
    let cl = || {
        let mut c = cloudlet();
        c.current_dir(work.path()).arg("--registry").arg("registry");
        c
    };
    let out = cl()
        .args(["base", "--name", "deb", "--kernel"])
        .arg(g("vmlinuz"))
        .arg("--initrd")
        .arg(g("initrd.img"))
        .arg(g("disk.raw"))
        .output()
        .unwrap();
    assert!(out.status.success(), "base: {}", String::from_utf8_lossy(&out.stderr));
    let list = cl().arg("list-base").output().unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(" deb "), "{text}");
    let verify = cl().args(["verify-base", "deb"]).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let ovl = work.path().join("app.overlay");
    let out = cl()
        .args(["overlay", "--base", "deb"])
        .args(["--customize", "mkdir -p /mnt/disk/app && echo flow-ok > /mnt/disk/app/index.html"])
        .args(["--customize", "httpd -p 8080 -h /mnt/disk/app"])
        .args(["-r", "tcp:0::8080", "--name", "flowapp", "--out"])
        .arg(&ovl)
        .output()
        .unwrap();
    assert!(out.status.success(), "overlay: {}", String::from_utf8_lossy(&out.stderr));
    let info = cloudlet().arg("overlay-info").arg(&ovl).arg("--verify").output().unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success() && text.contains("forwards       tcp:0:8080"), "{text}");
    let vm = work.path().join("vm");
    let out = cl()
        .args(["synthesis", "--overlay"])
        .arg(&ovl)
        .arg("--out")
        .arg(&vm)
        .args(["--probe", "8080", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "synthesis: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["app_answer"], "flow-ok", "{v}");
    assert!(v["timeline_ms"]["first_answer"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["ports"][0]["guest"], 8080);
    // Refuses to write over an existing VM directory, and a damaged overlay leaves nothing.
    let again = cl().args(["synthesis", "--overlay"]).arg(&ovl).arg("--out").arg(&vm).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    let mut bytes = std::fs::read(&ovl).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    let bad = work.path().join("bad.overlay");
    std::fs::write(&bad, bytes).unwrap();
    let vm2 = work.path().join("vm2");
    let out = cl().args(["synthesis", "--overlay"]).arg(&bad).arg("--out").arg(&vm2).output().unwrap();
    assert!(!out.status.success());
    assert!(!vm2.exists(), "a failed synthesis left {}", vm2.display());
    // Export to another registry; an overlay for a base this cloudlet lacks names the base.
    let exp = work.path().join("deb.base");
    assert!(cl().args(["export-base", "deb", "--out"]).arg(&exp).status().unwrap().success());
    let reg2 = work.path().join("registry2");
    let vm3 = work.path().join("vm3");
    let out = cloudlet()
        .arg("--registry")
        .arg(&reg2)
        .args(["synthesis", "--overlay"])
        .arg(&ovl)
        .arg("--out")
        .arg(&vm3)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("which is not in the registry"));
    assert!(cloudlet().arg("--registry").arg(&reg2).arg("import-base").arg(&exp).status().unwrap().success());
    let out = cloudlet()
        .arg("--registry")
        .arg(&reg2)
        .args(["synthesis", "--overlay"])
        .arg(&ovl)
        .arg("--out")
        .arg(&vm3)
        .args(["--probe", "8080"])
        .output()
        .unwrap();
    assert!(out.status.success(), "synthesis on the imported base: {}", String::from_utf8_lossy(&out.stderr));
    assert!(cl().args(["rm-base", "deb"]).status().unwrap().success());
    // No QEMU left running for this work dir.
    assert_eq!(processes_mentioning(&work.path().display().to_string()), Vec::<String>::new());
}

#[test]
fn interrupted_overlay_flow_leaves_nothing() {
    use std::io::BufRead;
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("registry");
    make_base(&reg);
    let ovl = work.path().join("app.overlay");
    let mut child = cloudlet()
        .arg("--registry")
        .arg(&reg)
        .args(["overlay", "--base", "deb", "--customize", "echo x > /mnt/disk/x", "--customize", "sleep 120", "--out"])
        .arg(&ovl)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("guest$ sleep 120") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "overlay ended before the customization");
    }
    // Ctrl-C while the guest is being customized.
    // SAFETY: kill(2) on our own child with a valid signal; no memory is touched.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("registry")], "left behind");
    assert_eq!(processes_mentioning(&work.path().display().to_string()), Vec::<String>::new());
    // The registry is intact.
    let list = cloudlet().arg("--registry").arg(&reg).arg("list-base").output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(" deb "));
}

#[test]
fn interactive_overlay_flow_through_the_serial_console() {
    use std::io::{BufRead, Read, Write};
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("registry");
    make_base(&reg);
    let cl = || cloudlet_in(&reg);
    let ovl = work.path().join("hand.overlay");
    let mut child = cl()
        .args(["overlay", "--base", "deb", "--interactive", "--wait-http", "80", "--forward", "tcp:0:80", "--out"])
        .arg(&ovl)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let socket = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "overlay ended before handing over the console");
        if let Some(p) = line.trim().strip_prefix("connect with: socat -,raw,echo=0 UNIX-CONNECT:") {
            break PathBuf::from(p);
        }
    };
    // A person at the console: edit the web page by hand.
    let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    s.write_all(b"echo by-hand > /mnt/disk/www/index.html && echo done-$((6*7))\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("done-42") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "console closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    overlay_succeeds_and_serves(child, err, &reg, &ovl, &work.path().join("vm"), "by-hand");
}

#[test]
fn interactive_overlay_flow_over_vnc_ends_when_the_viewer_closes() {
    use std::io::{BufRead, Read, Write};
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("registry");
    make_base(&reg);
    let cl = || cloudlet_in(&reg);
    // A base without a display device cannot be shown over VNC.
    let ovl = work.path().join("vnc.overlay");
    let out = cl().args(["overlay", "--base", "deb", "--vnc", "--out"]).arg(&ovl).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains("no display device"), "{stderr}");
    assert!(!ovl.exists());
    // A base made with a display (the person presses Enter at once).
    let guest = common::guest_dir();
    let mut base = cl()
        .args(["base", "--name", "screen", "--vnc", "--kernel"])
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initrd.img"))
        .arg(guest.join("disk.raw"))
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    base.stdin.take().unwrap().write_all(b"\n").unwrap();
    let out = base.wait_with_output().unwrap();
    assert!(out.status.success(), "base --vnc: {}", String::from_utf8_lossy(&out.stderr));
    let mut child = cl()
        .args(["overlay", "--base", "screen", "--vnc", "--customize", "echo on-screen > /mnt/disk/www/index.html"])
        .args(["--forward", "tcp:0:80", "--out"])
        .arg(&ovl)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stdin stays open and silent: only closing the viewer ends the step.
    let _stdin = child.stdin.take().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut said = String::new();
    let addr: std::net::SocketAddr = loop {
        said.push_str(&line);
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "overlay ended before showing the display: {said}");
        if let Some(rest) = line.split("VNC display at ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    assert!(addr.ip().is_loopback(), "{addr}");
    // A viewer: the RFB handshake up to the server's init message, then it closes.
    let mut v = std::net::TcpStream::connect(addr).unwrap();
    v.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut version = [0u8; 12];
    v.read_exact(&mut version).unwrap();
    assert!(version.starts_with(b"RFB 003."), "{:?}", String::from_utf8_lossy(&version));
    v.write_all(b"RFB 003.008\n").unwrap();
    let mut n = [0u8; 1];
    v.read_exact(&mut n).unwrap();
    let mut types = vec![0u8; n[0] as usize];
    v.read_exact(&mut types).unwrap();
    assert!(types.contains(&1), "security types {types:?}");
    v.write_all(&[1]).unwrap();
    let mut result = [0u8; 4];
    v.read_exact(&mut result).unwrap();
    assert_eq!(result, [0; 4]);
    v.write_all(&[1]).unwrap();
    let mut init = [0u8; 24];
    v.read_exact(&mut init).unwrap();
    let (w, h) = (u16::from_be_bytes([init[0], init[1]]), u16::from_be_bytes([init[2], init[3]]));
    assert!(w > 0 && h > 0, "screen {w}x{h}");
    std::thread::sleep(std::time::Duration::from_millis(600));
    drop(v);
    overlay_succeeds_and_serves(child, err, &reg, &ovl, &work.path().join("vm"), "on-screen");
}

/// Waits for an overlay run to succeed, synthesizes its overlay and checks the app's page.
fn overlay_succeeds_and_serves(
    mut child: std::process::Child,
    mut err: impl std::io::Read,
    reg: &std::path::Path,
    ovl: &std::path::Path,
    vm: &std::path::Path,
    page: &str,
) {
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "overlay: {rest}");
    let out = cloudlet_in(reg)
        .args(["synthesis", "--overlay"])
        .arg(ovl)
        .arg("--out")
        .arg(vm)
        .args(["--probe", "80"])
        .output();
    let out = out.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(&format!("the app answered: {page}")), "{stdout}");
}
