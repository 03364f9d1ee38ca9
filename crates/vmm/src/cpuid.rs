//! Per-vCPU CPUID: KVM's supported set, with the topology of `-smp`
//! (APIC IDs, leaves 0x1, 0x4, 0xB, 0x1F, AMD 0x8000_0008/0x8000_001E),
//! the hypervisor bit and the KVM signature leaves.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use moat_config::Topology;

fn bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Bit widths of each topology level in an APIC ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicShape {
    pub thread_bits: u32,
    pub core_bits: u32,
    pub die_bits: u32,
}

impl ApicShape {
    pub fn of(t: &Topology) -> Self {
        ApicShape {
            thread_bits: bits(t.threads),
            core_bits: bits(t.cores),
            die_bits: bits(t.dies),
        }
    }
    pub fn core_shift(&self) -> u32 {
        self.thread_bits
    }
    pub fn die_shift(&self) -> u32 {
        self.thread_bits + self.core_bits
    }
    pub fn pkg_shift(&self) -> u32 {
        self.thread_bits + self.core_bits + self.die_bits
    }
}

/// The APIC ID of vCPU `index` (QEMU's x86 topology encoding).
pub fn apic_id(t: &Topology, index: u32) -> u32 {
    let s = ApicShape::of(t);
    let p = Position::of(t, index);
    p.thread | (p.core << s.core_shift()) | (p.die << s.die_shift()) | (p.socket << s.pkg_shift())
}

/// Where vCPU `index` sits in the topology (threads vary fastest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub socket: u32,
    pub die: u32,
    pub core: u32,
    pub thread: u32,
}

impl Position {
    pub fn of(t: &Topology, index: u32) -> Self {
        Position {
            thread: index % t.threads,
            core: (index / t.threads) % t.cores,
            die: (index / (t.threads * t.cores)) % t.dies,
            socket: index / (t.threads * t.cores * t.dies),
        }
    }
}

const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
const LEVEL_DIE: u32 = 5;

fn topo_entry(
    function: u32,
    index: u32,
    eax: u32,
    ebx: u32,
    level: u32,
    apic: u32,
) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | (index & 0xff),
        edx: apic,
        ..Default::default()
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| e.ebx == 0x6874_7541 && e.ecx == 0x444d_4163 && e.edx == 0x6974_6e65)
}

/// CPUID.1:ECX's TSC-deadline timer bit.
const TSC_DEADLINE_TIMER: u32 = 1 << 24;

/// Add what KVM emulates but leaves out of KVM_GET_SUPPORTED_CPUID (it
/// depends on the VM), as QEMU and Firecracker add it: the TSC-deadline
/// timer of the in-kernel LAPIC (KVM_CAP_TSC_DEADLINE_TIMER). Without it
/// Linux drives its LAPIC timer in one-shot mode, which in the Tier 2 host
/// made every step of a boot about twice as slow as under QEMU.
pub fn add_vm_features(supported: &mut CpuId, tsc_deadline: bool) {
    for e in supported.as_mut_slice() {
        if e.function == 1 && tsc_deadline {
            e.ecx |= TSC_DEADLINE_TIMER;
        }
    }
}

/// CPUID for vCPU `index` derived from KVM's supported entries.
pub fn for_vcpu(
    supported: &CpuId,
    t: &Topology,
    index: u32,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let s = ApicShape::of(t);
    let apic = apic_id(t, index);
    let logical_per_pkg = (t.threads * t.cores * t.dies).max(1);
    let src = supported.as_slice();
    let amd = is_amd(src);
    let max_basic = src.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(src.len() + 8);
    for e in src {
        let mut e = *e;
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0xffff)
                    | ((apic & 0xff) << 24)
                    | ((1u32 << s.pkg_shift()).min(255) << 16);
                e.ecx |= 1 << 31; // hypervisor present
                if logical_per_pkg > 1 {
                    e.edx |= 1 << 28; // HTT: the package has several logical CPUs
                }
            }
            0x4 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 {
                    s.pkg_shift()
                } else {
                    s.thread_bits
                };
                e.eax = (e.eax & 0x3fff)
                    | (((1u32 << sharing) - 1) << 14)
                    | (((1u32 << (s.core_bits + s.die_bits)) - 1) << 26);
            }
            0xb | 0x1f => continue, // rebuilt below
            0x8000_0008 if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (logical_per_pkg - 1) | (s.pkg_shift() << 12);
            }
            0x8000_001e if amd => {
                e.eax = apic;
                e.ebx = (e.ebx & !0xffff)
                    | (((1 << s.thread_bits) - 1) << 8)
                    | ((apic >> s.core_shift()) & 0xff);
                e.ecx = (e.ecx & !0xff) | ((apic >> s.die_shift()) & 0xff);
            }
            _ => {}
        }
        out.push(e);
    }
    if max_basic >= 0xb {
        out.push(topo_entry(
            0xb,
            0,
            s.core_shift(),
            t.threads,
            LEVEL_SMT,
            apic,
        ));
        out.push(topo_entry(
            0xb,
            1,
            s.pkg_shift(),
            t.threads * t.cores * t.dies,
            LEVEL_CORE,
            apic,
        ));
        out.push(topo_entry(0xb, 2, 0, 0, 0, apic));
    }
    if max_basic >= 0x1f {
        out.push(topo_entry(
            0x1f,
            0,
            s.core_shift(),
            t.threads,
            LEVEL_SMT,
            apic,
        ));
        out.push(topo_entry(
            0x1f,
            1,
            s.die_shift(),
            t.threads * t.cores,
            LEVEL_CORE,
            apic,
        ));
        out.push(topo_entry(
            0x1f,
            2,
            s.pkg_shift(),
            t.threads * t.cores * t.dies,
            LEVEL_DIE,
            apic,
        ));
        out.push(topo_entry(0x1f, 3, 0, 0, 0, apic));
    }
    CpuId::from_entries(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(sockets: u32, dies: u32, cores: u32, threads: u32) -> Topology {
        Topology {
            cpus: sockets * dies * cores * threads,
            sockets,
            dies,
            cores,
            threads,
        }
    }

    #[test]
    fn apic_ids_follow_qemu_encoding() {
        let t = topo(2, 1, 3, 2);
        let ids: Vec<u32> = (0..12).map(|i| apic_id(&t, i)).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        let t = topo(1, 1, 64, 1);
        assert_eq!(apic_id(&t, 63), 63);
    }

    #[test]
    fn topology_leaves() {
        let t = topo(2, 1, 2, 2);
        let sup = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        let mut sup = sup;
        add_vm_features(&mut sup, true);
        let c = for_vcpu(&sup, &t, 5).unwrap();
        let e = c.as_slice();
        let leaf1 = e.iter().find(|x| x.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 5);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_ne!(leaf1.ecx & TSC_DEADLINE_TIMER, 0);
        let b1 = e
            .iter()
            .find(|x| x.function == 0xb && x.index == 1)
            .unwrap();
        assert_eq!((b1.eax, b1.ebx, b1.edx), (2, 4, 5));
        assert!(!e.iter().any(|x| x.function == 0x1f));
    }
}
