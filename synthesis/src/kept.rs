//! A VM directory that synthesis rebuilt and its caller kept (`cloudlet synthesis --keep`),
//! resumed again: from the state synthesis rebuilt, with the VM's port forwards on free host
//! ports. The directory is not changed: the VM writes to layers of its own, dropped when it
//! stops, and its disks are layers over the base's, so the base must still be registered.

use std::path::Path;

use vm_driver::{Hypervisor, RestoreOptions, Snapshot, Vm};

use crate::{http_wait, Event, FlowError, HttpAnswer, HttpCheck};

/// A VM resumed by [`resume_kept`].
pub struct Resumed<V> {
    /// The running VM; [`Vm::shutdown`] stops it.
    pub vm: V,
    /// The app's answer to the probe, if asked.
    pub answer: Option<HttpAnswer>,
}

/// Resumes the VM kept in `dir` (its `snapshot.json`, as synthesis wrote it). With `probe`,
/// refuses a guest port the VM does not forward before it starts anything
/// ([`FlowError::NotForwarded`]), and waits for the app's answer through the forward; a VM
/// whose app does not answer is stopped again.
pub fn resume_kept<H: Hypervisor>(
    hypervisor: &H,
    dir: &Path,
    probe: Option<&HttpCheck>,
    events: &(dyn Fn(Event) + Sync),
) -> Result<Resumed<H::Vm>, FlowError> {
    let dir = std::fs::canonicalize(dir).map_err(|source| FlowError::Io { path: dir.to_owned(), source })?;
    let snapshot = Snapshot::load(&dir)?;
    if let Some(c) = probe.filter(|c| !snapshot.guest_ports.contains(&c.port)) {
        return Err(FlowError::NotForwarded { port: c.port, forwarded: snapshot.guest_ports.clone() });
    }
    events(Event::Step(format!("resuming the VM in {}", dir.display())));
    let vm = hypervisor.restore(&snapshot, &RestoreOptions::default())?;
    let Some(check) = probe else {
        return Ok(Resumed { vm, answer: None });
    };
    events(Event::Step(check.describe()));
    let answer = match vm.host_port(check.port) {
        Some(host) => http_wait("127.0.0.1", host, check),
        None => Err(FlowError::NotForwarded { port: check.port, forwarded: snapshot.guest_ports.clone() }),
    };
    match answer {
        Ok(a) => Ok(Resumed { vm, answer: Some(a) }),
        Err(e) => {
            let _ = vm.shutdown();
            Err(e)
        }
    }
}
