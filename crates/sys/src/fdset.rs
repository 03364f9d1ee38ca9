//! Descriptors handed to moat instead of paths: QEMU's fd sets (`-add-fd`,
//! QMP `add-fd`) and named descriptors (QMP `getfd`).
//!
//! A path `/dev/fdset/N` anywhere moat opens a file means "a descriptor of
//! set N whose access mode matches": read-only opens take an `O_RDONLY`
//! descriptor, read-write opens an `O_RDWR` one, as QEMU's
//! monitor_fdset_dup_fd_add() does, and moat uses a duplicate of it. So a
//! management tool (or `moat-jail`) can open files itself and moat needs no
//! access to them by path.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// At most this many descriptors are kept, so a client cannot exhaust moat's.
pub const MAX_STORED_FDS: usize = 256;

const FDSET_PREFIX: &str = "/dev/fdset/";

/// Is `path` a `/dev/fdset/N` name (a descriptor, not a file to open)?
pub fn is_fdset_path(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with(FDSET_PREFIX))
}

#[derive(Debug)]
pub struct FdSet {
    pub id: i64,
    /// Each descriptor with its `opaque` string.
    pub fds: Vec<(OwnedFd, Option<String>)>,
}

/// Every descriptor moat was handed, by name or in sets.
#[derive(Debug, Default)]
pub struct FdStore {
    named: Vec<(String, OwnedFd)>,
    sets: Vec<FdSet>,
}

impl FdStore {
    fn count(&self) -> usize {
        self.named.len() + self.sets.iter().map(|s| s.fds.len()).sum::<usize>()
    }

    /// Refuse to hold more than [`MAX_STORED_FDS`] descriptors.
    pub fn check_room(&self) -> Result<(), &'static str> {
        if self.count() >= MAX_STORED_FDS {
            return Err("Too many file descriptors stored");
        }
        Ok(())
    }

    /// `getfd`: store under `name`, replacing (and closing) an older one.
    pub fn put_named(&mut self, name: String, fd: OwnedFd) -> Result<(), &'static str> {
        if let Some(slot) = self.named.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = fd;
            return Ok(());
        }
        self.check_room()?;
        self.named.push((name, fd));
        Ok(())
    }

    /// Take a named descriptor (`closefd`, or a consumer such as a device).
    pub fn take_named(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.named.iter().position(|(n, _)| n == name)?;
        Some(self.named.remove(i).1)
    }

    /// Add `fd` to set `id` (or the lowest free id); returns the set id.
    pub fn add(
        &mut self,
        id: Option<i64>,
        fd: OwnedFd,
        opaque: Option<String>,
    ) -> Result<i64, &'static str> {
        self.check_room()?;
        let id = id.unwrap_or_else(|| {
            (0..)
                .find(|n| !self.sets.iter().any(|s| s.id == *n))
                .unwrap_or(0)
        });
        match self.sets.iter_mut().find(|s| s.id == id) {
            Some(set) => set.fds.push((fd, opaque)),
            None => {
                self.sets.push(FdSet {
                    id,
                    fds: vec![(fd, opaque)],
                });
                self.sets.sort_by_key(|s| s.id);
            }
        }
        Ok(id)
    }

    /// `remove-fd`: one descriptor of a set, or the whole set. False if absent.
    pub fn remove(&mut self, id: i64, fd: Option<i64>) -> bool {
        let Some(pos) = self.sets.iter().position(|s| s.id == id) else {
            return false;
        };
        if let Some(fd) = fd {
            let set = &mut self.sets[pos];
            let before = set.fds.len();
            set.fds.retain(|(f, _)| i64::from(f.as_raw_fd()) != fd);
            if set.fds.len() == before {
                return false;
            }
            if !set.fds.is_empty() {
                return true;
            }
        }
        self.sets.remove(pos);
        true
    }

    pub fn sets(&self) -> &[FdSet] {
        &self.sets
    }

    /// Open `path` for reading (and writing): a duplicate from an fd set
    /// for `/dev/fdset/N`, otherwise `None` (the caller opens the path).
    pub fn open_fdset(&self, path: &Path, writable: bool) -> Option<io::Result<File>> {
        let n = path.to_str()?.strip_prefix(FDSET_PREFIX)?;
        let Ok(id) = n.parse::<i64>() else {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{}': not a valid fd set", path.display()),
            )));
        };
        let Some(set) = self.sets.iter().find(|s| s.id == id) else {
            return Some(Err(io::Error::from_raw_os_error(libc::ENOENT)));
        };
        let want = if writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        let found = set.fds.iter().find(|(fd, _)| {
            // SAFETY: F_GETFL on a descriptor the set owns.
            let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
            fl >= 0 && fl & libc::O_ACCMODE == want
        });
        Some(match found {
            Some((fd, _)) => dup_cloexec(fd.as_raw_fd()).map(File::from),
            None => Err(io::Error::from_raw_os_error(libc::EACCES)),
        })
    }
}

/// A close-on-exec duplicate of `fd`.
pub fn dup_cloexec(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor; no memory is involved.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if d < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `d` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

/// Close every inherited descriptor from 3 up that moat was not handed:
/// the ones without close-on-exec (moat opens everything close-on-exec, so
/// call this after [`take_inherited`] has made its own copies).
pub fn close_inherited() -> Result<usize, String> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("/proc/self/fd: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    let mut closed = 0;
    for fd in fds {
        // SAFETY: F_GETFD only reads flags; the read_dir handle is closed by now.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: an inherited descriptor nobody in moat owns.
            unsafe { libc::close(fd) };
            closed += 1;
        }
    }
    Ok(closed)
}

/// Take an inherited descriptor for `-add-fd fd=N`, as QEMU checks it: not
/// stdin/out/err, open, and not close-on-exec (a descriptor moat made
/// itself always is, so this cannot grab one of moat's own).
pub fn take_inherited(fd: i64) -> Result<OwnedFd, String> {
    if fd < 0 {
        return Err("fd option is required and must be non-negative".into());
    }
    if fd <= 2 {
        return Err("fd cannot be a standard I/O stream".into());
    }
    let fd = i32::try_from(fd).map_err(|_| "fd is not valid or already in use".to_string())?;
    // SAFETY: F_GETFD only reads the descriptor flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
        return Err("fd is not valid or already in use".into());
    }
    // QEMU keeps a close-on-exec duplicate; the original stays open, as it does.
    dup_cloexec(fd).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn fdset_paths_open_the_descriptor_of_the_right_mode() {
        let dir = std::env::temp_dir().join(format!("moat-fdset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"hello").unwrap();
        let mut store = FdStore::default();
        let ro = File::open(&p).unwrap();
        assert_eq!(store.add(Some(3), ro.into(), Some("r".into())), Ok(3));
        let path = Path::new("/dev/fdset/3");
        let mut s = String::new();
        store
            .open_fdset(path, false)
            .unwrap()
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        // No read-write descriptor in the set: EACCES, as QEMU.
        let e = store.open_fdset(path, true).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        store.add(Some(3), rw.into(), None).unwrap();
        store
            .open_fdset(path, true)
            .unwrap()
            .unwrap()
            .write_all(b"J")
            .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"Jello");
        let e = store
            .open_fdset(Path::new("/dev/fdset/9"), false)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(store.open_fdset(&p, false).is_none());
        assert_eq!(store.add(None, File::open(&p).unwrap().into(), None), Ok(0));
        assert!(store.remove(3, None) && !store.remove(3, None));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn inherited_descriptors_are_checked_as_qemu_does() {
        assert!(take_inherited(-1).unwrap_err().contains("non-negative"));
        assert!(take_inherited(1).unwrap_err().contains("standard I/O"));
        assert!(take_inherited(999).unwrap_err().contains("not valid"));
        // std opens everything close-on-exec: moat's own descriptors are refused.
        let f = File::open("/proc/self/stat").unwrap();
        assert!(take_inherited(i64::from(f.as_raw_fd()))
            .unwrap_err()
            .contains("already in use"));
    }
}
