//! Port I/O and MMIO dispatch to the platform devices.

use moat_boot::layout::{ports, GED_ADDR, GED_SIZE};
use moat_devices::ged::Ged;
use moat_devices::i8042::I8042;
use moat_devices::pm::AcpiPm;
use moat_devices::rtc::Rtc;
use moat_devices::serial::Uart;
use moat_devices::virtio::mmio::{MmioTransport, MMIO_SIZE};
use moat_sys::lock;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// How many distinct unclaimed ports/pages are logged before going quiet.
const LOG_LIMIT: usize = 64;

pub struct PlatformBus {
    pub uart: Arc<Mutex<Uart>>,
    pub rtc: Arc<Mutex<Rtc>>,
    pub i8042: Mutex<I8042>,
    pub pm: AcpiPm,
    pub ged: Mutex<Ged>,
    /// virtio-mmio devices by window base.
    pub virtio: Vec<(u64, Mutex<MmioTransport>)>,
    logged: Mutex<HashSet<u64>>,
}

impl std::fmt::Debug for PlatformBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlatformBus")
    }
}

impl PlatformBus {
    pub fn new(
        uart: Arc<Mutex<Uart>>,
        rtc: Arc<Mutex<Rtc>>,
        i8042: I8042,
        pm: AcpiPm,
        ged: Ged,
    ) -> Self {
        PlatformBus {
            uart,
            rtc,
            i8042: Mutex::new(i8042),
            pm,
            ged: Mutex::new(ged),
            virtio: Vec::new(),
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// Log the first accesses to things nobody claims, never a storm.
    fn unclaimed(&self, what: &str, addr: u64) {
        let mut l = lock(&self.logged);
        if l.len() < LOG_LIMIT && l.insert(addr) {
            log::debug!("{what} {addr:#x}: no device (further accesses not logged)");
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match port {
            p if (ports::COM1..ports::COM1 + 8).contains(&p) => {
                *first = lock(&self.uart).read((p - ports::COM1) as u8)
            }
            ports::I8042_DATA => *first = lock(&self.i8042).read_data(),
            ports::I8042_CMD => *first = lock(&self.i8042).read_status(),
            ports::RTC_INDEX => *first = lock(&self.rtc).read_index(),
            ports::RTC_DATA => *first = lock(&self.rtc).read_data(),
            ports::ACPI_PM => *first = self.pm.read(),
            0x80 => {}
            0xcf8..=0xcff => {} // no PCI: all ones
            p => self.unclaimed("port read", u64::from(p)),
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match port {
            p if (ports::COM1..ports::COM1 + 8).contains(&p) => {
                lock(&self.uart).write((p - ports::COM1) as u8, v)
            }
            ports::I8042_DATA => lock(&self.i8042).write_data(v),
            ports::I8042_CMD => lock(&self.i8042).write_command(v),
            ports::RTC_INDEX => lock(&self.rtc).write_index(v),
            ports::RTC_DATA => lock(&self.rtc).write_data(v),
            ports::ACPI_PM => self.pm.write(v),
            0x80 => {}
            0xcf8..=0xcff => {}
            p => self.unclaimed("port write", u64::from(p)),
        }
    }

    fn virtio_at(&self, addr: u64) -> Option<(u64, &Mutex<MmioTransport>)> {
        self.virtio
            .iter()
            .find(|(base, _)| (*base..*base + MMIO_SIZE).contains(&addr))
            .map(|(base, t)| (addr - base, t))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some((off, t)) = self.virtio_at(addr) {
            lock(t).read(off, data);
            return;
        }
        if (GED_ADDR..GED_ADDR + GED_SIZE).contains(&addr) {
            lock(&self.ged).read(addr - GED_ADDR, data);
            return;
        }
        data.fill(0xff);
        self.unclaimed("MMIO read", addr & !0xfff);
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, t)) = self.virtio_at(addr) {
            lock(t).write(off, data);
            return;
        }
        if (GED_ADDR..GED_ADDR + GED_SIZE).contains(&addr) {
            return; // the event register is read-only
        }
        self.unclaimed("MMIO write", addr & !0xfff);
    }
}
