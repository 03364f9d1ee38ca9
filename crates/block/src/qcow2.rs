//! qcow2 images: imago does the format, this module guards the door.
//!
//! The qcow2 driver is the `imago` crate (sync build, written by a QEMU
//! block-layer maintainer): L1/L2 tables, cluster allocation, refcounts of
//! every order, zero and compressed (zlib) clusters, backing images and
//! external data files, versions 2 and 3. What it leaves to its user, and
//! this module adds:
//!
//! - **A strict check of every header structure before imago sees the
//!   file** ([`check`]). imago's own header parsing is lenient (its source
//!   says "TODO: more sanity checks"): it ignores `crypt_method`, accepts an
//!   L1 table smaller than the virtual size needs, and L1/refcount tables
//!   placed outside the file or on top of the header. We refuse those, with
//!   QEMU's limits (L1 table at most 32 MiB, refcount table at most 8 MiB,
//!   at most 65536 snapshots), and also check that every L2 table and
//!   refcount block the tables point at lies inside the file, cluster
//!   aligned, and not on the header, L1 or refcount tables.
//! - **No implicit opens.** An image that names a backing file or external
//!   data file is refused unless the user named that layer on the command
//!   line (QEMU's dotted `backing.*`/`data-file.*` keys); imago is opened with
//!   its `DenyImplicitOpenGate` as a second lock. So an image can never make
//!   moat read a host file the user did not name.
//! - **The dirty bit** (lazy refcounts left inconsistent by a crash), as
//!   QEMU: a writable open repairs the refcounts and clears the bit first
//!   ([`crate::qcow2_repair`]); a read-only open reads the image as it is,
//!   without writing (refcounts do not matter to reads).
//! - Clear refusals for what neither does: the corrupt bit (QEMU refuses
//!   read-write too; moat also refuses read-only, because imago does) and
//!   encryption.
//!
//! Gaps of imago 0.2.6 are mended in its vendored copy
//! (vendor/imago/MOAT-PATCHES.md): an unbounded recursion on hostile
//! refcount structures, the write order of refcounts before L1 entries,
//! zstd-compressed clusters (read), QEMU's overlap check, the dirty bit and
//! extended L2 entries (subclusters).
//!
//! Writes through imago never set the dirty bit (no lazy refcounts), and it
//! orders refcount updates before the L2 entries that use them, so a killed
//! moat leaves at worst leaked clusters, which `qemu-img check` accepts.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::RwLock;

use imago::storage::StorageOpenOptions;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder};

use crate::{check_range, check_write, BlockError, DiskImage};

const MAGIC: u32 = 0x5146_49fb;
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's QCOW_MAX_L1_SIZE and QCOW_MAX_REFTABLE_SIZE.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_SNAPSHOTS: u64 = 65536;
/// Bits 9..55 of L1, L2 and refcount table entries hold the offset.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_ENCRYPTION: u32 = 0x0537_be77;
const EXT_BITMAPS: u32 = 0x2385_2875;

/// What the header says, after [`check`] accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    /// Backing file name and format as written in the image (never opened by name).
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The image keeps its data in an external file.
    pub external_data_file: bool,
    pub data_file_name: Option<String>,
    /// The dirty bit is set: refcounts need a repair before writes.
    pub dirty: bool,
    /// Where the tables are (for that repair).
    pub geometry: crate::qcow2_repair::Geometry,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn bad(what: impl std::fmt::Display) -> String {
    format!("invalid qcow2 image: {what}")
}

/// Read exactly `len` bytes at `offset`, which the caller has bounded by the file size.
pub(crate) fn read_exact(file: &File, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len as usize];
    read_into(file, &mut buf, offset)?;
    Ok(buf)
}

/// Fill `buf` from `offset` (metadata the caller has bounded by the file size).
pub(crate) fn read_into(file: &File, buf: &mut [u8], offset: u64) -> Result<(), String> {
    file.read_exact_at(buf, offset)
        .map_err(|e| format!("reading qcow2 metadata at {offset}: {e}"))
}

/// A byte range of metadata, for the overlap checks.
struct Region {
    name: &'static str,
    start: u64,
    len: u64,
}

fn overlaps(a: &Region, b: &Region) -> bool {
    a.len != 0 && b.len != 0 && a.start < b.start + b.len && b.start < a.start + a.len
}

/// The virtual size a qcow2 header declares (for reports, not for access).
pub fn virtual_size(file: &File) -> Option<u64> {
    let mut h = [0u8; 32];
    file.read_exact_at(&mut h, 0).ok()?;
    (be32(&h, 0) == MAGIC).then(|| be64(&h, 24))
}

/// What the header of the qcow2 image in `file` says, for reports
/// (QEMU's `format-specific`): read again for each, so a corrupt bit set
/// since the image was opened shows. `None` when it is no longer a qcow2
/// header moat would open.
pub fn info(file: &File) -> Option<moat_api::Qcow2Info> {
    let len = crate::file_size(file).ok()?;
    let mut h = [0u8; 105];
    let n = (len.min(h.len() as u64)) as usize;
    file.read_exact_at(&mut h[..n], 0).ok()?;
    if n < 72 || be32(&h, 0) != MAGIC {
        return None;
    }
    let version = be32(&h, 4);
    let cluster_bits = be32(&h, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return None;
    }
    let mut q = moat_api::Qcow2Info {
        cluster_size: 1 << cluster_bits,
        version,
        zstd: false,
        lazy_refcounts: false,
        refcount_bits: 16,
        corrupt: false,
        extended_l2: false,
        data_file: None,
        backing: None,
    };
    // (Names are in the rest of the header: the whole check reads them,
    // once if asked twice.)
    let mut checked = None;
    let mut whole = || -> Option<Header> {
        if checked.is_none() {
            checked = Some(check(file, len).ok()?);
        }
        checked.clone()
    };
    if be64(&h, 8) != 0 {
        let header = whole()?;
        q.backing = header.backing_file.map(|b| (b, header.backing_format));
    }
    match version {
        2 => {}
        3 if n >= 104 => {
            let incompat = be64(&h, 72);
            let refcount_order = be32(&h, 96);
            if refcount_order > 6 {
                return None;
            }
            q.refcount_bits = 1 << refcount_order;
            q.lazy_refcounts = be64(&h, 80) & COMPAT_LAZY_REFCOUNTS != 0;
            q.corrupt = incompat & INCOMPAT_CORRUPT != 0;
            q.extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
            q.zstd = be32(&h, 100) > 104 && n > 104 && h[104] == 1;
            if incompat & INCOMPAT_DATA_FILE != 0 {
                let name = whole()?.data_file_name.unwrap_or_default();
                q.data_file = Some((name, be64(&h, 88) & AUTOCLEAR_DATA_FILE_RAW != 0));
            }
        }
        _ => return None,
    }
    Some(q)
}

/// Validate every header structure of the qcow2 image in `file` (of
/// `file_len` bytes) before use.
pub fn check(file: &File, file_len: u64) -> Result<Header, String> {
    if file_len < 72 {
        return Err(bad(format!(
            "{file_len} bytes is shorter than a qcow2 header"
        )));
    }
    let h = read_exact(file, 0, 72.min(file_len))?;
    if be32(&h, 0) != MAGIC {
        return Err(bad("no qcow2 magic"));
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(bad(format!("unsupported qcow2 version {version}")));
    }
    let backing_offset = be64(&h, 8);
    let backing_len = be32(&h, 16) as u64;
    let cluster_bits = be32(&h, 20);
    let size = be64(&h, 24);
    let crypt_method = be32(&h, 32);
    let l1_entries = be32(&h, 36) as u64;
    let l1_offset = be64(&h, 40);
    let rt_offset = be64(&h, 48);
    let rt_clusters = be32(&h, 56) as u64;
    let nb_snapshots = be32(&h, 60) as u64;
    let snapshots_offset = be64(&h, 64);

    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(bad(format!(
            "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
        )));
    }
    let cluster = 1u64 << cluster_bits;
    if crypt_method != 0 {
        return Err(bad(format!(
            "encrypted images (crypt_method {crypt_method}) are not supported"
        )));
    }

    let (mut incompat, header_len, refcount_order) = if version == 3 {
        if file_len < 104 {
            return Err(bad("truncated version 3 header"));
        }
        let v3 = read_exact(file, 72, 32)?;
        let header_len = be32(&v3, 28) as u64;
        if header_len < 104 || header_len > cluster || !header_len.is_multiple_of(8) {
            return Err(bad(format!(
                "header_length {header_len} (must be a multiple of 8 from 104 to the cluster size)"
            )));
        }
        (be64(&v3, 0), header_len, be32(&v3, 24))
    } else {
        (0, 72, 4)
    };
    if refcount_order > 6 {
        return Err(bad(format!("refcount_order {refcount_order} is above 6")));
    }
    let dirty = incompat & INCOMPAT_DIRTY != 0;
    incompat &= !INCOMPAT_DIRTY;
    if incompat & INCOMPAT_CORRUPT != 0 {
        return Err(bad(
            "the corrupt bit is set; check it with `qemu-img check` and repair with -r all",
        ));
    }
    // compression_type (byte 104, when the header has it): 0 zlib, 1 zstd;
    // the incompatible bit is set exactly when it is not zlib (QEMU's rule).
    let compression = if header_len > 104 {
        read_exact(file, 104, 1)?[0]
    } else {
        0
    };
    match (compression, incompat & INCOMPAT_COMPRESSION != 0) {
        (0, false) | (1, true) => {}
        (0, true) => {
            return Err(bad(
                "the compression type bit is set but the compression type is zlib",
            ))
        }
        (1, false) => return Err(bad("zstd compression without the compression type bit")),
        (t, _) => return Err(bad(format!("unknown compression type {t}"))),
    }
    incompat &= !INCOMPAT_COMPRESSION;
    // Extended L2 entries: 16 bytes (descriptor and subcluster bitmap), 32
    // subclusters of at least 512 bytes (QEMU's limit).
    let extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
    incompat &= !INCOMPAT_EXTL2;
    if extended_l2 && cluster_bits < 14 {
        return Err(bad(format!(
            "extended L2 entries need clusters of at least 16 KiB, not {cluster} bytes"
        )));
    }
    let external_data_file = incompat & INCOMPAT_DATA_FILE != 0;
    incompat &= !INCOMPAT_DATA_FILE;
    if incompat != 0 {
        return Err(bad(format!("unknown incompatible features {incompat:#x}")));
    }

    // Header extensions, then the backing file name: all in the first cluster.
    let first = read_exact(file, 0, cluster.min(file_len))?;
    let mut backing_format = None;
    let mut data_file_name = None;
    let mut bitmaps = false;
    let mut at = header_len;
    if version == 3 {
        loop {
            if at + 8 > first.len() as u64 {
                return Err(bad("header extensions run past the first cluster"));
            }
            let kind = be32(&first, at as usize);
            let len = be32(&first, at as usize + 4) as u64;
            let data_at = at + 8;
            if kind == EXT_END {
                break;
            }
            if data_at + len > first.len() as u64 {
                return Err(bad(format!(
                    "header extension {kind:#x} runs past the first cluster"
                )));
            }
            let data = &first[data_at as usize..(data_at + len) as usize];
            let text = || {
                String::from_utf8(data.to_vec())
                    .map_err(|_| bad(format!("header extension {kind:#x} is not UTF-8")))
            };
            match kind {
                EXT_BACKING_FORMAT => backing_format = Some(text()?),
                EXT_DATA_FILE => data_file_name = Some(text()?),
                EXT_ENCRYPTION => return Err(bad("encrypted images are not supported")),
                EXT_BITMAPS => bitmaps = true,
                _ => {}
            }
            at = data_at + len.next_multiple_of(8);
        }
    }
    let backing_file = if backing_offset != 0 {
        if backing_len > 1023 {
            return Err(bad(format!(
                "backing file name of {backing_len} bytes (at most 1023)"
            )));
        }
        let end = backing_offset
            .checked_add(backing_len)
            .filter(|&e| e <= first.len() as u64)
            .ok_or_else(|| bad("backing file name lies outside the first cluster"))?;
        let name = &first[backing_offset as usize..end as usize];
        Some(String::from_utf8(name.to_vec()).map_err(|_| bad("backing file name is not UTF-8"))?)
    } else {
        None
    };

    // L1 table: big enough for the virtual size, small enough to load.
    let l2_entries = cluster / if extended_l2 { 16 } else { 8 };
    let bytes_per_l1 = cluster * l2_entries;
    let needed_l1 = size.div_ceil(bytes_per_l1);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(bad(format!(
            "L1 table of {l1_entries} entries is too large"
        )));
    }
    if needed_l1 > l1_entries {
        return Err(bad(format!(
            "L1 table of {l1_entries} entries is too small for a virtual size of {size} bytes"
        )));
    }
    if rt_clusters * cluster > MAX_REFTABLE_BYTES {
        return Err(bad(format!(
            "refcount table of {rt_clusters} clusters is too large"
        )));
    }
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(bad(format!(
            "{nb_snapshots} snapshots (at most {MAX_SNAPSHOTS})"
        )));
    }
    let table = |name: &'static str, start: u64, len: u64| -> Result<Region, String> {
        if len != 0 && !start.is_multiple_of(cluster) {
            return Err(bad(format!("{name} at {start:#x} is not cluster aligned")));
        }
        match start.checked_add(len) {
            Some(end) if end <= file_len => Ok(Region { name, start, len }),
            _ => Err(bad(format!(
                "{name} at {start:#x} ({len} bytes) lies outside the {file_len}-byte file"
            ))),
        }
    };
    let regions = [
        Region {
            name: "header",
            start: 0,
            len: cluster,
        },
        table("L1 table", l1_offset, l1_entries * 8)?,
        table("refcount table", rt_offset, rt_clusters * cluster)?,
    ];
    if rt_clusters == 0 {
        return Err(bad("no refcount table"));
    }
    if nb_snapshots != 0 && !snapshots_offset.is_multiple_of(cluster) {
        return Err(bad("snapshot table is not cluster aligned"));
    }
    if nb_snapshots != 0 && snapshots_offset >= file_len {
        return Err(bad("snapshot table lies outside the file"));
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if overlaps(a, b) {
                return Err(bad(format!("the {} overlaps the {}", a.name, b.name)));
            }
        }
    }

    // What the tables point at: L2 tables and refcount blocks.
    let pointed = |what: &str, entries: &[u8], i: usize| -> Result<(), String> {
        let e = be64(entries, i * 8);
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(());
        }
        if !off.is_multiple_of(cluster) {
            return Err(bad(format!(
                "{what} {i} at {off:#x} is not cluster aligned"
            )));
        }
        if off >= file_len {
            return Err(bad(format!(
                "{what} {i} at {off:#x} lies outside the {file_len}-byte file"
            )));
        }
        let r = Region {
            name: "",
            start: off,
            len: cluster,
        };
        if let Some(m) = regions.iter().find(|m| overlaps(m, &r)) {
            return Err(bad(format!(
                "{what} {i} at {off:#x} overlaps the {}",
                m.name
            )));
        }
        Ok(())
    };
    let l1 = read_exact(file, l1_offset, l1_entries * 8)?;
    for i in 0..l1_entries as usize {
        pointed("L2 table", &l1, i)?;
    }
    let rt = read_exact(file, rt_offset, rt_clusters * cluster)?;
    for i in 0..(rt_clusters * cluster / 8) as usize {
        pointed("refcount block", &rt, i)?;
    }
    Ok(Header {
        version,
        cluster_bits,
        size,
        backing_file,
        backing_format,
        external_data_file,
        data_file_name,
        dirty,
        geometry: crate::qcow2_repair::Geometry {
            cluster_bits,
            l1_offset,
            l1_entries,
            rt_offset,
            rt_clusters,
            refcount_order,
            snapshots: nb_snapshots,
            bitmaps,
            external_data_file,
            extended_l2,
        },
    })
}

/// A qcow2 image (or a raw image used as a backing layer) behind imago.
pub struct Qcow2Image {
    /// Discard needs `&mut` in imago (it can invalidate mappings that
    /// concurrent requests hold); everything else shares the lock.
    inner: RwLock<FormatAccess<imago::file::File>>,
    size: u64,
    read_only: bool,
    /// cache=unsafe: a flush writes imago's metadata caches back to the
    /// file but does not wait for the disk.
    no_sync: bool,
    /// The top file again, for [`info`].
    header: Option<File>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// One opened layer of an image chain.
pub type Layer = FormatAccess<imago::file::File>;

/// What lies below a qcow2 layer, already opened.
pub enum Below {
    /// The user named nothing: refused if the image names a backing file.
    Unnamed,
    /// `backing=`: no backing image.
    None,
    Layer(Layer),
}

fn storage(file: File, writable: bool) -> io::Result<imago::file::File> {
    imago::file::File::from_open_file(file, StorageOpenOptions::new().write(writable))
}

/// Open a raw image as an imago layer (used for read-only backing images).
pub fn open_raw_layer(file: File, writable: bool) -> io::Result<Layer> {
    let raw = imago::raw::Raw::builder(storage(file, writable)?)
        .write(writable)
        .open(DenyImplicitOpenGate::default())?;
    Ok(FormatAccess::new(raw))
}

/// Check and open a qcow2 layer. `name` is only for messages.
/// `watch` is told of imago's writes to the layer's primary file, as QEMU
/// counts a node's writes: the data file when there is one (the guest's
/// data goes there), else `file`.
pub fn open_layer(
    name: &str,
    file: File,
    writable: bool,
    below: Below,
    data_file: Option<File>,
    watch: Option<crate::WriteWatch>,
) -> Result<Layer, String> {
    let file_len = crate::file_size(&file).map_err(|e| format!("{name}: {e}"))?;
    let header = check(&file, file_len).map_err(|e| format!("{name}: {e}"))?;
    if header.dirty && writable {
        let done = crate::qcow2_repair::repair(&file, file_len, &header.geometry)
            .map_err(|e| format!("{name}: {e}"))?;
        log::info!(
            "{name}: the dirty bit was set: repaired {} refcount errors and {} leaked clusters",
            done.errors,
            done.leaks
        );
    }
    let mut top = storage(file, writable).map_err(|e| format!("{name}: {e}"))?;
    let mut watch = watch;
    if !header.external_data_file {
        if let Some(w) = watch.take() {
            top.set_write_watch(w);
        }
    }
    let mut builder = imago::qcow2::Qcow2::<imago::file::File>::builder(top).write(writable);
    match below {
        Below::Unnamed => {
            if let Some(b) = &header.backing_file {
                let fmt = header.backing_format.as_deref().unwrap_or("raw|qcow2");
                return Err(format!(
                    "{name}: the image names the backing file \"{b}\" (format {fmt}); moat never opens a file an image names: \
                     name it on the command line with backing.driver={fmt},backing.file.filename=PATH (one backing. per layer), \
                     or use backing= for none"
                ));
            }
            builder = builder.backing(None);
        }
        Below::None => builder = builder.backing(None),
        Below::Layer(b) => builder = builder.backing(Some(b)),
    }
    match (header.external_data_file, data_file) {
        (true, None) => {
            let n = header.data_file_name.as_deref().unwrap_or("?");
            return Err(format!(
                "{name}: the image keeps its data in the external file \"{n}\"; moat never opens a file an image names: \
                 name it with data-file.filename=PATH"
            ));
        }
        (false, Some(_)) => {
            return Err(format!(
                "{name}: data-file.filename= was given but the image has no external data file"
            ))
        }
        (true, Some(f)) => {
            let mut data = storage(f, writable).map_err(|e| format!("{name}: {e}"))?;
            if let Some(w) = watch {
                data.set_write_watch(w);
            }
            builder = builder.data_file(Some(data))
        }
        (false, None) => builder = builder.data_file(None),
    }
    let q = builder
        .open(DenyImplicitOpenGate::default())
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(FormatAccess::new(q))
}

impl Qcow2Image {
    pub fn new(access: Layer, read_only: bool) -> Qcow2Image {
        Qcow2Image {
            size: access.size(),
            inner: RwLock::new(access),
            read_only,
            no_sync: false,
            header: None,
        }
    }

    /// `file` is the top layer's, for [`DiskImage::qcow2_info`].
    pub fn with_header(mut self, file: File) -> Qcow2Image {
        self.header = Some(file);
        self
    }

    /// cache=unsafe (QEMU's cache.no-flush).
    pub fn with_no_sync(mut self) -> Qcow2Image {
        self.no_sync = true;
        self
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, FormatAccess<imago::file::File>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl DiskImage for Qcow2Image {
    fn qcow2_info(&self) -> Option<moat_api::Qcow2Info> {
        info(self.header.as_ref()?)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.shared().read(buf, offset)?;
        Ok(())
    }

    fn read_slices(
        &self,
        bufs: &[vm_memory::VolatileSlice<'_>],
        offset: u64,
    ) -> Result<(), BlockError> {
        let total = bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        check_range(offset, total, self.size)?;
        // imago's vectors may not hold empty buffers (found by fuzz/qcow2).
        let bufs: Vec<_> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
        if bufs.is_empty() {
            return Ok(());
        }
        // (The guard keeps the guest memory mapped while imago uses it.)
        let (iov, _guard) = imago::io_buffers::IoVectorMut::from_volatile_slice(&bufs);
        self.shared().readv(iov, offset)?;
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        check_write(self.read_only, offset, buf.len() as u64, self.size)?;
        self.shared().write(buf, offset)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        if !self.read_only {
            let q = self.shared();
            q.flush()?;
            if !self.no_sync {
                q.sync()?;
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_write(self.read_only, offset, len, self.size)?;
        let mut q = self.inner.write().unwrap_or_else(|p| p.into_inner());
        q.discard_to_any(offset, len)?;
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_write(self.read_only, offset, len, self.size)?;
        self.shared().write_zeroes(offset, len)?;
        Ok(())
    }
}
