//! The monitor: QEMU's QMP and HMP protocols over UNIX sockets (and, with
//! TLS and an authorization policy only, TCP).
//!
//! The protocol engines ([`qmp`], [`hmp`]) are transport independent and
//! talk to the VM through one interface, [`VmControl`]; HMP commands are
//! implemented on top of the QMP command layer, never twice.

pub mod authz;
pub mod hmp;
pub mod qmp;
pub mod server;
pub mod tls;

use serde_json::Value;

/// The QEMU release whose QMP behaviour moat matches (greeting, error texts,
/// query-version). Debian 12's QEMU, which the tests compare against.
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// A QMP error: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: &'static str,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "CommandNotFound",
            desc: desc.into(),
        }
    }
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: "DeviceNotFound",
            desc: desc.into(),
        }
    }
    pub fn to_json(&self) -> Value {
        serde_json::json!({"class": self.class, "desc": self.desc})
    }
}

/// Commands that need the running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmCommand {
    Stop,
    Cont,
    SystemReset,
    SystemPowerdown,
    Quit,
    QueryStatus,
    QueryCpusFast,
    /// HMP `info registers` for one vCPU (or all with `None`).
    Registers(Option<u32>),
    QueryBlock,
    QueryBlockstats,
    /// `eject` of a device (by `device` or `id`).
    Eject(String),
    /// `block_set_io_throttle`: new limits for a drive (all zero: none).
    BlockSetIoThrottle(String, moat_config::ThrottleLimits),
    /// `blockdev-del` of a node made by `blockdev-add`.
    BlockdevDel(String),
    QueryNamedBlockNodes,
}

/// The VM as the monitor sees it.
pub trait VmControl: Send + Sync {
    /// Execute `cmd` and return its QMP `return` value.
    fn execute(&self, cmd: VmCommand) -> Result<Value, QmpError>;

    /// `blockdev-add`: open `drive` (paths or `/dev/fdset/N` from `fds`)
    /// as the block node `node` (its top `driver` as the client named it).
    fn blockdev_add(
        &self,
        node: String,
        driver: String,
        drive: moat_config::DriveConfig,
        fds: &moat_sys::fdset::FdStore,
    ) -> Result<Value, QmpError> {
        let _ = (node, driver, drive, fds);
        Err(QmpError::generic("blockdev-add is not available"))
    }

    /// Called once a reply has been queued for its client (so that `quit`
    /// can end moat only after its own reply is on its way).
    fn replied(&self) {}
}

/// Facts fixed at startup that the monitor reports.
#[derive(Debug, Clone, Default)]
pub struct VmInfo {
    pub name: Option<String>,
    pub uuid: Option<String>,
}
