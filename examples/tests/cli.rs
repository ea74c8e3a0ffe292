//! The `cloudlet` binary, run as a user would.

mod common;

use std::path::PathBuf;

use common::{cloudlet, cloudlet_in, guest_dir, make_base, processes_mentioning, synthesize_json};

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
fn overlay_info_exits_3_on_damage() {
    let dir = std::env::temp_dir().join(format!("cloudlet-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut bytes = std::fs::read(golden("v1-zstd.ovl")).unwrap();
    let n = bytes.len();
    bytes[n - 60] ^= 0x10;
    let bad = dir.join("damaged.ovl");
    std::fs::write(&bad, &bytes).unwrap();
    let out = cloudlet().arg("overlay-info").arg(&bad).arg("--verify").output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("DAMAGED"));
    let truncated = dir.join("truncated.ovl");
    std::fs::write(&truncated, &bytes[..n / 2]).unwrap();
    let out = cloudlet().arg("overlay-info").arg(&truncated).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    // A file that is not an overlay: only the error, no table of empty fields.
    let text = dir.join("notes.txt");
    std::fs::write(&text, "just some notes, not an overlay\n").unwrap();
    let out = cloudlet().arg("overlay-info").arg(&text).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert!(stderr.contains("notes.txt: not an overlay"), "{stderr}");
    let missing = cloudlet().arg("overlay-info").arg(dir.join("nope.ovl")).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.ovl"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn exit_codes_are_one_table_in_help() {
    let help = cloudlet().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success());
    for line in [
        "0    done",
        "1    failed",
        "2    usage error",
        "3    damaged or invalid input",
        "4    refused by the server",
        "5    the server failed or is busy",
        "130  interrupted",
    ] {
        assert!(text.contains(line), "{line} missing from --help:\n{text}");
    }
    // The README shows the same table.
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    assert!(readme.contains(cloudlet_examples::exit::TABLE), "README's exit-code table differs from --help's");
    // Usage errors are clap's 2, and nothing else is 2.
    let out = cloudlet().arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Runs `cloudlet ARGS` (no VM needed: these fail on the command line) and returns (code, stderr).
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    base_registry::Registry::open(&dir.path().join("registry")).unwrap();
    let out = cloudlet_in(&dir.path().join("registry")).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn damaged_inputs_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.base");
    std::fs::write(&junk, "not an export at all\n".repeat(100)).unwrap();
    let (code, err) = refused(&["import-base", junk.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{err}");
    let ovl = dir.path().join("junk.overlay");
    std::fs::write(&ovl, "not an overlay\n".repeat(300)).unwrap();
    let out = dir.path().join("vm");
    let (code, err) = refused(&["synthesis", "--overlay", ovl.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(code == Some(3) && err.contains("not an overlay"), "{code:?} {err}");
    assert!(!out.exists());
}

#[test]
fn numeric_options_are_range_checked() {
    let ov = ["overlay", "--base", "deb", "--out", "x.overlay"];
    let with = |extra: &[&str]| refused(&[&ov[..], extra].concat());
    let (code, err) = with(&["--level", "99"]);
    assert!(code == Some(2) && err.contains("99") && err.contains("--level"), "{code:?} {err}");
    let (code, err) = with(&["--xz", "--level", "12"]);
    assert!(code == Some(2) && err.contains("--level 12 is out of range for xz (0..=9)"), "{code:?} {err}");
    let (code, err) = with(&["--level", "0"]);
    assert!(code == Some(2) && err.contains("out of range for zstd (1..=19)"), "{code:?} {err}");
    let (code, err) = refused(&["base", "--name", "b", "--kernel", "k", "--initrd", "i", "--ram-mib", "0", "d.raw"]);
    assert!(code == Some(2) && err.contains("--ram-mib"), "{code:?} {err}");
    let (code, err) = with(&["--wait-http", "8080", "--wait-timeout", "0"]);
    assert!(code == Some(2) && err.contains("--wait-timeout"), "{code:?} {err}");
    let (code, err) = with(&["--wait-http", "70000"]);
    assert!(code == Some(2) && err.contains("port is out of range"), "{code:?} {err}");
    let (code, err) = with(&["--expect-status", "200"]);
    assert!(code == Some(2) && err.contains("--wait-http"), "--expect-status alone: {code:?} {err}");
    let (code, err) = refused(&["synthesis", "--overlay", "x", "--out", "y", "--probe", "80", "--expect-status", "42"]);
    assert!(code == Some(2) && err.contains("--expect-status"), "{code:?} {err}");
    let (code, err) = refused(&["serve", "--max-vms", "0"]);
    assert!(code == Some(2) && err.contains("must be at least 1"), "{code:?} {err}");
    let (code, err) = refused(&["client", "--server", "http://127.0.0.1:9", "--check", "0"]);
    assert!(code == Some(2) && err.contains("--check"), "{code:?} {err}");
    let (code, err) = refused(&["client", "--discover", "--discover-timeout", "inf"]);
    assert!(code == Some(2) && err.contains("between 0.1 and 600"), "{code:?} {err}");
}

#[test]
fn forward_errors_say_what_is_wrong() {
    let ov = ["overlay", "--base", "deb", "--out", "x.overlay", "--forward"];
    for (spec, why) in [
        ("udp:5353:53", "udp forwards are not supported, only tcp"),
        ("tcp:70000:80", "host port '70000' is out of range"),
        ("tcp:8080", "expected tcp:HOST_PORT:GUEST_PORT"),
        ("tcp:8080:", "guest port '' is missing"),
        ("sctp:1:2", "unknown protocol 'sctp'"),
    ] {
        let (code, err) = refused(&[&ov[..], &[spec]].concat());
        assert!(code == Some(2) && err.contains(why), "{spec}: {code:?} {err}");
    }
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
    // A header, and the size on disk next to the apparent size (a sparse base: they differ).
    let header = text.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("ON DISK") && header.contains("APPARENT"), "{text}");
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_ne!(row[2..4], row[4..6], "on-disk and apparent sizes: {text}");
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
    // --registry says whether the overlay's base is there.
    let info = cl().arg("overlay-info").arg(&ovl).output().unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("base           present in the registry registry"), "{text}");
    let info =
        cloudlet().arg("--registry").arg(work.path().join("nowhere")).arg("overlay-info").arg(&ovl).output().unwrap();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("base           NOT in the registry"), "{text}");
    assert!(!work.path().join("nowhere").exists(), "overlay-info created a registry");
    let vm = work.path().join("vm");
    let v = synthesize_json(cl(), &ovl, &vm, &["--probe", "8080", "--keep"]);
    assert_eq!(v["app_answer"], "flow-ok", "{v}");
    assert!(v["timeline"]["first_answer"].as_f64().unwrap() > 0.0, "{v}");
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
    assert_eq!(out.status.code(), Some(3), "a damaged overlay: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!vm2.exists(), "a failed synthesis left {}", vm2.display());
    // Export to another registry; an overlay for a base this cloudlet lacks names the base.
    let exp = work.path().join("deb.base");
    // A user's `deb.partial` is not the export's work file.
    let user_partial = work.path().join("deb.partial");
    std::fs::write(&user_partial, "mine").unwrap();
    assert!(cl().args(["export-base", "deb", "--out"]).arg(&exp).status().unwrap().success());
    assert_eq!(std::fs::read_to_string(&user_partial).unwrap(), "mine");
    // An existing output is refused, and left as it was.
    let out = cl().args(["export-base", "deb", "--out"]).arg(&user_partial).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&user_partial).unwrap(), "mine");
    let hidden: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.file_name())
        .collect();
    assert!(hidden.is_empty(), "work files left behind: {hidden:?}");
    let reg2 = work.path().join("registry2");
    let vm3 = work.path().join("vm3");
    let synthesis_from_reg2 = || {
        let mut c = cloudlet();
        c.arg("--registry").arg(&reg2).args(["synthesis", "--overlay"]).arg(&ovl).arg("--out").arg(&vm3);
        c
    };
    let out = synthesis_from_reg2().output().unwrap();
    // A registry that does not exist is named, not created.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains("no base registry at"), "{stderr}");
    assert!(!reg2.exists(), "synthesis created the registry {}", reg2.display());
    // An existing registry without the base: the error names the missing base.
    base_registry::Registry::open(&reg2).unwrap();
    let out = synthesis_from_reg2().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("which is not in the registry"), "{stderr}");
    assert!(!vm3.exists());
    assert!(cloudlet().arg("--registry").arg(&reg2).arg("import-base").arg(&exp).status().unwrap().success());
    let out = synthesis_from_reg2().args(["--probe", "8080"]).output().unwrap();
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
    let mut base = common::test_guest_base(&reg, &["--name", "screen", "--vnc"])
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

/// What the directory holds besides `registry`, sorted.
fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "registry")
        .collect();
    v.sort();
    v
}

#[test]
fn overlay_and_synthesis_flow_spare_user_files_and_say_what_they_wait_for() {
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("registry");
    make_base(&reg);
    let cl = || cloudlet_in(&reg);
    // A user's own files where the old code put its work directory and partial file.
    let ovl = work.path().join("app.overlay");
    let user_work = work.path().join("app.work");
    std::fs::create_dir(&user_work).unwrap();
    std::fs::write(user_work.join("notes.txt"), "mine").unwrap();
    let user_partial = work.path().join("app.partial");
    std::fs::write(&user_partial, "my half-written essay").unwrap();
    let mine = || {
        assert_eq!(std::fs::read_to_string(user_work.join("notes.txt")).unwrap(), "mine");
        assert_eq!(std::fs::read_to_string(&user_partial).unwrap(), "my half-written essay");
    };
    // A failed run: nothing answers on 8081; the wait says what it waits for and what it saw.
    let out = cl()
        .args(["overlay", "--base", "deb", "--forward", "tcp:0:80", "--wait-http", "8081", "--wait-timeout", "3"])
        .arg("--out")
        .arg(&ovl)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("waiting up to 3 s for an HTTP answer on guest port 8081 (GET /)"), "{stderr}");
    assert!(stderr.contains("no HTTP answer from guest port 8081 (forwarded to 127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("within 3 s; the last attempt:"), "{stderr}");
    mine();
    assert_eq!(entries(work.path()), ["app.partial", "app.work"], "a failed overlay left files");
    // A 404 is an HTTP answer: accepted unless a status is asked for, and named when it is.
    let out = cl()
        .args(["overlay", "--base", "deb", "--forward", "tcp:0:80", "--wait-http", "80/missing"])
        .args(["--expect-status", "200", "--wait-timeout", "2", "--out"])
        .arg(&ovl)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("answers 404 Not Found on /missing, not 200, after 2 s"),
        "{stderr}"
    );
    let out = cl()
        .args(["overlay", "--base", "deb", "--forward", "tcp:0:80", "--wait-http", "80/missing", "--out"])
        .arg(&ovl)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("guest port 80 answers 404 Not Found on /missing"), "{stderr}");
    mine();
    assert_eq!(entries(work.path()), ["app.overlay", "app.partial", "app.work"]);

    // Probing a port the overlay does not forward: refused before any work.
    let vm = work.path().join("vm");
    let out =
        cl().args(["synthesis", "--probe", "8081", "--overlay"]).arg(&ovl).arg("--out").arg(&vm).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && stderr.contains("guest port 8081 is not forwarded by the overlay; it forwards guest port(s) 80"),
        "{stderr}"
    );
    assert!(!stderr.contains("rebuilding"), "refused only after rebuilding: {stderr}");
    assert!(!vm.exists());
    // Without --keep-running the VM is stopped and said to be; without --keep its directory goes.
    let out = cl().args(["synthesis", "--probe", "80", "--overlay"]).arg(&ovl).arg("--out").arg(&vm).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("VM stopped") && !stdout.contains("forward:"), "{stdout}");
    assert!(stdout.contains("the app answered: hello from the cloudlet base guest"), "{stdout}");
    assert!(!vm.exists(), "the VM directory was left behind");
    // --keep keeps it, and `run` starts it again (twice: it does not change the directory).
    let out = cl().args(["synthesis", "--keep", "--overlay"]).arg(&ovl).arg("--out").arg(&vm).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("start it again with `cloudlet run"), "{stdout}");
    for _ in 0..2 {
        let out = cloudlet().arg("run").arg(&vm).args(["--probe", "80/", "--expect-status", "200"]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "run: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("forward: 127.0.0.1:") && stdout.contains("-> guest :80"), "{stdout}");
        assert!(stdout.contains("the app answered: hello from the cloudlet base guest"), "{stdout}");
        assert!(stdout.contains("VM stopped"), "{stdout}");
    }
    let out = cloudlet().arg("run").arg(work.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains("no snapshot.json"), "{stderr}");
    mine();
    assert_eq!(processes_mentioning(&work.path().display().to_string()), Vec::<String>::new());
}

/// Commands that only read or remove refuse a registry path that does not exist, naming it,
/// and create nothing there; `overlay-info --registry` says the base is not in it.
#[test]
fn read_only_commands_do_not_create_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("mistyped-registry");
    let ovl = golden("v1-zstd.ovl");
    let export = dir.path().join("x.base");
    let vm = dir.path().join("vm");
    let cases: [&[&str]; 5] = [
        &["list-base"],
        &["verify-base", "deb"],
        &["rm-base", "deb"],
        &["export-base", "deb", "--out", export.to_str().unwrap()],
        &["synthesis", "--overlay", ovl.to_str().unwrap(), "--out", vm.to_str().unwrap()],
    ];
    for args in cases {
        let out = cloudlet_in(&missing).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&missing.display().to_string()) && err.contains("does not exist"),
            "{args:?}: the error should name the missing registry: {err}"
        );
        assert!(!missing.exists(), "{args:?} created the registry");
        assert!(!export.exists() && !vm.exists(), "{args:?} left a file");
    }
    // Also with the default registry from the environment.
    let out = cloudlet().env("CLOUDLET_REGISTRY", &missing).arg("list-base").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!missing.exists());
    let out = cloudlet_in(&missing).args(["overlay-info", ovl.to_str().unwrap(), "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["base_in_registry"], false, "{v}");
    assert!(!missing.exists(), "overlay-info created the registry");
}

/// A registry, an overlay and a VM directory whose names hold commas and spaces (QEMU's option
/// separator): base, overlay and synthesis work, the synthesized app answers, nothing is left
/// running.
#[test]
fn registry_and_vm_directories_with_commas_and_spaces() {
    let work = tempfile::tempdir().unwrap();
    let reg = work.path().join("reg, share=on,x y");
    make_base(&reg);
    let out_dir = work.path().join("vm, readonly=off,z w");
    std::fs::create_dir(&out_dir).unwrap();
    let ovl = out_dir.join("app, 1.overlay");
    let out = cloudlet_in(&reg)
        .args(["overlay", "--base", "deb"])
        .args(["--customize", "mkdir -p /mnt/disk/app && echo comma-ok > /mnt/disk/app/index.html"])
        .args(["--customize", "httpd -p 8080 -h /mnt/disk/app"])
        .args(["-r", "tcp:0::8080", "--out"])
        .arg(&ovl)
        .output()
        .unwrap();
    assert!(out.status.success(), "overlay: {}", String::from_utf8_lossy(&out.stderr));
    let vm = out_dir.join("vm, 2");
    let v = synthesize_json(cloudlet_in(&reg), &ovl, &vm, &["--probe", "8080"]);
    assert_eq!(v["app_answer"], "comma-ok", "{v}");
    assert_eq!(processes_mentioning(&work.path().display().to_string()), Vec::<String>::new());
}
