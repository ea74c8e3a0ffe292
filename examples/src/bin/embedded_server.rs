//! Serves synthesis inside one's own program: starts the synthesis server on a free loopback
//! port in a tokio runtime, sends it an overlay with the blocking `synthesis::client`, prints the
//! server's answer (the VM id, its forwarded ports, the timeline), asks the app through its
//! forward, and shuts the server down, which stops the VM and removes its files.
//!
//! ```text
//! embedded_server REGISTRY OVERLAY GUEST_PORT
//! embedded_server /tmp/reg /tmp/app.overlay 8080
//! ```
use std::time::Duration;

use synthesis::client::{Client, UploadOptions};
use synthesis::server::{Server, ServerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [registry, overlay, port] = args.as_slice() else {
        return Err("usage: embedded_server REGISTRY OVERLAY GUEST_PORT".into());
    };
    let port: u16 = port.parse()?;

    // The server keeps its running VMs in a work directory of its own.
    let work = std::env::temp_dir().join(format!("embedded-synthesis-{}", std::process::id()));
    let mut config = ServerConfig::new(registry.into(), work.clone());
    // Loopback, port 0: the OS picks a free port (a token would be needed off loopback).
    config.listen = ([127, 0, 0, 1], 0).into();

    // The server is async; this program is not: it owns a runtime and serves on it.
    let runtime = tokio::runtime::Runtime::new()?;
    let server = runtime.block_on(Server::bind(config))?;
    let url = format!("http://{}", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(server.run(async {
        let _ = stopped.await;
    }));
    println!("serving on {url}");

    // A client: POST the overlay; the server applies it while it arrives, resumes the VM and
    // (with `probe`) answers once the app answers on that guest port.
    let client = Client::new(&url)?;
    let opts = UploadOptions { probe: Some(port), ..UploadOptions::default() };
    let vm = client.synthesize(overlay.as_ref(), &opts)?;
    println!("vm {} ({} from base {})", vm.id, vm.name, vm.base_name);
    for f in &vm.ports {
        println!("forward {}:{} -> guest :{}", f.address.as_deref().unwrap_or("?"), f.host, f.guest);
    }
    println!("synthesized in {:.0} ms", vm.timeline.total);

    // The app, through the forward the server made.
    let forward = vm.ports.iter().find(|f| f.guest == port).ok_or("the VM does not forward that port")?;
    let address = forward.address.as_deref().unwrap_or("127.0.0.1");
    let page = synthesis::http_get_from(address, forward.host, Duration::from_secs(60))?;
    println!("answer {}", synthesis::first_body_line(&page));

    // Shutting down stops every VM the server started and removes their files.
    let _ = stop.send(());
    runtime.block_on(serving)??;
    // The server empties its work directory when it stops; the directory itself is ours.
    std::fs::remove_dir(&work)?;
    println!("server stopped");
    Ok(())
}
