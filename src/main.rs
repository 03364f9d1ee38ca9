//! `moat`: parse the QEMU-style command line, open what the VM needs,
//! confine the process, and run the VM until it powers off (exit 0), resets
//! with `-no-reboot` (exit 0), or fails (a one-line error, exit 1).
//!
//! This file only wires the layers together: `moat_cli` turns argv into a
//! `moat_config::VmConfig`, `moat_vmm::Machine` opens and runs the VM,
//! `moat_monitor` serves QMP/HMP through `moat_api`, and
//! `moat_sandbox::confine` owns the order of confinement.

use moat_cli::{Action, HELP};
use moat_config::{RunAs, VmConfig};
use moat_monitor::qmp::MonitorContext;
use moat_monitor::server::{MonitorSpec, Monitors};
use moat_monitor::VmInfo;
use moat_sys::fdset::FdStore;
use moat_vmm::{Machine, VmEvent};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn log_init() {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            // virtio-queue logs the driver's mistakes as errors: guest-triggered,
            // so shown only when debugging, never as a host log storm.
            if m.target().starts_with("virtio_queue") {
                return self.0 >= log::LevelFilter::Debug;
            }
            m.level() <= self.0
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!("moat: {}: {}", r.level().as_str().to_lowercase(), r.args());
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("MOAT_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        _ => log::LevelFilter::Warn,
    };
    if level >= log::LevelFilter::Debug {
        moat_sys::timeline::enable();
    }
    let _ = log::set_boxed_logger(Box::new(Stderr(level)));
    log::set_max_level(level);
}

/// `-add-fd`: inherited descriptors, checked and duplicated as QEMU does.
fn fd_sets(cfg: &VmConfig) -> anyhow::Result<FdStore> {
    let mut fds = FdStore::default();
    for a in &cfg.add_fds {
        let fd = moat_sys::fdset::take_inherited(a.fd)
            .map_err(|e| anyhow::anyhow!("-add-fd fd={},set={}: {e}", a.fd, a.set))?;
        fds.add(Some(a.set), fd, a.opaque.clone())
            .map_err(|e| anyhow::anyhow!("-add-fd: {e}"))?;
    }
    Ok(fds)
}

/// The process name `-name ...,process=` asks for (at most 15 bytes).
fn set_process_name(name: &str) {
    let n = name.len().min(15);
    let name = &name.as_bytes()[..n];
    if let Ok(c) = std::ffi::CString::new(name) {
        let _ = rustix::thread::set_name(&c);
    }
}

fn run(cfg: VmConfig) -> anyhow::Result<()> {
    let err = |e: String| anyhow::anyhow!(e);
    // -run-with user=NAME: looked up now, while /etc is still reachable.
    let run_as = match &cfg.run_as {
        None => None,
        Some(RunAs::Ids(u, g)) => Some((*u, *g)),
        Some(RunAs::User(name)) => Some(
            moat_sandbox::privs::lookup_user(name)
                .map_err(|e| anyhow::anyhow!("-run-with: {e}"))?,
        ),
    };
    let root_warning = moat_sandbox::privs::refuse_privileged(run_as.is_some()).map_err(err)?;
    if run_as.is_some() {
        // Before the first thread: the threads inherit these sets.
        moat_sandbox::privs::give_up_inherited_capabilities()
            .map_err(|e| anyhow::anyhow!("-run-with user: {e}"))?;
    }
    let fds = Arc::new(Mutex::new(fd_sets(&cfg)?));
    let mut sockets = moat_monitor::server::take_inherited_sockets(&cfg).map_err(err)?;
    // Taps (by name, or handed in as descriptors) and stream sockets.
    let nics = moat_vmm::nic::open(&cfg.nics).map_err(err)?;
    // Nothing else inherited stays open (QEMU keeps them; a guest that
    // escapes must not find the parent's pipes or sockets).
    moat_sys::fdset::close_inherited().map_err(err)?;
    if let Some(p) = &cfg.process_name {
        set_process_name(p);
    }
    moat_vmm::control::init_kick_signal()?;
    moat_sys::timeline::mark("inherited descriptors");
    let mut machine = Machine::new(cfg.clone(), fds.clone(), nics, moat_guests::DEMO)?;
    moat_sys::timeline::mark("images, disks, console and /dev/kvm opened");
    let _pidfile = match &cfg.pidfile {
        Some(p) => Some(moat_sys::PidFile::create(p).map_err(err)?),
        None => None,
    };
    let tx = machine.sender();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])?;
    moat_sys::gate::spawn_gated("signals", moat_sys::role::Role::Io, move || {
        for s in signals.forever() {
            let _ = tx.send(VmEvent::Signal(s));
        }
    })?;
    let specs = MonitorSpec::from_config(&cfg, &mut sockets).map_err(err)?;
    let monitors = if specs.is_empty() {
        None
    } else {
        let ctx = Arc::new(MonitorContext {
            info: VmInfo {
                name: cfg.name.clone(),
                uuid: cfg.uuid.clone(),
            },
            vm: machine.client(),
            fds,
        });
        let m = Monitors::start(&specs, ctx)?;
        machine.set_events(Arc::new(m.clone()));
        Some(m)
    };
    // Removed when run() returns, as QEMU removes them at exit.
    let _sockets = moat_sys::SocketFiles::note(cfg.unix_socket_paths());
    moat_sys::timeline::mark("signal thread and monitors started");
    // Everything is open: confine the process before the guest runs.
    moat_sandbox::confine(&moat_sandbox::Policy::for_vm(&cfg, run_as)).map_err(err)?;
    // wait=on monitors: the guest starts once each has its first client
    // (moat waits with the sandbox in place, so no stranger's bytes reach
    // an unconfined moat).
    if let Some(m) = &monitors {
        while !m.wait_for_clients(Duration::from_millis(100)) {
            if let Some(s) = machine.wait_before_start(Duration::ZERO) {
                eprintln!("moat: terminating on signal {s}");
                return Ok(());
            }
        }
    }
    machine.note_on_first_boot(root_warning);
    let outcome = machine.run();
    if let Some(m) = &monitors {
        m.flush(Duration::from_secs(1));
    }
    Ok(outcome?)
}

/// Keep glibc's malloc from holding on to freed memory. By default a freed
/// mmap'd block raises the mmap threshold to its size, so the next kernel or
/// initrd buffer (read for each boot, then freed) came from the brk heap and
/// stayed resident: 16 MiB of moat's 121 MiB in the Tier 2 boot, in huge
/// pages. Fixed thresholds turn that adjustment off: big buffers are mapped
/// and unmapped, and the heap's free top goes back to the kernel.
fn malloc_returns_memory() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10);
    }
}

fn main() -> ExitCode {
    malloc_returns_memory();
    log_init();
    moat_sys::timeline::mark("main");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match moat_cli::parse_args(&args) {
        Ok(Action::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Ok(Action::Version) => {
            // The first line in QEMU's format, which management tools parse.
            let (a, b, c) = moat_monitor::QEMU_VERSION;
            println!(
                "QEMU emulator version {a}.{b}.{c} (moat {})",
                env!("CARGO_PKG_VERSION")
            );
            println!(
                "moat: a KVM virtual machine monitor that speaks QEMU's command line, QMP and HMP"
            );
            return ExitCode::SUCCESS;
        }
        Ok(Action::Run(cfg)) => {
            moat_sys::timeline::mark("arguments parsed");
            *cfg
        }
        Err(e) => {
            eprintln!("moat: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat: {e:#}");
            ExitCode::FAILURE
        }
    }
}
