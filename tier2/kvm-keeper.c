/* Holds KVM's local-APIC static keys on in the Tier 2 test host (L1) for
 * its whole run:
 *   kvm-keeper        (started by l1-init.sh, never ends)
 *
 * KVM counts vCPUs whose local APIC is software- or hardware-disabled in
 * two deferred static keys (apic_sw_disabled, apic_hw_disabled). Every L2
 * boot takes them from 0 to 1 and back, and each change patches kernel
 * code on every CPU. Under QEMU's TCG a CPU has been left spinning at such
 * a site while another patched it: L1 soft-locked in __apic_accept_irq
 * (irqfd_inject) during an L2 network transfer, and the L2 guest died.
 * One idle VM whose only vCPU has both disabled (a new vCPU's APIC is
 * software-disabled; the APIC base MSR without its enable bit disables the
 * hardware) keeps both counts above 0, so L2 boots never patch code. A
 * real host running VMs is in the same state most of the time. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MSR_IA32_APICBASE 0x1b
#define APICBASE_BSP 0x100

int main(void) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("kvm-keeper: /dev/kvm"); return 1; }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) { perror("kvm-keeper: KVM_CREATE_VM"); return 1; }
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) { perror("kvm-keeper: KVM_CREATE_IRQCHIP"); return 1; }
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) { perror("kvm-keeper: KVM_CREATE_VCPU"); return 1; }
    struct { struct kvm_msrs hdr; struct kvm_msr_entry e; } msrs = {0};
    msrs.hdr.nmsrs = 1;
    msrs.e.index = MSR_IA32_APICBASE;
    msrs.e.data = 0xfee00000 | APICBASE_BSP; /* enable bit (0x800) clear */
    if (ioctl(vcpu, KVM_SET_MSRS, &msrs) != 1) { perror("kvm-keeper: KVM_SET_MSRS"); return 1; }
    printf("kvm-keeper: holding a vCPU with its local APIC disabled\n");
    fflush(stdout);
    for (;;) pause();
}
