//! Network backends behind virtio-net, which move whole Ethernet frames and
//! know nothing of virtio: tap devices (QEMU's `-netdev tap`, opened by name
//! or handed in as descriptors, with a virtio-net header in front of each
//! frame when the tap has `IFF_VNET_HDR`) and stream sockets (QEMU's
//! `-netdev stream`: each frame behind a 4-byte big-endian length, as
//! passt speaks it). Plus the token buckets that limit an interface
//! ([`rate`]).
//!
//! Everything is non-blocking and bounded: a backend never allocates by a
//! length a peer sends, and a peer that stalls never blocks a thread.

pub mod rate;
mod stream;
mod tap;

pub use stream::Stream;
pub use tap::{Offloads, Tap};

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

/// The largest frame moat moves (64 KiB of payload, an Ethernet header and
/// a VLAN tag: what Linux's virtio-net sends with TSO), without the
/// virtio-net header.
pub const FRAME_MAX: usize = 65550;

/// The virtio-net header (`virtio_net_hdr_v1`, with `num_buffers`): what a
/// tap with `IFF_VNET_HDR` puts in front of each frame once moat sets its
/// header size to this.
pub const VNET_HDR_LEN: usize = 12;

/// One queue pair's way to the outside.
#[derive(Debug)]
pub enum Backend {
    Tap(Tap),
    Stream(Stream),
}

impl Backend {
    /// Frames carry a virtio-net header in front (a tap with IFF_VNET_HDR).
    pub fn vnet_hdr(&self) -> bool {
        match self {
            Backend::Tap(t) => t.vnet_hdr(),
            Backend::Stream(_) => false,
        }
    }

    /// Read one frame (after its header, when it has one) into `buf`:
    /// `Ok(None)` when none is complete yet (a stream keeps what has come
    /// of a frame until the rest does). `buf` holds [`FRAME_MAX`] bytes.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            Backend::Tap(t) => t.recv(buf),
            Backend::Stream(s) => s.recv(buf),
        }
    }

    /// Send one frame (after its header, when it has one). `Ok(false)`:
    /// not now (the backend has output waiting; try again once writable).
    pub fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        match self {
            Backend::Tap(t) => t.send(frame).map(|()| true),
            Backend::Stream(s) => s.send(frame),
        }
    }

    /// Output is waiting for the backend to be writable.
    pub fn wants_write(&self) -> bool {
        match self {
            Backend::Tap(_) => false,
            Backend::Stream(s) => s.wants_write(),
        }
    }

    /// Write what is waiting (the backend became writable).
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Backend::Tap(_) => Ok(()),
            Backend::Stream(s) => s.flush(),
        }
    }

    /// What the guest accepted to receive: the tap may then hand over
    /// packets that need a checksum or segmentation.
    pub fn set_offloads(&self, o: Offloads) -> io::Result<()> {
        match self {
            Backend::Tap(t) => t.set_offloads(o),
            Backend::Stream(_) => Ok(()),
        }
    }

    /// Attach or detach this queue (a multi-queue tap), as the guest
    /// enables queue pairs.
    pub fn set_enabled(&self, on: bool) -> io::Result<()> {
        match self {
            Backend::Tap(t) => t.set_enabled(on),
            Backend::Stream(_) => Ok(()),
        }
    }
}

impl AsFd for Backend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Backend::Tap(t) => t.as_fd(),
            Backend::Stream(s) => s.as_fd(),
        }
    }
}
