//! Per-role seccomp filters, stacked on the process-wide list ([`crate::rules`])
//! by each thread when it starts (see `moat_sys::role`): a thread can then
//! make only the calls both lists allow. Each list is the role's whole
//! need, with the reason; what every thread needs is in [`any_thread`].

use crate::{cond, Violation};
use moat_sys::role::Role;
use seccompiler::{BpfProgram, SeccompCmpOp, SeccompRule};
use std::collections::BTreeMap;

/// What any moat thread may do: memory, locks, signals, logging, ending.
fn any_thread() -> Vec<(i64, &'static str)> {
    vec![
        (libc::SYS_read, "eventfds and pipes"),
        (
            libc::SYS_write,
            "eventfds, the log on stderr, signal handlers' pipe",
        ),
        (libc::SYS_close, "descriptors it owns"),
        (libc::SYS_futex, "locks and channels"),
        (libc::SYS_mmap, "the allocator (never PROT_EXEC)"),
        (libc::SYS_munmap, "the allocator"),
        (libc::SYS_mremap, "the allocator"),
        (
            libc::SYS_mprotect,
            "the allocator's arenas (never PROT_EXEC)",
        ),
        (libc::SYS_madvise, "the allocator"),
        (libc::SYS_brk, "the allocator"),
        (
            libc::SYS_rt_sigreturn,
            "signal handlers (vCPU kick, signal-hook)",
        ),
        (
            libc::SYS_restart_syscall,
            "a timed wait or sleep resuming after a signal handler ran",
        ),
        (libc::SYS_rt_sigprocmask, "abort, thread exit"),
        (libc::SYS_rt_sigaction, "abort, signal handlers"),
        (libc::SYS_sigaltstack, "thread exit (std)"),
        (libc::SYS_sched_yield, "spinning locks"),
        (libc::SYS_clock_gettime, "time (when not in the vDSO)"),
        (libc::SYS_clock_nanosleep, "sleeps"),
        (libc::SYS_nanosleep, "sleeps"),
        (libc::SYS_getrandom, "hash maps"),
        (libc::SYS_getpid, "abort"),
        (libc::SYS_gettid, "abort, thread ids"),
        (
            libc::SYS_tgkill,
            "abort (SIGABRT), vCPU kicks; own threads only, checked globally",
        ),
        (libc::SYS_exit, "thread exit"),
        (libc::SYS_exit_group, "process exit"),
    ]
}

/// Making threads (std::thread): `clone` is checked by the process-wide list.
fn threads() -> Vec<(i64, &'static str)> {
    vec![
        (
            libc::SYS_clone,
            "new threads (CLONE_THREAD only, checked globally)",
        ),
        (libc::SYS_clone3, "answered ENOSYS globally"),
        (libc::SYS_set_robust_list, "new threads"),
        (libc::SYS_rseq, "new threads"),
        (libc::SYS_sched_getaffinity, "new threads (std)"),
        (
            libc::SYS_prctl,
            "thread names, no_new_privs; checked globally",
        ),
    ]
}

/// The main thread's calls beyond [`any_thread`]: it keeps only the
/// process-wide filter (it rebuilds the VM on reset, with its vCPU and I/O
/// threads, and writes images back and removes files at exit).
fn main_thread() -> Vec<(i64, &'static str)> {
    let mut v = threads();
    v.extend([
        (libc::SYS_eventfd2, "reset: device and interrupt eventfds"),
        (libc::SYS_fcntl, "reset: duplicating eventfds"),
        (
            libc::SYS_pread64,
            "reset: kernel and initrd read again; exit: qcow2 metadata write-back",
        ),
        (libc::SYS_pwrite64, "exit: qcow2 metadata write-back"),
        (libc::SYS_preadv, "exit: qcow2 metadata write-back (imago)"),
        (libc::SYS_pwritev, "exit: qcow2 metadata write-back (imago)"),
        (libc::SYS_ftruncate, "exit: qcow2 metadata write-back"),
        (libc::SYS_fsync, "exit: images made durable"),
        (libc::SYS_fdatasync, "exit: images made durable"),
        (libc::SYS_lseek, "image sizes"),
        (libc::SYS_fstat, "file metadata (std)"),
        (
            libc::SYS_newfstatat,
            "exit: is the socket file still ours (std)",
        ),
        (libc::SYS_statx, "exit: is the socket file still ours (std)"),
        (libc::SYS_unlink, "exit: the pid file and socket files"),
        (
            libc::SYS_openat,
            "std's reads of /proc; Landlock limits paths",
        ),
        (libc::SYS_dup, "descriptors"),
        (libc::SYS_poll, "waiting for I/O threads"),
        (libc::SYS_ppoll, "waiting for I/O threads"),
        (libc::SYS_epoll_create1, "event loops"),
        (libc::SYS_epoll_ctl, "event loops"),
        (libc::SYS_epoll_wait, "event loops"),
        (libc::SYS_epoll_pwait, "event loops"),
        (libc::SYS_pipe2, "signal delivery (signal-hook)"),
        (libc::SYS_readv, "files (std)"),
        (libc::SYS_writev, "the console, files (std)"),
        (libc::SYS_flock, "the pid file"),
        (libc::SYS_fallocate, "disk images"),
    ]);
    v
}

/// Every list, any thread's first: the process-wide filter is their union.
pub(crate) fn all_lists() -> Vec<(i64, &'static str)> {
    let mut v = any_thread();
    v.extend(main_thread());
    for &role in Role::ALL {
        v.extend(role_allowed(role));
    }
    v
}

/// The role's own calls beyond [`any_thread`].
fn role_allowed(role: Role) -> Vec<(i64, &'static str)> {
    match role {
        Role::Vcpu => vec![
            (
                libc::SYS_eventfd2,
                "virtio activation: the I/O thread's stop event",
            ),
            (libc::SYS_fcntl, "virtio activation: duplicating an eventfd"),
        ],
        Role::BlockIo => vec![
            (libc::SYS_pread64, "image reads"),
            (libc::SYS_pwrite64, "image writes"),
            (libc::SYS_preadv, "image reads (imago)"),
            (libc::SYS_pwritev, "image writes (imago)"),
            (libc::SYS_fsync, "guest flush"),
            (libc::SYS_fdatasync, "guest flush"),
            (libc::SYS_fallocate, "discard and write-zeroes"),
            (libc::SYS_ftruncate, "qcow2 images growing"),
            (libc::SYS_lseek, "image sizes"),
            (libc::SYS_fstat, "image sizes"),
            (libc::SYS_newfstatat, "image sizes (std)"),
            (libc::SYS_statx, "image sizes (std)"),
            (
                libc::SYS_poll,
                "waiting for the queue notification or a stop",
            ),
            (
                libc::SYS_ppoll,
                "waiting for the queue notification or a stop",
            ),
        ],
        Role::NetIo => vec![
            (libc::SYS_readv, "frames from the tap or socket"),
            (libc::SYS_writev, "frames to the tap or socket"),
            (libc::SYS_recvfrom, "frames from a stream socket"),
            (libc::SYS_sendto, "frames to a stream socket"),
            (libc::SYS_sendmsg, "frames to a stream socket (writev)"),
            (
                libc::SYS_poll,
                "waiting for frames, queue notifications or a stop",
            ),
            (
                libc::SYS_ppoll,
                "waiting for frames, queue notifications or a stop",
            ),
        ],
        // (read and getrandom are every thread's.)
        Role::RngIo => vec![
            (
                libc::SYS_poll,
                "waiting for requests, the source, the rate limit or a stop",
            ),
            (
                libc::SYS_ppoll,
                "waiting for requests, the source, the rate limit or a stop",
            ),
        ],
        Role::VsockIo => vec![
            (
                libc::SYS_socket,
                "connections to <uds-path>_<port> (AF_UNIX stream or seqpacket only, checked globally)",
            ),
            (libc::SYS_connect, "connections to <uds-path>_<port>"),
            (libc::SYS_accept4, "host connections on the device's listeners"),
            (libc::SYS_recvfrom, "host socket bytes"),
            (libc::SYS_sendto, "bytes to host sockets"),
            (libc::SYS_shutdown, "the guest shut its sending side"),
            (libc::SYS_setsockopt, "SO_SNDBUF of SEQPACKET connections"),
            (
                libc::SYS_poll,
                "waiting for queues, host sockets, a deadline or a stop",
            ),
            (
                libc::SYS_ppoll,
                "waiting for queues, host sockets, a deadline or a stop",
            ),
        ],
        Role::Monitor => {
            let mut v = threads();
            v.extend([
                (libc::SYS_accept4, "clients"),
                (libc::SYS_recvfrom, "client bytes"),
                (libc::SYS_sendto, "replies and events"),
                (
                    libc::SYS_recvmsg,
                    "descriptors passed by clients (getfd, add-fd)",
                ),
                (libc::SYS_sendmsg, "replies"),
                (libc::SYS_readv, "client bytes (std)"),
                (libc::SYS_writev, "replies (std)"),
                (
                    libc::SYS_socketpair,
                    "TLS relays (AF_UNIX only, checked globally)",
                ),
                (libc::SYS_shutdown, "closing clients"),
                (libc::SYS_getsockname, "sockets"),
                (libc::SYS_getpeername, "sockets"),
                (libc::SYS_getsockopt, "sockets"),
                (libc::SYS_setsockopt, "sockets"),
                (libc::SYS_poll, "client I/O"),
                (libc::SYS_ppoll, "client I/O"),
                (libc::SYS_fcntl, "descriptor flags, fd sets"),
                (libc::SYS_dup, "fd sets"),
                (
                    libc::SYS_openat,
                    "query-block reads image headers (Landlock limits paths)",
                ),
                (libc::SYS_fstat, "query-block image sizes"),
                (libc::SYS_newfstatat, "query-block image sizes"),
                (libc::SYS_statx, "query-block image sizes"),
                (libc::SYS_lseek, "query-block image headers"),
                (libc::SYS_pread64, "query-block image headers"),
            ]);
            v
        }
        Role::Io => {
            let mut v = threads();
            v.extend([
                (libc::SYS_accept4, "serial unix socket clients"),
                (libc::SYS_poll, "console input"),
                (libc::SYS_ppoll, "console input"),
                (libc::SYS_fcntl, "descriptor flags"),
                (libc::SYS_recvfrom, "serial socket input"),
                (libc::SYS_sendto, "serial socket output"),
                (libc::SYS_shutdown, "serial socket clients"),
                (libc::SYS_readv, "console input (std)"),
                (libc::SYS_writev, "console output (std)"),
            ]);
            v
        }
    }
}

/// The ioctl requests a role makes (the vCPU's KVM calls by exact number).
fn ioctls(role: Role) -> Vec<(u64, &'static str)> {
    match role {
        Role::Vcpu => crate::kvm::vcpu(),
        // The guest's offloads and queue pairs, applied to the tap.
        Role::NetIo => vec![
            (
                libc::TUNSETOFFLOAD,
                "TUNSETOFFLOAD: the offloads the guest set",
            ),
            (
                libc::TUNSETQUEUE,
                "TUNSETQUEUE: queue pairs the guest enabled",
            ),
        ],
        Role::Monitor | Role::Io | Role::BlockIo | Role::RngIo | Role::VsockIo => vec![],
    }
}

/// The tap ioctls network threads make (the process-wide list allows them).
pub(crate) fn net_ioctls() -> Vec<(u64, &'static str)> {
    ioctls(Role::NetIo)
}

/// One role's rules: syscall -> conditions (empty: any arguments).
pub fn role_rules(role: Role) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = any_thread()
        .into_iter()
        .chain(role_allowed(role))
        .map(|(n, _)| (n, vec![]))
        .collect();
    let rule = |c| SeccompRule::new(c).expect("valid rule");
    let ioctl: Vec<SeccompRule> = ioctls(role)
        .into_iter()
        .map(|(req, _)| rule(vec![cond(1, SeccompCmpOp::Eq, req)]))
        .collect();
    if !ioctl.is_empty() {
        m.insert(libc::SYS_ioctl, ioctl);
    }
    m
}

/// Calls a role without them gets answered EACCES instead of a kill: the
/// C library opens files behind the program's back (glibc's malloc reads
/// /proc/sys/vm/overcommit_memory the first time a thread's arena shrinks,
/// which a zstd-compressed qcow2 read triggered in a virtio-blk thread) and
/// copes with a refusal. A refusal gives nothing away; Landlock would
/// refuse the path anyway.
const REFUSED_OPENS: [i64; 1] = [libc::SYS_openat];

fn compile(role: Role, on_violation: Violation) -> Result<BpfProgram, String> {
    let rules = role_rules(role);
    let opens = rules.contains_key(&libc::SYS_openat);
    let mut prog = crate::compile(rules, on_violation)?;
    if !opens {
        crate::prepend_errno(&mut prog, &REFUSED_OPENS, libc::EACCES);
    }
    Ok(prog)
}

/// The compiled filter of every role, made once.
pub struct RoleFilters(Vec<(Role, BpfProgram)>);

impl RoleFilters {
    pub fn new(on_violation: Violation) -> Result<RoleFilters, String> {
        Role::ALL
            .iter()
            .map(|&r| Ok((r, compile(r, on_violation)?)))
            .collect::<Result<_, String>>()
            .map(RoleFilters)
    }

    /// Stack `role`'s filter on the calling thread.
    pub fn apply(&self, role: Role) -> Result<(), String> {
        let (_, prog) = self
            .0
            .iter()
            .find(|(r, _)| *r == role)
            .ok_or_else(|| format!("no filter for {role:?}"))?;
        seccompiler::apply_filter(prog).map_err(|e| format!("seccomp ({role:?}): {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_child_under;

    /// The process-wide filter, then the role's: as a thread of that role runs.
    fn under(role: Role, body: fn() -> i32) -> End {
        let global = crate::filter(Violation::Kill).unwrap();
        in_child_under(&[global, compile(role, Violation::Kill).unwrap()], body)
    }

    /// How the child ended: (exit code, or the signal that killed it).
    type End = (Option<i32>, Option<i32>);
    const KILLED: End = (None, Some(libc::SIGSYS));
    const PASSED: End = (Some(0), None);
    /// A role, what is tried, the attempt, and how it must end.
    type Case = (Role, &'static str, fn() -> i32, End);

    // The bodies below make raw system calls with harmless arguments;
    // the filters decide before the kernel looks at the arguments.
    fn openat() -> i32 {
        // SAFETY: a raw system call with harmless arguments (the filters under test decide before the kernel uses them).
        unsafe { libc::open(c"/".as_ptr(), libc::O_RDONLY) };
        0
    }
    /// What glibc's malloc does in any thread: open a /proc file, read-only.
    fn openat_refused() -> i32 {
        // SAFETY: a raw system call with harmless arguments (the filters under test decide before the kernel uses them).
        let fd = unsafe {
            libc::open(
                c"/proc/sys/vm/overcommit_memory".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
            0
        } else {
            3
        }
    }

    fn pread() -> i32 {
        let mut b = [0u8; 1];
        // SAFETY: a raw system call with harmless arguments (the filters under test decide before the kernel uses them).
        unsafe { libc::pread(-1, b.as_mut_ptr().cast(), 1, 0) };
        0
    }
    fn unix_socket() -> i32 {
        // SAFETY: a raw system call with harmless arguments (the filters under test decide before the kernel uses them).
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        0
    }
    fn kvm_run() -> i32 {
        // SAFETY: a raw system call with harmless arguments (the filters under test decide before the kernel uses them).
        unsafe { libc::ioctl(-1, crate::kvm::KVM_RUN()) };
        0
    }
    fn kvm_create_vm() -> i32 {
        // SAFETY: a raw system call with harmless arguments (the filters under test decide before the kernel uses them).
        unsafe { libc::ioctl(-1, crate::kvm::KVM_CREATE_VM()) };
        0
    }
    fn accept() -> i32 {
        // SAFETY: a raw system call with harmless arguments (the filters under test decide before the kernel uses them).
        unsafe { libc::accept4(-1, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        0
    }
    fn eventfd_round_trip() -> i32 {
        // SAFETY: a raw system call with harmless arguments (the filters under test decide before the kernel uses them).
        unsafe {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
            let one = 1u64;
            libc::write(fd, (&one as *const u64).cast(), 8);
            let mut v = 0u64;
            libc::read(fd, (&mut v as *mut u64).cast(), 8);
            libc::close(fd);
            if v == 1 {
                0
            } else {
                3
            }
        }
    }

    #[test]
    fn each_role_gets_only_its_own_calls() {
        let cases: [Case; 17] = [
            (Role::Vcpu, "KVM_RUN", kvm_run, PASSED),
            (Role::Vcpu, "eventfds", eventfd_round_trip, PASSED),
            (Role::Vcpu, "KVM_CREATE_VM", kvm_create_vm, KILLED),
            (Role::Vcpu, "openat, refused", openat_refused, PASSED),
            (Role::Vcpu, "pread", pread, KILLED),
            (Role::Vcpu, "socket", unix_socket, KILLED),
            (Role::BlockIo, "pread", pread, PASSED),
            (Role::BlockIo, "KVM_RUN", kvm_run, KILLED),
            (Role::BlockIo, "openat, refused", openat_refused, PASSED),
            (Role::Io, "openat, refused", openat_refused, PASSED),
            (Role::BlockIo, "accept", accept, KILLED),
            (Role::Monitor, "accept", accept, PASSED),
            (Role::Monitor, "openat", openat, PASSED),
            (Role::Monitor, "KVM_RUN", kvm_run, KILLED),
            (Role::Monitor, "socket", unix_socket, KILLED),
            (Role::Io, "accept", accept, PASSED),
            (Role::Io, "KVM_RUN", kvm_run, KILLED),
        ];
        for (role, what, body, want) in cases {
            assert_eq!(under(role, body), want, "{role:?}: {what}");
        }
    }

    #[test]
    fn a_stopped_and_continued_sleeper_survives() {
        // SIGSTOP + SIGCONT (an administrator pausing moat) interrupt a
        // sleep with no handler to run, so the kernel resumes it with
        // restart_syscall, which every list must allow.
        let filters = [
            crate::filter(Violation::Kill).unwrap(),
            compile(Role::Io, Violation::Kill).unwrap(),
        ];
        // SAFETY: the child makes raw system calls only and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                for f in &filters {
                    if seccompiler::apply_filter(f).is_err() {
                        libc::_exit(90);
                    }
                }
                let t = libc::timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                };
                libc::nanosleep(&t, std::ptr::null_mut());
                libc::_exit(0);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut status = 0;
        // SAFETY: signalling and waiting for our own child.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
            libc::waitpid(pid, &mut status, libc::WUNTRACED);
            assert!(libc::WIFSTOPPED(status), "{status:x}");
            libc::kill(pid, libc::SIGCONT);
            libc::waitpid(pid, &mut status, 0);
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the sleeper died: status {status:x}"
        );
    }

    #[test]
    fn no_list_names_a_call_twice() {
        let with = |extra: Vec<(i64, &'static str)>| -> Vec<(i64, &'static str)> {
            any_thread().into_iter().chain(extra).collect()
        };
        for (name, list) in [
            ("main", with(main_thread())),
            ("vcpu", with(role_allowed(Role::Vcpu))),
            ("block", with(role_allowed(Role::BlockIo))),
            ("net", with(role_allowed(Role::NetIo))),
            ("monitor", with(role_allowed(Role::Monitor))),
            ("io", with(role_allowed(Role::Io))),
        ] {
            let mut seen = std::collections::BTreeSet::new();
            for (nr, why) in list {
                assert!(seen.insert(nr), "{name}: {nr} twice ({why})");
                assert!(why.len() > 3);
            }
        }
    }
}
