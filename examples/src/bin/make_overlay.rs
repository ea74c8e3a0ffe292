//! Makes an overlay: resumes a registered base, customizes the guest with shell commands (here:
//! start a web app), waits until the app answers HTTP, snapshots the custom VM and writes what
//! differs from the base to an overlay file.
//!
//! ```text
//! make_overlay REGISTRY BASE OUT.overlay GUEST_PORT COMMAND...
//! make_overlay /tmp/reg deb /tmp/app.overlay 8080 'mkdir -p /www' \
//!     'echo hello > /www/index.html' 'httpd -p 8080 -h /www'
//! ```
//!
//! Prints `overlay PATH BYTES` on success.
use std::time::Duration;

use base_registry::Registry;
use delta_engine::CreateOptions;
use overlay_format::{PortForward, Protocol};
use synthesis::{create_overlay_file, CommandChannel, Event, HttpCheck, OverlayRequest, RegisteredBase};
use vm_driver::Qemu;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [registry, base, out, port, commands @ ..] = args.as_slice() else {
        return Err("usage: make_overlay REGISTRY BASE OUT.overlay GUEST_PORT COMMAND...".into());
    };
    let port: u16 = port.parse()?;

    // Only an existing registry: a mistyped path is an error rather than a new, empty registry.
    let registry = Registry::open_existing(registry.as_ref())?;
    // A base by name, id or unique id prefix.
    let base = RegisteredBase::find(&registry, base)?;
    let qemu = Qemu::new()?;

    let request = OverlayRequest {
        name: "app".into(),
        customize: commands.to_vec(),
        // Over the serial console; `CommandChannel::Agent` runs them through the guest agent.
        via: CommandChannel::Console,
        interactive: false,
        vnc: false,
        // Capture the VM only once the app answers (any HTTP status, up to 60 s).
        wait_http: Some(HttpCheck::new(port, Duration::from_secs(60))),
        // Recorded in the overlay: synthesis forwards this guest port (host port 0: any free one).
        forwards: vec![PortForward { protocol: Protocol::Tcp, host_port: 0, guest_port: port }],
        // `true` would discard the guest's freed disk blocks and drop its page cache first.
        trim: false,
        // Must not exist: an overlay is never overwritten.
        out: out.into(),
        // zstd at level 4; `CreateOptions::xz(6)` makes smaller overlays, slowly.
        options: CreateOptions::default(),
        segmented: false,
    };
    let outcome = create_overlay_file(&qemu, &base, &request, &|e| {
        if let Event::Step(step) = e {
            eprintln!("  - {step}");
        }
    })?;

    println!("overlay {} {}", outcome.path.display(), outcome.stats.overlay_bytes);
    eprintln!(
        "{} changed chunks; customized in {:?}, diffed in {:?}",
        outcome.stats.changed_chunks, outcome.customize, outcome.stats.total
    );
    Ok(())
}
