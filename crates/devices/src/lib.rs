//! Platform devices of a moat microvm: COM1, i8042, CMOS RTC, the ACPI
//! PM register and Generic Event Device.
//!
//! Each device is plain logic behind `read`/`write` of its registers, so it
//! can be unit tested without KVM; the VMM routes port I/O to them.

pub mod ged;
pub mod i8042;
pub mod pm;
pub mod rtc;
pub mod serial;
pub mod virtio;

/// Something a device asks of the whole VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRequest {
    /// Reset the machine (i8042 0xFE, ACPI reset register, triple fault).
    Reset,
    /// ACPI S5 power-off.
    PowerOff,
}

/// Where devices send [`VmRequest`]s.
pub type RequestSink = std::sync::Arc<dyn Fn(VmRequest) + Send + Sync>;

/// An interrupt line: writing the eventfd pulses the GSI it is wired to (irqfd).
#[derive(Debug)]
pub struct IrqLine(pub vmm_sys_util::eventfd::EventFd);

impl IrqLine {
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqLine(vmm_sys_util::eventfd::EventFd::new(
            libc::EFD_NONBLOCK,
        )?))
    }

    pub fn pulse(&self) {
        // A full counter (2^64-2 pending pulses) cannot happen in practice; an
        // error here would only lose an edge the guest will poll for anyway.
        let _ = self.0.write(1);
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
