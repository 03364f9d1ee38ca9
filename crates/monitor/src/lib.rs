//! The monitor: QEMU's QMP and HMP protocols over UNIX sockets (and, with
//! TLS and an authorization policy only, TCP).
//!
//! The protocol engines ([`qmp`], [`hmp`]) are transport independent: they
//! decode what a client sends once, into `moat_api`'s typed requests, send
//! them to the VM through a [`moat_api::Client`], and encode the typed
//! replies and events in QEMU's shapes ([`encode`]). HMP commands are
//! implemented on top of the QMP command layer, never twice.

pub mod authz;
pub mod encode;
pub mod hmp;
pub mod hmp_block;
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

impl From<moat_api::ApiError> for QmpError {
    fn from(e: moat_api::ApiError) -> Self {
        match e.class {
            moat_api::ErrorClass::Generic => QmpError::generic(e.desc),
            moat_api::ErrorClass::DeviceNotFound => QmpError::device_not_found(e.desc),
        }
    }
}

/// Facts fixed at startup that the monitor reports.
#[derive(Debug, Clone, Default)]
pub struct VmInfo {
    pub name: Option<String>,
    pub uuid: Option<String>,
}
