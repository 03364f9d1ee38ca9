//! The configuration of one VM: typed, validated values, and nothing that
//! parses. The command line (`moat-cli`) produces it; the VMM, the devices,
//! the block layer and the monitor consume it. One definition of each limit
//! lives here.

use std::path::PathBuf;

/// virtio-mmio devices a machine can have.
pub const MAX_VIRTIO_DEVICES: usize = 16;
/// The largest vCPU count moat accepts.
pub const MAX_CPUS: u32 = 64;
/// The smallest guest RAM moat accepts (room for the boot structures).
pub const MIN_RAM: u64 = 2 << 20;
/// The largest guest RAM moat accepts (1 TiB).
pub const MAX_RAM: u64 = 1 << 40;

/// The deepest backing chain moat opens (QEMU has no fixed limit; every
/// layer here is named on the command line, so this only bounds typos).
pub const MAX_BACKING_DEPTH: usize = 16;

/// CPU topology as QEMU's `-smp` defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub cpus: u32,
    pub sockets: u32,
    pub dies: u32,
    pub cores: u32,
    pub threads: u32,
}

/// Where a serial port's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackend {
    Stdio,
    Null,
    File(PathBuf),
    /// A listening UNIX socket; `wait` means block at startup for a client.
    UnixServer {
        path: PathBuf,
        wait: bool,
    },
}

/// Where a listening socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddr {
    Unix(PathBuf),
    Tcp {
        host: String,
        port: u16,
    },
    /// An inherited, already listening UNIX socket (`fd=N`, as libvirt passes them).
    Fd(i32),
}

/// A listening socket chardev (`-chardev socket,...` or legacy `unix:`/`tcp:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketChardev {
    pub addr: SocketAddr,
    /// Block startup until a client connects.
    pub wait: bool,
    /// `tls-creds=ID` of a `tls-creds-x509` object.
    pub tls_creds: Option<String>,
    /// `tls-authz=ID` of an `authz-simple`/`authz-list` object.
    pub tls_authz: Option<String>,
}

/// `-add-fd`: descriptor `fd` (inherited from the parent) goes into fd set `set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddFd {
    pub fd: i64,
    pub set: i64,
    pub opaque: Option<String>,
}

/// `-run-with user=`: a user name (its uid and primary gid) or `UID:GID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    User(String),
    Ids(u32, u32),
}

/// Image formats moat reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveFormat {
    Raw,
    Qcow2,
}

impl DriveFormat {
    /// QEMU's name for the format (`format=`, `backing.driver=`).
    pub fn name(self) -> &'static str {
        match self {
            DriveFormat::Raw => "raw",
            DriveFormat::Qcow2 => "qcow2",
        }
    }
}

/// Where a qcow2 layer's backing image comes from. moat never opens a
/// backing file by a name found inside an image: the user names each layer
/// with QEMU's dotted keys (`backing.driver=`, `backing.file.filename=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Nothing was said: an image that names a backing file is refused.
    Unnamed,
    /// `backing=` (empty): use no backing image; unallocated clusters read as zeroes.
    None,
    /// The layer the user named.
    Layer(Box<ImageLayer>),
}

/// One image in a chain: the drive's own image or a backing image below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayer {
    pub file: PathBuf,
    pub format: DriveFormat,
    pub backing: Backing,
    /// `data-file.filename=`: a qcow2 image's external data file.
    pub data_file: Option<PathBuf>,
}

/// `throttling.*`: I/O limits in QEMU's units (bytes or operations per second;
/// `*_max` is the burst rate, allowed for `*_max_length` seconds). Zero means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleLimits {
    pub bps: u64,
    pub bps_rd: u64,
    pub bps_wr: u64,
    pub iops: u64,
    pub iops_rd: u64,
    pub iops_wr: u64,
    pub bps_max: u64,
    pub bps_rd_max: u64,
    pub bps_wr_max: u64,
    pub iops_max: u64,
    pub iops_rd_max: u64,
    pub iops_wr_max: u64,
    pub bps_max_length: u64,
    pub bps_rd_max_length: u64,
    pub bps_wr_max_length: u64,
    pub iops_max_length: u64,
    pub iops_rd_max_length: u64,
    pub iops_wr_max_length: u64,
    /// `iops-size`: larger requests count as several operations.
    pub iops_size: u64,
}

impl Default for ThrottleLimits {
    /// No limits; burst lengths of one second, as QEMU's throttle_config_init().
    fn default() -> Self {
        ThrottleLimits {
            bps: 0,
            bps_rd: 0,
            bps_wr: 0,
            iops: 0,
            iops_rd: 0,
            iops_wr: 0,
            bps_max: 0,
            bps_rd_max: 0,
            bps_wr_max: 0,
            iops_max: 0,
            iops_rd_max: 0,
            iops_wr_max: 0,
            bps_max_length: 1,
            bps_rd_max_length: 1,
            bps_wr_max_length: 1,
            iops_max_length: 1,
            iops_rd_max_length: 1,
            iops_wr_max_length: 1,
            iops_size: 0,
        }
    }
}

/// The largest value QEMU accepts for a throttling limit.
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

impl ThrottleLimits {
    /// (average, burst, burst length) for each bucket, in QEMU's order:
    /// bps total/read/write, iops total/read/write.
    pub fn buckets(&self) -> [(u64, u64, u64); 6] {
        [
            (self.bps, self.bps_max, self.bps_max_length),
            (self.bps_rd, self.bps_rd_max, self.bps_rd_max_length),
            (self.bps_wr, self.bps_wr_max, self.bps_wr_max_length),
            (self.iops, self.iops_max, self.iops_max_length),
            (self.iops_rd, self.iops_rd_max, self.iops_rd_max_length),
            (self.iops_wr, self.iops_wr_max, self.iops_wr_max_length),
        ]
    }

    /// Every field with its `-drive throttling.` key and its QMP
    /// `block_set_io_throttle` argument name.
    pub fn fields_mut(&mut self) -> [(&'static str, &'static str, &mut u64); 19] {
        [
            ("bps-total", "bps", &mut self.bps),
            ("bps-read", "bps_rd", &mut self.bps_rd),
            ("bps-write", "bps_wr", &mut self.bps_wr),
            ("iops-total", "iops", &mut self.iops),
            ("iops-read", "iops_rd", &mut self.iops_rd),
            ("iops-write", "iops_wr", &mut self.iops_wr),
            ("bps-total-max", "bps_max", &mut self.bps_max),
            ("bps-read-max", "bps_rd_max", &mut self.bps_rd_max),
            ("bps-write-max", "bps_wr_max", &mut self.bps_wr_max),
            ("iops-total-max", "iops_max", &mut self.iops_max),
            ("iops-read-max", "iops_rd_max", &mut self.iops_rd_max),
            ("iops-write-max", "iops_wr_max", &mut self.iops_wr_max),
            (
                "bps-total-max-length",
                "bps_max_length",
                &mut self.bps_max_length,
            ),
            (
                "bps-read-max-length",
                "bps_rd_max_length",
                &mut self.bps_rd_max_length,
            ),
            (
                "bps-write-max-length",
                "bps_wr_max_length",
                &mut self.bps_wr_max_length,
            ),
            (
                "iops-total-max-length",
                "iops_max_length",
                &mut self.iops_max_length,
            ),
            (
                "iops-read-max-length",
                "iops_rd_max_length",
                &mut self.iops_rd_max_length,
            ),
            (
                "iops-write-max-length",
                "iops_wr_max_length",
                &mut self.iops_wr_max_length,
            ),
            ("iops-size", "iops_size", &mut self.iops_size),
        ]
    }

    pub fn enabled(&self) -> bool {
        self.buckets().iter().any(|b| b.0 != 0)
    }

    /// QEMU's throttle_is_valid(), with its messages.
    pub fn validate(&self) -> Result<(), String> {
        let b = self.buckets();
        if (b[0].0 != 0 && (b[1].0 != 0 || b[2].0 != 0))
            || (b[3].0 != 0 && (b[4].0 != 0 || b[5].0 != 0))
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if (b[0].1 != 0 && (b[1].1 != 0 || b[2].1 != 0))
            || (b[3].1 != 0 && (b[4].1 != 0 || b[5].1 != 0))
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if self.iops_size != 0 && b[3].0 == 0 && b[4].0 == 0 && b[5].0 == 0 {
            return Err("iops size requires an iops value to be set".into());
        }
        for (avg, max, len) in b {
            if avg > THROTTLE_VALUE_MAX || max > THROTTLE_VALUE_MAX {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if len == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if max != 0 && len > THROTTLE_VALUE_MAX / max {
                return Err("burst length too high for this burst rate".into());
            }
            if len > 1 && max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if max != 0 && avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if max != 0 && max < avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

/// `-drive cache=`: the host page cache and flush behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    Writeback,
    None,
    Writethrough,
    Directsync,
    Unsafe,
}

impl ImageLayer {
    /// This layer and every layer below it, top first.
    pub fn layers(&self) -> impl Iterator<Item = &ImageLayer> {
        std::iter::successors(Some(self), |l| match &l.backing {
            Backing::Layer(b) => Some(b),
            _ => None,
        })
    }
}

/// How QEMU names a device: by its `id=`, else by its place among the
/// devices without one (in `-device` order, whatever their kind; devices a
/// `-drive if=virtio` or `-nic` implies come after every `-device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceName {
    Id(String),
    Anonymous(usize),
}

impl DeviceName {
    /// Its path in QEMU's object tree.
    pub fn qom_path(&self) -> String {
        match self {
            DeviceName::Id(id) => format!("/machine/peripheral/{id}"),
            DeviceName::Anonymous(n) => format!("/machine/peripheral-anon/device[{n}]"),
        }
    }

    /// What the monitor shows as a drive's `qdev`: the id, else the path.
    pub fn qdev(&self) -> String {
        match self {
            DeviceName::Id(id) => id.clone(),
            DeviceName::Anonymous(_) => self.qom_path(),
        }
    }

    pub fn id(&self) -> Option<&str> {
        match self {
            DeviceName::Id(id) => Some(id),
            DeviceName::Anonymous(_) => None,
        }
    }
}

/// A disk: `-drive if=virtio`, or `-drive if=none,id=` used by `-device virtio-blk-device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// The drive's id (the monitor's device name).
    pub id: Option<String>,
    /// The virtio-blk device's name; `None` for a drive no device uses.
    pub qdev: Option<DeviceName>,
    /// Its place among the `-drive` options (the monitor lists drives in
    /// that order, as QEMU does).
    pub index: usize,
    pub file: PathBuf,
    pub format: DriveFormat,
    /// The layers below a qcow2 image, as the user named them.
    pub backing: Backing,
    pub data_file: Option<PathBuf>,
    pub throttle: ThrottleLimits,
    pub read_only: bool,
    pub cache: CacheMode,
    /// `discard=unmap` (true) or `ignore`.
    pub discard_unmap: bool,
    pub serial: Option<String>,
    /// `werror=` (default `enospc`) and `rerror=` (default `report`).
    pub werror: OnError,
    pub rerror: OnError,
    /// `-device virtio-blk-device,num-queues=` (QEMU's default for the
    /// virtio-mmio device: 1); one I/O thread each.
    pub num_queues: u16,
}

/// The most queues of one disk (QEMU allows 1024; each is a moat thread).
pub const MAX_BLK_QUEUES: u16 = 16;

/// What a host I/O error under a guest request does (QEMU's
/// BlockdevOnError, `-drive werror=,rerror=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The guest's request fails.
    Report,
    /// The guest's request succeeds as if nothing happened.
    Ignore,
    /// The VM stops (run state `io-error`); `cont` retries the request.
    Stop,
    /// Stop on ENOSPC (the host ran out of space), report anything else.
    Enospc,
}

impl OnError {
    /// QEMU's name; `read` refuses `enospc` as QEMU does.
    pub fn parse(v: &str, read: bool) -> Option<OnError> {
        match v {
            "report" => Some(OnError::Report),
            "ignore" => Some(OnError::Ignore),
            "stop" => Some(OnError::Stop),
            "enospc" if !read => Some(OnError::Enospc),
            _ => None,
        }
    }
}

/// QEMU's defaults.
pub const WERROR_DEFAULT: OnError = OnError::Enospc;
pub const RERROR_DEFAULT: OnError = OnError::Report;

impl DriveConfig {
    /// A drive without a medium: `-drive if=none,id=ID` with no file.
    pub fn empty(id: &str, index: usize) -> DriveConfig {
        DriveConfig {
            id: Some(id.to_string()),
            qdev: None,
            index,
            file: PathBuf::new(),
            format: DriveFormat::Raw,
            backing: Backing::None,
            data_file: None,
            throttle: ThrottleLimits::default(),
            read_only: true,
            cache: CacheMode::Writeback,
            discard_unmap: false,
            serial: None,
            werror: WERROR_DEFAULT,
            rerror: RERROR_DEFAULT,
            num_queues: 1,
        }
    }

    /// The drive's image as the top layer of its chain.
    pub fn layer(&self) -> ImageLayer {
        ImageLayer {
            file: self.file.clone(),
            format: self.format,
            backing: self.backing.clone(),
            data_file: self.data_file.clone(),
        }
    }
}

/// A rate limit of one direction of a network interface: token buckets
/// (see `moat_net::rate`), each with a one-time burst. Zero: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_sec: u64,
    pub bytes_burst: u64,
    pub packets_per_sec: u64,
    pub packets_burst: u64,
}

impl RateLimit {
    /// The keys that name its fields, after the direction (`rx-bps`,
    /// `tx-pps-burst`...), as the command line, QMP's arguments and its
    /// replies spell them.
    pub const KEYS: [&'static str; 4] = ["bps", "bps-burst", "pps", "pps-burst"];

    /// Its fields, in the order of [`RateLimit::KEYS`].
    pub fn fields(&self) -> [u64; 4] {
        [
            self.bytes_per_sec,
            self.bytes_burst,
            self.packets_per_sec,
            self.packets_burst,
        ]
    }

    /// Its fields, mutably, in the order of [`RateLimit::KEYS`].
    pub fn fields_mut(&mut self) -> [&mut u64; 4] {
        [
            &mut self.bytes_per_sec,
            &mut self.bytes_burst,
            &mut self.packets_per_sec,
            &mut self.packets_burst,
        ]
    }
}

/// Where a network interface's frames go (`-netdev`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// `-netdev tap`: a tap opened by name (made if missing, which needs
    /// CAP_NET_ADMIN) or handed in as descriptors, one per queue.
    Tap {
        ifname: Option<String>,
        /// Inherited descriptors (`fd=`, `fds=`).
        fds: Vec<i32>,
        queues: usize,
        /// `vnet_hdr=`: None is QEMU's default (on when the tap supports it).
        vnet_hdr: Option<bool>,
    },
    /// `-netdev stream,server=off,addr.type=unix,addr.path=`: frames over a
    /// UNIX stream socket moat connects to (passt's).
    Stream { path: PathBuf },
}

/// `-netdev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdevConfig {
    pub id: String,
    pub backend: NetBackendConfig,
}

/// The most queue pairs of one interface.
pub const MAX_NET_QUEUES: usize = 16;

/// Where a virtio-rng device's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RngSource {
    /// `-object rng-random,filename=`: `/dev/urandom` or `/dev/random`
    /// (QEMU reads any file; moat refuses others: reading an arbitrary
    /// file into a guest leaks it).
    Device(PathBuf),
    /// `-object rng-builtin` (and no `rng=`): the host kernel's getrandom(2).
    Builtin,
}

/// The device files an `rng-random` object may read.
pub const RNG_DEVICES: [&str; 2] = ["/dev/urandom", "/dev/random"];
/// QEMU's default `period` of virtio-rng: 2^16 ms.
pub const RNG_DEFAULT_PERIOD_MS: u32 = 1 << 16;
/// QEMU's default `max-bytes`: INT64_MAX (no limit in practice).
pub const RNG_DEFAULT_MAX_BYTES: u64 = i64::MAX as u64;

/// An entropy device: `-device virtio-rng-device,rng=,max-bytes=,period=`.
/// The guest gets at most `max_bytes` in each `period_ms` window (QEMU's
/// semantics: a window opens at the first request after the last one
/// closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngConfig {
    pub qdev: DeviceName,
    /// The backend object's id (`None`: the built-in one QEMU makes).
    pub object: Option<String>,
    pub source: RngSource,
    pub max_bytes: u64,
    pub period_ms: u32,
}

/// The host's CID: where every guest packet must go.
pub const VSOCK_HOST_CID: u64 = 2;
/// The highest guest CID (`u32::MAX` is VMADDR_CID_ANY).
pub const VSOCK_MAX_CID: u64 = u32::MAX as u64 - 1;

/// A host-guest socket device: `-device
/// virtio-vsock-device,guest-cid=N,uds-path=PATH` (moat's own; the
/// protocol on the host side is Firecracker's and Cloud Hypervisor's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub qdev: DeviceName,
    /// 3 ..= [`VSOCK_MAX_CID`].
    pub guest_cid: u64,
    /// moat listens here for host-initiated stream connections
    /// (`CONNECT <port>\n`); guest connections to port P go to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Where moat listens for host-initiated SEQPACKET connections.
    pub fn seqpacket_path(&self) -> PathBuf {
        let mut p = self.uds_path.clone().into_os_string();
        p.push(".seqpacket");
        PathBuf::from(p)
    }

    /// Where a guest connection to `port` goes.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.uds_path.clone().into_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }
}

/// A network interface: `-device virtio-net-device,netdev=` (or `-nic`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    pub id: Option<String>,
    pub qdev: DeviceName,
    pub netdev: NetdevConfig,
    pub mac: [u8; 6],
    /// `mq=on`: the tap's queues become queue pairs.
    pub mq: bool,
    /// `host_mtu=`: the MTU the device advises (VIRTIO_NET_F_MTU).
    pub host_mtu: Option<u16>,
    pub rx_limit: RateLimit,
    pub tx_limit: RateLimit,
}

impl NicConfig {
    /// Queue pairs the device offers.
    pub fn queue_pairs(&self) -> usize {
        match &self.netdev.backend {
            NetBackendConfig::Tap { queues, .. } if self.mq => *queues,
            _ => 1,
        }
    }
}

/// How an authorization rule compares identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchFormat {
    Exact,
    Glob,
}

/// One rule of an `authz-list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzRule {
    pub pattern: String,
    pub allow: bool,
    pub format: MatchFormat,
}

/// `-object` types moat understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// `tls-creds-x509`: `ca-cert.pem`, `server-cert.pem`, `server-key.pem` in `dir`.
    TlsCredsX509 {
        id: String,
        dir: PathBuf,
        verify_peer: bool,
    },
    /// `authz-simple`: exactly one allowed identity.
    AuthzSimple { id: String, identity: String },
    /// `authz-list`: rules in order, then the default policy.
    AuthzList {
        id: String,
        default_allow: bool,
        rules: Vec<AuthzRule>,
    },
    /// `rng-random` and `rng-builtin`: a virtio-rng backend.
    Rng { id: String, source: RngSource },
}

impl Object {
    pub fn id(&self) -> &str {
        match self {
            Object::TlsCredsX509 { id, .. }
            | Object::AuthzSimple { id, .. }
            | Object::AuthzList { id, .. }
            | Object::Rng { id, .. } => id,
        }
    }
}

/// A monitor's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// QMP.
    Control,
    /// HMP.
    Readline,
}

/// One monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    pub mode: MonitorMode,
    pub socket: SocketChardev,
}

/// The validated configuration of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// `-M microvm,acpi=`: describe the machine with ACPI (else an MP table).
    pub acpi: bool,
    /// Guest RAM in bytes (page aligned).
    pub mem_size: u64,
    /// `-M microvm,thp=`: back guest RAM with transparent huge pages
    /// (MADV_HUGEPAGE on 2 MiB-aligned RAM, as QEMU does; the default) or
    /// never (MADV_NOHUGEPAGE: a touched 4 KiB page costs the host 4 KiB, not
    /// 2 MiB, for slower guest memory access).
    pub thp: bool,
    pub smp: Topology,
    /// `None` boots the built-in demo guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: String,
    /// COM1's backend; `None` when there is no serial port.
    pub serial: Option<SerialBackend>,
    pub no_reboot: bool,
    /// `-S`: create the VM but do not run the vCPUs.
    pub start_paused: bool,
    /// `-sandbox on|off`: the seccomp allow-list and Landlock (on unless `-sandbox off`).
    pub sandbox: bool,
    /// `-sandbox on,landlock=required`: refuse to run where Landlock is missing.
    pub landlock_required: bool,
    /// `-run-with user=` (or `-runas`): who moat becomes once set up.
    pub run_as: Option<RunAs>,
    /// `-run-with chroot=` (or `-chroot`): the root moat moves into once set up.
    pub chroot: Option<PathBuf>,
    pub name: Option<String>,
    /// `-name ...,process=`: the process name shown by ps.
    pub process_name: Option<String>,
    pub pidfile: Option<PathBuf>,
    /// `-add-fd`: inherited descriptors to put in fd sets (`/dev/fdset/N`).
    pub add_fds: Vec<AddFd>,
    /// `-uuid`, in canonical lower-case form.
    pub uuid: Option<String>,
    pub monitors: Vec<MonitorConfig>,
    pub objects: Vec<Object>,
    /// virtio-blk disks, in device order.
    pub drives: Vec<DriveConfig>,
    /// `if=none` drives no device uses: opened (and locked) and listed by
    /// the monitor, as QEMU keeps them, but seen by no guest.
    pub spare_drives: Vec<DriveConfig>,
    /// `if=none` drives without a file: drives with no medium.
    pub empty_drives: Vec<DriveConfig>,
    /// virtio-net interfaces, in device order (after the disks).
    pub nics: Vec<NicConfig>,
    /// virtio-rng devices, in device order (after the interfaces).
    pub rngs: Vec<RngConfig>,
    /// The virtio-vsock device (after the rng devices).
    pub vsock: Option<VsockConfig>,
}

impl VmConfig {
    /// The UNIX sockets moat listens on by path (monitors, the serial port).
    pub fn unix_socket_paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .monitors
            .iter()
            .filter_map(|m| match &m.socket.addr {
                SocketAddr::Unix(p) => Some(p.clone()),
                SocketAddr::Tcp { .. } | SocketAddr::Fd(_) => None,
            })
            .collect();
        if let Some(SerialBackend::UnixServer { path, .. }) = &self.serial {
            v.push(path.clone());
        }
        if let Some(vs) = &self.vsock {
            v.push(vs.uds_path.clone());
            v.push(vs.seqpacket_path());
        }
        v
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            acpi: true,
            thp: true,
            mem_size: 128 << 20,
            smp: Topology {
                cpus: 1,
                sockets: 1,
                dies: 1,
                cores: 1,
                threads: 1,
            },
            kernel: None,
            initrd: None,
            append: String::new(),
            serial: Some(SerialBackend::Stdio),
            no_reboot: false,
            start_paused: false,
            name: None,
            process_name: None,
            pidfile: None,
            add_fds: Vec::new(),
            sandbox: true,
            landlock_required: false,
            run_as: None,
            chroot: None,
            uuid: None,
            monitors: Vec::new(),
            objects: Vec::new(),
            drives: Vec::new(),
            spare_drives: Vec::new(),
            empty_drives: Vec::new(),
            nics: Vec::new(),
            rngs: Vec::new(),
            vsock: None,
        }
    }
}
