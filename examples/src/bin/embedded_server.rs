//! Serves synthesis inside one's own program: starts the synthesis server on a free loopback
//! port in a tokio runtime, sends it an overlay over HTTP as any client would, prints the
//! server's answer (the VM id, its forwarded ports, the timeline), asks the app through its
//! forward, and shuts the server down, which stops the VM and removes its files.
//!
//! ```text
//! embedded_server REGISTRY OVERLAY GUEST_PORT
//! embedded_server /tmp/reg /tmp/app.overlay 8080
//! ```
use std::io::BufReader;
use std::time::Duration;

use synthesis::api::VmInfo;
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
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let body = BufReader::with_capacity(1 << 20, std::fs::File::open(overlay)?);
    let mut answer =
        agent.post(format!("{url}/v1/synthesis?probe={port}")).send(ureq::SendBody::from_owned_reader(body))?;
    let text = answer.body_mut().read_to_string()?;
    if answer.status() != 201 && answer.status() != 200 {
        return Err(format!("the server answered {}: {text}", answer.status()).into());
    }
    let vm: VmInfo = serde_json::from_str(&text)?;
    println!("vm {} ({} from base {})", vm.id, vm.name, vm.base_name);
    for f in &vm.ports {
        println!("forward {}:{} -> guest :{}", f.address.as_deref().unwrap_or("?"), f.host, f.guest);
    }
    println!("synthesized in {:.0} ms", vm.timeline.total);

    // The app, through the forward the server made.
    let forward = vm.ports.iter().find(|f| f.guest == port).ok_or("the VM does not forward that port")?;
    let address = forward.address.as_deref().unwrap_or("127.0.0.1");
    let mut page = agent.get(format!("http://{address}:{}/", forward.host)).call()?;
    println!("answer {}", page.body_mut().read_to_string()?.lines().next().unwrap_or(""));

    // Shutting down stops every VM the server started and removes their files.
    let _ = stop.send(());
    runtime.block_on(serving)??;
    // The server empties its work directory when it stops; the directory itself is ours.
    std::fs::remove_dir(&work)?;
    println!("server stopped");
    Ok(())
}
