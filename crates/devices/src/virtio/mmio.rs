//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): registers,
//! feature negotiation, queue setup, status and reset. Queue work happens on
//! the device's own thread, woken by ioeventfd; the transport runs on vCPU
//! threads and only touches registers.

use super::{status, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::IrqLine;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x5441_4f4d; // "MOAT"
pub use moat_boot::layout::VIRTIO_MMIO_SIZE as MMIO_SIZE;

/// The register offsets (virtio 1.2, 4.2.2), as `virtio-bindings` names them.
mod reg {
    use virtio_bindings::virtio_mmio as m;
    pub const MAGIC_VALUE: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_AVAIL_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_AVAIL_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_USED_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_USED_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
}
pub use reg::QUEUE_NOTIFY;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
    needs_reset: Arc<AtomicBool>,
    /// Counts resets: a device's report from before the last reset (its
    /// worker stops asynchronously) must not mark the new session broken.
    epoch: Arc<AtomicU64>,
    /// The driver wrote a queue size or ring address we could not accept.
    bad_queue_config: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MmioTransport {{ type: {}, status: {:#x} }}",
            self.device.device_type(),
            self.status
        )
    }
}

fn rd32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: IrqLine,
    ) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes();
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let notify = sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            notify,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
            needs_reset: Arc::new(AtomicBool::new(false)),
            epoch: Arc::default(),
            bad_queue_config: false,
        })
    }

    /// The queue-notify eventfds, to register as ioeventfds at `QUEUE_NOTIFY`.
    pub fn notify_fds(&self) -> &[EventFd] {
        &self.notify
    }

    pub fn irq(&self) -> &IrqLine {
        self.interrupt.line()
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn status(&self) -> u32 {
        let mut s = self.status;
        if self.needs_reset.load(Ordering::SeqCst) {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let v = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => {
                let f = self.device.features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let v = rd32(data);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if self.queue_setup_allowed() => {
                // A split ring's size is a power of two no larger than the maximum.
                let ok = self
                    .queue()
                    .is_some_and(|q| v != 0 && v.is_power_of_two() && v <= u32::from(q.max_size()));
                match (ok, self.queue()) {
                    (true, Some(q)) => q.set_size(v as u16),
                    _ => self.bad_queue_config = true,
                }
            }
            reg::QUEUE_READY if self.queue_setup_allowed() => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; a fallback for safety.
                if let Some(e) = self.notify.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if self.queue_setup_allowed() =>
            {
                // Alignment of the descriptor table, driver and device areas (2.7).
                let align = match offset & !4 {
                    reg::QUEUE_DESC_LOW => 16,
                    reg::QUEUE_AVAIL_LOW => 2,
                    _ => 4,
                };
                if offset & 4 == 0 && !v.is_multiple_of(align) {
                    self.bad_queue_config = true;
                    return;
                }
                if let Some(q) = self.queue() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => log::debug!("virtio-mmio: ignored write of {v:#x} at {offset:#x}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v & !status::DEVICE_NEEDS_RESET;
        // FEATURES_OK only for a subset of what we offer that includes VERSION_1.
        if v & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.features() | VIRTIO_F_VERSION_1;
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                v &= !status::FEATURES_OK;
            }
        }
        let newly_ok = v & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = v;
        if newly_ok && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for q in self.queues.iter_mut() {
            q.set_event_idx(event_idx);
        }
        if self.bad_queue_config
            || self
                .queues
                .iter()
                .any(|q| q.ready() && !q.is_valid(&self.mem))
        {
            log::debug!("virtio-mmio: a ready queue is invalid");
            self.device_needs_reset();
            return;
        }
        let notify = match self
            .notify
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(n) => n,
            Err(_) => return self.device_needs_reset(),
        };
        // The device gets its own copies of the queues (the transport keeps
        // the registers the driver may read back).
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(q) => q,
            Err(_) => return self.device_needs_reset(),
        };
        let flag = self.needs_reset.clone();
        let irq = self.interrupt.clone();
        let epoch = self.epoch.clone();
        let mine = epoch.load(Ordering::SeqCst);
        let needs_reset: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if epoch.load(Ordering::SeqCst) == mine {
                flag.store(true, Ordering::SeqCst);
                irq.trigger(super::INT_CONFIG);
            }
        });
        match self.device.activate(
            self.mem.clone(),
            queues,
            notify,
            self.interrupt.clone(),
            self.driver_features,
            needs_reset,
        ) {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::warn!(
                    "virtio-mmio: activating device {}: {e}",
                    self.device.device_type()
                );
                self.device_needs_reset();
            }
        }
    }

    fn device_needs_reset(&mut self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.interrupt.trigger(super::INT_CONFIG);
    }

    /// Reset the transport at once; the device stops its worker without
    /// making the vCPU wait (see [`VirtioDevice::reset`]).
    fn reset(&mut self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in self.queues.iter_mut() {
            q.reset();
        }
        for e in &self.notify {
            let _ = e.read();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        self.needs_reset.store(false, Ordering::SeqCst);
        self.bad_queue_config = false;
    }
}
