//! One request model for everything that changes or queries a running VM,
//! whatever front end asks (QMP, HMP, and later others): front ends decode
//! their input once into a [`Request`], the VM's control loop serves it and
//! answers with a [`Reply`] or an [`ApiError`]; what happens on its own
//! (the guest stops, resets, a disk fails) comes back as an [`Event`].
//!
//! The types are plain data in the VM's terms; how QEMU spells them on the
//! wire (QMP's JSON shapes, HMP's text) is the front end's business. Adding
//! a command means one decoder entry in a front end and one arm in the
//! VM's handler (`moat_vmm::Machine::serve`).

use moat_config::{CacheMode, DriveConfig, RateLimit, ThrottleLimits};
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;
use std::time::Duration;

/// What a front end asks of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Stop,
    Cont,
    SystemReset,
    SystemPowerdown,
    /// End moat (the front end sends it once its own reply is on its way).
    Quit,
    QueryStatus,
    QueryCpus,
    /// The registers of one vCPU, or of all with `None` (HMP `info registers`).
    Registers(Option<u32>),
    /// Each NIC and its netdev, for HMP `info network`.
    QueryNetwork,
    QueryBlock,
    QueryBlockstats,
    /// `query-blockstats` with `query-nodes`: every named node's own.
    QueryNodeStats,
    QueryNamedBlockNodes,
    /// New limits for a drive (all zero: none), and its throttle group's
    /// name if the client gave one.
    BlockSetIoThrottle {
        drive: DriveRef,
        limits: ThrottleLimits,
        group: Option<String>,
    },
    Eject {
        drive: DriveRef,
    },
    /// QMP `block-set-write-threshold` (0: none).
    BlockSetWriteThreshold {
        node: String,
        threshold: u64,
    },
    /// Open `drive` as the block node `node`; `driver` is its top driver as
    /// the client named it (`raw`, `qcow2` or `file`).
    BlockdevAdd {
        node: String,
        driver: String,
        drive: Box<DriveConfig>,
    },
    BlockdevDel {
        node: String,
    },
    /// Link up or down for the NIC or netdev `name`.
    SetLink {
        name: String,
        up: bool,
    },
    /// The receive filters of one NIC, or of all.
    QueryRxFilter {
        name: Option<String>,
    },
    /// moat's vendor command: new rate limits for a NIC (`None`: keep
    /// that direction's).
    SetNetRateLimit {
        name: String,
        rx: Option<RateLimit>,
        tx: Option<RateLimit>,
    },
    /// The NICs with their limits and counters.
    QueryNetRateLimits,
}

/// One NIC's receive filter (QEMU's RxFilterInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilterInfo {
    pub name: String,
    pub promiscuous: bool,
    /// "normal", "none" or "all".
    pub multicast: &'static str,
    pub unicast: &'static str,
    pub vlan: &'static str,
    pub broadcast_allowed: bool,
    pub multicast_overflow: bool,
    pub unicast_overflow: bool,
    pub main_mac: [u8; 6],
    pub vlan_table: Vec<u16>,
    pub unicast_table: Vec<[u8; 6]>,
    pub multicast_table: Vec<[u8; 6]>,
}

/// One NIC's rate limits and what went through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRateInfo {
    pub name: String,
    pub rx: RateLimit,
    pub tx: RateLimit,
    pub rx_bytes: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    /// Frames each queue pair moved: (received, sent).
    pub queues: Vec<(u64, u64)>,
}

/// The VM's run state (QEMU's RunState, the part moat has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Built but never started (`-S`).
    Prelaunch,
    Running,
    Paused,
    /// Stopped by a disk's host I/O error (`werror=`/`rerror=`); `cont`
    /// retries the request.
    IoError,
}

impl RunState {
    /// QEMU's name for it (query-status).
    pub fn name(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::IoError => "io-error",
        }
    }
}

/// One vCPU (query-cpus-fast).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    pub index: u32,
    /// Host thread id of the vCPU thread.
    pub thread_id: i32,
    pub socket: u32,
    /// `None` on machines with one die per socket (QEMU leaves it out).
    pub die: Option<u32>,
    pub core: u32,
    pub thread: u32,
}

/// One image of a chain as the host sees it (QEMU's ImageInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub filename: PathBuf,
    /// `raw`, `qcow2`, or a protocol node's driver (`file`, `host_device`).
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host.
    pub actual_size: u64,
    /// What a qcow2 header says (QEMU's `cluster-size` and
    /// `format-specific`); `None` for raw images.
    pub qcow2: Option<Qcow2Info>,
    pub backing: Option<Box<ImageInfo>>,
}

/// A qcow2 image's header as QEMU reports it (ImageInfoSpecificQCow2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    pub cluster_size: u64,
    /// 2 (QEMU's compat "0.10") or 3 ("1.1").
    pub version: u32,
    /// `zstd` rather than `zlib`.
    pub zstd: bool,
    pub lazy_refcounts: bool,
    pub refcount_bits: u64,
    pub corrupt: bool,
    pub extended_l2: bool,
    /// The external data file's name as the header has it, and whether
    /// that file alone is a raw image of the disk (`data-file-raw`).
    pub data_file: Option<(String, bool)>,
    /// The backing file the header names, and its format if it says.
    pub backing: Option<(String, Option<String>)>,
}

/// A block node (QEMU's BlockDeviceInfo, without throttling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockNode {
    pub node_name: String,
    /// The node's driver (`raw`, `qcow2`, `file`, `host_device`).
    pub driver: String,
    pub read_only: bool,
    pub cache: CacheMode,
    pub image: ImageInfo,
    /// `block-set-write-threshold`'s offset, 0 when none is armed.
    pub write_threshold: u64,
}

/// A NIC with its netdev, as HMP's `info network` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInfo {
    pub mac: [u8; 6],
    pub netdev: String,
    /// `tap` or `stream`.
    pub kind: String,
    /// Each queue's name (the NIC's, for the first) and what QEMU says of
    /// the netdev's queue below it.
    pub queues: Vec<(String, String)>,
}

/// How a block command names its drive: QMP's `device` (the drive's name)
/// or `id` (the id of the device using it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveRef {
    Device(String),
    Id(String),
}

impl DriveRef {
    pub fn name(&self) -> &str {
        match self {
            DriveRef::Device(n) | DriveRef::Id(n) => n,
        }
    }
}

/// A drive with its device (query-block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub device: String,
    /// Its device as QEMU shows it (the id, else the QOM path); `None` for
    /// an `if=none` drive no device uses.
    pub qdev: Option<String>,
    /// `None`: no medium (an unused drive ejected).
    pub node: Option<BlockNode>,
    pub throttle: ThrottleLimits,
    /// The throttle group's name while limits are on.
    pub throttle_group: Option<String>,
    /// "ok", or "failed"/"nospace" while a host error keeps the VM stopped.
    pub io_status: &'static str,
}

/// A drive's I/O counters (query-blockstats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub device: String,
    /// `None`: no medium.
    pub node_name: Option<String>,
    /// As [`BlockDevice::qdev`].
    pub qdev: Option<String>,
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
    pub invalid_rd_operations: u64,
    pub invalid_wr_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub wr_highest_offset: u64,
    /// Since the last request was accounted; `None` before the first.
    pub idle_time_ns: Option<u64>,
    /// The protocol node below (its file, or its data file); `None`
    /// without a medium.
    pub file: Option<FileStats>,
    /// The layers below, top down: each one's node name and its file's.
    pub backing: Vec<(String, FileStats)>,
}

/// A node's own counters (`query-blockstats` with `query-nodes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeStats {
    /// A file: its counters.
    Protocol(FileStats),
    /// A layer: the highest offset written to it, and its primary file's.
    Format {
        node_name: String,
        wr_highest_offset: u64,
        parent: FileStats,
    },
}

/// A protocol node's own counters (QEMU's node-level stats of a file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileStats {
    pub node_name: String,
    /// `file` or `host_device`.
    pub driver: String,
    pub wr_highest_offset: u64,
    pub discard_ok: u64,
    pub discard_failed: u64,
    pub discard_bytes_ok: u64,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Done,
    Status(RunState),
    Cpus(Vec<CpuInfo>),
    Text(String),
    Network(Vec<NetInfo>),
    Block(Vec<BlockDevice>),
    BlockStats(Vec<BlockStats>),
    NodeStats(Vec<NodeStats>),
    Nodes(Vec<BlockNode>),
    RxFilters(Vec<RxFilterInfo>),
    NetRates(Vec<NetRateInfo>),
}

/// QEMU's error classes that moat uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Generic,
    DeviceNotFound,
}

/// A refused request, worded as QEMU words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct ApiError {
    pub class: ErrorClass,
    pub desc: String,
}

impl ApiError {
    pub fn generic(desc: impl Into<String>) -> Self {
        ApiError {
            class: ErrorClass::Generic,
            desc: desc.into(),
        }
    }
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        ApiError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }
}

/// What the VM reports on its own (QMP events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Stop,
    Resume,
    Powerdown,
    Reset {
        guest: bool,
        reason: &'static str,
    },
    Shutdown {
        guest: bool,
        reason: &'static str,
    },
    BlockIoError {
        device: String,
        node_name: String,
        write: bool,
        nospace: bool,
        reason: String,
        /// "report", "ignore" or "stop".
        action: &'static str,
    },
    /// A write went past the node's write threshold (now disarmed).
    BlockWriteThreshold {
        node_name: String,
        amount_exceeded: u64,
        write_threshold: u64,
    },
    /// The guest changed a NIC's receive filter (sent once until
    /// query-rx-filter is run).
    NicRxFilterChanged {
        name: Option<String>,
        path: String,
    },
}

/// Where events go (the monitors).
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);
}

/// No front end listens.
impl EventSink for () {
    fn emit(&self, _: Event) {}
}

/// A request on its way to the VM, with where its answer goes.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    pub reply: Sender<Result<Reply, ApiError>>,
}

/// How long a front end waits for the VM before giving up on a request.
/// The VM answers at once unless a vCPU is stuck, which it bounds itself.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// A front end's handle on the VM.
pub struct Client {
    send: Mutex<Box<dyn Fn(Call) -> bool + Send>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client")
    }
}

impl Client {
    /// `send` hands a call to the VM's control loop (false: it is gone).
    pub fn new(send: impl Fn(Call) -> bool + Send + 'static) -> Client {
        Client {
            send: Mutex::new(Box::new(send)),
        }
    }

    /// Ask, and wait for the answer.
    pub fn call(&self, request: Request) -> Result<Reply, ApiError> {
        let (reply, answer) = mpsc::channel();
        let sent = (self.send.lock().unwrap_or_else(|e| e.into_inner()))(Call { request, reply });
        if !sent {
            return Err(ApiError::generic("the VM is shutting down"));
        }
        answer
            .recv_timeout(ANSWER_WITHIN)
            .map_err(|_| ApiError::generic("the VM did not answer"))?
    }

    /// Ask without waiting (`quit`, once the client has its reply).
    pub fn send(&self, request: Request) {
        let (reply, _) = mpsc::channel();
        (self.send.lock().unwrap_or_else(|e| e.into_inner()))(Call { request, reply });
    }
}
