//! Helpers for tests that run the real `moat` binary on real KVM.
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const MOAT: &str = env!("CARGO_BIN_EXE_moat");
/// A hang guard only: a run that takes this long is a hung VM, not a slow one.
pub const HANG: Duration = Duration::from_secs(180);

#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn assert_pass(&self) {
        assert_eq!(self.status, Some(0), "{self:#?}");
        assert!(self.stdout.contains("RESULT: PASS"), "{self:#?}");
        assert!(!self.stdout.contains("FAIL"), "{self:#?}");
    }
}

/// The moat binary, allowed to run as root without `-run-with user=` (the
/// tests run as root; the privilege drop has tests of its own).
pub fn moat_command() -> Command {
    let mut c = Command::new(MOAT);
    c.env("MOAT_DANGEROUSLY_ALLOW_ROOT", "1");
    c
}

/// Run moat with `args`, with stdin closed, killing it if it hangs.
pub fn moat(args: &[&str]) -> Run {
    let mut child = moat_command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moat");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
    }
}

/// A fresh scratch directory for one test (unique even for equal names).
pub fn scratch(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("moat-test-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Today's (and tomorrow's) UTC date as YYYYMMDD, computed without the RTC code under test.
pub fn utc_dates() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y%m%d"])
        .output()
        .unwrap();
    let today = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = Command::new("date")
        .args(["-u", "-d", "+1 day", "+%Y%m%d"])
        .output()
        .unwrap();
    let tomorrow = String::from_utf8(out.stdout).unwrap().trim().to_string();
    format!("{today},{tomorrow}")
}

/// FNV-1a 32, as the test guest computes it.
pub fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(2166136261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    })
}
