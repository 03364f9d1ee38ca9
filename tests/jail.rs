//! moat-jail as root: a real VM started through it, inspected from the
//! host (namespaces, root contents, cgroup, credentials), and bad input
//! refused with nothing left behind.

mod common;

use common::*;
use moat_guests::TEST_PVH;
use std::collections::BTreeSet;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const JAIL: &str = env!("CARGO_BIN_EXE_moat-jail");

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Wait for `cond` (a hang guard only).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < HANG, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn field(pid: u32, task: &str, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Every path in the jailed root, as moat sees it (without /proc).
fn tree(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(root.join(dir.strip_prefix("/").unwrap())).unwrap() {
        let e = e.unwrap();
        let p = dir.join(e.file_name());
        if p == Path::new("/proc") {
            continue;
        }
        out.insert(p.display().to_string());
        if e.file_type().unwrap().is_dir() {
            tree(root, &p, out);
        }
    }
}

/// All cgroup directories named `id` under the cgroup mounts.
fn cgroups_named(id: &str) -> Vec<PathBuf> {
    let mut found = vec![];
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name() == id {
                    found.push(e.path());
                }
                if d.components().count() < 9 {
                    stack.push(e.path());
                }
            }
        }
    }
    found
}

/// A scratch directory with an empty `base` for per-VM roots, or None
/// (the test is skipped) when not root.
fn jail_scratch(name: &str) -> Option<(PathBuf, PathBuf)> {
    if !is_root() {
        eprintln!("skipped: moat-jail needs root");
        return None;
    }
    let dir = scratch(name);
    let base = dir.join("base");
    std::fs::create_dir(&base).unwrap();
    Some((dir, base))
}

/// The arguments every jail here starts with: VM `id`, uid/gid 65534, the
/// moat under test, roots under `base`; then `rest`.
fn jail_args(id: &str, base: &Path, rest: &[&str]) -> Vec<String> {
    let base = base.display().to_string();
    let common = [
        "--id",
        id,
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--exec-file",
        MOAT,
    ];
    common
        .iter()
        .chain(&["--chroot-base-dir", base.as_str()])
        .chain(rest)
        .map(|s| s.to_string())
        .collect()
}

/// Start moat-jail with `args` (a counting test guest on the serial port,
/// stdout): the jailer, moat's pid (its only child), and the console so far.
fn start_jail(args: &[String]) -> (std::process::Child, u32, String) {
    let mut jailer = Command::new(JAIL)
        .args(args)
        // Inherited, not asked for with --seccomp-log: must not reach moat.
        .env("MOAT_SECCOMP_LOG", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = jailer.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let mut console = String::new();
    wait_for("the guest to count", || {
        while let Ok(s) = rx.try_recv() {
            console.push_str(&s);
        }
        if let Ok(Some(st)) = jailer.try_wait() {
            let mut e = String::new();
            let _ = jailer.stderr.take().unwrap().read_to_string(&mut e);
            panic!("moat-jail exited {st}: {e}\n{console}");
        }
        console.contains("count 3")
    });
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", jailer.id())).unwrap();
    let pid: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap()
            .trim(),
        "moat"
    );
    (jailer, pid, console)
}

/// SIGTERM to the jailer reaches moat, which shuts down: the jailer's status.
fn stop_jail(mut jailer: std::process::Child) -> (Option<i32>, String) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(jailer.id() as i32, libc::SIGTERM) };
    let status = jailer.wait().unwrap();
    let mut err = String::new();
    jailer
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

/// With `--tap`, moat-jail (root) makes the tap inside that namespace and
/// hands moat (nobody, no capabilities) its descriptor; the guest's
/// virtio-net comes up on it.
#[test]
fn a_jailed_vm_joins_a_named_network_namespace() {
    let Some((_dir, base)) = jail_scratch("jail-netns") else {
        return;
    };
    let name = format!("moat-jail-{}", std::process::id());
    let ok = Command::new("ip").args(["netns", "add", &name]).status();
    assert!(ok.is_ok_and(|s| s.success()), "ip netns add (iproute2)");
    let ns = format!("/run/netns/{name}");
    let id = format!("n{}", std::process::id());
    let guest = format!("{TEST_PVH}:/guest.elf");
    let (jailer, pid, console) = start_jail(&jail_args(
        &id,
        &base,
        &[
            "--ro",
            &guest,
            "--netns",
            &ns,
            "--tap",
            "jn0:jt0",
            "--",
            "-kernel",
            "/guest.elf",
            "-append",
            "net=1 action=count",
            "-device",
            "virtio-net-device,netdev=jn0",
            "-nodefaults",
            "-serial",
            "stdio",
        ],
    ));
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let named = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&ns).unwrap());
    let in_ns = Command::new("ip")
        .args(["-n", &name, "link", "show", "jt0"])
        .output()
        .unwrap();
    let on_host = Command::new("ip")
        .args(["link", "show", "jt0"])
        .output()
        .unwrap();
    let tun_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|e| {
            // (The tap's iff line in fdinfo: moat's view of the path
            // differs, /dev/net/tun being outside its root.)
            std::fs::read_to_string(
                Path::new(&format!("/proc/{pid}/fdinfo")).join(e.as_ref().unwrap().file_name()),
            )
            .is_ok_and(|i| i.contains("iff:\tjt0"))
        })
        .count();
    let (code, err) = stop_jail(jailer);
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    assert_eq!(theirs, PathBuf::from(format!("net:[{named}]")));
    assert_eq!(code, Some(0), "{err}");
    assert!(in_ns.status.success(), "the tap is not in the namespace");
    assert!(!on_host.status.success(), "the tap is on the host");
    assert_eq!(tun_fds, 1, "moat holds {tun_fds} tap descriptors");
    assert!(console.contains("net: 1 devices"), "{console}");
    assert!(console.contains("link up"), "{console}");
}

#[test]
fn a_jailed_vm_has_only_what_it_was_given() {
    let Some((dir, base)) = jail_scratch("jail") else {
        return;
    };
    // The disk sits where the VM's user cannot go: it reaches moat as a descriptor.
    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let disk = private.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // A directory for the monitor socket, owned by the VM's user.
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    let id = format!("t{}", std::process::id());
    let rest = [
        "--ro",
        &format!("{TEST_PVH}:/guest.elf"),
        "--rw",
        &format!("{}:/run", run.display()),
        "--add-fd",
        &format!("7:{}", disk.display()),
        "--cpu-quota-us",
        "50000",
        "--cpu-period-us",
        "100000",
        "--memory-max",
        "1G",
        "--pids-max",
        "64",
        "--rlimit",
        "fsize=268435456",
        "--rlimit",
        "nofile=512",
        "--new-netns",
        "--",
        "-kernel",
        "/guest.elf",
        "-append",
        "blk=1 blk_len=4096 blk_write=1 action=count",
        "-smp",
        "2",
        "-drive",
        "file=/dev/fdset/7,format=raw,if=virtio",
        "-qmp",
        "unix:/run/qmp.sock,server=on,wait=off",
        "-nodefaults",
        "-serial",
        "stdio",
    ];
    let (jailer, pid, console) = start_jail(&jail_args(&id, &base, &rest));
    assert!(!console.contains("FAIL"), "{console}");
    assert!(console.contains("blk: 1 devices"), "{console}");
    // Its own namespaces (the network too: --new-netns; the monitor is a
    // UNIX socket, reached through the file system).
    for ns in ["mnt", "pid", "ipc", "uts", "cgroup", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace is the host's");
    }
    // An inherited MOAT_SECCOMP_LOG was not passed on: the filters kill.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("MOAT_SECCOMP_LOG"),
        "{environ:?}"
    );
    // The resource limits given (moat may only lower them further).
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(limit("Max file size"), ["268435456", "268435456"]);
    assert_eq!(limit("Max open files"), ["512", "512"]);
    // Its root: moat, its libraries, two device nodes, the guest, the socket dir.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut seen = BTreeSet::new();
    tree(&root, Path::new("/"), &mut seen);
    let mut want: BTreeSet<String> = [
        "/moat",
        "/dev",
        "/dev/kvm",
        "/dev/urandom",
        "/guest.elf",
        "/run",
        "/run/qmp.sock",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for lib in moat_jail::libraries(Path::new(MOAT)).unwrap() {
        let mut p = lib.as_path();
        while p != Path::new("/") {
            want.insert(p.display().to_string());
            p = p.parent().unwrap();
        }
    }
    assert_eq!(seen, want);
    // The root is read-only; /dev/kvm belongs to the VM's user only.
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&kvm),
            kvm.permissions().mode() & 0o777
        ),
        (65534, 0o600)
    );
    assert!(std::fs::write(root.join("new-file"), b"x").is_err());
    // No way to the host's disk by path: the private directory is not there.
    assert!(!root.join(private.strip_prefix("/").unwrap()).exists());
    // Credentials of every thread.
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(tasks.len() >= 4, "{tasks:?}");
    for t in &tasks {
        assert_eq!(field(pid, t, "Uid"), "65534\t65534\t65534\t65534");
        assert_eq!(field(pid, t, "Gid"), "65534\t65534\t65534\t65534");
        assert_eq!(field(pid, t, "Groups"), "");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(pid, t, cap), "0000000000000000", "{cap}");
        }
        assert_eq!(field(pid, t, "NoNewPrivs"), "1");
        assert_eq!(field(pid, t, "Seccomp"), "2");
    }
    // Its cgroup holds it, with the limits given.
    let groups = cgroups_named(&id);
    assert!(!groups.is_empty());
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = groups.iter().any(|g| g.join("cgroup.controllers").exists());
    let (quota, mem, pids) = if v2 {
        let g = &groups[0];
        (
            std::fs::read_to_string(g.join("cpu.max")).unwrap(),
            std::fs::read_to_string(g.join("memory.max")).unwrap(),
            std::fs::read_to_string(g.join("pids.max")).unwrap(),
        )
    } else {
        let find = |f: &str| {
            groups
                .iter()
                .find_map(|g| std::fs::read_to_string(g.join(f)).ok())
                .unwrap_or_else(|| panic!("no {f} in {groups:?}"))
        };
        (
            format!(
                "{} {}",
                find("cpu.cfs_quota_us").trim(),
                find("cpu.cfs_period_us").trim()
            ),
            find("memory.limit_in_bytes"),
            find("pids.max"),
        )
    };
    assert_eq!(quota.trim(), "50000 100000");
    assert_eq!(mem.trim(), (1u64 << 30).to_string());
    assert_eq!(pids.trim(), "64");
    for g in &groups {
        let procs = std::fs::read_to_string(g.join("cgroup.procs")).unwrap();
        assert!(
            procs.split_whitespace().any(|p| p == pid.to_string()),
            "{} does not hold moat ({cg})",
            g.display()
        );
    }
    // The monitor in the jail is reachable through the shared directory.
    let mut s = std::os::unix::net::UnixStream::connect(run.join("qmp.sock")).unwrap();
    let mut greeting = [0u8; 64];
    let n = s.read(&mut greeting).unwrap();
    assert!(String::from_utf8_lossy(&greeting[..n]).contains("QMP"));
    drop(s);
    // SIGTERM to the jailer reaches moat, which shuts down; then everything goes.
    let (code, err) = stop_jail(jailer);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("terminating on signal 15"), "{err}");
    assert!(!base.join(&id).exists(), "the per-VM root was left behind");
    assert_eq!(cgroups_named(&id), Vec::<PathBuf>::new());
    // The guest's write went through the passed descriptor.
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(data[8 * 512 + 1], 7 + 3);
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let Some((dir, base)) = jail_scratch("jail-bad") else {
        return;
    };
    let file = dir.join("kernel");
    std::fs::write(&file, b"x").unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink("/etc/shadow", &link).unwrap();
    let taken = "taken";
    std::fs::create_dir(base.join(taken)).unwrap();
    let f = file.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--id".into(), "../up".into()], "--id"),
        (vec!["--id".into(), "a;b".into()], "--id"),
        (vec!["--id".into(), "x".repeat(65)], "--id"),
        (vec!["--uid".into(), "0".into()], "root"),
        (vec!["--gid".into(), "0".into()], "root"),
        (
            vec!["--ro".into(), format!("{}/../kernel", dir.display())],
            "'..'",
        ),
        (vec!["--ro".into(), format!("{f}:/a/../../etc")], "'..'"),
        (vec!["--ro".into(), link.display().to_string()], "symlink"),
        (
            vec!["--add-fd".into(), format!("1:{}", link.display())],
            "symlink",
        ),
        (
            vec!["--ro".into(), format!("{}/missing", dir.display())],
            "No such file",
        ),
        (
            vec!["--exec-file".into(), format!("{}/missing", dir.display())],
            "No such file",
        ),
        (vec!["--exec-file".into(), f.clone()], "not a 64-bit ELF"),
        (
            vec!["--id".into(), taken.into()],
            "moat-jail did not make it",
        ),
        (
            vec!["--ro".into(), format!("{f}:/dev/kvm")],
            "moat-jail's own",
        ),
        (vec!["--memory-max".into(), "lots".into()], "integer"),
        (
            vec!["--tap".into(), "1n:t0".into()],
            "not a valid netdev id",
        ),
        (
            vec!["--tap".into(), "n0:a/b".into()],
            "not an interface name",
        ),
        (
            vec!["--tap".into(), format!("n0:{}", "t".repeat(16))],
            "not an interface name",
        ),
        (
            vec!["--tap".into(), "n0:t0:99".into()],
            "QUEUES must be 1 to 16",
        ),
        (vec!["--cpu-quota-us".into(), "-5".into()], "integer"),
        (vec!["--pids-max".into(), "0".into()], "at least one"),
        (
            vec!["--netns".into(), "/no/such/netns".into()],
            "No such file",
        ),
        (vec!["--rlimit".into(), "stack=1".into()], "not one of"),
        (vec!["--rlimit".into(), "nofile".into()], "NAME=N"),
    ];
    let mut cases = cases;
    if !Path::new("/sys/module/apparmor/parameters/enabled").exists() {
        cases.push((
            vec!["--apparmor-profile".into(), "moat-jailed".into()],
            "AppArmor is not enabled",
        ));
    }
    for (extra, want) in cases {
        let mut args = jail_args("vm", &base, &[]);
        args.extend(extra.iter().cloned());
        args.push("--".into());
        let out = Command::new(JAIL).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(
            err.starts_with("moat-jail: ") && err.contains(want),
            "{extra:?}: {err}"
        );
        // Nothing made, and the existing root left as it was.
        let left: Vec<_> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [taken], "{extra:?}");
        assert_eq!(cgroups_named("vm"), Vec::<PathBuf>::new(), "{extra:?}");
    }
    // A base directory others can write to: someone else could swap what
    // moat-jail makes there.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut args = jail_args("vm", &base, &[]);
    args.push("--".into());
    let out = Command::new(JAIL).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("writable by group or others"), "{err}");
    assert_eq!(cgroups_named("vm"), Vec::<PathBuf>::new());
}

/// virtio-vsock in the jail: moat makes its listener inside the jail's
/// root (a `--rw` directory, so the host reaches it by path), and a guest
/// connection to port 5000 reaches a listener the host put in the same
/// directory, through moat's sandbox as nobody.
#[test]
fn a_jailed_vsock_reaches_host_listeners_by_path() {
    let Some((dir, base)) = jail_scratch("jail-vsock") else {
        return;
    };
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(run.join("v.sock_5000")).unwrap();
    // moat runs as nobody: the socket must be writable for it.
    std::fs::set_permissions(
        run.join("v.sock_5000"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    let id = format!("v{}", std::process::id());
    let guest = format!("{TEST_PVH}:/guest.elf");
    let rw = format!("{}:/run", run.display());
    let (jailer, _pid, console) = start_jail(&jail_args(
        &id,
        &base,
        &[
            "--ro",
            &guest,
            "--rw",
            &rw,
            "--",
            "-kernel",
            "/guest.elf",
            "-append",
            "vsock=3 vsock_connect=5000 action=count",
            "-device",
            "virtio-vsock-device,guest-cid=3,uds-path=/run/v.sock",
            "-nodefaults",
            "-serial",
            "stdio",
        ],
    ));
    let made = std::fs::symlink_metadata(run.join("v.sock"));
    let (code, err) = stop_jail(jailer);
    assert_eq!(code, Some(0), "{err}");
    assert!(console.contains("vsock: stream ok"), "{console}");
    assert!(
        made.is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())),
        "moat's listener is not in the jail's /run"
    );
}
