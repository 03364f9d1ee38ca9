use moat_boot::layout::MemLayout;
use moat_boot::MachineDesc;
use std::sync::OnceLock;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// 64 MiB of guest RAM, shared by every iteration.
pub const MEM: u64 = 64 << 20;

pub fn memory() -> &'static GuestMemoryMmap {
    static M: OnceLock<GuestMemoryMmap> = OnceLock::new();
    M.get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap())
}

/// Parse, then (when valid) write everything into guest memory.
pub fn load(kernel: &[u8]) {
    let layout = MemLayout::new(MEM);
    let machine = MachineDesc { apic_ids: vec![0, 1], acpi: kernel.len() % 2 == 0, virtio: vec![(0xd000_0000, 5)] };
    let initrd = [0x5au8; 4096];
    let _ = moat_boot::load(memory(), &layout, kernel, Some(&initrd[..]), "console=ttyS0", &machine);
}
