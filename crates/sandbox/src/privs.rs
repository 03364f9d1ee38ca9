//! Privilege drop (`-run-with user=`, `-run-with chroot=`): moat opens what
//! it needs as the user who started it, then moves into the chroot and
//! becomes the given user, with no supplementary groups and no capability
//! in any set of any thread (checked), before the guest runs.
//!
//! Capabilities are per thread, and a uid change clears only the permitted
//! and effective sets, and only when it leaves root: so the bounding,
//! ambient and inheritable sets are emptied before moat makes its first
//! thread ([`give_up_inherited_capabilities`]), each thread empties its
//! permitted and effective sets after the uid change
//! ([`give_up_capabilities`]) and checks that all five of its sets are
//! empty, or moat does not run.

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
    rustix::process::chroot(dir)
        .map_err(|e| format!("chroot {}: {}", dir.display(), std::io::Error::from(e)))?;
    rustix::process::chdir("/").map_err(|e| format!("chdir /: {}", std::io::Error::from(e)))
}

/// Become `uid:gid` for good (all threads: the C library applies set*id
/// to every thread of the process), with no capability left in the calling
/// thread; other threads must call [`give_up_capabilities`] themselves.
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
    give_up_capabilities()
}

/// Give up, in the calling thread, the capability sets that are inherited
/// by threads made later and that the uid change below does not clear:
/// the bounding set (which needs CAP_SETPCAP, so while still privileged),
/// the ambient and the inheritable set. Done first thing when moat is to
/// drop its privileges, so every thread it makes starts without them.
pub fn give_up_inherited_capabilities() -> Result<(), String> {
    use caps::CapSet;
    if caps::read(None, CapSet::Bounding).is_ok_and(|b| !b.is_empty()) {
        if !caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
            return Err(
                "cannot empty the capability bounding set (that needs CAP_SETPCAP): \
                 start moat as root or without capabilities"
                    .into(),
            );
        }
        caps::clear(None, CapSet::Bounding).map_err(|e| format!("bounding set: {e}"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("ambient set: {e}"))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| format!("inheritable set: {e}"))?;
    Ok(())
}

/// Give up, in the calling thread, the permitted and effective sets (a
/// uid change from root clears them, but one between two other uids, when
/// a user holding capabilities started moat, does not), then check that
/// the thread holds nothing in any of its five sets.
pub fn give_up_capabilities() -> Result<(), String> {
    use caps::CapSet;
    caps::clear(None, CapSet::Effective).map_err(|e| format!("effective set: {e}"))?;
    caps::clear(None, CapSet::Permitted).map_err(|e| format!("permitted set: {e}"))?;
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ] {
        let held = caps::read(None, set).map_err(|e| format!("{set:?} set: {e}"))?;
        if !held.is_empty() {
            let mut names: Vec<String> = held.iter().map(|c| c.to_string()).collect();
            names.sort();
            return Err(format!(
                "a thread still holds capabilities in its {set:?} set: {}",
                names.join(",")
            ));
        }
    }
    Ok(())
}

fn cap_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The environment switch that lets moat run as root without a privilege
/// drop. For development only: a guest that escapes then owns the host.
pub const ALLOW_ROOT_ENV: &str = "MOAT_DANGEROUSLY_ALLOW_ROOT";

/// A privileged moat must drop its privileges once set up (`-run-with
/// user=`, `drops`) or be started unprivileged (by moat-jail): a guest that
/// escapes into moat must not find root there. Stricter than QEMU, which
/// runs as root when asked. With the development switch: the warning to
/// print once the VM is set up (so that a setup error stays one line).
pub fn refuse_privileged(drops: bool) -> Result<Option<String>, String> {
    let Some(why) = privileged() else {
        return Ok(None);
    };
    if drops {
        return Ok(None);
    }
    if std::env::var_os(ALLOW_ROOT_ENV).is_some_and(|v| v == "1") {
        return Ok(Some(format!(
            "moat: warning: {why} with no privilege drop ({ALLOW_ROOT_ENV}=1): a guest that escapes into moat owns this host"
        )));
    }
    Err(format!(
        "refusing to start: {why}. A guest that escapes into moat would have these privileges. \
         Add -run-with user=USER (moat opens the VM's files first, then becomes USER), \
         or start moat through moat-jail; {ALLOW_ROOT_ENV}=1 overrides this, for development only"
    ))
}

/// Why this process counts as privileged (any of its uids is 0, or it holds
/// effective, permitted or ambient capabilities), or None.
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
    ["CapEff", "CapPrm", "CapAmb"].into_iter().find_map(|set| {
        let v = cap_field(&status, set).unwrap_or(0);
        (v != 0).then(|| format!("running with capabilities ({set} {v:016x})"))
    })
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
