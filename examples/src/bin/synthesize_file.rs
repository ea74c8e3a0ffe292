//! Synthesizes a VM from an overlay file: finds the overlay's base in the registry, rebuilds the
//! custom VM's disk and memory from base + overlay while the file is read, resumes the VM with
//! the overlay's port forwards, asks the app over HTTP, then stops the VM and removes its files.
//!
//! ```text
//! synthesize_file REGISTRY OVERLAY VM_DIR GUEST_PORT
//! synthesize_file /tmp/reg /tmp/app.overlay /tmp/vm 8080
//! ```
//!
//! Prints the host port the guest port is forwarded to and the first line of the app's answer.
use std::io::BufReader;
use std::path::Path;
use std::time::Duration;

use base_registry::Registry;
use synthesis::{synthesize_with, HttpCheck, SynthesisOptions};
use vm_driver::{Qemu, Vm};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [registry, overlay, vm_dir, port] = args.as_slice() else {
        return Err("usage: synthesize_file REGISTRY OVERLAY VM_DIR GUEST_PORT".into());
    };
    let port: u16 = port.parse()?;
    let vm_dir = Path::new(vm_dir);

    let registry = Registry::open_existing(registry.as_ref())?;
    let qemu = Qemu::new()?;
    // Any `Read` will do: a file, a socket, a decompressor...
    let overlay = BufReader::with_capacity(1 << 20, std::fs::File::open(overlay)?);
    // The VM directory must not exist; it is removed again if synthesis fails. Synthesis
    // returns once the app answers on `port` (any HTTP status, up to 60 s).
    let options = SynthesisOptions::new(vm_dir).probe(HttpCheck::new(port, Duration::from_secs(60)));
    let synthesized = synthesize_with(&qemu, &registry, overlay, &options, &|_| {})?;

    // The forwards listen on 127.0.0.1, on the recorded host port or a free one.
    let host_port = synthesized.vm.host_port(port).ok_or("the overlay does not forward that port")?;
    println!("forward 127.0.0.1:{host_port} -> guest :{port}");
    println!("resumed in {:.0} ms", synthesized.timeline.total.as_secs_f64() * 1000.0);

    // Talk to the app like any client would (here: until it answers 200, up to 10 s).
    let answer = synthesis::http_get_from("127.0.0.1", host_port, Duration::from_secs(10))?;
    println!("answer {}", synthesis::first_body_line(&answer));

    // Stop the VM, then remove its directory (its disks are layers over the base's).
    synthesized.vm.shutdown()?;
    std::fs::remove_dir_all(vm_dir)?;
    println!("stopped");
    Ok(())
}
