//! moat-jail: what a management tool runs as root to start one moat, as
//! Firecracker's jailer does for Firecracker and libvirt for QEMU.
//!
//! The jailer (root) checks its arguments, makes the VM's cgroup and an
//! empty directory `<base>/<id>/root`, opens the files it hands over as
//! descriptors, and forks a child into new PID, mount, IPC, UTS and cgroup
//! namespaces (and optionally a network namespace). The child joins the
//! cgroup, mounts a small tmpfs on the root directory *in its own mount
//! namespace* (so nothing of the jail's contents ever exists on the host),
//! fills it with only moat, its shared libraries, `/dev/kvm` and
//! `/dev/urandom` (device nodes made for the VM's uid, not the host's
//! nodes re-permissioned), `/proc` of its PID namespace and the files given
//! with `--ro`/`--rw`, `pivot_root`s into it (or, on a host running from
//! its initramfs, which cannot be pivoted away from, moves it over `/` and
//! chroots, as switch_root does), detaches the old root, makes the root
//! read-only, optionally switches to an AppArmor profile at exec, drops to the VM's uid/gid (no groups, no
//! capabilities, empty bounding set, no_new_privs) and execs moat with the
//! passed descriptors as `-add-fd` and every other descriptor closed.
//! The jailer stays as the child's parent: it forwards SIGTERM/SIGINT/SIGHUP,
//! and when moat ends it removes the cgroup and the root directory and exits
//! with moat's status.
//!
//! Written here rather than taken from a crate: Firecracker's jailer is
//! not a library and is tied to Firecracker's arguments; the system calls
//! involved are few and each is commented.

pub mod args;
pub mod cgroup;

use args::{Bind, JailConfig, Netns};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::ffi::CString;
use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

fn cstr(p: impl AsRef<std::ffi::OsStr>) -> Result<CString, String> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| "a path contains a NUL byte".to_string())
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn check(what: &str, r: libc::c_int) -> Result<(), String> {
    if r == 0 {
        Ok(())
    } else {
        Err(os_err(what))
    }
}

/// The ELF interpreter of `exec` (PT_INTERP), if it is dynamically linked.
fn elf_interp(exec: &Path) -> Result<Option<PathBuf>, String> {
    let data = std::fs::read(exec).map_err(|e| format!("--exec-file {}: {e}", exec.display()))?;
    let bad = || format!("--exec-file {}: not a 64-bit ELF file", exec.display());
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(bad());
    }
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        let ph = phoff.saturating_add(i.saturating_mul(phentsize));
        if u32_at(ph).ok_or_else(bad)? == 3 {
            let off = u64_at(ph + 8).ok_or_else(bad)? as usize;
            let len = u64_at(ph + 32).ok_or_else(bad)? as usize;
            let raw = data.get(off..off.saturating_add(len)).ok_or_else(bad)?;
            let name = raw.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name))));
        }
    }
    Ok(None)
}

/// The shared libraries `exec` loads (and its interpreter), as the
/// dynamic loader resolves them on this host.
pub fn libraries(exec: &Path) -> Result<Vec<PathBuf>, String> {
    let Some(interp) = elf_interp(exec)? else {
        return Ok(vec![]);
    };
    let out = std::process::Command::new(&interp)
        .arg("--list")
        .arg(exec)
        .env_clear()
        .output()
        .map_err(|e| format!("{} --list: {e}", interp.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --list {}: {}",
            interp.display(),
            exec.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut libs = vec![interp];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let p = PathBuf::from(p);
            if !libs.contains(&p) {
                libs.push(p);
            }
        }
    }
    Ok(libs)
}

/// openat2(2) from the working directory with `resolve` rules.
fn openat2(p: &Path, flags: OFlags, resolve: ResolveFlags) -> Result<OwnedFd, String> {
    rustix::fs::openat2(
        rustix::fs::CWD,
        p,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )
    .map_err(|e| format!("{}: {}", p.display(), std::io::Error::from(e)))
}

/// An O_PATH descriptor of a bind source. Unless `links`, no component of
/// the path may be a symlink (openat2 RESOLVE_NO_SYMLINKS).
fn hold(p: &Path, links: bool) -> Result<OwnedFd, String> {
    let resolve = if links {
        ResolveFlags::empty()
    } else {
        ResolveFlags::NO_SYMLINKS
    };
    openat2(p, OFlags::PATH, resolve)
}

/// Open a file handed to moat as a descriptor (as root, so with care): no
/// symlink or magic link anywhere in the path (openat2), and the file must
/// be the one whose path was checked (same device and inode), so swapping
/// a directory for a symlink, or the file for another, in between opens
/// nothing.
fn open_checked(p: &Path, writable: bool, identity: (u64, u64)) -> Result<OwnedFd, String> {
    let mode = if writable {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    let fd = openat2(
        p,
        mode | OFlags::NOCTTY,
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    let file = std::fs::File::from(fd);
    let m = file.metadata().map_err(|e| format!("fstat: {e}"))?;
    if (m.dev(), m.ino()) != identity {
        return Err(
            "the file changed after it was checked (replaced or moved); refusing it".into(),
        );
    }
    Ok(file.into())
}

/// The base of every jail must be root's alone: owned by root and not
/// writable by group or others, nor any directory above it unless sticky
/// (as /tmp), so no one else can swap what moat-jail makes there.
fn check_base_dir(base: &Path) -> Result<(), String> {
    let mut p = Some(base);
    while let Some(d) = p {
        let m = std::fs::symlink_metadata(d)
            .map_err(|e| format!("--chroot-base-dir {}: {e}", d.display()))?;
        let mode = m.mode();
        let sticky = mode & libc::S_ISVTX != 0 && d != base;
        if !m.is_dir() {
            return Err(format!(
                "--chroot-base-dir: {} is not a directory",
                d.display()
            ));
        }
        if m.uid() != 0 {
            return Err(format!(
                "--chroot-base-dir: {} is owned by uid {}, not root",
                d.display(),
                m.uid()
            ));
        }
        if mode & 0o022 != 0 && !sticky {
            return Err(format!(
                "--chroot-base-dir: {} is writable by group or others (mode {:o})",
                d.display(),
                mode & 0o7777
            ));
        }
        p = d.parent();
    }
    Ok(())
}

/// `<base>/<id>` and its `root`, made by this run and removed at its end.
struct JailDir {
    dir: PathBuf,
    root: PathBuf,
}

impl JailDir {
    fn create(base: &Path, id: &str) -> Result<JailDir, String> {
        let dir = base.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(format!(
                    "{} exists: moat-jail did not make it in this run (another VM with this id, \
                     or a leftover to inspect and remove); refusing to use it",
                    dir.display()
                ))
            }
            Err(e) => return Err(format!("creating {}: {e}", dir.display())),
        }
        let jail = JailDir {
            root: dir.join("root"),
            dir,
        };
        std::fs::create_dir(&jail.root)
            .map_err(|e| format!("creating {}: {e}", jail.root.display()))?;
        Ok(jail)
    }
}

impl Drop for JailDir {
    fn drop(&mut self) {
        // Never recursive: the root is only ever a mount point in the
        // child's namespace, so on the host it is empty; anything else is
        // not ours to delete.
        for d in [&self.root, &self.dir] {
            if let Err(e) = std::fs::remove_dir(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("moat-jail: removing {}: {e}", d.display());
                }
            }
        }
    }
}

/// Everything the child needs, prepared before the fork.
struct ChildPlan {
    root: CString,
    root_path: PathBuf,
    id: CString,
    uid: u32,
    gid: u32,
    netns: Option<OwnedFd>,
    new_netns: bool,
    /// Taps to open in moat's network namespace: (name, queues); their
    /// descriptors follow `passed`.
    taps: Vec<(String, usize)>,
    procs: Vec<OwnedFd>,
    /// (source, destination inside the root, writable, exec allowed,
    /// symlinks allowed in the source: only the loader's library paths).
    binds: Vec<(PathBuf, PathBuf, bool, bool, bool)>,
    /// Device nodes to make: (path in root, rdev, mode, owned by the VM user)
    nodes: Vec<(PathBuf, libc::dev_t, u32, bool)>,
    passed: Vec<OwnedFd>,
    /// The AppArmor profile moat is to run under (change_onexec).
    apparmor: Option<String>,
    /// Resource limits (soft = hard) set before exec.
    rlimits: Vec<(i32, u64)>,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

fn char_dev(path: &str) -> Result<libc::dev_t, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    if !m.file_type().is_char_device() {
        return Err(format!("{path}: not a character device"));
    }
    Ok(m.rdev())
}

/// Make `path` (inside the fresh tmpfs root) and its parents: a directory,
/// or an empty file to bind a file onto.
fn make_target(path: &Path, dir: bool) -> Result<(), String> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let r = if dir {
        std::fs::create_dir(path)
    } else {
        std::fs::File::create(path).map(|_| ())
    };
    r.map_err(|e| format!("creating {}: {e}", path.display()))
}

fn mount(
    src: Option<&CString>,
    target: &CString,
    fstype: Option<&CString>,
    flags: libc::c_ulong,
    data: Option<&CString>,
) -> Result<(), String> {
    let p = |c: Option<&CString>| c.map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a live NUL-terminated string.
    let r = unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, p(data).cast()) };
    check(&format!("mount {}", target.to_string_lossy()), r)
}

/// In the forked child, as root: build the root, confine, drop, exec.
/// Returns only on failure.
fn child(plan: ChildPlan) -> String {
    match child_setup(plan) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn child_setup(plan: ChildPlan) -> Result<std::convert::Infallible, String> {
    // SAFETY: (the whole function) raw system calls with valid descriptors,
    // NUL-terminated strings kept alive by `plan`, and integer flags.
    unsafe {
        // The cgroup first, so that everything below is accounted there.
        for f in &plan.procs {
            if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(os_err("joining the cgroup"));
            }
        }
        if let Some(ns) = &plan.netns {
            check(
                "setns (network)",
                libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET),
            )?;
        }
        let mut flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP;
        if plan.new_netns {
            flags |= libc::CLONE_NEWNET;
        }
        check("unshare", libc::unshare(flags))?;
        // The taps, opened as root in moat's network namespace (made if
        // missing) while /dev/net/tun is still at hand: moat gets their
        // descriptors and needs no CAP_NET_ADMIN.
        let mut taps: Vec<OwnedFd> = vec![];
        for (name, queues) in &plan.taps {
            let queues = moat_net::Tap::open(name, *queues, true)
                .map_err(|e| format!("--tap {name}: {e}"))?;
            taps.extend(queues.into_iter().map(moat_net::Tap::into_fd));
        }
        // Nothing mounted from here on propagates back to the host.
        check(
            "making / private",
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        mount(
            Some(&cstr("moat-jail")?),
            &plan.root,
            Some(&cstr("tmpfs")?),
            libc::MS_NOSUID,
            Some(&cstr("mode=0755,size=1m,nr_inodes=1024")?),
        )?;
        let inside = |p: &Path| plan.root_path.join(p.strip_prefix("/").unwrap_or(p));
        for (path, rdev, mode, owned) in &plan.nodes {
            let target = inside(path);
            let dir = target.parent().unwrap_or(&plan.root_path);
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let c = cstr(&target)?;
            check(
                &format!("mknod {}", path.display()),
                libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, *rdev),
            )?;
            check("chmod", libc::chmod(c.as_ptr(), *mode))?;
            if *owned {
                check("chown", libc::chown(c.as_ptr(), plan.uid, plan.gid))?;
            }
        }
        for (src, dest, writable, exec, links) in &plan.binds {
            let target = inside(dest);
            // Opened here, in this mount namespace (a bind needs its source
            // there), refusing any symlink on the way unless allowed: a
            // path swapped for a link since it was checked binds nothing.
            let src = hold(src, *links)?;
            let held = PathBuf::from(format!("/proc/self/fd/{}", src.as_raw_fd()));
            make_target(&target, held.is_dir())?;
            let (s, t) = (cstr(&held)?, cstr(&target)?);
            mount(Some(&s), &t, None, libc::MS_BIND, None)?;
            let mut f = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV;
            if !writable {
                f |= libc::MS_RDONLY;
            }
            if !exec {
                f |= libc::MS_NOEXEC;
            }
            mount(None, &t, None, f, None)?;
        }
        let proc_dir = inside(Path::new("/proc"));
        make_target(&proc_dir, true)?;
        mount(
            Some(&cstr("proc")?),
            &cstr(&proc_dir)?,
            Some(&cstr("proc")?),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )?;
        check(
            "sethostname",
            libc::sethostname(plan.id.as_ptr(), plan.id.as_bytes().len()),
        )?;
        let old = inside(Path::new("/.old"));
        make_target(&old, true)?;
        let old_c = cstr(&old)?;
        if libc::syscall(libc::SYS_pivot_root, plan.root.as_ptr(), old_c.as_ptr()) == 0 {
            check("chdir /", libc::chdir(c"/".as_ptr()))?;
            check(
                "detaching the old root",
                libc::umount2(c"/.old".as_ptr(), libc::MNT_DETACH),
            )?;
        } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // The host runs from its initramfs (rootfs), which cannot be
            // pivoted away from: move the new root over / and chroot into
            // it, as switch_root does. The old root is then covered in this
            // mount namespace, and moat will have no capability to chroot
            // back out.
            check("chdir", libc::chdir(plan.root.as_ptr()))?;
            mount(Some(&plan.root), &cstr("/")?, None, libc::MS_MOVE, None)?;
            check("chroot", libc::chroot(c".".as_ptr()))?;
            check("chdir /", libc::chdir(c"/".as_ptr()))?;
        } else {
            return Err(os_err("pivot_root"));
        }
        check("rmdir /.old", libc::rmdir(c"/.old".as_ptr()))?;
        mount(
            None,
            &cstr("/")?,
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
            None,
        )?;
        let mut passed: Vec<&OwnedFd> = plan.passed.iter().collect();
        passed.extend(taps.iter());
        // The passed descriptors become 3, 4, ...; all others close at exec.
        let mut temps = vec![];
        for f in passed {
            let t = libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1024);
            if t < 0 {
                return Err(os_err("dup"));
            }
            temps.push(t);
        }
        for (i, t) in temps.iter().enumerate() {
            if libc::dup2(*t, 3 + i as i32) < 0 {
                return Err(os_err("dup2"));
            }
        }
        let first = 3 + temps.len() as u32;
        if libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            4, /* CLOSE_RANGE_CLOEXEC */
        ) != 0
        {
            return Err(os_err("close_range"));
        }
        // AppArmor: the profile takes over at exec (this is the jail's /proc).
        if let Some(profile) = &plan.apparmor {
            let cmd = format!("exec {profile}");
            let written = ["/proc/self/attr/apparmor/exec", "/proc/self/attr/exec"]
                .iter()
                .any(|p| std::fs::write(p, &cmd).is_ok());
            if !written {
                return Err(format!(
                    "--apparmor-profile {profile}: {} (is the profile loaded?)",
                    std::io::Error::last_os_error()
                ));
            }
        }
        for (res, n) in &plan.rlimits {
            let lim = libc::rlimit {
                rlim_cur: *n,
                rlim_max: *n,
            };
            if libc::setrlimit(*res as _, &lim) != 0 {
                return Err(os_err(&format!("--rlimit ({res}={n})")));
            }
        }
        // No capability can come back: empty bounding set, then the uid change
        // clears the rest; no_new_privs for exec.
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        check("setgroups", libc::setgroups(0, std::ptr::null()))?;
        check("setresgid", libc::setresgid(plan.gid, plan.gid, plan.gid))?;
        check("setresuid", libc::setresuid(plan.uid, plan.uid, plan.uid))?;
        if libc::setuid(0) == 0 {
            return Err("still able to become root after dropping privileges".into());
        }
        check(
            "no_new_privs",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
        // Die with the jailer (set after the uid change, which clears it).
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        let argv: Vec<*const libc::c_char> = plan
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let envp: Vec<*const libc::c_char> = plan
            .envp
            .iter()
            .map(|a| a.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        libc::execve(c"/moat".as_ptr(), argv.as_ptr(), envp.as_ptr());
        Err(os_err("exec /moat"))
    }
}

/// Run moat in a jail as `cfg` says; moat's exit status.
pub fn run(cfg: &JailConfig) -> Result<i32, String> {
    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must be started as root (it makes namespaces, mounts and cgroups)".into());
    }
    if let Some(p) = &cfg.apparmor_profile {
        let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|v| v.trim() == "Y");
        if !enabled {
            return Err(format!(
                "--apparmor-profile {p}: AppArmor is not enabled on this host"
            ));
        }
    }
    let libs = libraries(&cfg.exec_file)?;
    let kvm = char_dev("/dev/kvm")?;
    let urandom = char_dev("/dev/urandom")?;
    let netns = match &cfg.netns {
        Netns::Join(p) => Some(
            std::fs::File::open(p)
                .map_err(|e| format!("--netns {}: {e}", p.display()))?
                .into(),
        ),
        _ => None,
    };
    let mut passed: Vec<OwnedFd> = vec![];
    let mut moat_args = vec![];
    check_base_dir(&cfg.base_dir)?;
    for (i, f) in cfg.fds.iter().enumerate() {
        let fd = open_checked(&f.path, f.writable, f.identity)
            .map_err(|e| format!("--add-fd {}:{}: {e}", f.set, f.path.display()))?;
        passed.push(fd);
        moat_args.push("-add-fd".to_string());
        moat_args.push(format!("fd={},set={}", 3 + i, f.set));
    }
    // The taps' descriptors come after the files' (the child opens them).
    let mut next_fd = 3 + passed.len();
    for t in &cfg.taps {
        let fds: Vec<String> = (next_fd..next_fd + t.queues)
            .map(|f| f.to_string())
            .collect();
        next_fd += t.queues;
        moat_args.push("-netdev".to_string());
        moat_args.push(format!(
            "tap,id={},fds={},vnet_hdr=on,script=no,downscript=no",
            t.id,
            fds.join(":")
        ));
    }
    moat_args.extend(cfg.moat_args.iter().cloned());
    // Made in this order, removed in reverse (by the guards' drops).
    let jail = JailDir::create(&cfg.base_dir, &cfg.id)?;
    let mut cg =
        cgroup::Cgroup::create(cfg.cgroup_version, &cfg.parent_cgroup, &cfg.id, &cfg.limits)?;
    let result = (|| {
        let mut binds = vec![(
            cfg.exec_file.clone(),
            PathBuf::from("/moat"),
            false,
            true,
            false,
        )];
        for l in &libs {
            binds.push((l.clone(), l.clone(), false, true, true));
        }
        for Bind {
            src,
            dest,
            writable,
        } in &cfg.binds
        {
            binds.push((src.clone(), dest.clone(), *writable, false, false));
        }
        let mut envp = vec![cstr("PATH=/")?];
        if let Some(v) = std::env::var_os("MOAT_LOG") {
            let mut kv = std::ffi::OsString::from("MOAT_LOG=");
            kv.push(v);
            envp.push(cstr(kv)?);
        }
        // Only when asked on moat-jail's own command line: an inherited
        // variable must not turn the sandbox into a log.
        if cfg.seccomp_log {
            envp.push(cstr("MOAT_SECCOMP_LOG=1")?);
        }
        let plan = ChildPlan {
            root: cstr(&jail.root)?,
            root_path: jail.root.clone(),
            id: cstr(&cfg.id)?,
            uid: cfg.uid,
            gid: cfg.gid,
            netns,
            new_netns: cfg.netns == Netns::New,
            taps: cfg
                .taps
                .iter()
                .map(|t| (t.ifname.clone(), t.queues))
                .collect(),
            procs: cg.procs_files()?,
            binds,
            nodes: vec![
                (PathBuf::from("/dev/kvm"), kvm, 0o600, true),
                (PathBuf::from("/dev/urandom"), urandom, 0o666, false),
            ],
            passed,
            apparmor: cfg.apparmor_profile.clone(),
            rlimits: cfg.limits.rlimits.clone(),
            argv: std::iter::once("moat".to_string())
                .chain(moat_args)
                .map(cstr)
                .collect::<Result<_, _>>()?,
            envp,
        };
        spawn_and_wait(plan)
    })();
    cg.remove();
    drop(jail);
    result
}

/// The jailed child, for [`forward`].
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Pass SIGTERM/SIGINT/SIGHUP on to moat, which shuts the VM down.
extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; pid is our child.
        unsafe { libc::kill(pid, sig) };
    }
}

fn spawn_and_wait(plan: ChildPlan) -> Result<i32, String> {
    use libc::{SIGHUP, SIGINT, SIGTERM};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    check("pipe", unsafe {
        libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC)
    })?;
    // SAFETY: both descriptors were just made and are owned here.
    let (err_r, err_w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Signals wait (blocked) until the forwarding is in place; the child
    // unblocks them just before exec.
    // SAFETY: sigset_t is plain data; all-zero is a valid (empty) value.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigset manipulation on a local, then the process mask.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [SIGHUP, SIGINT, SIGTERM] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // The child is PID 1 of a new PID namespace (this process stays in its own).
    // SAFETY: unshare with a flag only.
    check("unshare (PID namespace)", unsafe {
        libc::unshare(libc::CLONE_NEWPID)
    })?;
    // SAFETY: moat-jail is single-threaded here, so the child may allocate.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork"));
    }
    if pid == 0 {
        drop(err_r);
        let msg = child(plan);
        // SAFETY: reporting on the pipe, then ending the child.
        unsafe {
            libc::write(err_w.as_raw_fd(), msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
    }
    drop(err_w);
    drop(plan);
    // A thread cannot be made after unshare(CLONE_NEWPID): the handler
    // forwards the signal itself.
    CHILD.store(pid, std::sync::atomic::Ordering::SeqCst);
    for s in [SIGHUP, SIGINT, SIGTERM] {
        // SAFETY: installing an async-signal-safe handler (it only calls kill).
        unsafe { libc::signal(s, forward as *const () as libc::sighandler_t) };
    }
    // SAFETY: restoring the mask blocked above.
    unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    let mut msg = String::new();
    let _ = std::fs::File::from(err_r).read_to_string(&mut msg);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(os_err("waitpid"));
        }
    }
    if !msg.is_empty() {
        return Err(msg);
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    })
}

/// moat-jail's entry point: exit status.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args::parse(&args) {
        Ok(args::Parsed::Help) => {
            print!("{}", args::USAGE);
            0
        }
        Ok(args::Parsed::Run(cfg)) => match run(&cfg) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("moat-jail: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("moat-jail: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bind_source_through_a_symlink_is_refused() {
        let d = std::env::temp_dir().join(format!("moat-jail-hold-{}", std::process::id()));
        let real = d.join("real");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("f"), b"x").unwrap();
        std::os::unix::fs::symlink(&real, d.join("link")).unwrap();
        let e = super::hold(&d.join("link/f"), false).unwrap_err();
        assert!(e.contains("symbolic links"), "{e}");
        assert!(super::hold(&d.join("link/f"), true).is_ok());
        assert!(super::hold(&real.join("f"), false).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn identity(p: &std::path::Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.dev(), m.ino())
    }

    /// The --add-fd race: the path is checked at startup and opened (as
    /// root) later; a tenant who swaps its own directory for a symlink, or
    /// the file for another, in between must get nothing.
    #[test]
    fn an_add_fd_file_swapped_after_the_check_is_refused() {
        let d = std::env::temp_dir().join(format!("moat-jail-addfd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let mine = d.join("tenant");
        let other = d.join("other-tenant");
        std::fs::create_dir_all(&mine).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(mine.join("disk"), b"mine").unwrap();
        std::fs::write(other.join("disk"), b"secret").unwrap();
        let path = mine.join("disk");
        let checked = identity(&path);
        assert!(super::open_checked(&path, true, checked).is_ok());
        // The directory swapped for a symlink to another tenant's.
        std::fs::rename(&mine, d.join("moved")).unwrap();
        std::os::unix::fs::symlink(&other, &mine).unwrap();
        let e = super::open_checked(&path, true, checked).unwrap_err();
        assert!(e.contains("symbolic links"), "{e}");
        // The file itself replaced (a hard link to another tenant's file).
        std::fs::remove_file(&mine).unwrap();
        std::fs::create_dir(&mine).unwrap();
        std::fs::hard_link(other.join("disk"), &path).unwrap();
        let e = super::open_checked(&path, false, checked).unwrap_err();
        assert!(e.contains("changed"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_base_dir_must_be_roots_alone() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no arguments.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to own the directories");
            return;
        }
        let d = std::env::temp_dir().join(format!("moat-jail-base-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(super::check_base_dir(&d), Ok(()));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = super::check_base_dir(&d).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
        let e = super::check_base_dir(&d).unwrap_err();
        assert!(e.contains("owned by uid 65534"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
