//! Tier 1: virtio-vsock, driven by the test guest's polling driver: host
//! programs connecting in (stream and SEQPACKET, Firecracker's `CONNECT`
//! protocol), the guest connecting out to host listeners, a guest reset
//! closing every host connection, and a hostile driver.

mod common;
use common::*;
use moat_guests::TEST_PVH;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketType};
use std::io::{BufRead, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

fn device(path: &Path) -> String {
    format!(
        "virtio-vsock-device,guest-cid=3,uds-path={}",
        path.display()
    )
}

fn port_path(base: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", base.display()))
}

/// A stream listener at `path` echoing each connection.
fn stream_echo(path: &Path) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
}

fn seqpacket_socket() -> OwnedFd {
    rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap()
}

/// A SEQPACKET listener at `path` echoing each message whole.
fn seqpacket_echo(path: &Path) {
    let l = seqpacket_socket();
    rustix::net::bind(&l, &SocketAddrUnix::new(path).unwrap()).unwrap();
    rustix::net::listen(&l, 16).unwrap();
    std::thread::spawn(move || loop {
        let Ok(s) = rustix::net::accept(&l) else {
            return;
        };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match rustix::net::recv(&s, &mut buf[..], RecvFlags::empty()) {
                    Ok((0, _)) | Err(_) => return,
                    Ok((n, _)) => {
                        if rustix::net::send(&s, &buf[..n], SendFlags::empty()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    });
}

#[test]
fn guest_connects_to_host_listeners() {
    let dir = scratch("vsock-out");
    let base = dir.join("v.sock");
    stream_echo(&port_path(&base, 5000));
    seqpacket_echo(&port_path(&base, 5001));
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "vsock=3 vsock_connect=5000 vsock_seq=5001 action=poweroff",
        "-device",
        &device(&base),
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("vsock: cid 3"), "{r:#?}");
    assert!(r.stdout.contains("vsock: stream ok"), "{r:#?}");
    assert!(r.stdout.contains("vsock: seqpacket ok"), "{r:#?}");
    // moat removes its listening sockets at exit.
    assert!(!base.exists() && !dir.join("v.sock.seqpacket").exists());
}

#[test]
fn hostile_driver_is_answered_and_the_device_survives() {
    let dir = scratch("vsock-hostile");
    let base = dir.join("v.sock");
    // Port 5000 accepts and never reads: moat's buffer for it must fill
    // and the guest sending past its credit be reset.
    let sink = UnixListener::bind(port_path(&base, 5000)).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in sink.incoming() {
            held.push(s);
        }
    });
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "vsock=3 vsock_hostile=5000 action=poweroff",
        "-device",
        &device(&base),
    ]);
    r.assert_pass();
    assert!(r.stdout.contains("vsock: hostile done"), "{r:#?}");
    assert!(!r.stderr.contains("panick"), "{r:#?}");
}

/// Connect to moat's listener and ask for guest port `port`: the stream
/// and moat's local port, or None when refused.
fn connect_in(base: &Path, port: u32) -> Option<(UnixStream, u32)> {
    let mut s = UnixStream::connect(base).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8];
    while s.read(&mut b).ok()? == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            let text = String::from_utf8(line).unwrap();
            let local = text.strip_prefix("OK ")?.trim_end().parse().unwrap();
            return Some((s, local));
        }
    }
    None
}

fn pattern(seed: u32, n: usize) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) >> 3) as u8)
        .collect()
}

fn echo_roundtrip(s: &mut UnixStream, data: &[u8]) {
    for chunk in data.chunks(64 * 1024) {
        s.write_all(chunk).unwrap();
        let mut back = vec![0u8; chunk.len()];
        s.read_exact(&mut back).unwrap();
        assert!(back == chunk, "echo differs");
    }
}

#[test]
fn host_connects_to_the_guest() {
    let dir = scratch("vsock-in");
    let base = dir.join("v.sock");
    let mut child = Reaped(
        moat_command()
            .args([
                "-kernel",
                TEST_PVH,
                "-append",
                "vsock=3 vsock_echo=1234 action=poweroff",
                "-device",
                &device(&base),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let out = std::io::BufReader::new(child.0.stdout.take().unwrap());
    std::thread::spawn(move || {
        for l in out.lines() {
            let Ok(l) = l else { return };
            let _ = tx.send(l);
        }
    });
    let mut lines = Vec::new();
    let mut wait_for = |what: &str| loop {
        let l = rx
            .recv_timeout(HANG)
            .unwrap_or_else(|_| panic!("no '{what}' in {lines:#?}"));
        lines.push(l.clone());
        if l.contains(what) {
            return;
        }
        assert!(!l.contains("FAIL"), "{lines:#?}");
    };
    wait_for("vsock: listening on 1234");

    // Two stream connections at once, 1 MiB each, echoed.
    let (mut a, pa) = connect_in(&base, 1234).expect("CONNECT 1234 refused");
    let (mut b, pb) = connect_in(&base, 1234).expect("second CONNECT refused");
    assert!(pa >= 1 << 30 && pb >= 1 << 30 && pa != pb, "{pa} {pb}");
    let (da, db) = (pattern(1, 1 << 20), pattern(2, 1 << 20));
    for (ca, cb) in da.chunks(128 * 1024).zip(db.chunks(128 * 1024)) {
        echo_roundtrip(&mut a, ca);
        echo_roundtrip(&mut b, cb);
    }
    // A port the guest does not listen on: closed without an OK.
    assert!(connect_in(&base, 4321).is_none());
    // Not a CONNECT line: closed.
    let mut bad = UnixStream::connect(&base).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    bad.write_all(b"HELLO 1234\n").unwrap();
    assert_eq!(bad.read(&mut [0u8; 16]).unwrap(), 0);

    // SEQPACKET: each message comes back whole, whatever its size (moat
    // splits it into the guest's 4 KiB buffers and joins the echo).
    let sp = seqpacket_socket();
    rustix::net::connect(
        &sp,
        &SocketAddrUnix::new(dir.join("v.sock.seqpacket")).unwrap(),
    )
    .unwrap();
    rustix::net::send(&sp, b"CONNECT 1234\n", SendFlags::empty()).unwrap();
    let mut buf = vec![0u8; 300_000];
    let (n, _) = rustix::net::recv(&sp, &mut buf[..], RecvFlags::empty()).unwrap();
    assert!(
        buf[..n].starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    for (i, size) in [1usize, 100, 4096, 5000, 70_000, 200_000]
        .into_iter()
        .enumerate()
    {
        let m = pattern(i as u32, size);
        rustix::net::send(&sp, &m, SendFlags::empty()).unwrap();
        let (n, len) = rustix::net::recv(&sp, &mut buf[..], RecvFlags::TRUNC).unwrap();
        assert_eq!((n, len), (size, size), "message {i}");
        assert!(buf[..n] == m[..], "message {i} differs");
    }

    // A guest reset of the device closes every host connection; a new one
    // works after the guest re-initialises it.
    a.write_all(b"RESET").unwrap();
    wait_for("vsock: resetting");
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).unwrap();
    b.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes after the reset", rest.len());
    assert_eq!(
        rustix::net::recv(&sp, &mut buf[..], RecvFlags::empty())
            .unwrap()
            .0,
        0
    );
    let mut c = (0..50)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            connect_in(&base, 1234)
        })
        .expect("no connection after the reset")
        .0;
    echo_roundtrip(&mut c, &pattern(3, 200_000));

    // Port 9999 ends the guest's loop; it powers off.
    let _ = connect_in(&base, 9999);
    wait_for("RESULT: PASS");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
