//! The sandbox gate: threads started during setup wait here until the
//! sandbox exists, then confine themselves before doing anything.
//!
//! Landlock (unlike seccomp's TSYNC) restricts only the calling thread and
//! the threads it creates later. moat starts a few threads while it sets up
//! (console, signals, monitor listeners), before it knows everything it
//! will open; each of them is started with [`spawn_gated`], blocks until
//! [`open`] publishes the confinement, applies it to itself, and only then
//! waits again. [`open`] returns once every gated thread is confined, so the
//! seccomp filter installed next (with TSYNC, which needs every thread's
//! filters to be the caller's) cannot catch one half-way; [`release`] then
//! lets them stack their role's filter and run.

use crate::role::Role;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Confine the calling thread.
pub type Confine = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Default)]
struct State {
    open: bool,
    done: bool,
    confine: Option<Confine>,
    pending: usize,
}

static GATE: Mutex<State> = Mutex::new(State {
    open: false,
    done: false,
    confine: None,
    pending: 0,
});
static CHANGED: Condvar = Condvar::new();

fn state() -> std::sync::MutexGuard<'static, State> {
    GATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start a thread that waits for the sandbox and confines itself first.
/// Once the sandbox is complete this is a plain spawn: the caller is
/// confined, and its new thread inherits that.
///
/// A thread started during setup takes on `role` (see [`crate::role`]) once
/// the whole sandbox is in place ([`release`]); one started later is made
/// by an already confined thread and keeps its parent's role.
pub fn spawn_gated<F, T>(name: &str, role: Role, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = crate::thread(name);
    {
        let mut s = state();
        if s.done {
            drop(s);
            return builder.spawn(f);
        }
        s.pending += 1;
    }
    let spawned = builder.spawn(move || {
        let mut s = state();
        while !s.open {
            s = CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let confine = s.confine.clone();
        drop(s);
        if let Some(c) = confine {
            if let Err(e) = c() {
                // Fail closed: an unconfined thread must not run.
                eprintln!("moat: confining a thread failed: {e}");
                std::process::abort();
            }
        }
        let mut s = state();
        s.pending -= 1;
        CHANGED.notify_all();
        while !s.done {
            s = CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        drop(s);
        crate::role::enter(role);
        f()
    });
    if spawned.is_err() {
        state().pending -= 1;
    }
    spawned
}

/// Let the gated threads apply `confine` (None: unconfined, for `-sandbox
/// off`); returns when all of them have. They wait on for [`release`].
pub fn open(confine: Option<Confine>) {
    let mut s = state();
    s.confine = confine;
    s.open = true;
    CHANGED.notify_all();
    while s.pending > 0 {
        s = CHANGED.wait(s).unwrap_or_else(|e| e.into_inner());
    }
}

/// The sandbox is complete (the process-wide seccomp filter installed, the
/// role hook set): the gated threads take on their roles and run.
pub fn release() {
    let mut s = state();
    s.done = true;
    CHANGED.notify_all();
}
