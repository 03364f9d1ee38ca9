//! Tier 1: virtio-mmio + virtio-blk with a raw image, driven by the test
//! guest's own polling driver; the host then checks the image bytes.

mod common;
use common::*;
use moat_guests::TEST_PVH;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

#[test]
fn guest_reads_writes_and_identifies_disks() {
    let dir = scratch("vblk");
    let d0 = dir.join("d0.img");
    let d1 = dir.join("d1.img");
    let data0 = pattern(1 << 20, 1);
    let data1 = pattern(64 << 10, 2);
    std::fs::write(&d0, &data0).unwrap();
    std::fs::write(&d1, &data1).unwrap();
    let append = format!(
        "blk=2 blk_len=65536 blk_sum={:#x} blk_serial=moat-disk-0 blk_write=1 blk_oob=1 blk_ro=1 action=poweroff",
        fnv1a(&data0[..65536])
    );
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        &append,
        "-drive",
        &format!("file={},format=raw,if=none,id=disk0", d0.display()),
        "-device",
        "virtio-blk-device,drive=disk0,serial=moat-disk-0",
        "-drive",
        &format!("file={},format=raw,if=virtio,readonly=on", d1.display()),
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("blk: 2 devices"), "{r:#?}");
    // Sectors 8..15 hold the guest's pattern; every other byte is unchanged.
    let after = std::fs::read(&d0).unwrap();
    assert_eq!(after.len(), data0.len());
    for (i, (&a, &b)) in after.iter().zip(&data0).enumerate() {
        let want = if (4096..8192).contains(&i) {
            ((i - 4096) * 7 + 3) as u8
        } else {
            b
        };
        assert_eq!(a, want, "byte {i}");
    }
    assert_eq!(
        std::fs::read(&d1).unwrap(),
        data1,
        "the read-only disk changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_driver_gets_errors_or_needs_reset_and_the_device_survives() {
    let dir = scratch("vblk-hostile");
    let d0 = dir.join("d0.img");
    let data0 = pattern(1 << 20, 3);
    std::fs::write(&d0, &data0).unwrap();
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "blk=1 blk_hostile=1 blk_len=4096 action=poweroff",
        "-drive",
        &format!("file={},format=raw,if=virtio", d0.display()),
    ]);
    r.assert_pass();
    assert!(
        r.stdout.contains("blk: hostile requests survived"),
        "{r:#?}"
    );
    // Guest-triggered protocol errors are not logged as host errors.
    assert!(!r.stderr.contains("error"), "{r:#?}");
    assert_eq!(
        std::fs::read(&d0).unwrap(),
        data0,
        "hostile requests changed the image"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn drive_errors_are_refused_at_startup() {
    let dir = scratch("vblk-errors");
    let img = dir.join("x.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    for (args, want) in [
        (
            vec!["-drive".to_string(), format!("file={}", img.display())],
            "never probes",
        ),
        (
            vec!["-drive".into(), "file=/nonexistent.img,format=raw".into()],
            "No such file",
        ),
        (
            vec![
                "-drive".into(),
                format!("file={},format=qcow2", img.display()),
            ],
            "no qcow2 magic",
        ),
        (
            vec![
                "-drive".into(),
                format!("file={},format=raw", dir.display()),
            ],
            "Is a directory",
        ),
        (
            vec![
                "-drive".into(),
                format!("file={},format=raw,readonly=on", dir.display()),
            ],
            "not a regular file",
        ),
    ] {
        let mut a: Vec<&str> = vec!["-kernel", TEST_PVH];
        a.extend(args.iter().map(String::as_str));
        let r = moat(&a);
        assert_eq!(r.status, Some(1), "{args:?}: {r:#?}");
        assert!(r.stderr.contains(want), "{args:?}: {r:#?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
