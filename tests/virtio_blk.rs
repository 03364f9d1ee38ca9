//! Tier 1: virtio-mmio + virtio-blk with a raw image, driven by the test
//! guest's own polling driver; the host then checks the image bytes.

mod common;
use common::*;
use moat_guests::TEST_PVH;
use serde_json::json;
use std::io::Read;
use std::process::Stdio;

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

/// cache=none: the guest's aligned I/O bypasses the host page cache (moat
/// holds the image open with O_DIRECT), unaligned requests still work, and
/// the data is right either way.
#[test]
fn cache_none_uses_o_direct() {
    // O_DIRECT needs a real file system (not every tmpfs has it): the target dir.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cache-none");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("d.img");
    let data = pattern(1 << 20, 5);
    std::fs::write(&img, &data).unwrap();
    let drive = format!("file={},format=raw,if=virtio,cache=none", img.display());
    let append = format!(
        "blk=1 blk_len=65536 blk_sum={:#x} blk_write=1 blk_oob=1 action=poweroff",
        fnv1a(&data[..65536])
    );
    let r = moat(&["-kernel", TEST_PVH, "-append", &append, "-drive", &drive]);
    r.assert_pass();
    let after = std::fs::read(&img).unwrap();
    assert!(after[4096..8192]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i * 7 + 3) as u8));
    assert_eq!(after[8192..], data[8192..]);

    // Which descriptors point at the image, and with what flags.
    let mut child = moat_command()
        .args(["-kernel", TEST_PVH, "-S", "-drive", &drive])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let flags = loop {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id())).unwrap();
        let flags: Vec<u32> = fds
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(img.as_path()))
            .filter_map(|e| {
                let info = std::fs::read_to_string(format!(
                    "/proc/{}/fdinfo/{}",
                    child.id(),
                    e.file_name().to_str()?
                ))
                .ok()?;
                let f = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))?
                    .trim()
                    .to_string();
                u32::from_str_radix(&f, 8).ok()
            })
            .collect();
        let settled = !flags.is_empty() && start.elapsed() > std::time::Duration::from_secs(5);
        if flags.len() >= 2 || settled || start.elapsed() > HANG {
            break flags;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        flags.iter().any(|f| f & libc::O_DIRECT as u32 != 0),
        "no O_DIRECT descriptor on the image: {flags:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The wedging guest (test guest `blk_wedge`: 25 reads of ~3.75 GiB each,
/// every data descriptor on the same 480 MiB of its RAM, from a sparse
/// 128 GiB disk, then a device reset while they run), with `extra` options;
/// its console lines come on the receiver.
fn start_wedge(
    dir: &std::path::Path,
    extra: &[&str],
) -> (Reaped, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let disk = dir.join("sparse.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(128 << 30)
        .unwrap();
    let drive = format!("file={},format=raw,if=virtio", disk.display());
    let mut args = vec![
        "-m",
        "1024",
        "-kernel",
        TEST_PVH,
        "-append",
        "blk=1 blk_wedge=503316480 action=count",
        "-drive",
        &drive,
    ];
    args.extend_from_slice(extra);
    let child = moat_command()
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let (tx, lines) = std::sync::mpsc::channel();
    let out = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, lines)
}

/// Wait for a console line containing `what`, at most `limit`.
fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    limit: std::time::Duration,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(what) => return,
            Ok(_) => {}
            Err(_) => panic!("no \"{what}\" within {limit:?}"),
        }
    }
}

/// Wait for `child` to exit, at most `limit`; its status.
fn exit_within(child: &mut Reaped, limit: std::time::Duration) -> std::process::ExitStatus {
    let t = std::time::Instant::now();
    loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            return s;
        }
        assert!(t.elapsed() < limit, "moat did not exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A guest resets its disk while the device works on 25 reads of ~3.75 GiB.
/// The reset returned only after every request had been copied (~40 s),
/// holding the vCPU and the device lock meanwhile, so QMP `stop` timed out
/// and SIGTERM or `quit` waited as long. Now the worker stops at its next
/// chunk and the vCPU never waits for it. (The limits below are hang
/// guards: a healthy moat answers in milliseconds.)
#[test]
fn a_guest_resetting_a_busy_disk_wedges_neither_vcpu_nor_monitor() {
    use std::time::{Duration, Instant};
    const GUARD: Duration = Duration::from_secs(15);
    let dir = scratch("vblk-wedge");
    let qmp = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let (mut child, lines) = start_wedge(&dir, &["-qmp", &qmp_arg]);
    wait_for_line(&lines, "wedge: resetting", HANG);
    wait_for_line(&lines, "wedge: reset returned", GUARD);
    let mut q = Qmp::connect(&qmp);
    let t = Instant::now();
    assert_eq!(q.execute("stop"), serde_json::json!({"return": {}}));
    let status = q.execute("query-status");
    assert_eq!(status["return"]["status"], "paused", "{status}");
    assert!(t.elapsed() < GUARD, "stop took {:?}", t.elapsed());
    q.execute("cont");
    wait_for_line(&lines, "count ", GUARD);
    q.execute("quit");
    assert!(exit_within(&mut child, GUARD).success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same guest, ended by SIGTERM instead: moat exits at once.
#[test]
fn sigterm_ends_moat_while_a_reset_disk_is_busy() {
    const GUARD: std::time::Duration = std::time::Duration::from_secs(15);
    let dir = scratch("vblk-wedge-term");
    let (mut child, lines) = start_wedge(&dir, &[]);
    wait_for_line(&lines, "wedge: resetting", HANG);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert!(exit_within(&mut child, GUARD).success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The host disk fills up under a guest's writes: with QEMU's default
/// `werror=enospc` the VM stops (BLOCK_IO_ERROR with action "stop", then
/// STOP; query-status "io-error", query-block "nospace"), and once space is
/// freed `cont` retries the held request: every byte the guest wrote is in
/// the image. (A tmpfs with a size limit is the full disk; needs root.)
#[test]
fn a_full_host_disk_stops_the_vm_and_cont_loses_nothing() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = scratch("enospc");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "moat-enospc"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mount.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let img = mnt.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    // Fill the tmpfs, then give back 128 KiB: the guest's first writes fit,
    // a later one meets ENOSPC.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0x55; 4096]).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len - (128 << 10)).unwrap();
    }
    let qmp = dir.join("qmp.sock");
    const LEN: u64 = 512 << 10;
    let mut child = Reaped(
        moat_command()
            .args(["-kernel", TEST_PVH, "-append"])
            .arg(format!("blk=1 blk_fill={LEN} action=poweroff"))
            .args(["-drive"])
            .arg(format!("file={},format=raw,if=virtio", img.display()))
            .args(["-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut q = Qmp::connect(&qmp);
    let event = |q: &mut Qmp, name: &str| loop {
        let m = q.message();
        if m["event"] == name {
            return m;
        }
    };
    let err = event(&mut q, "BLOCK_IO_ERROR");
    let d = &err["data"];
    assert_eq!(
        (&d["operation"], &d["action"], &d["nospace"]),
        (&json!("write"), &json!("stop"), &json!(true)),
        "{err}"
    );
    assert_eq!(d["reason"], "No space left on device", "{err}");
    event(&mut q, "STOP");
    assert_eq!(
        q.execute("query-status")["return"],
        json!({"running": false, "singlestep": false, "status": "io-error"})
    );
    assert_eq!(
        q.execute("query-block")["return"][0]["io-status"],
        "nospace"
    );
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(q.execute("cont")["return"], json!({}));
    let status = child.0.wait().unwrap();
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{status:?}\n{out}");
    assert!(
        out.contains("RESULT: PASS") && !out.contains("FAIL"),
        "{out}"
    );
    let data = std::fs::read(&img).unwrap();
    let want = format!("blk: filled {LEN} fnv {:x}", fnv1a(&data[..LEN as usize]));
    assert!(out.contains(&want), "{want}\n{out}");
    // Every byte is the pattern the guest wrote (the hash above is of the
    // image; this says it is the guest's data, not whatever was there).
    for (i, b) in data[..LEN as usize].iter().enumerate() {
        let i = i as u64;
        assert_eq!(*b, (i * 13 + i / 4099) as u8, "byte {i}");
    }
}

/// `num-queues=4`: the device offers VIRTIO_BLK_F_MQ with four queues,
/// and a driver using only queue 3 is served there (each queue has its own
/// I/O thread).
#[test]
fn a_multi_queue_disk_serves_each_queue() {
    let dir = scratch("vblk-mq");
    let img = dir.join("d.img");
    let data = pattern(64 << 10, 7);
    std::fs::write(&img, &data).unwrap();
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        &format!(
            "blk=1 blk_queue=3 blk_len=65536 blk_sum={:#x} blk_write=1 action=poweroff",
            fnv1a(&data)
        ),
        "-drive",
        &format!("file={},format=raw,if=none,id=d0", img.display()),
        "-device",
        "virtio-blk-device,drive=d0,num-queues=4",
    ]);
    r.assert_pass();
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("blk: capacity"))
        .unwrap_or_else(|| panic!("{r:#?}"));
    assert!(line.ends_with("queues 4"), "{line}");
    let features = u64::from_str_radix(
        line.split("features ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap(),
        16,
    )
    .unwrap();
    assert_ne!(features & 1 << 12, 0, "no VIRTIO_BLK_F_MQ: {line}");
    // blk_write wrote sectors 8..15 through queue 3.
    let after = std::fs::read(&img).unwrap();
    assert_eq!(after[8 * 512 + 4095], (4095u32 * 7 + 3) as u8);
}
