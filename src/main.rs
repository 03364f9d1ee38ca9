//! `moat`: parse the QEMU-style command line, read the guest images, and run
//! the VM until it powers off (exit 0), resets with `-no-reboot` (exit 0), or
//! fails (a one-line error, exit 1).

use anyhow::Context as _;
use moat_cli::{Action, HELP};
use moat_config::{Object, SocketAddr, VmConfig};
use moat_monitor::authz::Authz;
use moat_monitor::qmp::{FdStore, MonitorContext};
use moat_monitor::server::{Endpoint, MonitorSpec, Monitors};
use moat_monitor::tls::TlsServer;
use moat_monitor::{QmpError, VmCommand, VmControl, VmInfo};
use moat_sys::lock;
use moat_vmm::{BootImages, Control, ControlReply, Lifecycle, Platform, Vm, VmEvent, VmExit};
use serde_json::{json, Value};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Command line handed to the demo guest.
const DEMO_CMDLINE: &str = "console=ttyS0 moat.demo=1";

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
    let _ = log::set_boxed_logger(Box::new(Stderr(level)));
    log::set_max_level(level);
}

/// Read a guest image (a path, or /dev/fdset/N from -add-fd), refusing
/// anything that could not fit in guest RAM.
fn read_image(opt: &str, path: &Path, limit: u64, fds: &FdStore) -> anyhow::Result<Vec<u8>> {
    let ctx = || format!("{opt} {}", path.display());
    let f = match fds.open_fdset(path, false) {
        Some(f) => f,
        None => std::fs::File::open(path),
    }
    .with_context(ctx)?;
    let len = f.metadata().with_context(ctx)?.len();
    if len > limit {
        anyhow::bail!(
            "{}: {len} bytes cannot fit in {} MiB of guest RAM",
            ctx(),
            limit >> 20
        );
    }
    let mut data = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, limit + 1), &mut data)
        .with_context(ctx)?;
    if data.len() as u64 > limit {
        anyhow::bail!("{}: grew beyond guest RAM while reading", ctx());
    }
    Ok(data)
}

/// The pid file, locked and removed at exit as QEMU does.
/// The open file holds the lock until moat exits.
struct PidFile(PathBuf, #[allow(dead_code)] std::fs::File);

impl PidFile {
    fn create(path: &Path) -> anyhow::Result<PidFile> {
        let ctx = || format!("-pidfile {}", path.display());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(ctx)?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!(
                "{}: cannot lock pid file: {}",
                ctx(),
                std::io::Error::last_os_error()
            );
        }
        f.set_len(0).with_context(ctx)?;
        writeln!(f, "{}", std::process::id()).with_context(ctx)?;
        Ok(PidFile(path.to_path_buf(), f))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The UNIX sockets moat listens on (monitors, the serial port).
fn socket_paths(cfg: &VmConfig) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = cfg
        .monitors
        .iter()
        .filter_map(|m| match &m.socket.addr {
            SocketAddr::Unix(p) => Some(p.clone()),
            SocketAddr::Tcp { .. } | SocketAddr::Fd(_) => None,
        })
        .collect();
    if let Some(moat_config::SerialBackend::UnixServer { path, .. }) = &cfg.serial {
        v.push(path.clone());
    }
    v
}

/// The socket files moat made, removed at exit as QEMU removes them: only
/// while the path is still the socket moat bound (same device and inode).
struct SocketFiles(Vec<(PathBuf, u64, u64)>);

impl SocketFiles {
    fn note(paths: Vec<PathBuf>) -> SocketFiles {
        use std::os::unix::fs::MetadataExt;
        SocketFiles(
            paths
                .into_iter()
                .filter_map(|p| {
                    let m = std::fs::symlink_metadata(&p).ok()?;
                    Some((p, m.dev(), m.ino()))
                })
                .collect(),
        )
    }
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        for (p, dev, ino) in &self.0 {
            let same = std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.file_type().is_socket() && m.dev() == *dev && m.ino() == *ino);
            if same {
                // After -run-with user= the directory may no longer be
                // writable for moat; QEMU leaves the file then too.
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// What moat may still open once the guest runs (Landlock): the images as
/// their drives allow (backing layers read-only; fd-set descriptors need no
/// path), and removing the pid file. /dev/kvm stays open from startup.
fn fs_policy(cfg: &VmConfig) -> moat_sandbox::landlock::FsPolicy {
    let mut p = moat_sandbox::landlock::FsPolicy {
        ..Default::default()
    };
    let path_ok = |f: &std::path::Path| !moat_sys::fdset::is_fdset_path(f);
    for d in &cfg.drives {
        if path_ok(&d.file) {
            if d.read_only {
                p.read.push(d.file.clone());
            } else {
                p.read_write.push(d.file.clone());
            }
        }
        if let Some(df) = d.data_file.as_ref().filter(|f| path_ok(f)) {
            if d.read_only {
                p.read.push(df.clone());
            } else {
                p.read_write.push(df.clone());
            }
        }
        let mut layer = &d.backing;
        while let moat_config::Backing::Layer(l) = layer {
            p.read.extend(
                [Some(&l.file), l.data_file.as_ref()]
                    .into_iter()
                    .flatten()
                    .filter(|f| path_ok(f))
                    .cloned(),
            );
            layer = &l.backing;
        }
    }
    // Removing the pid file and the sockets at exit.
    for f in cfg.pidfile.iter().cloned().chain(socket_paths(cfg)) {
        if let Some(dir) = std::fs::canonicalize(&f)
            .ok()
            .and_then(|f| f.parent().map(|d| d.to_path_buf()))
        {
            if !p.remove_in.contains(&dir) {
                p.remove_in.push(dir);
            }
        }
    }
    p
}

/// The environment switch that lets moat run as root without a privilege
/// drop. For development only: a guest that escapes then owns the host.
const ALLOW_ROOT_ENV: &str = "MOAT_DANGEROUSLY_ALLOW_ROOT";

/// A privileged moat must drop its privileges once set up (`-run-with
/// user=`) or be started unprivileged (by moat-jail): a guest that escapes
/// into moat must not find root there. Stricter than QEMU, which runs as
/// root when asked.
///
/// With the development switch: the warning to print once the VM is set up
/// (so that a setup error stays a one-line message).
fn refuse_privileged(drops: bool) -> anyhow::Result<Option<String>> {
    let Some(why) = moat_sandbox::privs::privileged() else {
        return Ok(None);
    };
    if drops {
        return Ok(None);
    }
    if std::env::var_os(ALLOW_ROOT_ENV).is_some_and(|v| v == "1") {
        return Ok(Some(format!(
            "moat: warning: {why} with no privilege drop ({ALLOW_ROOT_ENV}=1): a guest that escapes into moat owns this host"
        )));
    }
    anyhow::bail!(
        "refusing to start: {why}. A guest that escapes into moat would have these privileges. \
         Add -run-with user=USER (moat opens the VM's files first, then becomes USER), \
         or start moat through moat-jail; {ALLOW_ROOT_ENV}=1 overrides this, for development only"
    )
}

/// The monitor's handle on the VM: commands travel to the control loop.
struct VmHandle {
    tx: Mutex<mpsc::Sender<VmEvent>>,
    /// Started with -S and never continued.
    prelaunch: AtomicBool,
    /// `quit` was answered; moat quits once the reply is queued.
    quit_requested: AtomicBool,
    /// Dies per socket (`query-cpus-fast` shows die-id when above 1).
    dies: u32,
    /// The disks, as `query-block` names them.
    drives: Vec<DriveInfo>,
    /// Block nodes made by `blockdev-add` (microvm has no hotplug, so no
    /// device uses them; QEMU's microvm is the same).
    nodes: Mutex<Vec<MonitorNode>>,
}

/// A node made by `blockdev-add`.
struct MonitorNode {
    name: String,
    driver: String,
    cfg: moat_config::DriveConfig,
    disk: moat_vmm::Disk,
}

/// At most this many `blockdev-add` nodes (each holds descriptors and caches).
const MAX_MONITOR_NODES: usize = 64;

/// A moat open error as QEMU words it for the monitor: without the
/// command-line option in front or Rust's "(os error N)".
fn monitor_message(e: &str) -> String {
    let e = match e.strip_prefix("-drive file=") {
        Some(rest) => rest.split_once(": ").map_or(rest, |(_, m)| m),
        None => e,
    };
    match e.rfind(" (os error ") {
        Some(i) if e.ends_with(')') => e[..i].to_string(),
        _ => e.to_string(),
    }
}

/// QEMU's BlockDeviceInfo for a node (query-block's `inserted`,
/// query-named-block-nodes' entries), without throttling fields.
fn block_device_info(c: &moat_config::DriveConfig, node: &str, drv: &str, size: u64) -> Value {
    use moat_config::{Backing, CacheMode};
    let mut depth = 0;
    let mut layer = &c.backing;
    while let Backing::Layer(l) = layer {
        depth += 1;
        layer = &l.backing;
    }
    let mut info = json!({
        "file": c.file.display().to_string(), "node-name": node, "ro": c.read_only,
        "drv": drv, "encrypted": false, "detect_zeroes": "off", "backing_file_depth": depth,
        "write_threshold": 0,
        "cache": {
            "writeback": !matches!(c.cache, CacheMode::Writethrough | CacheMode::Directsync),
            "direct": matches!(c.cache, CacheMode::None | CacheMode::Directsync),
            "no-flush": matches!(c.cache, CacheMode::Unsafe),
        },
    });
    if let Backing::Layer(l) = &c.backing {
        info["backing_file"] = json!(l.file.display().to_string());
    }
    let mut image = image_info(&c.layer(), Some(size));
    image["dirty-flag"] = json!(false);
    info["image"] = image;
    info
}

/// A disk as the monitor reports it.
struct DriveInfo {
    name: String,
    cfg: moat_config::DriveConfig,
    size: u64,
    link: moat_devices::virtio::block::DriveLink,
}

impl DriveInfo {
    /// QEMU's names: the drive id, else "virtioN" by position among id-less drives.
    fn list(cfg: &VmConfig, disks: &[moat_vmm::Disk]) -> Vec<DriveInfo> {
        let mut anon = 0;
        cfg.drives
            .iter()
            .zip(disks)
            .map(|(d, disk)| {
                let name = d.id.clone().unwrap_or_else(|| {
                    anon += 1;
                    format!("virtio{}", anon - 1)
                });
                DriveInfo {
                    name,
                    cfg: d.clone(),
                    size: disk.image.size(),
                    link: disk.link.clone(),
                }
            })
            .collect()
    }

    fn query_block(&self, index: usize) -> Value {
        let c = &self.cfg;
        let mut inserted = block_device_info(c, &node_name(index), c.format.name(), self.size);
        // QEMU's fields: the averages always, bursts and the group only
        // while throttling is on, each burst field only when set.
        let t = self.link.throttle.limits();
        for (k, v) in [
            ("bps", t.bps),
            ("bps_rd", t.bps_rd),
            ("bps_wr", t.bps_wr),
            ("iops", t.iops),
            ("iops_rd", t.iops_rd),
            ("iops_wr", t.iops_wr),
        ] {
            inserted[k] = json!(v);
        }
        if t.enabled() {
            let bursts = [
                ("bps_max", t.bps_max, t.bps_max_length),
                ("bps_rd_max", t.bps_rd_max, t.bps_rd_max_length),
                ("bps_wr_max", t.bps_wr_max, t.bps_wr_max_length),
                ("iops_max", t.iops_max, t.iops_max_length),
                ("iops_rd_max", t.iops_rd_max, t.iops_rd_max_length),
                ("iops_wr_max", t.iops_wr_max, t.iops_wr_max_length),
            ];
            for (k, max, len) in bursts {
                if max != 0 {
                    inserted[k] = json!(max);
                    inserted[format!("{k}_length")] = json!(len);
                }
            }
            if t.iops_size != 0 {
                inserted["iops_size"] = json!(t.iops_size);
            }
            inserted["group"] = json!(self.name);
        }
        json!({
            "device": self.name,
            "qdev": format!("/machine/peripheral-anon/device[{index}]"),
            "locked": false,
            "removable": false,
            "type": "unknown",
            "io-status": "ok",
            "inserted": inserted,
        })
    }

    fn query_blockstats(&self, index: usize) -> Value {
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.link.stats;
        json!({
            "device": self.name,
            "node-name": node_name(index),
            "qdev": format!("/machine/peripheral-anon/device[{index}]"),
            "stats": {
                "rd_bytes": g(&s.rd_bytes), "wr_bytes": g(&s.wr_bytes), "unmap_bytes": 0,
                "rd_operations": g(&s.rd_operations), "wr_operations": g(&s.wr_operations),
                "flush_operations": g(&s.flush_operations), "unmap_operations": g(&s.unmap_operations),
                "failed_rd_operations": g(&s.failed_rd_operations), "failed_wr_operations": g(&s.failed_wr_operations),
                "failed_flush_operations": g(&s.failed_flush_operations), "failed_unmap_operations": 0,
                "invalid_rd_operations": 0, "invalid_wr_operations": 0, "invalid_flush_operations": 0,
                "invalid_unmap_operations": 0, "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
                "rd_total_time_ns": 0, "wr_total_time_ns": 0, "flush_total_time_ns": 0, "unmap_total_time_ns": 0,
                "wr_highest_offset": 0, "account_invalid": true, "account_failed": true,
                "timed_stats": []
            }
        })
    }
}

/// QEMU's automatic block node name of the `index`th drive.
fn node_name(index: usize) -> String {
    format!("#block{:03}", index * 2 + 1)
}

/// QEMU's ImageInfo for one layer and, nested, the layers below it.
fn image_info(layer: &moat_config::ImageLayer, size: Option<u64>) -> Value {
    let meta = std::fs::metadata(&layer.file).ok();
    let actual = meta
        .as_ref()
        .map(|m| std::os::unix::fs::MetadataExt::blocks(m) * 512)
        .unwrap_or(0);
    let size = size
        .or_else(|| match layer.format {
            moat_config::DriveFormat::Qcow2 => std::fs::File::open(&layer.file)
                .ok()
                .and_then(|f| moat_block::qcow2::virtual_size(&f)),
            moat_config::DriveFormat::Raw => meta.map(|m| m.len()),
        })
        .unwrap_or(0);
    let mut v = json!({
        "filename": layer.file.display().to_string(),
        "format": layer.format.name(),
        "virtual-size": size,
        "actual-size": actual,
    });
    if let moat_config::Backing::Layer(b) = &layer.backing {
        v["backing-filename"] = json!(b.file.display().to_string());
        v["full-backing-filename"] = json!(b.file.display().to_string());
        v["backing-filename-format"] = json!(b.format.name());
        v["backing-image"] = image_info(b, None);
    }
    v
}

impl VmHandle {
    fn send(&self, cmd: Control) -> Result<ControlReply, QmpError> {
        let (reply, rx) = mpsc::channel();
        let sent = lock(&self.tx).send(VmEvent::Control { cmd, reply });
        if sent.is_err() {
            return Err(QmpError::generic("the VM is shutting down"));
        }
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| QmpError::generic("the VM did not answer"))
    }
}

impl VmControl for VmHandle {
    fn execute(&self, cmd: VmCommand) -> Result<Value, QmpError> {
        let control = match cmd {
            VmCommand::Stop => Control::Stop,
            VmCommand::Cont => Control::Cont,
            VmCommand::SystemReset => Control::Reset,
            VmCommand::SystemPowerdown => Control::Powerdown,
            VmCommand::Quit => {
                self.quit_requested.store(true, Ordering::SeqCst);
                return Ok(json!({}));
            }
            VmCommand::QueryStatus => Control::Status,
            VmCommand::QueryCpusFast => Control::Cpus,
            VmCommand::Registers(cpu) => Control::Registers(cpu),
            VmCommand::QueryBlock => {
                return Ok(Value::Array(
                    self.drives
                        .iter()
                        .enumerate()
                        .map(|(i, d)| d.query_block(i))
                        .collect(),
                ))
            }
            VmCommand::QueryBlockstats => {
                return Ok(Value::Array(
                    self.drives
                        .iter()
                        .enumerate()
                        .map(|(i, d)| d.query_blockstats(i))
                        .collect(),
                ))
            }
            VmCommand::BlockSetIoThrottle(dev, limits) => {
                let Some(d) = self.drives.iter().find(|d| d.name == dev) else {
                    return Err(QmpError::device_not_found(format!(
                        "Device '{dev}' not found"
                    )));
                };
                d.link.throttle.set(limits);
                return Ok(json!({}));
            }
            VmCommand::QueryNamedBlockNodes => {
                let throttle_off = |mut v: Value| {
                    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
                        v[k] = json!(0);
                    }
                    v
                };
                let mut out: Vec<Value> = self
                    .drives
                    .iter()
                    .enumerate()
                    .map(|(i, d)| d.query_block(i)["inserted"].clone())
                    .collect();
                out.extend(lock(&self.nodes).iter().map(|n| {
                    throttle_off(block_device_info(
                        &n.cfg,
                        &n.name,
                        &n.driver,
                        n.disk.image.size(),
                    ))
                }));
                return Ok(Value::Array(out));
            }
            VmCommand::BlockdevDel(name) => {
                if (0..self.drives.len()).any(|i| node_name(i) == name) {
                    return Err(QmpError::generic(format!("Node {name} is in use")));
                }
                let mut nodes = lock(&self.nodes);
                let Some(i) = nodes.iter().position(|n| n.name == name) else {
                    return Err(QmpError::generic(format!(
                        "Failed to find node with node-name='{name}'"
                    )));
                };
                let n = nodes.remove(i);
                if let Err(e) = n.disk.image.flush() {
                    log::warn!("blockdev-del {name}: flushing: {e}");
                }
                return Ok(json!({}));
            }
            VmCommand::Eject(dev) => {
                return Err(if self.drives.iter().any(|d| d.name == dev) {
                    QmpError::generic(format!("Device '{dev}' is not removable"))
                } else {
                    QmpError::device_not_found(format!("Device '{dev}' not found"))
                })
            }
        };
        match self.send(control)? {
            ControlReply::Done => {
                if control == Control::Cont {
                    self.prelaunch.store(false, Ordering::SeqCst);
                }
                Ok(json!({}))
            }
            ControlReply::Status { running, status } => {
                let status = if !running && self.prelaunch.load(Ordering::SeqCst) {
                    "prelaunch"
                } else {
                    status
                };
                Ok(json!({"running": running, "singlestep": false, "status": status}))
            }
            ControlReply::Cpus(cpus) => Ok(Value::Array(
                cpus.iter()
                    .map(|c| {
                        let p = &c.position;
                        let mut props =
                            json!({"core-id": p.core, "thread-id": p.thread, "socket-id": p.socket});
                        // QEMU reports die-id only on machines with several dies.
                        if self.dies > 1 {
                            props["die-id"] = json!(p.die);
                        }
                        json!({
                            "cpu-index": c.index,
                            "qom-path": format!("/machine/unattached/device[{}]", c.index),
                            "thread-id": c.thread_id,
                            "props": props,
                            "target": "x86_64"
                        })
                    })
                    .collect(),
            )),
            ControlReply::Text(t) => Ok(Value::String(t)),
            ControlReply::Error(e) => Err(QmpError::generic(e)),
        }
    }

    fn blockdev_add(
        &self,
        node: String,
        driver: String,
        drive: moat_config::DriveConfig,
        fds: &FdStore,
    ) -> Result<Value, QmpError> {
        let mut nodes = lock(&self.nodes);
        if self.drives.iter().any(|d| d.name == node) {
            return Err(QmpError::generic(format!(
                "node-name={node} is conflicting with a device id"
            )));
        }
        if nodes.iter().any(|n| n.name == node) {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{node}'"
            )));
        }
        if nodes.len() >= MAX_MONITOR_NODES {
            return Err(QmpError::generic(format!(
                "moat keeps at most {MAX_MONITOR_NODES} nodes made by blockdev-add"
            )));
        }
        // With the sandbox on, Landlock refuses paths the VM was not
        // configured with: hand files in with add-fd and /dev/fdset/N.
        let disk = moat_vmm::Disk::open(&drive, fds)
            .map_err(|e| QmpError::generic(monitor_message(&e)))?;
        nodes.push(MonitorNode {
            name: node,
            driver,
            cfg: drive,
            disk,
        });
        Ok(json!({}))
    }

    fn replied(&self) {
        if self.quit_requested.swap(false, Ordering::SeqCst) {
            let (reply, _) = mpsc::channel();
            let _ = lock(&self.tx).send(VmEvent::Control {
                cmd: Control::Quit,
                reply,
            });
        }
    }
}

/// Lifecycle events, as QMP events for every monitor.
struct Events(Option<Monitors>);

impl Events {
    fn emit(&self, name: &str, data: Option<Value>) {
        if let Some(m) = &self.0 {
            m.emit(name, data);
        }
    }
    fn shutdown(&self, guest: bool, reason: &str) {
        self.emit("SHUTDOWN", Some(json!({"guest": guest, "reason": reason})));
    }
    fn reset(&self, guest: bool, reason: &str) {
        self.emit("RESET", Some(json!({"guest": guest, "reason": reason})));
    }
}

impl Lifecycle for Events {
    fn stopped(&self) {
        self.emit("STOP", None);
    }
    fn resumed(&self) {
        self.emit("RESUME", None);
    }
    fn powerdown(&self) {
        self.emit("POWERDOWN", None);
    }
}

/// The authorization policy of the object `id` (the CLI checked it exists).
fn authz_object(cfg: &VmConfig, id: &str) -> anyhow::Result<Authz> {
    match cfg.objects.iter().find(|o| o.id() == id) {
        Some(Object::AuthzSimple { identity, .. }) => Ok(Authz::Simple(identity.clone())),
        Some(Object::AuthzList {
            default_allow,
            rules,
            ..
        }) => Ok(Authz::List {
            default_allow: *default_allow,
            rules: rules.clone(),
        }),
        _ => anyhow::bail!("no authz object '{id}'"),
    }
}

fn monitor_specs(
    cfg: &VmConfig,
    socket_fds: &mut std::collections::HashMap<i32, std::os::unix::net::UnixListener>,
) -> anyhow::Result<Vec<MonitorSpec>> {
    cfg.monitors
        .iter()
        .map(|m| {
            let endpoint = match &m.socket.addr {
                SocketAddr::Unix(path) => Endpoint::Unix(path.clone()),
                SocketAddr::Fd(n) => match socket_fds.remove(n) {
                    Some(l) => Endpoint::UnixFd(*n, Arc::new(l)),
                    None => anyhow::bail!("-chardev socket,fd={n}: used by two monitors"),
                },
                SocketAddr::Tcp { host, port } => {
                    let creds = m.socket.tls_creds.as_deref().unwrap_or_default();
                    let Some(Object::TlsCredsX509 { dir, .. }) =
                        cfg.objects.iter().find(|o| o.id() == creds)
                    else {
                        anyhow::bail!("no tls-creds-x509 object '{creds}'");
                    };
                    let tls = TlsServer::load(dir)
                        .map_err(|e| anyhow::anyhow!("-object tls-creds-x509,id={creds}: {e}"))?;
                    let authz =
                        authz_object(cfg, m.socket.tls_authz.as_deref().unwrap_or_default())?;
                    Endpoint::Tcp {
                        host: host.clone(),
                        port: *port,
                        tls,
                        authz: Arc::new(authz),
                    }
                }
            };
            Ok(MonitorSpec {
                endpoint,
                mode: m.mode,
                wait: m.socket.wait,
            })
        })
        .collect()
}

fn run(cfg: VmConfig) -> anyhow::Result<()> {
    // -run-with user=NAME: looked up now, while /etc is still reachable.
    let run_as = match &cfg.run_as {
        None => None,
        Some(moat_config::RunAs::Ids(u, g)) => Some((*u, *g)),
        Some(moat_config::RunAs::User(name)) => Some(
            moat_sandbox::privs::lookup_user(name)
                .map_err(|e| anyhow::anyhow!("-run-with: {e}"))?,
        ),
    };
    let mut root_warning = refuse_privileged(run_as.is_some())?;
    if run_as.is_some() {
        // Before the first thread: the threads inherit these sets.
        moat_sandbox::privs::give_up_inherited_capabilities()
            .map_err(|e| anyhow::anyhow!("-run-with user: {e}"))?;
    }
    // -add-fd: inherited descriptors, checked and duplicated as QEMU does.
    let mut fds = FdStore::default();
    for a in &cfg.add_fds {
        let fd = moat_sys::fdset::take_inherited(a.fd)
            .map_err(|e| anyhow::anyhow!("-add-fd fd={},set={}: {e}", a.fd, a.set))?;
        fds.add(Some(a.set), fd, a.opaque.clone())
            .map_err(|e| anyhow::anyhow!("-add-fd: {e}"))?;
    }
    let kernel = match &cfg.kernel {
        Some(k) => read_image("-kernel", k, cfg.mem_size, &fds)?,
        None => moat_guests::DEMO.to_vec(),
    };
    // Validate the kernel for this machine before opening anything else.
    moat_boot::parse_kernel(&kernel, &moat_boot::layout::MemLayout::new(cfg.mem_size))
        .with_context(|| match &cfg.kernel {
            Some(k) => format!("-kernel {}", k.display()),
            None => "demo guest".into(),
        })?;
    // -chardev socket,fd=N: inherited listening sockets (libvirt's way).
    let mut socket_fds = std::collections::HashMap::new();
    for m in &cfg.monitors {
        if let SocketAddr::Fd(n) = m.socket.addr {
            if socket_fds.contains_key(&n) {
                continue;
            }
            let l = moat_sys::fdset::take_inherited(n.into())
                .and_then(moat_sys::listening_unix)
                .map_err(|e| anyhow::anyhow!("-chardev socket,fd={n}: {e}"))?;
            socket_fds.insert(n, l);
        }
    }
    // Nothing else inherited stays open (QEMU keeps them; a guest that
    // escapes must not find the parent's pipes or sockets).
    moat_sys::fdset::close_inherited().map_err(|e| anyhow::anyhow!(e))?;
    let images = BootImages {
        kernel,
        initrd: match &cfg.initrd {
            Some(i) => Some(read_image("-initrd", i, cfg.mem_size, &fds)?),
            None => None,
        },
        cmdline: if cfg.kernel.is_some() {
            cfg.append.clone()
        } else {
            DEMO_CMDLINE.to_string()
        },
        disks: cfg
            .drives
            .iter()
            .map(|d| moat_vmm::Disk::open(d, &fds))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!(e))?,
    };
    if let Some(p) = &cfg.process_name {
        // PR_SET_NAME takes at most 15 bytes plus the NUL.
        let mut name = [0u8; 16];
        let n = p.len().min(15);
        name[..n].copy_from_slice(&p.as_bytes()[..n]);
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    let _pidfile = match &cfg.pidfile {
        Some(p) => Some(PidFile::create(p)?),
        None => None,
    };
    moat_vmm::init_kick_signal()?;
    let platform = Platform::new(&cfg)?;
    let (tx, rx) = mpsc::channel::<VmEvent>();
    {
        let tx = tx.clone();
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
    }
    let specs = monitor_specs(&cfg, &mut socket_fds)?;
    let drives = DriveInfo::list(&cfg, &images.disks);
    let drive_names: Vec<String> = drives.iter().map(|d| d.name.clone()).collect();
    let handle = Arc::new(VmHandle {
        tx: Mutex::new(tx.clone()),
        prelaunch: AtomicBool::new(cfg.start_paused),
        quit_requested: AtomicBool::new(false),
        dies: cfg.smp.dies,
        drives,
        nodes: Mutex::new(Vec::new()),
    });
    let events = Events(if specs.is_empty() {
        None
    } else {
        let ctx = Arc::new(MonitorContext {
            info: VmInfo {
                name: cfg.name.clone(),
                uuid: cfg.uuid.clone(),
            },
            vm: handle.clone(),
            fds: Mutex::new(fds),
        });
        Some(Monitors::start(&specs, ctx)?)
    });
    // Removed when run() returns, as QEMU removes them at exit.
    let _sockets = SocketFiles::note(socket_paths(&cfg));
    if let Some(m) = &events.0 {
        for (i, (d, device)) in images.disks.iter().zip(drive_names).enumerate() {
            let (m, node) = (m.clone(), node_name(i));
            // A guest can cause errors at will: at most ten events a second
            // per drive, so it cannot flood the monitor clients (stricter
            // than QEMU, which does not limit BLOCK_IO_ERROR).
            let last = Mutex::new(None::<std::time::Instant>);
            let _ = d.link.errors.set(Box::new(move |e| {
                let now = std::time::Instant::now();
                let mut last = lock(&last);
                if last.is_some_and(|t| now.duration_since(t) < Duration::from_millis(100)) {
                    return;
                }
                *last = Some(now);
                m.emit(
                    "BLOCK_IO_ERROR",
                    Some(json!({
                        "device": device, "node-name": node,
                        "operation": if e.write { "write" } else { "read" },
                        "action": "report", "nospace": e.nospace, "reason": e.reason,
                    })),
                );
            }));
        }
    }
    // Everything is open: confine the process before the guest runs.
    // The Landlock rules hold the paths open, so they are made before chroot.
    let rules = match cfg.sandbox {
        true => Some(Arc::new(
            moat_sandbox::landlock::ruleset(&fs_policy(&cfg))
                .map_err(|e| anyhow::anyhow!("-sandbox on: {e}"))?,
        )),
        false => None,
    };
    if let Some(dir) = &cfg.chroot {
        moat_sandbox::privs::enter_chroot(dir)
            .map_err(|e| anyhow::anyhow!("-run-with chroot: {e}"))?;
    }
    if let Some((uid, gid)) = run_as {
        moat_sandbox::privs::drop_to(uid, gid)
            .map_err(|e| anyhow::anyhow!("-run-with user: {e}"))?;
    }
    if let Some(rules) = rules {
        use moat_sandbox::landlock;
        moat_sandbox::harden().map_err(|e| anyhow::anyhow!("-sandbox on: {e}"))?;
        let status =
            landlock::restrict_thread(&rules).map_err(|e| anyhow::anyhow!("-sandbox on: {e}"))?;
        let not_enforced = status.ruleset == ::landlock::RulesetStatus::NotEnforced;
        if cfg.landlock_required && not_enforced {
            anyhow::bail!(
                "-sandbox on,landlock=required: {}",
                landlock::describe(&status)
            );
        }
        if not_enforced {
            // Said without MOAT_LOG: file access is then not limited at all.
            log::warn!("{}", landlock::describe(&status));
        } else {
            log::info!("{}", landlock::describe(&status));
        }
        // The threads setup started confine themselves the same way.
        let drops = run_as.is_some();
        moat_sys::gate::open(Some(Arc::new(move || {
            landlock::restrict_thread(&rules)?;
            if drops {
                moat_sandbox::privs::give_up_capabilities()?;
            }
            Ok(())
        })));

        let log_only = std::env::var_os("MOAT_SECCOMP_LOG").is_some_and(|v| v == "1");
        let violation = if log_only {
            eprintln!(
                "moat: warning: MOAT_SECCOMP_LOG=1: system calls outside the allow-list are logged, not refused; \
                 the sandbox does not protect this host"
            );
            moat_sandbox::Violation::Log
        } else {
            moat_sandbox::Violation::Kill
        };
        moat_sandbox::install_filter(violation).map_err(|e| anyhow::anyhow!("-sandbox on: {e}"))?;
        // Each thread role then narrows that list for its own threads.
        let roles = moat_sandbox::RoleFilters::new(violation)
            .map_err(|e| anyhow::anyhow!("-sandbox on: {e}"))?;
        moat_sys::role::set_hook(Box::new(move |role| roles.apply(role)));
        moat_sys::gate::release();
    } else {
        if run_as.is_some() {
            moat_sys::gate::open(Some(Arc::new(moat_sandbox::privs::give_up_capabilities)));
        } else {
            moat_sys::gate::open(None);
        }
        moat_sys::gate::release();
        eprintln!(
            "moat: warning: -sandbox off: no seccomp filter; a guest that escapes into moat can make any system call"
        );
    }
    // wait=on monitors: the guest starts once each has its first client
    // (QEMU waits at the same point for the connection; moat waits with
    // the sandbox already in place, so no stranger's bytes reach an
    // unconfined moat).
    if let Some(m) = &events.0 {
        while !m.wait_for_clients(Duration::from_millis(100)) {
            match rx.try_recv() {
                Ok(VmEvent::Signal(s)) => {
                    eprintln!("moat: terminating on signal {s}");
                    return Ok(());
                }
                Ok(VmEvent::Control { reply, .. }) => {
                    let _ = reply.send(ControlReply::Error(
                        "the guest has not started: waiting for a monitor connection".into(),
                    ));
                }
                _ => {}
            }
        }
    }
    let mut generation = 0;
    let mut paused = cfg.start_paused;
    let outcome = loop {
        generation += 1;
        let mut vm = Vm::build(&cfg, &images, &platform, generation, tx.clone())?;
        if let Some(w) = root_warning.take() {
            eprintln!("{w}");
        }
        let exit = vm.run(&rx, &mut paused, &events);
        match exit {
            Ok(VmExit::GuestReset) if !cfg.no_reboot => {
                log::info!("guest reset: rebooting");
                events.reset(true, "guest-reset");
                drop(vm);
                continue;
            }
            Ok(VmExit::HostReset) => {
                events.reset(false, "host-qmp-system-reset");
                drop(vm);
                continue;
            }
            _ => {}
        }
        // moat is about to exit: let the kernel tear the VM down with the
        // process instead of paying for an explicit close of the VM fd.
        std::mem::forget(vm);
        match exit {
            Ok(VmExit::GuestReset) => events.shutdown(true, "guest-reset"),
            Ok(VmExit::GuestPowerOff) => events.shutdown(true, "guest-shutdown"),
            Ok(VmExit::Quit) => events.shutdown(false, "host-qmp-quit"),
            Ok(VmExit::Signal(s)) => {
                eprintln!("moat: terminating on signal {s}");
                events.shutdown(false, "host-signal");
            }
            Ok(VmExit::HostReset) => unreachable!("handled above"),
            Err(e) => break Err(anyhow::Error::from(e)),
        }
        break Ok(());
    };
    // As QEMU does at exit: write back image metadata (qcow2 L2 and
    // refcount caches) and make written data durable, whatever the guest did.
    for (d, c) in images.disks.iter().zip(&cfg.drives) {
        if let Err(e) = d.image.flush() {
            eprintln!("moat: flushing {} at exit: {e}", c.file.display());
        }
    }
    for n in lock(&handle.nodes).iter() {
        if let Err(e) = n.disk.image.flush() {
            eprintln!("moat: flushing block node {} at exit: {e}", n.name);
        }
    }
    platform.console.flush(Duration::from_secs(2));
    if let Some(m) = &events.0 {
        m.flush(Duration::from_secs(1));
    }
    outcome
}

fn main() -> ExitCode {
    log_init();
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
        Ok(Action::Run(cfg)) => *cfg,
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
