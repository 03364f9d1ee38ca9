//! The KVM virtual machine: guest memory, in-kernel irqchip and PIT, one
//! thread per vCPU, and the lifecycle (run, reset, power-off, failure).
//!
//! A VM is built from a validated [`VmConfig`] plus the kernel/initrd bytes
//! (read once at startup). On a guest reset the whole KVM VM is torn down
//! and built again from the same inputs; the [`Platform`] (serial console,
//! CMOS RTC) survives, as it would on real hardware.

pub mod bus;
pub mod control;
pub mod cpuid;
pub mod vcpu;

use bus::PlatformBus;
use control::VcpuSet;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::IoEventAddress;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use moat_boot::layout::{ports, MemLayout, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use moat_boot::MachineDesc;
use moat_config::VmConfig;
use moat_devices::ged::Ged;
use moat_devices::i8042::I8042;
use moat_devices::pm::AcpiPm;
use moat_devices::rtc::Rtc;
use moat_devices::serial::Console;
use moat_devices::virtio::block::Block;
use moat_devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use moat_devices::{IrqLine, RequestSink, VmRequest};
use moat_sys::lock;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (moat needs read/write access to /dev/kvm)")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM: {what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size} MiB of guest RAM: {why}")]
    Memory { size: u64, why: String },
    #[error("{0}")]
    Boot(#[from] moat_boot::BootError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("building {0}: {1:?}")]
    Fam(&'static str, vmm_sys_util::fam::Error),
    #[error("vCPU {cpu} failed: {why}")]
    VcpuFailed { cpu: u32, why: String },
    #[error("a vCPU did not stop: the VM cannot be reset")]
    VcpuStuck,
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|err| VmError::Kvm { what, err })
}

/// Why a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (or triple-faulted).
    GuestReset,
    /// The guest powered off through ACPI.
    GuestPowerOff,
    /// The monitor asked for a reset (`system_reset`).
    HostReset,
    /// The monitor asked moat to quit.
    Quit,
    /// moat was asked to terminate by a signal.
    Signal(i32),
}

/// What the monitor can ask of the running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Stop,
    Cont,
    Reset,
    Powerdown,
    Quit,
    Status,
    Cpus,
    /// Register dump of one vCPU, or of all of them.
    Registers(Option<u32>),
}

/// One vCPU as `query-cpus-fast` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    pub index: u32,
    pub thread_id: i32,
    pub position: cpuid::Position,
}

/// The answer to a [`Control`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlReply {
    Done,
    Status { running: bool, status: &'static str },
    Cpus(Vec<CpuInfo>),
    Text(String),
    Error(String),
}

/// Lifecycle notifications (the monitor turns them into QMP events).
pub trait Lifecycle {
    fn stopped(&self);
    fn resumed(&self);
    fn powerdown(&self);
}

/// Events that reach the VM's control loop.
#[derive(Debug)]
pub enum VmEvent {
    /// From a device or vCPU of the boot with this generation.
    Request {
        generation: u64,
        request: VmRequest,
    },
    VcpuFailed {
        generation: u64,
        cpu: u32,
        why: String,
    },
    Signal(i32),
    /// From the monitor; answered on `reply`.
    Control {
        cmd: Control,
        reply: Sender<ControlReply>,
    },
}

/// Devices and backends that survive guest resets.
#[derive(Debug)]
pub struct Platform {
    pub console: Console,
    pub rtc: Arc<Mutex<Rtc>>,
    /// /dev/kvm, opened once at startup: every boot's VM comes from it, so
    /// moat never opens /dev/kvm again (after a privilege drop it could not).
    pub kvm: Kvm,
}

impl Platform {
    pub fn new(cfg: &VmConfig) -> Result<Self, VmError> {
        let console = Console::start(cfg.serial.as_ref(), IrqLine::new()?)
            .map_err(|e| VmError::Io(std::io::Error::other(e.to_string())))?;
        Ok(Platform {
            kvm: Kvm::new().map_err(VmError::KvmOpen)?,
            console,
            rtc: Arc::new(Mutex::new(Rtc::new())),
        })
    }
}

pub use moat_sys::fdset::FdStore;

/// An opened disk, shared by every boot of the VM.
#[derive(Debug, Clone)]
pub struct Disk {
    pub image: Arc<dyn moat_block::DiskImage>,
    pub serial: String,
    pub discard: moat_devices::virtio::block::Discard,
    /// Stats, throttle and error sink, shared with the monitor.
    pub link: moat_devices::virtio::block::DriveLink,
}

impl Disk {
    /// Open `-drive file=` and the layers the user named below it; a
    /// `/dev/fdset/N` path takes a descriptor from `fds`.
    pub fn open(d: &moat_config::DriveConfig, fds: &FdStore) -> Result<Disk, String> {
        use moat_config::DriveFormat;
        let f = open_image_file(&d.file, !d.read_only, d.cache, fds)?;
        let name = d.file.display().to_string();
        let image: Arc<dyn moat_block::DiskImage> = match d.format {
            DriveFormat::Raw => {
                let mut raw = moat_block::RawImage::new(f, d.read_only)
                    .map_err(|e| format!("{name}: {e}"))?;
                if d.cache == moat_config::CacheMode::Unsafe {
                    raw = raw.with_no_sync();
                }
                match open_direct(&d.file, !d.read_only, d.cache, raw.file())? {
                    Some(direct) => Arc::new(raw.with_direct(direct)),
                    None => Arc::new(raw),
                }
            }
            DriveFormat::Qcow2 => {
                let mut seen = Vec::new();
                let access =
                    open_layer(&d.layer(), Some(f), !d.read_only, d.cache, fds, &mut seen)?;
                let q = moat_block::Qcow2Image::new(access, d.read_only);
                Arc::new(if d.cache == moat_config::CacheMode::Unsafe {
                    q.with_no_sync()
                } else {
                    q
                })
            }
        };
        Ok(Disk {
            image,
            serial: d.serial.clone().unwrap_or_default(),
            link: moat_devices::virtio::block::DriveLink::new(d.throttle),
            discard: if d.discard_unmap {
                moat_devices::virtio::block::Discard::Unmap
            } else {
                moat_devices::virtio::block::Discard::Ignore
            },
        })
    }
}

/// Open one image file as the drive's cache mode says (an fd set's
/// descriptor keeps the flags it was opened with); regular files and block
/// devices only.
fn open_image_file(
    path: &std::path::Path,
    writable: bool,
    cache: moat_config::CacheMode,
    fds: &FdStore,
) -> Result<std::fs::File, String> {
    use moat_config::CacheMode;
    use std::os::unix::fs::OpenOptionsExt;
    let f = match fds.open_fdset(path, writable) {
        Some(r) => r,
        None => {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(writable);
            if writable && matches!(cache, CacheMode::Writethrough | CacheMode::Directsync) {
                o.custom_flags(libc::O_DSYNC);
            }
            o.open(path)
        }
    }
    .map_err(|e| {
        format!(
            "-drive file={}: Could not open '{}': {e}",
            path.display(),
            path.display()
        )
    })?;
    let kind = f.metadata().map_err(|e| e.to_string())?.file_type();
    if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
        return Err(format!(
            "-drive file={}: not a regular file or block device",
            path.display()
        ));
    }
    Ok(f)
}

/// cache=none|directsync on a path: the image again with O_DIRECT (as
/// QEMU, an error where the file system cannot do it, e.g. older tmpfs).
/// It must be the file already open as `first` (same device and inode):
/// the path may have been pointed elsewhere in between. A descriptor from
/// an fd set keeps the flags its owner gave it.
fn open_direct(
    path: &std::path::Path,
    writable: bool,
    cache: moat_config::CacheMode,
    first: &std::fs::File,
) -> Result<Option<std::fs::File>, String> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::OpenOptionsExt;
    if !matches!(
        cache,
        moat_config::CacheMode::None | moat_config::CacheMode::Directsync
    ) || moat_sys::fdset::is_fdset_path(path)
    {
        return Ok(None);
    }
    let mut flags = libc::O_DIRECT;
    if writable && cache == moat_config::CacheMode::Directsync {
        flags |= libc::O_DSYNC;
    }
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            format!(
                "-drive file={},cache=none: Could not open '{}' with O_DIRECT: {e}",
                path.display(),
                path.display()
            )
        })?;
    let id = |f: &std::fs::File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
    if id(&direct).is_none() || id(&direct) != id(first) {
        return Err(format!(
            "-drive file={},cache=none: the file changed while it was being opened",
            path.display()
        ));
    }
    Ok(Some(direct))
}

/// Open a layer of a qcow2 chain and, recursively, the layers the user
/// named below it (read-only). `seen` holds the (device, inode) of every
/// file already in the chain: one file in two places is refused, as a
/// writable top layer would otherwise write into its own backing image.
fn open_layer(
    layer: &moat_config::ImageLayer,
    file: Option<std::fs::File>,
    writable: bool,
    cache: moat_config::CacheMode,
    fds: &FdStore,
    seen: &mut Vec<(u64, u64)>,
) -> Result<moat_block::qcow2::Layer, String> {
    use moat_block::qcow2::Below;
    use moat_config::{Backing, DriveFormat};
    use std::os::unix::fs::MetadataExt;
    let name = layer.file.display().to_string();
    let mut note = |f: &std::fs::File, name: &str| -> Result<(), String> {
        let m = f.metadata().map_err(|e| format!("{name}: {e}"))?;
        if seen.contains(&(m.dev(), m.ino())) {
            return Err(format!(
                "{name}: the same file appears twice in one backing chain"
            ));
        }
        seen.push((m.dev(), m.ino()));
        Ok(())
    };
    let f = match file {
        Some(f) => f,
        None => open_image_file(&layer.file, writable, cache, fds)?,
    };
    note(&f, &name)?;
    match layer.format {
        DriveFormat::Raw => {
            moat_block::qcow2::open_raw_layer(f, writable).map_err(|e| format!("{name}: {e}"))
        }
        DriveFormat::Qcow2 => {
            let data_file = match &layer.data_file {
                Some(p) => {
                    let df = open_image_file(p, writable, cache, fds)?;
                    note(&df, &p.display().to_string())?;
                    Some(df)
                }
                None => None,
            };
            let below = match &layer.backing {
                Backing::Unnamed => Below::Unnamed,
                Backing::None => Below::None,
                Backing::Layer(b) => Below::Layer(open_layer(b, None, false, cache, fds, seen)?),
            };
            moat_block::qcow2::open_layer(&name, f, writable, below, data_file)
        }
    }
}

/// What every boot of the VM starts from: kernel and initrd bytes (read
/// once), the command line, and the opened disks.
#[derive(Debug, Clone)]
pub struct BootImages {
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
    pub disks: Vec<Disk>,
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) handler for the kick signal; once per process.
pub fn init_kick_signal() -> Result<(), VmError> {
    vmm_sys_util::signal::register_signal_handler(control::kick_signal(), noop_handler)
        .map_err(|e| VmError::Io(std::io::Error::from_raw_os_error(e.errno())))
}

/// A built VM, ready to run.
pub struct Vm {
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    bus: Arc<PlatformBus>,
    generation: u64,
    events: Sender<VmEvent>,
    topology: moat_config::Topology,
    acpi: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Vm {{ vcpus: {}, generation: {} }}",
            self.topology.cpus, self.generation
        )
    }
}

fn create_memory(vm: &VmFd, layout: &MemLayout) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram_regions()
        .iter()
        .map(|&(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
        size: layout.mem_size >> 20,
        why: e.to_string(),
    })?;
    for (slot, r) in mem.iter().enumerate() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory {
                size: layout.mem_size >> 20,
                why: e.to_string(),
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host` points to a live mapping of `r.len()` bytes owned by
        // `mem`, which the returned value keeps alive as long as the VM.
        kvm("KVM_SET_USER_MEMORY_REGION", unsafe {
            vm.set_user_memory_region(region)
        })?;
    }
    Ok(mem)
}

impl Vm {
    /// Build a VM: memory, irqchip, PIT, devices, vCPUs, and load the guest.
    pub fn build(
        cfg: &VmConfig,
        images: &BootImages,
        platform: &Platform,
        generation: u64,
        events: Sender<VmEvent>,
    ) -> Result<Vm, VmError> {
        let kvm_sys = &platform.kvm;
        let vm = kvm("KVM_CREATE_VM", kvm_sys.create_vm())?;
        kvm(
            "KVM_SET_IDENTITY_MAP_ADDR",
            vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR),
        )?;
        kvm(
            "KVM_SET_TSS_ADDR",
            vm.set_tss_address(KVM_TSS_ADDR as usize),
        )?;
        kvm("KVM_CREATE_IRQCHIP", vm.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        kvm("KVM_CREATE_PIT2", vm.create_pit2(pit))?;

        let layout = MemLayout::new(cfg.mem_size);
        let mem = create_memory(&vm, &layout)?;

        let t = &cfg.smp;
        let apic_ids: Vec<u32> = (0..t.cpus).map(|i| cpuid::apic_id(t, i)).collect();
        let virtio: Vec<(u64, u32)> = (0..images.disks.len())
            .map(|i| {
                moat_boot::layout::virtio_slot(i).ok_or(VmError::Io(std::io::Error::other(
                    "too many virtio devices",
                )))
            })
            .collect::<Result<_, _>>()?;
        let machine = MachineDesc {
            apic_ids: apic_ids.clone(),
            acpi: cfg.acpi,
            virtio: virtio.clone(),
        };
        let entry = moat_boot::load(
            &mem,
            &layout,
            &images.kernel,
            images.initrd.as_deref(),
            &images.cmdline,
            &machine,
        )?;

        // Devices.
        let sink: RequestSink = {
            let tx = Mutex::new(events.clone());
            Arc::new(move |request| {
                let _ = lock(&tx).send(VmEvent::Request {
                    generation,
                    request,
                });
            })
        };
        {
            let mut uart = lock(platform.console.uart());
            uart.reset()?;
            kvm(
                "KVM_IRQFD (COM1)",
                vm.register_irqfd(&uart.irq().0, ports::COM1_IRQ),
            )?;
        }
        let kbd_irq = IrqLine::new()?;
        kvm(
            "KVM_IRQFD (i8042)",
            vm.register_irqfd(&kbd_irq.0, ports::I8042_IRQ),
        )?;
        let ged_irq = IrqLine::new()?;
        kvm(
            "KVM_IRQFD (GED)",
            vm.register_irqfd(&ged_irq.0, ports::GED_IRQ),
        )?;
        let mut bus = PlatformBus::new(
            platform.console.uart().clone(),
            platform.rtc.clone(),
            I8042::new(kbd_irq, sink.clone()),
            AcpiPm::new(sink),
            Ged::new(ged_irq),
        );
        for (disk, &(base, irq)) in images.disks.iter().zip(&virtio) {
            let dev = Block::new(
                disk.image.clone(),
                &disk.serial,
                disk.discard,
                disk.link.clone(),
            )?;
            let t = MmioTransport::new(Box::new(dev), mem.clone(), IrqLine::new()?)?;
            kvm("KVM_IRQFD (virtio)", vm.register_irqfd(&t.irq().0, irq))?;
            for (q, evt) in t.notify_fds().iter().enumerate() {
                kvm(
                    "KVM_IOEVENTFD (virtio)",
                    vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32),
                )?;
            }
            bus.virtio.push((base, Mutex::new(t)));
        }
        let bus = Arc::new(bus);

        // vCPUs.
        let supported = kvm(
            "KVM_GET_SUPPORTED_CPUID",
            kvm_sys.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        let mut vcpus = Vec::new();
        for i in 0..t.cpus {
            let vcpu = kvm(
                "KVM_CREATE_VCPU",
                vm.create_vcpu(u64::from(apic_ids[i as usize])),
            )?;
            let cpuid = cpuid::for_vcpu(&supported, t, i).map_err(|e| VmError::Fam("CPUID", e))?;
            kvm("KVM_SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
            let msrs = vcpu::boot_msrs().map_err(|e| VmError::Fam("MSRs", e))?;
            let n = kvm("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
            if n != msrs.as_slice().len() {
                log::debug!(
                    "vCPU {i}: KVM accepted {n} of {} boot MSRs",
                    msrs.as_slice().len()
                );
            }
            kvm("KVM_SET_FPU", vcpu.set_fpu(&vcpu::boot_fpu()))?;
            kvm("KVM_SET_LAPIC", vcpu::setup_lapic(&vcpu))?;
            if i == 0 {
                let sregs = kvm("KVM_GET_SREGS", vcpu.get_sregs())?;
                let (regs, sregs) = vcpu::boot_registers(&entry, sregs);
                kvm("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
                kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;
            }
            vcpus.push(vcpu);
        }
        log::debug!("boot entry {entry:?}");
        Ok(Vm {
            _vm: vm,
            _mem: mem,
            vcpus,
            bus,
            generation,
            events,
            topology: *t,
            acpi: cfg.acpi,
        })
    }

    /// Run until the guest resets or powers off, the monitor resets or
    /// quits, a vCPU fails, or a signal arrives. `paused` is the run state
    /// (true: vCPUs parked) before and after. Monitor commands are served
    /// here. The vCPU threads are gone afterwards; the VM itself is dropped
    /// by the caller (or leaked at process exit: closing a KVM VM fd is
    /// slow, and the kernel tears it down with the rest of the process).
    pub fn run(
        &mut self,
        events: &Receiver<VmEvent>,
        paused: &mut bool,
        life: &dyn Lifecycle,
    ) -> Result<VmExit, VmError> {
        let set = VcpuSet::new(self.vcpus.len(), *paused);
        set.spawn(
            std::mem::take(&mut self.vcpus),
            self.bus.clone(),
            self.events.clone(),
            self.generation,
        )?;
        let generation = self.generation;
        let result = loop {
            let ev = match events.recv() {
                Ok(ev) => ev,
                Err(_) => break Ok(VmExit::Signal(0)),
            };
            match ev {
                VmEvent::Request {
                    generation: g,
                    request,
                } if g == generation => {
                    break Ok(match request {
                        VmRequest::Reset => VmExit::GuestReset,
                        VmRequest::PowerOff => VmExit::GuestPowerOff,
                    });
                }
                VmEvent::VcpuFailed {
                    generation: g,
                    cpu,
                    why,
                } if g == generation => {
                    break Err(VmError::VcpuFailed { cpu, why });
                }
                VmEvent::Signal(s) => break Ok(VmExit::Signal(s)),
                VmEvent::Control { cmd, reply } => {
                    let (answer, exit) = self.control(&set, cmd, life);
                    *paused = set.is_paused();
                    let _ = reply.send(answer);
                    if let Some(exit) = exit {
                        break Ok(exit);
                    }
                }
                _ => {} // stale event from an earlier boot
            }
        };
        *paused = set.is_paused();
        if !set.stop() {
            log::error!("a vCPU did not stop within {:?}", control::WAIT_LIMIT);
            // The VM cannot be rebuilt under a vCPU that still runs; moat
            // can still exit.
            if matches!(result, Ok(VmExit::GuestReset | VmExit::HostReset)) {
                return Err(VmError::VcpuStuck);
            }
        }
        result
    }

    fn control(
        &self,
        set: &VcpuSet,
        cmd: Control,
        life: &dyn Lifecycle,
    ) -> (ControlReply, Option<VmExit>) {
        match cmd {
            Control::Stop => {
                if !set.is_paused() {
                    if !set.pause() {
                        return (ControlReply::Error("a vCPU did not stop".into()), None);
                    }
                    life.stopped();
                }
                (ControlReply::Done, None)
            }
            Control::Cont => {
                if set.is_paused() {
                    set.resume();
                    life.resumed();
                }
                (ControlReply::Done, None)
            }
            Control::Reset => (ControlReply::Done, Some(VmExit::HostReset)),
            Control::Quit => (ControlReply::Done, Some(VmExit::Quit)),
            Control::Powerdown => {
                life.powerdown();
                if self.acpi {
                    lock(&self.bus.ged).power_button();
                } else {
                    lock(&self.bus.i8042).ctrl_alt_del();
                }
                (ControlReply::Done, None)
            }
            Control::Status => {
                let running = !set.is_paused();
                (
                    ControlReply::Status {
                        running,
                        status: if running { "running" } else { "paused" },
                    },
                    None,
                )
            }
            Control::Cpus => {
                let t = &self.topology;
                let tids = set.thread_ids();
                let cpus = (0..t.cpus)
                    .map(|i| CpuInfo {
                        index: i,
                        thread_id: tids.get(i as usize).copied().unwrap_or(0),
                        position: cpuid::Position::of(t, i),
                    })
                    .collect();
                (ControlReply::Cpus(cpus), None)
            }
            Control::Registers(which) => {
                let ids: Vec<u32> = match which {
                    Some(i) if i < self.topology.cpus => vec![i],
                    Some(i) => {
                        return (ControlReply::Error(format!("CPU {i} does not exist")), None)
                    }
                    None => (0..self.topology.cpus).collect(),
                };
                let mut text = String::new();
                for i in ids {
                    if which.is_none() {
                        text += &format!("\nCPU#{i}\n");
                    }
                    match set.registers(i as usize) {
                        Some(d) => text += &format!("{d}\n"),
                        None => text += &format!("CPU#{i}: not responding\n"),
                    }
                }
                (ControlReply::Text(text), None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// cache=none opens the image's path a second time, with O_DIRECT: it
    /// must find the file it opened the first time, not what the path was
    /// pointed at in between.
    #[test]
    fn the_o_direct_descriptor_must_be_the_same_file() {
        let d = std::env::temp_dir().join(format!("moat-direct-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a.img"), d.join("b.img"));
        std::fs::write(&a, vec![0u8; 8192]).unwrap();
        std::fs::write(&b, vec![0u8; 8192]).unwrap();
        let first = std::fs::File::open(&a).unwrap();
        let same = super::open_direct(&a, false, moat_config::CacheMode::None, &first);
        // tmpfs may refuse O_DIRECT; that is a different error.
        if let Err(e) = &same {
            assert!(e.contains("O_DIRECT"), "{e}");
        }
        // The path now names another file (as a swap in between would).
        std::fs::rename(&b, &a).unwrap();
        if same.is_ok() {
            let e =
                super::open_direct(&a, false, moat_config::CacheMode::None, &first).unwrap_err();
            assert!(e.contains("the file changed"), "{e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
