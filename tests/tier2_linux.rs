//! Tier 2: a real Debian Linux kernel boots under moat inside a nested test
//! host (QEMU/TCG with emulated SVM provides a real /dev/kvm); see tier2/.

use std::collections::HashMap;
use std::process::Command;

/// Run the nested host once for `scenarios`; return each scenario's console text.
fn run_tier2(scenarios: &[&str]) -> HashMap<String, String> {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tier2/run.sh"))
        .arg(env!("CARGO_BIN_EXE_moat"))
        .args(scenarios)
        .output()
        .expect("running tier2/run.sh");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        text.contains("TIER2 setup ok"),
        "nested test host did not come up (status {:?}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("TIER2 done"),
        "nested test host did not finish:\n{text}"
    );
    let mut res = HashMap::new();
    for s in scenarios {
        let begin = format!("TIER2 {s} begin\n");
        let body = text
            .split(&begin)
            .nth(1)
            .unwrap_or_else(|| panic!("{s} never began:\n{text}"));
        let body = body.split("TIER2 done").next().unwrap_or(body);
        let body = body.split(&format!("TIER2 {s} exit ")).collect::<Vec<_>>();
        assert_eq!(body.len(), 2, "{s} did not end:\n{text}");
        res.insert(s.to_string(), format!("{}EXIT {}", body[0], body[1]));
    }
    res
}

#[test]
fn debian_kernel_boots_to_userspace_with_two_cpus_and_acpi_poweroff() {
    let r = run_tier2(&["boot-smp2", "boot-acpi-off"]);

    let acpi = &r["boot-smp2"];
    assert!(acpi.contains("L2: userspace reached"), "{acpi}");
    assert!(acpi.contains("L2: cpus online 0-1 count 2"), "{acpi}");
    assert!(acpi.contains("L2: cmdline console=ttyS0 quiet"), "{acpi}");
    assert!(acpi.contains("L2: acpi APIC DSDT FACP"), "{acpi}");
    let kb: u64 = acpi
        .split("MemTotal: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(
        kb > 200 * 1024 && kb <= 256 * 1024,
        "MemTotal {kb} kB for -m 256M: {acpi}"
    );
    assert!(acpi.contains("L2: powering off"), "{acpi}");
    assert!(
        acpi.contains("reboot: Power down"),
        "ACPI power-off: {acpi}"
    );
    assert!(acpi.contains("EXIT 0 "), "moat exit status: {acpi}");

    let mp = &r["boot-acpi-off"];
    assert!(mp.contains("L2: userspace reached"), "{mp}");
    // Debian's cloud kernel is built without CONFIG_X86_MPPARSE, so without
    // ACPI it runs on the boot CPU only; the MP table itself is checked by
    // the Tier 1 guest (tests/boot.rs).
    assert!(mp.contains("L2: cpus online 0 count 1"), "{mp}");
    assert!(mp.contains("L2: acpi \n"), "{mp}");
    assert!(mp.contains("L2: no ACPI, rebooting"), "{mp}");
    assert!(
        mp.contains("EXIT 0 "),
        "-no-reboot turns the reboot into exit 0: {mp}"
    );
}
