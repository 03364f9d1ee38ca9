//! Confinement of a running moat (`-sandbox on`, the default).
//!
//! After setup has opened everything (kernel, images, sockets, /dev/kvm) and
//! before the first guest instruction, [`harden`] makes the process
//! non-dumpable and sets `no_new_privs` and rlimits, and [`install_filter`]
//! installs one seccomp allow-list on every thread at once
//! (`SECCOMP_FILTER_FLAG_TSYNC`); threads made later inherit it. A syscall
//! outside the list kills the whole process (`SECCOMP_RET_KILL_PROCESS`),
//! which the kernel logs as an audit event (type=1326) naming the syscall.
//!
//! That list, in [`rules`], is the union of the per-role lists in `roles`
//! (each syscall with its reason); argument filters narrow the risky ones:
//! `ioctl` only the KVM requests moat makes, by number, and the terminal's;
//! `socketpair` only AF_UNIX, `socket` only AF_UNIX stream or seqpacket
//! sockets, non-blocking (the vsock thread's); `clone` only for threads
//! (`clone3`, whose flags a filter cannot see, answers ENOSYS so the C
//! library falls back to `clone`); `mmap`/`mprotect` never `PROT_EXEC`;
//! `tgkill` only to moat's own threads with the vCPU kick or SIGABRT;
//! `prctl` only thread names and no_new_privs. Not in the list, so fatal:
//! `execve`, `fork`, `ptrace`, `mount`, `open_by_handle_at`, `bpf`,
//! `kexec_load`, `setuid` and every other privilege change, ... Each thread
//! then stacks its role's own narrower filter ([`RoleFilters`]).
//!
//! What this does not give: moat's threads share one address space, so
//! code running in any thread can write the memory every other thread
//! uses; the process-wide list, the union of all roles, is the real
//! boundary against such code. Per-role filters catch a thread doing what
//! its role never does; device backends in processes of their own are the
//! answer to the rest (see ARCHITECTURE.md).

use std::collections::BTreeMap;

mod confine;
mod kvm;
pub mod landlock;
pub mod privs;
mod roles;

pub use confine::{confine, Policy};
pub use roles::{role_rules, RoleFilters};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// The process-wide list: what any thread of any role may call, once the
/// guest runs. It is the union of the per-role lists in [`roles`] (the
/// main thread's included), so each call and its reason is written once,
/// in the role that needs it.
fn allowed() -> Vec<(i64, &'static str)> {
    let mut seen = std::collections::BTreeSet::new();
    roles::all_lists()
        .into_iter()
        .filter(|(nr, _)| seen.insert(*nr))
        .collect()
}

fn cond(arg: u8, op: SeccompCmpOp, v: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, v).expect("valid condition")
}

/// The filter's rules: syscall number -> conditions (empty: any arguments).
pub fn rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> =
        allowed().into_iter().map(|(n, _)| (n, vec![])).collect();
    let rule = |c: Vec<SeccompCondition>| SeccompRule::new(c).expect("valid rule");
    // ioctl: KVM's, by exact number (vCPU run and registers, a new VM on
    // reset), and the terminal's (raw mode, window size).
    let mut ioctl: Vec<SeccompRule> = kvm::all()
        .into_iter()
        .chain(roles::net_ioctls())
        .map(|(req, _)| rule(vec![cond(1, SeccompCmpOp::Eq, req)]))
        .collect();
    // (The termios2 forms are what rustix uses to restore the terminal.)
    for req in [
        libc::TCGETS,
        libc::TCSETS,
        libc::TCSETSW,
        libc::TCSETSF,
        libc::TCGETS2,
        libc::TCSETS2,
        libc::TCSETSW2,
        libc::TCSETSF2,
        libc::TIOCGWINSZ,
        libc::FIONBIO,
    ] {
        ioctl.push(rule(vec![cond(1, SeccompCmpOp::Eq, req)]));
    }
    m.insert(libc::SYS_ioctl, ioctl);
    // socket: only the vsock thread's connections (its role alone lists
    // it): AF_UNIX, stream or seqpacket, non-blocking and close-on-exec.
    if m.contains_key(&libc::SYS_socket) {
        let flags = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
        m.insert(
            libc::SYS_socket,
            [libc::SOCK_STREAM, libc::SOCK_SEQPACKET]
                .into_iter()
                .map(|t| {
                    rule(vec![
                        cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64),
                        cond(1, SeccompCmpOp::Eq, t as u64 | flags),
                    ])
                })
                .collect(),
        );
    }
    // socketpair: UNIX domain only (TLS relays).
    if m.contains_key(&libc::SYS_socketpair) {
        m.insert(
            libc::SYS_socketpair,
            vec![rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])],
        );
    }
    // mmap/mprotect: never executable memory once the guest runs (all of
    // moat's code is mapped by then; nothing loads code later).
    let exec = libc::PROT_EXEC as u64;
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        m.insert(
            nr,
            vec![rule(vec![cond(2, SeccompCmpOp::MaskedEq(exec), 0)])],
        );
    }
    // tgkill: only to moat's own threads, and only the vCPU kick
    // (SIGRTMIN, see moat-vmm's control) or SIGABRT (abort), as Firecracker
    // allows it.
    let pid = u64::from(std::process::id());
    m.insert(
        libc::SYS_tgkill,
        [libc::SIGRTMIN(), libc::SIGABRT]
            .into_iter()
            .map(|sig| {
                rule(vec![
                    cond(0, SeccompCmpOp::Eq, pid),
                    cond(2, SeccompCmpOp::Eq, sig as u64),
                ])
            })
            .collect(),
    );
    // prctl: thread names, and no_new_privs (seccompiler sets it before
    // each filter it applies); nothing that could turn dumpable back on.
    m.insert(
        libc::SYS_prctl,
        vec![
            rule(vec![cond(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)]),
            rule(vec![
                cond(0, SeccompCmpOp::Eq, libc::PR_SET_NO_NEW_PRIVS as u64),
                cond(1, SeccompCmpOp::Eq, 1),
            ]),
        ],
    );
    // clone3 never reaches these rules (see `filter`).
    m.remove(&libc::SYS_clone3);
    // seccomp: a thread stacking its role's filter on itself (no flags:
    // not TSYNC, not a user-notification listener). A filter only ever
    // takes calls away.
    m.insert(
        libc::SYS_seccomp,
        vec![rule(vec![
            cond(0, SeccompCmpOp::Eq, libc::SECCOMP_SET_MODE_FILTER as u64),
            cond(1, SeccompCmpOp::Eq, 0),
        ])],
    );
    // clone: threads only (CLONE_THREAD set), never a new process.
    let thread = libc::CLONE_THREAD as u64;
    m.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)])],
    );
    m
}

/// How a syscall outside the list is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Kill the process (the default).
    Kill,
    /// Allow and log (MOAT_SECCOMP_LOG=1, for finding what a new feature needs).
    Log,
}

/// Compile `rules` into a filter that answers everything else as
/// `on_violation` says.
pub(crate) fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    on_violation: Violation,
) -> Result<BpfProgram, String> {
    let mismatch = match on_violation {
        Violation::Kill => SeccompAction::KillProcess,
        Violation::Log => SeccompAction::Log,
    };
    let f = SeccompFilter::new(
        rules,
        mismatch,
        SeccompAction::Allow,
        std::env::consts::ARCH
            .try_into()
            .map_err(|e| format!("{e:?}"))?,
    )
    .map_err(|e| e.to_string())?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// The compiled process-wide allow-list.
pub fn filter(on_violation: Violation) -> Result<BpfProgram, String> {
    // clone3 hides its flags in memory a filter cannot read: ENOSYS makes
    // the C library use clone(), whose flags `rules` checks.
    let mut prog = compile(rules(), on_violation)?;
    prepend_errno(&mut prog, &[libc::SYS_clone3], libc::ENOSYS);
    Ok(prog)
}

/// Insert, right after seccompiler's architecture check, "if nr is one of
/// `nrs`, return ERRNO(`errno`)": the call fails as the kernel could have
/// failed it, instead of killing the process.
pub(crate) fn prepend_errno(prog: &mut BpfProgram, nrs: &[i64], errno: i32) {
    use seccompiler::sock_filter;
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    // load nr; for each nr: jeq -> the return at the end; else fall through
    // past it.
    let mut block = vec![ins(BPF_LD_W_ABS, 0, 0, 0)]; // seccomp_data.nr
    for (i, &nr) in nrs.iter().enumerate() {
        let to_ret = (nrs.len() - 1 - i) as u8 + 1; // skip the remaining jeqs and the ja
        block.push(ins(BPF_JEQ_K, to_ret, 0, nr as u32));
    }
    const BPF_JA: u16 = 0x05;
    block.push(ins(BPF_JA, 0, 0, 1)); // none matched: skip the return
    block.push(ins(
        BPF_RET_K,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA),
    ));
    // seccompiler starts with: load arch, jeq arch (skip 1), ret kill.
    let at = 3.min(prog.len());
    prog.splice(at..at, block);
}

/// Make the process non-dumpable (no core dumps of guest memory, no
/// ptrace by same-uid processes) and unable to gain privileges.
pub fn harden() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_DUMPABLE: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "PR_SET_NO_NEW_PRIVS: {}",
            std::io::Error::last_os_error()
        ));
    }
    // No core files; at most 4096 descriptors (moat needs a few dozen:
    // images, sockets, eventfds, up to 256 passed in, monitor clients).
    for (res, max) in [(libc::RLIMIT_CORE, 0), (libc::RLIMIT_NOFILE, 4096)] {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: get/setrlimit with a valid rlimit struct.
        unsafe {
            if libc::getrlimit(res, &mut cur) == 0 {
                let lim = libc::rlimit {
                    rlim_cur: cur.rlim_cur.min(max),
                    rlim_max: cur.rlim_max.min(max),
                };
                if libc::setrlimit(res, &lim) != 0 {
                    return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
                }
            }
        }
    }
    Ok(())
}

/// Install the allow-list on every thread ([`harden`] first: seccomp
/// needs no_new_privs).
pub fn install_filter(on_violation: Violation) -> Result<(), String> {
    let prog = filter(on_violation)?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| format!("seccomp: {e}"))
}

/// Run `body` in a forked child under `filters` (stacked in order); how
/// did the child end: (exit code, or killing signal)? (Forking a threaded
/// test process is fine: the child only makes raw system calls and `_exit`s.)
#[cfg(test)]
pub(crate) fn in_child_under(
    filters: &[BpfProgram],
    body: fn() -> i32,
) -> (Option<i32>, Option<i32>) {
    // SAFETY: the child only calls async-signal-safe functions.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        for prog in filters {
            if seccompiler::apply_filter(prog).is_err() {
                // SAFETY: ending the child.
                unsafe { libc::_exit(90) };
            }
        }
        let code = body();
        // SAFETY: ending the child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (Some(libc::WEXITSTATUS(status)), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_child(body: fn() -> i32) -> (Option<i32>, Option<i32>) {
        in_child_under(&[filter(Violation::Kill).unwrap()], body)
    }

    #[test]
    fn listed_syscalls_pass() {
        let r = in_child(|| {
            // SAFETY: plain system calls with valid or harmless arguments.
            unsafe {
                libc::getpid();
                libc::gettid();
                let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
                let one = 1u64;
                libc::write(fd, &one as *const u64 as *const _, 8);
                libc::close(fd);
                let mut sv = [0; 2];
                libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr());
                libc::close(sv[0]);
                libc::close(sv[1]);
                let s = libc::socket(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                );
                libc::close(s);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::mprotect(p, 4096, libc::PROT_READ);
                libc::prctl(libc::PR_SET_NAME, c"x".as_ptr());
                // KVM_RUN on a non-KVM descriptor: allowed by the filter,
                // refused by the kernel (ENOTTY), not fatal.
                libc::ioctl(0, 0xAE80);
                // clone3 answers ENOSYS (so threads fall back to clone).
                if libc::syscall(libc::SYS_clone3, 0usize, 0usize) != -1
                    || *libc::__errno_location() != libc::ENOSYS
                {
                    return 3;
                }
            }
            0
        });
        assert_eq!(r, (Some(0), None));
    }

    #[test]
    fn unlisted_syscalls_kill_the_process() {
        type Case = (&'static str, fn() -> i32);
        let cases: [Case; 14] = [
            ("execve", || {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                // SAFETY: valid NUL-terminated strings and arrays.
                unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
                0
            }),
            // SAFETY: raw system calls; the filter stops them first.
            ("fork", || unsafe {
                libc::syscall(libc::SYS_fork);
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("clone without CLONE_THREAD", || unsafe {
                libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("ptrace", || unsafe {
                libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0);
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("mount", || unsafe {
                libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0);
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("socket AF_INET", || unsafe {
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("socket AF_UNIX blocking", || unsafe {
                libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("socket AF_UNIX datagram", || unsafe {
                libc::socket(
                    libc::AF_UNIX,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                );
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("mmap PROT_EXEC", || unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("mprotect to PROT_EXEC", || unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC);
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("prctl PR_SET_DUMPABLE", || unsafe {
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
                0
            }),
            // SAFETY: a raw system call the filter under test stops first.
            ("tgkill to another process", || unsafe {
                libc::syscall(libc::SYS_tgkill, 1, 1, 0);
                0
            }),
            (
                "a KVM ioctl moat does not make (KVM_GET_DIRTY_LOG)",
                // SAFETY: a raw system call the filter under test stops first.
                || unsafe {
                    libc::ioctl(0, 0x4010_AE42_u64);
                    0
                },
            ),
            // SAFETY: a raw system call the filter under test stops first.
            ("ioctl of another type", || unsafe {
                libc::ioctl(0, 0x5401_u64 + 0x100);
                0
            }),
        ];
        for (name, body) in cases {
            assert_eq!(in_child(body), (None, Some(libc::SIGSYS)), "{name}");
        }
    }

    #[test]
    fn tgkill_reaches_own_threads_with_the_kick_or_abort_only() {
        // The filter names the pid it was made in: make it in the child.
        let r = in_child_under(&[], || {
            let Ok(prog) = filter(Violation::Kill) else {
                return 4;
            };
            if seccompiler::apply_filter(&prog).is_err() {
                return 5;
            }
            // SAFETY: signals to this very thread, the kick one ignored.
            unsafe {
                libc::signal(libc::SIGRTMIN(), libc::SIG_IGN);
                let (pid, tid) = (libc::getpid(), libc::gettid());
                if libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGRTMIN()) != 0 {
                    return 3;
                }
                // Any other signal, even to itself: killed.
                libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR1);
            }
            0
        });
        assert_eq!(r, (None, Some(libc::SIGSYS)));
    }

    #[test]
    fn every_listed_syscall_has_a_reason() {
        for (nr, why) in allowed() {
            assert!(why.len() > 3, "syscall {nr}");
        }
        // Nothing that changes privileges or spawns programs.
        let r = rules();
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_setgid,
            libc::SYS_mount,
            libc::SYS_open_by_handle_at,
            libc::SYS_bpf,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_unshare,
            libc::SYS_setns,
        ] {
            assert!(!r.contains_key(&nr), "{nr} is allowed");
        }
    }
}
