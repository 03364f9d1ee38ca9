//! Landlock: after setup, moat may open only what the VM was configured with.
//!
//! Everything moat needs was opened during setup (kernel and initrd are in
//! memory, images and sockets are open descriptors), so the ruleset is
//! small: each image file read-only or read-write as its drive is
//! (`/dev/kvm` stays open from startup; descriptors from fd
//! sets need no path), and removing files in the pid file's directory (the
//! pid file goes at exit, as QEMU's does). Every other file access that
//! Landlock can control is denied, with the best ABI the kernel offers;
//! from ABI 6, signals to other processes and connections to abstract UNIX
//! sockets made outside moat are denied too, and from ABI 9 connections to
//! UNIX sockets by path anywhere but the vsock device's directory.

use std::path::PathBuf;

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, RestrictionStatus,
    Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// What moat may still open once the guest runs.
#[derive(Debug, Clone, Default)]
pub struct FsPolicy {
    pub read: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    /// Device nodes to open read-write and use ioctl on (/dev/kvm).
    pub devices: Vec<PathBuf>,
    /// Directories where files may be removed (the pid file's).
    pub remove_in: Vec<PathBuf>,
    /// Directories whose UNIX sockets may be connected to (the vsock
    /// device's); kernels with Landlock ABI 9 deny every other.
    pub connect_unix_in: Vec<PathBuf>,
}

/// The newest ABI this code knows; older kernels get what they support.
const ABI_USED: ABI = ABI::V6;

/// Build the ruleset for `p` (not yet enforced on any thread).
pub fn ruleset(p: &FsPolicy) -> Result<RulesetCreated, String> {
    let e = |what: &str, err: &dyn std::fmt::Display| format!("landlock: {what}: {err}");
    let file_read = AccessFs::ReadFile;
    let file_rw = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    // ABI 6 scoping: no signals to processes outside moat's domain, no
    // connections to abstract UNIX sockets made outside it.
    let mut rs = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI_USED))
        .map_err(|x| e("ruleset", &x))?
        .handle_access(AccessFs::ResolveUnix)
        .map_err(|x| e("ruleset", &x))?
        .scope(Scope::from_all(ABI_USED))
        .map_err(|x| e("scope", &x))?
        .create()
        .map_err(|x| e("create", &x))?;
    let rules = p
        .read
        .iter()
        .map(|f| (f, BitFlags::from(file_read)))
        .chain(p.read_write.iter().map(|f| (f, file_rw)))
        .chain(p.devices.iter().map(|f| (f, file_rw | AccessFs::IoctlDev)))
        .chain(
            p.remove_in
                .iter()
                .map(|d| (d, BitFlags::from(AccessFs::RemoveFile))),
        )
        .chain(
            p.connect_unix_in
                .iter()
                .map(|d| (d, BitFlags::from(AccessFs::ResolveUnix))),
        );
    for (path, access) in rules {
        let name = path.display().to_string();
        let fd = PathFd::new(path).map_err(|x| e(&name, &x))?;
        rs = rs
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|x| e(&name, &x))?;
    }
    Ok(rs)
}

/// Enforce `rs` on the calling thread (it and the threads it creates).
pub fn restrict_thread(rs: &RulesetCreated) -> Result<RestrictionStatus, String> {
    // Landlock needs no_new_privs (or CAP_SYS_ADMIN) on this very thread.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    rs.try_clone()
        .map_err(|e| format!("landlock: {e}"))?
        .restrict_self()
        .map_err(|e| format!("landlock: {e}"))
}

/// A line for the log: how much of the policy the kernel enforces.
pub fn describe(s: &RestrictionStatus) -> String {
    let kernel = match kernel_abi() {
        Some(v) => format!("the kernel's Landlock ABI is {v}"),
        None => "the kernel has no Landlock".into(),
    };
    match s.ruleset {
        RulesetStatus::FullyEnforced => {
            format!("Landlock enforced (moat uses ABI {ABI_USED:?}; {kernel})")
        }
        RulesetStatus::PartiallyEnforced => {
            format!("Landlock partially enforced (moat asks for ABI {ABI_USED:?}; {kernel})")
        }
        RulesetStatus::NotEnforced => format!("Landlock not enforced: {kernel}"),
    }
}

/// The kernel's Landlock ABI version (LANDLOCK_CREATE_RULESET_VERSION).
pub fn kernel_abi() -> Option<i64> {
    // SAFETY: with a null attribute, size 0 and the VERSION flag the call
    // only returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    (v > 0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    /// The exact ruleset moat builds, enforced in a forked child: listed
    /// files open as listed, everything else is refused.
    #[test]
    fn only_the_policy_is_reachable() {
        let dir = std::env::temp_dir().join(format!("moat-landlock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        for f in ["ro.img", "rw.img", "other.img", "run/pid", "run/x"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let policy = FsPolicy {
            read: vec![dir.join("ro.img")],
            read_write: vec![dir.join("rw.img")],
            devices: vec![],
            remove_in: vec![dir.join("run")],
            connect_unix_in: vec![dir.join("run")],
        };
        let rs = ruleset(&policy).unwrap();
        let c = |f: &str| CString::new(dir.join(f).to_str().unwrap()).unwrap();
        let (ro, rw, other, pid, passwd) = (
            c("ro.img"),
            c("rw.img"),
            c("other.img"),
            c("run/pid"),
            CString::new("/etc/passwd").unwrap(),
        );
        // SAFETY: the child makes only system calls, then _exits.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            let ok = |p: &CString, flags: i32| {
                // SAFETY: valid NUL-terminated path.
                let fd = unsafe { libc::open(p.as_ptr(), flags) };
                if fd >= 0 {
                    // SAFETY: closing what we opened.
                    unsafe { libc::close(fd) };
                }
                fd >= 0
            };
            let mut code = 0;
            match restrict_thread(&rs) {
                Ok(s) if s.ruleset != RulesetStatus::NotEnforced => {}
                _ => code |= 1,
            }
            if !ok(&ro, libc::O_RDONLY) {
                code |= 2
            }
            if ok(&ro, libc::O_RDWR) {
                code |= 4
            }
            if !ok(&rw, libc::O_RDWR) {
                code |= 8
            }
            if ok(&other, libc::O_RDONLY) {
                code |= 16
            }
            if ok(&passwd, libc::O_RDONLY) {
                code |= 32
            }
            // SAFETY: valid paths.
            if unsafe { libc::unlink(pid.as_ptr()) } != 0 {
                code |= 64
            }
            // SAFETY: valid path.
            if unsafe { libc::unlink(other.as_ptr()) } == 0 {
                code |= 128
            }
            // ABI 6 scoping: no signal to a process outside the domain.
            // SAFETY: signal 0 only checks the permission.
            let parent_reachable = unsafe { libc::kill(libc::getppid(), 0) } == 0;
            if kernel_abi().is_some_and(|v| v >= 6) && parent_reachable {
                // Past the bit mask's eight bits.
                // SAFETY: ending the child.
                unsafe { libc::_exit(255) };
            }
            // SAFETY: ending the child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0, "failed checks (bit mask)");
        assert!(!dir.join("run/pid").exists() && dir.join("other.img").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
