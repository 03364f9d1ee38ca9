//! MC146818 CMOS real-time clock and its 128 bytes of CMOS RAM.
//!
//! Time comes from the host clock (UTC) plus an offset the guest may set by
//! writing the time registers. No interrupts are raised (the DSDT declares
//! none). CMOS RAM survives guest resets, as on real hardware.

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 1 = Sunday.
    pub weekday: u8,
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_from_unix(secs: i64) -> DateTime {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    DateTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u8,
        minute: (rem / 60 % 60) as u8,
        second: (rem % 60) as u8,
        weekday: ((days + 4).rem_euclid(7) + 1) as u8,
    }
}

/// Seconds since the epoch for a civil date.
pub fn unix_from_civil(y: i64, m: u8, d: u8, hh: u8, mm: u8, ss: u8) -> i64 {
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86400 + i64::from(hh) * 3600 + i64::from(mm) * 60 + i64::from(ss)
}

fn host_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[derive(Debug)]
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    clock: fn() -> i64,
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    /// An RTC reading time from `clock` (seconds since the epoch), for tests.
    pub fn with_clock(clock: fn() -> i64) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[REG_B] = REG_B_24H;
        ram[REG_D] = 0x80; // valid RAM and time
        Rtc {
            index: 0,
            ram,
            offset: 0,
            clock,
        }
    }

    fn binary(&self) -> bool {
        self.ram[REG_B] & REG_B_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            (v >> 4) * 10 + (v & 0xf)
        }
    }

    fn now(&self) -> DateTime {
        civil_from_unix((self.clock)().saturating_add(self.offset))
    }

    /// Port 0x70: select a register (bit 7 is the NMI mask, ignored).
    pub fn write_index(&mut self, v: u8) {
        self.index = v & 0x7f;
    }

    pub fn read_index(&self) -> u8 {
        self.index
    }

    /// Port 0x71 read.
    pub fn read_data(&mut self) -> u8 {
        let i = usize::from(self.index);
        let t = self.now();
        let hour = |rtc: &Self| {
            if rtc.ram[REG_B] & REG_B_24H != 0 {
                rtc.encode(t.hour)
            } else {
                let h12 = match t.hour % 12 {
                    0 => 12,
                    h => h,
                };
                rtc.encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
            }
        };
        match i {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => hour(self),
            WEEKDAY => self.encode(t.weekday),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u8),
            CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u8),
            REG_A => self.ram[REG_A] & 0x7f, // update-in-progress never set
            REG_C => {
                let v = self.ram[REG_C];
                self.ram[REG_C] = 0;
                v
            }
            _ => self.ram[i],
        }
    }

    /// Port 0x71 write.
    pub fn write_data(&mut self, v: u8) {
        let i = usize::from(self.index);
        match i {
            SECONDS | MINUTES | HOURS | DAY | MONTH | YEAR | CENTURY => {
                let t = self.now();
                let val = if i == HOURS && self.ram[REG_B] & REG_B_24H == 0 {
                    let h = self.decode(v & 0x7f) % 12;
                    h + if v & 0x80 != 0 { 12 } else { 0 }
                } else {
                    self.decode(v)
                };
                let (mut y, mut mo, mut d, mut hh, mut mi, mut s) =
                    (t.year, t.month, t.day, t.hour, t.minute, t.second);
                match i {
                    SECONDS => s = val.min(59),
                    MINUTES => mi = val.min(59),
                    HOURS => hh = val.min(23),
                    DAY => d = val.clamp(1, 31),
                    MONTH => mo = val.clamp(1, 12),
                    YEAR => y = y - y.rem_euclid(100) + i64::from(val.min(99)),
                    _ => y = i64::from(val.min(99)) * 100 + y.rem_euclid(100),
                }
                let guest = unix_from_civil(y, mo, d, hh, mi, s);
                self.offset = guest - (self.clock)();
            }
            WEEKDAY => {}
            REG_A => self.ram[REG_A] = (self.ram[REG_A] & 0x80) | (v & 0x7f),
            REG_B => self.ram[REG_B] = v,
            REG_C | REG_D => {}
            _ => self.ram[i] = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-29 13:45:07 UTC, a Sunday.
    fn fixed() -> i64 {
        unix_from_civil(2026, 11, 29, 13, 45, 7)
    }

    fn rd(r: &mut Rtc, i: u8) -> u8 {
        r.write_index(i);
        r.read_data()
    }

    #[test]
    fn civil_round_trip() {
        for s in [0i64, 951_782_400, 1_700_000_000, 4_102_444_800] {
            let t = civil_from_unix(s);
            assert_eq!(
                unix_from_civil(t.year, t.month, t.day, t.hour, t.minute, t.second),
                s
            );
        }
        assert_eq!(civil_from_unix(fixed()).weekday, 1);
        assert_eq!(civil_from_unix(951_782_400).day, 29); // 2000-02-29
    }

    #[test]
    fn reads_bcd_date() {
        let mut r = Rtc::with_clock(fixed);
        assert_eq!(rd(&mut r, 0x09), 0x26);
        assert_eq!(rd(&mut r, 0x32), 0x20);
        assert_eq!(rd(&mut r, 0x08), 0x11);
        assert_eq!(rd(&mut r, 0x07), 0x29);
        assert_eq!(rd(&mut r, 0x04), 0x13);
        assert_eq!(rd(&mut r, 0x00), 0x07);
        assert_eq!(rd(&mut r, 0x0a) & 0x80, 0);
        assert_eq!(rd(&mut r, 0x0d), 0x80);
    }

    #[test]
    fn binary_12h_and_setting_time() {
        let mut r = Rtc::with_clock(fixed);
        r.write_index(0x0b);
        r.write_data(REG_B_BINARY); // 12-hour, binary
        assert_eq!(rd(&mut r, 0x04), 0x80 | 1);
        assert_eq!(rd(&mut r, 0x09), 26);
        r.write_index(0x09);
        r.write_data(30);
        assert_eq!(rd(&mut r, 0x09), 30);
        assert_eq!(rd(&mut r, 0x08), 11);
    }

    #[test]
    fn cmos_ram_persists() {
        let mut r = Rtc::with_clock(fixed);
        r.write_index(0x80 | 0x40);
        r.write_data(0x5a);
        assert_eq!(rd(&mut r, 0x40), 0x5a);
    }
}
