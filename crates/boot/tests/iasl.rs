//! The ACPI tables moat hands the guest, decompiled and checked by `iasl`
//! (Debian acpica-tools), an oracle we did not write.

use moat_boot::acpi;
use std::process::Command;

fn decompile(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let dat = dir.join(format!("{name}.dat"));
    std::fs::write(&dat, bytes).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&dat)
        .current_dir(dir)
        .output()
        .expect("iasl (Debian package acpica-tools) must be installed");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name}: {log}");
    assert!(
        !log.to_lowercase().contains("error"),
        "iasl -d {name}: {log}"
    );
    std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap()
}

#[test]
fn iasl_accepts_and_describes_the_tables() {
    let dir = std::env::temp_dir().join(format!("moat-iasl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ids = [0u32, 1, 2, 4, 5, 6];
    let tables = acpi::build(&ids, &[(0xd000_0000, 5), (0xd000_1000, 6)]).unwrap();
    let get = |sig: &str| tables.iter().find(|t| t.signature == sig).unwrap();

    // iasl cannot disassemble a bare RSDP; check it by hand (ACPI 6.5 5.2.5).
    let rsdp = &get("RSDP").bytes;
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(rsdp[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    assert_eq!(
        u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
        get("XSDT").addr
    );

    let xsdt = decompile(&dir, "xsdt", &get("XSDT").bytes);
    for sig in ["FACP", "APIC"] {
        assert!(
            xsdt.contains(&format!("{:016X}", get(sig).addr)),
            "{sig} missing from XSDT: {xsdt}"
        );
    }

    let madt = decompile(&dir, "apic", &get("APIC").bytes);
    assert_eq!(
        madt.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        ids.len(),
        "{madt}"
    );
    for id in ids {
        assert!(
            madt.contains(&format!("Local Apic ID : {id:02X}")),
            "APIC ID {id}: {madt}"
        );
    }
    assert!(
        madt.contains("[I/O APIC]") && madt.contains("Address : FEC00000"),
        "{madt}"
    );
    assert!(
        madt.contains("I/O Apic ID : 07"),
        "IOAPIC ID must not collide with a CPU: {madt}"
    );
    assert!(madt.contains("Local Apic Address : FEE00000"), "{madt}");

    let fadt = decompile(&dir, "facp", &get("FACP").bytes);
    assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
    assert!(fadt.contains("Reset Register Supported (V2) : 1"), "{fadt}");
    assert!(
        fadt.contains(&format!("{:016X}", get("DSDT").addr)),
        "{fadt}"
    );
    // Sleep control/status and reset registers: SystemIO at 0x600.
    assert!(
        fadt.matches("Address : 0000000000000600").count() >= 3,
        "{fadt}"
    );

    let dsdt = decompile(&dir, "dsdt", &get("DSDT").bytes);
    for needle in [
        "Name (_S5, Package",
        "PNP0501",
        "PNP0303",
        "PNP0B00",
        "0x03F8",
        "0x0070",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
    ] {
        assert!(dsdt.contains(needle), "{needle} missing: {dsdt}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
