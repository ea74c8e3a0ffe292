//! `cloudlet base`, `overlay`, `synthesis` and `demo`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base_registry::Registry;
use delta_engine::CreateOptions;
use overlay_format::PortForward;
use synthesis::report::{BaseListing, BaseReport, OverlayReport, SynthesisReport};
use synthesis::{
    create_base, create_overlay_file, demo as guest_demo, parse_forward, synthesize_with, BaseRequest, CommandChannel,
    Event, HttpCheck, HttpTarget, OverlayRequest, ReadyCheck, RegisteredBase, SynthesisOptions, OVMF_CODE, OVMF_VARS,
};
use vm_driver::{Firmware, Qemu};

/// Prints flow events on stderr: steps as lines; long phases as progress bars on a terminal,
/// or a line every 10% otherwise.
pub fn printer(quiet: bool) -> impl Fn(Event) + Sync {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let last = std::sync::atomic::AtomicU64::new(u64::MAX);
    let bar: std::sync::Mutex<Option<(&'static str, indicatif::ProgressBar)>> = std::sync::Mutex::new(None);
    move |e| {
        if quiet {
            return;
        }
        let mut bar = bar.lock().unwrap_or_else(|e| e.into_inner());
        match e {
            Event::Step(s) => {
                if let Some((_, b)) = bar.take() {
                    b.finish_and_clear();
                }
                eprintln!("  - {s}");
            }
            Event::Interactive { serial_socket, vnc, viewer_closed } => {
                if let Some((_, b)) = bar.take() {
                    b.finish_and_clear();
                }
                eprintln!("  - the guest is yours: its serial console is {}", serial_socket.display());
                eprintln!("      connect with: socat -,raw,echo=0 UNIX-CONNECT:{}", serial_socket.display());
                eprintln!("      (one client at a time; disconnect with Ctrl-C in socat)");
                match vnc {
                    None => {
                        eprintln!("    press Enter here when you are done, after disconnecting");
                        let mut line = String::new();
                        let _ = std::io::stdin().read_line(&mut line);
                    }
                    Some(a) => {
                        eprintln!("      its screen: VNC display at {a} (e.g. vncviewer {}::{})", a.ip(), a.port());
                        eprintln!("    close the viewer, or press Enter here, when you are done");
                        wait_enter_or(&viewer_closed);
                    }
                }
            }
            Event::Progress { total: 0, .. } => {}
            Event::Progress { phase, done, total } if tty => {
                if bar.as_ref().is_none_or(|(p, _)| *p != phase) {
                    if let Some((_, b)) = bar.take() {
                        b.finish_and_clear();
                    }
                    let style = indicatif::ProgressStyle::with_template(
                        "    {prefix:8} {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                    let b = indicatif::ProgressBar::new(total).with_style(style).with_prefix(phase);
                    *bar = Some((phase, b));
                }
                if let Some((_, b)) = bar.as_ref() {
                    b.set_length(total);
                    b.set_position(done);
                }
            }
            Event::Progress { phase, done, total } => {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                let bucket = pct / 10;
                if last.swap(bucket, std::sync::atomic::Ordering::Relaxed) != bucket {
                    eprintln!("    {phase}: {pct:>3}% of {} MiB", total >> 20);
                }
            }
        }
    }
}

/// Returns on a line from stdin or once `flag` is set. Stdin at its end (nothing to read) leaves
/// only the flag.
fn wait_enter_or(flag: &std::sync::atomic::AtomicBool) {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::channel();
    // The reader cannot be cancelled; it ends with the process (nothing else reads stdin).
    std::thread::spawn(move || {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {
            let _ = tx.send(());
        }
    });
    while !flag.load(std::sync::atomic::Ordering::SeqCst) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => return,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Human size.
pub fn size(b: u64) -> String {
    if b >= 10 << 20 {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Options of `cloudlet base`.
#[derive(Debug, Clone, clap::Args)]
pub struct BaseArgs {
    /// Disk images, raw or qcow2: disk0, disk1, ... in this order; the first is booted. Each is
    /// copied into the base as a raw sparse file and never modified. A qcow2 image with a
    /// backing file is refused (flatten it first: qemu-img convert -O qcow2 IN FLAT).
    #[arg(required = true, value_name = "DISK")]
    pub disks: Vec<PathBuf>,
    /// Name of the base (unique in the registry).
    #[arg(long)]
    pub name: String,
    /// Print the result as JSON on stdout (steps still go to stderr).
    #[arg(long)]
    pub json: bool,
    /// Boot this kernel directly instead of the first disk's own bootloader.
    #[arg(long, help_heading = "Boot")]
    pub kernel: Option<PathBuf>,
    /// The initrd of --kernel.
    #[arg(long, requires = "kernel", help_heading = "Boot")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line of --kernel [default: console=ttyS0 quiet panic=-1].
    #[arg(long, requires = "kernel", help_heading = "Boot")]
    pub append: Option<String>,
    /// Guest RAM in MiB (16..=1048576).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..=1 << 20), help_heading = "Boot")]
    pub ram_mib: u64,
    /// vCPUs (1..=64).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "Boot")]
    pub vcpus: u32,
    /// The firmware that boots the VM: bios (SeaBIOS) or uefi (OVMF; the VM keeps its own copy
    /// of the variable store, in the base).
    #[arg(long, value_enum, default_value_t = FirmwareArg::Bios, hide_possible_values = true, help_heading = "Boot")]
    pub firmware: FirmwareArg,
    /// The UEFI firmware code [default: /usr/share/OVMF/OVMF_CODE_4M.fd, from Debian's ovmf].
    #[arg(long, value_name = "FILE", help_heading = "Boot")]
    pub ovmf_code: Option<PathBuf>,
    /// The UEFI variable store to start from (only read) [default:
    /// /usr/share/OVMF/OVMF_VARS_4M.fd].
    #[arg(long, value_name = "FILE", help_heading = "Boot")]
    pub ovmf_vars: Option<PathBuf>,
    /// Give the VM a channel for the QEMU guest agent (qemu-guest-agent in the guest), so that
    /// commands can run through it (--via agent) here and in the overlays of this base.
    /// Implied by --ready-agent and --via agent.
    #[arg(long, help_heading = "Boot")]
    pub guest_agent: bool,
    /// The guest is ready when it prints TEXT on its serial console (ttyS0) [default:
    /// cloudlet-guest: ready].
    #[arg(long, value_name = "TEXT", help_heading = "Readiness")]
    pub ready: Option<String>,
    /// Instead of --ready: the guest is ready when a service in it accepts TCP connections on
    /// PORT (e.g. 22 or 80; forwarded for the wait). Needs a guest that refuses connections to
    /// closed ports (no firewall dropping them).
    #[arg(long, value_name = "PORT", conflicts_with = "ready", value_parser = clap::value_parser!(u16).range(2..), help_heading = "Readiness")]
    pub ready_port: Option<u16>,
    /// Instead of --ready: the guest is ready when its QEMU guest agent answers (implies
    /// --guest-agent).
    #[arg(long, conflicts_with_all = ["ready", "ready_port"], help_heading = "Readiness")]
    pub ready_agent: bool,
    /// How long to wait for the guest to be ready, in seconds (a distribution booting without
    /// KVM takes a minute or more).
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400), help_heading = "Readiness")]
    pub ready_timeout: u64,
    /// A shell command to run in the guest before the snapshot (repeatable; a command that
    /// exits non-zero stops the flow, showing its output).
    #[arg(long, value_name = "CMD", help_heading = "Preparing the guest")]
    pub prepare: Vec<String>,
    #[command(flatten, next_help_heading = "Preparing the guest")]
    pub via: ViaArgs,
    /// Then hand the guest's serial console to you; the snapshot is taken when you press
    /// Enter.
    #[arg(long, help_heading = "Preparing the guest")]
    pub interactive: bool,
    /// Also show the guest's screen on a VNC display on 127.0.0.1 (implies --interactive);
    /// closing the viewer also ends the step.
    #[arg(long, help_heading = "Preparing the guest")]
    pub vnc: bool,
    #[command(flatten, next_help_heading = "Preparing the guest")]
    pub wait: WaitArgs,
    /// Last, before the snapshot: sync, discard the file systems' unused blocks (fstrim -av),
    /// drop the page cache and compact memory (so that free page reporting hands the freed
    /// pages to the host), for a smaller base. Needs fstrim (util-linux) in the guest.
    #[arg(long, help_heading = "Preparing the guest")]
    pub trim: bool,
}

impl BaseArgs {
    /// The default kernel command line of `--kernel`.
    pub const APPEND: &'static str = "console=ttyS0 quiet panic=-1";
    /// The default ready text.
    pub const READY: &'static str = "cloudlet-guest: ready";

    /// The arguments of a base of the disks `disks` with every default.
    pub fn new(name: &str, disks: Vec<PathBuf>) -> Self {
        BaseArgs {
            disks,
            name: name.into(),
            kernel: None,
            initrd: None,
            append: None,
            ram_mib: 256,
            vcpus: 1,
            ready: None,
            firmware: FirmwareArg::Bios,
            ovmf_code: None,
            ovmf_vars: None,
            guest_agent: false,
            ready_port: None,
            ready_agent: false,
            ready_timeout: 300,
            via: ViaArgs::default(),
            prepare: vec![],
            interactive: false,
            vnc: false,
            wait: WaitArgs { wait_timeout: 300, ..Default::default() },
            trim: false,
            json: false,
        }
    }

    /// Refuses options that do not go together (what clap cannot say).
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.firmware != FirmwareArg::Uefi && (self.ovmf_code.is_some() || self.ovmf_vars.is_some()) {
            return Err("--ovmf-code and --ovmf-vars need --firmware uefi".into());
        }
        Ok(())
    }

    /// The flow's request, working in `work_dir`; refuses options that do not go together.
    pub fn request(&self, work_dir: PathBuf) -> std::result::Result<BaseRequest, String> {
        self.check()?;
        let mut req = BaseRequest::new(&self.name, self.disks[0].clone(), work_dir);
        req.disks = self.disks.clone();
        if let Some(k) = &self.kernel {
            req = req.kernel(k, self.initrd.clone(), self.append.as_deref().unwrap_or(Self::APPEND));
        }
        req.ram_bytes = self.ram_mib << 20;
        req.vcpus = self.vcpus;
        req.firmware = match self.firmware {
            FirmwareArg::Bios => Firmware::Bios,
            FirmwareArg::Uefi => Firmware::Uefi {
                code: self.ovmf_code.clone().unwrap_or_else(|| OVMF_CODE.into()),
                vars: self.ovmf_vars.clone().unwrap_or_else(|| OVMF_VARS.into()),
            },
        };
        req.guest_agent = self.guest_agent;
        req.ready = match (self.ready_port, self.ready_agent) {
            (_, true) => ReadyCheck::Agent,
            (Some(p), _) => ReadyCheck::TcpPort(p),
            (None, false) => ReadyCheck::SerialText(self.ready.clone().unwrap_or_else(|| Self::READY.into())),
        };
        req.via = self.via.channel();
        req.ready_timeout = Duration::from_secs(self.ready_timeout);
        req.prepare = self.prepare.clone();
        req.interactive = self.interactive || self.vnc;
        req.vnc = self.vnc;
        req.wait_http = self.wait.check();
        req.trim = self.trim;
        Ok(req)
    }
}

/// `--firmware`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FirmwareArg {
    /// SeaBIOS, QEMU's default.
    Bios,
    /// OVMF.
    Uefi,
}

/// `--via`, shared by `cloudlet base` and `cloudlet overlay`.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct ViaArgs {
    /// How the commands (and --trim) reach the guest: console, a shell on the serial console
    /// ttyS0 (the guest must offer one, without echo); or agent, the QEMU guest agent, which
    /// runs each as /bin/sh -c CMD (needs qemu-guest-agent in the guest; for cloudlet overlay,
    /// a base made with --guest-agent or --via agent).
    #[arg(long, value_enum, default_value_t = Via::Console, hide_possible_values = true)]
    pub via: Via,
}

/// The value of `--via`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The serial console.
    #[default]
    Console,
    /// The QEMU guest agent.
    Agent,
}

impl ViaArgs {
    fn channel(&self) -> CommandChannel {
        match self.via {
            Via::Console => CommandChannel::Console,
            Via::Agent => CommandChannel::Agent,
        }
    }
}

/// `--wait-http` and its options, shared by `cloudlet base` and `cloudlet overlay`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WaitArgs {
    /// Then wait until the guest answers HTTP on this guest port, GETting PATH (default /);
    /// any HTTP answer will do unless --expect-status is given.
    #[arg(long, value_name = "PORT[/PATH]")]
    pub wait_http: Option<HttpTarget>,
    /// How long --wait-http waits, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub wait_timeout: u64,
    /// With --wait-http, wait for this HTTP status (e.g. 200) instead of any answer.
    #[arg(long, value_name = "CODE", requires = "wait_http", value_parser = clap::value_parser!(u16).range(100..=599))]
    pub expect_status: Option<u16>,
}

impl WaitArgs {
    fn check(&self) -> Option<HttpCheck> {
        self.wait_http.as_ref().map(|t| t.check(Duration::from_secs(self.wait_timeout), self.expect_status))
    }
}

/// `cloudlet base`.
pub fn base(qemu: &Qemu, reg: &Registry, a: &BaseArgs, quiet: bool) -> Result<RegisteredBase> {
    let req = a.request(reg.root().join(format!(".work-{}", std::process::id()))).map_err(anyhow::Error::msg)?;
    let (b, t) = create_base(qemu, reg, &req, &printer(quiet)).context("creating the base VM")?;
    let r = BaseReport::new(&b, &t, reg);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(b);
    }
    println!("base {} ({}) registered in {}", r.id, r.name, r.registry.display());
    println!(
        "  size {} on disk ({} apparent); boot {}, snapshot {}, index {}",
        size(r.bytes_on_disk),
        size(r.bytes_apparent),
        ms(t.boot),
        ms(t.snapshot),
        ms(t.index)
    );
    Ok(b)
}

/// Options of `cloudlet overlay`.
#[derive(Debug, Clone, clap::Args)]
pub struct OverlayArgs {
    /// The base: name, id, or unique id prefix.
    #[arg(long)]
    pub base: String,
    /// A shell command that customizes the guest (repeatable; a command that exits non-zero
    /// stops the flow, showing its output).
    #[arg(long, value_name = "CMD")]
    pub customize: Vec<String>,
    #[command(flatten)]
    pub via: ViaArgs,
    /// Then hand the guest's serial console to you (customize it by hand); the overlay is
    /// captured when you press Enter.
    #[arg(long)]
    pub interactive: bool,
    /// Also show the guest's screen on a VNC display on 127.0.0.1 (implies --interactive);
    /// closing the viewer also ends the step.
    #[arg(long)]
    pub vnc: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    /// Last, before the snapshot: sync, discard the file systems' unused blocks (fstrim -av),
    /// drop the page cache and compact memory (so that free page reporting hands the freed
    /// pages to the host), for a smaller overlay. Needs fstrim (util-linux) in the guest.
    #[arg(long)]
    pub trim: bool,
    /// Print the result as JSON on stdout (steps still go to stderr).
    #[arg(long)]
    pub json: bool,
    /// Port forward the app needs, tcp:HOST:GUEST (repeatable; HOST 0 = any). TCP only:
    /// udp: is refused.
    #[arg(long = "forward", value_name = "tcp:HOST:GUEST", value_parser = parse_forward)]
    pub forwards: Vec<PortForward>,
    /// The old spelling, tcp:HOST::GUEST.
    #[arg(long = "redir", short = 'r', value_name = "tcp:HOST::GUEST", value_parser = parse_forward)]
    pub redir: Vec<PortForward>,
    /// Compress with xz (smaller, slower) instead of zstd.
    #[arg(long)]
    pub xz: bool,
    /// Compression level (zstd 1..=19, default 4; xz 0..=9, default 6). Chunks that look
    /// incompressible are always stored at the fastest level.
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub level: Option<i32>,
    /// Name of the app.
    #[arg(long, default_value = "app")]
    pub name: String,
    /// Write a segmented overlay (format 1.3), which `cloudlet synthesis --early-start` can
    /// resume from before it has arrived: the custom VM is resumed once more to record what
    /// its app touches until it answers (--wait-http), and that goes first.
    #[arg(long)]
    pub segmented: bool,
    /// Overlay file to write.
    #[arg(long)]
    pub out: PathBuf,
}

impl OverlayArgs {
    /// Checks `--level` against the compression chosen.
    pub fn check_level(&self) -> std::result::Result<(), String> {
        let (range, name) = if self.xz { (0..=9, "xz") } else { (1..=19, "zstd") };
        match self.level {
            Some(l) if !range.contains(&l) => {
                Err(format!("--level {l} is out of range for {name} ({}..={})", range.start(), range.end()))
            }
            _ => Ok(()),
        }
    }
}

/// `cloudlet overlay`.
pub fn overlay(qemu: &Qemu, reg: &Registry, a: &OverlayArgs, quiet: bool) -> Result<synthesis::OverlayOutcome> {
    let forwards: Vec<PortForward> = a.forwards.iter().chain(&a.redir).copied().collect();
    let base = RegisteredBase::find(reg, &a.base).with_context(|| format!("finding base '{}'", a.base))?;
    let mut options = if a.xz { CreateOptions::xz(6) } else { CreateOptions::default() };
    if let Some(l) = a.level {
        options.level = l;
    }
    let req = OverlayRequest {
        name: a.name.clone(),
        customize: a.customize.clone(),
        via: a.via.channel(),
        interactive: a.interactive || a.vnc,
        vnc: a.vnc,
        wait_http: a.wait.check(),
        forwards,
        trim: a.trim,
        out: a.out.clone(),
        options,
        segmented: a.segmented,
    };
    let o = create_overlay_file(qemu, &base, &req, &printer(quiet)).context("creating the overlay")?;
    let s = &o.stats;
    let r = OverlayReport::new(&o, &base, &req.options);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(o);
    }
    println!("overlay {} for base {} ({})", r.path.display(), &r.base_id[..16], r.base_name);
    println!(
        "  size {} ({:.4} of the base's {}), {} changed chunks ({}), compression {:?}",
        size(r.overlay_bytes),
        r.ratio(),
        size(r.base_bytes_on_disk),
        r.changed_chunks,
        size(r.changed_chunks * 4096),
        req.options.compression
    );
    let k = &r.kinds;
    println!(
        "  chunks: zero {}, copy-base {}, copy-self {}, patch {}, raw {}",
        k.zero.chunks, k.copy_base.chunks, k.copy_self.chunks, k.patch.chunks, k.raw.chunks
    );
    println!(
        "  resume {}, customize {}, snapshot {}, diff {} (scan {}, compress {}, write {})",
        ms(o.resume),
        ms(o.customize),
        ms(o.snapshot),
        ms(s.total),
        ms(s.scan),
        ms(s.compress),
        ms(s.write)
    );
    if let Some(g) = &o.segments {
        println!(
            "  segmented: {} segments ({} from {}); the first {} ({}) hold what the app touched until it answered",
            g.segments,
            size(g.bytes),
            size(g.input_bytes),
            g.prefetch,
            size(g.prefetch_bytes),
        );
    }
    Ok(o)
}

/// What to ask the app once its VM runs: `--probe PORT[/PATH]` and its options.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Wait for the app's first HTTP answer on this guest port (one the overlay forwards),
    /// GETting PATH (default /); any HTTP answer will do unless --expect-status is given.
    #[arg(long, value_name = "PORT[/PATH]")]
    pub probe: Option<HttpTarget>,
    /// How long --probe waits, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub probe_timeout: u64,
    /// With --probe, wait for this HTTP status (e.g. 200) instead of any answer.
    #[arg(long, value_name = "CODE", requires = "probe", value_parser = clap::value_parser!(u16).range(100..=599))]
    pub expect_status: Option<u16>,
}

impl ProbeArgs {
    fn check(&self) -> Option<HttpCheck> {
        self.probe.as_ref().map(|t| t.check(Duration::from_secs(self.probe_timeout), self.expect_status))
    }
}

/// Options of `cloudlet synthesis`.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthesisArgs {
    /// The overlay file (it names its base by id).
    #[arg(long)]
    pub overlay: PathBuf,
    /// Directory for the rebuilt VM (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Keep the VM running until Enter is pressed (or Ctrl-C); without it the VM is stopped
    /// as soon as the result is printed.
    #[arg(long)]
    pub keep_running: bool,
    /// Keep the rebuilt VM directory afterwards, to start it again with `cloudlet run DIR`
    /// (without it, the directory is removed when the VM stops).
    #[arg(long)]
    pub keep: bool,
    /// With --keep-running: when Enter is pressed, capture what the VM changed against its
    /// base (its residue) into this overlay file before stopping it; synthesis of that file
    /// resumes the VM as it was.
    #[arg(long, value_name = "FILE", requires = "keep_running", conflicts_with_all = ["keep", "early_start"])]
    pub residue: Option<PathBuf>,
    /// Print the result as JSON on stdout (steps still go to stderr).
    #[arg(long)]
    pub json: bool,
    /// Resume the VM before the overlay has arrived (a segmented overlay, `cloudlet overlay
    /// --segmented`): its memory and disks are served as their chunks arrive, the ones the
    /// VM waits for first. --overlay may then be an http:// URL of any server that answers
    /// range requests (e.g. `cloudlet share`). The VM's files are not kept (no --keep).
    #[arg(long, conflicts_with = "keep")]
    pub early_start: bool,
    /// With --early-start: seconds one read of the overlay may take before its source counts
    /// as stalled and the synthesis fails.
    #[arg(long, value_name = "SECS", default_value_t = 30, requires = "early_start",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stall_timeout: u64,
    /// With --early-start: resume at once, without first fetching the working set the
    /// overlay recorded (every chunk the VM touches then waits for its segment).
    #[arg(long, requires = "early_start")]
    pub no_prefetch: bool,
    /// With --early-start: resume once the rest of the working set should arrive within this
    /// many milliseconds (at the rate seen so far), so that the VM computes while it comes; 0
    /// waits for all of it.
    #[arg(long, value_name = "MS", default_value_t = 1000, requires = "early_start",
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub resume_lead_ms: u64,
}

/// Options of `cloudlet segment`.
#[derive(Debug, Clone, clap::Args)]
pub struct SegmentArgs {
    /// The overlay to rewrite.
    #[arg(long)]
    pub overlay: PathBuf,
    /// The segmented overlay to write (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Target size of a working-set segment before compression, in KiB: those are fetched
    /// before the VM resumes, and larger segments compress better.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(4..=65536))]
    pub segment_kib: u64,
    /// Target size of the other segments before compression, in KiB: a VM that waits for one
    /// of their chunks waits for the whole segment.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(4..=65536))]
    pub tail_segment_kib: u64,
    /// Compression level of the segments (the overlay's compressor's scale).
    #[arg(long, default_value_t = 4)]
    pub level: i32,
    /// How many times the VM is resumed to record what it touches: the working set is what any
    /// run touched before the app answered.
    #[arg(long, default_value_t = synthesis::early::FIRST_TOUCH_RUNS, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub recordings: u32,
    /// A touch counts for the aligned run of this many KiB around it (the touches are recorded
    /// as the served memory is read, in the kernel's requests of up to 128 KiB).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(4..=4096))]
    pub granule_kib: u64,
}

/// `cloudlet segment`: rewrites an overlay as a segmented one, in first-touch order.
pub fn segment_cmd(qemu: &Qemu, reg: &Registry, a: &SegmentArgs) -> Result<()> {
    let check = a.probe.check();
    let recording = synthesis::early::Recording { probe: check.clone(), runs: a.recordings };
    let opts = delta_engine::SegmentOptions {
        segment_bytes: (a.segment_kib << 10) as usize,
        tail_segment_bytes: (a.tail_segment_kib << 10) as usize,
        level: a.level,
        granule_chunks: a.granule_kib.div_ceil(4),
    };
    let s = synthesis::early::segment_overlay_file(qemu, reg, &a.overlay, &a.out, &recording, &opts, &printer(false))
        .context("segmenting the overlay")?;
    println!(
        "segmented overlay {}: {} segments ({} from {}); the first {} ({}) hold what the VM touched{}",
        a.out.display(),
        s.segments,
        size(s.bytes),
        size(s.input_bytes),
        s.prefetch,
        size(s.prefetch_bytes),
        if check.is_some() { " until its app answered" } else { " in its first seconds" },
    );
    Ok(())
}

/// Waits until a line arrives on stdin; at the end of stdin (nothing to read), until Ctrl-C.
fn wait_enter_or_interrupt() {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).unwrap_or(0) == 0 {
        loop {
            std::thread::park();
        }
    }
}

/// `cloudlet synthesis`: rebuilds and resumes the VM, reports, keeps it running while asked,
/// stops it, and removes its directory unless `--keep`.
pub fn synthesis_cmd(qemu: &Qemu, reg: &Registry, a: &SynthesisArgs) -> Result<()> {
    if a.early_start {
        return early_synthesis_cmd(qemu, reg, a);
    }
    if a.overlay.to_string_lossy().contains("://") {
        bail!("--overlay {} is a URL: only --early-start reads overlays from URLs", a.overlay.display());
    }
    if let Some(r) = a.residue.as_ref().filter(|r| r.symlink_metadata().is_ok()) {
        bail!("--residue {} exists; give a new file", r.display());
    }
    let mut s = synth(qemu, reg, &a.overlay, &a.out, a.probe.check(), false, a.json, a.keep_running, a.keep)?;
    let dir = s.dir.clone();
    if !a.keep {
        synthesis::remove_on_interrupt(&dir);
    }
    if a.keep_running {
        match &a.residue {
            Some(r) => eprintln!("VM running; press Enter to capture its residue into {} and stop it.", r.display()),
            None => eprintln!("VM running; press Enter (or Ctrl-C) to stop it."),
        }
        wait_enter_or_interrupt();
    }
    if let Some(out) = &a.residue {
        use synthesis::residue::{capture_residue, AfterCapture, ResidueRequest};
        let req =
            ResidueRequest { after: AfterCapture::Pause, ..ResidueRequest::new(out, &s.meta.name, &s.meta.forwards) };
        let r = capture_residue(&mut s.vm, &s.base, &req, &printer(a.json)).context("capturing the residue")?;
        if a.json {
            let v = serde_json::json!({
                "residue": r.path, "bytes": r.bytes, "paused_ms": r.paused.as_millis() as u64,
                "total_ms": r.total.as_millis() as u64,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "  wrote the residue to {} ({}; snapshot {}, {} in all)",
                r.path.display(),
                size(r.bytes),
                ms(r.paused),
                ms(r.total)
            );
        }
    }
    drop(s);
    if !a.keep {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if a.keep_running && !a.json {
        println!("  VM stopped");
    }
    Ok(())
}

/// `cloudlet synthesis --early-start`: resumes the VM as soon as the head and the working set
/// of the segmented overlay are here, reports, then waits for the rest (or, with
/// --keep-running, for Enter) and stops the VM.
pub fn early_synthesis_cmd(qemu: &Qemu, reg: &Registry, a: &SynthesisArgs) -> Result<()> {
    use synthesis::early::{synthesize_early, EarlyOptions, FileSource, HttpSource, OverlaySource};
    let stall = std::time::Duration::from_secs(a.stall_timeout);
    let name = a.overlay.to_string_lossy();
    let source: std::sync::Arc<dyn OverlaySource> = if name.contains("://") {
        std::sync::Arc::new(HttpSource::new(&name, stall).context("opening the overlay's URL")?)
    } else {
        std::sync::Arc::new(FileSource::open(&a.overlay).context("opening the overlay")?)
    };
    let mut opts = EarlyOptions::new(&a.out);
    opts.probe = a.probe.check();
    opts.stall_timeout = stall;
    opts.prefetch = !a.no_prefetch;
    opts.resume_lead = Duration::from_millis(a.resume_lead_ms);
    synthesis::remove_on_interrupt(&a.out);
    let mut vm = synthesize_early(qemu, reg, source, &opts, &printer(a.json)).context("early start")?;
    let t = vm.timeline.clone();
    let at_answer = vm.stats();
    if !a.json {
        println!(
            "resumed '{}' before its overlay had arrived: head {}, working set {}, resume {}, first answer {}",
            vm.meta.name,
            ms(t.head),
            ms(t.prefetch),
            ms(t.resume),
            t.first_answer.map(ms).unwrap_or_else(|| "-".into())
        );
        println!(
            "  fetched {} of {} before the first answer ({} of {} segments, {} asked for by the VM)",
            size(t.bytes_before_answer),
            size(at_answer.total_bytes),
            at_answer.segments_done,
            at_answer.segments,
            at_answer.demanded
        );
        if let Some(answer) = &vm.answer {
            println!("  the app answered: {}", synthesis::first_body_line(answer));
        }
        for (guest, host) in &vm.ports {
            println!("  forward: {}:{host} -> guest :{guest}", opts.forward_address);
        }
    }
    if a.keep_running {
        eprintln!("VM running; press Enter (or Ctrl-C) to stop it.");
        wait_enter_or_interrupt();
    }
    let done = vm.wait_complete(std::time::Duration::from_secs(3600)).context("early start")?;
    if a.json {
        let j = serde_json::json!({
            "name": vm.meta.name,
            "head_ms": t.head.as_millis() as u64,
            "prefetch_ms": t.prefetch.as_millis() as u64,
            "resume_ms": t.resume.as_millis() as u64,
            "first_answer_ms": t.first_answer.map(|d| d.as_millis() as u64),
            "bytes_before_answer": t.bytes_before_answer,
            "bytes": done.bytes,
            "total_bytes": done.total_bytes,
            "segments": done.segments,
            "demanded": done.demanded,
            "complete": done.complete,
            "app_answer": vm.answer.as_deref().map(synthesis::first_body_line),
            "ports": vm.ports.iter().map(|(g, h)| serde_json::json!({"guest": g, "host": h})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "  all {} segments arrived ({}, {} asked for by the VM); the rebuilt images match the overlay's digests",
            done.segments,
            size(done.bytes),
            done.demanded
        );
        println!("  VM stopped");
    }
    drop(vm);
    Ok(())
}

/// `cloudlet synthesis`: returns the running VM. `keep_running` and `keep` only decide what
/// the report says will happen next (the caller stops the VM and removes the directory).
#[allow(clippy::too_many_arguments)]
pub fn synth(
    qemu: &Qemu,
    reg: &Registry,
    overlay: &Path,
    out: &Path,
    probe: Option<HttpCheck>,
    quiet: bool,
    json: bool,
    keep_running: bool,
    keep: bool,
) -> Result<synthesis::Synthesized<vm_driver::QemuVm>> {
    let f = std::fs::File::open(overlay).with_context(|| format!("opening {}", overlay.display()))?;
    let mut opts = SynthesisOptions::new(out);
    // A kept directory must still hold the state synthesis rebuilt when the VM stops.
    opts.in_place = !keep;
    if let Some(c) = probe {
        opts = opts.probe(c);
    }
    let s = synthesize_with(qemu, reg, std::io::BufReader::with_capacity(1 << 20, f), &opts, &printer(quiet))
        .context("synthesis")?;
    let r = SynthesisReport::new(&s, out, keep_running, keep);
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(s);
    }
    let t = &s.timeline;
    println!("synthesized '{}' from base {} ({}) into {}", r.name, &r.base_id[..16], r.base_name, out.display());
    println!(
        "  timeline: read+decompress+apply+verify {} (receive {}, decode {} on the pool, apply {}, verify {}), resume {}, first answer {}, total {}",
        ms(t.rebuild),
        ms(t.receive),
        ms(t.decompress),
        ms(t.apply),
        ms(t.verify),
        ms(t.resume),
        t.first_answer.map(ms).unwrap_or_else(|| "-".into()),
        ms(t.total)
    );
    if let Some(first) = &r.app_answer {
        println!("  the app answered: {first}");
    }
    if keep_running {
        for f in &r.ports {
            println!("  forward: 127.0.0.1:{} -> guest :{}", f.host, f.guest);
        }
    } else {
        println!("  VM stopped (--keep-running keeps it running)");
    }
    if keep {
        println!("  kept {}: start it again with `cloudlet run {}`", out.display(), out.display());
    } else {
        println!("  removing {} when the VM stops (--keep keeps it for `cloudlet run`)", out.display());
    }
    Ok(s)
}

/// Options of `cloudlet run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// A VM directory kept by `cloudlet synthesis --keep` (its base must still be
    /// registered: the VM's disks are layers over the base's).
    pub dir: PathBuf,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// With --probe, keep the VM running after the answer until Enter (or Ctrl-C) instead of
    /// stopping it.
    #[arg(long)]
    pub keep_running: bool,
}

/// `cloudlet run DIR`: resumes a kept synthesized VM, from the state synthesis rebuilt (its
/// files are not changed: the VM writes to layers of its own, dropped when it stops).
pub fn run_cmd(qemu: &Qemu, a: &RunArgs) -> Result<()> {
    use vm_driver::Vm;
    if !a.dir.join("snapshot.json").exists() {
        bail!("{} is not a VM directory kept by `cloudlet synthesis --keep` (no snapshot.json)", a.dir.display());
    }
    let check = a.probe.check();
    let r = synthesis::resume_kept(qemu, &a.dir, check.as_ref(), &printer(false))
        .with_context(|| format!("resuming the VM in {}", a.dir.display()))?;
    for f in r.vm.forwards() {
        println!("  forward: 127.0.0.1:{} -> guest :{}", f.host_port, f.guest_port);
    }
    if let Some(answer) = &r.answer {
        println!("  the app answered: {}", answer.first_body_line());
    }
    if check.is_none() || a.keep_running {
        eprintln!("VM running; press Enter (or Ctrl-C) to stop it.");
        wait_enter_or_interrupt();
    }
    r.vm.shutdown().context("stopping the VM")?;
    println!("  VM stopped");
    Ok(())
}

/// `cloudlet demo`: the whole flow on the test guest in `guest`, or with `debian`, on the Debian
/// guest in `guest` (`scripts/build-debian-guest.sh`).
pub fn demo(work: &Path, guest: &Path, debian: bool) -> Result<()> {
    let missing = |path: PathBuf, script: &str| anyhow::anyhow!("{} is missing: run {script} first", path.display());
    // The base's arguments, the app's commands, and what the steps say about them.
    let (args, app, guest_says) = if debian {
        let g = match guest_demo::DebianGuest::open(guest) {
            Err(synthesis::FlowError::Io { path, .. }) => return Err(missing(path, "scripts/build-debian-guest.sh")),
            r => r?,
        };
        let mut args = BaseArgs::new("debian", vec![g.disk]);
        args.ram_mib = guest_demo::DebianGuest::RAM_BYTES >> 20;
        args.ready = Some(guest_demo::TestGuest::READY.into());
        (args, guest_demo::debian_app_commands(), "boot the Debian guest from its own disk")
    } else {
        let g = match guest_demo::TestGuest::open(guest) {
            Err(synthesis::FlowError::Io { path, .. }) => return Err(missing(path, "scripts/build-guest.sh")),
            r => r?,
        };
        let mut args = BaseArgs::new("debian-busybox", vec![g.disk]);
        args.kernel = Some(g.kernel);
        args.initrd = Some(g.initrd);
        args.append = Some(guest_demo::TestGuest::CMDLINE.into());
        args.ram_mib = guest_demo::TestGuest::RAM_BYTES >> 20;
        args.ready = Some(guest_demo::TestGuest::READY.into());
        (args, guest_demo::app_commands(), "boot the test guest")
    };
    match guest_demo::claim_work_dir(work) {
        Err(guest_demo::WorkDirError::NotOurs(w)) => {
            bail!("{} exists and was not made by `cloudlet demo`: choose another --work", w.display())
        }
        r => r.context("preparing the demo's work directory")?,
    }
    let qemu = Qemu::new()?;
    let reg = Registry::open(&work.join("registry"))?;
    let t0 = std::time::Instant::now();
    println!("== 1/3 base: {guest_says}, snapshot it, index it");
    let b = base(&qemu, &reg, &args, false)?;
    println!("== 2/3 overlay: resume the base, install a web app on port 8080, capture the overlay");
    let o = overlay(
        &qemu,
        &reg,
        &OverlayArgs {
            base: b.entry.manifest.name.clone(),
            name: "webapp".into(),
            customize: app,
            via: ViaArgs::default(),
            forwards: vec![guest_demo::app_forward()],
            redir: vec![],
            out: work.join("webapp.overlay"),
            xz: false,
            level: None,
            interactive: false,
            vnc: false,
            wait: WaitArgs {
                wait_http: Some(HttpTarget { port: guest_demo::APP_PORT, path: "/".into() }),
                wait_timeout: 300,
                expect_status: None,
            },
            trim: false,
            json: false,
            segmented: false,
        },
        false,
    )?;
    println!("== 3/3 synthesis: rebuild the custom VM from base + overlay, resume it, ask the app");
    let probe = guest_demo::app_check(Duration::from_secs(60));
    let s = synth(&qemu, &reg, &o.path, &work.join("vm"), Some(probe), false, false, false, true)?;
    let (base_alloc, base_apparent) = b.sizes();
    println!("== summary");
    println!("  base VM:  {} on disk ({} apparent)", size(base_alloc), size(base_apparent));
    println!(
        "  overlay:  {} = {:.2}% of the base on disk",
        size(o.stats.overlay_bytes),
        o.stats.overlay_bytes as f64 * 100.0 / base_alloc.max(1) as f64
    );
    println!("  synthesis to first answer: {}", ms(s.timeline.total));
    println!("  whole demo: {}", ms(t0.elapsed()));
    drop(s);
    Ok(())
}

/// `cloudlet list-base`: a table with a header, sizes on disk and apparent.
pub fn list_base(reg: &Registry, json: bool) -> Result<()> {
    let all = BaseListing::all(reg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no bases in {}", reg.root().display());
        return Ok(());
    }
    println!("{:<16}  {:<20} {:>11} {:>11}  VM", "ID", "NAME", "ON DISK", "APPARENT");
    for b in all {
        let s = &b.spec;
        println!(
            "{}  {:<20} {:>11} {:>11}  {} MiB RAM, {} disk(s), {} {}",
            &b.id[..16],
            b.name,
            size(b.bytes_on_disk),
            size(b.bytes_apparent),
            s.ram_bytes >> 20,
            s.disks.len(),
            s.machine_type,
            s.accelerator
        );
    }
    Ok(())
}
