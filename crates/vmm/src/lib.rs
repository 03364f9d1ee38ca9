//! The KVM virtual machine: guest memory, in-kernel irqchip and PIT, one
//! thread per vCPU, and the lifecycle (run, reset, power-off, failure).
//!
//! A VM is built from a validated [`VmConfig`] plus the kernel/initrd bytes
//! (read once at startup). On a guest reset the whole KVM VM is torn down
//! and built again from the same inputs; the [`Platform`] (serial console,
//! CMOS RTC) survives, as it would on real hardware.

pub mod bus;
pub mod cpuid;
pub mod vcpu;

use bus::PioBus;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use moat_boot::layout::{ports, MemLayout, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use moat_boot::MachineDesc;
use moat_cli::VmConfig;
use moat_devices::i8042::I8042;
use moat_devices::pm::AcpiPm;
use moat_devices::rtc::Rtc;
use moat_devices::serial::Console;
use moat_devices::{IrqLine, RequestSink, VmRequest};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
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
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|err| VmError::Kvm { what, err })
}

/// Why a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (or triple-faulted).
    Reset,
    /// The guest powered off through ACPI.
    PowerOff,
    /// moat was asked to terminate by a signal.
    Signal(i32),
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
}

/// Devices and backends that survive guest resets.
#[derive(Debug)]
pub struct Platform {
    pub console: Console,
    pub rtc: Arc<Mutex<Rtc>>,
}

impl Platform {
    pub fn new(cfg: &VmConfig) -> Result<Self, VmError> {
        let console = Console::start(cfg.serial.as_ref(), IrqLine::new()?)
            .map_err(|e| VmError::Io(std::io::Error::other(e.to_string())))?;
        Ok(Platform {
            console,
            rtc: Arc::new(Mutex::new(Rtc::new())),
        })
    }
}

/// The kernel and initrd contents (read once; reused on every reset).
#[derive(Debug, Clone)]
pub struct BootImages {
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub cmdline: String,
}

/// Blocks vCPUs until the VM is started (`-S` keeps them here).
#[derive(Debug, Default)]
pub struct StartGate {
    started: Mutex<bool>,
    cv: Condvar,
}

impl StartGate {
    pub fn open(&self) {
        *self.started.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Wait until opened or `stop` is set; true if the vCPU may run.
    fn wait(&self, stop: &AtomicBool) -> bool {
        let mut s = self.started.lock().unwrap_or_else(|e| e.into_inner());
        while !*s && !stop.load(Ordering::SeqCst) {
            s = self
                .cv
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !stop.load(Ordering::SeqCst)
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) handler for the kick signal; once per process.
pub fn init_kick_signal() -> Result<(), VmError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| VmError::Io(std::io::Error::from_raw_os_error(e.errno())))
}

/// A built VM, ready to run.
pub struct Vm {
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    bus: Arc<PioBus>,
    generation: u64,
    events: Sender<VmEvent>,
    pub gate: Arc<StartGate>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Vm {{ vcpus: {}, generation: {} }}",
            self.vcpus.len(),
            self.generation
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
        let kvm_sys = Kvm::new().map_err(VmError::KvmOpen)?;
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
        let machine = MachineDesc {
            apic_ids: apic_ids.clone(),
            acpi: cfg.acpi,
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
                let _ = tx
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send(VmEvent::Request {
                        generation,
                        request,
                    });
            })
        };
        {
            let mut uart = platform
                .console
                .uart()
                .lock()
                .unwrap_or_else(|e| e.into_inner());
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
        let bus = Arc::new(PioBus::new(
            platform.console.uart().clone(),
            platform.rtc.clone(),
            I8042::new(kbd_irq, sink.clone()),
            AcpiPm::new(sink),
        ));

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
            gate: Arc::new(StartGate::default()),
        })
    }

    /// Run the vCPUs until the guest resets, powers off, fails, or a signal
    /// arrives. The vCPUs are gone afterwards; the VM itself is dropped by
    /// the caller (or leaked at process exit: closing a KVM VM fd is slow,
    /// and the kernel tears it down faster with the rest of the process).
    pub fn run(&mut self, events: &Receiver<VmEvent>, start: bool) -> Result<VmExit, VmError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let generation = self.generation;
        for (i, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let bus = self.bus.clone();
            let stop = stop.clone();
            let gate = self.gate.clone();
            let tx = self.events.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(vcpu, i as u32, bus, stop, gate, tx, generation))?;
            threads.push(h);
        }
        if start {
            self.gate.open();
        }
        let result = loop {
            match events.recv() {
                Ok(VmEvent::Request {
                    generation: g,
                    request,
                }) if g == generation => {
                    break Ok(match request {
                        VmRequest::Reset => VmExit::Reset,
                        VmRequest::PowerOff => VmExit::PowerOff,
                    });
                }
                Ok(VmEvent::VcpuFailed {
                    generation: g,
                    cpu,
                    why,
                }) if g == generation => {
                    break Err(VmError::VcpuFailed { cpu, why });
                }
                Ok(VmEvent::Signal(s)) => break Ok(VmExit::Signal(s)),
                Ok(_) => continue, // stale event from an earlier boot
                Err(_) => break Ok(VmExit::Signal(0)),
            }
        };
        stop.store(true, Ordering::SeqCst);
        self.gate.open();
        for h in threads {
            while !h.is_finished() {
                // SAFETY: the thread has not been joined, so its pthread_t is
                // valid; the kick signal has a no-op handler installed.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = h.join();
        }
        result
    }
}

fn vcpu_thread(
    mut vcpu: VcpuFd,
    cpu: u32,
    bus: Arc<PioBus>,
    stop: Arc<AtomicBool>,
    gate: Arc<StartGate>,
    tx: Sender<VmEvent>,
    generation: u64,
) {
    if !gate.wait(&stop) {
        return;
    }
    let fail = |why: String, vcpu: &VcpuFd| {
        log::error!("vCPU {cpu}: {why}\n{}", vcpu::dump(vcpu));
        let _ = tx.send(VmEvent::VcpuFailed {
            generation,
            cpu,
            why,
        });
    };
    while !stop.load(Ordering::SeqCst) {
        let action = match vcpu.run() {
            Ok(kvm_ioctls::VcpuExit::InternalError) => {
                vcpu::ExitAction::Fail(vcpu::internal_error(&mut vcpu))
            }
            Ok(exit) => vcpu::handle_exit(exit, &bus),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                continue;
            }
            Err(e) => vcpu::ExitAction::Fail(format!("KVM_RUN: {e}")),
        };
        match action {
            vcpu::ExitAction::Continue => {}
            vcpu::ExitAction::Request(request) => {
                let _ = tx.send(VmEvent::Request {
                    generation,
                    request,
                });
                // Stay out of the guest until the control loop stops us.
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            vcpu::ExitAction::Fail(why) => {
                fail(why, &vcpu);
                return;
            }
        }
    }
}
