//! COM1: a 16550 UART (`vm-superio`) and its host backend.
//!
//! A vCPU never blocks on the backend: the UART writes into a bounded
//! in-memory queue that a backend thread drains to stdout, a file or a UNIX
//! socket client. When the queue is full (the backend is stuck), further
//! bytes are dropped and counted rather than stalling the guest.

use crate::IrqLine;
use moat_config::SerialBackend;
use moat_sys::lock;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

/// How many output bytes may wait for a slow backend.
pub const OUT_QUEUE_MAX: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("-serial file:{path}: {err}")]
    File { path: String, err: std::io::Error },
    #[error("-serial unix:{path}: {why}")]
    Socket { path: String, why: String },
    #[error("serial: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Default)]
struct OutShared {
    buf: Mutex<VecDeque<u8>>,
    cv: Condvar,
    /// Set while the backend thread sleeps on `cv` (only then is a wake-up needed).
    idle: std::sync::atomic::AtomicBool,
    /// Set while the backend thread is writing bytes it has taken.
    busy: std::sync::atomic::AtomicBool,
    dropped: AtomicU64,
    discard: bool,
}

/// The UART's output: a bounded queue that never blocks the writer.
#[derive(Debug, Clone)]
pub struct OutQueue(Arc<OutShared>);

impl Write for OutQueue {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.0.discard {
            return Ok(data.len());
        }
        let mut q = lock(&self.0.buf);
        let room = OUT_QUEUE_MAX.saturating_sub(q.len());
        let n = room.min(data.len());
        q.extend(&data[..n]);
        if n < data.len() {
            self.0
                .dropped
                .fetch_add((data.len() - n) as u64, Ordering::Relaxed);
        }
        drop(q);
        if self.0.idle.load(Ordering::SeqCst) {
            self.0.cv.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The guest-visible UART; survives VM resets (its registers are reset).
#[derive(Debug)]
pub struct Uart {
    serial: Serial<IrqLine, NoEvents, OutQueue>,
}

impl Uart {
    pub fn new(irq: IrqLine, out: OutQueue) -> Self {
        Uart {
            serial: Serial::new(irq, out),
        }
    }

    pub fn irq(&self) -> &IrqLine {
        self.serial.interrupt_evt()
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.serial.write(offset, value) {
            log::debug!("serial: {e:?}");
        }
    }

    /// Queue input bytes for the guest; returns how many were accepted.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Return the registers to their power-on state.
    pub fn reset(&mut self) -> std::io::Result<()> {
        let irq = IrqLine(self.serial.interrupt_evt().0.try_clone()?);
        let out = self.serial.writer().clone();
        self.serial = Serial::new(irq, out);
        Ok(())
    }
}

/// A started backend: owns the threads that move bytes between host and UART.
#[derive(Debug)]
pub struct Console {
    out: OutQueue,
    uart: Arc<Mutex<Uart>>,
    /// The terminal settings to restore when stdin was a terminal.
    saved_termios: Option<rustix::termios::Termios>,
}

/// Put the terminal on stdin in raw mode (as QEMU does for `-serial stdio`),
/// keeping ISIG so that Ctrl-C still ends moat; returns the old settings.
fn stdin_raw() -> Option<rustix::termios::Termios> {
    use rustix::termios::{self, LocalModes, OptionalActions, OutputModes};
    let stdin = std::io::stdin();
    if !termios::isatty(&stdin) {
        return None;
    }
    let old = termios::tcgetattr(&stdin).ok()?;
    let mut raw = old.clone();
    raw.make_raw();
    raw.local_modes |= LocalModes::ISIG;
    raw.output_modes |= OutputModes::OPOST | OutputModes::ONLCR;
    termios::tcsetattr(&stdin, OptionalActions::Now, &raw).ok()?;
    Some(old)
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(t) = &self.saved_termios {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                t,
            );
        }
    }
}

/// Feed `src` to the UART until EOF, waiting while the receive FIFO is full.
fn pump_input(mut src: impl Read, uart: Arc<Mutex<Uart>>) {
    let mut buf = [0u8; 256];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut off = 0;
        while off < n {
            off += lock(&uart).input(&buf[off..n]);
            if off < n {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// How long the backend thread lets output accumulate after waking while
/// the guest is writing a stream, so that a guest writing byte by byte
/// costs one host write per batch, not per byte.
const COALESCE: Duration = Duration::from_micros(500);
/// Output is a stream when the last write was this recent; the first bytes
/// after a quiet spell go out at once (a boot's first line, a prompt, an
/// answer typed at the console are not held back).
const STREAMING: Duration = Duration::from_millis(5);

/// Take everything queued, waiting up to `wait` for something to arrive;
/// when `streaming`, let more accumulate for [`COALESCE`] after waking.
fn take(shared: &OutShared, wait: Duration, streaming: bool) -> Vec<u8> {
    let mut q = lock(&shared.buf);
    if q.is_empty() {
        shared.idle.store(true, Ordering::SeqCst);
        q = shared
            .cv
            .wait_timeout(q, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        shared.idle.store(false, Ordering::SeqCst);
        if streaming && !q.is_empty() {
            drop(q);
            std::thread::sleep(COALESCE);
            q = lock(&shared.buf);
        }
    }
    shared.busy.store(!q.is_empty(), Ordering::SeqCst);
    q.drain(..).collect()
}

fn spawn_writer(shared: Arc<OutShared>, mut sink: impl FnMut(&[u8]) + Send + 'static) {
    moat_sys::gate::spawn_gated("serial-out", moat_sys::role::Role::Io, move || {
        let mut last: Option<std::time::Instant> = None;
        loop {
            let streaming = last.is_some_and(|t| t.elapsed() < STREAMING);
            let bytes = take(&shared, Duration::from_millis(100), streaming);
            if !bytes.is_empty() {
                sink(&bytes);
                last = Some(std::time::Instant::now());
            }
            shared.busy.store(false, Ordering::SeqCst);
        }
    })
    .map(|_| ())
    .unwrap_or_else(|e| log::error!("serial: cannot start output thread: {e}"));
}

impl Console {
    /// Open `backend` and start its threads. `irq` is COM1's interrupt line.
    pub fn start(backend: Option<&SerialBackend>, irq: IrqLine) -> Result<Console, SerialError> {
        let discard = matches!(backend, None | Some(SerialBackend::Null));
        let shared = Arc::new(OutShared {
            discard,
            ..Default::default()
        });
        let out = OutQueue(shared.clone());
        let uart = Arc::new(Mutex::new(Uart::new(irq, out.clone())));
        let mut saved_termios = None;
        match backend {
            None | Some(SerialBackend::Null) => {}
            Some(SerialBackend::Stdio) => {
                saved_termios = stdin_raw();
                let mut told = false;
                spawn_writer(shared, move |b| {
                    let mut o = std::io::stdout().lock();
                    if let Err(e) = o.write_all(b).and_then(|()| o.flush()) {
                        // Said once: the guest's output is being lost.
                        if !std::mem::replace(&mut told, true) {
                            log::warn!("serial: writing the guest's output to stdout: {e}");
                        }
                    }
                });
                let u = uart.clone();
                moat_sys::gate::spawn_gated("serial-in", moat_sys::role::Role::Io, move || {
                    pump_input(std::io::stdin(), u)
                })?;
            }
            Some(SerialBackend::File(p)) => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
                    .map_err(|err| SerialError::File {
                        path: p.display().to_string(),
                        err,
                    })?;
                spawn_writer(shared, move |b| {
                    let _ = f.write_all(b);
                });
            }
            Some(SerialBackend::UnixServer { path, wait }) => {
                let sock_err = |why: String| SerialError::Socket {
                    path: path.display().to_string(),
                    why,
                };
                let listener = moat_sys::bind_unix_private(path).map_err(sock_err)?;
                let client: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
                let attach = {
                    let client = client.clone();
                    let uart = uart.clone();
                    move |s: UnixStream| {
                        if let Ok(r) = s.try_clone() {
                            let u = uart.clone();
                            let _ = moat_sys::gate::spawn_gated(
                                "serial-in",
                                moat_sys::role::Role::Io,
                                move || pump_input(r, u),
                            );
                        }
                        *lock(&client) = Some(s);
                    }
                };
                if *wait {
                    eprintln!(
                        "moat: waiting for a connection on serial socket {}",
                        path.display()
                    );
                    let (s, _) = listener.accept()?;
                    attach(s);
                }
                moat_sys::gate::spawn_gated(
                    "serial-accept",
                    moat_sys::role::Role::Io,
                    move || {
                        for s in listener.incoming().flatten() {
                            attach(s);
                        }
                    },
                )?;
                spawn_writer(shared, move |b| {
                    let mut c = lock(&client);
                    if let Some(s) = c.as_mut() {
                        if s.write_all(b).is_err() {
                            *c = None;
                        }
                    }
                });
            }
        }
        Ok(Console {
            out,
            uart,
            saved_termios,
        })
    }

    pub fn uart(&self) -> &Arc<Mutex<Uart>> {
        &self.uart
    }

    /// Wait (at most `timeout`) until queued output has reached the backend.
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let empty = lock(&self.out.0.buf).is_empty();
            if empty && !self.out.0.busy.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let dropped = self.out.0.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            log::warn!(
                "serial: {dropped} output bytes dropped because the backend was not keeping up"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_bounded_and_never_blocks() {
        let shared = Arc::new(OutShared::default());
        let mut q = OutQueue(shared.clone());
        let chunk = vec![b'x'; 4096];
        for _ in 0..(OUT_QUEUE_MAX / 4096 + 10) {
            assert_eq!(q.write(&chunk).unwrap(), 4096);
        }
        assert_eq!(lock(&shared.buf).len(), OUT_QUEUE_MAX);
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 10 * 4096);
    }

    #[test]
    fn uart_output_reaches_file_backend() {
        // No sandbox in unit tests: let the console's threads run.
        moat_sys::gate::open(None);
        moat_sys::gate::release();
        let dir = std::env::temp_dir().join(format!("moat-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out");
        let c = Console::start(
            Some(&SerialBackend::File(p.clone())),
            IrqLine::new().unwrap(),
        )
        .unwrap();
        for b in b"hello" {
            lock(c.uart()).write(0, *b);
        }
        c.flush(Duration::from_secs(5));
        assert_eq!(std::fs::read(&p).unwrap(), b"hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
