//! ACPI tables for a hardware-reduced microvm: RSDP, XSDT, FADT, MADT, DSDT,
//! built with the rust-vmm `acpi_tables` crate.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::layout::{ports, ACPI_END, ACPI_START, GED_ADDR, IOAPIC_ADDR, LAPIC_ADDR};
use crate::BootError;

const OEM_ID: [u8; 6] = *b"MOAT  ";
const OEM_TABLE_ID: [u8; 8] = *b"MOATVM  ";
/// FADT IAPC_BOOT_ARCH: an 8042 is present.
const IAPC_8042: u16 = 1 << 1;
/// FADT IAPC_BOOT_ARCH: VGA not present.
const IAPC_NO_VGA: u16 = 1 << 2;

/// One table placed in guest memory.
#[derive(Debug, Clone)]
pub struct Table {
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// A `Device` with a `_HID` and a `_CRS` of I/O ranges and an optional edge IRQ.
fn legacy_device(path: &str, hid: &str, io: &[(u16, u8)], irq: Option<u32>) -> Vec<u8> {
    let ios: Vec<aml::IO> = io
        .iter()
        .map(|&(p, len)| aml::IO::new(p, p, 1, len))
        .collect();
    let int = irq.map(|i| aml::Interrupt::new(true, true, false, false, i));
    let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
    if let Some(i) = &int {
        res.push(i);
    }
    let crs = aml::ResourceTemplate::new(res);
    let hid_name = aml::EISAName::new(hid);
    bytes_of(&aml::Device::new(
        path.into(),
        vec![
            &aml::Name::new("_HID".into(), &hid_name),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// Bit of the GED event register for the power button.
pub const GED_EVENT_POWER_BUTTON: u32 = 1;

/// The Generic Event Device (ACPI 6.5 5.6.9): on its interrupt the OS runs
/// `_EVT`, which reads (and so clears) the event register and notifies the
/// power button device.
fn ged_and_power_button() -> Vec<u8> {
    let irq = aml::Interrupt::new(true, true, false, false, ports::GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let addr = GED_ADDR as usize;
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &addr,
        &4usize,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    let and = aml::And::new(&aml::ZERO, &aml::Local(0), &GED_EVENT_POWER_BUTTON);
    let is_power = aml::Equal::new(&and, &GED_EVENT_POWER_BUTTON);
    let pwrb: aml::Path = "\\_SB_.PWRB".into();
    let notify = aml::Notify::new(&pwrb, &0x80u8);
    let gdat: aml::Path = "GDAT".into();
    let store = aml::Store::new(&aml::Local(0), &gdat);
    let when = aml::If::new(&is_power, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&store, &when]);
    let mut v = bytes_of(&aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    ));
    v.extend(bytes_of(&aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )));
    v
}

/// A virtio-mmio device as Linux's virtio_mmio driver finds it (LNRO0005).
fn virtio_mmio_device(i: usize, base: u64, irq: u32) -> Vec<u8> {
    let mem = aml::Memory32Fixed::new(true, base as u32, crate::layout::VIRTIO_MMIO_SIZE as u32);
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &int]);
    let uid = i as u32;
    bytes_of(&aml::Device::new(
        format!("_SB_.V{i:03X}").as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

fn dsdt(virtio: &[(u64, u32)]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, 1);
    dsdt.append_slice(&bytes_of(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ports::S5_SLP_TYP]),
    )));
    dsdt.append_slice(&legacy_device(
        "_SB_.COM1",
        "PNP0501",
        &[(ports::COM1, 8)],
        Some(ports::COM1_IRQ),
    ));
    dsdt.append_slice(&legacy_device(
        "_SB_.PS2K",
        "PNP0303",
        &[(ports::I8042_DATA, 1), (ports::I8042_CMD, 1)],
        Some(ports::I8042_IRQ),
    ));
    // The RTC is declared without an IRQ: moat's CMOS clock raises none.
    dsdt.append_slice(&legacy_device(
        "_SB_.RTC_",
        "PNP0B00",
        &[(ports::RTC_INDEX, 2)],
        None,
    ));
    dsdt.append_slice(&ged_and_power_button());
    for (i, &(base, irq)) in virtio.iter().enumerate() {
        dsdt.append_slice(&virtio_mmio_device(i, base, irq));
    }
    dsdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let pm = |addr: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(addr),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    b.sleep_control_reg = pm(ports::ACPI_PM);
    b.sleep_status_reg = pm(ports::ACPI_PM);
    b.reset_reg = pm(ports::ACPI_PM);
    b.reset_value = ports::ACPI_RESET_VALUE;
    b.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"MOATMOAT").into();
    bytes_of(&b.finalize())
}

fn madt(apic_ids: &[u32]) -> Result<Vec<u8>, BootError> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for (i, &id) in apic_ids.iter().enumerate() {
        let id = u8::try_from(id)
            .map_err(|_| BootError::Tables(format!("APIC ID {id} does not fit the MADT")))?;
        let uid =
            u8::try_from(i).map_err(|_| BootError::Tables("too many CPUs for the MADT".into()))?;
        madt.add_structure(ProcessorLocalApic::new(uid, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(ioapic_id(apic_ids), IOAPIC_ADDR, 0));
    Ok(bytes_of(&madt))
}

/// The IOAPIC's ID: the first one above every CPU's APIC ID.
pub fn ioapic_id(apic_ids: &[u32]) -> u8 {
    let max = apic_ids.iter().copied().max().unwrap_or(0);
    u8::try_from(max + 1).unwrap_or(0xfe)
}

fn align16(x: u64) -> u64 {
    x.div_ceil(16) * 16
}

/// Lay the tables out from `ACPI_START`; the RSDP comes first.
pub fn build(apic_ids: &[u32], virtio: &[(u64, u32)]) -> Result<Vec<Table>, BootError> {
    let mut addr = ACPI_START + align16(Rsdp::len() as u64);
    let mut tables = Vec::new();
    let mut place = |sig: &str, bytes: Vec<u8>, tables: &mut Vec<Table>| {
        let a = addr;
        addr = align16(addr + bytes.len() as u64);
        tables.push(Table {
            signature: sig.into(),
            addr: a,
            bytes,
        });
        a
    };
    let dsdt_addr = place("DSDT", dsdt(virtio), &mut tables);
    let fadt_addr = place("FACP", fadt(dsdt_addr), &mut tables);
    let madt_addr = place("APIC", madt(apic_ids)?, &mut tables);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place("XSDT", bytes_of(&xsdt), &mut tables);
    if addr > ACPI_END {
        return Err(BootError::Tables(format!(
            "ACPI tables need {:#x} bytes, more than the reserved area",
            addr - ACPI_START
        )));
    }
    tables.insert(
        0,
        Table {
            signature: "RSDP".into(),
            addr: ACPI_START,
            bytes: bytes_of(&Rsdp::new(OEM_ID, xsdt_addr)),
        },
    );
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_have_valid_checksums_and_fit() {
        let ids: Vec<u32> = (0..64).collect();
        let t = build(&ids, &[(0xd000_0000, 5), (0xd000_1000, 6)]).unwrap();
        assert_eq!(t[0].signature, "RSDP");
        assert_eq!(sum(&t[0].bytes[..20]), 0);
        assert_eq!(sum(&t[0].bytes), 0);
        for tab in &t[1..] {
            assert_eq!(sum(&tab.bytes), 0, "{}", tab.signature);
            assert_eq!(&tab.bytes[..4], tab.signature.as_bytes());
            let len = u32::from_le_bytes(tab.bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, tab.bytes.len(), "{}", tab.signature);
        }
        assert!(t.last().unwrap().addr < ACPI_END);
    }
}
