//! Intel MultiProcessor Specification 1.4 tables, for `-M microvm,acpi=off`.
//!
//! No maintained crate builds MP tables outside Firecracker's VMM, so this is
//! ours: floating pointer + configuration table with one processor entry per
//! vCPU, the ISA bus, the IOAPIC, ISA interrupt assignments and LINT0/LINT1.

use crate::acpi::ioapic_id;
use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// Build the floating pointer and configuration table, placed at `MPTABLE_START`.
pub fn build(apic_ids: &[u32]) -> Vec<u8> {
    let table_addr = MPTABLE_START + 16;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for (i, &id) in apic_ids.iter().enumerate() {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id as u8;
        e[2] = 0x14; // local APIC version
        e[3] = 0x01 | if i == 0 { 0x02 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let ioapic = ioapic_id(apic_ids);
    let mut e = [0u8; 8];
    e[0] = 2;
    e[1] = ioapic;
    e[2] = 0x11;
    e[3] = 1;
    e[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    // ISA IRQs 0..15 to IOAPIC pins 0..15 (KVM's default routing).
    for irq in 0u8..16 {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // LINT0: ExtINT, LINT1: NMI, to all local APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut hdr = [0u8; 44];
    hdr[0..4].copy_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    hdr[4..6].copy_from_slice(&len.to_le_bytes());
    hdr[6] = 4; // spec revision 1.4
    hdr[8..16].copy_from_slice(b"MOAT    ");
    hdr[16..28].copy_from_slice(b"MICROVM     ");
    hdr[34..36].copy_from_slice(&count.to_le_bytes());
    hdr[36..40].copy_from_slice(&LAPIC_ADDR.to_le_bytes());
    let mut table = hdr.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec revision
    fp[10] = checksum(&fp);
    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn checksums_are_zero() {
        let t = super::build(&(0..64).collect::<Vec<_>>());
        let s = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(s(&t[..16]), 0);
        assert_eq!(s(&t[16..]), 0);
        assert!(t.len() < 0x10000);
    }
}
