//! The synthesis server and client, run as processes against the real test guest.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cloudlet, make_base, processes_mentioning, root};

/// A `cloudlet serve` child; killed on drop if still running.
struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Served {
    fn start(cmd: &mut Command) -> Served {
        Served::from_child(cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap())
    }

    /// Reads the address from the child's first line on stdout, then keeps draining stdout.
    fn from_child(mut child: Child) -> Served {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("listening on http://")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = out.read_to_string(&mut sink);
        });
        Served { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGINT, as Ctrl-C, and wait for a clean exit.
    fn interrupt(mut self) {
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "server exited with {st}");
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "server did not stop on SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // A failed test still lets the server stop its VMs: SIGINT first, SIGKILL late.
        // SAFETY: as in `interrupt`.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP/1.1 request; returns status and body.
fn http(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn post_head(path: &str, len: u64, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len}\r\nConnection: close\r\n\r\n")
}

/// Base `deb` in `work/registry` and the overlay `work/app.overlay` of app `name`, made
/// through the CLI: the guest runs `customize`, and guest port 8080 is forwarded.
fn cli_overlay(work: &Path, name: &str, customize: &[&str]) -> (PathBuf, PathBuf) {
    let reg = work.join("registry");
    make_base(&reg);
    let ovl = work.join("app.overlay");
    let mut cmd = cloudlet();
    cmd.arg("--registry").arg(&reg).args(["overlay", "--base", "deb"]);
    for c in customize {
        cmd.args(["--customize", c]);
    }
    let out = cmd.args(["--forward", "tcp:0:8080", "--name", name, "--out"]).arg(&ovl).output().unwrap();
    assert!(out.status.success(), "overlay: {}", String::from_utf8_lossy(&out.stderr));
    (reg, ovl)
}

/// Base and overlay of a small web app that answers `served-ok` on guest port 8080.
fn make_overlay(work: &Path) -> (PathBuf, PathBuf) {
    cli_overlay(
        work,
        "served",
        &["mkdir -p /mnt/disk/app && echo served-ok > /mnt/disk/app/index.html", "httpd -p 8080 -h /mnt/disk/app"],
    )
}

#[test]
fn server_flow_concurrent_clients_and_bad_uploads() {
    let work = tempfile::tempdir().unwrap();
    let (reg, ovl) = make_overlay(work.path());
    let vms = work.path().join("vms");
    let token = "t0ken";
    let server = Served::start(
        cloudlet()
            .arg("--registry")
            .arg(&reg)
            .args(["serve", "--listen", "127.0.0.1:0", "--max-syntheses", "4", "--max-vms", "12"])
            .arg("--work")
            .arg(&vms)
            .env("CLOUDLET_TOKEN", token),
    );
    let url = server.url();
    let overlay = std::fs::read(&ovl).unwrap();

    // Health needs no token; the API does.
    let (st, body) = http(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"");
    assert_eq!(st, 200, "{body}");
    let (st, body) = http(server.addr, "GET /v1/bases HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"");
    assert_eq!(st, 401, "{body}");

    // Four clients at once: every VM runs and its app answers through its forward.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let mut c = cloudlet();
            c.args(["client", "--server", &url, "--probe", "8080", "--check", "8080", "--json", "--overlay"])
                .arg(&ovl)
                .env("CLOUDLET_TOKEN", token);
            std::thread::spawn(move || c.output().unwrap())
        })
        .collect();
    let mut ids = Vec::new();
    for c in clients {
        let out = c.join().unwrap();
        assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["app_answer"], "served-ok", "{v}");
        assert_eq!(v["name"], "served");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);

    // Garbage: 400, and the client exits 4 on a refused upload.
    let garbage: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let (st, body) = http(server.addr, &post_head("/v1/synthesis", garbage.len() as u64, Some(token)), &garbage);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("bad_overlay"), "{body}");
    // Truncated: 400 naming the truncation.
    let half = &overlay[..overlay.len() / 2];
    let (st, body) = http(server.addr, &post_head("/v1/synthesis", half.len() as u64, Some(token)), half);
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("truncated"), "{body}");
    // An overlay for a base this server lacks: 404 with the base id.
    let golden = std::fs::read(root().join("overlay-format/tests/golden/v1-zstd.ovl")).unwrap();
    let (st, body) = http(server.addr, &post_head("/v1/synthesis", golden.len() as u64, Some(token)), &golden);
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("\"base_id\":\"4242"), "{body}");
    let out = cloudlet()
        .args(["client", "--server", &url, "--overlay"])
        .arg(root().join("overlay-format/tests/golden/v1-zstd.ovl"))
        .env("CLOUDLET_TOKEN", token)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(cloudlet_examples::exit::REFUSED.into()),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not hold base 4242"));
    // Declared too large: 413 before any byte is read.
    let (st, body) = http(server.addr, &post_head("/v1/synthesis", 1 << 50, Some(token)), b"");
    assert_eq!(st, 413, "{body}");

    // Four uploads that stall half-way hold every synthesis slot: a fifth gets 429. Then they
    // disconnect mid-upload, which must leave nothing behind.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(post_head("/v1/synthesis", overlay.len() as u64, Some(token)).as_bytes()).unwrap();
        s.write_all(&overlay[..overlay.len() / 3]).unwrap();
        stalled.push(s);
    }
    let t0 = Instant::now();
    loop {
        let (_, body) = http(server.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["syntheses"] == 4 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "the stalled uploads never all started: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, body) = http(server.addr, &post_head("/v1/synthesis", overlay.len() as u64, Some(token)), &overlay);
    assert_eq!(st, 429, "{body}");
    assert!(body.contains("busy"), "{body}");
    drop(stalled);
    let t0 = Instant::now();
    loop {
        let partial: Vec<_> = std::fs::read_dir(&vms)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !ids.contains(n) && n != "server.pid")
            .collect();
        if partial.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "disconnected uploads left {partial:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The VMs list, and one stops through the client.
    let (st, body) = http(
        server.addr,
        &format!("GET /v1/vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
        b"",
    );
    assert_eq!(st, 200);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.len(), ids.len());
    let out =
        cloudlet().args(["client", "--server", &url, "--stop", &ids[0]]).env("CLOUDLET_TOKEN", token).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!vms.join(&ids[0]).exists());
    let out =
        cloudlet().args(["client", "--server", &url, "--stop", &ids[0]]).env("CLOUDLET_TOKEN", token).output().unwrap();
    assert_eq!(out.status.code(), Some(cloudlet_examples::exit::REFUSED.into()));

    // Ctrl-C stops every VM and removes its files.
    let vms_s = vms.display().to_string();
    assert!(!processes_mentioning(&vms_s).is_empty());
    server.interrupt();
    assert_eq!(processes_mentioning(&vms_s), Vec::<String>::new());
    let left: Vec<_> = std::fs::read_dir(&vms).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0]).args(&args[1..]).status().map(|s| s.success()).unwrap_or(false)
}

/// Two network namespaces joined by a veth pair; removed on drop.
struct NetPair {
    a: String,
    b: String,
}

impl NetPair {
    fn new() -> Option<NetPair> {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("cla{id}"), format!("clb{id}"));
        if !sh(&["ip", "netns", "add", &a]) {
            return None;
        }
        let pair = NetPair { a: a.clone(), b: b.clone() };
        let (va, vb) = (format!("cva{id}"), format!("cvb{id}"));
        let ok = sh(&["ip", "netns", "add", &b])
            && sh(&["ip", "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b])
            && sh(&["ip", "-n", &a, "addr", "add", "10.231.7.1/24", "dev", &va])
            && sh(&["ip", "-n", &b, "addr", "add", "10.231.7.2/24", "dev", &vb])
            && sh(&["ip", "-n", &a, "link", "set", &va, "up", "multicast", "on"])
            && sh(&["ip", "-n", &b, "link", "set", &vb, "up", "multicast", "on"])
            && sh(&["ip", "-n", &a, "link", "set", "lo", "up"])
            && sh(&["ip", "-n", &b, "link", "set", "lo", "up"]);
        assert!(ok, "setting up the network namespaces failed");
        Some(pair)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        sh(&["ip", "netns", "del", &self.a]);
        sh(&["ip", "netns", "del", &self.b]);
    }
}

#[test]
fn discovery_in_network_namespaces() {
    // Needs root and iproute2 (scripts/setup-host.sh installs it); traffic stays inside the
    // two namespaces this test creates.
    let Some(net) = NetPair::new() else {
        if std::env::var_os("CI").is_some() {
            panic!("cannot create network namespaces in CI");
        }
        eprintln!("skipped: cannot create network namespaces here (needs root and iproute2)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_cloudlet");
    let server =
        Served::start(
            Command::new("ip")
                .args(["netns", "exec", &net.a, bin, "--registry"])
                .arg(work.path().join("registry"))
                .args(["serve", "--listen", "10.231.7.1:0", "--insecure", "--advertise", "test-cloudlet"]),
        );
    assert_eq!(server.addr.ip().to_string(), "10.231.7.1");
    // The client finds the server and reaches it across the namespaces (the first answer can
    // take a few seconds while the new advertisement settles).
    let out = Command::new("ip")
        .args(["netns", "exec", &net.b, bin, "client", "--discover", "--discover-timeout", "20", "--stop", "vm-none"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(cloudlet_examples::exit::REFUSED.into()),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM vm-none"));
    // Listing: every server that answers within the timeout.
    let out = Command::new("ip")
        .args(["netns", "exec", &net.b, bin, "client", "--discover", "--discover-timeout", "3", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "discover: {}", String::from_utf8_lossy(&out.stderr));
    let found: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let me = found.iter().find(|f| f["instance"] == "test-cloudlet").unwrap_or_else(|| panic!("not found: {found:?}"));
    assert_eq!(me["url"], format!("http://{}", server.addr));
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    server.interrupt();
    drop(net);
}

/// Pseudo-random bytes (xorshift): they do not compress.
fn noise(len: usize, mut x: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A base registered from made-up images (it cannot resume: it serves the tests where the
/// server answers before any VM starts), and the real writer for overlays of it.
struct FakeBase {
    registry: PathBuf,
    base: synthesis::RegisteredBase,
    spec: overlay_format::VmSpec,
    scratch: PathBuf,
}

impl FakeBase {
    const RAM: u64 = 8 << 20;

    fn new(dir: &Path) -> FakeBase {
        use overlay_format::{DiskSpec, VmSpec};
        let files = dir.join("fake-files");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("memory"), noise(Self::RAM as usize, 1)).unwrap();
        std::fs::write(files.join("disk0"), noise(1 << 20, 2)).unwrap();
        std::fs::write(files.join("device-state"), b"made-up device state").unwrap();
        let spec = VmSpec {
            machine_type: "pc-q35-10.0".into(),
            cpu_model: "qemu64".into(),
            vcpus: 1,
            ram_bytes: Self::RAM,
            qemu_version: "10.0.2".into(),
            accelerator: "tcg".into(),
            disks: vec![DiskSpec { name: "disk0".into(), size_bytes: 1 << 20 }],
            kernel_cmdline: None,
        };
        let registry = dir.join("fake-registry");
        let reg = base_registry::Registry::open(&registry).unwrap();
        let entry = reg
            .register(base_registry::NewBase {
                name: "fake".into(),
                source_image: None,
                spec: spec.clone(),
                files: ["memory", "disk0", "device-state"].iter().map(|n| (n.to_string(), files.join(n))).collect(),
                mode: base_registry::Mode::Move,
                labels: [("state_hash".to_string(), "0".repeat(64))].into(),
                snapshot: None,
            })
            .unwrap();
        let base = synthesis::RegisteredBase::from_entry(entry).unwrap();
        FakeBase { registry, base, spec, scratch: dir.join("fake-scratch") }
    }

    /// An overlay whose memory differs from the base's in its first `changed` bytes (noise),
    /// claiming `spec`.
    fn overlay(&self, spec: &overlay_format::VmSpec, changed: usize) -> Vec<u8> {
        use delta_engine::{CustomImage, CustomSource};
        std::fs::create_dir_all(&self.scratch).unwrap();
        let mut mem = std::fs::read(self.base.entry.memory_path()).unwrap();
        mem[..changed].copy_from_slice(&noise(changed, 99));
        mem.resize(spec.ram_bytes as usize, 0);
        let m = self.scratch.join("memory");
        std::fs::write(&m, &mem).unwrap();
        let d = self.scratch.join("disk0");
        std::fs::copy(self.base.entry.dir.join("disk0"), &d).unwrap();
        let info = delta_engine::OverlayInfo {
            base_id: self.base.id(),
            spec: spec.clone(),
            forwards: vec![overlay_format::PortForward {
                protocol: overlay_format::Protocol::Tcp,
                host_port: 0,
                guest_port: 8080,
            }],
            name: "fake-app".into(),
            creator: "test".into(),
            created_unix: 0,
        };
        let (out, _) = delta_engine::create_overlay(
            &self.base.engine_base().unwrap(),
            &[
                CustomImage { name: "memory".into(), source: CustomSource::Raw(m) },
                CustomImage { name: "disk0".into(), source: CustomSource::Raw(d) },
            ],
            &info,
            b"custom device state",
            &delta_engine::CreateOptions::default(),
            &|_| {},
            Vec::new(),
        )
        .unwrap();
        std::fs::remove_dir_all(&self.scratch).unwrap();
        out
    }
}

fn healthz(addr: SocketAddr) -> serde_json::Value {
    let (st, body) = http(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"");
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until the server runs `n` syntheses.
fn wait_syntheses(addr: SocketAddr, n: u64) {
    let t0 = Instant::now();
    loop {
        let v = healthz(addr);
        if v["syntheses"] == n {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "waited 20 s for {n} syntheses at once: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Entries of a directory.
fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits until `dir` holds nothing but the server's pid file.
fn wait_empty(dir: &Path, what: &str, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let left: Vec<_> = entries(dir).into_iter().filter(|n| n != "server.pid").collect();
        if left.is_empty() {
            return;
        }
        assert!(t0.elapsed() < limit, "after {what}, {} still holds {left:?}", dir.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn clients_hear_a_busy_or_refusing_server() {
    let work = tempfile::tempdir().unwrap();
    let fake = FakeBase::new(work.path());
    // 6 MiB of noise: more than the socket buffers hold, so a client that writes the whole
    // body before reading breaks its pipe when the server answers early.
    let app = work.path().join("app.overlay");
    std::fs::write(&app, fake.overlay(&fake.spec, 6 << 20)).unwrap();
    // The same overlay, 9 MiB long: over this server's 8 MiB limit.
    let big = work.path().join("big.overlay");
    let mut b = std::fs::read(&app).unwrap();
    b.resize(9 << 20, 0);
    std::fs::write(&big, b).unwrap();
    // An overlay for another RAM size than its base's.
    let hostile = work.path().join("hostile.overlay");
    let spec = overlay_format::VmSpec { ram_bytes: 2 * FakeBase::RAM, ..fake.spec.clone() };
    std::fs::write(&hostile, fake.overlay(&spec, 4096)).unwrap();

    let vms = work.path().join("vms");
    let token = "t0ken";
    let server = Served::start(
        cloudlet()
            .arg("--registry")
            .arg(&fake.registry)
            .args(["serve", "--listen", "127.0.0.1:0", "--max-overlay-mib", "8"])
            .arg("--work")
            .arg(&vms)
            .env("CLOUDLET_TOKEN", token),
    );
    // host:port without http:// is taken as http://host:port.
    let server_arg = server.addr.to_string();
    let client = |overlay: &Path| {
        let mut c = cloudlet();
        c.args(["client", "--server", &server_arg, "--overlay"]).arg(overlay).env("CLOUDLET_TOKEN", token);
        c
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Too large: 413, exit 2.
    let out = client(&big).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("413 (too_large)"), "{}", stderr(&out));
    // Without the token: 401, exit 2.
    let out = client(&app).env_remove("CLOUDLET_TOKEN").output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("401 (unauthorized)"), "{}", stderr(&out));
    // A spec that is not the base's: 400 naming the field and both values, exit 4.
    let out = client(&hostile).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("400 (bad_overlay)") && e.contains("ram_bytes is 16777216, but its base's is 8388608"), "{e}");
    assert_eq!(entries(&vms), vec!["server.pid".to_string()], "a refused upload left files");

    // Two uploads that stall in the header hold both synthesis slots (the default 2).
    let overlay = std::fs::read(&app).unwrap();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(post_head("/v1/synthesis", overlay.len() as u64, Some(token)).as_bytes()).unwrap();
        s.write_all(&overlay[..10]).unwrap();
        stalled.push(s);
    }
    wait_syntheses(server.addr, 2);
    // Eight clients at once: every one hears 429 busy and exits 3; none sees a broken pipe.
    let busy: Vec<_> =
        (0..8).map(|_| client(&app).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()).collect();
    for c in busy {
        let out = c.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
        assert!(stderr(&out).contains("429 (busy)"), "{}", stderr(&out));
        assert!(!stderr(&out).contains("Broken pipe"), "{}", stderr(&out));
    }
    // With --retry, a client waits for a slot: it hears busy, a slot frees, and its upload
    // goes through (here to be refused for its spec).
    let mut retrying =
        client(&hostile).args(["--retry", "5"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = BufReader::new(retrying.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("the server is busy; trying again in 2 s (1 of 5)"), "{line}");
    drop(stalled);
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let st = retrying.wait().unwrap();
    assert_eq!(st.code(), Some(4), "{line}{rest}");
    assert!(rest.contains("400 (bad_overlay)"), "{line}{rest}");
    wait_empty(&vms, "busy, refused and disconnected uploads", Duration::from_secs(30));
    server.interrupt();
}

/// A `cloudlet serve` child whose stderr is collected.
fn start_collecting(cmd: &mut Command) -> (Served, std::sync::Arc<std::sync::Mutex<String>>) {
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("server: {line}");
            let mut g = l.lock().unwrap();
            g.push_str(&line);
            g.push('\n');
        }
    });
    (Served::from_child(child), log)
}

#[test]
fn server_flow_recovers_after_sigkill() {
    let work = tempfile::tempdir().unwrap();
    let (reg, ovl) = make_overlay(work.path());
    let vms = work.path().join("vms");
    let serve = || {
        let mut c = cloudlet();
        c.arg("--registry").arg(&reg).args(["serve", "--listen", "127.0.0.1:0"]).arg("--work").arg(&vms);
        c
    };
    let (mut first, _) = start_collecting(&mut serve());
    let first_pid = first.child.id();
    // One VM runs; a second upload stalls a third of the way (its VM directory half written).
    let out = cloudlet().args(["client", "--server", &first.url(), "--json", "--overlay"]).arg(&ovl).output().unwrap();
    assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
    let overlay = std::fs::read(&ovl).unwrap();
    let mut stalled = TcpStream::connect(first.addr).unwrap();
    stalled.write_all(post_head("/v1/synthesis", overlay.len() as u64, None).as_bytes()).unwrap();
    stalled.write_all(&overlay[..overlay.len() / 3]).unwrap();
    let t0 = Instant::now();
    while entries(&vms).iter().filter(|n| n.starts_with("vm-")).count() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(30), "waited 30 s for the stalled upload's VM directory");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGKILL: the server cannot clean anything.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(stalled);
    let vms_s = format!("{}/vm-", vms.canonicalize().unwrap().display());
    assert_eq!(processes_mentioning(&vms_s).len(), 1, "the running VM's QEMU should outlive its server");
    assert_eq!(entries(&vms).iter().filter(|n| n.starts_with("vm-")).count(), 2);

    // The next server on that work directory kills that QEMU, removes both VM directories
    // and the dead server's QEMU runtime directory, and says so.
    let (second, log) = start_collecting(&mut serve());
    let t0 = Instant::now();
    let line = loop {
        if let Some(l) = log.lock().unwrap().lines().find(|l| l.starts_with("recovered")).map(String::from) {
            break l;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no recovery line in {:?}", log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(line.contains(&format!("(pid {first_pid})")), "{line}");
    assert!(line.contains("killed 1 QEMU process(es)") && line.contains("removed 2 VM director(ies)"), "{line}");
    assert_eq!(processes_mentioning(&vms_s), Vec::<String>::new());
    assert_eq!(entries(&vms), vec!["server.pid".to_string()]);
    let runtime = format!("cloudlet-vm-{first_pid}-");
    assert!(
        !entries(Path::new("/dev/shm")).iter().chain(&entries(&std::env::temp_dir())).any(|n| n.starts_with(&runtime)),
        "a runtime directory {runtime}* is left"
    );
    // The work directory of a live server is refused to a third one.
    let mut third = serve().stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let t0 = Instant::now();
    while third.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = third.kill();
            panic!("a second server ran on the work directory of a live one");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = third.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the work directory of a running server"));
    second.interrupt();
    assert!(entries(&vms).is_empty(), "left: {:?}", entries(&vms));
}

/// The kind of overlay seen in the wild: a real overlay's header and metadata with the memory
/// image declared 8 TiB, cut off after the device state.
fn declared_8_tib(real: &[u8]) -> Vec<u8> {
    let reader = overlay_format::OverlayReader::new(real).unwrap();
    let mut meta = reader.meta().clone();
    let mem = meta.images.iter_mut().find(|i| i.name == "memory").unwrap();
    mem.size = 8 << 40;
    // The spec agrees (the writer refuses metadata that contradicts itself): the refusal is
    // the server's, against the base's spec, before any byte of it is allocated.
    meta.spec.ram_bytes = 8 << 40;
    // Not finished: the bytes so far, as a cut-off upload.
    let mut out = Vec::new();
    let mut w = overlay_format::OverlayWriter::new(&mut out, &meta).unwrap();
    w.write_device_state(b"device state", 3).unwrap();
    drop(w);
    out
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `RssAnon`...).
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A request with a timeout; status 0 when there was no complete answer, with what went wrong
/// in place of the body.
fn try_http(addr: SocketAddr, head: &str, body: &[u8], timeout: Duration) -> (u16, String) {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => return (0, format!("no connection: {e}")),
    };
    let _ = s.set_read_timeout(Some(timeout));
    // A server may answer (and close) before the whole body is sent: a write error is not the
    // outcome, the answer is.
    let written = s.write_all(head.as_bytes()).and_then(|()| s.write_all(body));
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    match out.split_whitespace().nth(1).and_then(|c| c.parse().ok()) {
        Some(status) => (status, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()),
        None => (0, format!("no answer (write: {written:?}, read: {read:?}, {} bytes: {out:?})", out.len())),
    }
}

#[test]
fn server_flow_soak_with_hostile_uploads() {
    let secs: u64 = std::env::var("CLOUDLET_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let work = tempfile::tempdir().unwrap();
    let (reg, ovl) = make_overlay(work.path());
    let overlay = Arc::new(std::fs::read(&ovl).unwrap());
    let hostile = Arc::new(declared_8_tib(&overlay));
    let vms = work.path().join("vms");
    let server = Served::start(
        cloudlet()
            .arg("--registry")
            .arg(&reg)
            .args(["serve", "--listen", "127.0.0.1:0", "--max-overlay-mib", "64", "--max-syntheses", "6"])
            .args(["--max-vms", "16", "--work"])
            .arg(&vms),
    );
    let (addr, pid) = (server.addr, server.child.id());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let post = |len: u64| post_head("/v1/synthesis", len, None);
    // Every client records what went wrong, when, and stops; the others stop too. Nothing
    // panics while the server runs, so the first failure is the one reported, not what a
    // server stopped by the unwinding did to the other clients.
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let fail = {
        let failures = failures.clone();
        move |who: &str, what: String| {
            failures.lock().unwrap().push(format!("{who} at {:.1} s: {what}", start.elapsed().as_secs_f64()))
        }
    };
    let go = {
        let failures = failures.clone();
        move || Instant::now() < deadline && failures.lock().unwrap().is_empty()
    };
    let stop_vm = move |id: &str| {
        let head = format!("DELETE /v1/vms/{id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        match try_http(addr, &head, b"", Duration::from_secs(60)) {
            (200, _) => Ok(()),
            (st, body) => Err(format!("stopping {id} got {st}: {body}")),
        }
    };
    let created_id = |body: &str| -> Result<String, String> {
        let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("201 with {body:?}: {e}"))?;
        v["id"].as_str().map(str::to_string).ok_or(format!("201 without an id: {body}"))
    };

    // Four valid uploads at a time, each VM stopped again once it runs.
    let valid: Vec<_> = (0..4)
        .map(|i| {
            let (overlay, fail, go) = (overlay.clone(), fail.clone(), go.clone());
            std::thread::spawn(move || {
                let mut ok = 0;
                while go() {
                    let r = match try_http(addr, &post(overlay.len() as u64), &overlay, Duration::from_secs(300)) {
                        (201, body) => created_id(&body).and_then(|id| stop_vm(&id)).map(|()| ok += 1),
                        (429, _) => {
                            std::thread::sleep(Duration::from_millis(200));
                            Ok(())
                        }
                        (st, body) => Err(format!("a valid upload got {st}: {body}")),
                    };
                    if let Err(e) = r {
                        fail(&format!("valid client {i}"), e);
                    }
                }
                ok
            })
        })
        .collect();

    // Hostile uploads, one kind after another, each with the answer it must get (or 429).
    let hostile_thread = {
        let (overlay, hostile, fail, go) = (overlay.clone(), hostile.clone(), fail.clone(), go.clone());
        std::thread::spawn(move || {
            let mut counts = std::collections::BTreeMap::<&str, usize>::new();
            let garbage: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
            let mut kind = 0;
            while go() {
                let t = Duration::from_secs(120);
                let (name, st, want, body): (&str, u16, u16, String) = match kind % 6 {
                    0 => {
                        let (st, b) = try_http(addr, &post(garbage.len() as u64), &garbage, t);
                        ("garbage", st, 400, b)
                    }
                    1 => {
                        let half = &overlay[..overlay.len() / 2];
                        let (st, b) = try_http(addr, &post(half.len() as u64), half, t);
                        ("truncated", st, 400, b)
                    }
                    2 => {
                        let (st, b) = try_http(addr, &post(1 << 40), b"", t);
                        ("oversized", st, 413, b)
                    }
                    3 => {
                        let (st, b) = try_http(addr, &post(hostile.len() as u64), &hostile, t);
                        ("declared 8 TiB memory", st, 400, b)
                    }
                    4 => {
                        // Stalls mid-body, then sends the rest: a slow client is served.
                        let mut s = TcpStream::connect(addr).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
                        s.write_all(post(overlay.len() as u64).as_bytes()).unwrap();
                        let cut = overlay.len() / 2;
                        s.write_all(&overlay[..cut]).unwrap();
                        std::thread::sleep(Duration::from_secs(3));
                        let _ = s.write_all(&overlay[cut..]);
                        let mut out = Vec::new();
                        let _ = s.read_to_end(&mut out);
                        let out = String::from_utf8_lossy(&out);
                        let st = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                        let b = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
                        if st == 201 {
                            if let Err(e) = created_id(&b).and_then(|id| stop_vm(&id)) {
                                fail("hostile client (slow)", e);
                            }
                        }
                        ("slow", st, 201, b)
                    }
                    _ => {
                        // Disconnects a third of the way: no answer to check, nothing may stay.
                        let mut s = TcpStream::connect(addr).unwrap();
                        s.write_all(post(overlay.len() as u64).as_bytes()).unwrap();
                        s.write_all(&overlay[..overlay.len() / 3]).unwrap();
                        std::thread::sleep(Duration::from_millis(300));
                        drop(s);
                        ("disconnected", 0, 0, String::new())
                    }
                };
                if st != want && st != 429 {
                    fail("hostile client", format!("{name} upload got {st}, not {want}: {body}"));
                }
                *counts.entry(name).or_default() += 1;
                kind += 1;
            }
            counts
        })
    };

    // The server answers /healthz throughout, and its RSS stays bounded.
    // VmRSS counts the base images the engine maps (file pages, once per mapping); RssAnon is
    // the server's own memory, which must not grow with the number of requests.
    let (mut max_rss, mut max_anon, mut anon_first_half) = (0, 0, 0);
    let mut slowest_health = Duration::ZERO;
    let half = start + Duration::from_secs(secs / 2);
    while go() {
        let t0 = Instant::now();
        let (st, body) = try_http(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"",
            Duration::from_secs(10),
        );
        slowest_health = slowest_health.max(t0.elapsed());
        if st != 200 {
            fail("health check", format!("/healthz got {st}: {body}"));
        }
        max_rss = max_rss.max(status_kib(pid, "VmRSS"));
        max_anon = max_anon.max(status_kib(pid, "RssAnon"));
        if Instant::now() < half {
            anon_first_half = max_anon;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let synthesized: usize = valid.into_iter().map(|t| t.join().unwrap()).sum();
    let counts = hostile_thread.join().unwrap();
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(failures.is_empty(), "the soak failed:\n{}", failures.join("\n"));
    eprintln!(
        "soak {secs} s: {synthesized} valid syntheses, hostile {counts:?}, slowest /healthz {slowest_health:?}, \
         server peak VmRSS {max_rss} KiB, RssAnon {max_anon} KiB ({anon_first_half} KiB in the first half)"
    );
    assert!(synthesized > 0, "no valid upload went through");
    assert!(counts.len() == 6, "not every hostile kind ran: {counts:?}");
    assert!(max_anon < 512 << 10, "the server's anonymous RSS reached {max_anon} KiB");
    assert!(
        max_anon < anon_first_half + (128 << 10),
        "the server's anonymous RSS grew from {anon_first_half} KiB in the first half to {max_anon} KiB"
    );

    // Afterwards nothing of it remains: no QEMU, no VM directory, no runtime or temp file.
    wait_empty(&vms, "the soak's shutdown", Duration::from_secs(60));
    let vms_s = vms.display().to_string();
    server.interrupt();
    assert_eq!(processes_mentioning(&vms_s), Vec::<String>::new());
    assert!(entries(&vms).is_empty(), "left: {:?}", entries(&vms));
    let runtime = format!("cloudlet-vm-{pid}-");
    assert!(
        !entries(Path::new("/dev/shm")).iter().chain(&entries(&std::env::temp_dir())).any(|n| n.starts_with(&runtime)),
        "a runtime directory {runtime}* is left"
    );
}

/// A child process, killed with SIGTERM (its VMs stopped) should the test fail first.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: as in `Served::interrupt`.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

/// `GET path` through a forward on 127.0.0.1:`port`: the status and body. (A CGI's own headers end its answer's head with a bare `\n\n`.)
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let out = out.replace("\r\n", "\n");
    (status, out.split_once("\n\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The host port of guest port 8080 in a VM's JSON (`cloudlet client` or `cloudlet synthesis`).
fn port_8080(v: &serde_json::Value) -> u16 {
    v["ports"].as_array().unwrap().iter().find(|p| p["guest"] == 8080).unwrap()["host"].as_u64().unwrap() as u16
}

/// Base `deb` in `work/registry` and the overlay `work/app.overlay` of an app that counts its
/// requests in RAM (/tmp is a tmpfs) and logs each on disk: `GET /cgi-bin/bump` on guest port
/// 8080 answers `ram N disk N`.
fn counter_overlay(work: &Path) -> (PathBuf, PathBuf) {
    let cgi = "#!/bin/sh\\necho Content-Type: text/plain\\necho\\nn=$(cat /tmp/n 2>/dev/null || echo 0)\\n\
               n=$((n+1))\\necho $n > /tmp/n\\necho $n >> /mnt/disk/app/log\\nsync\\n\
               echo \"ram $n disk $(wc -l < /mnt/disk/app/log)\"\\n";
    let write = format!("printf '{cgi}' > /mnt/disk/app/cgi-bin/bump");
    cli_overlay(
        work,
        "counter",
        &[
            "mkdir -p /mnt/disk/app/cgi-bin",
            &write,
            "chmod +x /mnt/disk/app/cgi-bin/bump && httpd -p 8080 -h /mnt/disk/app",
        ],
    )
}

#[test]
fn residue_moves_a_vm_with_its_ram_and_disk_state() {
    let work = tempfile::tempdir().unwrap();
    let (reg, ovl) = counter_overlay(work.path());
    let server = Served::start(
        cloudlet()
            .arg("--registry")
            .arg(&reg)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--work")
            .arg(work.path().join("vms")),
    );
    let url = server.url();
    let out = cloudlet()
        .args(["client", "--server", &url, "--probe", "8080", "--json", "--overlay"])
        .arg(&ovl)
        .output()
        .unwrap();
    assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
    let vm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, port) = (vm["id"].as_str().unwrap().to_string(), port_8080(&vm));
    for n in 1..=3 {
        assert_eq!(get(port, "/cgi-bin/bump"), (200, format!("ram {n} disk {n}\n")));
    }

    // The residue, through the server; the VM runs on.
    let r1 = work.path().join("r1.overlay");
    let out = cloudlet().args(["residue", "--server", &url, "--vm", &id, "--json", "--out"]).arg(&r1).output().unwrap();
    assert!(out.status.success(), "residue: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bytes"].as_u64(), Some(std::fs::metadata(&r1).unwrap().len()), "{v}");
    assert!(v["paused_ms"].as_u64().is_some(), "{v}");
    assert_eq!(get(port, "/cgi-bin/bump"), (200, "ram 4 disk 4\n".into()));
    // Refusals: a VM the server lacks (exit 4), an --out that exists (untouched).
    let out = cloudlet()
        .args(["residue", "--server", &url, "--vm", "vm-000000000000", "--out"])
        .arg(work.path().join("x"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(cloudlet_examples::exit::REFUSED.into()),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!work.path().join("x").exists());
    let out = cloudlet().args(["residue", "--server", &url, "--vm", &id, "--out"]).arg(&ovl).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"), "{}", String::from_utf8_lossy(&out.stderr));

    // Synthesized the ordinary way, the residue resumes the VM as it was at the capture: its
    // count in RAM and its log on disk. Its own residue, taken on Enter, goes on from there.
    let r2 = work.path().join("r2.overlay");
    let mut child = cloudlet()
        .arg("--registry")
        .arg(&reg)
        .args(["synthesis", "--probe", "8080", "--keep-running", "--json", "--overlay"])
        .arg(&r1)
        .arg("--out")
        .arg(work.path().join("vm2"))
        .arg("--residue")
        .arg(&r2)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut child = KillOnDrop(child);
    let mut report = String::new();
    // Pretty JSON: the report ends at the first line that is a closing brace alone.
    while !report.ends_with("\n}\n") {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "synthesis ended before its report: {report}");
        report.push_str(&line);
    }
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(get(port_8080(&v), "/cgi-bin/bump"), (200, "ram 4 disk 4\n".into()));
    child.0.stdin.take().unwrap().write_all(b"\n").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.0.wait().unwrap().success(), "{rest}");
    let v: serde_json::Value = serde_json::from_str(&rest).unwrap();
    assert_eq!(v["bytes"].as_u64(), Some(std::fs::metadata(&r2).unwrap().len()), "{v}");
    let out = cloudlet()
        .args(["client", "--server", &url, "--probe", "8080", "--json", "--overlay"])
        .arg(&r2)
        .output()
        .unwrap();
    assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
    let moved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(get(port_8080(&moved), "/cgi-bin/bump"), (200, "ram 5 disk 5\n".into()));
    // The first VM still counts on its own.
    assert_eq!(get(port, "/cgi-bin/bump"), (200, "ram 5 disk 5\n".into()));
    server.interrupt();
    assert!(entries(&work.path().join("vms")).is_empty());
}

/// A destination that dies mid-handoff: it answers `GET /v1/bases` with `bases` (so the
/// source sends), says "100 Continue" to the upload, reads a little of it and closes.
fn dying_destination(bases: String) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            while !head.ends_with("\r\n\r\n") {
                if r.read_line(&mut head).unwrap_or(0) == 0 {
                    break;
                }
            }
            if head.starts_with("GET /v1/bases") {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{bases}",
                    bases.len()
                );
                let _ = s.write_all(answer.as_bytes());
            } else {
                let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                let mut some = [0u8; 64 << 10];
                let _ = r.read(&mut some);
            }
        }
    });
    addr
}

/// The VMs a server lists.
fn vm_ids(addr: SocketAddr) -> Vec<String> {
    let (st, body) = http(addr, "GET /v1/vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"");
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn handoff_moves_a_vm_between_servers_or_leaves_it_running() {
    let work = tempfile::tempdir().unwrap();
    let (reg, ovl) = counter_overlay(work.path());
    // The destination holds the same base, imported from an export; a third server has none.
    let export = work.path().join("deb.base");
    let out =
        cloudlet().arg("--registry").arg(&reg).args(["export-base", "deb", "--out"]).arg(&export).output().unwrap();
    assert!(out.status.success(), "export-base: {}", String::from_utf8_lossy(&out.stderr));
    let reg2 = work.path().join("registry2");
    let out = cloudlet().arg("--registry").arg(&reg2).arg("import-base").arg(&export).output().unwrap();
    assert!(out.status.success(), "import-base: {}", String::from_utf8_lossy(&out.stderr));
    let serve = |reg: &Path, vms: &str| {
        Served::start(
            cloudlet()
                .arg("--registry")
                .arg(reg)
                .args(["serve", "--listen", "127.0.0.1:0"])
                .arg("--work")
                .arg(work.path().join(vms)),
        )
    };
    let (a, b, c) = (serve(&reg, "vms-a"), serve(&reg2, "vms-b"), serve(&work.path().join("registry3"), "vms-c"));
    let out = cloudlet()
        .args(["client", "--server", &a.url(), "--probe", "8080", "--json", "--overlay"])
        .arg(&ovl)
        .output()
        .unwrap();
    assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
    let vm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, port) = (vm["id"].as_str().unwrap().to_string(), port_8080(&vm));
    for n in 1..=2 {
        assert_eq!(get(port, "/cgi-bin/bump"), (200, format!("ram {n} disk {n}\n")));
    }
    let handoff = |from: &Served, id: &str, to: &str, more: &[&str]| {
        cloudlet()
            .args(["handoff", "--from", &from.url(), "--vm", id, "--to", to, "--probe", "8080", "--json"])
            .args(more)
            .output()
            .unwrap()
    };

    // Destinations that do not take the VM: it runs on at the source, state intact. One
    // lacks the base, one is not there, one dies while the first residue is on its way (the
    // VM runs meanwhile), and again while the whole residue is (the VM is paused).
    let (_, bases) = http(a.addr, "GET /v1/bases HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dying = format!("http://{}", dying_destination(bases));
    let failing: [(u32, String, &[&str]); 4] = [
        (3, c.url(), &[]),
        (4, format!("http://{closed}"), &[]),
        (5, dying.clone(), &[]),
        (6, dying, &["--no-precopy"]),
    ];
    for (n, to, more) in failing {
        let out = handoff(&a, &id, &to, more);
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(cloudlet_examples::exit::SERVER.into()), "to {to} {more:?}: {said}");
        assert!(said.contains("handoff_failed") && said.contains("it runs on here"), "to {to}: {said}");
        assert_eq!(get(port, "/cgi-bin/bump"), (200, format!("ram {n} disk {n}\n")), "after the handoff to {to}");
        assert_eq!(vm_ids(a.addr), vec![id.clone()]);
    }
    assert!(vm_ids(c.addr).is_empty());

    // To the destination that holds the base: the VM answers there with its count, and is
    // gone from the source. Pre-copy: what goes while the VM is paused is a small part.
    let out = handoff(&a, &id, &b.url(), &[]);
    assert!(out.status.success(), "handoff: {}", String::from_utf8_lossy(&out.stdout));
    let moved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(moved["from_id"], id.as_str());
    assert!(moved["downtime_ms"].as_u64().unwrap() <= moved["total_ms"].as_u64().unwrap(), "{moved}");
    let (precopy, last) = (moved["precopy_bytes"].as_u64().unwrap(), moved["final_bytes"].as_u64().unwrap());
    assert!(precopy > 0 && last * 4 < moved["residue_bytes"].as_u64().unwrap(), "{moved}");
    let there = moved["vm"]["id"].as_str().unwrap().to_string();
    assert_eq!(vm_ids(b.addr), vec![there.clone()]);
    assert_eq!(get(port_8080(&moved["vm"]), "/cgi-bin/bump"), (200, "ram 7 disk 7\n".into()));
    assert!(vm_ids(a.addr).is_empty());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the source still forwards port {port}");
    // And back, stop and copy: the whole residue while paused.
    let out = handoff(&b, &there, &a.url(), &["--no-precopy"]);
    assert!(out.status.success(), "handoff back: {}", String::from_utf8_lossy(&out.stdout));
    let back: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(back["precopy_bytes"], 0, "{back}");
    assert_eq!(back["final_bytes"], back["residue_bytes"], "{back}");
    assert_eq!(get(port_8080(&back["vm"]), "/cgi-bin/bump"), (200, "ram 8 disk 8\n".into()));
    assert!(vm_ids(b.addr).is_empty());

    // Stages and patches from outside: unknown or malformed stage ids, a stage that is no
    // overlay, a patch that is no patch: refused, nothing left.
    for sid in ["st-0000000000000000", "st-../../../etc", "vm-0123456789ab"] {
        let (st, body) = http(b.addr, &post_head(&format!("/v1/synthesis?patch_from={sid}"), 3, None), b"abc");
        assert_eq!(st, 404, "{sid}: {body}");
    }
    let (st, body) = http(b.addr, &post_head("/v1/stages", 5, None), b"hello");
    assert_eq!(st, 400, "{body}");
    let overlay = std::fs::read(&ovl).unwrap();
    let (st, body) = http(b.addr, &post_head("/v1/stages", overlay.len() as u64, None), &overlay);
    assert_eq!(st, 201, "{body}");
    let staged: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sid = staged["id"].as_str().unwrap();
    let garbage = noise(100_000, 17);
    let (st, body) =
        http(b.addr, &post_head(&format!("/v1/synthesis?patch_from={sid}"), garbage.len() as u64, None), &garbage);
    assert_eq!(st, 400, "{body}");
    let (st, _) = http(b.addr, &post_head(&format!("/v1/synthesis?patch_from={sid}"), 3, None), b"abc");
    assert_eq!(st, 404, "a stage is used once");
    assert!(vm_ids(b.addr).is_empty());
    assert!(entries(&work.path().join("vms-b/stages")).is_empty(), "{:?}", entries(&work.path().join("vms-b/stages")));
    for (s, dir) in [(a, "vms-a"), (b, "vms-b"), (c, "vms-c")] {
        s.interrupt();
        assert!(entries(&work.path().join(dir)).is_empty(), "{dir}: {:?}", entries(&work.path().join(dir)));
    }
}
