//! virtio-vsock (virtio 1.2, 5.10) in the VMM: the guest's sockets end in
//! UNIX sockets on the host ([`muxer`]), as in Firecracker and Cloud
//! Hypervisor, so no guest byte reaches the host kernel's vsock code
//! (`/dev/vhost-vsock`). Beyond them, SEQPACKET (feature bit 1, Linux
//! 5.14+) with message boundaries kept end to end.
//!
//! Three queues: receive (device to guest), transmit, and events (moat
//! sends none; the guest's buffers stay there). One thread, in the
//! `VsockIo` role, serves the queues and the host sockets; every
//! connection is dropped (its host socket closed) when the guest resets
//! the device. The listening sockets belong to the [`VsockPort`], made
//! before the sandbox, and outlive resets and reboots.

pub mod muxer;
pub mod packet;

use super::{drain_queue, efd, poll, ActivationThread, Broken, Interrupt, Took, VirtioDevice};
use muxer::{Kind, Muxer, Target};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 256;
/// virtio-vsock's SEQPACKET feature.
pub const VIRTIO_VSOCK_F_SEQPACKET: u64 = 1 << 1;
/// Packets one pass takes from a queue before the other gets a turn.
const BATCH: usize = 64;

/// What outlives a boot: the guest's CID and the listening sockets.
#[derive(Debug, Clone)]
pub struct VsockPort {
    cfg: moat_config::VsockConfig,
    stream: Arc<UnixListener>,
    seqpacket: Arc<OwnedFd>,
}

impl VsockPort {
    /// Listen on `cfg.uds_path` (stream) and its `.seqpacket` twin.
    pub fn open(cfg: &moat_config::VsockConfig) -> Result<VsockPort, String> {
        let stream = moat_sys::bind_unix_private(&cfg.uds_path)
            .map_err(|e| format!("{}: {e}", cfg.uds_path.display()))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("{}: {e}", cfg.uds_path.display()))?;
        let sp = cfg.seqpacket_path();
        let seqpacket = moat_sys::bind_unix_seqpacket_private(&sp)
            .map_err(|e| format!("{}: {e}", sp.display()))?;
        Ok(VsockPort {
            cfg: cfg.clone(),
            stream: Arc::new(stream),
            seqpacket: Arc::new(seqpacket),
        })
    }
}

/// One activation's queues and what the worker waits on.
struct Activation {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// Receive, transmit, event.
    notify: [EventFd; 3],
    interrupt: Arc<Interrupt>,
    kill: EventFd,
    stopping: Arc<AtomicBool>,
    needs_reset: Arc<dyn Fn() + Send + Sync>,
    seqpacket: bool,
}

/// The device of one boot, over a [`VsockPort`].
pub struct Vsock {
    cid: u64,
    thread: ActivationThread<Activation>,
}

impl Vsock {
    pub fn new(port: &VsockPort) -> std::io::Result<Vsock> {
        let mut w = Worker {
            port: port.clone(),
            bounce: vec![0; packet::MAX_PKT_DATA],
        };
        let thread = ActivationThread::spawn(
            "virtio-vsock".into(),
            moat_sys::role::Role::VsockIo,
            move |mut a: Activation| {
                if let Err(e) = w.serve(&mut a) {
                    e.needs_reset("virtio-vsock", &*a.needs_reset, &a.kill);
                }
            },
        )?;
        Ok(Vsock {
            cid: port.cfg.guest_cid,
            thread,
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
            | super::VIRTIO_RING_F_INDIRECT_DESC
            | super::VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_VSOCK_F_SEQPACKET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }`.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        notify: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
        features: u64,
        needs_reset: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<()> {
        let (Ok([rx, tx, _event]), Ok(notify)) = (
            <[Queue; 3]>::try_from(queues),
            <[EventFd; 3]>::try_from(notify),
        ) else {
            return Err(std::io::Error::other("virtio-vsock has three queues"));
        };
        if !rx.ready() || !tx.ready() {
            return Ok(());
        }
        self.thread.activate(|stop| {
            Ok(Activation {
                mem,
                rx,
                tx,
                notify,
                interrupt,
                kill: stop.event.try_clone()?,
                stopping: stop.flag.clone(),
                needs_reset,
                seqpacket: features & VIRTIO_VSOCK_F_SEQPACKET != 0,
            })
        })
    }

    /// Tell the worker to stop, without waiting; it drops every connection.
    fn reset(&mut self) {
        self.thread.stop();
    }
}

struct Worker {
    port: VsockPort,
    /// One packet's data on its way through.
    bounce: Vec<u8>,
}

/// What a poll entry is, beyond the host sockets.
#[derive(Clone, Copy)]
enum Wake {
    Kill,
    Queue(usize),
    Host(Target),
}

impl Worker {
    fn serve(&mut self, a: &mut Activation) -> Result<(), Broken> {
        let mut mux = Muxer::new(&self.port.cfg, a.seqpacket);
        loop {
            if a.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            let tx_more = self.tx_pass(a, &mut mux)?;
            let (rx_more, rx_starved) = self.rx_pass(a, &mut mux)?;
            if rx_more || (tx_more && mux.control_room()) {
                continue;
            }
            let mut host = Vec::new();
            mux.poll_set(rx_starved, &mut host);
            let mut fds = vec![(efd(&a.kill), libc::POLLIN)];
            let mut wakes = vec![Wake::Kill];
            for (i, n) in a.notify.iter().enumerate() {
                fds.push((efd(n), libc::POLLIN));
                wakes.push(Wake::Queue(i));
            }
            if !mux.pending_full() {
                fds.push((self.port.stream.as_fd(), libc::POLLIN));
                wakes.push(Wake::Host(Target::Listener(Kind::Stream)));
                fds.push((self.port.seqpacket.as_fd(), libc::POLLIN));
                wakes.push(Wake::Host(Target::Listener(Kind::Seqpacket)));
            }
            for (fd, ev, t) in host {
                fds.push((fd, ev));
                wakes.push(Wake::Host(t));
            }
            let timeout = mux
                .deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            let ready = poll(&fds, timeout);
            drop(fds);
            let now = Instant::now();
            // Pending connections by index: highest first, as handling one
            // removes it.
            let mut pending = Vec::new();
            for (w, _) in wakes.iter().zip(ready).filter(|(_, r)| *r) {
                match *w {
                    Wake::Kill => return Ok(()),
                    Wake::Queue(i) => {
                        let _ = a.notify[i].read();
                    }
                    Wake::Host(Target::Listener(kind)) => self.accept(kind, &mut mux, now),
                    Wake::Host(Target::Pending(i)) => pending.push(i),
                    Wake::Host(Target::Conn(key)) => mux.conn_ready(key),
                }
            }
            pending.sort_unstable_by(|a, b| b.cmp(a));
            for i in pending {
                mux.pending_ready(i, now);
            }
            mux.expire(now);
        }
    }

    /// Take the host connections waiting on a listener.
    fn accept(&self, kind: Kind, mux: &mut Muxer, now: Instant) {
        let listener = match kind {
            Kind::Stream => self.port.stream.as_fd(),
            Kind::Seqpacket => self.port.seqpacket.as_fd(),
        };
        while !mux.pending_full() {
            let flags = rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK;
            match rustix::net::accept_with(listener, flags) {
                Ok(s) => mux.accepted(s, kind, now),
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
        }
    }

    /// Packets from the guest, a batch at most, while replies have room.
    /// Whether more are waiting.
    fn tx_pass(&mut self, a: &mut Activation, mux: &mut Muxer) -> Result<bool, Broken> {
        let mut done = 0;
        let stopping = &a.stopping;
        let mem = &a.mem;
        let data = &mut self.bounce;
        let more = drain_queue(mem, &mut a.tx, &a.interrupt, |chain| {
            if done == BATCH || !mux.control_room() || stopping.load(Ordering::Relaxed) {
                return Took::PutBack { more: true };
            }
            done += 1;
            match packet::read_tx(mem, chain, data) {
                Ok(h) => mux.from_guest(&h, &data[..h.len() as usize]),
                Err(packet::Malformed::TooLong(h) | packet::Malformed::Truncated(h)) => {
                    log::debug!("virtio-vsock: a malformed packet ({h:?})");
                    mux.malformed(&h);
                }
                Err(e) => log::debug!("virtio-vsock: a malformed transmit chain ({e:?})"),
            }
            Took::Used(0)
        })?;
        Ok(more)
    }

    /// Fill the guest's receive buffers while there is something to send.
    /// (Whether to go again at once, whether the ring ran dry with
    /// packets still to send.)
    fn rx_pass(&mut self, a: &mut Activation, mux: &mut Muxer) -> Result<(bool, bool), Broken> {
        if !mux.has_rx() {
            return Ok((false, false));
        }
        let mut done = 0;
        let mut put_back = false;
        let mem = &a.mem;
        let bounce = &mut self.bounce;
        let more = drain_queue(mem, &mut a.rx, &a.interrupt, |chain| {
            if done == BATCH {
                put_back = true;
                return Took::PutBack { more: true };
            }
            let Ok(mut w) = Writer::<()>::new(mem, chain) else {
                return Took::Used(0);
            };
            match mux.to_guest(&mut w, bounce) {
                Some(n) => {
                    done += 1;
                    Took::Used(n)
                }
                None => {
                    put_back = true;
                    Took::PutBack { more: false }
                }
            }
        })?;
        Ok((more, !put_back && mux.has_rx()))
    }
}

/// Serve `rounds` passes over both queues, which the caller set up (the
/// `virtio_vsock` fuzz target's way in), with `port`'s paths.
#[doc(hidden)]
pub fn fuzz_serve(
    port: &VsockPort,
    mem: &GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    seqpacket: bool,
    rounds: usize,
) -> bool {
    let events = || EventFd::new(libc::EFD_NONBLOCK);
    let (Ok(irq), Ok(n0), Ok(n1), Ok(n2), Ok(kill)) = (
        crate::IrqLine::new(),
        events(),
        events(),
        events(),
        events(),
    ) else {
        return false;
    };
    let mut a = Activation {
        mem: mem.clone(),
        rx,
        tx,
        notify: [n0, n1, n2],
        interrupt: Arc::new(Interrupt::new(irq)),
        kill,
        stopping: Arc::default(),
        needs_reset: Arc::new(|| {}),
        seqpacket,
    };
    let mut w = Worker {
        port: port.clone(),
        bounce: vec![0; packet::MAX_PKT_DATA],
    };
    let mut mux = Muxer::new(&port.cfg, seqpacket);
    for _ in 0..rounds {
        if w.tx_pass(&mut a, &mut mux).is_err() || w.rx_pass(&mut a, &mut mux).is_err() {
            return false;
        }
        mux.expire(Instant::now());
    }
    true
}
