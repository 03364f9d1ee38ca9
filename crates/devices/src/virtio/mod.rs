//! virtio devices over the virtio-mmio transport (virtio 1.2, section 4.2).

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use crate::IrqLine;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use virtio_bindings::{virtio_config, virtio_mmio, virtio_ring};

pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// The interrupt of one virtio-mmio device: InterruptStatus bits plus the line.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    line: IrqLine,
}

pub const INT_VRING: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

impl Interrupt {
    pub fn new(line: IrqLine) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }
    pub fn line(&self) -> &IrqLine {
        &self.line
    }
    /// Set `bits` in InterruptStatus and raise the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.line.pulse();
    }
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A device's I/O thread: started with the device (by the thread that
/// builds the VM, not by a vCPU, so vCPU threads never create threads), it
/// serves one activation after another until the device is dropped.
/// Activations queue up in order, so a new one starts only after the
/// previous one has let go of its queues and guest memory. Each activation
/// comes with a [`Stop`] the thread keeps; dropping the thread stops the
/// current activation and ends the thread.
pub(crate) struct ActivationThread<A> {
    start: Option<std::sync::mpsc::Sender<A>>,
    handle: Option<std::thread::JoinHandle<()>>,
    /// How to stop the activation being served.
    stop: Option<Stop>,
}

impl<A: Send + 'static> ActivationThread<A> {
    /// A thread named `name` that enters `role`, then calls `serve` with
    /// each activation.
    pub(crate) fn spawn(
        name: String,
        role: moat_sys::role::Role,
        mut serve: impl FnMut(A) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (start, activations) = std::sync::mpsc::channel::<A>();
        let handle = moat_sys::thread(name).spawn(move || {
            moat_sys::role::enter(role);
            for a in activations {
                serve(a);
            }
        })?;
        Ok(ActivationThread {
            start: Some(start),
            handle: Some(handle),
            stop: None,
        })
    }

    /// Hand the thread an activation made with its stop (the worker keeps
    /// the flag and a duplicate of the event).
    pub(crate) fn activate(
        &mut self,
        make: impl FnOnce(&Stop) -> std::io::Result<A>,
    ) -> std::io::Result<()> {
        let stop = Stop::new()?;
        let a = make(&stop)?;
        let sent = match &self.start {
            Some(s) => s.send(a).is_ok(),
            None => false,
        };
        if !sent {
            return Err(std::io::Error::other("a device's I/O thread is gone"));
        }
        self.stop = Some(stop);
        Ok(())
    }

    /// Tell the current activation's worker to stop, without waiting.
    pub(crate) fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.stop();
        }
    }
}

impl<A> Drop for ActivationThread<A> {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.stop();
        }
        self.start = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// How a device tells an activation's worker to stop: a flag the worker
/// checks between units of work, and an eventfd that wakes it from a wait.
pub(crate) struct Stop {
    pub(crate) flag: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) event: EventFd,
}

impl Stop {
    pub(crate) fn new() -> std::io::Result<Stop> {
        Ok(Stop {
            flag: Arc::default(),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Tell the worker to stop, without waiting for it.
    pub(crate) fn stop(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.event.write(1);
    }
}

/// Read `data.len()` bytes of a configuration space `config` from
/// `offset`; bytes past its end read as zero (the guest picks the offset).
pub(crate) fn read_config_bytes<T: vm_memory::ByteValued>(
    config: &T,
    offset: u64,
    data: &mut [u8],
) {
    let c = config.as_slice();
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| c.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// The driver broke the ring protocol: DEVICE_NEEDS_RESET.
#[derive(Debug)]
pub(crate) struct Broken(pub(crate) virtio_queue::Error);

impl Broken {
    /// Set DEVICE_NEEDS_RESET and wait for the stop the driver's reset
    /// brings (`kill`). Guest-triggered, so logged at debug level only: a
    /// guest cannot flood the host's log.
    pub(crate) fn needs_reset(self, device: &str, needs_reset: &dyn Fn(), kill: &EventFd) {
        log::debug!(
            "{device}: the driver broke the ring protocol ({:?}); device needs reset",
            self.0
        );
        needs_reset();
        poll(&[(efd(kill), libc::POLLIN)], None);
    }
}

impl From<virtio_queue::Error> for Broken {
    fn from(e: virtio_queue::Error) -> Self {
        Broken(e)
    }
}

/// What a queue's consumer did with a chain.
pub(crate) enum Took {
    /// Done with: returned to the driver with this many bytes written.
    Used(u32),
    /// Not now: put back on the ring, and the pass ends (`more`: there is
    /// more to do at once, rather than after a wait).
    PutBack { more: bool },
}

/// The next available chain, if any. An avail index more than the ring's
/// size ahead is the driver's error (`pop_descriptor_chain` would log it
/// and report an empty ring, and the caller, seeing the index move, would
/// look again forever). An index that moves between two looks is not an
/// error: the driver publishes whenever it likes.
pub(crate) fn next_chain<'m>(
    mem: &'m GuestMemoryMmap,
    q: &mut Queue,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(q.iter(mem)?.next())
}

/// Hand a queue's chains to `each` until the ring is empty or `each`
/// puts one back; interrupt the driver if any were used. Whether more may
/// be waiting. Once the ring looks empty the device asks to be notified and
/// looks once more: with EVENT_IDX the driver notifies again only when
/// avail_event (which asking moves) says so, and Linux spins waiting for
/// each control command's ack, so a chain missed here hangs its CPU.
pub(crate) fn drain_queue<'m>(
    mem: &'m GuestMemoryMmap,
    q: &mut Queue,
    interrupt: &Interrupt,
    mut each: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> Took,
) -> Result<bool, Broken> {
    let mut used = false;
    let mut more = false;
    'refill: loop {
        q.disable_notification(mem)?;
        while let Some(chain) = next_chain(mem, q)? {
            let head = chain.head_index();
            match each(chain) {
                Took::Used(len) => {
                    q.add_used(mem, head, len)?;
                    used = true;
                }
                Took::PutBack { more: m } => {
                    q.go_to_previous_position();
                    more = m;
                    break 'refill;
                }
            }
        }
        // (More may have come since the ring looked empty: the driver
        // publishes at any time, so look again.)
        if !q.enable_notification(mem)? {
            break;
        }
    }
    if used && q.needs_notification(mem)? {
        interrupt.trigger(INT_VRING);
    }
    Ok(more)
}

/// poll(2) `fds` (descriptor, events) for up to
/// `timeout` (forever: None); which have events.
pub(crate) fn poll(
    fds: &[(BorrowedFd<'_>, libc::c_short)],
    timeout: Option<Duration>,
) -> Vec<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut p: Vec<PollFd> = fds
        .iter()
        .map(|(fd, ev)| PollFd::new(fd, PollFlags::from_bits_truncate(*ev as _)))
        .collect();
    // At least 100 µs, so a wait for a rate limit never spins.
    let ts = timeout.map(|t| {
        let t = t.max(Duration::from_micros(100));
        Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        }
    });
    loop {
        match rustix::event::poll(&mut p, ts.as_ref()) {
            Ok(_) => {
                return p
                    .iter()
                    .zip(fds)
                    .map(|(x, _)| !x.revents().is_empty())
                    .collect()
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return vec![true; fds.len()],
        }
    }
}

/// An eventfd as a borrowed descriptor (vmm-sys-util's EventFd has no AsFd).
pub(crate) fn efd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is `e`'s, open for as long as the borrow of `e`.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// The queue and notifier of a device that has one queue.
pub(crate) fn one_queue(
    mut queues: Vec<Queue>,
    mut notify: Vec<EventFd>,
    device: &str,
) -> std::io::Result<(Queue, EventFd)> {
    match (
        queues.pop(),
        notify.pop(),
        queues.is_empty() && notify.is_empty(),
    ) {
        (Some(q), Some(n), true) => Ok((q, n)),
        _ => Err(std::io::Error::other(format!("{device} has one queue"))),
    }
}

/// What a virtio device provides to the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start serving the queues (the driver set DRIVER_OK).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        notify: Vec<EventFd>,
        interrupt: std::sync::Arc<Interrupt>,
        acked_features: u64,
        needs_reset: std::sync::Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<()>;
    /// Stop serving; the transport then returns to its initial state.
    /// Runs on a vCPU thread, so it must not wait for I/O: a device whose
    /// worker is busy tells it to stop and returns; the worker must post
    /// nothing more to the old queues, and the next activation must not
    /// start before it has stopped.
    fn reset(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    /// A driver that publishes while the device drains (as every driver
    /// does): the device takes every chain and never calls the index that
    /// moved between two of its looks an error. (It once did, and Linux's
    /// virtio_net stalled on the queue pair whose thread gave up.)
    #[test]
    fn a_driver_publishing_meanwhile_is_not_an_error() {
        const SIZE: u16 = 16;
        const TOTAL: u32 = 300_000;
        let (desc, avail, used, buf) = (0u64, 0x1000u64, 0x2000u64, 0x3000u64);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        for i in 0..u64::from(SIZE) {
            mem.write_obj(buf + 64 * i, GuestAddress(desc + 16 * i))
                .unwrap();
            mem.write_obj(64u32, GuestAddress(desc + 16 * i + 8))
                .unwrap();
        }
        let mut q = Queue::new(SIZE).unwrap();
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&mem));
        let interrupt = Interrupt::new(crate::IrqLine::new().unwrap());
        let driver = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let mut idx: u16 = 0;
                for _ in 0..TOTAL {
                    // Room on the ring: at most SIZE chains outstanding.
                    while idx.wrapping_sub(
                        mem.load::<u16>(GuestAddress(used + 2), Ordering::Acquire)
                            .unwrap(),
                    ) >= SIZE
                    {
                        std::hint::spin_loop();
                    }
                    let slot = u64::from(idx % SIZE);
                    mem.store(
                        idx % SIZE,
                        GuestAddress(avail + 4 + 2 * slot),
                        Ordering::Relaxed,
                    )
                    .unwrap();
                    idx = idx.wrapping_add(1);
                    mem.store(idx, GuestAddress(avail + 2), Ordering::Release)
                        .unwrap();
                }
            })
        };
        let mut taken = 0u32;
        while taken < TOTAL {
            drain_queue(&mem, &mut q, &interrupt, |_| {
                taken += 1;
                Took::Used(0)
            })
            .unwrap_or_else(|e| panic!("after {taken} chains: {e:?}"));
        }
        driver.join().unwrap();
    }

    /// An avail index more than the ring's size ahead is the driver's
    /// error (DEVICE_NEEDS_RESET), not a ring to look at forever.
    #[test]
    fn an_avail_index_past_the_ring_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_ready(true);
        mem.store(1000u16, GuestAddress(0x1002), Ordering::Release)
            .unwrap();
        let interrupt = Interrupt::new(crate::IrqLine::new().unwrap());
        let r = drain_queue(&mem, &mut q, &interrupt, |_| Took::Used(0));
        assert!(
            matches!(r, Err(Broken(virtio_queue::Error::InvalidAvailRingIndex))),
            "{r:?}"
        );
    }
}
