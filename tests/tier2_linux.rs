//! Tier 2: a real Debian Linux kernel boots under moat inside a nested test
//! host (QEMU/TCG with emulated SVM provides a real /dev/kvm); see tier2/.

use std::collections::HashMap;
use std::process::Command;

/// Run the nested host once for `scenarios`; return each scenario's console
/// text (and, under "", the whole console).
fn run_tier2(scenarios: &[&str]) -> HashMap<String, String> {
    let nested = || {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tier2/run.sh"))
            .arg(env!("CARGO_BIN_EXE_moat"))
            .env("MOAT_JAIL", env!("CARGO_BIN_EXE_moat-jail"))
            .args(scenarios)
            .output()
            .expect("running tier2/run.sh");
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        (out, text)
    };
    // The emulated test host itself (QEMU/TCG) has died silently mid-run,
    // its kernel soft-locked (it then panics: softlockup_panic in run.sh),
    // or it hung with no report (run.sh then stops it after 4 quiet
    // minutes: "TIER2 stalled"), a few times in many runs: the host is
    // booted again then, at most twice, and every scenario's result is
    // still asserted below. Not after a run that went to run.sh's timeout
    // (a hang to report), nor once 20 minutes are spent.
    let start = std::time::Instant::now();
    let (mut out, mut text) = nested();
    for _ in 0..2 {
        // (124: timeout(1)'s status, passed on by run.sh.)
        let host_failed = !text.contains("TIER2 done") && out.status.code() != Some(124);
        if !host_failed || start.elapsed() > std::time::Duration::from_secs(1200) {
            break;
        }
        eprintln!(
            "tier2: the nested host failed before the end (status {:?}); booting it once more. Its console:\n{text}",
            out.status
        );
        (out, text) = nested();
    }
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
    res.insert(String::new(), text.clone());
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

/// The value after `key` up to the end of its line.
fn after<'a>(text: &'a str, key: &str) -> &'a str {
    text.split(key)
        .nth(1)
        .and_then(|s| s.lines().next())
        .unwrap_or("")
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// One boot of the nested host serves every scenario (it is the slow part).
///
/// The L2 guest has triple-faulted now and then in the nested TCG-SVM host,
/// under QEMU as under moat (issue 13's and 16's notes: the test host's
/// own CPU emulation); a scenario where moat logged that (those that run it
/// with MOAT_LOG=info) runs once more in a new boot of the test host, and
/// is then judged on that run alone.
#[test]
fn debian_linux_under_moat() {
    let all = [
        "boot-smp2",
        "boot-acpi-off",
        "blk",
        "jail",
        "rng",
        "net",
        "net-passt",
        "vsock",
    ];
    let mut r = run_tier2(&all);
    let faulted: Vec<&str> = all
        .into_iter()
        .filter(|s| r[*s].contains("the guest triple-faulted"))
        .collect();
    // (Judged before another boot of the test host remakes blk's image.)
    if !faulted.contains(&"blk") {
        virtio_blk_with_ext4(&r);
    }
    if !faulted.is_empty() {
        eprintln!(
            "tier2: the L2 guest triple-faulted in {faulted:?}; once more. The console:\n{}",
            r[""]
        );
        let again = run_tier2(&faulted);
        for s in &faulted {
            r.insert(s.to_string(), again[*s].clone());
        }
        if faulted.contains(&"blk") {
            r.insert(String::new(), again[""].clone());
            virtio_blk_with_ext4(&r);
        }
    }
    boots_to_userspace_with_two_cpus_and_acpi_poweroff(&r);
    virtio_rng_feeds_hwrng_within_its_limit(&r);
    virtio_net_on_a_two_queue_tap(&r);
    virtio_net_to_passt_over_a_stream(&r);
    virtio_vsock_both_ways_and_seqpacket(&r);
    jailed_on_cgroup_v2_with_apparmor(&r);
}

/// Linux's virtio_net on a two-queue tap in a network namespace of L1:
/// ping, 64 MiB each way with matching SHA-256 on both ends, both queue
/// pairs carry frames, and QMP's set_link is seen as the carrier.
fn virtio_net_on_a_two_queue_tap(r: &HashMap<String, String>) {
    let n = &r["net"];
    assert!(n.contains("L2: net queues rx-0 rx-1 tx-0 tx-1 \n"), "{n}");
    assert!(n.contains("L2: ping ok"), "{n}");
    let up = after(n, "L2: up sha256 ");
    assert_eq!(up.len(), 64, "{n}");
    assert!(n.contains("L2: upload done"), "{n}");
    assert_eq!(after(n, "TIER2 net from-guest sha256 "), up, "{n}");
    let down = after(n, "TIER2 net to-guest sha256 ");
    assert_eq!(down.len(), 64, "{n}");
    assert_eq!(
        after(n, "L2: down sha256 "),
        format!("{down} bytes {}", 64 << 20),
        "{n}"
    );
    // Both pairs moved frames each way (per-pair counters from QMP).
    let stats: serde_json::Value =
        serde_json::from_str(after(n, "TIER2 net stats ")).expect("stats are JSON");
    let queues = stats["return"][0]["queues"].as_array().expect("queues");
    assert_eq!(queues.len(), 2, "{n}");
    for q in queues {
        for k in ["rx-frames", "tx-frames"] {
            assert!(q[k].as_u64().unwrap_or(0) > 0, "{k} in {q}: {n}");
        }
    }
    assert!(
        stats["return"][0]["rx-bytes"].as_u64().unwrap_or(0) >= 64 << 20,
        "{n}"
    );
    let carrier0 = n.find("L2: carrier 0").expect("link down not seen");
    let carrier1 = n.find("L2: carrier 1").expect("link up not seen");
    assert!(carrier0 < carrier1, "{n}");
    assert!(n.contains("L2: ping after link up ok"), "{n}");
    assert!(n.contains("EXIT 0 "), "{n}");
}

/// -netdev stream to Debian's passt: Linux gets its address by DHCP from
/// passt and talks to a TCP server in L1 both ways.
fn virtio_net_to_passt_over_a_stream(r: &HashMap<String, String>) {
    let p = &r["net-passt"];
    assert!(p.contains("L2: dhcp 10.8.0.1/24 router 10.8.0.254"), "{p}");
    assert!(
        p.contains("L2: passt says hello from L1 through passt"),
        "{p}"
    );
    assert!(p.contains("TIER2 net-passt L1 got: hello from L2"), "{p}");
    assert!(p.contains("EXIT 0 "), "{p}");
}

/// Linux's virtio_rng is the hwrng core's current source, and
/// `max-bytes=8192,period=1000` holds: 32 KiB take at least three more
/// windows after the first (by the guest's clock).
fn virtio_rng_feeds_hwrng_within_its_limit(r: &HashMap<String, String>) {
    let t = &r["rng"];
    assert!(t.contains("EXIT 0"), "{t}");
    let current = after(t, "L2: rng current ");
    assert!(
        current.starts_with("virtio_rng.0 available virtio_rng.0 virtio_rng.1"),
        "{t}"
    );
    let read: Vec<f64> = after(t, "L2: rng read ")
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(read[0], 32768.0, "{t}");
    let secs = read[2] - read[1];
    assert!(secs >= 3.0, "32 KiB in {secs} s: over 8 KiB/s\n{t}");
    let zeros: u32 = after(t, "L2: rng zeros ").trim().parse().unwrap();
    assert!(zeros < 100, "{zeros} zero bytes of 4096\n{t}");
}

/// Linux's vsock over moat's virtio-vsock-device: 64 MiB each way on a
/// connection from L1 into the guest (Firecracker's CONNECT protocol) and
/// on one from the guest to a UNIX listener in L1, the same stream hash
/// at both ends; SEQPACKET messages up to 100000 bytes come back whole.
fn virtio_vsock_both_ways_and_seqpacket(r: &HashMap<String, String>) {
    let v = &r["vsock"];
    // Every sender hashes the same pseudo-random stream (tier2/vsock.c);
    // each receiver must print the hash its sender printed.
    let hash = |key: &str, dir: &str| -> String {
        let line = after(v, key);
        let w: Vec<&str> = line.split_whitespace().collect();
        let i = w
            .iter()
            .position(|x| *x == dir)
            .unwrap_or_else(|| panic!("{key}{dir}: {v}"));
        assert_eq!(w[i + 1], (64u32 << 20).to_string(), "{key}{dir}: {v}");
        w[i + 3].to_string()
    };
    let sent = hash("TIER2 vsock host-in ", "sent");
    assert_eq!(sent.len(), 8, "{v}");
    for (key, dir) in [
        ("L2: vsock in ", "recv"),
        ("L2: vsock in ", "sent"),
        ("TIER2 vsock host-in ", "recv"),
        ("L2: vsock out ", "sent"),
        ("TIER2 vsock host-out listening ", "recv"),
        ("TIER2 vsock host-out listening ", "sent"),
        ("L2: vsock out ", "recv"),
    ] {
        assert_eq!(hash(key, dir), sent, "{key}{dir}: {v}");
    }
    assert!(v.contains("L2: vsock seq seq 7 of 7 messages whole"), "{v}");
    assert!(v.contains("EXIT 0 "), "{v}");
}

/// moat-jail on a host with cgroup v2 and AppArmor (L1): the L2 kernel
/// boots under a jailed moat whose cgroup, AppArmor profile, namespaces,
/// credentials and root L1 inspects from outside; nothing is left after.
fn jailed_on_cgroup_v2_with_apparmor(r: &HashMap<String, String>) {
    let j = &r["jail"];
    assert!(j.contains("TIER2 jail profile loaded"), "{j}");
    assert!(j.contains("TIER2 jail comm moat"), "{j}");
    assert!(j.contains("TIER2 jail cgroup 0::/moat/tier2"), "{j}");
    assert!(j.contains("TIER2 jail cpu.max 150000 100000"), "{j}");
    assert!(j.contains("TIER2 jail memory.max 1073741824"), "{j}");
    assert!(j.contains("TIER2 jail pids.max 64"), "{j}");
    assert!(
        j.contains("TIER2 jail apparmor moat-jailed (enforce)"),
        "{j}"
    );
    for ns in ["mnt", "pid", "ipc", "uts", "cgroup"] {
        assert!(
            j.contains(&format!("TIER2 jail own ns {ns}\n")),
            "{ns}: {j}"
        );
    }
    let status = after(j, "TIER2 jail Uid:");
    assert!(status.starts_with(" 65534 65534 65534 65534"), "{j}");
    assert!(status.contains("CapEff: 0000000000000000"), "{j}");
    assert!(
        status.contains("NoNewPrivs: 1") && status.contains("Seccomp: 2"),
        "{j}"
    );
    let root: std::collections::BTreeSet<&str> =
        after(j, "TIER2 jail root ").split_whitespace().collect();
    for want in ["moat", "dev", "proc", "vmlinuz", "initrd.gz", "lib"] {
        assert!(
            root.contains(want),
            "{want} missing from the jail root: {root:?}"
        );
    }
    for not in ["etc", "l2", "srv", "sys", "tmp", "init", "modules"] {
        assert!(!root.contains(not), "{not} in the jail root: {root:?}");
    }
    // (moat's thread stacks once took a 2 MiB huge page each.)
    assert!(j.contains("TIER2 jail thp [always]"), "{j}");
    assert!(
        j.contains("TIER2 jail huge pages outside guest RAM 0 kB"),
        "{j}"
    );
    assert!(j.contains("L2: userspace reached"), "{j}");
    assert!(j.contains("L2: cpus online 0-1 count 2"), "{j}");
    assert!(j.contains("TIER2 jail moat-jail exit 0"), "{j}");
    assert!(j.contains("TIER2 jail left [] []"), "{j}");
}

/// Linux finds both virtio-blk disks through ACPI, makes an ext4 file system
/// on the qcow2 one (extended L2 entries, on a `num-queues=2` device: blk-mq
/// has a hardware queue per vCPU) and reads a file from the raw one; the host
/// checks the result with qemu-img check, e2fsck and debugfs.
fn virtio_blk_with_ext4(r: &HashMap<String, String>) {
    let b = &r["blk"];
    assert!(b.contains("L2: disks vda vdb"), "{b}");
    assert!(b.contains("L2: vda queues 0 1 \n"), "{b}");
    assert!(
        b.contains("L2: vdb ro 1 size 32768 serial moat-l2-data"),
        "{b}"
    );
    assert!(
        b.contains("L2: mkfs ok") && b.contains("L2: mount vda ok"),
        "{b}"
    );
    assert!(
        b.contains("L2: host file says: hello from the host, via mkfs.ext4 -d"),
        "{b}"
    );
    assert!(b.contains("L2: unmounted") && b.contains("EXIT 0 "), "{b}");
    let sha = after(b, "L2: random sha256 ").trim().to_string();
    let qcow2 = after(&r[""], "TIER2 host data image ").trim().to_string();
    assert!(!qcow2.is_empty(), "no data image path");
    // The guest wrote through moat's qcow2: qemu-img judges the image, then
    // the file system inside it is checked from qemu-img's reading of it.
    let (ok, log) = run("qemu-img", &["check", &qcow2]);
    assert!(ok, "qemu-img check {qcow2}:\n{log}");
    let (_, info) = run("qemu-img", &["info", "--output=json", &qcow2]);
    assert!(info.contains("\"extended-l2\": true"), "{info}");
    let img = format!("{qcow2}.raw");
    let (ok, log) = run("qemu-img", &["convert", "-O", "raw", &qcow2, &img]);
    assert!(ok, "qemu-img convert {qcow2}:\n{log}");
    let (ok, log) = run("e2fsck", &["-fn", &img]);
    assert!(ok, "e2fsck -fn {img}:\n{log}");
    let (_, text) = run("debugfs", &["-R", "cat /from-guest.txt", &img]);
    assert!(
        text.contains("written by the L2 guest through moat's virtio-blk"),
        "{text}"
    );
    let dump = format!("{img}.random.bin");
    run(
        "debugfs",
        &["-R", &format!("dump /random.bin {dump}"), &img],
    );
    let (_, sum) = run("sha256sum", &[&dump]);
    assert_eq!(
        sum.split_whitespace().next(),
        Some(sha.as_str()),
        "random.bin differs"
    );
    let _ = std::fs::remove_file(&dump);
    let _ = std::fs::remove_file(&img);
}

fn boots_to_userspace_with_two_cpus_and_acpi_poweroff(r: &HashMap<String, String>) {
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
