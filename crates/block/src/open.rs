//! Opening a drive's images as its configuration says: the image-opening
//! policy (cache modes and their open flags, descriptors from fd sets, one
//! file never twice in a chain, regular files and block devices only) in
//! one place, for `-drive` at startup and QMP `blockdev-add` alike.

use crate::{BlockError, DiskImage, Qcow2Image, RawImage};
use moat_config::{Backing, CacheMode, DriveConfig, DriveFormat, ImageLayer};
use moat_sys::fdset::FdStore;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// An OS error as QEMU prints it: strerror's text, no "(os error N)".
fn os_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        // SAFETY: strerror returns a pointer to a static or thread-local
        // NUL-terminated string, copied at once.
        Some(n) => unsafe { std::ffi::CStr::from_ptr(libc::strerror(n)) }
            .to_string_lossy()
            .into_owned(),
        None => e.to_string(),
    }
}

fn open_error(path: &Path, why: String) -> BlockError {
    BlockError::Open {
        option: format!("-drive file={}", path.display()),
        why,
    }
}

/// A failure that names its own file (`file: why`).
fn layer_error(name: &str, why: impl std::fmt::Display) -> BlockError {
    BlockError::Open {
        option: String::new(),
        why: format!("{name}: {why}"),
    }
}

/// Open `-drive file=` (or a `blockdev-add` node) and the layers the user
/// named below it; a `/dev/fdset/N` path takes a descriptor from `fds`.
/// `watch` is told of the image's own writes to its top file (to its data
/// file, when it has one).
pub fn open(
    d: &DriveConfig,
    fds: &FdStore,
    watch: Option<crate::WriteWatch>,
) -> Result<Arc<dyn DiskImage>, BlockError> {
    let f = open_image_file(&d.file, !d.read_only, d.cache, fds)?;
    let name = d.file.display().to_string();
    Ok(match d.format {
        DriveFormat::Raw => {
            let mut raw = RawImage::new(f, d.read_only)
                .map_err(|e| layer_error(&name, e))?
                .with_watch(watch);
            if d.cache == CacheMode::Unsafe {
                raw = raw.with_no_sync();
            }
            match open_direct(&d.file, !d.read_only, d.cache, raw.file())? {
                Some(direct) => Arc::new(raw.with_direct(direct)),
                None => Arc::new(raw),
            }
        }
        DriveFormat::Qcow2 => {
            let mut seen = Vec::new();
            // (A second descriptor of the top file, to read its header for
            // reports: a path may not be opened again inside the sandbox.)
            let header = f.try_clone().map_err(|e| layer_error(&name, os_text(&e)))?;
            let top = d.layer();
            let access = open_layer(&top, Some(f), !d.read_only, d.cache, fds, &mut seen, watch)?;
            let q = Qcow2Image::new(access, d.read_only).with_header(header);
            Arc::new(if d.cache == CacheMode::Unsafe {
                q.with_no_sync()
            } else {
                q
            })
        }
    })
}

/// Open one image file as the drive's cache mode says (an fd set's
/// descriptor keeps the flags it was opened with); regular files and block
/// devices only.
fn open_image_file(
    path: &Path,
    writable: bool,
    cache: CacheMode,
    fds: &FdStore,
) -> Result<File, BlockError> {
    let f = match fds.open_fdset(path, writable) {
        Some(r) => r,
        None => {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(writable);
            if writable && matches!(cache, CacheMode::Writethrough | CacheMode::Directsync) {
                o.custom_flags(libc::O_DSYNC);
            }
            o.open(path)
        }
    }
    .map_err(|e| {
        open_error(
            path,
            format!("Could not open '{}': {}", path.display(), os_text(&e)),
        )
    })?;
    let kind = f
        .metadata()
        .map_err(|e| open_error(path, os_text(&e)))?
        .file_type();
    if !kind.is_file() && !std::os::unix::fs::FileTypeExt::is_block_device(&kind) {
        return Err(open_error(
            path,
            "not a regular file or block device".into(),
        ));
    }
    Ok(f)
}

/// cache=none|directsync on a path: the image again with O_DIRECT (as
/// QEMU, an error where the file system cannot do it, e.g. older tmpfs).
/// It must be the file already open as `first` (same device and inode):
/// the path may have been pointed elsewhere in between. A descriptor from
/// an fd set keeps the flags its owner gave it.
pub(crate) fn open_direct(
    path: &Path,
    writable: bool,
    cache: CacheMode,
    first: &File,
) -> Result<Option<File>, BlockError> {
    if !matches!(cache, CacheMode::None | CacheMode::Directsync)
        || moat_sys::fdset::is_fdset_path(path)
    {
        return Ok(None);
    }
    let option = format!("-drive file={},cache=none", path.display());
    let mut flags = libc::O_DIRECT;
    if writable && cache == CacheMode::Directsync {
        flags |= libc::O_DSYNC;
    }
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| BlockError::Open {
            option: option.clone(),
            why: format!(
                "Could not open '{}' with O_DIRECT: {}",
                path.display(),
                os_text(&e)
            ),
        })?;
    let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino())).ok();
    if id(&direct).is_none() || id(&direct) != id(first) {
        return Err(BlockError::Open {
            option,
            why: "the file changed while it was being opened".into(),
        });
    }
    Ok(Some(direct))
}

/// Open a layer of a qcow2 chain and, recursively, the layers the user
/// named below it (read-only). `seen` holds the (device, inode) of every
/// file already in the chain: one file in two places is refused, as a
/// writable top layer would otherwise write into its own backing image.
fn open_layer(
    layer: &ImageLayer,
    file: Option<File>,
    writable: bool,
    cache: CacheMode,
    fds: &FdStore,
    seen: &mut Vec<(u64, u64)>,
    watch: Option<crate::WriteWatch>,
) -> Result<crate::qcow2::Layer, BlockError> {
    use crate::qcow2::Below;
    let name = layer.file.display().to_string();
    let mut note = |f: &File, name: &str| -> Result<(), BlockError> {
        let m = f.metadata().map_err(|e| layer_error(name, e))?;
        if seen.contains(&(m.dev(), m.ino())) {
            return Err(layer_error(
                name,
                "the same file appears twice in one backing chain",
            ));
        }
        seen.push((m.dev(), m.ino()));
        Ok(())
    };
    let f = match file {
        Some(f) => f,
        None => open_image_file(&layer.file, writable, cache, fds)?,
    };
    note(&f, &name)?;
    match layer.format {
        DriveFormat::Raw => {
            crate::qcow2::open_raw_layer(f, writable).map_err(|e| layer_error(&name, e))
        }
        DriveFormat::Qcow2 => {
            let data_file = match &layer.data_file {
                Some(p) => {
                    let df = open_image_file(p, writable, cache, fds)?;
                    note(&df, &p.display().to_string())?;
                    Some(df)
                }
                None => None,
            };
            let below = match &layer.backing {
                Backing::Unnamed => Below::Unnamed,
                Backing::None => Below::None,
                Backing::Layer(b) => {
                    Below::Layer(open_layer(b, None, false, cache, fds, seen, None)?)
                }
            };
            let opened = crate::qcow2::open_layer(&name, f, writable, below, data_file, watch);
            opened.map_err(|why| BlockError::Open {
                option: String::new(),
                why,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    /// cache=none opens the image's path a second time, with O_DIRECT: it
    /// must find the file it opened the first time, not what the path was
    /// pointed at in between.
    #[test]
    fn the_o_direct_descriptor_must_be_the_same_file() {
        use moat_config::CacheMode;
        let d = std::env::temp_dir().join(format!("moat-direct-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a.img"), d.join("b.img"));
        std::fs::write(&a, vec![0u8; 8192]).unwrap();
        std::fs::write(&b, vec![0u8; 8192]).unwrap();
        let first = std::fs::File::open(&a).unwrap();
        let same = super::open_direct(&a, false, CacheMode::None, &first);
        // tmpfs may refuse O_DIRECT; that is a different error.
        if let Err(e) = &same {
            assert!(e.to_string().contains("O_DIRECT"), "{e}");
        }
        // The path now names another file (as a swap in between would).
        std::fs::rename(&b, &a).unwrap();
        if same.is_ok() {
            let e = super::open_direct(&a, false, CacheMode::None, &first).unwrap_err();
            assert!(e.to_string().contains("the file changed"), "{e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
