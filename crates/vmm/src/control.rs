//! Running vCPUs under control: start, pause (every vCPU acknowledges that
//! it has left the guest before `pause` returns), resume, register dumps,
//! and stop for good.
//!
//! Each vCPU thread checks three flags after every exit. To get a vCPU out
//! of KVM_RUN the controller sends its thread the kick signal once; the
//! signal's handler sets `immediate_exit` in that vCPU's `kvm_run`, so the
//! kick is never lost, even when it lands between the flag check and the
//! next KVM_RUN (which then returns at once). The vCPU answers through a
//! condition variable: nothing polls.

use crate::bus::PlatformBus;
use crate::vcpu::{self, ExitAction};
use crate::VmEvent;
use kvm_ioctls::VcpuFd;
use moat_sys::lock;
use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

thread_local! {
    /// This thread's vCPU `kvm_run` area (null on other threads).
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: make this thread's next (or current) KVM_RUN
/// return at once.
extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own vCPU's kvm_run mapping,
        // set by `vcpu_loop` and cleared before the VcpuFd (and its
        // mapping) goes; a plain byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Install the kick signal's handler; once per process.
pub fn init_kick_signal() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[derive(Debug, Default)]
struct Shared {
    /// vCPUs parked (paused) and vCPUs whose thread has ended.
    parked: usize,
    finished: usize,
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
                dump_wanted: vec![false; n],
                dumps: vec![None; n],
                ..Default::default()
            }),
            cv: Condvar::new(),
            thread_ids: (0..n).map(|_| AtomicI32::new(0)).collect(),
            threads: Mutex::new(Vec::new()),
        })
    }

    fn count(&self) -> usize {
        self.thread_ids.len()
    }

    /// Wait until `done` holds, or `limit` passes; whether it holds.
    fn wait_until(&self, limit: Duration, done: impl Fn(&Shared) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = lock(&self.shared);
        while !done(&g) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn notify(&self, g: MutexGuard<'_, Shared>) {
        drop(g);
        self.cv.notify_all();
    }

    /// Host thread ids of the vCPUs (waiting briefly for threads still starting).
    pub fn thread_ids(&self) -> Vec<i32> {
        let started = |_: &Shared| {
            self.thread_ids
                .iter()
                .all(|t| t.load(Ordering::SeqCst) != 0)
        };
        self.wait_until(Duration::from_secs(2), started);
        self.thread_ids
            .iter()
            .map(|t| t.load(Ordering::SeqCst))
            .collect()
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
            let h = moat_sys::thread(format!("vcpu{i}")).spawn(move || {
                set.vcpu_loop(vcpu, i, &bus, &tx, generation);
                let mut g = lock(&set.shared);
                g.finished += 1;
                set.notify(g);
            })?;
            lock(&self.threads).push(h);
        }
        Ok(())
    }

    /// Send the kick signal to vCPU `i`'s thread, if it still runs.
    fn kick(&self, i: usize) {
        if let Some(h) = lock(&self.threads).get(i) {
            if !h.is_finished() {
                // SAFETY: the thread has not been joined, so its pthread_t is
                // valid; the kick signal's handler is installed.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            }
        }
    }

    fn kick_all(&self) {
        for i in 0..self.count() {
            self.kick(i);
        }
    }

    /// Pause every vCPU; true once each has acknowledged (parked, or
    /// ended), false if one did not within [`WAIT_LIMIT`] (all are then
    /// resumed).
    pub fn pause(&self) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        self.kick_all();
        let n = self.count();
        if self.wait_until(WAIT_LIMIT, |s| s.parked + s.finished >= n) {
            return true;
        }
        self.resume();
        false
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let g = lock(&self.shared);
        self.notify(g);
    }

    /// Stop and join every vCPU thread; false if one did not end within
    /// [`WAIT_LIMIT`] (it is left behind, and must not be waited for: moat
    /// has to be able to exit whatever the guest does).
    pub fn stop(&self) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        {
            let g = lock(&self.shared);
            self.notify(g);
        }
        self.kick_all();
        let n = self.count();
        if !self.wait_until(WAIT_LIMIT, |s| s.finished >= n) {
            return false;
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
            self.dump.store(true, Ordering::SeqCst);
            self.notify(g); // a parked vCPU answers from its park
        }
        self.kick(i);
        self.wait_until(Duration::from_secs(2), |s| s.dumps[i].is_some());
        lock(&self.shared).dumps[i].take()
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
            self.notify(g);
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
            if self.paused.load(Ordering::SeqCst)
                && !self.stop.load(Ordering::SeqCst)
                && !g.dump_wanted[i]
            {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
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
        let tid = rustix::thread::gettid().as_raw_nonzero().get();
        self.thread_ids[i].store(tid, Ordering::SeqCst);
        {
            let g = lock(&self.shared);
            self.notify(g);
        }
        let run: *mut kvm_bindings::kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
        let mut counts = moat_sys::timeline::enabled().then(vcpu::ExitCounts::default);
        self.run(&mut vcpu, i, bus, tx, generation, &mut counts);
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        if let Some(c) = counts {
            log::debug!("{}", c.report(i));
        }
    }

    fn run(
        &self,
        vcpu: &mut VcpuFd,
        i: usize,
        bus: &PlatformBus,
        tx: &Sender<VmEvent>,
        generation: u64,
        counts: &mut Option<vcpu::ExitCounts>,
    ) {
        let cpu = i as u32;
        let mut first = i == 0;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            self.serve_dump(vcpu, i);
            if self.paused.load(Ordering::SeqCst) && !self.park(vcpu, i) {
                return;
            }
            if first {
                moat_sys::timeline::mark("vCPU 0 enters the guest");
            }
            let exit = vcpu.run();
            if std::mem::take(&mut first) {
                moat_sys::timeline::mark("vCPU 0's first exit");
            }
            let action = match exit {
                Ok(kvm_ioctls::VcpuExit::InternalError) => {
                    ExitAction::Fail(vcpu::internal_error(vcpu))
                }
                Ok(kvm_ioctls::VcpuExit::Shutdown) => {
                    // A triple fault resets the machine, as on hardware (and
                    // ends moat under -no-reboot); QEMU says nothing unless
                    // asked (-d cpu_reset), moat under MOAT_LOG=info.
                    if log::log_enabled!(log::Level::Info) {
                        log::info!(
                            "vCPU {cpu}: the guest triple-faulted (KVM_EXIT_SHUTDOWN); the machine resets\n{}",
                            vcpu::dump(vcpu)
                        );
                    }
                    ExitAction::Request(moat_devices::VmRequest::Reset)
                }
                Ok(exit) => {
                    if let Some(c) = counts {
                        c.note(&exit);
                    }
                    vcpu::handle_exit(exit, bus)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => ExitAction::Fail(format!("KVM_RUN: {e}")),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::Request(request) => {
                    let _ = tx.send(VmEvent::Device {
                        generation,
                        request,
                    });
                    // Stay out of the guest: the controller ends this VM.
                    let g = lock(&self.shared);
                    let _g = self
                        .cv
                        .wait_while(g, |_| !self.stop.load(Ordering::SeqCst))
                        .unwrap_or_else(|e| e.into_inner());
                    return;
                }
                ExitAction::Fail(why) => {
                    log::error!("vCPU {cpu}: {why}\n{}", vcpu::dump(vcpu));
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
