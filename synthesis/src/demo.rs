//! The demo of `cloudlet demo` without its printing: the test guest that
//! `scripts/build-guest.sh` builds, the web app the demo installs in it, and the demo's work
//! directory, which is emptied only when an earlier demo made it.

use std::path::{Path, PathBuf};

use overlay_format::{PortForward, Protocol};

use crate::{BaseRequest, FlowError, HttpCheck};

/// The file that marks a demo work directory.
pub const MARKER: &str = ".cloudlet-demo";

/// The guest port the demo app listens on.
pub const APP_PORT: u16 = 8080;

/// The first line of the demo app's page.
pub const APP_PAGE: &str = "<h1>hello from the synthesized app</h1>";

/// A guest as `scripts/build-guest.sh` builds it: a kernel, an initrd whose init mounts the
/// disk on `/mnt/disk` and prints [`TestGuest::READY`] on the serial console, and an ext4 disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestGuest {
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initrd (`initrd.img`).
    pub initrd: PathBuf,
    /// The raw disk image (`disk.raw`).
    pub disk: PathBuf,
}

impl TestGuest {
    /// What the guest prints once it is ready for commands.
    pub const READY: &'static str = "cloudlet-guest: ready";
    /// Its kernel command line.
    pub const CMDLINE: &'static str = "console=ttyS0 quiet panic=-1";
    /// The RAM it is booted with.
    pub const RAM_BYTES: u64 = 256 << 20;

    /// The guest in `dir`; fails with a [`FlowError::Io`] (not found) naming the first file
    /// that is missing.
    pub fn open(dir: &Path) -> Result<Self, FlowError> {
        let g = TestGuest { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), disk: dir.join("disk.raw") };
        for f in [&g.kernel, &g.initrd, &g.disk] {
            if !f.exists() {
                return Err(FlowError::Io { path: f.clone(), source: std::io::ErrorKind::NotFound.into() });
            }
        }
        Ok(g)
    }

    /// A request to make a base named `name` of this guest, snapshotting in `work_dir`.
    pub fn base_request(&self, name: &str, work_dir: PathBuf) -> BaseRequest {
        let mut req =
            BaseRequest::new(name, &self.disk, work_dir).kernel(&self.kernel, Some(self.initrd.clone()), Self::CMDLINE);
        req.ram_bytes = Self::RAM_BYTES;
        req.ready = crate::ReadyCheck::SerialText(Self::READY.into());
        req
    }
}

/// The Debian guest as `scripts/build-debian-guest.sh` builds it: a qcow2 disk that boots by
/// its own bootloader (SeaBIOS here), systemd, a root shell on ttyS0 that prints
/// [`TestGuest::READY`] once the guest is up, and `python3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianGuest {
    /// The disk image (`disk.qcow2`), never modified.
    pub disk: PathBuf,
}

impl DebianGuest {
    /// The RAM it is booted with.
    pub const RAM_BYTES: u64 = 1 << 30;

    /// The guest in `dir`; fails with a [`FlowError::Io`] (not found) naming its disk when the
    /// disk is missing.
    pub fn open(dir: &Path) -> Result<Self, FlowError> {
        let disk = dir.join("disk.qcow2");
        if !disk.exists() {
            return Err(FlowError::Io { path: disk, source: std::io::ErrorKind::NotFound.into() });
        }
        Ok(DebianGuest { disk })
    }
}

/// The commands that install and start the demo's web app in the Debian guest: the page
/// ([`APP_PAGE`]) and 4 MiB of random data on its disk, served by `python3 -m http.server` on
/// [`APP_PORT`], started in the background (the console's shell returns at once).
pub fn debian_app_commands() -> Vec<String> {
    vec![
        "mkdir -p /srv/app".into(),
        format!("echo '{APP_PAGE}' > /srv/app/index.html"),
        "head -c 4194304 /dev/urandom > /srv/app/data.bin".into(),
        format!("setsid python3 -m http.server {APP_PORT} --directory /srv/app >/dev/null 2>&1 < /dev/null &"),
    ]
}

/// The commands that install and start the demo's web app in the test guest: a page
/// ([`APP_PAGE`]), a CGI script, 4 MiB of random data on the disk, a copy of the kernel modules
/// in memory, and busybox `httpd` on [`APP_PORT`].
pub fn app_commands() -> Vec<String> {
    vec![
        "mkdir -p /mnt/disk/app/cgi-bin".into(),
        format!("echo '{APP_PAGE}' > /mnt/disk/app/index.html"),
        "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho app uptime; cat /proc/uptime\\n' > /mnt/disk/app/cgi-bin/uptime".into(),
        "chmod +x /mnt/disk/app/cgi-bin/uptime".into(),
        "dd if=/dev/urandom of=/mnt/disk/app/data.bin bs=1M count=4 2>/dev/null".into(),
        "cat /lib/modules/*.ko > /tmp/modules-copy".into(),
        format!("httpd -p {APP_PORT} -h /mnt/disk/app"),
    ]
}

/// The demo app's forward: its port on any free host port.
pub fn app_forward() -> PortForward {
    PortForward { protocol: Protocol::Tcp, host_port: 0, guest_port: APP_PORT }
}

/// The wait for the demo app's first answer (any HTTP answer on `/`).
pub fn app_check(timeout: std::time::Duration) -> HttpCheck {
    HttpCheck::new(APP_PORT, timeout)
}

/// Why [`claim_work_dir`] refused a directory.
#[derive(Debug, thiserror::Error)]
pub enum WorkDirError {
    /// The directory holds files and no demo made it.
    #[error("{} exists and was not made by `cloudlet demo`", .0.display())]
    NotOurs(PathBuf),
    /// Reading, emptying or creating it failed.
    #[error("{}", .0.display())]
    Io(PathBuf, #[source] std::io::Error),
}

/// Makes `work` an empty demo work directory holding only the [`MARKER`]: creates it, or
/// empties it when it is empty already or an earlier demo made it (it holds the marker). Any
/// other directory is refused, never emptied.
pub fn claim_work_dir(work: &Path) -> Result<(), WorkDirError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |e| WorkDirError::Io(p, e)
    };
    let marker = work.join(MARKER);
    if work.exists() {
        let empty = std::fs::read_dir(work).map_err(io(work))?.next().is_none();
        if !empty && !marker.exists() {
            return Err(WorkDirError::NotOurs(work.to_owned()));
        }
        if !empty {
            std::fs::remove_dir_all(work).map_err(io(work))?;
        }
    }
    std::fs::create_dir_all(work).map_err(io(work))?;
    std::fs::write(&marker, "made by `cloudlet demo`; emptied by the next one\n").map_err(io(&marker))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_dir_is_emptied_only_when_a_demo_made_it() {
        let d = tempfile::tempdir().unwrap();
        let work = d.path().join("w");
        claim_work_dir(&work).unwrap();
        std::fs::write(work.join("old"), "x").unwrap();
        claim_work_dir(&work).unwrap();
        assert!(!work.join("old").exists() && work.join(MARKER).exists());

        let mine = d.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("precious"), "x").unwrap();
        assert!(matches!(claim_work_dir(&mine), Err(WorkDirError::NotOurs(_))));
        assert!(mine.join("precious").exists());
    }

    #[test]
    fn a_missing_guest_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), "").unwrap();
        match TestGuest::open(d.path()) {
            Err(FlowError::Io { path, .. }) => assert_eq!(path, d.path().join("initrd.img")),
            other => panic!("{other:?}"),
        }
    }
}
