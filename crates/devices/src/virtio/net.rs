//! virtio-net (virtio 1.2, 5.1) over [`moat_net::Backend`]s (a tap or a
//! stream socket): one I/O thread per queue pair, the control queue served
//! by the first pair's thread.
//!
//! The device never looks into a frame past the virtio-net header: it
//! copies frames between guest buffers and the backend through two fixed
//! buffers of one maximum-size frame per pair (nothing is sized by the
//! guest), and passes the header through to a tap that takes one
//! (`IFF_VNET_HDR`, so checksum and segmentation offloads are the host
//! kernel's business) or drops it for a backend that does not. A guest that
//! breaks the ring protocol gets DEVICE_NEEDS_RESET; one that sends
//! malformed chains or control commands gets them dropped or refused
//! (`VIRTIO_NET_ERR`).
//!
//! Rates (bytes and packets per second, each way) are token buckets shared
//! by the queue pairs of one interface; a limited interface waits in its
//! own threads, never in a vCPU, and a guest cannot go faster by spreading
//! its frames over queues.
//!
//! What lasts across guest resets and reboots is a [`NetPort`] (the
//! backends, the link, the limits); a [`Net`] device and its threads are
//! made for each boot over it.

use super::{
    drain_queue, efd, poll, ActivationThread, Broken, Interrupt, Took, VirtioDevice, INT_CONFIG,
    INT_VRING, VIRTIO_RING_F_EVENT_IDX,
};
use moat_net::rate::{Limits, RateLimiter};
use moat_net::{Backend, Offloads, FRAME_MAX, VNET_HDR_LEN};
use moat_sys::lock;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use virtio_bindings::virtio_net as vn;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 256;
/// The most queue pairs moat gives one interface.
pub const MAX_QUEUE_PAIRS: usize = moat_config::MAX_NET_QUEUES;
/// MAC table entries kept per kind (QEMU's MAC_TABLE_ENTRIES); more set
/// the table's overflow flag.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// A frame with its header, the largest moat moves.
const BUF_LEN: usize = VNET_HDR_LEN + FRAME_MAX;
/// Frames one pass over a queue moves before the worker looks at its other
/// queues and its stop flag (so one busy direction cannot starve the rest).
const BATCH: usize = 64;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Offloads the guest may turn on (GUEST_*), and their host-side twins.
const GUEST_OFFLOADS: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN)
    | bit(vn::VIRTIO_NET_F_GUEST_UFO);
const HOST_OFFLOADS: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_ECN)
    | bit(vn::VIRTIO_NET_F_HOST_UFO);

fn offloads(features: u64) -> Offloads {
    let on = |b| features & bit(b) != 0;
    Offloads {
        csum: on(vn::VIRTIO_NET_F_GUEST_CSUM),
        tso4: on(vn::VIRTIO_NET_F_GUEST_TSO4),
        tso6: on(vn::VIRTIO_NET_F_GUEST_TSO6),
        ecn: on(vn::VIRTIO_NET_F_GUEST_ECN),
        ufo: on(vn::VIRTIO_NET_F_GUEST_UFO),
    }
}

/// The configuration space, as `virtio-bindings` lays it out.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct NetConfigSpace(vn::virtio_net_config);

// SAFETY: virtio_net_config is #[repr(C, packed)] integers and byte arrays:
// no padding, and every bit pattern is a value.
unsafe impl vm_memory::ByteValued for NetConfigSpace {}

/// The receive filter the guest set through the control queue, as QEMU's
/// query-rx-filter reports it. moat does not filter by it: the device
/// never parses frames (the tap or passt behind it sees every frame anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    pub promiscuous: bool,
    pub all_multicast: bool,
    pub all_unicast: bool,
    pub no_multicast: bool,
    pub no_unicast: bool,
    pub no_broadcast: bool,
    pub unicast_overflow: bool,
    pub multicast_overflow: bool,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
}

impl Default for RxFilter {
    /// After a reset, as QEMU's virtio-net: promiscuous (the compatibility
    /// mode for drivers without CTRL_RX), tables empty.
    fn default() -> Self {
        RxFilter {
            promiscuous: true,
            all_multicast: false,
            all_unicast: false,
            no_multicast: false,
            no_unicast: false,
            no_broadcast: false,
            unicast_overflow: false,
            multicast_overflow: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }
}

/// Counters of one interface.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_dropped: AtomicU64,
    /// Frames each queue pair moved (received, sent).
    pub per_pair: [(AtomicU64, AtomicU64); MAX_QUEUE_PAIRS],
}

/// What an interface shares with the rest of moat, across guest resets:
/// link state, MAC, receive filter, rate limits, counters.
#[derive(Clone)]
pub struct NetLink {
    inner: Arc<LinkState>,
}

struct LinkState {
    up: AtomicBool,
    /// The MAC the command line gave (a reset goes back to it) and the
    /// one the guest set.
    configured_mac: [u8; 6],
    mac: Mutex<[u8; 6]>,
    filter: Mutex<RxFilter>,
    /// NIC_RX_FILTER_CHANGED may be sent (until it is, then again after
    /// query-rx-filter): QEMU's rxfilter_notify_enabled.
    notify_enabled: AtomicBool,
    on_filter_change: OnceLock<Box<dyn Fn() + Send + Sync>>,
    rx: Mutex<RateLimiter>,
    tx: Mutex<RateLimiter>,
    limits: Mutex<(Limits, Limits)>,
    /// The running activation's interrupt: link changes raise a config
    /// interrupt.
    interrupt: Mutex<Option<Arc<Interrupt>>>,
    /// Woken when the limits change (a worker waiting on the old ones).
    wake: Mutex<Vec<Arc<EventFd>>>,
    stats: NetStats,
}

impl std::fmt::Debug for NetLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetLink")
            .field("up", &self.inner.up.load(Ordering::Relaxed))
            .finish()
    }
}

impl NetLink {
    pub fn new(mac: [u8; 6], rx: Limits, tx: Limits) -> NetLink {
        let now = Instant::now();
        NetLink {
            inner: Arc::new(LinkState {
                up: AtomicBool::new(true),
                configured_mac: mac,
                mac: Mutex::new(mac),
                filter: Mutex::default(),
                notify_enabled: AtomicBool::new(true),
                on_filter_change: OnceLock::new(),
                rx: Mutex::new(RateLimiter::new(rx, now)),
                tx: Mutex::new(RateLimiter::new(tx, now)),
                limits: Mutex::new((rx, tx)),
                interrupt: Mutex::new(None),
                wake: Mutex::new(Vec::new()),
                stats: NetStats::default(),
            }),
        }
    }

    /// QMP `set_link`: the guest sees the link go down or up (a config
    /// interrupt); frames are dropped while it is down.
    pub fn set_up(&self, up: bool) {
        if self.inner.up.swap(up, Ordering::SeqCst) != up {
            if let Some(i) = lock(&self.inner.interrupt).as_ref() {
                i.trigger(INT_CONFIG);
            }
        }
    }

    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::SeqCst)
    }

    /// The MAC address the guest uses now.
    pub fn mac(&self) -> [u8; 6] {
        *lock(&self.inner.mac)
    }

    /// query-rx-filter: the filter and MAC; NIC_RX_FILTER_CHANGED may be
    /// sent again.
    pub fn query_filter(&self) -> (RxFilter, [u8; 6]) {
        self.inner.notify_enabled.store(true, Ordering::SeqCst);
        (lock(&self.inner.filter).clone(), self.mac())
    }

    /// Where NIC_RX_FILTER_CHANGED goes (set once the monitor exists).
    pub fn on_filter_change(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.inner.on_filter_change.set(f);
    }

    /// Send NIC_RX_FILTER_CHANGED once until the filter is queried, as QEMU
    /// does (so a guest cannot flood the monitor).
    fn filter_changed(&self) {
        if self.inner.notify_enabled.swap(false, Ordering::SeqCst) {
            if let Some(f) = self.inner.on_filter_change.get() {
                f();
            }
        }
    }

    /// A device reset: QEMU's virtio_net_reset puts the filter back in
    /// promiscuous mode and the MAC back to the configured one.
    fn reset_filter(&self) {
        *lock(&self.inner.filter) = RxFilter::default();
        *lock(&self.inner.mac) = self.inner.configured_mac;
    }

    /// New rate limits (the buckets start full); waiting workers look again.
    pub fn set_limits(&self, rx: Limits, tx: Limits) {
        let now = Instant::now();
        *lock(&self.inner.rx) = RateLimiter::new(rx, now);
        *lock(&self.inner.tx) = RateLimiter::new(tx, now);
        *lock(&self.inner.limits) = (rx, tx);
        for w in lock(&self.inner.wake).iter() {
            let _ = w.write(1);
        }
    }

    pub fn limits(&self) -> (Limits, Limits) {
        *lock(&self.inner.limits)
    }

    pub fn stats(&self) -> &NetStats {
        &self.inner.stats
    }
}

/// An interface's lasting half, opened once before the sandbox and used by
/// every boot: its backends (one per queue pair), its link, and the MTU it
/// advises.
#[derive(Debug, Clone)]
pub struct NetPort {
    backends: Vec<Arc<Mutex<Backend>>>,
    /// Their descriptors, to wait on without taking the locks.
    fds: Vec<std::os::fd::RawFd>,
    link: NetLink,
    mtu: Option<u16>,
    vnet_hdr: bool,
}

impl NetPort {
    /// A port over `backends` (1 to [`MAX_QUEUE_PAIRS`]; a virtio-net
    /// header on all or on none).
    pub fn new(
        backends: Vec<Backend>,
        mtu: Option<u16>,
        link: NetLink,
    ) -> std::io::Result<NetPort> {
        if backends.is_empty() || backends.len() > MAX_QUEUE_PAIRS {
            return Err(std::io::Error::other(format!(
                "virtio-net: 1 to {MAX_QUEUE_PAIRS} queue pairs"
            )));
        }
        let vnet_hdr = backends[0].vnet_hdr();
        if backends.iter().any(|b| b.vnet_hdr() != vnet_hdr) {
            return Err(std::io::Error::other(
                "virtio-net: the tap's queues differ in IFF_VNET_HDR",
            ));
        }
        Ok(NetPort {
            fds: backends.iter().map(|b| b.as_fd().as_raw_fd()).collect(),
            backends: backends
                .into_iter()
                .map(|b| Arc::new(Mutex::new(b)))
                .collect(),
            link,
            mtu,
            vnet_hdr,
        })
    }

    pub fn link(&self) -> &NetLink {
        &self.link
    }

    pub fn pairs(&self) -> usize {
        self.backends.len()
    }

    /// Pair `i`'s backend descriptor.
    fn fd(&self, i: usize) -> BorrowedFd<'_> {
        // SAFETY: the descriptor belongs to `self.backends[i]`, which this
        // port keeps open (a backend is never replaced or closed while a
        // port holds it), so it is open for the borrow of `self`.
        unsafe { BorrowedFd::borrow_raw(self.fds[i]) }
    }
}

/// One activation of a queue pair. A queue the driver did not make ready
/// is `None` and never touched.
struct Activation {
    mem: GuestMemoryMmap,
    rx: Option<Queue>,
    tx: Option<Queue>,
    rx_notify: EventFd,
    tx_notify: EventFd,
    /// The control queue (pair 0 only).
    ctrl: Option<(Queue, EventFd)>,
    interrupt: Arc<Interrupt>,
    features: u64,
    kill: EventFd,
    stopping: Arc<AtomicBool>,
    needs_reset: Arc<dyn Fn() + Send + Sync>,
}

/// What the pairs' workers of one device share.
struct Shared {
    port: NetPort,
    /// Queue pairs the guest enabled (1 until it says more).
    active_pairs: AtomicUsize,
    /// One per worker: wakes it to look at `active_pairs` and the limits again.
    wakes: Vec<Arc<EventFd>>,
}

impl Shared {
    fn link(&self) -> &NetLink {
        &self.port.link
    }

    /// The guest asks for `n` queue pairs (`VQ_PAIRS_SET`).
    fn set_active_pairs(&self, n: usize) {
        self.active_pairs.store(n, Ordering::SeqCst);
        for (i, b) in self.port.backends.iter().enumerate() {
            let _ = lock(b).set_enabled(i < n);
        }
        for w in &self.wakes {
            let _ = w.write(1);
        }
    }
}

/// The virtio-net device model of one boot.
pub struct Net {
    shared: Arc<Shared>,
    threads: Vec<ActivationThread<Activation>>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Net {{ pairs: {} }}", self.pairs())
    }
}

impl Net {
    /// A device over `port`, its threads started.
    pub fn new(port: &NetPort) -> std::io::Result<Net> {
        let wakes = (0..port.pairs())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        *lock(&port.link.inner.wake) = wakes.clone();
        let shared = Arc::new(Shared {
            port: port.clone(),
            active_pairs: AtomicUsize::new(1),
            wakes,
        });
        let threads = (0..port.pairs())
            .map(|i| {
                let mut w = Worker::new(i, shared.clone());
                ActivationThread::spawn(
                    format!("virtio-net{i}"),
                    moat_sys::role::Role::NetIo,
                    move |a| w.run(a),
                )
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        port.link.reset_filter();
        Ok(Net { shared, threads })
    }

    fn pairs(&self) -> usize {
        self.shared.port.pairs()
    }

    fn config(&self) -> NetConfigSpace {
        let link = self.shared.link();
        NetConfigSpace(vn::virtio_net_config {
            mac: link.mac(),
            status: if link.is_up() {
                vn::VIRTIO_NET_S_LINK_UP as u16
            } else {
                0
            },
            max_virtqueue_pairs: self.pairs() as u16,
            mtu: self.shared.port.mtu.unwrap_or(0),
            ..Default::default()
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        let mut f = bit(vn::VIRTIO_NET_F_MAC)
            | bit(vn::VIRTIO_NET_F_STATUS)
            | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
            | bit(vn::VIRTIO_NET_F_CTRL_VQ)
            | bit(vn::VIRTIO_NET_F_CTRL_RX)
            | bit(vn::VIRTIO_NET_F_CTRL_MAC_ADDR)
            | super::VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX;
        if self.pairs() > 1 {
            f |= bit(vn::VIRTIO_NET_F_MQ);
        }
        if self.shared.port.mtu.is_some() {
            f |= bit(vn::VIRTIO_NET_F_MTU);
        }
        if self.shared.port.vnet_hdr {
            f |= GUEST_OFFLOADS | HOST_OFFLOADS | bit(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2 * self.pairs() + 1]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    /// The configuration space is read-only for a VERSION_1 driver (the
    /// MAC changes through the control queue).
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
        let pairs = self.pairs();
        if queues.len() != 2 * pairs + 1 || notify.len() != queues.len() {
            return Err(std::io::Error::other("virtio-net: wrong number of queues"));
        }
        // (Each pair's thread applies the offloads and queue state to its
        // own tap: a vCPU thread makes no tap ioctls.)
        self.shared.active_pairs.store(1, Ordering::SeqCst);
        *lock(&self.shared.link().inner.interrupt) = Some(interrupt.clone());
        let ready = |q: Queue| q.ready().then_some(q);
        let mut queues: Vec<Option<Queue>> = queues.into_iter().map(ready).collect();
        let mut notify: Vec<Option<EventFd>> = notify.into_iter().map(Some).collect();
        // The control queue is the last one with MQ, else the third (5.1.2).
        let ctrl_index = if features & bit(vn::VIRTIO_NET_F_MQ) != 0 {
            2 * pairs
        } else {
            2
        };
        let mut ctrl = match (features & bit(vn::VIRTIO_NET_F_CTRL_VQ) != 0)
            .then(|| (queues[ctrl_index].take(), notify[ctrl_index].take()))
        {
            Some((Some(q), Some(n))) => Some((q, n)),
            _ => None,
        };
        // Without MQ only the first pair exists.
        let used_pairs = if features & bit(vn::VIRTIO_NET_F_MQ) != 0 {
            pairs
        } else {
            1
        };
        for i in 0..used_pairs {
            let (Some(rx_notify), Some(tx_notify)) =
                (notify[2 * i].take(), notify[2 * i + 1].take())
            else {
                return Err(std::io::Error::other("virtio-net: missing queues"));
            };
            let (rx, tx) = (queues[2 * i].take(), queues[2 * i + 1].take());
            let ctrl = if i == 0 { ctrl.take() } else { None };
            self.threads[i].activate(|stop| {
                Ok(Activation {
                    mem: mem.clone(),
                    rx,
                    tx,
                    rx_notify,
                    tx_notify,
                    ctrl,
                    interrupt: interrupt.clone(),
                    features,
                    kill: stop.event.try_clone()?,
                    stopping: stop.flag.clone(),
                    needs_reset: needs_reset.clone(),
                })
            })?;
        }
        Ok(())
    }

    /// Tell the workers to stop, without waiting (see `VirtioDevice::reset`).
    fn reset(&mut self) {
        for t in &mut self.threads {
            t.stop();
        }
        *lock(&self.shared.link().inner.interrupt) = None;
        self.shared.link().reset_filter();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

/// One queue pair's worker: its two frame buffers, and what it waits for.
struct Worker {
    index: usize,
    shared: Arc<Shared>,
    /// One frame on its way in, with its header (`rx_len` bytes once read).
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    /// The waiting frame's rate was paid.
    rx_paid: bool,
    tx_buf: Vec<u8>,
    /// The guest has given no receive buffers: do not read the backend.
    rx_starved: bool,
    /// When the rate limiters allow the next frame.
    rx_wait_until: Option<Instant>,
    tx_wait_until: Option<Instant>,
    /// The backend failed (a stream peer went away): never polled again.
    dead: bool,
}

impl Worker {
    fn new(index: usize, shared: Arc<Shared>) -> Worker {
        Worker {
            index,
            shared,
            rx_buf: vec![0; BUF_LEN],
            rx_len: None,
            rx_paid: false,
            tx_buf: vec![0; BUF_LEN],
            rx_starved: false,
            rx_wait_until: None,
            tx_wait_until: None,
            dead: false,
        }
    }

    fn backend(&self) -> std::sync::MutexGuard<'_, Backend> {
        lock(&self.shared.port.backends[self.index])
    }

    fn active(&self) -> bool {
        self.index < self.shared.active_pairs.load(Ordering::SeqCst)
    }

    fn run(&mut self, mut a: Activation) {
        // A frame read for the last activation is dropped with it.
        self.rx_len = None;
        self.rx_starved = false;
        {
            let b = self.backend();
            if b.set_offloads(offloads(a.features)).is_err() {
                log::warn!("virtio-net: the tap refused the guest's offloads");
            }
            // One queue pair until the guest enables more.
            let _ = b.set_enabled(self.index == 0);
        }
        if let Err(e) = self.serve(&mut a) {
            e.needs_reset("virtio-net", &*a.needs_reset, &a.kill);
        }
    }

    fn serve(&mut self, a: &mut Activation) -> Result<(), Broken> {
        let wake = self.shared.wakes[self.index].clone();
        loop {
            if a.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            let now = Instant::now();
            if self.rx_wait_until.is_some_and(|t| t <= now) {
                self.rx_wait_until = None;
            }
            if self.tx_wait_until.is_some_and(|t| t <= now) {
                self.tx_wait_until = None;
            }
            let mut again = self.process_tx(a)?;
            again |= self.process_rx(a)?;
            if let Some((q, _)) = &mut a.ctrl {
                again |= process_ctrl(&a.mem, q, &a.interrupt, &self.shared, a.features)?;
            }
            if again {
                continue; // a batch ended with more to do
            }
            // What to wait for.
            // (The backend's lock is not held while waiting: the control
            // queue's thread takes every pair's to enable queues.)
            let shared = self.shared.clone();
            let backend_fd = shared.port.fd(self.index);
            let wants_write = self.backend().wants_write();
            let mut events = 0;
            if !self.dead && self.active() {
                if a.rx.is_some()
                    && !self.rx_starved
                    && self.rx_wait_until.is_none()
                    && self.rx_len.is_none()
                {
                    events |= libc::POLLIN;
                }
                if wants_write {
                    events |= libc::POLLOUT;
                }
            }
            let mut fds = vec![
                (efd(&a.kill), libc::POLLIN),
                (efd(&wake), libc::POLLIN),
                (efd(&a.rx_notify), libc::POLLIN),
                (efd(&a.tx_notify), libc::POLLIN),
            ];
            if let Some((_, n)) = &a.ctrl {
                fds.push((efd(n), libc::POLLIN));
            }
            // (Not polled at all when not wanted: a hung-up peer would
            // report POLLHUP forever.)
            if events != 0 {
                fds.push((backend_fd, events));
            }
            let timeout = [self.rx_wait_until, self.tx_wait_until]
                .into_iter()
                .flatten()
                .min()
                .map(|t| t.saturating_duration_since(now));
            let ready = poll(&fds, timeout);
            drop(fds);
            if ready[0] {
                return Ok(());
            }
            if ready[1] {
                let _ = wake.read();
                // The limits may have changed: look again now.
                self.rx_wait_until = None;
                self.tx_wait_until = None;
            }
            if ready[2] {
                let _ = a.rx_notify.read();
                self.rx_starved = false;
            }
            if ready[3] {
                let _ = a.tx_notify.read();
            }
            if let Some((_, n)) = &a.ctrl {
                if ready[4] {
                    let _ = n.read();
                }
            }
            let backend_ready = events != 0 && ready.last().copied().unwrap_or(false);
            if backend_ready && events & libc::POLLOUT != 0 {
                let flushed = self.backend().flush();
                if let Err(e) = flushed {
                    self.backend_failed(&e);
                }
            }
        }
    }

    /// The backend failed (a stream peer went away or broke the framing):
    /// the link goes down and the backend is not used again.
    fn backend_failed(&mut self, e: &std::io::Error) {
        if !self.dead {
            log::warn!("virtio-net: backend failed ({e}); link down");
            self.dead = true;
            self.shared.link().set_up(false);
        }
    }

    /// Move the guest's transmit chains to the backend, at most a batch;
    /// whether more may be waiting.
    fn process_tx(&mut self, a: &mut Activation) -> Result<bool, Broken> {
        let Some(q) = a.tx.as_mut() else {
            return Ok(false);
        };
        if self.tx_wait_until.is_some() {
            return Ok(false);
        }
        let mem = &a.mem;
        let stopping = &a.stopping;
        let vnet = self.shared.port.vnet_hdr;
        let shared = self.shared.clone();
        let link = shared.link();
        let stats = link.stats();
        let mut done = 0;
        drain_queue(mem, q, &a.interrupt, |chain| {
            if done == BATCH || stopping.load(Ordering::Relaxed) {
                return Took::PutBack {
                    more: !stopping.load(Ordering::Relaxed),
                };
            }
            let can_send = !self.dead && self.active();
            if can_send && self.backend().wants_write() {
                // The backend has output waiting: wait until it is writable.
                return Took::PutBack { more: false };
            }
            done += 1;
            let len = read_chain(mem, chain, &mut self.tx_buf);
            match len.filter(|&l| l > VNET_HDR_LEN) {
                // Malformed (no frame after the header, too long for a
                // frame, outside RAM), or nowhere to go: dropped.
                None => {
                    stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) if !link.is_up() || !can_send => {
                    stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Some(len) => {
                    let frame_len = (len - VNET_HDR_LEN) as u64;
                    if let Some(wait) = lock(&link.inner.tx).admit(frame_len, Instant::now()) {
                        self.tx_wait_until = Some(Instant::now() + wait);
                        return Took::PutBack { more: false };
                    }
                    let frame = if vnet {
                        &self.tx_buf[..len]
                    } else {
                        &self.tx_buf[VNET_HDR_LEN..len]
                    };
                    let sent = lock(&shared.port.backends[self.index]).send(frame);
                    match sent {
                        Ok(_) => {
                            stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                            stats.per_pair[self.index].1.fetch_add(1, Ordering::Relaxed);
                            stats.tx_bytes.fetch_add(frame_len, Ordering::Relaxed);
                        }
                        Err(e) => {
                            stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                            self.backend_failed(&e);
                        }
                    }
                }
            }
            Took::Used(0)
        })
    }

    /// Move frames from the backend to the guest's receive buffers, at most
    /// a batch; whether more may be waiting.
    fn process_rx(&mut self, a: &mut Activation) -> Result<bool, Broken> {
        let Some(q) = a.rx.as_mut() else {
            return Ok(false);
        };
        let mem = &a.mem;
        let mrg = a.features & bit(vn::VIRTIO_NET_F_MRG_RXBUF) != 0;
        let mut used = false;
        let mut more = false;
        for _ in 0..BATCH {
            more = false;
            if a.stopping.load(Ordering::Relaxed)
                || self.rx_starved
                || self.rx_wait_until.is_some()
                || self.dead
                || !self.active()
            {
                break;
            }
            let len = match self.rx_len {
                Some(l) => l,
                None => match self.read_frame() {
                    Some(l) => l,
                    None => break,
                },
            };
            if !self.rx_paid {
                let frame = (len - VNET_HDR_LEN) as u64;
                let link = self.shared.link();
                if let Some(wait) = lock(&link.inner.rx).admit(frame, Instant::now()) {
                    self.rx_wait_until = Some(Instant::now() + wait);
                    break;
                }
                self.rx_paid = true;
            }
            let stats = self.shared.link().stats();
            match deliver(mem, q, &mut self.rx_buf[..len], mrg)? {
                Delivery::Done => {
                    used = true;
                    stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                    stats.per_pair[self.index].0.fetch_add(1, Ordering::Relaxed);
                    stats
                        .rx_bytes
                        .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    self.rx_len = None;
                }
                Delivery::NoRoom => {
                    // Ask to be told when buffers come, then look once more
                    // (they may have come meanwhile).
                    if notify_past_avail(mem, q)? {
                        q.disable_notification(mem)?;
                    } else {
                        self.rx_starved = true;
                        break;
                    }
                }
                Delivery::Dropped => {
                    stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    self.rx_len = None;
                    used = true;
                }
            }
            more = true;
        }
        if used && q.needs_notification(mem)? {
            a.interrupt.trigger(INT_VRING);
        }
        Ok(more)
    }

    /// Read the next frame into `rx_buf` (header first); its length with
    /// the header.
    fn read_frame(&mut self) -> Option<usize> {
        let vnet = self.shared.port.vnet_hdr;
        loop {
            let got = {
                let mut b = lock(&self.shared.port.backends[self.index]);
                if vnet {
                    b.recv(&mut self.rx_buf[..])
                } else {
                    b.recv(&mut self.rx_buf[VNET_HDR_LEN..])
                }
            };
            let n = match got {
                Ok(Some(n)) => n,
                Ok(None) => return None,
                Err(e) => {
                    self.backend_failed(&e);
                    return None;
                }
            };
            let len = if vnet {
                if n < VNET_HDR_LEN {
                    continue;
                }
                n
            } else {
                // A backend without the header: no offloads, nothing to say.
                self.rx_buf[..VNET_HDR_LEN].fill(0);
                n + VNET_HDR_LEN
            };
            if !self.shared.link().is_up() {
                self.shared
                    .link()
                    .stats()
                    .rx_dropped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.rx_len = Some(len);
            self.rx_paid = false;
            return Some(len);
        }
    }
}

/// Ask the driver to notify when it makes a buffer available past those
/// the ring holds now; whether some came meanwhile. (`enable_notification`
/// asks only past `next_avail`: with EVENT_IDX a device that put chains
/// back, too few for a frame, would never hear of more and would have to
/// poll the ring.)
fn notify_past_avail(mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, Broken> {
    q.enable_notification(mem)?;
    let idx = q.avail_idx(mem, Ordering::Acquire)?;
    if q.event_idx_enabled() {
        // avail_event: the u16 after the used ring's elements (2.7.10).
        let at = q
            .used_ring()
            .checked_add(4 + 8 * u64::from(q.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        vm_memory::Bytes::store(
            mem,
            idx.0.to_le(),
            vm_memory::GuestAddress(at),
            Ordering::Release,
        )
        .map_err(virtio_queue::Error::GuestMemory)?;
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    Ok(q.avail_idx(mem, Ordering::Acquire)? != idx)
}

enum Delivery {
    Done,
    /// No receive buffers now: the frame waits.
    NoRoom,
    /// The buffers cannot hold it (one chain without MRG_RXBUF, or the whole
    /// ring with it): dropped, the chains returned empty.
    Dropped,
}

/// Put `frame` (header first) into the guest's receive chains: several
/// with MRG_RXBUF (`num_buffers` in the header says how many), else one that
/// must hold it all.
fn deliver(
    mem: &GuestMemoryMmap,
    q: &mut Queue,
    frame: &mut [u8],
    mrg: bool,
) -> Result<Delivery, Broken> {
    let len = frame.len();
    // At most the ring's size of chains, each with what it takes.
    let mut chains: Vec<(u16, Writer<'_>, usize)> = Vec::new();
    let mut room = 0usize;
    while room < len {
        let Some(chain) = super::next_chain(mem, q)? else {
            if chains.is_empty() {
                return Ok(Delivery::NoRoom);
            }
            // Not enough buffers yet: wait for more with these put back.
            for _ in 0..chains.len() {
                q.go_to_previous_position();
            }
            return Ok(Delivery::NoRoom);
        };
        let head = chain.head_index();
        let Ok(w) = Writer::<()>::new(mem, chain) else {
            // A chain that loops or points outside RAM: returned empty.
            q.add_used(mem, head, 0)?;
            continue;
        };
        let take = w.available_bytes().min(len - room);
        room += take;
        chains.push((head, w, take));
        if !mrg || chains.len() >= usize::from(q.size()) {
            break;
        }
    }
    if room < len {
        for (head, _, _) in &chains {
            q.add_used(mem, *head, 0)?;
        }
        return Ok(Delivery::Dropped);
    }
    // num_buffers (virtio_net_hdr_v1's last field).
    let count = chains.len() as u16;
    frame[10..12].copy_from_slice(&count.to_le_bytes());
    let mut off = 0usize;
    for (head, mut w, take) in chains {
        let end = off + take;
        let written = w.write_all(&frame[off..end]).is_ok();
        // A chain Writer::new checked cannot fail to take what it offered;
        // should it, the guest sees the bytes that made it.
        q.add_used(mem, head, if written { take as u32 } else { 0 })?;
        off = end;
    }
    Ok(Delivery::Done)
}

/// Copy a transmit chain into `buf`; its length, or `None` when it does
/// not fit or is not a readable chain in RAM.
fn read_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Option<usize> {
    let mut r = Reader::<()>::new(mem, chain).ok()?;
    let len = r.available_bytes();
    if len > buf.len() {
        return None;
    }
    r.read_exact(&mut buf[..len]).ok()?;
    Some(len)
}

/// Serve the control queue (virtio 1.2, 5.1.6.5): receive modes, the MAC
/// table and address, the number of queue pairs, the guest's offloads.
fn process_ctrl(
    mem: &GuestMemoryMmap,
    q: &mut Queue,
    interrupt: &Interrupt,
    shared: &Shared,
    features: u64,
) -> Result<bool, Broken> {
    let size = usize::from(q.size());
    let mut done = 0;
    drain_queue(mem, q, interrupt, |chain| {
        if done == size {
            return Took::PutBack { more: true }; // the rest on the next pass
        }
        done += 1;
        Took::Used(ctrl_command(mem, chain, shared, features))
    })
}

/// One control command: its ack written in the chain's last writable byte;
/// how many bytes were written (0 when there was nowhere to write).
fn ctrl_command(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    shared: &Shared,
    features: u64,
) -> u32 {
    let (Ok(mut r), Ok(mut w)) = (
        Reader::<()>::new(mem, chain.clone()),
        Writer::<()>::new(mem, chain),
    ) else {
        return 0;
    };
    let Some(last) = w.available_bytes().checked_sub(1) else {
        return 0;
    };
    let Ok(mut ack_w) = w.split_at(last) else {
        return 0;
    };
    let ack = match ctrl_execute(&mut r, shared, features) {
        Some(()) => vn::VIRTIO_NET_OK,
        None => vn::VIRTIO_NET_ERR,
    } as u8;
    match ack_w.write_all(&[ack]) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

/// Decode and apply one command; `None` refuses it.
fn ctrl_execute(r: &mut Reader<'_>, shared: &Shared, features: u64) -> Option<()> {
    let mut hdr = [0u8; 2];
    r.read_exact(&mut hdr).ok()?;
    let (class, cmd) = (u32::from(hdr[0]), u32::from(hdr[1]));
    let link = shared.link();
    let has = |f| features & bit(f) != 0;
    match class {
        vn::VIRTIO_NET_CTRL_RX if has(vn::VIRTIO_NET_F_CTRL_RX) => {
            let mut on = [0u8; 1];
            r.read_exact(&mut on).ok()?;
            let on = on[0] != 0;
            let mut f = lock(&link.inner.filter);
            match cmd {
                vn::VIRTIO_NET_CTRL_RX_PROMISC => f.promiscuous = on,
                vn::VIRTIO_NET_CTRL_RX_ALLMULTI => f.all_multicast = on,
                vn::VIRTIO_NET_CTRL_RX_ALLUNI => f.all_unicast = on,
                vn::VIRTIO_NET_CTRL_RX_NOMULTI => f.no_multicast = on,
                vn::VIRTIO_NET_CTRL_RX_NOUNI => f.no_unicast = on,
                vn::VIRTIO_NET_CTRL_RX_NOBCAST => f.no_broadcast = on,
                _ => return None,
            }
            drop(f);
            link.filter_changed();
            Some(())
        }
        vn::VIRTIO_NET_CTRL_MAC => match cmd {
            vn::VIRTIO_NET_CTRL_MAC_TABLE_SET => {
                let (uni, uni_over) = read_mac_table(r)?;
                let (mut multi, mut multi_over) = read_mac_table(r)?;
                // Both kinds share the 64 entries, unicast first (QEMU).
                if uni.len() + multi.len() > MAC_TABLE_ENTRIES {
                    multi.clear();
                    multi_over = true;
                }
                let mut f = lock(&link.inner.filter);
                f.unicast = uni;
                f.unicast_overflow = uni_over;
                f.multicast = multi;
                f.multicast_overflow = multi_over;
                drop(f);
                link.filter_changed();
                Some(())
            }
            vn::VIRTIO_NET_CTRL_MAC_ADDR_SET if has(vn::VIRTIO_NET_F_CTRL_MAC_ADDR) => {
                let mut mac = [0u8; 6];
                r.read_exact(&mut mac).ok()?;
                *lock(&link.inner.mac) = mac;
                link.filter_changed();
                Some(())
            }
            _ => None,
        },
        vn::VIRTIO_NET_CTRL_MQ
            if cmd == vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET && has(vn::VIRTIO_NET_F_MQ) =>
        {
            let mut n = [0u8; 2];
            r.read_exact(&mut n).ok()?;
            let n = usize::from(u16::from_le_bytes(n));
            if n == 0 || n > shared.port.pairs() {
                return None;
            }
            shared.set_active_pairs(n);
            Some(())
        }
        vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS
            if cmd == vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET
                && has(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) =>
        {
            let mut v = [0u8; 8];
            r.read_exact(&mut v).ok()?;
            let want = u64::from_le_bytes(v);
            // Only offloads the guest accepted at negotiation.
            if want & !(features & GUEST_OFFLOADS) != 0 {
                return None;
            }
            for b in &shared.port.backends {
                lock(b).set_offloads(offloads(want)).ok()?;
            }
            Some(())
        }
        _ => None,
    }
}

/// One MAC table of TABLE_SET: its count (little-endian u32), then the
/// entries; more than [`MAC_TABLE_ENTRIES`] set the overflow flag (and are
/// not kept, as in QEMU).
fn read_mac_table(r: &mut Reader<'_>) -> Option<(Vec<[u8; 6]>, bool)> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n).ok()?;
    let n = u32::from_le_bytes(n) as usize;
    // The entries must be there: bounded by the chain, not by the count.
    if n.checked_mul(6)? > r.available_bytes() {
        return None;
    }
    let overflow = n > MAC_TABLE_ENTRIES;
    let mut table = Vec::with_capacity(if overflow { 0 } else { n });
    for _ in 0..n {
        let mut mac = [0u8; 6];
        r.read_exact(&mut mac).ok()?;
        if !overflow {
            table.push(mac);
        }
    }
    Some((table, overflow))
}

/// One queue pair's worker, without its thread: the `virtio_net` fuzz
/// target's way in. Runs `rounds` passes of transmit, receive and control
/// processing over `mem` and the queues given, with `port`'s first
/// backend, as a worker thread would between two waits.
#[doc(hidden)]
pub fn fuzz_worker(
    port: &NetPort,
    mem: GuestMemoryMmap,
    queues: [Option<Queue>; 3],
    features: u64,
    rounds: usize,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        port: port.clone(),
        active_pairs: AtomicUsize::new(1),
        wakes: (0..port.pairs())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<_>>()?,
    });
    let [rx, tx, ctrl] = queues;
    let mut a = Activation {
        mem,
        rx,
        tx,
        rx_notify: EventFd::new(libc::EFD_NONBLOCK)?,
        tx_notify: EventFd::new(libc::EFD_NONBLOCK)?,
        ctrl: match ctrl {
            Some(q) => Some((q, EventFd::new(libc::EFD_NONBLOCK)?)),
            None => None,
        },
        interrupt: Arc::new(Interrupt::new(crate::IrqLine::new()?)),
        features,
        kill: EventFd::new(libc::EFD_NONBLOCK)?,
        stopping: Arc::default(),
        needs_reset: Arc::new(|| {}),
    };
    let mut w = Worker::new(0, shared.clone());
    for _ in 0..rounds {
        let pass = (|| {
            w.process_tx(&mut a)?;
            w.process_rx(&mut a)?;
            if let Some((q, _)) = &mut a.ctrl {
                process_ctrl(&a.mem, q, &a.interrupt, &shared, a.features)?;
            }
            Ok::<_, Broken>(())
        })();
        if pass.is_err() {
            break; // DEVICE_NEEDS_RESET: the worker would wait for a reset
        }
        // The guest may have refilled: as a notify would.
        w.rx_starved = false;
        let _ = w.backend().flush();
    }
    Ok(())
}
