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

/// The start address and flags of the mapping of exactly `kib` KiB in
/// process `pid` (moat's guest RAM), once it exists.
fn guest_ram_flags(pid: u32, kib: u64) -> (u64, String) {
    let mut waited = Duration::ZERO;
    loop {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let mut size_ok = false;
        let mut start = 0;
        for line in smaps.lines() {
            if let Some(range) = line.split(' ').next().filter(|r| r.contains('-')) {
                if let Ok(a) = u64::from_str_radix(range.split('-').next().unwrap(), 16) {
                    start = a;
                }
            }
            if let Some(v) = line.strip_prefix("Size:") {
                size_ok = v.trim() == format!("{kib} kB");
            }
            if let (true, Some(f)) = (size_ok, line.strip_prefix("VmFlags:")) {
                return (start, f.trim().to_string());
            }
        }
        assert!(waited < HANG, "no {kib} KiB mapping in moat:\n{smaps}");
        std::thread::sleep(Duration::from_millis(20));
        waited += Duration::from_millis(20);
    }
}

#[test]
fn guest_ram_has_huge_pages_unless_thp_off() {
    // (VmFlags: "nh" is MADV_NOHUGEPAGE, "hg" MADV_HUGEPAGE.)
    for (machine, flag, not) in [
        ("microvm", "hg", "nh"),
        ("microvm,thp=on", "hg", "nh"),
        ("microvm,thp=off", "nh", "hg"),
    ] {
        let mut child = moat_command()
            .args(["-S", "-M", machine, "-m", "72M", "-kernel", TEST_PVH])
            .args(["-serial", "none"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let (start, flags) = guest_ram_flags(child.id(), 72 * 1024);
        let _ = child.kill();
        let _ = child.wait();
        let flags: Vec<&str> = flags.split(' ').collect();
        assert!(
            flags.contains(&flag) && !flags.contains(&not),
            "-M {machine}: guest RAM's flags {flags:?}"
        );
        // Huge pages reach the guest only where guest-physical and host
        // addresses agree modulo 2 MiB (guest RAM starts at 0).
        if flag == "hg" {
            assert_eq!(start % (2 << 20), 0, "guest RAM at {start:#x}");
        }
    }
}
