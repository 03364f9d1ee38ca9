//! Tier 1: reset, power-off, -no-reboot, -S, signals, pidfile, and the demo.

mod common;
use common::*;
use moat_guests::{TEST_ELF64, TEST_PVH};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn demo_guest_boots_with_no_arguments() {
    let r = moat(&[]);
    assert_eq!(r.status, Some(0), "{r:#?}");
    assert!(r.stdout.contains("moat demo guest"), "{r:#?}");
    assert!(
        r.stdout.contains("CPUs          : 1 (from the ACPI MADT)"),
        "{r:#?}"
    );
    assert!(
        r.stdout
            .contains("command line  : console=ttyS0 moat.demo=1"),
        "{r:#?}"
    );
    // 128 MiB minus the legacy hole below 1 MiB.
    let kib: u64 = r
        .stdout
        .split("memory        : ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(kib > 127 * 1024 && kib < 128 * 1024, "{kib}");
}

#[test]
fn demo_guest_sees_the_machine_it_was_given() {
    let r = moat(&["-m", "1G", "-smp", "2"]);
    assert_eq!(r.status, Some(0), "{r:#?}");
    assert!(r.stdout.contains("CPUs          : 2"), "{r:#?}");
    // No ACPI: no power-off register, the demo falls back to a keyboard reset.
    let r = moat(&["-M", "microvm,acpi=off", "-smp", "2", "-no-reboot"]);
    assert_eq!(r.status, Some(0), "{r:#?}");
    assert!(
        r.stdout.contains("CPUs          : 2 (from the MP table)"),
        "{r:#?}"
    );
}

#[test]
fn reset_methods_reboot_the_guest() {
    for how in ["kbd", "triple", "acpi"] {
        let r = moat(&[
            "-kernel",
            TEST_PVH,
            "-append",
            &format!("action=reboot-once how={how}"),
        ]);
        assert_eq!(r.status, Some(0), "{how}: {r:#?}");
        assert!(r.stdout.contains("boot count: 0"), "{how}: {r:#?}");
        assert!(r.stdout.contains("boot count: 1"), "{how}: {r:#?}");
        assert_eq!(r.stdout.matches("RESULT: PASS").count(), 2, "{how}: {r:#?}");
    }
}

#[test]
fn no_reboot_turns_a_reset_into_exit() {
    for action in ["reset", "triple"] {
        let r = moat(&[
            "-kernel",
            TEST_ELF64,
            "-append",
            &format!("action={action}"),
            "-no-reboot",
        ]);
        assert_eq!(r.status, Some(0), "{action}: {r:#?}");
        assert_eq!(
            r.stdout.matches("RESULT: PASS").count(),
            1,
            "{action}: {r:#?}"
        );
    }
}

#[test]
fn start_paused_runs_nothing_until_terminated() {
    let dir = scratch("paused");
    let pidfile = dir.join("pid");
    let out = dir.join("serial");
    let mut child = moat_command()
        .args([
            "-S",
            "-kernel",
            TEST_PVH,
            "-append",
            "action=poweroff",
            "-serial",
        ])
        .arg(format!("file:{}", out.display()))
        .arg("-pidfile")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The pid file is created, then locked and written: wait for a whole line.
    let mut waited = Duration::ZERO;
    let pid: i32 = loop {
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        if text.ends_with('\n') {
            break text.trim().parse().unwrap();
        }
        assert!(waited < HANG, "no pid file");
        std::thread::sleep(Duration::from_millis(20));
        waited += Duration::from_millis(20);
    };
    assert_eq!(pid as u32, child.id());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "moat exited while paused"
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"",
        "the guest ran while paused"
    );
    // SAFETY-free: kill(1) via the command line keeps this test free of unsafe.
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert!(!pidfile.exists(), "pid file left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stuck_stdout_does_not_stall_the_guest() {
    // stdout is a pipe nobody reads: the guest's 5000 lines overflow it, yet
    // the guest still reaches power-off and moat exits.
    let mut child = moat_command()
        .args(["-kernel", TEST_PVH, "-append", "spam=5000 action=poweroff"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut waited = Duration::ZERO;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if waited > HANG {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    };
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[test]
fn an_internal_error_dumps_registers_and_exits_1() {
    let r = moat(&["-kernel", TEST_PVH, "-append", "action=mmio-exec"]);
    assert_eq!(r.status, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("RIP=00000000e0000000"),
        "register dump: {r:#?}"
    );
    assert!(r.stderr.contains("CR0="), "register dump: {r:#?}");
    let last = r.stderr.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("moat: vCPU 0 failed: KVM_EXIT_INTERNAL_ERROR"),
        "{last}"
    );
}

/// moat's mappings (start, end, VmFlags) once guest RAM (`kib` KiB, maybe
/// split in two) is among them.
fn mappings(pid: u32, kib: u64) -> Vec<(u64, u64, String)> {
    let mut waited = Duration::ZERO;
    loop {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let mut maps: Vec<(u64, u64, String)> = Vec::new();
        for line in smaps.lines() {
            let range = line.split(' ').next().unwrap_or("");
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    maps.push((a, b, String::new()));
                    continue;
                }
            }
            if let (Some(m), Some(f)) = (maps.last_mut(), line.strip_prefix("VmFlags:")) {
                m.2 = f.trim().to_string();
            }
        }
        let big = kib * 1024 - (2 << 20);
        if maps
            .iter()
            .any(|m| m.1 - m.0 == kib * 1024 || m.1 - m.0 == big)
        {
            return maps;
        }
        assert!(waited < HANG, "no {kib} KiB mapping in moat:\n{smaps}");
        std::thread::sleep(Duration::from_millis(20));
        waited += Duration::from_millis(20);
    }
}

#[test]
fn guest_ram_has_huge_pages_unless_thp_off() {
    // (VmFlags: "nh" is MADV_NOHUGEPAGE, "hg" MADV_HUGEPAGE.)
    let has = |flags: &str, f: &str| flags.split(' ').any(|x| x == f);
    for (machine, huge) in [
        ("microvm", true),
        ("microvm,thp=on", true),
        ("microvm,thp=off", false),
    ] {
        let mut child = moat_command()
            .args(["-S", "-M", machine, "-m", "72M", "-kernel", TEST_PVH])
            .args(["-serial", "none"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let maps = mappings(child.id(), 72 * 1024);
        let _ = child.kill();
        let _ = child.wait();
        if huge {
            // Huge pages past the first 2 MiB, which keep 4 KiB pages; the
            // huge part 2 MiB-aligned (guest RAM starts at 0, and KVM maps
            // a huge page only where both addresses agree modulo 2 MiB).
            let big = maps
                .iter()
                .find(|m| m.1 - m.0 == 70 << 20 && has(&m.2, "hg"))
                .unwrap_or_else(|| panic!("-M {machine}: no huge-page guest RAM in {maps:?}"));
            assert_eq!(big.0 % (2 << 20), 0, "guest RAM at {:#x}", big.0);
            let head = maps.iter().find(|m| m.1 == big.0).unwrap();
            assert!(
                head.1 - head.0 == 2 << 20 && has(&head.2, "nh"),
                "-M {machine}: the first 2 MiB {head:?}"
            );
        } else {
            let ram = maps
                .iter()
                .find(|m| m.1 - m.0 == 72 << 20)
                .unwrap_or_else(|| panic!("-M {machine}: no guest RAM in {maps:?}"));
            assert!(
                has(&ram.2, "nh") && !has(&ram.2, "hg"),
                "-M {machine}: {ram:?}"
            );
        }
    }
}
