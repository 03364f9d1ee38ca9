//! The ACPI hardware-reduced sleep control/status and reset register (one
//! I/O port, declared in the FADT).

use crate::{RequestSink, VmRequest};
use moat_boot::layout::ports::{ACPI_RESET_VALUE, S5_SLP_TYP, SLP_EN};

pub struct AcpiPm {
    requests: RequestSink,
}

impl AcpiPm {
    pub fn new(requests: RequestSink) -> Self {
        AcpiPm { requests }
    }

    pub fn read(&self) -> u8 {
        0
    }

    pub fn write(&self, value: u8) {
        if value == ACPI_RESET_VALUE {
            (self.requests)(VmRequest::Reset);
        } else if value & SLP_EN != 0 && (value >> 2) & 7 == S5_SLP_TYP {
            (self.requests)(VmRequest::PowerOff);
        } else {
            log::debug!("ACPI PM: ignoring write {value:#x} (only S5 and reset are implemented)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_and_reset() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let tx: RequestSink = std::sync::Arc::new(move |r| {
            let _ = tx.lock().unwrap().send(r);
        });
        let pm = AcpiPm::new(tx);
        pm.write((3 << 2) | SLP_EN); // S3: ignored
        pm.write(5 << 2); // no SLP_EN: ignored
        pm.write((5 << 2) | SLP_EN);
        pm.write(1);
        assert_eq!(rx.try_recv(), Ok(VmRequest::PowerOff));
        assert_eq!(rx.try_recv(), Ok(VmRequest::Reset));
        assert!(rx.try_recv().is_err());
    }
}
