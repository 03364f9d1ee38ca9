//! The guest-physical memory map of a moat microvm.
//!
//! ```text
//! 0x0000_0500  GDT (boot)              0x0000_6000  PVH hvm_start_info + modlist + memmap
//! 0x0000_7000  zero page (boot_params) 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 PDs (identity map of 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (64 KiB at most)
//! 0x0009_fc00  EBDA (reserved)         0x000e_0000  ACPI tables (RSDP first), reserved
//! 0x000f_0000  MP table (acpi=off)     0x0010_0000  kernel, initrd: RAM up to 3 GiB
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio 0xd000_0000 (4 KiB each), GED 0xfea0_0000, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
pub const PVH_MEMMAP_MAX: usize = 32;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line (without the NUL) moat places for any kernel.
pub const CMDLINE_MAX: usize = 0xffff;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0xf0000;
pub const MPTABLE_START: u64 = 0xf0000;
pub const BIOS_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// virtio-mmio devices: one 4 KiB window each from here.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Their interrupts (edge-triggered IOAPIC pins; 8 is the RTC's, 9 the GED's).
pub const VIRTIO_IRQS: [u32; moat_config::MAX_VIRTIO_DEVICES] =
    [5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22];

/// The window and interrupt of virtio-mmio device `i`.
pub fn virtio_slot(i: usize) -> Option<(u64, u32)> {
    VIRTIO_IRQS
        .get(i)
        .map(|&irq| (VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE, irq))
}

/// The ACPI Generic Event Device's event register (power button).
pub const GED_ADDR: u64 = 0xfea0_0000;
pub const GED_SIZE: u64 = 0x1000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS and identity-map pages live just below the IOAPIC, in the hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One range of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Where guest RAM lives for a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemLayout {
    pub mem_size: u64,
}

impl MemLayout {
    pub fn new(mem_size: u64) -> Self {
        MemLayout { mem_size }
    }

    /// End of RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.mem_size.min(MMIO_HOLE_START)
    }

    /// Size of RAM above 4 GiB.
    pub fn high_size(&self) -> u64 {
        self.mem_size.saturating_sub(MMIO_HOLE_START)
    }

    /// The (guest address, size) of each RAM region.
    pub fn ram_regions(&self) -> Vec<(u64, u64)> {
        let mut v = vec![(0, self.low_end())];
        if self.high_size() > 0 {
            v.push((MMIO_HOLE_END, self.high_size()));
        }
        v
    }

    /// Is `[addr, addr+len)` entirely inside one RAM region?
    pub fn in_ram(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.ram_regions()
            .iter()
            .any(|&(a, s)| addr >= a && end <= a + s)
    }

    /// The e820 map handed to the guest.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut v = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            },
            E820Entry {
                addr: EBDA_START,
                size: 0xa0000 - EBDA_START,
                kind: E820_RESERVED,
            },
            E820Entry {
                addr: ACPI_START,
                size: BIOS_END - ACPI_START,
                kind: E820_RESERVED,
            },
        ];
        if self.low_end() > HIMEM_START {
            v.push(E820Entry {
                addr: HIMEM_START,
                size: self.low_end() - HIMEM_START,
                kind: E820_RAM,
            });
        }
        if self.high_size() > 0 {
            v.push(E820Entry {
                addr: MMIO_HOLE_END,
                size: self.high_size(),
                kind: E820_RAM,
            });
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_minus_bios_area() {
        for size in [16u64 << 20, 3 << 30, 5 << 30] {
            let l = MemLayout::new(size);
            let ram: u64 = l
                .e820()
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        }
        let l = MemLayout::new(5 << 30);
        assert!(l.in_ram(MMIO_HOLE_END, 2 << 30));
        assert!(!l.in_ram(MMIO_HOLE_START - 4096, 8192));
        assert!(!l.in_ram(u64::MAX, 2));
    }
}

/// Legacy I/O ports and IRQs of the platform (shared by ACPI, MP table and devices).
pub mod ports {
    pub const COM1: u16 = 0x3f8;
    pub const COM1_IRQ: u32 = 4;
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_CMD: u16 = 0x64;
    pub const I8042_IRQ: u32 = 1;
    pub const RTC_INDEX: u16 = 0x70;
    pub const RTC_DATA: u16 = 0x71;
    /// ACPI sleep control (write SLP_TYP|SLP_EN), sleep status and reset register.
    pub const ACPI_PM: u16 = 0x600;
    /// Value written to `ACPI_PM` to reset the machine (FADT RESET_VALUE).
    pub const ACPI_RESET_VALUE: u8 = 1;
    /// SLP_TYP of S5 as the DSDT's `_S5_` object declares it.
    pub const S5_SLP_TYP: u8 = 5;
    pub const SLP_EN: u8 = 1 << 5;
    /// Interrupt of the ACPI Generic Event Device.
    pub const GED_IRQ: u32 = 9;
}
