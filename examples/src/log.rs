//! The diagnostics of the libraries (`tracing` events) on stderr, one plain line each: what
//! `cloudlet serve` logs ("[vm-0123456789ab] running 'app' (...)", "recovered what ... left")
//! and what the flows say they do ("probing KVM ...").
//!
//! `RUST_LOG` chooses what is shown (e.g. `RUST_LOG=debug`, `RUST_LOG=synthesis=warn`);
//! by default the workspace's crates log at `info` and everything else at `warn`.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// What is shown without `RUST_LOG`.
pub const DEFAULT_FILTER: &str =
    "warn,synthesis=info,vm_driver=info,base_registry=info,delta_engine=info,overlay_format=info,cloudlet=info,cloudlet_examples=info";

/// Installs the stderr subscriber for the process. Call once, from `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let _ = tracing::subscriber::set_global_default(subscriber(filter, std::io::stderr));
}

/// The subscriber [`init`] installs: events that pass `filter`, written to `out`.
pub fn subscriber<W>(filter: EnvFilter, out: W) -> impl Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(out).event_format(Lines).finish()
}

/// One line per event: `warning: ` or `error: ` for those levels, `[VM] ` for an event with a
/// `vm` field, the message, then any other field as ` name=value`.
struct Lines;

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        match *event.metadata().level() {
            Level::ERROR => w.write_str("error: ")?,
            Level::WARN => w.write_str("warning: ")?,
            Level::DEBUG => w.write_str("debug: ")?,
            Level::TRACE => w.write_str("trace: ")?,
            Level::INFO => {}
        }
        if let Some(vm) = &f.vm {
            write!(w, "[{vm}] ")?;
        }
        w.write_str(&f.message)?;
        for (name, value) in &f.rest {
            write!(w, " {name}={value}")?;
        }
        writeln!(w)
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    vm: Option<String>,
    rest: Vec<(&'static str, String)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            "vm" => self.vm = Some(value),
            name => self.rest.push((name, value)),
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn events_are_plain_lines() {
        let buf = Buf::default();
        let out = buf.clone();
        let filter = EnvFilter::new(DEFAULT_FILTER);
        tracing::subscriber::with_default(subscriber(filter, move || out.clone()), || {
            let id = "vm-0123456789ab";
            tracing::info!(target: "synthesis::server", "recovered what an earlier server left");
            tracing::info!(target: "synthesis::server", vm = %id, "running '{}' ({} overlay bytes)", "app", 42);
            tracing::warn!(target: "synthesis::server", vm = %id, port = 8080, "failed: {}", "no answer");
            tracing::error!(target: "vm_driver", path = "/tmp/x", "cannot start");
            // Below the default level, and outside the workspace's crates below warn: not shown.
            tracing::debug!(target: "synthesis", "hidden");
            tracing::info!(target: "hyper", "hidden too");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "recovered what an earlier server left\n\
             [vm-0123456789ab] running 'app' (42 overlay bytes)\n\
             warning: [vm-0123456789ab] failed: no answer port=8080\n\
             error: cannot start path=/tmp/x\n"
        );
    }
}
