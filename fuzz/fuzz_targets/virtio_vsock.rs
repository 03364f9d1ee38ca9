//! virtio-vsock's packet path on arbitrary guest memory and queue state:
//! the guest controls every descriptor, ring index and header field of
//! the transmit queue and the buffers of the receive queue. Port 1 of the
//! device's path has a listener (which never accepts), so connection
//! requests reach real sockets.
#![no_main]
mod queue;
use libfuzzer_sys::fuzz_target;
use moat_devices::virtio::vsock::{fuzz_serve, VsockPort};
use std::sync::OnceLock;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 64 * 1024;
/// Input bytes before guest memory: both queues' set-up, the features.
const HEAD: usize = 12;

fn port() -> &'static VsockPort {
    static PORT: OnceLock<(VsockPort, std::os::unix::net::UnixListener)> = OnceLock::new();
    &PORT
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("moat-fuzz-vsock-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let base = dir.join("v");
            let l = std::os::unix::net::UnixListener::bind(dir.join("v_1")).unwrap();
            let cfg = moat_config::VsockConfig {
                qdev: moat_config::DeviceName::Anonymous(0),
                guest_cid: 3,
                uds_path: base,
            };
            (VsockPort::open(&cfg).unwrap(), l)
        })
        .0
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEAD {
        return;
    }
    let (head, guest) = data.split_at(HEAD);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&guest[..guest.len().min(MEM)], GuestAddress(0));
    let rx = queue::queue(&mem, head[0..5].try_into().unwrap());
    let tx = queue::queue(&mem, head[5..10].try_into().unwrap());
    let (Some(rx), Some(tx)) = (rx, tx) else {
        return;
    };
    let _ = fuzz_serve(port(), &mem, rx, tx, head[10] & 1 == 1, 1 + usize::from(head[11] % 4));
});
