//! The KVM ioctls moat makes once the guest runs, by exact request number
//! (the numbers as kvm-ioctls defines them, from the kernel's uapi).

#![allow(non_snake_case)]

use kvm_bindings::{
    kvm_cpuid2, kvm_fpu, kvm_ioeventfd, kvm_irqfd, kvm_lapic_state, kvm_msrs, kvm_pit_config,
    kvm_regs, kvm_sregs, kvm_userspace_memory_region,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;

ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);

/// What a vCPU thread asks of KVM: run, and read registers (for the
/// monitor's `info registers` and internal-error reports).
pub fn vcpu() -> Vec<(u64, &'static str)> {
    vec![
        (KVM_RUN(), "KVM_RUN"),
        (KVM_GET_REGS(), "KVM_GET_REGS: register dumps"),
        (KVM_GET_SREGS(), "KVM_GET_SREGS: register dumps"),
    ]
}

/// Everything moat asks of KVM after setup: the vCPUs' calls, plus
/// building a new VM on reset (the main thread).
pub fn all() -> Vec<(u64, &'static str)> {
    let mut v = vcpu();
    v.extend([
        (KVM_CREATE_VM(), "reset: a new VM"),
        (KVM_GET_VCPU_MMAP_SIZE(), "reset: vCPU run areas"),
        (KVM_GET_SUPPORTED_CPUID(), "reset: CPUID"),
        (KVM_CREATE_VCPU(), "reset: vCPUs"),
        (KVM_SET_USER_MEMORY_REGION(), "reset: guest RAM"),
        (KVM_SET_TSS_ADDR(), "reset: VM setup"),
        (KVM_SET_IDENTITY_MAP_ADDR(), "reset: VM setup"),
        (KVM_CREATE_IRQCHIP(), "reset: interrupt controllers"),
        (KVM_CREATE_PIT2(), "reset: the PIT"),
        (KVM_IRQFD(), "reset: device interrupts"),
        (KVM_IOEVENTFD(), "reset: virtio notifications"),
        (KVM_SET_REGS(), "reset: boot registers"),
        (KVM_SET_SREGS(), "reset: boot registers"),
        (KVM_SET_MSRS(), "reset: boot MSRs"),
        (KVM_SET_FPU(), "reset: boot FPU state"),
        (KVM_GET_LAPIC(), "reset: local APIC setup"),
        (KVM_SET_LAPIC(), "reset: local APIC setup"),
        (KVM_SET_CPUID2(), "reset: CPUID"),
    ]);
    v
}
