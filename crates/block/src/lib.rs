//! Disk images: what a virtio-blk device reads and writes.
//!
//! Every access is bounds-checked against the image's virtual size before
//! it reaches the file, so a guest can never read or write bytes outside
//! the image it was given.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use vm_memory::VolatileSlice;

pub mod node;
mod open;
pub mod qcow2;
pub mod qcow2_repair;
pub mod throttle;

pub use open::open;

pub use qcow2::Qcow2Image;

/// The size of a regular file or a host block device (whose metadata says 0).
pub fn file_size(file: &File) -> io::Result<u64> {
    let mut f = file;
    io::Seek::seek(&mut f, io::SeekFrom::End(0))
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("access of {len} bytes at {offset} is beyond the end of the {size}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the image is read-only")]
    ReadOnly,
    #[error("{0}")]
    Io(#[from] io::Error),
    /// An image could not be opened: `why` as QEMU's monitor words it,
    /// `option` the command-line option it came from (empty when the
    /// message names its file itself).
    #[error("{}{why}", if option.is_empty() { String::new() } else { format!("{option}: ") })]
    Open { option: String, why: String },
}

impl BlockError {
    /// The message as a monitor client sees it (no command-line option).
    pub fn monitor_text(&self) -> String {
        match self {
            BlockError::Open { why, .. } => why.clone(),
            e => e.to_string(),
        }
    }
}

/// A disk image as a device sees it.
pub trait DiskImage: Send + Sync + std::fmt::Debug {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError>;
    /// Read `[offset, offset + total)` into `bufs` (guest memory, filled in
    /// order). Images that can read straight into them do (a raw file with
    /// one `preadv`, qcow2 through imago's vectors); the default goes
    /// through a small buffer on the stack.
    fn read_slices(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<(), BlockError> {
        let mut chunk = [0u8; 4096];
        let mut at = offset;
        for b in bufs {
            let mut done = 0;
            while done < b.len() {
                let n = (b.len() - done).min(chunk.len());
                self.read_at(&mut chunk[..n], at)?;
                b.subslice(done, n)
                    .map_err(io::Error::other)?
                    .copy_from(&chunk[..n]);
                done += n;
                at += n as u64;
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError>;
    /// Make written data durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// Deallocate a range (reads then return zeroes).
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Zero a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// What its qcow2 header says now (see [`qcow2::info`]); `None` for raw.
    fn qcow2_info(&self) -> Option<moat_api::Qcow2Info> {
        None
    }
}

/// Check that `[offset, offset+len)` lies inside an image of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// A write (or discard) of `[offset, offset+len)`: allowed on a writable
/// image of `size` bytes, inside it.
pub fn check_write(read_only: bool, offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    if read_only {
        return Err(BlockError::ReadOnly);
    }
    check_range(offset, len, size)
}

/// Told of each write, write-zeroes and discard an image makes to its
/// file, once done: `(offset, length, discard, succeeded)`, file offsets
/// (what QEMU's protocol node sees: moat keeps its write threshold and
/// highest offset with it). For qcow2, imago's file tells it (moat patch 9).
pub type WriteWatch = imago::file::WriteWatch;

/// A raw image: the file's bytes are the disk's bytes.
pub struct RawImage {
    file: File,
    /// cache=none/directsync: the same file opened with O_DIRECT, used for
    /// every request aligned to [`DIRECT_ALIGN`] (buffer, offset, length);
    /// an unaligned one goes through `file` (the kernel keeps the two coherent).
    direct: Option<File>,
    size: u64,
    read_only: bool,
    /// cache=unsafe: a flush never waits for the disk.
    no_sync: bool,
    watch: Option<WriteWatch>,
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Alignment moat keeps for O_DIRECT: enough for every common logical block size.
pub const DIRECT_ALIGN: u64 = 4096;

/// Buffers one `preadv` takes (well under IOV_MAX).
const IOV_BATCH: usize = 64;

/// Fill every buffer of `iov` from `file` at `offset` (short reads are
/// continued; the end of the file is an error, as for `read_exact_at`);
/// the bytes read. `iov` is consumed (its entries advanced).
fn preadv_all(file: &File, iov: &mut [libc::iovec], offset: u64) -> io::Result<u64> {
    let mut at = offset;
    let mut first = 0;
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let rest = &iov[first..];
        // SAFETY: every entry points at `iov_len` writable bytes: guest
        // memory whose mapping the caller's slice guards keep alive (the
        // guest may touch it concurrently, as with any device's DMA; the
        // kernel only writes bytes there). The count fits an int.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                rest.as_ptr(),
                rest.len() as libc::c_int,
                at as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        at += n as u64;
        while n > 0 {
            let v = &mut iov[first];
            let k = n.min(v.iov_len);
            // SAFETY: k <= iov_len: the pointer stays inside the buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(k) }.cast();
            v.iov_len -= k;
            n -= k;
            if v.iov_len == 0 {
                first += 1;
            }
        }
    }
    Ok(at - offset)
}

impl RawImage {
    /// A regular file or a host block device (whose size the metadata does not give).
    pub fn new(file: File, read_only: bool) -> io::Result<RawImage> {
        let size = file_size(&file)?;
        Ok(RawImage {
            file,
            direct: None,
            size,
            read_only,
            no_sync: false,
            watch: None,
        })
    }

    /// Tell `watch` of each write, write-zeroes and discard.
    pub fn with_watch(mut self, watch: Option<WriteWatch>) -> RawImage {
        self.watch = watch;
        self
    }

    fn tell<T, E>(&self, offset: u64, len: u64, discard: bool, r: &Result<T, E>) {
        if let Some(w) = &self.watch {
            w(offset, len, discard, r.is_ok());
        }
    }

    /// cache=unsafe: flushes return at once (QEMU's cache.no-flush).
    pub fn with_no_sync(mut self) -> RawImage {
        self.no_sync = true;
        self
    }

    /// The image's file (the buffered descriptor).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bypass the host page cache with `direct` (the image opened O_DIRECT).
    pub fn with_direct(mut self, direct: File) -> RawImage {
        self.direct = Some(direct);
        self
    }

    /// The O_DIRECT file when a request of these buffers (address and
    /// length of each) at `offset` can use it, else the buffered one.
    fn pick(&self, bufs: impl IntoIterator<Item = (*const u8, usize)>, offset: u64) -> &File {
        let aligned = |v: u64| v.is_multiple_of(DIRECT_ALIGN);
        match &self.direct {
            Some(d)
                if aligned(offset)
                    && bufs
                        .into_iter()
                        .all(|(p, l)| aligned(p as u64) && aligned(l as u64)) =>
            {
                d
            }
            _ => &self.file,
        }
    }

    fn fallocate(&self, mode: rustix::fs::FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        Ok(rustix::fs::fallocate(&self.file, mode, offset, len)?)
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.pick([(buf.as_ptr(), buf.len())], offset)
            .read_exact_at(buf, offset)?;
        Ok(())
    }

    fn read_slices(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> Result<(), BlockError> {
        let total = bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        check_range(offset, total, self.size)?;
        let mut at = offset;
        for group in bufs.chunks(IOV_BATCH) {
            let guards: Vec<_> = group.iter().map(|b| b.ptr_guard_mut()).collect();
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; IOV_BATCH];
            for (v, g) in iov.iter_mut().zip(&guards) {
                v.iov_base = g.as_ptr().cast();
                v.iov_len = g.len();
            }
            let iov = &mut iov[..guards.len()];
            let file = self.pick(iov.iter().map(|v| (v.iov_base as *const u8, v.iov_len)), at);
            at += preadv_all(file, iov, at)?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        check_write(self.read_only, offset, buf.len() as u64, self.size)?;
        let r = self
            .pick([(buf.as_ptr(), buf.len())], offset)
            .write_all_at(buf, offset);
        self.tell(offset, buf.len() as u64, false, &r);
        Ok(r?)
    }

    fn flush(&self) -> Result<(), BlockError> {
        if !self.read_only && !self.no_sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_write(self.read_only, offset, len, self.size)?;
        // Best effort, as for QEMU's discard=unmap: a file system without
        // hole punching simply keeps the data.
        let _ = self.fallocate(
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            len,
        );
        self.tell(offset, len, true, &Ok::<(), ()>(()));
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_write(self.read_only, offset, len, self.size)?;
        let r = self.zero_range(offset, len);
        self.tell(offset, len, false, &r);
        r
    }
}

impl RawImage {
    fn zero_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self
            .fallocate(
                rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )
            .is_ok()
        {
            return Ok(());
        }
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: &[u8], ro: bool) -> (RawImage, std::path::PathBuf) {
        let p =
            std::env::temp_dir().join(format!("moat-raw-{}-{}", std::process::id(), bytes.len()));
        std::fs::write(&p, bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!ro)
            .open(&p)
            .unwrap();
        (RawImage::new(f, ro).unwrap(), p)
    }

    #[test]
    fn bounds_and_read_only() {
        let (img, p) = image(&[7u8; 4096], false);
        let mut b = [0u8; 512];
        img.read_at(&mut b, 3584).unwrap();
        assert_eq!(b, [7u8; 512]);
        assert!(matches!(
            img.read_at(&mut b, 3585),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.write_at(&b, u64::MAX - 10),
            Err(BlockError::OutOfRange { .. })
        ));
        img.write_zeroes(0, 1024).unwrap();
        img.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [0u8; 512]);
        std::fs::remove_file(&p).unwrap();
        let (ro, p) = image(&[1u8; 1024], true);
        assert!(matches!(ro.write_at(&b, 0), Err(BlockError::ReadOnly)));
        assert!(matches!(ro.discard(0, 512), Err(BlockError::ReadOnly)));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn read_slices_fills_each_buffer_in_order() {
        let bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (img, p) = image(&bytes, true);
        // More buffers than one preadv takes, of uneven sizes, some empty.
        let sizes: Vec<usize> = (0..IOV_BATCH + 9).map(|i| (i * 13) % 97).collect();
        let total: usize = sizes.iter().sum();
        let mut mem = vec![0u8; total];
        let mut slices = Vec::new();
        let mut rest = &mut mem[..];
        for &n in &sizes {
            let (a, b) = rest.split_at_mut(n);
            slices.push(VolatileSlice::from(a));
            rest = b;
        }
        img.read_slices(&slices, 1000).unwrap();
        drop(slices);
        assert_eq!(mem, bytes[1000..1000 + total]);
        // Past the end: refused before any byte is read.
        let mut buf = [0u8; 512];
        let s = [VolatileSlice::from(&mut buf[..])];
        assert!(matches!(
            img.read_slices(&s, bytes.len() as u64 - 511),
            Err(BlockError::OutOfRange { .. })
        ));
        std::fs::remove_file(&p).unwrap();
    }
}

/// An image held in memory (tests and fuzzing).
#[derive(Debug)]
pub struct MemImage {
    data: std::sync::Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemImage {
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        MemImage {
            data: std::sync::Mutex::new(data),
            read_only,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }
}

impl DiskImage for MemImage {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        let d = self.lock();
        check_range(offset, buf.len() as u64, d.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let mut d = self.lock();
        check_write(self.read_only, offset, buf.len() as u64, d.len() as u64)?;
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let mut d = self.lock();
        check_write(self.read_only, offset, len, d.len() as u64)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}
