//! virtio-net queue handling on arbitrary guest memory and queue state, with
//! a stream peer that sends arbitrary bytes: the guest controls every
//! descriptor, ring index, header and control command, the peer every
//! length prefix and frame. Transmit, receive (merged buffers or not) and
//! the control queue each run a few passes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::net::{fuzz_worker, NetLink, NetPort};
use moat_net::{Backend, Stream};
use std::io::Write;
use std::os::unix::net::UnixStream;
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;
/// Input bytes before guest memory: queue set-up, features, peer length.
const HEAD: usize = 16;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEAD {
        return;
    }
    let (head, rest) = data.split_at(HEAD);
    let peer_len = (usize::from(u16::from_le_bytes([head[12], head[13]])) % 8192).min(rest.len());
    let (peer_bytes, guest) = rest.split_at(peer_len);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&guest[..guest.len().min(MEM)], GuestAddress(0));

    let event_idx = head[10] & 1 == 1;
    // Ring addresses chosen by the input (aligned, somewhere in or past memory).
    let addr = |b: u8, align: u64| u64::from(b) * 256 / align * align;
    let queue = |i: usize| {
        let mut q = Queue::new(256).unwrap();
        q.set_size(1 << (head[9 + i % 2] >> (4 * (i / 2)) & 7).max(1));
        q.set_desc_table_address(Some(addr(head[3 * i], 16) as u32), None);
        q.set_avail_ring_address(Some(addr(head[3 * i + 1], 2) as u32), None);
        q.set_used_ring_address(Some(addr(head[3 * i + 2], 4) as u32), None);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q.is_valid(&mem).then_some(q)
    };
    let queues = [queue(0), queue(1), queue(2)];

    let bit = |b: u32| 1u64 << b;
    let f = head[11];
    let mut features = bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
    for (i, b) in [
        vn::VIRTIO_NET_F_MRG_RXBUF,
        vn::VIRTIO_NET_F_CTRL_VQ,
        vn::VIRTIO_NET_F_CTRL_RX,
        vn::VIRTIO_NET_F_MQ,
        vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
        vn::VIRTIO_NET_F_GUEST_CSUM,
        vn::VIRTIO_NET_F_CTRL_MAC_ADDR,
    ]
    .into_iter()
    .enumerate()
    {
        if f & (1 << i) != 0 {
            features |= bit(b);
        }
    }
    if event_idx {
        features |= bit(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    }

    // The peer's bytes wait in the socket; the peer hangs up after them
    // when the input says so.
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let _ = peer.write_all(peer_bytes);
    if head[14] & 1 == 1 {
        drop(peer);
        peer = UnixStream::pair().unwrap().0;
    }
    let link = NetLink::new(
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        Default::default(),
        Default::default(),
    );
    let port = NetPort::new(
        vec![Backend::Stream(Stream::new(ours).unwrap())],
        None,
        link,
    )
    .unwrap();
    let _ = fuzz_worker(&port, mem, queues, features, 1 + usize::from(head[15] % 4));
    drop(peer);
});
