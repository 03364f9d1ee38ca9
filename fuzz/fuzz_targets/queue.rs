//! A split virtqueue laid out in fuzzed guest memory: `h` gives the
//! descriptor table, avail and used rings (each in 256-byte steps, then
//! aligned), the size (2 to 128) and EVENT_IDX. None when the layout does
//! not fit the memory.
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub fn queue(mem: &GuestMemoryMmap, h: &[u8; 5]) -> Option<Queue> {
    let addr = |b: u8, align: u64| u64::from(b) * 256 / align * align;
    let mut q = Queue::new(256).unwrap();
    q.set_size(1 << (h[3] & 7).max(1));
    q.set_desc_table_address(Some(addr(h[0], 16) as u32), None);
    q.set_avail_ring_address(Some(addr(h[1], 2) as u32), None);
    q.set_used_ring_address(Some(addr(h[2], 4) as u32), None);
    q.set_event_idx(h[4] & 1 == 1);
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}
