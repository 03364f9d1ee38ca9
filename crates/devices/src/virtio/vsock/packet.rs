//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and the reading of
//! a transmit chain.
//!
//! rust-vmm's `virtio-vsock` crate parses packets too, but only in the two
//! layouts Linux uses today (header and data in one descriptor, or one
//! each), through single host slices; a driver may lay a packet out over
//! any descriptors (Linux's zero-copy sends do), so moat reads it with
//! virtio-queue's `Reader`, which walks any chain with bounds checks, and
//! keeps only the 44-byte header here.

use std::io::Read;
use virtio_queue::{DescriptorChain, Reader};
use vm_memory::GuestMemoryMmap;

pub const HEADER_SIZE: usize = 44;
/// The most data one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;
pub const TYPE_SEQPACKET: u16 = 2;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
/// RW flags on SEQPACKET: the last packet of a message / of a record.
pub const SEQ_EOM: u32 = 1;
pub const SEQ_EOR: u32 = 2;

/// `struct virtio_vsock_hdr`, little-endian, packed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header(pub [u8; HEADER_SIZE]);

impl Default for Header {
    fn default() -> Self {
        Header([0; HEADER_SIZE])
    }
}

macro_rules! field {
    ($get:ident, $set:ident, $t:ty, $off:expr) => {
        pub fn $get(&self) -> $t {
            const N: usize = std::mem::size_of::<$t>();
            let mut b = [0u8; N];
            b.copy_from_slice(&self.0[$off..$off + N]);
            <$t>::from_le_bytes(b)
        }
        pub fn $set(mut self, v: $t) -> Self {
            const N: usize = std::mem::size_of::<$t>();
            self.0[$off..$off + N].copy_from_slice(&v.to_le_bytes());
            self
        }
    };
}

#[allow(clippy::len_without_is_empty)] // `len` is the spec's field name
impl Header {
    field!(src_cid, with_src_cid, u64, 0);
    field!(dst_cid, with_dst_cid, u64, 8);
    field!(src_port, with_src_port, u32, 16);
    field!(dst_port, with_dst_port, u32, 20);
    field!(len, with_len, u32, 24);
    field!(type_, with_type, u16, 28);
    field!(op, with_op, u16, 30);
    field!(flags, with_flags, u32, 32);
    field!(buf_alloc, with_buf_alloc, u32, 36);
    field!(fwd_cnt, with_fwd_cnt, u32, 40);

    /// The reply to `self` from its destination: addresses swapped.
    pub fn reply(&self, op: u16) -> Header {
        Header::default()
            .with_src_cid(self.dst_cid())
            .with_dst_cid(self.src_cid())
            .with_src_port(self.dst_port())
            .with_dst_port(self.src_port())
            .with_type(self.type_())
            .with_op(op)
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} -> {}:{} op {} type {} len {} flags {:#x} buf_alloc {} fwd_cnt {}",
            self.src_cid(),
            self.src_port(),
            self.dst_cid(),
            self.dst_port(),
            self.op(),
            self.type_(),
            self.len(),
            self.flags(),
            self.buf_alloc(),
            self.fwd_cnt()
        )
    }
}

/// Why a transmit chain is not a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Malformed {
    /// The chain loops, leaves guest RAM or has writable descriptors only.
    Chain,
    /// Fewer readable bytes than a header.
    Short,
    /// `len` is more than [`MAX_PKT_DATA`]: the header is answered RST.
    TooLong(Header),
    /// `len` is more than the chain holds after the header: answered RST.
    Truncated(Header),
}

/// Read the packet of a transmit chain: its header, and its data into
/// `data` (at least [`MAX_PKT_DATA`] long); the data's length is the
/// header's `len`. Bytes past `len` are ignored, as Linux's vhost does.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    data: &mut [u8],
) -> Result<Header, Malformed> {
    let mut r = Reader::new(mem, chain).map_err(|_| Malformed::Chain)?;
    let mut h = Header::default();
    if r.available_bytes() < HEADER_SIZE || r.read_exact(&mut h.0).is_err() {
        return Err(Malformed::Short);
    }
    let len = h.len() as usize;
    if len > MAX_PKT_DATA || len > data.len() {
        return Err(Malformed::TooLong(h));
    }
    if len > r.available_bytes() || r.read_exact(&mut data[..len]).is_err() {
        return Err(Malformed::Truncated(h));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_little_endian_at_the_spec_offsets() {
        let h = Header::default()
            .with_src_cid(3)
            .with_dst_cid(2)
            .with_src_port(0x1234)
            .with_dst_port(1024)
            .with_len(7)
            .with_type(TYPE_SEQPACKET)
            .with_op(OP_RW)
            .with_flags(SEQ_EOM)
            .with_buf_alloc(1 << 18)
            .with_fwd_cnt(u32::MAX);
        assert_eq!(h.0[0], 3);
        assert_eq!(h.0[8], 2);
        assert_eq!(&h.0[16..18], &[0x34, 0x12]);
        assert_eq!(&h.0[20..22], &[0, 4]);
        assert_eq!(h.0[24], 7);
        assert_eq!(h.0[28], 2);
        assert_eq!(h.0[30], 5);
        assert_eq!(h.0[32], 1);
        assert_eq!(&h.0[36..40], &[0, 0, 4, 0]);
        assert_eq!(&h.0[40..44], &[0xff; 4]);
        let r = h.reply(OP_RST);
        assert_eq!((r.src_cid(), r.dst_cid()), (2, 3));
        assert_eq!((r.src_port(), r.dst_port()), (1024, 0x1234));
        assert_eq!((r.op(), r.type_(), r.len()), (OP_RST, TYPE_SEQPACKET, 0));
    }
}
