//! moat-jail's command line. Everything is checked here, before anything is
//! created, so that bad input leaves nothing behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

pub const USAGE: &str = "\
Usage: moat-jail --id ID --uid UID --gid GID --exec-file MOAT [options] -- [moat options]

Starts MOAT as UID:GID (never 0) in new mount, PID, IPC and UTS namespaces,
inside a per-VM root that holds only MOAT, its libraries, /dev/kvm,
/dev/urandom, /proc and the files named below, and in its own cgroup.
Removes the cgroup and the root when moat ends; exits with moat's status.

  --id ID                 the VM's id: 1-64 of A-Z a-z 0-9 - _
  --uid UID, --gid GID    who moat runs as (not 0)
  --exec-file PATH        the moat binary
  --chroot-base-dir DIR   where per-VM roots are made (default /srv/moat-jail);
                          the root is DIR/ID/root and must not exist yet
  --ro SRC[:DEST]         bind SRC read-only at DEST in the root (default: the same path)
  --rw SRC[:DEST]         the same, writable (a directory for sockets, a disk image)
  --add-fd SET:PATH[:ro]  open PATH here (read-write unless :ro) and hand it to moat
                          as -add-fd fd=N,set=SET (use file=/dev/fdset/SET)
  --apparmor-profile NAME moat runs confined by this (loaded) AppArmor profile,
                          e.g. contrib/apparmor/moat-jailed
  --netns PATH            join this network namespace (e.g. /var/run/netns/NAME)
  --new-netns             a new, empty network namespace
  --tap ID:IFNAME[:QUEUES]  open (or create) the tap IFNAME in moat's network
                          namespace, as root, with QUEUES queues (default 1), and
                          hand it to moat as -netdev tap,id=ID,fds=...; add
                          -device virtio-net-device,netdev=ID (moat never needs
                          CAP_NET_ADMIN)
  --cgroup-version 1|2|auto   (default auto: v2 where its controllers are enabled)
  --parent-cgroup NAME    cgroup parent of the VM's cgroup (default moat)
  --cpu-quota-us N        CPU time per period (with --cpu-period-us, default 100000)
  --cpu-weight N          relative CPU weight, 1-10000 (100 is the default share)
  --cpuset-cpus LIST      CPUs moat may use, e.g. 0-1,3
  --cpuset-mems LIST      memory nodes moat may use
  --memory-max SIZE       memory limit (suffixes K M G T)
  --pids-max N            at most N tasks (threads count)
  --io-max DEV,rbps=N,wbps=N   bandwidth limit for a block device (path or MAJ:MIN)
  --rlimit NAME=N         a resource limit for moat (soft and hard): nofile, nproc,
                          fsize, memlock, as, core (may repeat)
  --seccomp-log           moat logs system calls outside its allow-list instead of
                          refusing them (MOAT_SECCOMP_LOG=1: debugging only; an
                          inherited MOAT_SECCOMP_LOG is never passed on)
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub src: PathBuf,
    pub dest: PathBuf,
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassFd {
    pub set: u32,
    pub path: PathBuf,
    pub writable: bool,
    /// (device, inode) of the file when its path was checked: what is
    /// opened later must be the same file.
    pub identity: (u64, u64),
}

/// `--tap ID:IFNAME[:QUEUES]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    pub id: String,
    pub ifname: String,
    pub queues: usize,
}

fn tap_spec(opt: &str, v: &str) -> Result<TapSpec, String> {
    let mut parts = v.splitn(3, ':');
    let (Some(id), Some(ifname)) = (parts.next(), parts.next()) else {
        return Err(format!("{opt} {v}: expected ID:IFNAME[:QUEUES]"));
    };
    // QEMU's id rule: a letter, then letters, digits, '-', '.', '_'.
    let mut b = id.bytes();
    if !(b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_')))
    {
        return Err(format!("{opt} {v}: '{id}' is not a valid netdev id"));
    }
    if ifname.is_empty()
        || ifname.len() > 15
        || !ifname
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
    {
        return Err(format!(
            "{opt} {v}: '{ifname}' is not an interface name (1-15 of A-Z a-z 0-9 - . _)"
        ));
    }
    let queues = match parts.next() {
        None => 1,
        Some(q) => q
            .parse::<usize>()
            .ok()
            .filter(|q| (1..=16).contains(q))
            .ok_or_else(|| format!("{opt} {v}: QUEUES must be 1 to 16"))?,
    };
    Ok(TapSpec {
        id: id.to_string(),
        ifname: ifname.to_string(),
        queues,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Netns {
    Host,
    Join(PathBuf),
    New,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    Auto,
    V1,
    V2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoMax {
    pub major: u32,
    pub minor: u32,
    pub rbps: u64,
    pub wbps: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: Option<u64>,
    pub cpu_weight: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    pub io_max: Vec<IoMax>,
    /// setrlimit(resource, N) before exec.
    pub rlimits: Vec<(i32, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    pub exec_file: PathBuf,
    pub base_dir: PathBuf,
    pub binds: Vec<Bind>,
    pub fds: Vec<PassFd>,
    pub netns: Netns,
    pub taps: Vec<TapSpec>,
    pub cgroup_version: CgroupVersion,
    pub parent_cgroup: String,
    pub apparmor_profile: Option<String>,
    pub limits: Limits,
    /// Pass MOAT_SECCOMP_LOG=1 to moat (asked for explicitly, never inherited).
    pub seccomp_log: bool,
    pub moat_args: Vec<String>,
}

pub enum Parsed {
    Help,
    Run(Box<JailConfig>),
}

/// An id, or a cgroup parent name: 1-64 of A-Z a-z 0-9 - _ (no dots, no
/// slashes: it becomes a path component).
fn check_name(what: &str, v: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} '{}': use 1-64 characters of A-Z a-z 0-9 - _",
            v.escape_debug()
        ))
    }
}

/// An absolute path with no `.`/`..` components and no empty names.
fn check_clean(what: &str, p: &Path) -> Result<(), String> {
    if !p.is_absolute() {
        return Err(format!("{what} {}: must be an absolute path", p.display()));
    }
    let bad = p
        .components()
        .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)));
    if bad
        || p.as_os_str()
            .as_encoded_bytes()
            .windows(2)
            .any(|w| w == b"//")
    {
        return Err(format!(
            "{what} {}: '.', '..' and '//' are not allowed",
            p.display()
        ));
    }
    Ok(())
}

/// An existing host path with no symlink anywhere in it (so what is bound
/// or opened is what was named, not where a link points).
fn check_host_path(what: &str, p: &Path) -> Result<(), String> {
    check_clean(what, p)?;
    let real = std::fs::canonicalize(p).map_err(|e| format!("{what} {}: {e}", p.display()))?;
    if real != p {
        return Err(format!(
            "{what} {}: goes through a symlink (to {}); name the file itself",
            p.display(),
            real.display()
        ));
    }
    Ok(())
}

fn num(opt: &str, v: &str) -> Result<u64, String> {
    v.parse()
        .map_err(|_| format!("{opt} {v}: expected a non-negative integer"))
}

fn id_num(opt: &str, v: &str) -> Result<u32, String> {
    let n: u32 = v
        .parse()
        .map_err(|_| format!("{opt} {v}: expected a numeric id"))?;
    if n == 0 {
        return Err(format!("{opt} 0: moat must not run as root"));
    }
    if n == u32::MAX {
        return Err(format!("{opt} {v}: not a valid id"));
    }
    Ok(n)
}

fn size(opt: &str, v: &str) -> Result<u64, String> {
    let (digits, shift) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 20),
        Some(b'G' | b'g') => (&v[..v.len() - 1], 30),
        Some(b'T' | b't') => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    let n = num(opt, digits)?;
    n.checked_shl(shift)
        .filter(|r| r >> shift == n)
        .ok_or_else(|| format!("{opt} {v}: too large"))
}

/// A CPU or memory-node list as cgroups write them: 0-3,5
fn cpu_list(opt: &str, v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.split(',').all(|r| {
            let mut ends = r.splitn(2, '-');
            let a = ends.next().and_then(|a| a.parse::<u32>().ok());
            match (a, ends.next()) {
                (Some(_), None) => true,
                (Some(a), Some(b)) => b.parse::<u32>().is_ok_and(|b| b >= a),
                _ => false,
            }
        });
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("{opt} {v}: expected a list like 0-3,5"))
    }
}

fn bind(opt: &str, v: &str, writable: bool) -> Result<Bind, String> {
    let (src, dest) = match v.split_once(':') {
        Some((s, d)) => (PathBuf::from(s), PathBuf::from(d)),
        None => (PathBuf::from(v), PathBuf::from(v)),
    };
    check_host_path(opt, &src)?;
    check_clean(&format!("{opt} destination"), &dest)?;
    if dest == Path::new("/") {
        return Err(format!("{opt} {v}: cannot replace the root"));
    }
    for reserved in ["/dev", "/proc", "/moat", "/lib", "/lib64", "/usr", "/.old"] {
        if dest.starts_with(reserved) {
            return Err(format!(
                "{opt} {v}: {reserved} in the root is moat-jail's own"
            ));
        }
    }
    Ok(Bind {
        src,
        dest,
        writable,
    })
}

fn io_max(opt: &str, v: &str) -> Result<IoMax, String> {
    let mut parts = v.split(',');
    let dev = parts.next().unwrap_or_default();
    let (major, minor) = match dev.split_once(':') {
        Some((a, b)) if !dev.starts_with('/') => (
            a.parse().map_err(|_| format!("{opt} {v}: bad MAJ:MIN"))?,
            b.parse().map_err(|_| format!("{opt} {v}: bad MAJ:MIN"))?,
        ),
        _ => {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let m = std::fs::metadata(dev).map_err(|e| format!("{opt} {dev}: {e}"))?;
            if !m.file_type().is_block_device() {
                return Err(format!("{opt} {dev}: not a block device"));
            }
            let r = m.rdev();
            (libc::major(r), libc::minor(r))
        }
    };
    let mut io = IoMax {
        major,
        minor,
        rbps: 0,
        wbps: 0,
    };
    for kv in parts {
        match kv.split_once('=') {
            Some(("rbps", n)) => io.rbps = num(opt, n)?,
            Some(("wbps", n)) => io.wbps = num(opt, n)?,
            _ => return Err(format!("{opt} {v}: expected rbps=N and/or wbps=N")),
        }
    }
    if io.rbps == 0 && io.wbps == 0 {
        return Err(format!("{opt} {v}: give rbps=N and/or wbps=N"));
    }
    Ok(io)
}

pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut id = None;
    let mut uid = None;
    let mut gid = None;
    let mut exec_file = None;
    let mut base_dir = PathBuf::from("/srv/moat-jail");
    let mut binds = vec![];
    let mut fds = vec![];
    let mut netns = Netns::Host;
    let mut taps: Vec<TapSpec> = vec![];
    let mut cgroup_version = CgroupVersion::Auto;
    let mut parent_cgroup = "moat".to_string();
    let mut apparmor_profile = None;
    let mut limits = Limits::default();
    let mut moat_args = vec![];
    let mut seccomp_log = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            moat_args = it.by_ref().cloned().collect();
            break;
        }
        if a == "-h" || a == "--help" {
            return Ok(Parsed::Help);
        }
        let (opt, inline) = match a.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        if opt == "--seccomp-log" {
            seccomp_log = true;
            continue;
        }
        if opt == "--new-netns" {
            if netns != Netns::Host {
                return Err("--new-netns and --netns: choose one".into());
            }
            netns = Netns::New;
            continue;
        }
        let known = [
            "--id",
            "--uid",
            "--gid",
            "--exec-file",
            "--chroot-base-dir",
            "--ro",
            "--rw",
            "--add-fd",
            "--netns",
            "--tap",
            "--cgroup-version",
            "--parent-cgroup",
            "--apparmor-profile",
            "--cpu-quota-us",
            "--cpu-period-us",
            "--cpu-weight",
            "--cpuset-cpus",
            "--cpuset-mems",
            "--memory-max",
            "--pids-max",
            "--io-max",
            "--rlimit",
        ];
        if !known.contains(&opt) {
            return Err(format!("unknown option '{a}' (see --help)"));
        }
        let v = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("{opt} needs a value"))?,
        };
        match opt {
            "--id" => {
                check_name("--id", &v)?;
                id = Some(v);
            }
            "--uid" => uid = Some(id_num(opt, &v)?),
            "--gid" => gid = Some(id_num(opt, &v)?),
            "--exec-file" => {
                let p = PathBuf::from(&v);
                check_host_path(opt, &p)?;
                if !std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
                    return Err(format!("{opt} {v}: not a regular file"));
                }
                exec_file = Some(p);
            }
            "--chroot-base-dir" => {
                let p = PathBuf::from(&v);
                check_host_path(opt, &p)?;
                if !std::fs::metadata(&p).is_ok_and(|m| m.is_dir()) {
                    return Err(format!("{opt} {v}: not a directory"));
                }
                base_dir = p;
            }
            "--ro" => binds.push(bind(opt, &v, false)?),
            "--rw" => binds.push(bind(opt, &v, true)?),
            "--add-fd" => {
                let mut parts = v.splitn(3, ':');
                let set = parts
                    .next()
                    .and_then(|s| s.parse::<u32>().ok())
                    .ok_or_else(|| format!("{opt} {v}: expected SET:PATH[:ro]"))?;
                let path = PathBuf::from(parts.next().unwrap_or_default());
                let writable = match parts.next() {
                    None | Some("rw") => true,
                    Some("ro") => false,
                    Some(m) => return Err(format!("{opt} {v}: mode '{m}' is not ro or rw")),
                };
                check_host_path(opt, &path)?;
                let m = std::fs::metadata(&path)
                    .map_err(|e| format!("{opt} {}: {e}", path.display()))?;
                fds.push(PassFd {
                    set,
                    path,
                    writable,
                    identity: (m.dev(), m.ino()),
                });
            }
            "--netns" => {
                if netns != Netns::Host {
                    return Err("--new-netns and --netns: choose one".into());
                }
                let p = PathBuf::from(&v);
                check_host_path(opt, &p)?;
                netns = Netns::Join(p);
            }
            "--tap" => {
                let t = tap_spec(opt, &v)?;
                if taps.iter().any(|x| x.id == t.id || x.ifname == t.ifname) {
                    return Err(format!("{opt} {v}: id or interface given twice"));
                }
                taps.push(t);
            }
            "--cgroup-version" => {
                cgroup_version = match v.as_str() {
                    "1" => CgroupVersion::V1,
                    "2" => CgroupVersion::V2,
                    "auto" => CgroupVersion::Auto,
                    _ => return Err(format!("{opt} {v}: expected 1, 2 or auto")),
                }
            }
            "--parent-cgroup" => {
                check_name(opt, &v)?;
                parent_cgroup = v;
            }
            "--apparmor-profile" => {
                let ok = (1..=255).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic());
                if !ok || v.starts_with(':') {
                    return Err(format!("{opt} '{}': not a profile name", v.escape_debug()));
                }
                apparmor_profile = Some(v);
            }
            "--cpu-quota-us" => {
                let n = num(opt, &v)?;
                if n < 1000 {
                    return Err(format!("{opt} {v}: at least 1000"));
                }
                limits.cpu_quota_us = Some(n);
            }
            "--cpu-period-us" => {
                let n = num(opt, &v)?;
                if !(1000..=1_000_000).contains(&n) {
                    return Err(format!("{opt} {v}: 1000 to 1000000"));
                }
                limits.cpu_period_us = Some(n);
            }
            "--cpu-weight" => {
                let n = num(opt, &v)?;
                if !(1..=10000).contains(&n) {
                    return Err(format!("{opt} {v}: 1 to 10000"));
                }
                limits.cpu_weight = Some(n);
            }
            "--cpuset-cpus" => limits.cpuset_cpus = Some(cpu_list(opt, &v)?),
            "--cpuset-mems" => limits.cpuset_mems = Some(cpu_list(opt, &v)?),
            "--memory-max" => limits.memory_max = Some(size(opt, &v)?),
            "--pids-max" => {
                let n = num(opt, &v)?;
                if n == 0 {
                    return Err(format!("{opt} 0: moat needs at least one task"));
                }
                limits.pids_max = Some(n);
            }
            "--io-max" => limits.io_max.push(io_max(opt, &v)?),
            "--rlimit" => {
                let (name, n) = v
                    .split_once('=')
                    .ok_or_else(|| format!("{opt} {v}: expected NAME=N"))?;
                let res = match name {
                    "nofile" => libc::RLIMIT_NOFILE,
                    "nproc" => libc::RLIMIT_NPROC,
                    "fsize" => libc::RLIMIT_FSIZE,
                    "memlock" => libc::RLIMIT_MEMLOCK,
                    "as" => libc::RLIMIT_AS,
                    "core" => libc::RLIMIT_CORE,
                    _ => {
                        return Err(format!(
                        "{opt} {v}: '{name}' is not one of nofile, nproc, fsize, memlock, as, core"
                    ))
                    }
                };
                limits.rlimits.push((res as i32, num(opt, n)?));
            }
            _ => unreachable!("checked above"),
        }
    }
    let cfg = JailConfig {
        id: id.ok_or("--id is required")?,
        uid: uid.ok_or("--uid is required")?,
        gid: gid.ok_or("--gid is required")?,
        exec_file: exec_file.ok_or("--exec-file is required")?,
        base_dir,
        binds,
        fds,
        netns,
        taps,
        cgroup_version,
        parent_cgroup,
        apparmor_profile,
        limits,
        seccomp_log,
        moat_args,
    };
    if cfg.limits.cpu_period_us.is_some() && cfg.limits.cpu_quota_us.is_none() {
        return Err("--cpu-period-us needs --cpu-quota-us".into());
    }
    let mut dests: Vec<&Path> = cfg.binds.iter().map(|b| b.dest.as_path()).collect();
    dests.sort();
    if let Some(w) = dests.windows(2).find(|w| w[1].starts_with(w[0])) {
        return Err(format!(
            "--ro/--rw: {} and {} overlap",
            w[0].display(),
            w[1].display()
        ));
    }
    Ok(Parsed::Run(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(a: &[&str]) -> Result<JailConfig, String> {
        let v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        match parse(&v)? {
            Parsed::Run(c) => Ok(*c),
            Parsed::Help => Err("help".into()),
        }
    }

    fn base<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "--id",
            "vm-1",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--exec-file",
            "/bin/true",
        ];
        // /bin may be a symlink to /usr/bin on this host.
        if std::fs::canonicalize("/bin/true").unwrap() != Path::new("/bin/true") {
            v[7] = "/usr/bin/true";
        }
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn a_full_command_line() {
        let c = p(&base(&[
            "--ro",
            "/etc/hostname:/kernel",
            "--cpu-quota-us",
            "50000",
            "--memory-max",
            "512M",
            "--cpuset-cpus",
            "0-1,3",
            "--new-netns",
            "--",
            "-kernel",
            "/kernel",
        ]))
        .unwrap();
        assert_eq!(c.id, "vm-1");
        assert_eq!(c.binds[0].dest, Path::new("/kernel"));
        assert_eq!(c.limits.memory_max, Some(512 << 20));
        assert_eq!(c.netns, Netns::New);
        assert_eq!(c.moat_args, ["-kernel", "/kernel"]);
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        for (extra, want) in [
            (&["--id", "../x"][..], "--id"),
            (&["--id", "a b"], "--id"),
            (&["--id", ""], "--id"),
            (&["--uid", "0"], "root"),
            (&["--gid", "0"], "root"),
            (&["--ro", "/etc/../etc/hostname"], "'..'"),
            (&["--ro", "/etc/hostname:/a/../b"], "'..'"),
            (&["--ro", "relative"], "absolute"),
            (&["--ro", "/no/such/file"], "No such file"),
            (&["--ro", "/etc/hostname:/dev/kvm"], "moat-jail's own"),
            (&["--cpu-weight", "0"], "1 to 10000"),
            (&["--cpuset-cpus", "3-1"], "list"),
            (&["--memory-max", "99999999999T"], "too large"),
            (&["--bogus"], "unknown option"),
            (&["--add-fd", "x:/etc/hostname"], "SET:PATH"),
        ] {
            let e = p(&base(extra)).unwrap_err();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        assert!(p(&["--id", "x"]).unwrap_err().contains("required"));
    }
}
