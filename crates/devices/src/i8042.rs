//! An i8042 keyboard controller: enough for Linux's i8042 and atkbd drivers
//! to find a keyboard, the 0xFE CPU reset command, and CTRL+ALT+DEL
//! injection (set-1 scancodes, as the guest sees them with translation on).

use crate::{IrqLine, RequestSink, VmRequest};
use std::collections::VecDeque;

const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_CMD: u8 = 0x08;
const STATUS_KBD_UNLOCKED: u8 = 0x10;
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_XLATE: u8 = 0x40;
const BUF_MAX: usize = 16;

pub struct I8042 {
    ctr: u8,
    outp: u8,
    /// Controller command awaiting a data byte (0x60, 0xD1, 0xD2, 0xD3, 0xD4).
    pending_cmd: Option<u8>,
    /// Keyboard command awaiting a parameter byte.
    kbd_param: Option<u8>,
    buf: VecDeque<u8>,
    irq: IrqLine,
    requests: RequestSink,
}

impl I8042 {
    pub fn new(irq: IrqLine, requests: RequestSink) -> Self {
        I8042 {
            ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE,
            outp: 0x01,
            pending_cmd: None,
            kbd_param: None,
            buf: VecDeque::new(),
            irq,
            requests,
        }
    }

    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.buf.len() < BUF_MAX {
                self.buf.push_back(b);
            }
        }
        if self.ctr & CTR_KBD_INT != 0 && !self.buf.is_empty() {
            self.irq.pulse();
        }
    }

    /// Inject CTRL+ALT+DEL (set-1 make and break codes, as seen after translation).
    pub fn ctrl_alt_del(&mut self) {
        self.push(&[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
    }

    /// Port 0x64 read.
    pub fn read_status(&self) -> u8 {
        // The system flag mirrors the CTR's.
        let mut s = STATUS_KBD_UNLOCKED | (self.ctr & CTR_SYS);
        if !self.buf.is_empty() {
            s |= STATUS_OUT_FULL;
        }
        if self.pending_cmd.is_some() {
            s |= STATUS_CMD;
        }
        s
    }

    /// Port 0x60 read.
    pub fn read_data(&mut self) -> u8 {
        let v = self.buf.pop_front().unwrap_or(0);
        if !self.buf.is_empty() && self.ctr & CTR_KBD_INT != 0 {
            self.irq.pulse();
        }
        v
    }

    /// Port 0x64 write: a controller command.
    pub fn write_command(&mut self, cmd: u8) {
        self.pending_cmd = None;
        match cmd {
            0x20 => self.push(&[self.ctr]),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending_cmd = Some(cmd),
            0xa7 | 0xa8 | 0xad | 0xae => {} // enable/disable ports
            0xa9 => self.push(&[0xff]),     // no aux port
            0xaa => self.push(&[0x55]),     // self test passed
            0xab => self.push(&[0x00]),     // keyboard interface test passed
            0xc0 => self.push(&[0x00]),
            0xd0 => self.push(&[self.outp]),
            0xfe => {
                (self.requests)(VmRequest::Reset);
            }
            0xf0..=0xff => {} // pulse output lines other than reset
            _ => log::debug!("i8042: unknown command {cmd:#x}"),
        }
    }

    /// Port 0x60 write: data for a pending command, or a keyboard command.
    pub fn write_data(&mut self, v: u8) {
        match self.pending_cmd.take() {
            Some(0x60) => self.ctr = v,
            Some(0xd1) => {
                self.outp = v;
                if v & 0x01 == 0 {
                    (self.requests)(VmRequest::Reset);
                }
            }
            Some(0xd2) => self.push(&[v]),
            Some(0xd3) | Some(0xd4) => {} // no aux device: drop
            _ => self.keyboard(v),
        }
    }

    fn keyboard(&mut self, v: u8) {
        if self.kbd_param.take().is_some() {
            self.push(&[0xfa]);
            return;
        }
        match v {
            0xed | 0xf0 | 0xf3 => {
                self.kbd_param = Some(v);
                self.push(&[0xfa]);
            }
            0xf2 => self.push(&[0xfa, 0xab, 0x83]), // MF2 keyboard ID
            0xee => self.push(&[0xee]),             // echo
            0xff => self.push(&[0xfa, 0xaa]),       // reset, self test passed
            _ => self.push(&[0xfa]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, std::sync::mpsc::Receiver<VmRequest>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let tx: RequestSink = std::sync::Arc::new(move |r| {
            let _ = tx.lock().unwrap().send(r);
        });
        (I8042::new(IrqLine::new().unwrap(), tx), rx)
    }

    #[test]
    fn reset_command() {
        let (mut d, rx) = dev();
        d.write_command(0xfe);
        assert_eq!(rx.try_recv(), Ok(VmRequest::Reset));
    }

    #[test]
    fn self_test_and_keyboard_id() {
        let (mut d, _rx) = dev();
        d.write_command(0xaa);
        assert_ne!(d.read_status() & STATUS_OUT_FULL, 0);
        assert_eq!(d.read_data(), 0x55);
        d.write_data(0xf2);
        assert_eq!(
            [d.read_data(), d.read_data(), d.read_data()],
            [0xfa, 0xab, 0x83]
        );
        assert_eq!(d.read_status() & STATUS_OUT_FULL, 0);
        d.write_command(0x60);
        d.write_data(0x00);
        d.write_command(0x20);
        assert_eq!(d.read_data(), 0x00);
    }

    #[test]
    fn ctrl_alt_del_raises_irq() {
        let (mut d, _rx) = dev();
        d.ctrl_alt_del();
        assert_eq!(d.irq().0.read().unwrap(), 1);
        assert_eq!(d.read_data(), 0x1d);
    }
}
