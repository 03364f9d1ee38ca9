//! virtio-rng's request path on arbitrary guest memory and queue state:
//! the guest controls every descriptor and ring index, and the quota
//! (from the input) runs out part-way or not at all.
#![no_main]
mod queue;
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::rng::fuzz_serve;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;
/// Input bytes before guest memory: queue set-up and the quota.
const HEAD: usize = 8;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEAD {
        return;
    }
    let (head, guest) = data.split_at(HEAD);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&guest[..guest.len().min(MEM)], GuestAddress(0));
    let Some(mut q) = queue::queue(&mem, head[0..5].try_into().unwrap()) else {
        return;
    };
    // No limit, or a few bytes to a few KiB per (long) window.
    let quota = match head[5] {
        0 => u64::MAX >> 1,
        n => u64::from(n) * 64,
    };
    let _ = fuzz_serve(&mem, &mut q, quota, 1 + usize::from(head[6] % 4));
});
