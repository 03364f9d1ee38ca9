//! virtio-rng (virtio 1.2, 5.4): one request queue whose writable buffers
//! the device fills with random bytes.
//!
//! The bytes come from an [`EntropySource`] opened before the sandbox: the
//! host kernel's `getrandom(2)` (`rng-builtin`) or `/dev/urandom` or
//! `/dev/random` (`rng-random`), read without blocking so a reset never
//! waits for the kernel. QEMU's rate limit holds: at most `max-bytes` in a
//! window of `period` ms that opens at the first request after the last
//! window closed. A throttled device waits in its own thread (never in a
//! vCPU) with the guest's buffers left on the ring. The limiter lives in the
//! [`RngPort`], which outlives device resets and reboots, so a guest cannot
//! refill its quota by resetting the device.
//!
//! Each request is bounded whatever the guest's buffer: at most
//! [`MAX_PER_REQUEST`] bytes through one fixed buffer, so nothing is sized
//! by the guest.

use super::{drain_queue, efd, poll, ActivationThread, Broken, Interrupt, Took, VirtioDevice};
use moat_sys::lock;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets (a device may fill less than offered).
pub const MAX_PER_REQUEST: usize = 64 * 1024;
/// Bytes read from the source at a time.
const CHUNK: usize = 4096;
/// Requests one pass serves before looking at its stop flag again.
const BATCH: usize = 64;
/// How long to wait before asking getrandom(2) again when it had nothing.
const RETRY: Duration = Duration::from_millis(100);

/// Where the bytes come from.
#[derive(Debug)]
pub enum EntropySource {
    /// getrandom(2).
    Getrandom,
    /// `/dev/urandom` or `/dev/random`, opened non-blocking.
    Device(std::fs::File),
}

impl EntropySource {
    /// Open `cfg`'s source: a device file must be the kernel's random or
    /// urandom character device (1:8 or 1:9), whatever the path says.
    pub fn open(cfg: &moat_config::RngSource) -> std::io::Result<EntropySource> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
        match cfg {
            moat_config::RngSource::Builtin => Ok(EntropySource::Getrandom),
            moat_config::RngSource::Device(path) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
                    .open(path)?;
                let m = f.metadata()?;
                let rdev = m.rdev();
                let (major, minor) = (libc::major(rdev), libc::minor(rdev));
                if !m.file_type().is_char_device() || major != 1 || !(minor == 8 || minor == 9) {
                    return Err(std::io::Error::other(format!(
                        "{} is not the kernel's random or urandom device",
                        path.display()
                    )));
                }
                Ok(EntropySource::Device(f))
            }
        }
    }

    /// Fill as much of `buf` as the source gives now; 0 when it has
    /// nothing yet (a /dev/random or getrandom(2) still initialising).
    fn fill(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let r = match self {
                // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
                EntropySource::Getrandom => unsafe {
                    libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK)
                },
                // SAFETY: as above; the descriptor is owned by `f`.
                EntropySource::Device(f) => unsafe {
                    libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                },
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// The descriptor to poll when it had nothing (getrandom has none).
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            EntropySource::Getrandom => None,
            EntropySource::Device(f) => Some(f.as_fd()),
        }
    }
}

/// QEMU's virtio-rng rate limit: `max_bytes` per window of `period`.
#[derive(Debug)]
pub struct RngLimit {
    max_bytes: u64,
    period: Duration,
    /// Bytes left in the open window.
    quota: u64,
    /// When the open window closes (`None`: none is open).
    window_end: Option<Instant>,
}

impl RngLimit {
    pub fn new(max_bytes: u64, period: Duration) -> RngLimit {
        RngLimit {
            max_bytes,
            period,
            quota: max_bytes,
            window_end: None,
        }
    }

    /// How many of `want` bytes may go now (opening a window if none is
    /// open); when none may, the instant the window closes.
    fn allow(&mut self, want: u64, now: Instant) -> Result<u64, Instant> {
        if self.window_end.is_some_and(|end| now >= end) {
            self.window_end = None;
            self.quota = self.max_bytes;
        }
        let end = *self.window_end.get_or_insert(now + self.period);
        match want.min(self.quota) {
            0 if want > 0 => Err(end),
            n => Ok(n),
        }
    }

    fn spend(&mut self, n: u64) {
        self.quota = self.quota.saturating_sub(n);
    }
}

/// What outlives a boot: the source, the limit, the counters.
#[derive(Debug, Clone)]
pub struct RngPort {
    source: Arc<EntropySource>,
    limit: Arc<Mutex<RngLimit>>,
    /// Bytes given to the guest.
    pub bytes: Arc<AtomicU64>,
}

impl RngPort {
    pub fn open(cfg: &moat_config::RngConfig) -> std::io::Result<RngPort> {
        Ok(RngPort::new(
            EntropySource::open(&cfg.source)?,
            cfg.max_bytes,
            Duration::from_millis(u64::from(cfg.period_ms)),
        ))
    }

    pub fn new(source: EntropySource, max_bytes: u64, period: Duration) -> RngPort {
        RngPort {
            source: Arc::new(source),
            limit: Arc::new(Mutex::new(RngLimit::new(max_bytes, period))),
            bytes: Arc::default(),
        }
    }
}

/// One activation's queue and what the worker waits on.
struct Activation {
    mem: GuestMemoryMmap,
    queue: Queue,
    notify: EventFd,
    interrupt: Arc<Interrupt>,
    kill: EventFd,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    needs_reset: Arc<dyn Fn() + Send + Sync>,
}

/// The device of one boot, over an [`RngPort`].
pub struct Rng {
    thread: ActivationThread<Activation>,
}

impl Rng {
    pub fn new(port: &RngPort) -> std::io::Result<Rng> {
        let mut w = Worker {
            port: port.clone(),
            buf: vec![0; CHUNK],
        };
        let thread = ActivationThread::spawn(
            "virtio-rng".into(),
            moat_sys::role::Role::RngIo,
            move |mut a: Activation| {
                if let Err(e) = w.serve(&mut a) {
                    e.needs_reset("virtio-rng", &*a.needs_reset, &a.kill);
                }
            },
        )?;
        Ok(Rng { thread })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }

    fn features(&self) -> u64 {
        super::VIRTIO_RING_F_INDIRECT_DESC | super::VIRTIO_RING_F_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        notify: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
        _features: u64,
        needs_reset: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<()> {
        let (queue, notify) = super::one_queue(queues, notify, "virtio-rng")?;
        if !queue.ready() {
            return Ok(());
        }
        self.thread.activate(|stop| {
            Ok(Activation {
                mem,
                queue,
                notify,
                interrupt,
                kill: stop.event.try_clone()?,
                stopping: stop.flag.clone(),
                needs_reset,
            })
        })
    }

    /// Tell the worker to stop, without waiting (see `VirtioDevice::reset`).
    fn reset(&mut self) {
        self.thread.stop();
    }
}

/// What a pass over the queue left the worker waiting for.
enum Wait {
    /// A notification (or nothing: the ring is empty).
    Queue,
    /// More requests are there: go again at once.
    Again,
    /// The rate limit's window closes then.
    Until(Instant),
    /// The source had nothing: poll it (or retry getrandom later).
    Source,
}

struct Worker {
    port: RngPort,
    buf: Vec<u8>,
}

impl Worker {
    fn serve(&mut self, a: &mut Activation) -> Result<(), Broken> {
        loop {
            if a.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            let wait = self.pass(&a.mem, &mut a.queue, &a.interrupt, &a.stopping)?;
            let mut fds = vec![(efd(&a.kill), libc::POLLIN), (efd(&a.notify), libc::POLLIN)];
            let timeout = match wait {
                Wait::Again => continue,
                Wait::Queue => None,
                Wait::Until(t) => Some(t.saturating_duration_since(Instant::now())),
                Wait::Source => match self.port.source.fd() {
                    Some(fd) => {
                        fds.push((fd, libc::POLLIN));
                        None
                    }
                    None => Some(RETRY),
                },
            };
            let ready = poll(&fds, timeout);
            if ready[0] {
                return Ok(());
            }
            if ready[1] {
                let _ = a.notify.read();
            }
        }
    }

    /// Fill the requests on the ring, at most a batch; what to wait for.
    fn pass(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &mut Queue,
        interrupt: &Interrupt,
        stopping: &std::sync::atomic::AtomicBool,
    ) -> Result<Wait, Broken> {
        let mut wait = Wait::Queue;
        let mut done = 0;
        let port = &self.port;
        let buf = &mut self.buf;
        let more = drain_queue(mem, q, interrupt, |chain| {
            if done == BATCH || stopping.load(Ordering::Relaxed) {
                wait = Wait::Again;
                return Took::PutBack { more: true };
            }
            // A chain that loops or leaves RAM is returned empty.
            let Ok(mut w) = Writer::<()>::new(mem, chain) else {
                done += 1;
                return Took::Used(0);
            };
            let want = w.available_bytes().min(MAX_PER_REQUEST);
            if want == 0 {
                done += 1;
                return Took::Used(0);
            }
            let allowed = match lock(&port.limit).allow(want as u64, Instant::now()) {
                Ok(n) => n as usize,
                Err(until) => {
                    wait = Wait::Until(until);
                    return Took::PutBack { more: false };
                }
            };
            let mut written = 0;
            while written < allowed {
                let n = (allowed - written).min(buf.len());
                match port.source.fill(&mut buf[..n]) {
                    Ok(0) => break,
                    Ok(got) => {
                        // Writer::new checked the chain; a short write can
                        // only come from a buffer the guest moved meanwhile.
                        if w.write_all(&buf[..got]).is_err() {
                            break;
                        }
                        written += got;
                    }
                    Err(e) => {
                        log::warn!("virtio-rng: the entropy source failed: {e}");
                        break;
                    }
                }
            }
            if written == 0 {
                // Nothing yet: the request waits for the source.
                wait = Wait::Source;
                return Took::PutBack { more: false };
            }
            lock(&port.limit).spend(written as u64);
            port.bytes.fetch_add(written as u64, Ordering::Relaxed);
            done += 1;
            Took::Used(written as u32)
        })?;
        if more {
            wait = Wait::Again;
        }
        Ok(wait)
    }
}

/// Serve `rounds` passes over a queue the caller set up (the `virtio_rng`
/// fuzz target's way in): getrandom, a limit of `max_bytes` per second.
#[doc(hidden)]
pub fn fuzz_serve(mem: &GuestMemoryMmap, q: &mut Queue, max_bytes: u64, rounds: usize) -> bool {
    let Ok(irq) = crate::IrqLine::new() else {
        return false;
    };
    let interrupt = Interrupt::new(irq);
    let mut w = Worker {
        port: RngPort::new(EntropySource::Getrandom, max_bytes, Duration::from_secs(1)),
        buf: vec![0; CHUNK],
    };
    let stopping = std::sync::atomic::AtomicBool::new(false);
    for _ in 0..rounds {
        if w.pass(mem, q, &interrupt, &stopping).is_err() {
            return false;
        }
    }
    true
}
