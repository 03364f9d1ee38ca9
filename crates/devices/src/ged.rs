//! The ACPI Generic Event Device: one 32-bit event register (read clears
//! it) and an interrupt. The DSDT's `_EVT` turns bit 0 into a power-button
//! notification (`system_powerdown`).

use crate::IrqLine;

pub const EVENT_POWER_BUTTON: u32 = 1;

#[derive(Debug)]
pub struct Ged {
    pending: u32,
    irq: IrqLine,
}

impl Ged {
    pub fn new(irq: IrqLine) -> Self {
        Ged { pending: 0, irq }
    }

    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    /// Press the power button.
    pub fn power_button(&mut self) {
        self.pending |= EVENT_POWER_BUTTON;
        self.irq.pulse();
    }

    /// MMIO read at `offset`; reading the event register clears it.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            let v = std::mem::take(&mut self.pending).to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&v[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_button_is_read_once() {
        let mut g = Ged::new(IrqLine::new().unwrap());
        g.power_button();
        assert_eq!(g.irq().0.read().unwrap(), 1);
        let mut d = [0u8; 4];
        g.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), EVENT_POWER_BUTTON);
        g.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
    }
}
