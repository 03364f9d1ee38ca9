//! Tier 1: the serial backends (file, UNIX socket, null) with a real guest.

mod common;
use common::*;
use moat_guests::TEST_PVH;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn file_backend_receives_the_console() {
    let dir = scratch("serial-file");
    let out = dir.join("console.log");
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-append",
        "action=poweroff",
        "-serial",
        &format!("file:{}", out.display()),
    ]);
    assert_eq!(r.status, Some(0), "{r:#?}");
    assert!(r.stdout.is_empty(), "{r:#?}");
    let log = std::fs::read_to_string(&out).unwrap();
    assert!(log.contains("RESULT: PASS"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn null_and_none_discard_the_console() {
    for s in ["null", "none"] {
        let r = moat(&[
            "-kernel",
            TEST_PVH,
            "-append",
            "action=poweroff",
            "-serial",
            s,
        ]);
        assert_eq!(r.status, Some(0), "{r:#?}");
        assert!(r.stdout.is_empty(), "{s}: {r:#?}");
    }
    let r = moat(&[
        "-nodefaults",
        "-kernel",
        TEST_PVH,
        "-append",
        "action=poweroff",
    ]);
    assert_eq!(r.status, Some(0), "{r:#?}");
    assert!(r.stdout.is_empty(), "{r:#?}");
}

#[test]
fn unix_socket_backend_waits_for_and_serves_a_client() {
    let dir = scratch("serial-unix");
    let sock = dir.join("console.sock");
    let mut child = moat_command()
        .args(["-kernel", TEST_PVH, "-append", "action=poweroff", "-serial"])
        .arg(format!("unix:{},server=on,wait=on", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut waited = Duration::ZERO;
    let mut conn = loop {
        if let Ok(c) = UnixStream::connect(&sock) {
            break c;
        }
        assert!(waited < HANG, "socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
        waited += Duration::from_millis(20);
    };
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket must be private");
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    assert!(text.contains("RESULT: PASS"), "{text}");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unix_socket_path_never_clobbers_a_file() {
    let dir = scratch("serial-clobber");
    let f = dir.join("precious");
    std::fs::write(&f, b"data").unwrap();
    let r = moat(&[
        "-kernel",
        TEST_PVH,
        "-serial",
        &format!("unix:{},server=on,wait=off", f.display()),
    ]);
    assert_eq!(r.status, Some(1), "{r:#?}");
    assert!(r.stderr.contains("not a socket"), "{r:#?}");
    assert_eq!(std::fs::read(&f).unwrap(), b"data");
    let _ = std::fs::remove_dir_all(&dir);
}
