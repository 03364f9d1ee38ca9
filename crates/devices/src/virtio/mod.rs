//! virtio devices over the virtio-mmio transport (virtio 1.2, section 4.2).

pub mod block;
pub mod mmio;
pub mod net;

use crate::IrqLine;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::Queue;
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
/// previous one has let go of its queues and guest memory. Dropping it
/// ends the thread once its current activation has stopped.
pub(crate) struct ActivationThread<A> {
    start: Option<std::sync::mpsc::Sender<A>>,
    handle: Option<std::thread::JoinHandle<()>>,
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
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            moat_sys::role::enter(role);
            for a in activations {
                serve(a);
            }
        })?;
        Ok(ActivationThread {
            start: Some(start),
            handle: Some(handle),
        })
    }

    /// Hand the thread an activation; false if it is gone.
    pub(crate) fn activate(&self, a: A) -> bool {
        self.start.as_ref().is_some_and(|s| s.send(a).is_ok())
    }
}

impl<A> Drop for ActivationThread<A> {
    fn drop(&mut self) {
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
