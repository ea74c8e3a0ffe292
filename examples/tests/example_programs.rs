//! The example programs (`src/bin/make_base.rs`, `make_overlay.rs`, `synthesize_file.rs`,
//! `embedded_server.rs`) run in sequence on the test guest, as their docs say to run them: a
//! base, an overlay with a web app, synthesis from the file, synthesis through a server embedded
//! in a program.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs an example program with `args` until it exits, for up to `timeout`; returns its stdout
/// and fails the test (naming the program, with its stderr) if it fails or runs too long.
fn run(program: &str, args: &[&str], dir: &Path, timeout: Duration) -> String {
    let (out, err) = (dir.join(format!("{program}.stdout")), dir.join(format!("{program}.stderr")));
    let mut child = Command::new(program_path(program))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} did not finish within {timeout:?}: {}", std::fs::read_to_string(&err).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out).unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "{program} {args:?}: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout
}

fn program_path(program: &str) -> &'static str {
    match program {
        "make_base" => env!("CARGO_BIN_EXE_make_base"),
        "make_overlay" => env!("CARGO_BIN_EXE_make_overlay"),
        "synthesize_file" => env!("CARGO_BIN_EXE_synthesize_file"),
        "embedded_server" => env!("CARGO_BIN_EXE_embedded_server"),
        other => panic!("no example program {other}"),
    }
}

/// The line of `stdout` that starts with `prefix` (without the prefix).
fn line<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{stdout}"))
}

#[test]
fn example_programs_flow_base_overlay_synthesis_server() {
    let guest = common::guest_dir();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let registry = dir.join("registry");
    let reg = registry.to_str().unwrap();
    let path = |f: &str| guest.join(f).to_str().unwrap().to_owned();
    let limit = Duration::from_secs(300);

    let out = run("make_base", &[reg, "deb", &path("vmlinuz"), &path("initrd.img"), &path("disk.raw")], dir, limit);
    let base = line(&out, "base ");
    assert!(base.len() == 64 + 4 && base.ends_with(" deb"), "{out}");
    assert_eq!(line(&out, "registry "), reg);
    let listed = base_registry::Registry::open_existing(&registry).unwrap().list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].manifest.id.to_hex(), base[..64]);

    let overlay = dir.join("app.overlay");
    let ovl = overlay.to_str().unwrap();
    let page = "hello from the example app";
    let out = run(
        "make_overlay",
        &[
            reg,
            "deb",
            ovl,
            "8080",
            "mkdir -p /mnt/disk/www",
            &format!("echo '{page}' > /mnt/disk/www/index.html"),
            "httpd -p 8080 -h /mnt/disk/www",
        ],
        dir,
        limit,
    );
    let bytes = std::fs::metadata(&overlay).unwrap().len();
    assert_eq!(line(&out, "overlay "), format!("{ovl} {bytes}"));

    let vm = dir.join("vm");
    let out = run("synthesize_file", &[reg, ovl, vm.to_str().unwrap(), "8080"], dir, limit);
    let host_port: u16 = line(&out, "forward 127.0.0.1:").split(' ').next().unwrap().parse().unwrap();
    assert!(host_port > 0, "{out}");
    assert_eq!(line(&out, "answer "), page);
    assert!(out.ends_with("stopped\n"), "{out}");
    assert!(!vm.exists(), "synthesize_file left {}", vm.display());

    let out = run("embedded_server", &[reg, ovl, "8080"], dir, limit);
    assert!(line(&out, "serving on http://127.0.0.1:").parse::<u16>().is_ok(), "{out}");
    assert!(line(&out, "vm vm-").ends_with("(app from base deb)"), "{out}");
    assert!(line(&out, "forward 127.0.0.1:").ends_with(" -> guest :8080"), "{out}");
    assert_eq!(line(&out, "answer "), page);
    assert!(out.ends_with("server stopped\n"), "{out}");

    // Every VM the programs started is gone.
    let left = common::processes_mentioning(dir.to_str().unwrap());
    assert!(left.iter().all(|c| !c.contains("qemu")), "left running: {left:?}");
}
