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

/// A minimal QMP client on a UNIX socket (greeting read, capabilities
/// negotiated), for tests that need the monitor without Python.
pub struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    /// Connect to `path`, retrying while moat is still starting.
    pub fn connect(path: &std::path::Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > HANG => panic!("QMP {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(HANG)).unwrap();
        let mut q = Qmp {
            reader: std::io::BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let greeting = q.message();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.execute("qmp_capabilities");
        q
    }

    /// The next message (reply or event).
    pub fn message(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP {line:?}: {e}"))
    }

    /// Run `cmd`; its reply ("return" or "error"), events skipped.
    pub fn execute(&mut self, cmd: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.writer, "{{\"execute\": \"{cmd}\"}}").expect("QMP write");
        loop {
            let m = self.message();
            if m.get("event").is_none() {
                return m;
            }
        }
    }
}

/// A child process killed when the test ends, passing or not.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
