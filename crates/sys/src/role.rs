//! Thread roles: each long-lived moat thread says what it is when it
//! starts, and the sandbox (registered once it is in place) narrows that
//! thread's system calls to its role's list, on top of the process-wide
//! filter. Without a sandbox (`-sandbox off`, unit tests) this does nothing.

use std::sync::OnceLock;

/// What a thread does, which decides what it may ask the kernel for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs one vCPU: KVM_RUN and the device emulation of its exits.
    Vcpu,
    /// A disk's I/O thread: reads and writes its image.
    BlockIo,
    /// A network interface's queue-pair thread: reads and writes its tap
    /// or stream socket.
    NetIo,
    /// A virtio-rng device's thread: reads its entropy source.
    RngIo,
    /// The virtio-vsock device's thread: relays the guest's connections to
    /// UNIX sockets under its configured path.
    VsockIo,
    /// Monitor listeners, clients and TLS relays.
    Monitor,
    /// Console and signal threads.
    Io,
}

impl Role {
    pub const ALL: &'static [Role] = &[
        Role::Vcpu,
        Role::BlockIo,
        Role::NetIo,
        Role::RngIo,
        Role::VsockIo,
        Role::Monitor,
        Role::Io,
    ];
}

type Hook = Box<dyn Fn(Role) -> Result<(), String> + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Register the confinement applied by [`enter`] (once, by main, after the
/// process-wide filter is in place).
pub fn set_hook(hook: Hook) {
    let _ = HOOK.set(hook);
}

/// The calling thread takes on `role` for the rest of its life (and its
/// future threads with it). A thread that cannot be confined must not run:
/// the process aborts.
pub fn enter(role: Role) {
    if let Some(h) = HOOK.get() {
        if let Err(e) = h(role) {
            eprintln!("moat: confining a {role:?} thread failed: {e}");
            std::process::abort();
        }
    }
}
