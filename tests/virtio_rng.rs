//! Tier 1: virtio-rng, driven by the test guest's polling driver: bytes
//! from each source, QEMU's rate limit, a hostile driver.

mod common;
use common::*;
use moat_guests::TEST_PVH;
use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// "rng: read N bytes fnv X zeros Z": N and Z.
fn read_report(stdout: &str) -> (u64, u64) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("rng: read "))
        .unwrap_or_else(|| panic!("no read report in {stdout}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    (w[2].parse().unwrap(), w[7].parse().unwrap())
}

#[test]
fn both_sources_give_random_bytes() {
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "rng=2 rng_read=200000 action=poweroff",
        "-object",
        "rng-random,id=r0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=r0",
        "-device",
        "virtio-rng-device",
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("rng: 2 devices"), "{r:#?}");
    let (n, zeros) = read_report(&r.stdout);
    assert_eq!(n, 200_000);
    // Random bytes: about 1 in 256 is zero (781 expected, sd 28); a
    // device that wrote nothing would leave 200000.
    assert!((500..1100).contains(&zeros), "{zeros} zero bytes in {n}");
    // The same run on the built-in source (the second device alone).
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "rng=1 rng_read=200000 action=poweroff",
        "-object",
        "rng-builtin,id=b",
        "-device",
        "virtio-rng-device,rng=b",
    ]);
    r.assert_pass();
    let (n2, zeros2) = read_report(&r.stdout);
    assert_eq!(n2, 200_000);
    assert!((500..1100).contains(&zeros2), "{zeros2} zero bytes in {n2}");
}

#[test]
fn hostile_driver_is_answered_and_the_device_survives() {
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "rng=1 rng_hostile=1 rng_read=4096 action=poweroff",
        "-device",
        "virtio-rng-device",
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("rng: hostile done"), "{r:#?}");
    assert_eq!(read_report(&r.stdout).0, 4096);
    assert!(!r.stderr.contains("error"), "{r:#?}");
}

#[test]
fn quota_holds_and_a_reset_does_not_refill_it() {
    // A request for twice the quota gets the quota; the next waits (the
    // guest gives up on it; the vCPU is never held), and a device reset
    // does not refill the quota.
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "rng=1 rng_quota=1000 action=poweroff",
        "-device",
        "virtio-rng-device,max-bytes=1000,period=600000",
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("rng: throttled"), "{r:#?}");
    assert!(r.stdout.contains("rng: still throttled"), "{r:#?}");
}

#[test]
fn rate_limit_spreads_reads_over_periods() {
    // 5000 bytes at 1000 per 250 ms window: five windows, so at least four
    // waits for one to close.
    let mut child = moat_command()
        .args([
            "-kernel",
            TEST_PVH,
            "-append",
            "rng=1 rng_read=5000 action=poweroff",
            "-device",
            "virtio-rng-device,max-bytes=1000,period=250",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut start = None;
    let mut elapsed = None;
    for line in out.lines() {
        let line = line.unwrap();
        if line.starts_with("rng: reading") {
            start = Some(Instant::now());
        }
        if line.starts_with("rng: read ") {
            assert!(line.starts_with("rng: read 5000 bytes"), "{line}");
            elapsed = start.map(|s| s.elapsed());
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let elapsed = elapsed.expect("the guest read its bytes");
    assert!(
        elapsed >= Duration::from_millis(1000),
        "5000 bytes in {elapsed:?}: faster than 1000 bytes per 250 ms"
    );
}
