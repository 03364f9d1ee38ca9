//! Running vCPUs under control: start, pause (really stopping every vCPU
//! before acknowledging), resume, register dumps, and stop for good.
//!
//! vCPU threads check two atomics after every exit; the controller kicks
//! them out of KVM_RUN with a signal (a no-op handler makes KVM_RUN return
//! EINTR) until each has acknowledged.

use crate::bus::PlatformBus;
use crate::vcpu::{self, ExitAction};
use crate::VmEvent;
use kvm_ioctls::VcpuFd;
use moat_sys::lock;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a vCPU may take to leave the guest when asked to pause or stop.
/// Nothing a vCPU does outside the guest waits for long (devices never
/// make it wait for I/O); this bounds what a bug could make it do.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

#[derive(Debug, Default)]
struct Shared {
    /// vCPUs currently parked (paused).
    parked: usize,
    /// vCPUs whose register dump is wanted, and the dumps.
    dump_wanted: Vec<bool>,
    dumps: Vec<Option<String>>,
}

/// State shared by the controller and every vCPU thread of one VM.
#[derive(Debug)]
pub struct VcpuSet {
    paused: AtomicBool,
    stop: AtomicBool,
    dump: AtomicBool,
    shared: Mutex<Shared>,
    cv: Condvar,
    /// Host thread id of each vCPU (0 until it started).
    thread_ids: Vec<AtomicI32>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl VcpuSet {
    /// `paused`: the vCPUs start parked (`-S`, or a pause kept across reset).
    pub fn new(n: usize, paused: bool) -> Arc<Self> {
        Arc::new(VcpuSet {
            paused: AtomicBool::new(paused),
            stop: AtomicBool::new(false),
            dump: AtomicBool::new(false),
            shared: Mutex::new(Shared {
                parked: 0,
                dump_wanted: vec![false; n],
                dumps: vec![None; n],
            }),
            cv: Condvar::new(),
            thread_ids: (0..n).map(|_| AtomicI32::new(0)).collect(),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Host thread ids of the vCPUs (waiting briefly for threads still starting).
    pub fn thread_ids(&self) -> Vec<i32> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let ids: Vec<i32> = self
                .thread_ids
                .iter()
                .map(|t| t.load(Ordering::SeqCst))
                .collect();
            if ids.iter().all(|&t| t != 0) || Instant::now() > deadline {
                return ids;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Start one thread per vCPU.
    pub fn spawn(
        self: &Arc<Self>,
        vcpus: Vec<VcpuFd>,
        bus: Arc<PlatformBus>,
        events: Sender<VmEvent>,
        generation: u64,
    ) -> std::io::Result<()> {
        for (i, vcpu) in vcpus.into_iter().enumerate() {
            let set = self.clone();
            let bus = bus.clone();
            let tx = events.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || set.vcpu_loop(vcpu, i, &bus, &tx, generation))?;
            lock(&self.threads).push(h);
        }
        Ok(())
    }

    /// Signal every vCPU thread that has not finished.
    fn kick_all(&self) {
        for h in lock(&self.threads).iter() {
            if !h.is_finished() {
                // SAFETY: the thread has not been joined, so its pthread_t is
                // valid; the kick signal has a no-op handler installed.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            }
        }
    }

    fn live(&self) -> usize {
        lock(&self.threads)
            .iter()
            .filter(|h| !h.is_finished())
            .count()
    }

    /// Pause every vCPU; true once all are parked (or gone), false if one
    /// did not park within [`WAIT_LIMIT`] (they are then resumed).
    pub fn pause(&self) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let parked = lock(&self.shared).parked;
            if parked >= self.live() {
                return true;
            }
            if Instant::now() > deadline {
                self.resume();
                return false;
            }
            self.kick_all();
            let g = lock(&self.shared);
            let _ = self.cv.wait_timeout(g, Duration::from_millis(1));
        }
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let _g = lock(&self.shared);
        self.cv.notify_all();
    }

    /// Stop and join every vCPU thread; false if one did not end within
    /// [`WAIT_LIMIT`] (it is left behind, and must not be waited for: moat
    /// has to be able to exit whatever the guest does).
    pub fn stop(&self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        {
            let _g = lock(&self.shared);
            self.cv.notify_all();
        }
        let deadline = Instant::now() + WAIT_LIMIT;
        while self.live() > 0 {
            if Instant::now() > deadline {
                return false;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        for h in std::mem::take(&mut *lock(&self.threads)) {
            let _ = h.join();
        }
        true
    }

    /// The register dump of vCPU `i`, taken by its own thread.
    pub fn registers(&self, i: usize) -> Option<String> {
        {
            let mut g = lock(&self.shared);
            *g.dump_wanted.get_mut(i)? = true;
            g.dumps[i] = None;
        }
        self.dump.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            {
                let mut g = lock(&self.shared);
                if let Some(d) = g.dumps[i].take() {
                    return Some(d);
                }
                self.cv.notify_all(); // wake parked vCPUs
            }
            if Instant::now() > deadline {
                return None;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn serve_dump(&self, vcpu: &VcpuFd, i: usize) {
        if !self.dump.load(Ordering::SeqCst) {
            return;
        }
        let mut g = lock(&self.shared);
        if g.dump_wanted[i] {
            g.dump_wanted[i] = false;
            g.dumps[i] = Some(vcpu::dump(vcpu));
            if !g.dump_wanted.iter().any(|&w| w) {
                self.dump.store(false, Ordering::SeqCst);
            }
            self.cv.notify_all();
        }
    }

    /// Park while paused; false when the vCPU must end.
    fn park(&self, vcpu: &VcpuFd, i: usize) -> bool {
        let mut g = lock(&self.shared);
        g.parked += 1;
        self.cv.notify_all();
        while self.paused.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            drop(g);
            self.serve_dump(vcpu, i);
            g = lock(&self.shared);
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.parked -= 1;
        !self.stop.load(Ordering::SeqCst)
    }

    fn vcpu_loop(
        &self,
        mut vcpu: VcpuFd,
        i: usize,
        bus: &PlatformBus,
        tx: &Sender<VmEvent>,
        generation: u64,
    ) {
        moat_sys::role::enter(moat_sys::role::Role::Vcpu);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.thread_ids[i].store(tid, Ordering::SeqCst);
        let cpu = i as u32;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            self.serve_dump(&vcpu, i);
            if self.paused.load(Ordering::SeqCst) && !self.park(&vcpu, i) {
                return;
            }
            let action = match vcpu.run() {
                Ok(kvm_ioctls::VcpuExit::InternalError) => {
                    ExitAction::Fail(vcpu::internal_error(&mut vcpu))
                }
                Ok(exit) => vcpu::handle_exit(exit, bus),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => ExitAction::Fail(format!("KVM_RUN: {e}")),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::Request(request) => {
                    let _ = tx.send(VmEvent::Request {
                        generation,
                        request,
                    });
                    // Stay out of the guest: the controller ends this VM.
                    while !self.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    return;
                }
                ExitAction::Fail(why) => {
                    log::error!("vCPU {cpu}: {why}\n{}", vcpu::dump(&vcpu));
                    let _ = tx.send(VmEvent::VcpuFailed {
                        generation,
                        cpu,
                        why,
                    });
                    return;
                }
            }
        }
    }
}
