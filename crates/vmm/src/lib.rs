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
mod machine;
pub mod nic;
mod nodes;
pub mod vcpu;

pub use machine::Machine;
pub use nic::Nic;

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
use moat_devices::virtio::net::{Net, NetPort};
use moat_devices::virtio::rng::{Rng, RngPort};
use moat_devices::virtio::vsock::{Vsock, VsockPort};
use moat_devices::virtio::VirtioDevice;
use moat_devices::{IrqLine, RequestSink, VmRequest};
use moat_sys::lock;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

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
    #[error(transparent)]
    Boot(#[from] moat_boot::BootError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("building {0}: {1:?}")]
    Fam(&'static str, vmm_sys_util::fam::Error),
    /// A kernel, initrd or disk image could not be used (the message names it).
    #[error("{0}")]
    Image(String),
    #[error("vCPU {cpu} failed: {why}")]
    VcpuFailed { cpu: u32, why: String },
    #[error("a vCPU did not stop: the VM cannot be reset")]
    VcpuStuck,
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|err| VmError::Kvm { what, err })
}

/// Events that reach the VM's control loop.
#[derive(Debug)]
pub enum VmEvent {
    /// From a device or vCPU of the boot with this generation.
    Device { generation: u64, request: VmRequest },
    VcpuFailed {
        generation: u64,
        cpu: u32,
        why: String,
    },
    /// SIGINT, SIGTERM or SIGHUP.
    Signal(i32),
    /// A disk's host I/O error whose action is to stop the VM.
    IoErrorStop,
    /// A front end's request.
    Api(moat_api::Call),
}

/// Devices and backends that survive guest resets.
#[derive(Debug)]
pub struct Platform {
    pub console: Console,
    pub rtc: Arc<Mutex<Rtc>>,
    /// /dev/kvm, opened once at startup: every boot's VM comes from it, so
    /// moat never opens /dev/kvm again (after a privilege drop it could not).
    pub kvm: Kvm,
    /// KVM_CAP_TSC_DEADLINE_TIMER (asked before the sandbox, which does not
    /// let KVM_CHECK_EXTENSION through).
    pub tsc_deadline: bool,
}

impl Platform {
    /// Start the console; `kvm` is /dev/kvm, opened.
    pub fn new(cfg: &VmConfig, kvm: Kvm) -> Result<Self, VmError> {
        let console = Console::start(cfg.serial.as_ref(), IrqLine::new()?)
            .map_err(|e| VmError::Io(std::io::Error::other(e.to_string())))?;
        Ok(Platform {
            tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
            kvm,
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
    /// No medium: no image, and the device-side state of one.
    pub fn empty(d: &moat_config::DriveConfig) -> std::io::Result<Disk> {
        Ok(Disk {
            image: Arc::new(moat_block::MemImage::new(Vec::new(), true)),
            serial: String::new(),
            discard: moat_devices::virtio::block::Discard::Ignore,
            link: moat_devices::virtio::block::DriveLink::new(
                d.throttle,
                d.werror,
                d.rerror,
                d.num_queues,
            )?,
        })
    }

    /// Open `d` (see [`moat_block::open`]) with its device-side state.
    pub fn open(
        d: &moat_config::DriveConfig,
        fds: &FdStore,
    ) -> Result<Disk, moat_block::BlockError> {
        let link = moat_devices::virtio::block::DriveLink::new(
            d.throttle,
            d.werror,
            d.rerror,
            d.num_queues,
        )?;
        // (The image's writes to its file, for its protocol node.)
        let watch = {
            let link = link.clone();
            Arc::new(move |offset, len, discard, ok| link.file_write(offset, len, discard, ok))
        };
        Ok(Disk {
            image: moat_block::open(d, fds, Some(watch))?,
            serial: d.serial.clone().unwrap_or_default(),
            link,
            discard: if d.discard_unmap {
                moat_devices::virtio::block::Discard::Unmap
            } else {
                moat_devices::virtio::block::Discard::Ignore
            },
        })
    }
}

/// A kernel or initrd. A file stays open and is read again for each boot,
/// its headers into small buffers and its contents straight into guest
/// memory ([`moat_boot::Image`]): moat never holds a copy of a whole image
/// (a copy of a 53 MB vmlinux, even one dropped once the guest was
/// loaded, made moat's peak RSS half again as large).
#[derive(Debug, Clone)]
pub enum GuestImage {
    File {
        file: Arc<std::fs::File>,
        /// Its size when opened; a boot refuses a file that has changed.
        len: u64,
        /// The option and path, for messages.
        name: String,
    },
    /// Built into moat (the demo guest).
    Builtin(&'static [u8]),
}

impl GuestImage {
    /// A file, opened, of `len` bytes; `name` says which, in messages.
    pub fn file(file: std::fs::File, len: u64, name: String) -> GuestImage {
        GuestImage::File {
            file: Arc::new(file),
            len,
            name,
        }
    }

    /// Refuse a file whose size changed since moat opened it (each boot).
    pub fn unchanged(&self) -> Result<(), VmError> {
        if let GuestImage::File { file, len, name } = self {
            let now = std::io::Seek::seek(&mut &**file, std::io::SeekFrom::End(0))
                .map_err(|e| VmError::Image(format!("{name}: {e}")))?;
            if now != *len {
                return Err(VmError::Image(format!(
                    "{name}: its size changed since moat opened it ({len} bytes)"
                )));
            }
        }
        Ok(())
    }
}

impl moat_boot::Image for GuestImage {
    fn size(&self) -> u64 {
        match self {
            GuestImage::File { len, .. } => *len,
            GuestImage::Builtin(b) => b.size(),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), moat_boot::BootError> {
        match self {
            GuestImage::File { file, name, .. } => {
                std::os::unix::fs::FileExt::read_exact_at(&**file, buf, offset)
                    .map_err(|e| moat_boot::BootError::Read(format!("{name}: {e}")))
            }
            GuestImage::Builtin(b) => b.read_at(offset, buf),
        }
    }

    fn copy_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), moat_boot::BootError> {
        match self {
            GuestImage::File { file, name, .. } => {
                let count = usize::try_from(len)
                    .map_err(|_| moat_boot::BootError::Read(format!("{name}: {len} bytes")))?;
                let mut src = FileAt { file, offset };
                vm_memory::Bytes::read_exact_volatile_from(mem, GuestAddress(addr), &mut src, count)
                    .map_err(|e| moat_boot::BootError::Read(format!("{name}: {e}")))
            }
            GuestImage::Builtin(b) => b.copy_to_guest(mem, addr, offset, len),
        }
    }
}

/// A file read from `offset` on with pread (the file's own position is
/// left alone), into guest memory.
struct FileAt<'a> {
    file: &'a std::fs::File,
    offset: u64,
}

impl vm_memory::ReadVolatile for FileAt<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        use std::os::fd::AsRawFd;
        let guard = buf.ptr_guard_mut();
        // SAFETY: pread writes at most buf.len() bytes to the slice's
        // memory, which the guard keeps mapped (guest RAM moat owns); the
        // descriptor is open for the borrow of `file`.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                self.offset as libc::off_t,
            )
        };
        if n < 0 {
            return Err(vm_memory::VolatileMemoryError::IOError(
                std::io::Error::last_os_error(),
            ));
        }
        let n = n as usize;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

/// What every boot of the VM starts from: kernel and initrd, the command
/// line, the opened disks and network interfaces.
#[derive(Debug, Clone)]
pub struct BootImages {
    pub kernel: GuestImage,
    pub initrd: Option<GuestImage>,
    pub cmdline: String,
    pub disks: Vec<Disk>,
    /// The interfaces, in device order after the disks.
    pub nics: Vec<NetPort>,
    /// The entropy devices' sources and limits, after the interfaces.
    pub rngs: Vec<RngPort>,
    /// The vsock device's listeners, last.
    pub vsock: Option<VsockPort>,
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

/// A transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Leave a hole of exactly `len` bytes at a 2 MiB-aligned address, fenced
/// by PROT_NONE reservations on both sides, so that the next anonymous mmap
/// of `len` bytes (vm-memory's) most likely lands there: KVM maps guest RAM
/// with 2 MiB pages only where the guest-physical and host addresses agree
/// modulo 2 MiB, and kernels before 6.7 do not align large mappings. QEMU
/// aligns its RAM the same way. Returns the fences, to unmap afterwards.
fn huge_aligned_hole(len: usize) -> Vec<(usize, usize)> {
    let total = len + HUGE_PAGE;
    // SAFETY: a new inaccessible reservation that nothing else refers to.
    let r = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return Vec::new();
    }
    let r = r as usize;
    let hole = (r + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    // SAFETY: unmapping part of the reservation just made.
    unsafe { libc::munmap(hole as *mut libc::c_void, len) };
    [(r, hole - r), (hole + len, r + total - hole - len)]
        .into_iter()
        .filter(|&(_, l)| l > 0)
        .collect()
}

/// Map the guest's RAM (not yet known to KVM: see [`register_memory`]),
/// with transparent huge pages (each region 2 MiB-aligned) or never, as
/// `thp` says (see `VmConfig::thp`).
fn map_memory(layout: &MemLayout, thp: bool) -> Result<GuestMemoryMmap, VmError> {
    let err = |why: String| VmError::Memory {
        size: layout.mem_size >> 20,
        why,
    };
    let mut regions = Vec::new();
    for &(addr, size) in layout.ram_regions().iter() {
        let fences = if thp {
            huge_aligned_hole(size as usize)
        } else {
            Vec::new()
        };
        let region = GuestRegionMmap::from_range(GuestAddress(addr), size as usize, None);
        for (a, l) in fences {
            // SAFETY: the reservations made by huge_aligned_hole, used by
            // nothing (PROT_NONE).
            unsafe { libc::munmap(a as *mut libc::c_void, l) };
        }
        regions.push(region.map_err(|e| err(e.to_string()))?);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))?;
    let advise = |host: *mut u8, len: usize, huge: bool| {
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on (part of) a mapping `mem` owns; neither value
        // changes what the memory holds.
        if unsafe { libc::madvise(host.cast(), len, advice) } != 0 {
            let e = std::io::Error::last_os_error();
            // A kernel without THP refuses both; there is nothing to choose then.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(err(format!("madvise: {e}")));
            }
        }
        Ok(())
    };
    for r in mem.iter() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| err(e.to_string()))?;
        let len = r.len() as usize;
        if thp && !(host as usize).is_multiple_of(HUGE_PAGE) {
            log::debug!("guest RAM at {host:?} is not 2 MiB-aligned: no huge pages for KVM there");
        }
        advise(host, len, thp)?;
        // The first 2 MiB (real-mode area, boot structures, all of a small
        // guest) keep 4 KiB pages: a huge page there would cost a small
        // guest 2 MiB for a few pages touched, and gains a large one nothing.
        if thp && r.start_addr().0 == 0 && len > HUGE_PAGE {
            advise(host, HUGE_PAGE, false)?;
        }
    }
    Ok(mem)
}

/// Give KVM the guest's RAM, one slot per region: before the irqchip is
/// made (see [`Shell::start`]).
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, r) in mem.iter().enumerate() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory {
                size: r.len() >> 20,
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
        // `mem`, which the VM keeps alive as long as itself.
        kvm("KVM_SET_USER_MEMORY_REGION", unsafe {
            vm.set_user_memory_region(region)
        })?;
    }
    Ok(())
}

/// A boot's VM as far as KVM is concerned: the VM with its RAM, irqchip
/// and PIT. The first boot's shell is made in `Machine::new`, right after
/// the arguments are read; [`Vm::build`] then loads the guest and makes the
/// devices and vCPUs on it.
#[derive(Debug)]
pub struct Shell {
    vm: VmFd,
    mem: GuestMemoryMmap,
    layout: MemLayout,
}

impl Shell {
    /// Create the VM, map `mem_size` bytes of RAM and give it to KVM, then
    /// make the irqchip and PIT.
    ///
    /// The order matters: on the nested development host the first
    /// KVM_SET_USER_MEMORY_REGION made *after* KVM_CREATE_IRQCHIP takes
    /// 5-10 ms whatever the size (an SRCU grace period; the irqchip sets up
    /// IRQ routing), and 0.1-0.2 ms before it; the irqchip costs the same
    /// either way. Firecracker registers memory first too. (That wait was
    /// half of moat's time to the guest, and had a thread of its own.)
    pub fn start(kvm_sys: &Kvm, mem_size: u64, thp: bool) -> Result<Shell, VmError> {
        let vm = kvm("KVM_CREATE_VM", kvm_sys.create_vm())?;
        kvm(
            "KVM_SET_IDENTITY_MAP_ADDR",
            vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR),
        )?;
        kvm(
            "KVM_SET_TSS_ADDR",
            vm.set_tss_address(KVM_TSS_ADDR as usize),
        )?;
        let layout = MemLayout::new(mem_size);
        let mem = map_memory(&layout, thp)?;
        register_memory(&vm, &mem)?;
        moat_sys::timeline::mark("kvm: VM and guest memory");
        kvm("KVM_CREATE_IRQCHIP", vm.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        kvm("KVM_CREATE_PIT2", vm.create_pit2(pit))?;
        moat_sys::timeline::mark("kvm: irqchip and PIT");
        Ok(Shell { vm, mem, layout })
    }
}

impl Vm {
    /// Build a VM on `shell` (made by [`Shell::start`]): load the guest,
    /// make the devices and the vCPUs.
    pub fn build(
        cfg: &VmConfig,
        images: &BootImages,
        platform: &Platform,
        generation: u64,
        events: Sender<VmEvent>,
        shell: Shell,
    ) -> Result<Vm, VmError> {
        let (vcpus, bus) = Self::fill(cfg, images, platform, generation, &events, &shell)?;
        Ok(Vm {
            _vm: shell.vm,
            _mem: shell.mem,
            vcpus,
            bus,
            generation,
            events,
            topology: cfg.smp,
            acpi: cfg.acpi,
        })
    }

    /// The part of [`Vm::build`] that does not need KVM to know the memory:
    /// load the guest, make the devices and the vCPUs.
    fn fill(
        cfg: &VmConfig,
        images: &BootImages,
        platform: &Platform,
        generation: u64,
        events: &Sender<VmEvent>,
        shell: &Shell,
    ) -> Result<(Vec<VcpuFd>, Arc<PlatformBus>), VmError> {
        let kvm_sys = &platform.kvm;
        let (vm, mem, layout) = (&shell.vm, &shell.mem, &shell.layout);

        let t = &cfg.smp;
        let apic_ids: Vec<u32> = (0..t.cpus).map(|i| cpuid::apic_id(t, i)).collect();
        let virtio: Vec<(u64, u32)> = (0..images.disks.len()
            + images.nics.len()
            + images.rngs.len()
            + usize::from(images.vsock.is_some()))
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
        images.kernel.unchanged()?;
        if let Some(i) = &images.initrd {
            i.unchanged()?;
        }
        let entry = moat_boot::load(
            mem,
            layout,
            &images.kernel,
            images.initrd.as_ref(),
            &images.cmdline,
            &machine,
        )?;
        moat_sys::timeline::mark("guest loaded (kernel, initrd, ACPI)");

        // Devices.
        let sink: RequestSink = {
            let tx = Mutex::new(events.clone());
            Arc::new(move |request| {
                let _ = lock(&tx).send(VmEvent::Device {
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
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        for disk in &images.disks {
            devices.push(Box::new(Block::new(
                disk.image.clone(),
                &disk.serial,
                disk.discard,
                disk.link.clone(),
            )?));
        }
        for port in &images.nics {
            devices.push(Box::new(Net::new(port)?));
        }
        for port in &images.rngs {
            devices.push(Box::new(Rng::new(port)?));
        }
        if let Some(port) = &images.vsock {
            devices.push(Box::new(Vsock::new(port)?));
        }
        for (dev, &(base, irq)) in devices.into_iter().zip(&virtio) {
            let t = MmioTransport::new(dev, mem.clone(), IrqLine::new()?)?;
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
        moat_sys::timeline::mark("devices");

        // vCPUs.
        let mut supported = kvm(
            "KVM_GET_SUPPORTED_CPUID",
            kvm_sys.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        cpuid::add_vm_features(&mut supported, platform.tsc_deadline);
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
        moat_sys::timeline::mark("vCPUs set up");
        log::debug!("boot entry {entry:?}");
        Ok((vcpus, bus))
    }

    /// Start the vCPUs (parked when `paused`).
    pub fn start(&mut self, paused: bool) -> Result<Arc<VcpuSet>, VmError> {
        let set = VcpuSet::new(self.vcpus.len(), paused);
        set.spawn(
            std::mem::take(&mut self.vcpus),
            self.bus.clone(),
            self.events.clone(),
            self.generation,
        )?;
        Ok(set)
    }

    /// The ACPI power button (through the GED), or CTRL+ALT+DEL without ACPI.
    pub fn power_button(&self) {
        if self.acpi {
            lock(&self.bus.ged).power_button();
        } else {
            lock(&self.bus.i8042).ctrl_alt_del();
        }
    }

    /// The vCPUs as `query-cpus-fast` describes them.
    pub fn cpus(&self, set: &VcpuSet) -> Vec<moat_api::CpuInfo> {
        let t = &self.topology;
        let tids = set.thread_ids();
        (0..t.cpus)
            .map(|i| {
                let p = cpuid::Position::of(t, i);
                moat_api::CpuInfo {
                    index: i,
                    thread_id: tids.get(i as usize).copied().unwrap_or(0),
                    socket: p.socket,
                    // QEMU reports die-id only on machines with several dies.
                    die: (t.dies > 1).then_some(p.die),
                    core: p.core,
                    thread: p.thread,
                }
            })
            .collect()
    }

    /// HMP `info registers` for one vCPU, or all of them.
    pub fn registers(&self, set: &VcpuSet, which: Option<u32>) -> Result<String, String> {
        let ids: Vec<u32> = match which {
            Some(i) if i < self.topology.cpus => vec![i],
            Some(i) => return Err(format!("CPU {i} does not exist")),
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
        Ok(text)
    }
}
