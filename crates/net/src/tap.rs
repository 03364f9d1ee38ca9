//! Tap devices: `/dev/net/tun` with `IFF_TAP | IFF_NO_PI` (and
//! `IFF_VNET_HDR`, `IFF_MULTI_QUEUE`), opened by interface name or handed
//! in as descriptors (libvirt's and Kata's way, so moat needs no
//! CAP_NET_ADMIN); the virtio-net header size is set to 12 bytes and the
//! offloads to what the guest accepted (`TUNSETOFFLOAD`).

use crate::VNET_HDR_LEN;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// `struct ifreq` as TUNSETIFF/TUNGETIFF/TUNSETQUEUE use it: the name and
/// the flags (the rest of the union is unused here).
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ioctl_ifreq(fd: &File, req: libc::Ioctl, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: the request takes a `struct ifreq`, which IfReq lays out (40
    // bytes: name, flags, padding) and which lives for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, ifr as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_int(fd: &File, req: libc::Ioctl, v: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, v as libc::c_ulong) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_int_ref(fd: &File, req: libc::Ioctl, v: &libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, live for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, v as *const libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the guest accepts to receive (its GUEST_* features).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
    pub ufo: bool,
}

/// One queue of a tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    vnet_hdr: bool,
    name: String,
}

impl Tap {
    /// Open `queues` queues of the tap `name` (made if missing, which
    /// needs CAP_NET_ADMIN), with a virtio-net header unless `vnet_hdr` is
    /// false.
    pub fn open(name: &str, queues: usize, vnet_hdr: bool) -> io::Result<Vec<Tap>> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name longer than {} bytes", libc::IFNAMSIZ - 1),
            ));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        (0..queues)
            .map(|_| {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")?;
                let mut ifr = IfReq::default();
                ifr.name[..name.len()].copy_from_slice(name.as_bytes());
                ifr.flags = flags as libc::c_short;
                ioctl_ifreq(&file, libc::TUNSETIFF, &mut ifr)?;
                Tap::configure(file)
            })
            .collect()
    }

    /// A tap descriptor handed in (`fd=N`, `fds=N:M`): checked to be a tap.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tap> {
        Tap::configure(File::from(fd))
    }

    fn configure(file: File) -> io::Result<Tap> {
        let mut ifr = IfReq::default();
        ioctl_ifreq(&file, libc::TUNGETIFF, &mut ifr)
            .map_err(|e| io::Error::new(e.kind(), format!("not a tap device (TUNGETIFF: {e})")))?;
        let flags = libc::c_int::from(ifr.flags);
        if flags & libc::IFF_TAP == 0 || flags & libc::IFF_NO_PI == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a tap device without packet information (IFF_TAP | IFF_NO_PI)",
            ));
        }
        let vnet_hdr = flags & libc::IFF_VNET_HDR != 0;
        if vnet_hdr {
            ioctl_int_ref(&file, libc::TUNSETVNETHDRSZ, &(VNET_HDR_LEN as libc::c_int))?;
        }
        rustix::io::ioctl_fionbio(&file, true)?;
        let end = ifr
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ifr.name.len());
        let name = String::from_utf8_lossy(&ifr.name[..end]).into_owned();
        Ok(Tap {
            file,
            vnet_hdr,
            name,
        })
    }

    /// The queue's descriptor, to hand to another process (moat-jail).
    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Send a frame; a full tap queue drops it (as a host NIC would).
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            // A malformed frame the guest sent (bad GSO header): the tap
            // refuses it; the frame is dropped, the interface goes on.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn set_offloads(&self, o: Offloads) -> io::Result<()> {
        if !self.vnet_hdr {
            return Ok(());
        }
        let mut f = 0;
        for (on, bit) in [
            (o.csum, libc::TUN_F_CSUM),
            (o.csum && o.tso4, libc::TUN_F_TSO4),
            (o.csum && o.tso6, libc::TUN_F_TSO6),
            (o.csum && o.ecn, libc::TUN_F_TSO_ECN),
            (o.csum && o.ufo, libc::TUN_F_UFO),
        ] {
            if on {
                f |= bit;
            }
        }
        ioctl_int(&self.file, libc::TUNSETOFFLOAD, f as libc::c_int)
    }

    pub fn set_enabled(&self, on: bool) -> io::Result<()> {
        let mut ifr = IfReq {
            flags: if on {
                libc::IFF_ATTACH_QUEUE
            } else {
                libc::IFF_DETACH_QUEUE
            } as libc::c_short,
            ..Default::default()
        };
        match ioctl_ifreq(&self.file, libc::TUNSETQUEUE, &mut ifr) {
            // A single-queue tap has no queues to attach or detach.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r,
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
