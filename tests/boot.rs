//! Tier 1: moat boots purpose-built guests on real KVM through every boot
//! path, and the guest checks what moat handed it.

mod common;
use common::*;
use moat_guests::{TEST_BZIMAGE, TEST_BZIMAGE32, TEST_ELF64, TEST_PVH};

const KERNELS: [(&str, &str); 4] = [
    ("pvh", TEST_PVH),
    ("elf64", TEST_ELF64),
    ("bzimage64", TEST_BZIMAGE),
    ("bzimage32", TEST_BZIMAGE32),
];

fn boot_checks(
    kernel: &str,
    mem: &str,
    mem_bytes: u64,
    smp: &str,
    cpus: u32,
    extra: &[&str],
) -> Run {
    let dir = scratch(&format!(
        "boot-{}",
        std::path::Path::new(kernel)
            .file_name()
            .unwrap()
            .to_string_lossy()
    ));
    let initrd: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let initrd_path = dir.join("initrd");
    std::fs::write(&initrd_path, &initrd).unwrap();
    let append = format!(
        "mem={mem_bytes} cpus={cpus} acpi=1 smp=1 initrd_len={} initrd_sum={:#x} rtc={} action=poweroff",
        initrd.len(),
        fnv1a(&initrd),
        utc_dates()
    );
    let mut args = vec![
        "-m",
        mem,
        "-smp",
        smp,
        "-kernel",
        kernel,
        "-initrd",
        initrd_path.to_str().unwrap(),
        "-append",
        &append,
        "-nographic",
        "-no-reboot",
    ];
    args.extend_from_slice(extra);
    let r = moat(&args);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

#[test]
fn every_boot_path_hands_over_memory_cpus_cmdline_initrd_rtc() {
    for (name, k) in KERNELS {
        let r = boot_checks(k, "256M", 256 << 20, "4", 4, &[]);
        r.assert_pass();
        let want_boot = if name == "pvh" {
            "boot: pvh"
        } else {
            "boot: linux"
        };
        assert!(r.stdout.contains(want_boot), "{name}: {r:#?}");
        assert!(r.stdout.contains("smp: 3 APs up"), "{name}: {r:#?}");
        assert!(r.stdout.contains("cpus: 4 (madt)"), "{name}: {r:#?}");
    }
}

#[test]
fn memory_above_the_32bit_hole() {
    let r = boot_checks(TEST_PVH, "4100M", 4100 << 20, "1", 1, &[]);
    r.assert_pass();
}

#[test]
fn topology_with_sockets_and_threads() {
    // 2 sockets x 2 cores x 2 threads: APIC IDs are not contiguous per socket
    // only when counts are not powers of two; use 3 cores to exercise gaps.
    let r = boot_checks(
        TEST_ELF64,
        "128M",
        128 << 20,
        "cpus=12,sockets=2,cores=3,threads=2",
        12,
        &[],
    );
    r.assert_pass();
    assert!(r.stdout.contains("smp: 11 APs up"), "{r:#?}");
}

#[test]
fn mp_table_when_acpi_is_off() {
    let r = moat(&[
        "-M",
        "microvm,acpi=off",
        "-smp",
        "3",
        "-kernel",
        TEST_PVH,
        "-append",
        "cpus=3 acpi=0 smp=1 action=reset",
        "-no-reboot",
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("cpus: 3 (mptable)"), "{r:#?}");
    assert!(r.stdout.contains("smp: 2 APs up"), "{r:#?}");
}

#[test]
fn the_command_line_arrives_verbatim() {
    let cmdline = "console=ttyS0 a=b,c x=\"quoted words\" tab\there ütf8 end=1";
    let r = moat(&[
        "-kernel",
        TEST_BZIMAGE,
        "-append",
        &format!("{cmdline} action=reset"),
        "-no-reboot",
    ]);
    assert_eq!(r.status, Some(0), "{r:#?}");
    assert!(
        r.stdout
            .contains(&format!("cmdline: {cmdline} action=reset\r\n")),
        "{r:#?}"
    );
}

#[test]
fn sixty_four_vcpus() {
    let r = moat(&[
        "-smp",
        "64",
        "-m",
        "512M",
        "-kernel",
        TEST_PVH,
        "-append",
        "cpus=64 smp=1 action=poweroff",
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("smp: 63 APs up"), "{r:#?}");
}
