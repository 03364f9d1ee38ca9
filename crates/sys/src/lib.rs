//! Small host-OS helpers shared by moat's crates.

pub mod fdset;
pub mod gate;
pub mod role;
pub mod timeline;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The stack of each of moat's threads: Rust's default of 2 MiB less a
/// page. A stack mapping of exactly 2 MiB can sit on a 2 MiB boundary (the
/// first thread's did, right below guest RAM), and on a host whose
/// transparent huge pages are `always` (Debian's default) the first touch
/// of it then brings in a whole huge page: 2 MiB of RSS for the few KiB a
/// thread uses. A mapping smaller than 2 MiB cannot hold one.
pub const THREAD_STACK: usize = (2 << 20) - 4096;

/// A builder for one of moat's threads: named, with [`THREAD_STACK`].
pub fn thread(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
}

/// Lock a mutex, carrying on if a panicking thread poisoned it (the data
/// moat guards stays consistent across a panic: counters, queues, devices).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bind a listening UNIX socket that only its owner can use (mode 0600 from
/// the moment it exists), replacing a stale socket but never any other file.
pub fn bind_unix_private(path: &Path) -> Result<UnixListener, String> {
    bind_private(path, || UnixListener::bind(path).map_err(|e| e.to_string()))
}

/// As [`bind_unix_private`], a listening `SOCK_SEQPACKET` socket
/// (non-blocking), which std does not offer.
pub fn bind_unix_seqpacket_private(path: &Path) -> Result<std::os::fd::OwnedFd, String> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    bind_private(path, || {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| e.to_string())?;
        let addr = SocketAddrUnix::new(path).map_err(|e| e.to_string())?;
        rustix::net::bind(&fd, &addr).map_err(|e| e.to_string())?;
        rustix::net::listen(&fd, 128).map_err(|e| e.to_string())?;
        Ok(fd)
    })
}

fn bind_private<T>(path: &Path, bind: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| format!("removing stale socket: {e}"))?;
        }
        Ok(_) => return Err("exists and is not a socket; refusing to replace it".into()),
        Err(_) => {}
    }
    use rustix::fs::Mode;
    let old = rustix::process::umask(Mode::from_bits_truncate(0o177));
    let l = bind();
    rustix::process::umask(old);
    let l = l?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("setting mode 0600: {e}"))?;
    Ok(l)
}

/// An inherited descriptor that must be a listening UNIX stream socket
/// (`-chardev socket,fd=N,server=on`), as a listener.
pub fn listening_unix(fd: std::os::fd::OwnedFd) -> Result<UnixListener, String> {
    use std::os::fd::AsRawFd;
    let opt = |name: libc::c_int| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into `v`, `len` says its size.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    match (
        opt(libc::SO_DOMAIN),
        opt(libc::SO_TYPE),
        opt(libc::SO_ACCEPTCONN),
    ) {
        (Some(libc::AF_UNIX), Some(libc::SOCK_STREAM), Some(1)) => Ok(UnixListener::from(fd)),
        (None, _, _) => Err("not a socket".into()),
        _ => Err("not a listening UNIX stream socket (bind and listen it first)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_never_clobbers_files() {
        let dir = std::env::temp_dir().join(format!("moat-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("file");
        std::fs::write(&f, b"keep").unwrap();
        assert!(bind_unix_private(&f).unwrap_err().contains("not a socket"));
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
        let s = dir.join("sock");
        let l = bind_unix_private(&s).unwrap();
        let mode = std::fs::metadata(&s).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l);
        bind_unix_private(&s).unwrap(); // a stale socket is replaced
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The pid file (`-pidfile`), locked while moat runs and removed at exit as
/// QEMU does. The open file holds the lock.
#[derive(Debug)]
pub struct PidFile(std::path::PathBuf, #[allow(dead_code)] std::fs::File);

impl PidFile {
    pub fn create(path: &Path) -> Result<PidFile, String> {
        use std::io::Write as _;
        let ctx = |e: &dyn std::fmt::Display| format!("-pidfile {}: {e}", path.display());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| ctx(&e))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                ctx(&format!(
                    "cannot lock pid file: {}",
                    std::io::Error::from(e)
                ))
            },
        )?;
        f.set_len(0).map_err(|e| ctx(&e))?;
        writeln!(f, "{}", std::process::id()).map_err(|e| ctx(&e))?;
        Ok(PidFile(path.to_path_buf(), f))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The socket files moat made, removed at exit as QEMU removes them: only
/// while the path is still the socket moat bound (same device and inode).
#[derive(Debug)]
pub struct SocketFiles(Vec<(std::path::PathBuf, u64, u64)>);

impl SocketFiles {
    pub fn note(paths: Vec<std::path::PathBuf>) -> SocketFiles {
        use std::os::unix::fs::MetadataExt;
        SocketFiles(
            paths
                .into_iter()
                .filter_map(|p| {
                    let m = std::fs::symlink_metadata(&p).ok()?;
                    Some((p, m.dev(), m.ino()))
                })
                .collect(),
        )
    }
}

impl Drop for SocketFiles {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        for (p, dev, ino) in &self.0 {
            let same = std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.file_type().is_socket() && m.dev() == *dev && m.ino() == *ino);
            if same {
                // After -run-with user= the directory may no longer be
                // writable for moat; QEMU leaves the file then too.
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
