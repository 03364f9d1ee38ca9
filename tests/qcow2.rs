//! Tier 1: qcow2 images under a real guest. The test guest's virtio-blk
//! driver reads and writes through moat; qemu-img then judges the image.

mod common;
use common::*;
use moat_guests::TEST_PVH;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (apt install qemu-utils)")
}

fn qemu_img_ok(args: &[&str]) {
    let o = qemu_img(args);
    assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
}

/// The blocks the guest's `blk_storm=N` writes (xorshift32 from 1), in order.
fn storm_blocks(n: usize, blocks: u64) -> Vec<u64> {
    let mut x: u32 = 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            u64::from(x) % blocks
        })
        .collect()
}

fn storm_block(k: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i * 7 + k * 13 + 1) as u8).collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn guest_reads_and_writes_a_qcow2_chain_and_qemu_img_agrees() {
    let dir = scratch("qcow2-chain");
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    let size = 8 << 20;
    let base_data = pattern(size);
    std::fs::write(&base, &base_data).unwrap();
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&top),
    ]);
    let writes = 300;
    let append = format!(
        "blk=1 blk_len=65536 blk_sum={:#x} blk_storm={writes} blk_write=1 action=poweroff",
        fnv1a(&base_data[..65536])
    );
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        &append,
        "-drive",
        &format!(
            "file={},format=qcow2,if=virtio,backing.driver=raw,backing.file.filename={}",
            s(&top),
            s(&base)
        ),
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("blk: storm done"), "{r:#?}");
    let mut want = base_data.clone();
    for k in storm_blocks(writes, size as u64 / 4096) {
        want[k as usize * 4096..][..4096].copy_from_slice(&storm_block(k));
    }
    for (i, b) in want[4096..8192].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let expected = dir.join("want.raw");
    std::fs::write(&expected, &want).unwrap();
    qemu_img_ok(&["check", s(&top)]);
    qemu_img_ok(&["compare", "-F", "raw", s(&top), s(&expected)]);
    assert!(
        std::fs::read(&base).unwrap() == base_data,
        "the backing image changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that never flushes and powers off: moat writes the qcow2
/// metadata back at exit, as QEMU does.
#[test]
fn unflushed_writes_reach_the_image_at_poweroff() {
    let dir = scratch("qcow2-noflush");
    let img = dir.join("d.qcow2");
    let size: u64 = 16 << 20;
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        s(&img),
        &size.to_string(),
    ]);
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "blk=1 blk_storm=200 blk_noflush=1 action=poweroff",
        "-drive",
        &format!("file={},format=qcow2,if=virtio", s(&img)),
    ]);
    r.assert_pass();
    let mut want = vec![0u8; size as usize];
    for k in storm_blocks(200, size / 4096) {
        want[k as usize * 4096..][..4096].copy_from_slice(&storm_block(k));
    }
    let expected = dir.join("want.raw");
    std::fs::write(&expected, &want).unwrap();
    qemu_img_ok(&["check", s(&img)]);
    qemu_img_ok(&["compare", "-F", "raw", s(&img), s(&expected)]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_9_in_a_write_storm_leaves_no_corruption() {
    kill_9_in_a_write_storm(true, "cluster_size=4096,refcount_bits=16");
}

/// The same on extended L2 entries (16 KiB clusters of 512-byte
/// subclusters: every first write into a cluster fills the rest of it).
#[test]
fn kill_9_in_a_write_storm_on_extended_l2_leaves_no_corruption() {
    kill_9_in_a_write_storm(false, "cluster_size=16384,extended_l2=on");
}

/// Without guest flushes, moat's own write ordering is all that keeps the
/// metadata consistent (new L2 tables allocated all the time).
#[test]
fn kill_9_in_a_write_storm_without_flushes_leaves_no_corruption() {
    kill_9_in_a_write_storm(false, "cluster_size=4096,refcount_bits=16");
}

fn kill_9_in_a_write_storm(flushes: bool, opts: &str) {
    let dir = scratch("qcow2-kill");
    let img = dir.join("d.qcow2");
    let serial = dir.join("serial.log");
    let size: u64 = 32 << 20;
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        opts,
        s(&img),
        &size.to_string(),
    ]);
    let mut child = moat_command()
        .args([
            "-kernel",
            TEST_PVH,
            "-append",
            if flushes {
                "blk=1 blk_storm=0"
            } else {
                "blk=1 blk_storm=0 blk_noflush=1"
            },
            "-serial",
            &format!("file:{}", s(&serial)),
            "-drive",
            &format!("file={},format=qcow2,if=virtio", s(&img)),
        ])
        .spawn()
        .unwrap();
    // Wait until the guest has written (and flushed) its first 64 blocks and
    // is in the middle of more (a hang guard, not a timing assertion).
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains("storm running") {
            break;
        }
        assert!(!log.contains("FAIL"), "{log}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "moat exited early: {log}"
        );
        assert!(start.elapsed() < HANG, "the storm never started: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SIGKILL: no chance to flush anything.
    child.kill().unwrap();
    child.wait().unwrap();

    // qemu-img check: 0 = clean, 3 = leaked clusters only; 2 = corruption.
    let o = qemu_img(&["check", s(&img)]);
    assert!(
        matches!(o.status.code(), Some(0) | Some(3)),
        "corrupted: {o:?}"
    );
    // Every block holds zeroes or exactly what the guest wrote there, and the
    // first 64 writes are all present when they were flushed.
    let raw = dir.join("d.raw");
    qemu_img_ok(&["convert", "-O", "raw", s(&img), s(&raw)]);
    let data = std::fs::read(&raw).unwrap();
    assert_eq!(data.len() as u64, size);
    for (k, block) in data.chunks(4096).enumerate() {
        assert!(
            block.iter().all(|&b| b == 0) || block == storm_block(k as u64).as_slice(),
            "block {k} holds neither zeroes nor the guest's data"
        );
    }
    for k in storm_blocks(if flushes { 64 } else { 0 }, size / 4096) {
        assert_eq!(
            data[k as usize * 4096..][..4096],
            storm_block(k)[..],
            "flushed block {k} lost"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The probing attack: a guest writes a qcow2 header (naming a host file
/// as its backing file) into its raw disk. A read-only drive without
/// format= is raw in moat, never probed: the guest reads its own bytes back
/// and moat opens no other file.
#[test]
fn a_qcow2_header_in_a_raw_disk_stays_raw() {
    let dir = scratch("qcow2-probe");
    let img = dir.join("guest.img");
    let q = dir.join("evil.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        s(&q),
        "1M",
    ]);
    let mut data = std::fs::read(&q).unwrap();
    data.resize(1 << 20, 0);
    std::fs::write(&img, &data).unwrap();
    let append = format!(
        "blk=1 blk_len=65536 blk_sum={:#x} action=poweroff",
        fnv1a(&data[..65536])
    );
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        &append,
        "-drive",
        &format!("file={},readonly=on", s(&img)),
    ]);
    r.assert_pass();
    // Writable without format=: refused before anything is opened.
    let r = moat(&["-kernel", TEST_PVH, "-drive", &format!("file={}", s(&img))]);
    assert_eq!(r.status, Some(1), "{r:#?}");
    assert!(r.stderr.contains("never probes"), "{r:#?}");
    // As qcow2 without naming the backing file: refused, /etc/shadow untouched.
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-drive",
        &format!("file={},format=qcow2,readonly=on", s(&img)),
    ]);
    assert_eq!(r.status, Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("/etc/shadow") && r.stderr.contains("never opens"),
        "{r:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest reads a zstd-compressed image under the default sandbox, after
/// moat dropped to nobody. Decompressing frees memory in the virtio-blk
/// thread's arena, and glibc then opens /proc/sys/vm/overcommit_memory:
/// the block role's filter killed moat on that open (SIGSYS, "virtio-blk",
/// openat) before it answered EACCES.
#[test]
fn a_guest_reads_a_zstd_image_under_the_sandbox_as_nobody() {
    let dir = scratch("qcow2-zstd-nobody");
    let raw = dir.join("src.raw");
    let img = dir.join("z.qcow2");
    // Text that compresses to a few KiB per cluster (as `seq` prints it):
    // the decoder's buffers are then large enough to be trimmed.
    let len = 1 << 20;
    let mut data: Vec<u8> = (1..)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .take(len)
        .collect();
    data.truncate(len);
    std::fs::write(&raw, &data).unwrap();
    qemu_img_ok(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&raw),
        s(&img),
    ]);
    let append = format!(
        "blk=1 blk_len={len} blk_sum={:#x} action=poweroff",
        fnv1a(&data)
    );
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        &append,
        "-drive",
        &format!("file={},format=qcow2,if=virtio,readonly=on", s(&img)),
        "-run-with",
        "user=nobody",
    ]);
    r.assert_pass();
    let _ = std::fs::remove_dir_all(&dir);
}
