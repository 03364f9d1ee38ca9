//! virtio-blk (virtio 1.2, 5.2): request parsing and execution against a
//! [`DiskImage`], on the device's own I/O thread so a slow disk never
//! stalls a vCPU.
//!
//! Every request is bounds-checked: descriptor addresses through
//! `vm-memory` (via `virtio-queue`'s Reader/Writer), sectors against the
//! image size, data lengths against the sector size. Reads go straight
//! from the image into the guest's buffers ([`DiskImage::read_slices`], in
//! batches of bounded size); writes move through a fixed-size bounce
//! buffer. Nothing is allocated at a size the guest picks.

use super::{
    ActivationThread, Interrupt, VirtioDevice, INT_VRING, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use moat_block::throttle::Throttle;
use moat_block::{BlockError, DiskImage};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

pub const SECTOR: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Largest data segment the guest may use (size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Data segments per request (seg_max): the queue size minus header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
pub const MAX_DISCARD_SEG: u32 = 32;
const BOUNCE: usize = 256 * 1024;
/// One read into guest memory covers at most this many bytes and buffers
/// (the worker looks at its stop flag between them).
const READ_BATCH_BYTES: usize = 1 << 20;
const READ_BATCH_SLICES: usize = 64;

use virtio_bindings::virtio_blk as vb;

pub const F_SIZE_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SIZE_MAX;
pub const F_SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
pub const F_RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
pub const F_BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
pub const F_FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
pub const F_DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
pub const F_WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
pub const F_MQ: u64 = 1 << vb::VIRTIO_BLK_F_MQ;

pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;

pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// The configuration space (virtio 1.2, 5.2.4), as `virtio-bindings` lays it out.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct BlkConfig(vb::virtio_blk_config);

// SAFETY: virtio_blk_config is #[repr(C, packed)] and made of integers
// and structs of integers only: no padding, and every bit pattern is a value.
unsafe impl vm_memory::ByteValued for BlkConfig {}

/// I/O counters of one drive (QMP `query-blockstats`); survive guest resets.
///
/// What QEMU's virtio-blk accounts, as it does: reads, writes (write-zeroes
/// among them, by their length) and flushes, each done, failed (a host
/// error) or invalid (a range, alignment or flag the guest got wrong), with
/// the time each took; discards and GET_ID are not accounted.
#[derive(Debug, Default)]
pub struct BlockStats {
    pub rd_bytes: AtomicU64,
    pub wr_bytes: AtomicU64,
    pub rd_operations: AtomicU64,
    pub wr_operations: AtomicU64,
    pub flush_operations: AtomicU64,
    pub failed_rd_operations: AtomicU64,
    pub failed_wr_operations: AtomicU64,
    pub failed_flush_operations: AtomicU64,
    pub invalid_rd_operations: AtomicU64,
    pub invalid_wr_operations: AtomicU64,
    pub rd_total_time_ns: AtomicU64,
    pub wr_total_time_ns: AtomicU64,
    pub flush_total_time_ns: AtomicU64,
    /// The end of the furthest write or write-zeroes sent to the image.
    pub wr_highest_offset: AtomicU64,
    /// The same for the image's writes to its file (its protocol node).
    pub file_wr_highest_offset: AtomicU64,
    /// When a request was last accounted ([`now_ns`]; 0: never).
    pub last_access_ns: AtomicU64,
    /// Discards the image made on its file: done, failed, bytes done (what
    /// QEMU's file node counts).
    pub discard_ok: AtomicU64,
    pub discard_failed: AtomicU64,
    pub discard_bytes_ok: AtomicU64,
}

/// Nanoseconds on a monotonic clock from moat's first use of it, plus one
/// (so 0 can mean "never").
pub fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// What was done about one host I/O error (QEMU's BlockErrorAction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    Report,
    Ignore,
    /// The request waits; the VM stops until `cont`, which retries it.
    Stop,
}

impl ErrorAction {
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// A host I/O error under a guest request (QMP's `BLOCK_IO_ERROR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoErrorReport {
    pub write: bool,
    /// ENOSPC: the host ran out of space.
    pub nospace: bool,
    /// strerror() text, as QEMU reports it.
    pub reason: String,
    pub action: ErrorAction,
}

/// A drive's `io-status` (query-block): ok, or why it stopped the VM.
pub const IO_STATUS_OK: u8 = 0;
pub const IO_STATUS_FAILED: u8 = 1;
pub const IO_STATUS_NOSPACE: u8 = 2;

/// Where a drive's I/O errors go; set once the monitor exists.
pub type ErrorSink = Arc<std::sync::OnceLock<Box<dyn Fn(IoErrorReport) + Send + Sync>>>;

/// Told (amount exceeded, threshold) when a write passes the drive's write
/// threshold (QMP `BLOCK_WRITE_THRESHOLD`).
/// Told (protocol node?, amount exceeded, threshold) when a write threshold is passed.
pub type ThresholdSink = Arc<std::sync::OnceLock<Box<dyn Fn(bool, u64, u64) + Send + Sync>>>;

/// What a drive's device shares with the rest of moat, across guest resets.
#[derive(Clone)]
pub struct DriveLink {
    pub stats: Arc<BlockStats>,
    pub throttle: Arc<Throttle>,
    pub errors: ErrorSink,
    /// `werror=` and `rerror=`.
    pub werror: moat_config::OnError,
    pub rerror: moat_config::OnError,
    /// One per queue, written when the VM runs again (`cont`): a request
    /// that stopped it is retried.
    pub resume: Arc<Vec<EventFd>>,
    /// `IO_STATUS_*`, reset to ok by `cont`.
    pub io_status: Arc<std::sync::atomic::AtomicU8>,
    /// QMP `block-set-write-threshold`'s offset (0: none) on the drive's
    /// node, and on its protocol (file) node (file offsets: for qcow2 its
    /// own metadata and data writes).
    pub write_threshold: Arc<AtomicU64>,
    pub file_threshold: Arc<AtomicU64>,
    pub threshold_sink: ThresholdSink,
}

impl std::fmt::Debug for DriveLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriveLink")
            .field("stats", &self.stats)
            .field("throttle", &self.throttle)
            .finish()
    }
}

impl DriveLink {
    /// The device is about to write, zero or discard `[offset,
    /// offset+len)` of the drive: QEMU's `bdrv_write_threshold_check_write`
    /// (one that ends past the threshold raises `BLOCK_WRITE_THRESHOLD`
    /// once and disarms it, so a guest cannot flood the monitor), and the
    /// highest offset written (not by a discard).
    pub fn guest_write(&self, offset: u64, len: u64, discard: bool) {
        let end = offset.saturating_add(len);
        self.pass_threshold(false, end);
        if !discard {
            self.stats
                .wr_highest_offset
                .fetch_max(end, Ordering::Relaxed);
        }
    }

    /// The image wrote, zeroed or discarded `[offset, offset+len)` of its
    /// file (moat_block's write watch): the protocol node's threshold,
    /// highest offset and discard counts.
    pub fn file_write(&self, offset: u64, len: u64, discard: bool, ok: bool) {
        let end = offset.saturating_add(len);
        self.pass_threshold(true, end);
        let st = &self.stats;
        match (discard, ok) {
            (false, _) => {
                st.file_wr_highest_offset.fetch_max(end, Ordering::Relaxed);
            }
            (true, true) => {
                bump(&st.discard_ok, 1);
                bump(&st.discard_bytes_ok, len);
            }
            (true, false) => bump(&st.discard_failed, 1),
        }
    }

    /// A write ending at `end`: the drive's node's threshold, or its
    /// file's, raises the event once and disarms.
    fn pass_threshold(&self, file: bool, end: u64) {
        let armed = if file {
            &self.file_threshold
        } else {
            &self.write_threshold
        };
        let t = armed.load(Ordering::SeqCst);
        if t > 0
            && end > t
            && armed
                .compare_exchange(t, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            if let Some(sink) = self.threshold_sink.get() {
                sink(file, end - t, t);
            }
        }
    }

    pub fn new(
        limits: moat_block::throttle::ThrottleLimits,
        werror: moat_config::OnError,
        rerror: moat_config::OnError,
        queues: u16,
    ) -> std::io::Result<DriveLink> {
        let resume = (0..queues.max(1))
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<_>>()?;
        Ok(DriveLink {
            stats: Arc::default(),
            throttle: Arc::new(Throttle::new(limits)),
            errors: Arc::default(),
            werror,
            rerror,
            resume: Arc::new(resume),
            io_status: Arc::default(),
            write_threshold: Arc::default(),
            file_threshold: Arc::default(),
            threshold_sink: Arc::default(),
        })
    }

    /// What QEMU does about a host error (blk_get_error_action).
    pub fn action(&self, write: bool, nospace: bool) -> ErrorAction {
        use moat_config::OnError;
        match if write { self.werror } else { self.rerror } {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc if nospace => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
        }
    }

    /// The VM runs again: requests that stopped it are retried.
    pub fn resumed(&self) {
        self.io_status.store(IO_STATUS_OK, Ordering::SeqCst);
        for r in self.resume.iter() {
            let _ = r.write(1);
        }
    }
}

/// How a drive handles `discard` requests (`-drive discard=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    Unmap,
    Ignore,
}

/// One activation of the device, handed to its I/O thread.
struct Activation {
    worker: Worker,
    notify: EventFd,
    needs_reset: Arc<dyn Fn() + Send + Sync>,
}

/// The virtio-blk device model.
pub struct Block {
    disk: Arc<dyn DiskImage>,
    link: DriveLink,
    serial: [u8; 20],
    discard: Discard,
    /// One I/O thread per queue.
    io: Vec<ActivationThread<Activation>>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Block {{ disk: {:?} }}", self.disk)
    }
}

impl Block {
    pub fn new(
        disk: Arc<dyn DiskImage>,
        serial: &str,
        discard: Discard,
        link: DriveLink,
    ) -> std::io::Result<Self> {
        let mut s = [0u8; 20];
        let n = serial.len().min(20);
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let io = (0..link.resume.len())
            .map(|_| {
                ActivationThread::spawn(
                    "virtio-blk".into(),
                    moat_sys::role::Role::BlockIo,
                    |mut a: Activation| a.worker.run(&a.notify, &*a.needs_reset),
                )
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Block {
            disk,
            link,
            serial: s,
            discard,
            io,
        })
    }

    fn config(&self) -> BlkConfig {
        let max_sectors = u32::MAX / SECTOR as u32;
        BlkConfig(vb::virtio_blk_config {
            capacity: self.disk.size() / SECTOR,
            size_max: SIZE_MAX,
            seg_max: SEG_MAX,
            blk_size: SECTOR as u32,
            num_queues: self.io.len() as u16,
            max_discard_sectors: max_sectors,
            max_discard_seg: MAX_DISCARD_SEG,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: max_sectors,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            ..Default::default()
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        let mut f = F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX;
        if self.io.len() > 1 {
            f |= F_MQ;
        }
        if self.disk.read_only() {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.io.len()]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        notify: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
        _acked_features: u64,
        needs_reset: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<()> {
        if queues.len() != self.io.len() || notify.len() != queues.len() {
            return Err(std::io::Error::other("virtio-blk: wrong number of queues"));
        }
        // (Without MQ the driver uses queue 0 alone; the others stay idle.)
        for (index, ((queue, notify), io)) in queues
            .into_iter()
            .zip(notify)
            .zip(self.io.iter_mut())
            .enumerate()
        {
            if !queue.ready() {
                continue;
            }
            let disk = self.disk.clone();
            let (serial, discard, link) = (self.serial, self.discard, self.link.clone());
            let (mem, interrupt, needs_reset) =
                (mem.clone(), interrupt.clone(), needs_reset.clone());
            io.activate(|stop| {
                let worker = Worker {
                    mem,
                    queue,
                    index,
                    disk,
                    serial,
                    discard,
                    interrupt,
                    // Room to start the buffer on a 4 KiB boundary (O_DIRECT, cache=none).
                    bounce: vec![0u8; BOUNCE + 4096],
                    link,
                    kill: stop.event.try_clone()?,
                    stopping: stop.flag.clone(),
                };
                Ok(Activation {
                    worker,
                    notify,
                    needs_reset,
                })
            })?;
        }
        Ok(())
    }

    /// Tell the worker to stop, without waiting for it: a vCPU must never
    /// wait for a disk. The worker stops before its next request or
    /// bounce-buffer chunk and posts nothing more to the old queue; the
    /// next activation starts only after it has stopped.
    fn reset(&mut self) {
        for io in &mut self.io {
            io.stop();
        }
    }
}

/// Everything the I/O thread owns.
pub struct Worker {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    /// Which of the device's queues.
    pub index: usize,
    pub disk: Arc<dyn DiskImage>,
    pub serial: [u8; 20],
    pub discard: Discard,
    pub interrupt: Arc<Interrupt>,
    pub bounce: Vec<u8>,
    pub link: DriveLink,
    /// Written when the device resets: a throttled request stops waiting.
    pub kill: EventFd,
    /// Set when the device resets: checked between requests and chunks.
    pub stopping: Arc<AtomicBool>,
}

#[derive(Debug)]
enum ReqError {
    Status(u8),
    /// The guest got the request's range, alignment or flags wrong: this
    /// status, and QEMU's "invalid" count.
    Invalid(u8),
    /// The device was reset while the request ran: nothing more is posted.
    Stopped,
    /// The host failed the image I/O (not the guest's mistake): what
    /// happens is `werror=`/`rerror=`'s call.
    Host {
        write: bool,
        errno: Option<i32>,
        reason: String,
    },
}

/// How a request ended.
enum Outcome {
    /// Answered; this many bytes written to the guest's buffers.
    Done(u32),
    /// The device was reset meanwhile: nothing more is posted.
    Stopped,
    /// A host error stopped the VM: the request goes back on the ring and
    /// is tried again when the VM runs.
    Retry,
}

impl From<BlockError> for ReqError {
    fn from(e: BlockError) -> Self {
        log::debug!("virtio-blk: {e}");
        ReqError::Status(S_IOERR)
    }
}

impl From<std::io::Error> for ReqError {
    fn from(_: std::io::Error) -> Self {
        ReqError::Status(S_IOERR)
    }
}

/// A host I/O error of the image (not a guest mistake such as a sector
/// out of range or a write to a read-only drive).
fn host_error(write: bool, e: BlockError) -> ReqError {
    match &e {
        BlockError::Io(io) => {
            let errno = io.raw_os_error();
            let reason = match errno {
                // SAFETY: strerror returns a pointer to a static or
                // thread-local NUL-terminated string, copied at once.
                Some(n) => unsafe { std::ffi::CStr::from_ptr(libc::strerror(n)) }
                    .to_string_lossy()
                    .into_owned(),
                None => io.to_string(),
            };
            ReqError::Host {
                write,
                errno,
                reason,
            }
        }
        _ => ReqError::from(e),
    }
}

/// One discard or write-zeroes segment (virtio 1.2, 5.2.6).
#[derive(Debug, Clone, Copy, Default)]
struct Segment {
    sector: u64,
    sectors: u32,
    flags: u32,
}

/// The bytes `segs` cover (what write-zeroes is throttled and accounted by).
fn segments_bytes(segs: &[Segment]) -> u64 {
    segs.iter()
        .fold(0u64, |a, s| a.saturating_add(u64::from(s.sectors) * SECTOR))
}

/// Copy the request's segments out of guest memory into `segs` (at most
/// [`MAX_DISCARD_SEG`], a whole number of 16-byte segments); how many.
fn read_segments(reader: &mut Reader<'_>, segs: &mut [Segment]) -> Result<usize, ReqError> {
    let len = reader.available_bytes();
    let n = len / 16;
    if n == 0 || n > segs.len() || !len.is_multiple_of(16) {
        return Err(ReqError::Status(S_IOERR));
    }
    for seg in segs.iter_mut().take(n) {
        let mut b = [0u8; 16];
        reader.read_exact(&mut b)?;
        *seg = Segment {
            sector: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            sectors: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        };
    }
    Ok(n)
}

/// The part of `buf` that starts on a 4 KiB boundary (all of it when the
/// buffer is too small to align), so O_DIRECT images can use it as is.
fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let off = buf.as_ptr().align_offset(4096);
    if buf.len() > off + 4096 {
        let usable = (buf.len() - off) & !4095;
        &mut buf[off..off + usable]
    } else {
        buf
    }
}

/// Wait until one of the eventfds is readable (or `timeout` passes); which are.
fn wait(fds: &[&EventFd], timeout: Option<std::time::Duration>) -> Vec<bool> {
    let fds: Vec<_> = fds.iter().map(|e| (super::efd(e), libc::POLLIN)).collect();
    super::poll(&fds, timeout)
}

impl Worker {
    fn run(&mut self, notify: &EventFd, needs_reset: &(dyn Fn() + Send + Sync)) {
        loop {
            let ready = wait(&[notify, &self.kill], None);
            if ready[1] {
                return;
            }
            let _ = notify.read();
            if let Err(e) = self.process_queue() {
                // Guest-triggered: debug level, so a guest cannot flood the host log.
                log::debug!(
                    "virtio-blk: the driver broke the queue protocol ({e:?}); device needs reset"
                );
                needs_reset();
                let _ = wait(&[&self.kill], None);
                return;
            }
        }
    }

    /// Serve every available request; interrupt the guest if it wants that.
    pub fn process_queue(&mut self) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.clone();
        loop {
            self.queue.disable_notification(&mem)?;
            while let Some(chain) = super::next_chain(&mem, &mut self.queue)? {
                if self.stopped() {
                    return Ok(()); // the device is resetting
                }
                let head = chain.head_index();
                match self.request(&mem, chain) {
                    Outcome::Done(len) => self.queue.add_used(&mem, head, len)?,
                    Outcome::Stopped => return Ok(()),
                    Outcome::Retry => {
                        // Back on the ring, and later requests behind it:
                        // they run in order once the VM runs again.
                        self.queue.go_to_previous_position();
                        if self.queue.needs_notification(&mem)? {
                            self.interrupt.trigger(INT_VRING);
                        }
                        let resume = &self.link.resume[self.index];
                        if wait(&[resume, &self.kill], None)[1] {
                            return Ok(());
                        }
                        let _ = resume.read();
                    }
                }
            }
            // (The driver may have published more since: look again.)
            if !self.queue.enable_notification(&mem)? {
                break;
            }
        }
        if self.queue.needs_notification(&mem)? {
            self.interrupt.trigger(INT_VRING);
        }
        Ok(())
    }

    /// The device was reset: leave the queue as it is.
    fn stopped(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Wait until the throttle lets a request of `bytes` start; false if
    /// the device was reset meanwhile.
    fn throttle(&self, write: bool, bytes: u64) -> bool {
        while let Some(d) = self
            .link
            .throttle
            .admit(write, bytes, std::time::Instant::now())
        {
            let d = d.clamp(
                std::time::Duration::from_millis(1),
                std::time::Duration::from_secs(1),
            );
            if wait(&[&self.kill], Some(d))[0] {
                return false;
            }
        }
        true
    }

    /// Execute one request.
    fn request(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Outcome {
        let (Ok(mut reader), Ok(mut writer)) = (
            Reader::<()>::new(mem, chain.clone()),
            Writer::<()>::new(mem, chain.clone()),
        ) else {
            return Outcome::Done(0);
        };
        let total = writer.available_bytes();
        if total == 0 {
            return Outcome::Done(0); // nowhere to put the status
        }
        let Ok(mut status_w) = writer.split_at(total - 1) else {
            return Outcome::Done(0);
        };
        // The header is copied out of guest memory once: what picks the
        // throttle bucket is what runs (another vCPU may rewrite it).
        let mut hdr = [0u8; 16];
        if reader.read_exact(&mut hdr).is_err() {
            if status_w.write_all(&[S_IOERR]).is_err() {
                return Outcome::Done(0);
            }
            return Outcome::Done(1);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        // Discard and write-zeroes segments, also copied once.
        let mut segs = [Segment::default(); MAX_DISCARD_SEG as usize];
        let nsegs = match kind {
            T_DISCARD | T_WRITE_ZEROES => read_segments(&mut reader, &mut segs),
            _ => Ok(0),
        };
        // What QEMU's throttling counts: reads, writes, and write-zeroes as
        // writes of their length; flushes, discards and GET_ID are free.
        let admitted = match (kind, &nsegs) {
            (T_IN, _) => self.throttle(false, writer.available_bytes() as u64),
            (T_OUT, _) => self.throttle(true, reader.available_bytes() as u64),
            (T_WRITE_ZEROES, Ok(n)) => self.throttle(true, segments_bytes(&segs[..*n])),
            _ => true,
        };
        if !admitted {
            return Outcome::Stopped;
        }
        let started = now_ns();
        let nseg = *nsegs.as_ref().unwrap_or(&0);
        let result = match nsegs {
            Ok(n) => self.execute(
                mem,
                &chain,
                kind,
                sector,
                &segs[..n],
                &mut reader,
                &mut writer,
            ),
            Err(e) => Err(e),
        };
        let mut written = 0;
        let mut invalid = false;
        let status = match result {
            Ok(n) => {
                written = n;
                S_OK
            }
            Err(ReqError::Status(s)) => s,
            Err(ReqError::Invalid(s)) => {
                invalid = true;
                s
            }
            Err(ReqError::Stopped) => return Outcome::Stopped,
            Err(ReqError::Host {
                write,
                errno,
                reason,
            }) => {
                let nospace = errno == Some(libc::ENOSPC);
                let action = self.link.action(write, nospace);
                if action == ErrorAction::Stop {
                    // A `cont` before this error must not retry it at once.
                    let _ = self.link.resume[self.index].read();
                    let st = if nospace {
                        IO_STATUS_NOSPACE
                    } else {
                        IO_STATUS_FAILED
                    };
                    self.link.io_status.store(st, Ordering::SeqCst);
                }
                if let Some(sink) = self.link.errors.get() {
                    sink(IoErrorReport {
                        write,
                        nospace,
                        reason,
                        action,
                    });
                }
                match action {
                    ErrorAction::Report => S_IOERR,
                    ErrorAction::Ignore => S_OK,
                    ErrorAction::Stop => return Outcome::Retry,
                }
            }
        };
        self.account(kind, &segs[..nseg], status, invalid, started, || {
            // (Bytes moved: what the guest read, or wrote after the header.)
            if kind == T_IN {
                written as u64
            } else {
                reader.bytes_read().saturating_sub(16) as u64
            }
        });
        if status_w.write_all(&[status]).is_err() {
            return Outcome::Done(0);
        }
        Outcome::Done((written + 1) as u32)
    }

    /// Count a finished request as QEMU's virtio-blk does (see
    /// [`BlockStats`]): write-zeroes as writes of their `segs`' length,
    /// discards and the rest not at all; `bytes` moved, for reads and writes.
    fn account(
        &self,
        kind: u32,
        segs: &[Segment],
        status: u8,
        invalid: bool,
        started: u64,
        bytes: impl FnOnce() -> u64,
    ) {
        let st = &self.link.stats;
        let (done, failed, bad, moved, time) = match kind {
            T_IN => (
                &st.rd_operations,
                &st.failed_rd_operations,
                Some(&st.invalid_rd_operations),
                Some((&st.rd_bytes, bytes())),
                &st.rd_total_time_ns,
            ),
            T_OUT => (
                &st.wr_operations,
                &st.failed_wr_operations,
                Some(&st.invalid_wr_operations),
                Some((&st.wr_bytes, bytes())),
                &st.wr_total_time_ns,
            ),
            T_WRITE_ZEROES if !segs.is_empty() => (
                &st.wr_operations,
                &st.failed_wr_operations,
                Some(&st.invalid_wr_operations),
                Some((&st.wr_bytes, segments_bytes(segs))),
                &st.wr_total_time_ns,
            ),
            // (A flush cannot be invalid.)
            T_FLUSH => (
                &st.flush_operations,
                &st.failed_flush_operations,
                None,
                None,
                &st.flush_total_time_ns,
            ),
            _ => return,
        };
        let now = now_ns();
        if invalid {
            if let Some(bad) = bad {
                bump(bad, 1);
            }
        } else {
            if status == S_OK {
                bump(done, 1);
                if let Some((counter, n)) = moved {
                    bump(counter, n);
                }
            } else {
                bump(failed, 1);
            }
            bump(time, now.saturating_sub(started));
        }
        st.last_access_ns.store(now, Ordering::Relaxed);
    }

    /// Data of a read or write: whole sectors, inside the image.
    fn check_data(&self, offset: u64, len: u64) -> Result<(), ReqError> {
        if !len.is_multiple_of(SECTOR)
            || moat_block::check_range(offset, len, self.disk.size()).is_err()
        {
            return Err(ReqError::Invalid(S_IOERR));
        }
        Ok(())
    }

    /// Execute a request; how many bytes went into the guest's buffers
    /// (before the status byte).
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &DescriptorChain<&GuestMemoryMmap>,
        kind: u32,
        sector: u64,
        segs: &[Segment],
        reader: &mut Reader<'_>,
        writer: &mut Writer<'_>,
    ) -> Result<usize, ReqError> {
        let offset = sector.checked_mul(SECTOR);
        let offset = match kind {
            T_IN | T_OUT => offset.ok_or(ReqError::Invalid(S_IOERR))?,
            _ => offset.unwrap_or(0),
        };
        match kind {
            T_IN => {
                let len = writer.available_bytes();
                self.check_data(offset, len as u64)?;
                self.read_into_guest(mem, chain, offset, len)?;
                Ok(len)
            }
            T_OUT => {
                let len = reader.available_bytes() as u64;
                self.check_data(offset, len)?;
                if self.disk.read_only() {
                    return Err(ReqError::Status(S_IOERR));
                }
                self.link.guest_write(offset, len, false);
                let mut done = 0u64;
                let bounce = aligned(&mut self.bounce);
                while done < len {
                    if self.stopping.load(Ordering::Relaxed) {
                        return Err(ReqError::Stopped);
                    }
                    let n = (len - done).min(bounce.len() as u64) as usize;
                    reader.read_exact(&mut bounce[..n])?;
                    self.disk
                        .write_at(&bounce[..n], offset + done)
                        .map_err(|e| host_error(true, e))?;
                    done += n as u64;
                }
                Ok(0)
            }
            T_FLUSH => {
                self.disk.flush().map_err(|e| host_error(true, e))?;
                Ok(0)
            }
            T_GET_ID => {
                let n = writer.available_bytes().min(20);
                writer.write_all(&self.serial[..n])?;
                Ok(n)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                // Every segment checked first (the guest's mistakes), then
                // the drive (a read-only one fails the request, as QEMU's
                // block layer does), then done.
                let size = self.disk.size();
                let checked = |seg: &Segment| {
                    let num = u64::from(seg.sectors) * SECTOR;
                    let flags_ok =
                        seg.flags & !1 == 0 && (kind == T_WRITE_ZEROES || seg.flags == 0);
                    let start = seg.sector.checked_mul(SECTOR);
                    match start.filter(|&s| moat_block::check_range(s, num, size).is_ok()) {
                        _ if !flags_ok => Err(ReqError::Invalid(S_UNSUPP)),
                        Some(start) => Ok((start, num)),
                        None => Err(ReqError::Invalid(S_IOERR)),
                    }
                };
                for seg in segs {
                    checked(seg)?;
                }
                if self.disk.read_only() {
                    return Err(ReqError::Status(S_IOERR));
                }
                for seg in segs {
                    let (start, num) = checked(seg)?;
                    let r = if kind == T_WRITE_ZEROES {
                        self.link.guest_write(start, num, false);
                        self.disk.write_zeroes(start, num)
                    } else if self.discard == Discard::Unmap {
                        self.link.guest_write(start, num, true);
                        self.disk.discard(start, num)
                    } else {
                        Ok(())
                    };
                    r.map_err(|e| host_error(true, e))?;
                }
                Ok(0)
            }
            _ => Err(ReqError::Status(S_UNSUPP)),
        }
    }

    /// Read `len` bytes of the image at `offset` into the chain's writable
    /// buffers, in order (the status byte after them is not touched), in
    /// batches of at most [`READ_BATCH_BYTES`] and [`READ_BATCH_SLICES`].
    /// The chain is walked again here (the guest may have rewritten it since
    /// the Writer measured it): what does not add up is an I/O error.
    fn read_into_guest(
        &self,
        mem: &GuestMemoryMmap,
        chain: &DescriptorChain<&GuestMemoryMmap>,
        offset: u64,
        len: usize,
    ) -> Result<(), ReqError> {
        let mut batch: Vec<VolatileSlice<'_>> = Vec::with_capacity(READ_BATCH_SLICES);
        let mut batch_bytes = 0;
        let mut at = offset;
        let mut left = len;
        let read = |batch: &mut Vec<VolatileSlice<'_>>, at: u64| -> Result<(), ReqError> {
            if self.stopping.load(Ordering::Relaxed) {
                return Err(ReqError::Stopped);
            }
            self.disk
                .read_slices(batch, at)
                .map_err(|e| host_error(false, e))?;
            batch.clear();
            Ok(())
        };
        for desc in chain.clone().filter(|d| d.is_write_only()) {
            if left == 0 {
                break;
            }
            let want = (desc.len() as usize).min(left);
            for slice in mem.get_slices(desc.addr(), want) {
                let mut slice = slice.map_err(|_| ReqError::Status(S_IOERR))?;
                while !slice.is_empty() {
                    let n = slice.len().min(READ_BATCH_BYTES - batch_bytes);
                    let (head, tail) = slice.split_at(n).map_err(|_| ReqError::Status(S_IOERR))?;
                    batch.push(head);
                    batch_bytes += n;
                    left -= n;
                    slice = tail;
                    if batch_bytes == READ_BATCH_BYTES || batch.len() == READ_BATCH_SLICES {
                        read(&mut batch, at)?;
                        at += batch_bytes as u64;
                        batch_bytes = 0;
                    }
                }
            }
        }
        if !batch.is_empty() {
            read(&mut batch, at)?;
        }
        if left != 0 {
            return Err(ReqError::Status(S_IOERR));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IrqLine;
    use moat_block::MemImage;
    use vm_memory::{Bytes, GuestAddress};

    fn worker(mem: &GuestMemoryMmap, disk: Arc<dyn DiskImage>) -> Worker {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(8);
        q.set_desc_table_address(Some(0x1000), None);
        q.set_avail_ring_address(Some(0x2000), None);
        q.set_used_ring_address(Some(0x3000), None);
        q.set_ready(true);
        Worker {
            mem: mem.clone(),
            queue: q,
            disk,
            serial: *b"unit-test-serial-000",
            discard: Discard::Unmap,
            interrupt: Arc::new(Interrupt::new(IrqLine::new().unwrap())),
            bounce: vec![0; 4096],
            index: 0,
            link: DriveLink::new(
                Default::default(),
                moat_config::WERROR_DEFAULT,
                moat_config::RERROR_DEFAULT,
                1,
            )
            .unwrap(),
            kill: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            stopping: Arc::default(),
        }
    }

    /// QEMU's blk_get_error_action: enospc stops on ENOSPC only; the
    /// others do what they say whatever the error.
    #[test]
    fn error_actions_follow_werror_and_rerror() {
        use moat_config::OnError::*;
        let link = |w, r| DriveLink::new(Default::default(), w, r, 1).unwrap();
        let l = link(Enospc, Report);
        assert_eq!(l.action(true, true), ErrorAction::Stop);
        assert_eq!(l.action(true, false), ErrorAction::Report);
        assert_eq!(l.action(false, true), ErrorAction::Report);
        let l = link(Ignore, Stop);
        assert_eq!(l.action(true, true), ErrorAction::Ignore);
        assert_eq!(l.action(false, false), ErrorAction::Stop);
        assert_eq!(link(Report, Report).action(true, true), ErrorAction::Report);
    }

    fn desc(mem: &GuestMemoryMmap, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let a = 0x1000 + i * 16;
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    #[test]
    fn read_request_round_trip() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let disk = Arc::new(MemImage::new(
            (0..4096u32).map(|i| i as u8).collect(),
            false,
        ));
        let mut w = worker(&mem, disk);
        // Header at 0x4000 (IN, sector 1), data at 0x5000 (512 bytes), status at 0x6000.
        mem.write_obj(T_IN, GuestAddress(0x4000)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x4008)).unwrap();
        desc(&mem, 0, 0x4000, 16, 1, 1);
        desc(&mem, 1, 0x5000, 512, 1 | 2, 2);
        desc(&mem, 2, 0x6000, 1, 2, 0);
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap(); // ring[0] = head 0
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap(); // avail idx = 1
        w.process_queue().unwrap();
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x5000)).unwrap();
        assert_eq!(data[0], 0); // byte 512 of the disk is (512 as u8) == 0
        assert_eq!(data[1], 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x6000)).unwrap(), S_OK);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 1); // used idx
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3008)).unwrap(), 513); // used len
        assert_eq!(w.link.stats.rd_bytes.load(Ordering::Relaxed), 512);
    }

    /// A read into buffers of odd sizes, one crossing from one guest memory
    /// region into the next and one holding the status byte after its data,
    /// from a raw file (the preadv path).
    #[test]
    fn a_read_fills_buffers_across_regions_and_leaves_the_status_byte() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x8000),
            (GuestAddress(0x8000), 0x8000),
        ])
        .unwrap();
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let path = std::env::temp_dir().join(format!("moat-blk-read-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let disk = Arc::new(moat_block::RawImage::new(file, true).unwrap());
        let mut w = worker(&mem, disk);
        mem.write_obj(T_IN, GuestAddress(0x4000)).unwrap();
        mem.write_obj(2u64, GuestAddress(0x4008)).unwrap(); // sector 2
        mem.write_obj(0xeeu8, GuestAddress(0x5100)).unwrap();
        desc(&mem, 0, 0x4000, 16, 1, 1);
        desc(&mem, 1, 0x7f00, 0x300, 1 | 2, 2); // crosses 0x8000
        desc(&mem, 2, 0x5000, 0x101, 2, 0); // 0x100 of data, then the status
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        w.process_queue().unwrap();
        let mut got = vec![0u8; 0x400];
        mem.read_slice(&mut got[..0x300], GuestAddress(0x7f00))
            .unwrap();
        mem.read_slice(&mut got[0x300..], GuestAddress(0x5000))
            .unwrap();
        assert!(got == bytes[1024..2048], "the data differs");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5100)).unwrap(), S_OK);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3008)).unwrap(), 0x401); // used len
        assert_eq!(w.link.stats.rd_bytes.load(Ordering::Relaxed), 1024);
    }

    /// A request at 0x4000 with data descriptors, status at 0x6000.
    fn submit(mem: &GuestMemoryMmap, w: &mut Worker, kind: u32, data: &[(u64, u32, bool)]) -> u8 {
        mem.write_obj(kind, GuestAddress(0x4000)).unwrap();
        mem.write_obj(0u64, GuestAddress(0x4008)).unwrap();
        desc(mem, 0, 0x4000, 16, 1, 1);
        for (i, &(addr, len, writable)) in data.iter().enumerate() {
            let i = i as u64 + 1;
            desc(
                mem,
                i,
                addr,
                len,
                1 | if writable { 2 } else { 0 },
                i as u16 + 1,
            );
        }
        let last = data.len() as u64 + 1;
        desc(mem, last, 0x6000, 1, 2, 0);
        let idx: u16 = mem.read_obj(GuestAddress(0x2002)).unwrap();
        mem.write_obj(0u16, GuestAddress(0x2004 + 2 * u64::from(idx % 8)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(0x2002))
            .unwrap();
        w.process_queue().unwrap();
        mem.read_obj::<u8>(GuestAddress(0x6000)).unwrap()
    }

    /// QEMU throttles write-zeroes as writes of their length (and counts
    /// them as write operations); it did not count here at all.
    #[test]
    fn write_zeroes_is_throttled_and_counted_as_a_write() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let disk = Arc::new(MemImage::new(vec![0xaa; 64 << 20], false));
        let mut w = worker(&mem, disk.clone());
        w.link.throttle.set(moat_block::throttle::ThrottleLimits {
            bps_wr: 1 << 20,
            ..Default::default()
        });
        // One segment: all 64 MiB (131072 sectors) from sector 0.
        mem.write_obj(0u64, GuestAddress(0x5000)).unwrap();
        mem.write_obj(131_072u32, GuestAddress(0x5008)).unwrap();
        mem.write_obj(0u32, GuestAddress(0x500c)).unwrap();
        assert_eq!(
            submit(&mem, &mut w, T_WRITE_ZEROES, &[(0x5000, 16, false)]),
            S_OK
        );
        let mut b = [0u8; 4];
        disk.read_at(&mut b, 12345).unwrap();
        assert_eq!(b, [0; 4]);
        // 64 MiB charged against 1 MiB/s: the next write must wait.
        let wait = w.link.throttle.admit(true, 512, std::time::Instant::now());
        assert!(
            wait.is_some(),
            "write-zeroes was not charged to the write bucket"
        );
        assert_eq!(w.link.stats.wr_operations.load(Ordering::Relaxed), 1);
        // Reads are not affected.
        assert!(w
            .link
            .throttle
            .admit(false, 512, std::time::Instant::now())
            .is_none());
    }

    #[test]
    fn an_avail_index_too_far_ahead_is_an_error_not_a_spin() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut w = worker(&mem, Arc::new(MemImage::new(vec![0; 4096], false)));
        mem.write_obj(100u16, GuestAddress(0x2002)).unwrap(); // claims 100 requests in an 8-entry ring
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(w.process_queue().is_err());
        });
        let errored = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("process_queue spun instead of failing");
        assert!(errored);
    }
}
