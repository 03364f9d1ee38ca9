//! virtio-blk request handling on arbitrary guest memory and queue state:
//! the guest controls every descriptor, ring index and request header.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_block::MemImage;
use moat_devices::virtio::block::{Discard, DriveLink, Worker};
use moat_devices::virtio::Interrupt;
use moat_devices::IrqLine;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&data[8..data.len().min(MEM + 8)], GuestAddress(0));
    let mut q = Queue::new(256).unwrap();
    q.set_size(1 << (data[0] % 9));
    // Ring addresses chosen by the input (aligned, somewhere in or past memory).
    let addr = |b: u8, align: u64| u64::from(b) * 256 / align * align;
    q.set_desc_table_address(Some(addr(data[1], 16) as u32), None);
    q.set_avail_ring_address(Some(addr(data[2], 2) as u32), None);
    q.set_used_ring_address(Some(addr(data[3], 4) as u32), None);
    q.set_event_idx(data[4] & 1 == 1);
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let disk = Arc::new(MemImage::new(vec![0xa5; 8192], data[5] & 1 == 1));
    let mut w = Worker {
        mem,
        queue: q,
        index: 0,
        disk,
        serial: *b"fuzz-serial-01234567",
        discard: if data[6] & 1 == 1 { Discard::Unmap } else { Discard::Ignore },
        interrupt: Arc::new(Interrupt::new(IrqLine::new().unwrap())),
        bounce: vec![0; 4096],
        // (report: an error that stopped the VM would wait for a `cont`.)
        link: DriveLink::new(
            Default::default(),
            moat_config::OnError::Report,
            moat_config::OnError::Report,
            1,
        )
        .unwrap(),
        kill: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        stopping: Arc::default(),
    };
    let _ = w.process_queue();
});
