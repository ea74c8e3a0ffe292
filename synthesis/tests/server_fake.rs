//! The synthesis server over the in-memory hypervisor: a VM synthesized from an upload is
//! listed, stopped by DELETE or by the server's shutdown, and a failed synthesis leaves no VM
//! directory. No QEMU.

mod fake;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use base_registry::Registry;
use fake::FakeHypervisor;
use synthesis::server::{Server, ServerConfig};
use synthesis::{create_base, create_overlay_file};

/// One HTTP/1.1 exchange; returns the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{answer}"));
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn vm_dirs(work: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vm-"))
        .collect();
    v.sort();
    v
}

#[test]
fn the_server_runs_stops_and_cleans_up_vms_of_any_hypervisor() {
    let tmp = tempfile::tempdir().unwrap();
    let hv = FakeHypervisor::new();
    let registry_dir = tmp.path().join("registry");
    let registry = Registry::open(&registry_dir).unwrap();
    let (base, _) = create_base(&hv, &registry, &fake::base_request(tmp.path()), &|_| {}).unwrap();
    let out = tmp.path().join("app.overlay");
    create_overlay_file(&hv, &base, &fake::overlay_request(&out), &|_| {}).unwrap();
    let overlay = std::fs::read(&out).unwrap();

    let work = tmp.path().join("vms");
    let mut cfg = ServerConfig::new(registry_dir, work.clone());
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.probe_timeout = Duration::from_secs(10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let server = rt.block_on(Server::bind_with(cfg, hv.clone())).unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = rt.spawn(server.run(async {
        let _ = stopped.await;
    }));

    // Synthesized, probed through the fake's forward, listed, stopped by DELETE.
    let (status, body) = http(addr, "POST", "/v1/synthesis?probe=8080", &overlay);
    assert_eq!(status, 201, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = info["id"].as_str().unwrap().to_string();
    assert_eq!(hv.live.load(Ordering::SeqCst), 1);
    assert_eq!(vm_dirs(&work), vec![id.clone()]);
    let (status, body) = http(addr, "GET", "/v1/vms", b"");
    assert_eq!(status, 200);
    assert!(body.contains(&id), "{body}");
    let (status, _) = http(addr, "DELETE", &format!("/v1/vms/{id}"), b"");
    assert_eq!(status, 200);
    assert_eq!(hv.live.load(Ordering::SeqCst), 0, "DELETE stops the VM");
    assert!(vm_dirs(&work).is_empty(), "{:?}", vm_dirs(&work));
    assert!(hv.calls().ends_with(&["restore".to_string(), "shutdown".to_string()]), "{:?}", hv.calls());

    // A restore that fails: an error answer, no VM, no directory.
    hv.set(|f| f.restore = true);
    let (status, body) = http(addr, "POST", "/v1/synthesis", &overlay);
    assert!(status >= 400, "{status} {body}");
    assert!(body.contains("fake restore"), "{body}");
    assert!(vm_dirs(&work).is_empty(), "{:?}", vm_dirs(&work));
    assert_eq!(hv.live.load(Ordering::SeqCst), 0);

    // A VM still running when the server shuts down is stopped and its directory removed.
    hv.set(|f| f.restore = false);
    let (status, body) = http(addr, "POST", "/v1/synthesis", &overlay);
    assert_eq!(status, 201, "{body}");
    assert_eq!(hv.live.load(Ordering::SeqCst), 1);
    stop.send(()).unwrap();
    rt.block_on(serving).unwrap().unwrap();
    assert_eq!(hv.live.load(Ordering::SeqCst), 0, "shutdown stops the VM");
    assert!(vm_dirs(&work).is_empty(), "{:?}", vm_dirs(&work));
}
