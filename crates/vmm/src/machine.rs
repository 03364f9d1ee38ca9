//! The machine across its boots: what moat opened at startup (kernel and
//! initrd bytes, disks, /dev/kvm, the console), the one run state, and the
//! control loop that serves every [`Request`] from the front ends, the
//! devices' requests (reset, power-off) and signals.
//!
//! A guest reset tears the KVM VM down and builds it again from the same
//! inputs; the machine (its disks, console, CMOS RAM and run state) stays.

use crate::control::VcpuSet;
use crate::nodes::{self, ChainNode, Role};
use crate::{BootImages, Disk, FdStore, GuestImage, Nic, Platform, Shell, Vm, VmError, VmEvent};
use kvm_ioctls::Kvm;
use moat_api::{
    ApiError, BlockDevice, BlockStats, Call, Client, DriveRef, Event, EventSink, NetInfo,
    NetRateInfo, NodeStats, Reply, Request, RunState, RxFilterInfo,
};
use moat_config::{DeviceName, DriveConfig, VmConfig};
use moat_devices::virtio::block;
use moat_devices::virtio::rng::RngPort;
use moat_devices::virtio::vsock::VsockPort;
use moat_sys::lock;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Command line handed to the built-in demo guest.
const DEMO_CMDLINE: &str = "console=ttyS0 moat.demo=1";

/// At most this many `blockdev-add` nodes (each holds descriptors and caches).
const MAX_NODES: usize = 64;

/// A disk with its device: how the monitor names it.
#[derive(Debug)]
struct Drive {
    name: String,
    cfg: DriveConfig,
    disk: Disk,
    /// Its virtio-blk device; `None` for an `if=none` drive no device uses
    /// (QEMU keeps those too).
    device: Option<DeviceName>,
    /// Such a drive's medium was ejected: its image is closed.
    ejected: bool,
    /// The throttle group's name while limits are on (QEMU's default: the
    /// name the limits were first set by). moat shares no limits between
    /// drives, so no two drives have one name.
    throttle_group: Option<String>,
    /// The first number of its chain's automatic node names.
    first_node: usize,
}

impl Drive {
    /// A drive of `cfg` opened as `disk`, used by `device` (if any),
    /// `ejected` if it has no medium; its node numbers come later.
    fn new(
        name: String,
        cfg: DriveConfig,
        disk: Disk,
        device: Option<DeviceName>,
        ejected: bool,
    ) -> Drive {
        Drive {
            name,
            disk,
            device,
            ejected,
            // (-drive throttling.* names the group after the drive, as QEMU.)
            throttle_group: cfg.throttle.enabled().then(|| cfg.id.clone()).flatten(),
            first_node: 0,
            cfg,
        }
    }

    /// Its chain's nodes, and the next free automatic node number.
    fn named(&self) -> (Vec<ChainNode>, usize) {
        nodes::chain(self.cfg.layer(), self.first_node, None, false)
    }

    fn chain(&self) -> Vec<ChainNode> {
        self.named().0
    }

    /// Its top layer's node, and the protocol node whose writes moat
    /// watches (the file, or the data file).
    /// (Every drive's chain has both.)
    fn top_nodes(&self) -> Option<(ChainNode, ChainNode)> {
        let chain = self.chain();
        let pick = |f: fn(&ChainNode) -> bool| chain.iter().find(|n| f(n)).cloned();
        let top = pick(|n| n.depth == 0 && n.role == Role::Format);
        top.zip(pick(ChainNode::watched))
    }
}

/// A node made by `blockdev-add`. Like QEMU's microvm, moat has no hotplug:
/// the node is opened and checked, and no device uses it.
#[derive(Debug)]
struct Node {
    name: String,
    driver: String,
    /// The first number of its chain's automatic node names.
    first_node: usize,
    cfg: DriveConfig,
    disk: Disk,
}

impl Node {
    /// Its chain's nodes (a `file` node is one), and the next free
    /// automatic node number.
    fn named(&self) -> (Vec<ChainNode>, usize) {
        let bare = self.driver == "file";
        nodes::chain(self.cfg.layer(), self.first_node, Some(&self.name), bare)
    }

    fn chain(&self) -> Vec<ChainNode> {
        self.named().0
    }
}

/// A block node by name, with the drive or node whose chain it is in.
struct NamedNode<'a> {
    node: ChainNode,
    cfg: &'a DriveConfig,
    disk: &'a Disk,
}

/// Why a boot ended.
enum Ending {
    /// Build the VM again (the event, or none for a guest reset QEMU
    /// reports itself).
    Reboot { guest: bool, reason: &'static str },
    /// moat exits: SHUTDOWN with these fields.
    Shutdown { guest: bool, reason: &'static str },
    /// A signal ended moat.
    Signal(i32),
}

/// The machine: everything that outlives one boot.
pub struct Machine {
    images: BootImages,
    platform: Platform,
    drives: Vec<Drive>,
    nodes: Vec<Node>,
    /// The number in the next automatic node name `blockdev-add` gives.
    next_auto_node: usize,
    /// Write thresholds of the nodes nothing writes to (the layers below a
    /// top layer): kept to be shown, never reached.
    thresholds: HashMap<String, u64>,
    nics: Vec<Nic>,
    fds: Arc<Mutex<FdStore>>,
    state: RunState,
    no_reboot: bool,
    cfg: VmConfig,
    events: Arc<dyn EventSink>,
    tx: Sender<VmEvent>,
    rx: Receiver<VmEvent>,
    /// Printed once the first VM is built (so that a setup error stays the
    /// only line moat prints).
    first_boot_note: Option<String>,
    /// The first boot's VM, started in [`Machine::new`].
    first_shell: Option<Shell>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Machine {{ state: {:?} }}", self.state)
    }
}

/// Open a guest image (a path, or /dev/fdset/N from -add-fd), refusing
/// anything that could not fit in guest RAM.
fn open_image(opt: &str, path: &Path, limit: u64, fds: &FdStore) -> Result<GuestImage, VmError> {
    let ctx = |e: &dyn std::fmt::Display| VmError::Image(format!("{opt} {}: {e}", path.display()));
    let f = match fds.open_fdset(path, false) {
        Some(f) => f,
        None => std::fs::File::open(path),
    }
    .map_err(|e| ctx(&e))?;
    // (The end, not the metadata's size: a block device has it too.)
    let len = std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0)).map_err(|e| ctx(&e))?;
    if len > limit {
        return Err(ctx(&format!(
            "{len} bytes cannot fit in {} MiB of guest RAM",
            limit >> 20
        )));
    }
    Ok(GuestImage::file(
        f,
        len,
        format!("{opt} {}", path.display()),
    ))
}

/// A NIC's receive filter as QEMU 7.2's virtio-net reports it: VLAN
/// filtering is not offered (no CTRL_VLAN), so every VLAN passes and all
/// 4096 are listed; `broadcast-allowed` carries QEMU's value (which is the
/// driver's NOBCAST flag, as query-rx-filter has always reported it).
fn rx_filter_info(n: &Nic) -> RxFilterInfo {
    let (f, mac) = n.port.link().query_filter();
    let state = |none: bool, all: bool| match (none, all) {
        (true, _) => "none",
        (false, true) => "all",
        _ => "normal",
    };
    RxFilterInfo {
        name: n.name.clone(),
        promiscuous: f.promiscuous,
        multicast: state(f.no_multicast, f.all_multicast),
        unicast: state(f.no_unicast, f.all_unicast),
        vlan: "all",
        broadcast_allowed: f.no_broadcast,
        multicast_overflow: f.multicast_overflow,
        unicast_overflow: f.unicast_overflow,
        main_mac: mac,
        vlan_table: (0..4096u16).rev().collect(),
        unicast_table: f.unicast,
        multicast_table: f.multicast,
    }
}

impl Machine {
    /// Everything the VM needs, opened: kernel and initrd (the kernel's
    /// headers validated), the drives, /dev/kvm and the console; `nics` are
    /// the interfaces [`crate::nic::open`] opened (before moat closed what
    /// it inherited). `demo` is the kernel to boot when the configuration
    /// names none.
    pub fn new(
        cfg: VmConfig,
        fds: Arc<Mutex<FdStore>>,
        nics: Vec<Nic>,
        demo: &'static [u8],
    ) -> Result<Machine, VmError> {
        // The first boot's VM (see Shell).
        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let shell = Shell::start(&kvm, cfg.mem_size, cfg.thp)?;
        let (kernel, initrd, disks, spares) = {
            let store = lock(&fds);
            let kernel = match &cfg.kernel {
                Some(k) => open_image("-kernel", k, cfg.mem_size, &store)?,
                None => GuestImage::Builtin(demo),
            };
            // Validate the kernel for this machine before opening anything else
            // (its headers: each boot reads the rest into guest memory).
            moat_boot::parse_kernel(&kernel, &moat_boot::layout::MemLayout::new(cfg.mem_size))
                .map_err(|e| {
                    VmError::Image(match &cfg.kernel {
                        Some(k) => format!("-kernel {}: {e}", k.display()),
                        None => format!("demo guest: {e}"),
                    })
                })?;
            let initrd = match &cfg.initrd {
                Some(i) => Some(open_image("-initrd", i, cfg.mem_size, &store)?),
                None => None,
            };
            let open = |drives: &[DriveConfig]| {
                drives
                    .iter()
                    .map(|d| Disk::open(d, &store))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| VmError::Image(e.to_string()))
            };
            (kernel, initrd, open(&cfg.drives)?, open(&cfg.spare_drives)?)
        };
        // QEMU's names: the drive id, else "virtioN" by position among id-less drives.
        let mut anonymous = 0;
        let mut drives: Vec<Drive> = cfg
            .drives
            .iter()
            .zip(&disks)
            .enumerate()
            .map(|(i, (d, disk))| {
                let name = d.id.clone().unwrap_or_else(|| {
                    anonymous += 1;
                    format!("virtio{}", anonymous - 1)
                });
                let device = d.qdev.clone().unwrap_or(DeviceName::Anonymous(i));
                Drive::new(name, d.clone(), disk.clone(), Some(device), false)
            })
            .chain(cfg.spare_drives.iter().zip(spares).map(|(d, disk)| {
                let name = d.id.clone().unwrap_or_default();
                Drive::new(name, d.clone(), disk, None, false)
            }))
            .collect();
        // (A drive without a medium is as one whose medium was ejected.)
        for d in &cfg.empty_drives {
            let (name, disk) = (
                d.id.clone().unwrap_or_default(),
                Disk::empty(d).map_err(VmError::Io)?,
            );
            drives.push(Drive::new(name, d.clone(), disk, None, true));
        }
        // The monitor's order: QEMU's, that of the -drive options.
        drives.sort_by_key(|d| d.cfg.index);
        // Each chain's automatic node names, one drive after another.
        let mut next_auto_node = 0;
        for d in &mut drives {
            d.first_node = next_auto_node;
            next_auto_node = d.named().1;
        }
        let images = BootImages {
            kernel,
            initrd,
            cmdline: if cfg.kernel.is_some() {
                cfg.append.clone()
            } else {
                DEMO_CMDLINE.to_string()
            },
            disks,
            nics: nics.iter().map(|n| n.port.clone()).collect(),
            rngs: cfg
                .rngs
                .iter()
                .map(|r| {
                    RngPort::open(r).map_err(|e| {
                        VmError::Image(match &r.source {
                            moat_config::RngSource::Device(p) => {
                                format!("rng-random {}: {e}", p.display())
                            }
                            moat_config::RngSource::Builtin => format!("rng-builtin: {e}"),
                        })
                    })
                })
                .collect::<Result<_, _>>()?,
            vsock: cfg
                .vsock
                .as_ref()
                .map(|v| VsockPort::open(v).map_err(|e| VmError::Image(format!("vsock: {e}"))))
                .transpose()?,
        };
        let platform = Platform::new(&cfg, kvm)?;
        let (tx, rx) = mpsc::channel();
        Ok(Machine {
            images,
            platform,
            next_auto_node,
            thresholds: HashMap::new(),
            drives,
            nodes: Vec::new(),
            nics,
            fds,
            state: if cfg.start_paused {
                RunState::Prelaunch
            } else {
                RunState::Running
            },
            no_reboot: cfg.no_reboot,
            cfg,
            events: Arc::new(()),
            tx,
            rx,
            first_boot_note: None,
            first_shell: Some(shell),
        })
    }

    /// A note for stderr once the first VM is built (the root warning).
    pub fn note_on_first_boot(&mut self, note: Option<String>) {
        self.first_boot_note = note;
    }

    /// Where signals and other event sources send to the control loop.
    pub fn sender(&self) -> Sender<VmEvent> {
        self.tx.clone()
    }

    /// A front end's handle: requests reach [`Machine::run`]'s loop.
    pub fn client(&self) -> Client {
        let tx = Mutex::new(self.tx.clone());
        Client::new(move |call| lock(&tx).send(VmEvent::Api(call)).is_ok())
    }

    /// Send events to `sink`, the disks' I/O errors and the NICs' filter
    /// changes among them.
    pub fn set_events(&mut self, sink: Arc<dyn EventSink>) {
        self.events = sink.clone();
        for n in &self.nics {
            let (sink, name, path) = (
                sink.clone(),
                n.has_id.then(|| n.name.clone()),
                n.path.clone(),
            );
            n.port.link().on_filter_change(Box::new(move || {
                sink.emit(Event::NicRxFilterChanged {
                    name: name.clone(),
                    path: path.clone(),
                })
            }));
        }
        for d in &self.drives {
            let Some((top, file)) = d.top_nodes() else {
                continue;
            };
            let node = top.name.clone();
            let (s, names) = (sink.clone(), [top.name, file.name]);
            let _ = d
                .disk
                .link
                .threshold_sink
                .set(Box::new(move |file, amount, threshold| {
                    s.emit(Event::BlockWriteThreshold {
                        node_name: names[usize::from(file)].clone(),
                        amount_exceeded: amount,
                        write_threshold: threshold,
                    })
                }));
            let (sink, device) = (sink.clone(), d.name.clone());
            let tx = Mutex::new(self.tx.clone());
            // A guest can cause errors at will: at most ten events a second
            // per drive, so it cannot flood the monitor clients (stricter
            // than QEMU, which does not limit BLOCK_IO_ERROR). An error
            // that stops the VM is always told (it cannot repeat before a
            // `cont`), and then the VM stops, as QEMU orders them.
            let last = Mutex::new(None::<Instant>);
            let _ = d.disk.link.errors.set(Box::new(move |e| {
                let now = Instant::now();
                let stop = e.action == block::ErrorAction::Stop;
                {
                    let mut last = lock(&last);
                    let recent =
                        last.is_some_and(|t| now.duration_since(t) < Duration::from_millis(100));
                    if !recent || stop {
                        *last = Some(now);
                        sink.emit(Event::BlockIoError {
                            device: device.clone(),
                            node_name: node.clone(),
                            write: e.write,
                            nospace: e.nospace,
                            reason: e.reason,
                            action: e.action.name(),
                        });
                    }
                }
                if stop {
                    let _ = lock(&tx).send(VmEvent::IoErrorStop);
                }
            }));
        }
    }

    /// Wait up to `timeout` for an event that ends moat before the guest
    /// starts (a signal); requests meanwhile are refused. For `wait=on`
    /// monitors: the guest starts once their first client is in.
    pub fn wait_before_start(&mut self, timeout: Duration) -> Option<i32> {
        match self.rx.recv_timeout(timeout) {
            Ok(VmEvent::Signal(s)) => Some(s),
            Ok(VmEvent::Api(call)) => {
                let _ = call.reply.send(Err(ApiError::generic(
                    "the guest has not started: waiting for a monitor connection",
                )));
                None
            }
            _ => None,
        }
    }

    /// Boot the guest and serve requests until moat is to exit; then write
    /// every image's metadata back and drain the console.
    pub fn run(mut self) -> Result<(), VmError> {
        let mut generation = 0;
        let outcome = loop {
            generation += 1;
            let shell = match self.first_shell.take() {
                Some(s) => s,
                None => Shell::start(&self.platform.kvm, self.cfg.mem_size, self.cfg.thp)?,
            };
            let mut vm = Vm::build(
                &self.cfg,
                &self.images,
                &self.platform,
                generation,
                self.tx.clone(),
                shell,
            )?;
            if let Some(note) = self.first_boot_note.take() {
                eprintln!("{note}");
            }
            let vcpus = vm.start(self.state != RunState::Running)?;
            let ending = self.serve(&vm, &vcpus, generation);
            let stopped = vcpus.stop();
            if !stopped {
                log::error!(
                    "a vCPU did not stop within {:?}",
                    crate::control::WAIT_LIMIT
                );
            }
            match ending {
                Ok(Ending::Reboot { guest, reason }) if stopped => {
                    log::info!("reset: rebooting");
                    self.events.emit(Event::Reset { guest, reason });
                    drop(vm);
                }
                // The VM cannot be rebuilt under a vCPU that still runs.
                Ok(Ending::Reboot { .. }) => break Err(VmError::VcpuStuck),
                Ok(Ending::Shutdown { guest, reason }) => {
                    self.events.emit(Event::Shutdown { guest, reason });
                    // moat exits now: let the kernel tear the VM down with
                    // the process instead of paying for closing its fd.
                    std::mem::forget(vm);
                    break Ok(());
                }
                Ok(Ending::Signal(s)) => {
                    eprintln!("moat: terminating on signal {s}");
                    self.events.emit(Event::Shutdown {
                        guest: false,
                        reason: "host-signal",
                    });
                    std::mem::forget(vm);
                    break Ok(());
                }
                Err(e) => {
                    std::mem::forget(vm);
                    break Err(e);
                }
            }
        };
        self.flush_images();
        self.platform.console.flush(Duration::from_secs(2));
        outcome
    }

    /// As QEMU does at exit: write back image metadata (qcow2 L2 and
    /// refcount caches) and make written data durable, whatever the guest did.
    fn flush_images(&self) {
        for d in &self.drives {
            if let Err(e) = d.disk.image.flush() {
                eprintln!("moat: flushing {} at exit: {e}", d.cfg.file.display());
            }
        }
        for n in &self.nodes {
            if let Err(e) = n.disk.image.flush() {
                eprintln!("moat: flushing block node {} at exit: {e}", n.name);
            }
        }
    }

    /// Serve one boot's events until it ends.
    fn serve(&mut self, vm: &Vm, vcpus: &VcpuSet, generation: u64) -> Result<Ending, VmError> {
        loop {
            let Ok(event) = self.rx.recv() else {
                return Ok(Ending::Signal(0));
            };
            match event {
                VmEvent::Device {
                    generation: g,
                    request,
                } if g == generation => {
                    return Ok(match request {
                        moat_devices::VmRequest::Reset if self.no_reboot => Ending::Shutdown {
                            guest: true,
                            reason: "guest-reset",
                        },
                        moat_devices::VmRequest::Reset => Ending::Reboot {
                            guest: true,
                            reason: "guest-reset",
                        },
                        moat_devices::VmRequest::PowerOff => Ending::Shutdown {
                            guest: true,
                            reason: "guest-shutdown",
                        },
                    });
                }
                VmEvent::VcpuFailed {
                    generation: g,
                    cpu,
                    why,
                } if g == generation => return Err(VmError::VcpuFailed { cpu, why }),
                VmEvent::Signal(s) => return Ok(Ending::Signal(s)),
                // (Already stopped: the request waits for `cont` all the same.)
                VmEvent::IoErrorStop if self.state == RunState::Running => {
                    if vcpus.pause() {
                        self.state = RunState::IoError;
                        self.events.emit(Event::Stop);
                    } else {
                        log::warn!("a disk error could not stop the VM: a vCPU did not stop");
                    }
                }
                VmEvent::Api(Call { request, reply }) => {
                    let (answer, ending) = self.handle(request, vm, vcpus);
                    let _ = reply.send(answer);
                    if let Some(e) = ending {
                        return Ok(e);
                    }
                }
                _ => {} // stale event from an earlier boot
            }
        }
    }

    /// One request: its answer, and whether it ends this boot.
    fn handle(
        &mut self,
        request: Request,
        vm: &Vm,
        vcpus: &VcpuSet,
    ) -> (Result<Reply, ApiError>, Option<Ending>) {
        let done = |e| (Ok(Reply::Done), Some(e));
        match request {
            Request::Stop => {
                if self.state == RunState::Running {
                    if !vcpus.pause() {
                        return (Err(ApiError::generic("a vCPU did not stop")), None);
                    }
                    self.state = RunState::Paused;
                    self.events.emit(Event::Stop);
                }
                (Ok(Reply::Done), None)
            }
            Request::Cont => {
                if self.state != RunState::Running {
                    vcpus.resume();
                    self.state = RunState::Running;
                    self.events.emit(Event::Resume);
                }
                // Requests a host error held are tried again (QEMU retries
                // them whenever the VM starts running).
                for d in &self.drives {
                    d.disk.link.resumed();
                }
                (Ok(Reply::Done), None)
            }
            // With -no-reboot, QEMU turns a monitor reset into a shutdown too.
            Request::SystemReset if self.no_reboot => done(Ending::Shutdown {
                guest: false,
                reason: "host-qmp-system-reset",
            }),
            Request::SystemReset => done(Ending::Reboot {
                guest: false,
                reason: "host-qmp-system-reset",
            }),
            Request::Quit => done(Ending::Shutdown {
                guest: false,
                reason: "host-qmp-quit",
            }),
            Request::SystemPowerdown => {
                self.events.emit(Event::Powerdown);
                vm.power_button();
                (Ok(Reply::Done), None)
            }
            Request::QueryStatus => (Ok(Reply::Status(self.state)), None),
            Request::QueryCpus => (Ok(Reply::Cpus(vm.cpus(vcpus))), None),
            Request::Registers(which) => (
                vm.registers(vcpus, which)
                    .map(Reply::Text)
                    .map_err(ApiError::generic),
                None,
            ),
            Request::QueryNetwork => (
                Ok(Reply::Network(
                    self.nics
                        .iter()
                        .zip(&self.cfg.nics)
                        .map(|(n, c)| NetInfo {
                            mac: c.mac,
                            netdev: n.netdev.clone(),
                            kind: n.kind.to_string(),
                            queues: n.queues.clone(),
                        })
                        .collect(),
                )),
                None,
            ),
            Request::SetLink { .. }
            | Request::QueryRxFilter { .. }
            | Request::SetNetRateLimit { .. }
            | Request::QueryNetRateLimits => (self.net(request), None),
            other => (self.block(other), None),
        }
    }

    /// The network requests.
    fn net(&mut self, request: Request) -> Result<Reply, ApiError> {
        match request {
            // QEMU finds the NIC or the netdev by name; either way the
            // guest sees the link change.
            Request::SetLink { name, up } => {
                let nic = self
                    .nics
                    .iter()
                    .find(|n| n.name == name || n.netdev == name)
                    .ok_or_else(|| {
                        ApiError::device_not_found(format!("Device '{name}' not found"))
                    })?;
                nic.port.link().set_up(up);
                Ok(Reply::Done)
            }
            Request::QueryRxFilter { name } => {
                if let Some(name) = &name {
                    if !self.nics.iter().any(|n| &n.name == name) {
                        return Err(ApiError::generic(
                            if self.nics.iter().any(|n| &n.netdev == name) {
                                format!("net client({name}) isn't a NIC")
                            } else {
                                format!("invalid net client name: {name}")
                            },
                        ));
                    }
                }
                Ok(Reply::RxFilters(
                    self.nics
                        .iter()
                        .filter(|n| name.as_ref().is_none_or(|x| *x == n.name))
                        .map(rx_filter_info)
                        .collect(),
                ))
            }
            Request::SetNetRateLimit { name, rx, tx } => {
                let nic = self.nic(&name)?;
                let (old_rx, old_tx) = nic.port.link().limits();
                nic.port
                    .link()
                    .set_limits(rx.unwrap_or(old_rx), tx.unwrap_or(old_tx));
                Ok(Reply::Done)
            }
            Request::QueryNetRateLimits => Ok(Reply::NetRates(
                self.nics
                    .iter()
                    .map(|n| {
                        let link = n.port.link();
                        let (rx, tx) = link.limits();
                        let s = link.stats();
                        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                        NetRateInfo {
                            name: n.name.clone(),
                            rx,
                            tx,
                            rx_bytes: g(&s.rx_bytes),
                            rx_frames: g(&s.rx_frames),
                            rx_dropped: g(&s.rx_dropped),
                            tx_bytes: g(&s.tx_bytes),
                            tx_frames: g(&s.tx_frames),
                            tx_dropped: g(&s.tx_dropped),
                            queues: s.per_pair[..n.port.pairs()]
                                .iter()
                                .map(|(r, t)| (g(r), g(t)))
                                .collect(),
                        }
                    })
                    .collect(),
            )),
            other => Err(ApiError::generic(format!(
                "{other:?}: not a network request"
            ))),
        }
    }

    fn nic(&self, name: &str) -> Result<&Nic, ApiError> {
        self.nics
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ApiError::device_not_found(format!("Device '{name}' not found")))
    }

    /// The block requests: they need no vCPU.
    fn block(&mut self, request: Request) -> Result<Reply, ApiError> {
        match request {
            Request::QueryBlock => Ok(Reply::Block(
                self.drives
                    .iter()
                    .map(|d| BlockDevice {
                        device: d.name.clone(),
                        qdev: d.device.as_ref().map(DeviceName::qdev),
                        node: (!d.ejected)
                            .then(|| d.top_nodes())
                            .flatten()
                            .map(|(top, _)| {
                                let threshold = d.disk.link.write_threshold.load(Ordering::SeqCst);
                                nodes::describe(&top, &d.cfg, &d.disk, threshold)
                            }),
                        throttle: d.disk.link.throttle.limits(),
                        throttle_group: d.throttle_group.clone(),
                        io_status: match d.disk.link.io_status.load(Ordering::SeqCst) {
                            block::IO_STATUS_NOSPACE => "nospace",
                            block::IO_STATUS_FAILED => "failed",
                            _ => "ok",
                        },
                    })
                    .collect(),
            )),
            Request::QueryBlockstats => Ok(Reply::BlockStats(
                self.drives
                    .iter()
                    .map(|d| {
                        let s = &d.disk.link.stats;
                        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                        let last = g(&s.last_access_ns);
                        let chain = if d.ejected { Vec::new() } else { d.chain() };
                        // Each layer's node over its primary file (the data
                        // file, when there is one), as QEMU nests them.
                        let mut layers = (0..).map_while(|depth| {
                            let at = |f: fn(&ChainNode) -> bool| {
                                chain.iter().find(|n| n.depth == depth && f(n))
                            };
                            let primary = at(ChainNode::primary)?;
                            let layer = at(|n| n.role == Role::Format)?;
                            Some((layer.name.clone(), nodes::file_stats(primary, &d.disk)))
                        });
                        let top = layers.next();
                        let backing = layers.collect();
                        BlockStats {
                            device: d.name.clone(),
                            node_name: top.as_ref().map(|t| t.0.clone()),
                            qdev: d.device.as_ref().map(DeviceName::qdev),
                            rd_bytes: g(&s.rd_bytes),
                            wr_bytes: g(&s.wr_bytes),
                            rd_operations: g(&s.rd_operations),
                            wr_operations: g(&s.wr_operations),
                            flush_operations: g(&s.flush_operations),
                            failed_rd_operations: g(&s.failed_rd_operations),
                            failed_wr_operations: g(&s.failed_wr_operations),
                            failed_flush_operations: g(&s.failed_flush_operations),
                            invalid_rd_operations: g(&s.invalid_rd_operations),
                            invalid_wr_operations: g(&s.invalid_wr_operations),
                            rd_total_time_ns: g(&s.rd_total_time_ns),
                            wr_total_time_ns: g(&s.wr_total_time_ns),
                            flush_total_time_ns: g(&s.flush_total_time_ns),
                            wr_highest_offset: g(&s.wr_highest_offset),
                            idle_time_ns: (last != 0).then(|| block::now_ns().saturating_sub(last)),
                            file: top.map(|t| t.1),
                            backing,
                        }
                    })
                    .collect(),
            )),
            Request::QueryNodeStats => {
                // (In the order QEMU made them: the reverse of its listing.)
                let named = self.named_nodes();
                let stats = named.iter().rev().map(|n| {
                    if n.node.role != Role::Format {
                        return NodeStats::Protocol(nodes::file_stats(&n.node, n.disk));
                    }
                    let primary = named.iter().find(|c| {
                        std::ptr::eq(c.disk, n.disk)
                            && c.node.depth == n.node.depth
                            && c.node.primary()
                    });
                    let s = &n.disk.link.stats;
                    NodeStats::Format {
                        node_name: n.node.name.clone(),
                        wr_highest_offset: match n.node.depth {
                            0 => s.wr_highest_offset.load(Ordering::Relaxed),
                            _ => 0,
                        },
                        parent: primary
                            .map(|p| nodes::file_stats(&p.node, p.disk))
                            .unwrap_or_default(),
                    }
                });
                Ok(Reply::NodeStats(stats.collect()))
            }
            Request::QueryNamedBlockNodes => Ok(Reply::Nodes(
                self.named_nodes()
                    .iter()
                    .map(|n| nodes::describe(&n.node, n.cfg, n.disk, self.threshold(n)))
                    .collect(),
            )),
            Request::BlockSetIoThrottle {
                drive,
                limits,
                group,
            } => {
                let i = self.drive_by_ref(&drive)?;
                if self.drives[i].ejected {
                    return Err(ApiError::generic("Device has no medium"));
                }
                // QEMU's group: the one named, else the one the limits
                // already have, else the name the command used.
                let group = limits.enabled().then(|| {
                    group
                        .or(self.drives[i].throttle_group.clone())
                        .unwrap_or_else(|| drive.name().to_string())
                });
                if let Some(g) = &group {
                    let shared = self
                        .drives
                        .iter()
                        .enumerate()
                        .find(|(j, d)| *j != i && d.throttle_group.as_ref() == Some(g));
                    if let Some((_, other)) = shared {
                        return Err(ApiError::generic(format!(
                            "throttle group '{g}' is drive '{}''s: moat shares no limits between drives",
                            other.name
                        )));
                    }
                }
                let d = &mut self.drives[i];
                d.disk.link.throttle.set(limits);
                d.throttle_group = group;
                Ok(Reply::Done)
            }
            Request::BlockSetWriteThreshold { node, threshold } => {
                let named = self.named_nodes();
                let n = named
                    .iter()
                    .find(|n| n.node.name == node)
                    .ok_or_else(|| ApiError::generic(format!("Device '{node}' not found")))?;
                // (A file node's offsets are the file's: for qcow2, its own
                // metadata and data writes, which the image's watch reports.)
                let armed = match (n.node.role, n.node.depth) {
                    (Role::Format, 0) => &n.disk.link.write_threshold,
                    _ if n.node.watched() => &n.disk.link.file_threshold,
                    (Role::File, 0) => {
                        return Err(ApiError::generic(format!(
                            "moat counts the writes to the data file of '{}', not to its metadata file: set the threshold on the data file's node",
                            n.node.layer.file.display()
                        )))
                    }
                    _ => {
                        drop(named);
                        match threshold {
                            0 => self.thresholds.remove(&node),
                            t => self.thresholds.insert(node, t),
                        };
                        return Ok(Reply::Done);
                    }
                };
                armed.store(threshold, Ordering::SeqCst);
                Ok(Reply::Done)
            }
            Request::Eject { drive } => {
                let i = self.drive_by_ref(&drive)?;
                let d = &mut self.drives[i];
                let device = drive.name();
                if d.device.is_some() {
                    return Err(ApiError::generic(format!(
                        "Device '{device}' is not removable"
                    )));
                }
                // A drive no device uses gives up its medium, as in QEMU:
                // its image is written back and closed.
                if !d.ejected {
                    if let Err(e) = d.disk.image.flush() {
                        log::warn!("eject {device}: flushing: {e}");
                    }
                    d.disk.image = Arc::new(moat_block::MemImage::new(Vec::new(), true));
                    d.ejected = true;
                    for c in d.chain() {
                        self.thresholds.remove(&c.name);
                    }
                }
                Ok(Reply::Done)
            }
            Request::BlockdevAdd {
                node,
                driver,
                drive,
            } => {
                if self.drives.iter().any(|d| d.name == node) {
                    return Err(ApiError::generic(format!(
                        "node-name={node} is conflicting with a device id"
                    )));
                }
                if self.nodes.iter().any(|n| n.name == node) {
                    return Err(ApiError::generic(format!(
                        "Duplicate nodes with node-name='{node}'"
                    )));
                }
                if self.nodes.len() >= MAX_NODES {
                    return Err(ApiError::generic(format!(
                        "moat keeps at most {MAX_NODES} nodes made by blockdev-add"
                    )));
                }
                // With the sandbox on, Landlock refuses paths the VM was not
                // configured with: hand files in with add-fd and /dev/fdset/N.
                let disk = Disk::open(&drive, &lock(&self.fds))
                    .map_err(|e| ApiError::generic(e.monitor_text()))?;
                let n = Node {
                    name: node,
                    first_node: self.next_auto_node,
                    driver,
                    cfg: *drive,
                    disk,
                };
                self.next_auto_node = n.named().1;
                self.nodes.push(n);
                Ok(Reply::Done)
            }
            Request::BlockdevDel { node } => {
                // QEMU's checks: a node a drive uses, then one the monitor
                // did not make (a drive's other nodes, a node's file).
                if self
                    .drives
                    .iter()
                    .any(|d| !d.ejected && d.top_nodes().is_some_and(|(top, _)| top.name == node))
                {
                    return Err(ApiError::generic(format!("Node {node} is in use")));
                }
                let Some(i) = self.nodes.iter().position(|n| n.name == node) else {
                    let named = self.named_nodes();
                    if let Some(n) = named.iter().find(|n| n.node.name == node) {
                        // A lower layer is the backing of the one above.
                        let above = named.iter().find(|a| {
                            std::ptr::eq(a.disk, n.disk)
                                && n.node.role == Role::Format
                                && a.node.role == Role::Format
                                && a.node.depth + 1 == n.node.depth
                        });
                        return Err(ApiError::generic(match above {
                            Some(a) => format!(
                                "Node '{node}' is busy: node is used as backing hd of '{}'",
                                a.node.name
                            ),
                            None => format!("Node {node} is not owned by the monitor"),
                        }));
                    }
                    return Err(ApiError::generic(format!(
                        "Failed to find node with node-name='{node}'"
                    )));
                };
                let n = self.nodes.remove(i);
                if let Err(e) = n.disk.image.flush() {
                    log::warn!("blockdev-del {node}: flushing: {e}");
                }
                for c in n.chain() {
                    self.thresholds.remove(&c.name);
                }
                Ok(Reply::Done)
            }
            other => Err(ApiError::generic(format!("{other:?}: not a block request"))),
        }
    }

    fn drive_index(&self, device: &str) -> Result<usize, ApiError> {
        self.drives
            .iter()
            .position(|d| d.name == device)
            .ok_or_else(|| ApiError::device_not_found(format!("Device '{device}' not found")))
    }

    /// The drive a block command names: by its name, or by its device as
    /// QEMU resolves an `id`: a QOM path, absolute or under
    /// `/machine/peripheral` (QEMU's messages: a device of another kind
    /// has no drive).
    fn drive_by_ref(&self, r: &DriveRef) -> Result<usize, ApiError> {
        let id = match r {
            DriveRef::Device(name) => return self.drive_index(name),
            DriveRef::Id(id) => id.as_str(),
        };
        let path = match id.starts_with('/') {
            true => id.to_string(),
            false => format!("/machine/peripheral/{id}"),
        };
        let is = |d: &DeviceName| d.qom_path() == path;
        if let Some(i) = self
            .drives
            .iter()
            .position(|d| d.device.as_ref().is_some_and(is))
        {
            return Ok(i);
        }
        let c = &self.cfg;
        let other = c.nics.iter().any(|n| is(&n.qdev))
            || c.rngs.iter().any(|r| is(&r.qdev))
            || c.vsock.as_ref().is_some_and(|v| is(&v.qdev));
        Err(if other {
            ApiError::generic("Device does not have a block device backend")
        } else {
            ApiError::device_not_found(format!("Device '{id}' not found"))
        })
    }

    /// Every block node the monitor names, as QEMU lists them: newest
    /// first (the `blockdev-add` nodes, then the drives', each chain from
    /// its lowest layer up, each layer before its file).
    fn named_nodes(&self) -> Vec<NamedNode<'_>> {
        let drives = self.drives.iter().filter(|d| !d.ejected);
        let drives = drives.flat_map(|d| d.chain().into_iter().map(|node| (node, &d.cfg, &d.disk)));
        let nodes = self.nodes.iter();
        let nodes = nodes.flat_map(|n| n.chain().into_iter().map(|node| (node, &n.cfg, &n.disk)));
        let mut all: Vec<NamedNode> = drives
            .chain(nodes)
            .map(|(node, cfg, disk)| NamedNode { node, cfg, disk })
            .collect();
        all.reverse();
        all
    }

    /// A named node's write threshold.
    fn threshold(&self, n: &NamedNode) -> u64 {
        let link = &n.disk.link;
        match (n.node.role, n.node.depth) {
            (Role::Format, 0) => link.write_threshold.load(Ordering::SeqCst),
            _ if n.node.watched() => link.file_threshold.load(Ordering::SeqCst),
            _ => self.thresholds.get(&n.node.name).copied().unwrap_or(0),
        }
    }
}
