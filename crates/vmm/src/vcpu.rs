//! vCPU setup (registers for each boot entry, MSRs, FPU, LAPIC) and the
//! KVM_RUN loop with a free exit handler that unit tests can call.

use crate::bus::PlatformBus;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use moat_boot::gdt;
use moat_boot::layout::{BOOT_STACK_TOP, GDT_ADDR, PML4_ADDR};
use moat_boot::EntryPoint;
use moat_devices::VmRequest;

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Request(VmRequest),
    Fail(String),
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// A vCPU's exits counted by kind and port or address, kept under
/// `MOAT_LOG=debug` and printed when the vCPU's thread ends: which exits a
/// guest's boot costs, to find the avoidable ones.
#[derive(Debug, Default)]
pub struct ExitCounts(std::collections::HashMap<(&'static str, u64), u64>);

impl ExitCounts {
    pub fn note(&mut self, exit: &VcpuExit<'_>) {
        let key = match exit {
            VcpuExit::IoIn(port, _) => ("port in", u64::from(*port)),
            VcpuExit::IoOut(port, _) => ("port out", u64::from(*port)),
            VcpuExit::MmioRead(addr, _) => ("mmio read", *addr),
            VcpuExit::MmioWrite(addr, _) => ("mmio write", *addr),
            VcpuExit::Hlt => ("hlt", 0),
            VcpuExit::Intr => ("intr", 0),
            VcpuExit::IrqWindowOpen => ("irq window", 0),
            _ => ("other", 0),
        };
        *self.0.entry(key).or_default() += 1;
    }

    /// One line per kind and address, the most frequent first.
    pub fn report(&self, cpu: usize) -> String {
        let mut v: Vec<_> = self.0.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let total: u64 = self.0.values().sum();
        let mut s = format!("vCPU {cpu}: {total} exits");
        for ((kind, addr), n) in v {
            s += &format!("\n  {n:>9} {kind} {addr:#x}");
        }
        s
    }
}

/// Handle one exit of KVM_RUN.
pub fn handle_exit(exit: VcpuExit<'_>, bus: &PlatformBus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            bus.pio_read(port, data);
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            bus.pio_write(port, data);
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            bus.mmio_read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            bus.mmio_write(addr, data);
            ExitAction::Continue
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Continue,
        VcpuExit::Shutdown => ExitAction::Request(VmRequest::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            ExitAction::Request(VmRequest::PowerOff)
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => ExitAction::Request(VmRequest::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _) => {
            ExitAction::Fail("guest crashed (KVM_SYSTEM_EVENT_CRASH)".into())
        }
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Fail(format!(
            "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
        )),
        VcpuExit::InternalError => ExitAction::Fail("KVM_EXIT_INTERNAL_ERROR".into()),
        other => ExitAction::Fail(format!("unexpected KVM exit {other:?}")),
    }
}

fn seg(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Registers and segments of the boot vCPU for `entry`.
pub fn boot_registers(entry: &EntryPoint, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    let long = matches!(entry, EntryPoint::Linux64 { .. });
    let mut regs = kvm_regs {
        rflags: 0x2,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        ..Default::default()
    };
    match *entry {
        EntryPoint::Pvh { entry, start_info } => {
            regs.rip = u64::from(entry);
            regs.rbx = u64::from(start_info);
        }
        EntryPoint::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsi = zero_page;
        }
        EntryPoint::Linux32 { entry, zero_page } => {
            regs.rip = u64::from(entry);
            regs.rsi = u64::from(zero_page);
            regs.rsp = 0;
            regs.rbp = 0;
        }
    }
    sregs.cs = seg(gdt::CODE_SEL, 0xb, long);
    let data = seg(gdt::DATA_SEL, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: gdt::TSS_SEL,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt::table(long).len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    if long {
        sregs.cr0 = 0x8000_0011; // PG | ET | PE
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = 0x20; // PAE
        sregs.efer = 0x500; // LMA | LME
    } else {
        sregs.cr0 = 0x11; // ET | PE
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    (regs, sregs)
}

/// MSR values at power-on (as Firecracker and QEMU set them).
pub fn boot_msrs() -> Result<Msrs, vmm_sys_util::fam::Error> {
    let e = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        e(0x174, 0),             // IA32_SYSENTER_CS
        e(0x175, 0),             // IA32_SYSENTER_ESP
        e(0x176, 0),             // IA32_SYSENTER_EIP
        e(0xc000_0081, 0),       // STAR
        e(0xc000_0082, 0),       // LSTAR
        e(0xc000_0083, 0),       // CSTAR
        e(0xc000_0084, 0),       // SYSCALL_MASK
        e(0xc000_0102, 0),       // KERNEL_GS_BASE
        e(0x10, 0),              // TSC
        e(0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        e(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ])
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, f: impl Fn(u32) -> u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[off + i] as u8;
    }
    let v = f(u32::from_le_bytes(b)).to_le_bytes();
    for (i, x) in v.iter().enumerate() {
        regs[off + i] = *x as std::os::raw::c_char;
    }
}

/// LINT0 = ExtINT, LINT1 = NMI, as a BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut l = vcpu.get_lapic()?;
    let set_mode = |mode: u32| move |v: u32| (v & !0x700) | (mode << 8);
    lapic_reg(&mut l.regs, APIC_LVT0, set_mode(APIC_MODE_EXTINT));
    lapic_reg(&mut l.regs, APIC_LVT1, set_mode(APIC_MODE_NMI));
    vcpu.set_lapic(&l)
}

/// A register dump for the log when a vCPU fails.
pub fn dump(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    if let Ok(r) = vcpu.get_regs() {
        s += &format!(
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\nRSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n\
             R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\nR12={:016x} R13={:016x} R14={:016x} R15={:016x}\n\
             RIP={:016x} RFL={:08x}\n",
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12,
            r.r13, r.r14, r.r15, r.rip, r.rflags
        );
    }
    if let Ok(sr) = vcpu.get_sregs() {
        for (n, sg) in [
            ("CS", sr.cs),
            ("SS", sr.ss),
            ("DS", sr.ds),
            ("ES", sr.es),
            ("FS", sr.fs),
            ("GS", sr.gs),
            ("TR", sr.tr),
        ] {
            s += &format!(
                "{n} ={:04x} {:016x} {:08x} type={:x} l={} db={}\n",
                sg.selector, sg.base, sg.limit, sg.type_, sg.l, sg.db
            );
        }
        s += &format!(
            "GDT={:016x} {:04x} IDT={:016x} {:04x}\nCR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} EFER={:016x}",
            sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit, sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer
        );
    }
    s
}

/// Describe a KVM_EXIT_INTERNAL_ERROR from the `internal` member of `kvm_run`.
pub fn internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
    // `internal` member of the union; every bit pattern is a valid u32/u64.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let kind = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "event delivery failure",
        4 => "unexpected VM exit",
        _ => "unknown",
    };
    format!(
        "KVM_EXIT_INTERNAL_ERROR: {kind} (suberror {}), data {:x?}",
        internal.suberror,
        &internal.data[..n]
    )
}
