//! Privilege drop (`-run-with user=`, `-run-with chroot=`): moat opens what
//! it needs as the user who started it, then moves into the chroot and
//! becomes the given user, with no supplementary groups and (the kernel
//! clears them on the uid change) no capabilities, before the guest runs.

use std::ffi::CString;
use std::path::Path;

/// uid and primary gid of `name`, from the user database.
pub fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let c = CString::new(name).map_err(|_| format!("user '{name}': invalid name"))?;
    // SAFETY: passwd is plain data; all-zero is a valid (empty) value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pw` and `buf`, both live and sized as passed.
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(format!("user '{name}' not found"));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

fn check(what: &str, r: libc::c_int) -> Result<(), String> {
    if r == 0 {
        Ok(())
    } else {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    }
}

/// chroot into `dir` and make it the working directory.
pub fn enter_chroot(dir: &Path) -> Result<(), String> {
    let c = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| "chroot: invalid path".to_string())?;
    // SAFETY: chroot and chdir with valid NUL-terminated paths.
    check(&format!("chroot {}", dir.display()), unsafe {
        libc::chroot(c.as_ptr())
    })?;
    // SAFETY: as above.
    check("chdir /", unsafe { libc::chdir(c"/".as_ptr()) })
}

/// Become `uid:gid` for good (all threads: the C library applies set*id
/// to every thread of the process).
pub fn drop_to(uid: u32, gid: u32) -> Result<(), String> {
    if uid == 0 {
        return Err("refusing to 'drop' to uid 0".into());
    }
    // SAFETY: plain system calls with integer arguments / a null list.
    unsafe {
        check("setgroups", libc::setgroups(0, std::ptr::null()))?;
        check("setresgid", libc::setresgid(gid, gid, gid))?;
        check("setresuid", libc::setresuid(uid, uid, uid))?;
    }
    // Paranoia: there must be no way back.
    // SAFETY: as above; a success here is the failure we check for.
    if unsafe { libc::setuid(0) } == 0 {
        return Err("still able to become root after dropping privileges".into());
    }
    Ok(())
}

/// Why this process counts as privileged (any of its uids is 0, or it holds
/// effective capabilities), or None.
pub fn privileged() -> Option<String> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three uids into the locals passed.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if r == 0 || e == 0 || s == 0 {
        return Some(format!(
            "running as root (uid {r}, euid {e}, saved uid {s})"
        ));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    (cap_eff != 0).then(|| format!("running with capabilities (CapEff {cap_eff:016x})"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_counts_as_privileged() {
        // SAFETY: geteuid has no arguments.
        let root = unsafe { libc::geteuid() } == 0;
        let p = super::privileged();
        if root {
            assert!(p.unwrap().contains("root"));
        }
    }
}
