//! Confining moat once everything is open, in the one order that works:
//!
//! 1. build the Landlock ruleset: it opens the allowed paths, so before a
//!    chroot makes them unreachable;
//! 2. chroot, then drop to the unprivileged user (no capability left);
//! 3. harden (non-dumpable, no_new_privs, rlimits): seccomp needs
//!    no_new_privs;
//! 4. Landlock on this thread, then the gate opens: the threads started
//!    during setup confine themselves the same way (Landlock is per thread)
//!    and give up their capabilities; `open` returns once all have;
//! 5. the process-wide seccomp filter with TSYNC, which needs every thread
//!    to hold the caller's filters, so after the gated threads are ready
//!    and before any of them stacks its role's filter; then the role hook;
//! 6. the gate releases the threads into their roles.
//!
//! The sequence is [`run`] over [`Steps`], so a test can check the order
//! without being root; [`confine`] runs it for real.

use crate::landlock::{self, FsPolicy};
use crate::Violation;
use moat_config::VmConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How moat is to be confined.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `-sandbox on`: seccomp and Landlock.
    pub enabled: bool,
    /// `-sandbox on,landlock=required`.
    pub landlock_required: bool,
    /// What may still be opened once the guest runs.
    pub files: FsPolicy,
    pub chroot: Option<PathBuf>,
    /// The uid and gid to become.
    pub run_as: Option<(u32, u32)>,
    /// `MOAT_SECCOMP_LOG=1`: log instead of kill.
    pub violation: Violation,
}

impl Policy {
    /// The policy for a VM: its images (read-only or read-write as their
    /// drives are; fd-set descriptors need no path), and removing the pid
    /// file and socket files at exit.
    pub fn for_vm(cfg: &VmConfig, run_as: Option<(u32, u32)>) -> Policy {
        let mut files = FsPolicy::default();
        let path_ok = |f: &&PathBuf| !moat_sys::fdset::is_fdset_path(f);
        for d in &cfg.drives {
            let top = d.layer();
            let own = [Some(&top.file), top.data_file.as_ref()];
            if d.read_only {
                files
                    .read
                    .extend(own.into_iter().flatten().filter(path_ok).cloned());
            } else {
                files
                    .read_write
                    .extend(own.into_iter().flatten().filter(path_ok).cloned());
            }
            // Backing layers are only read.
            for l in top.layers().skip(1) {
                files.read.extend(
                    [Some(&l.file), l.data_file.as_ref()]
                        .into_iter()
                        .flatten()
                        .filter(path_ok)
                        .cloned(),
                );
            }
        }
        for f in cfg.pidfile.iter().cloned().chain(cfg.unix_socket_paths()) {
            if let Some(dir) = std::fs::canonicalize(&f)
                .ok()
                .and_then(|f| f.parent().map(Path::to_path_buf))
            {
                if !files.remove_in.contains(&dir) {
                    files.remove_in.push(dir);
                }
            }
        }
        // The vsock device connects to `<uds-path>_<port>` (inside the
        // chroot, if there is one).
        if let Some(dir) = cfg.vsock.as_ref().and_then(|v| {
            let dir = v.uds_path.parent()?;
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let dir = match &cfg.chroot {
                Some(root) => root.join(dir.strip_prefix("/").unwrap_or(dir)),
                None => dir.to_path_buf(),
            };
            std::fs::canonicalize(dir).ok()
        }) {
            files.connect_unix_in.push(dir);
        }
        let log_only = std::env::var_os("MOAT_SECCOMP_LOG").is_some_and(|v| v == "1");
        Policy {
            enabled: cfg.sandbox,
            landlock_required: cfg.landlock_required,
            files,
            chroot: cfg.chroot.clone(),
            run_as,
            violation: if log_only {
                Violation::Log
            } else {
                Violation::Kill
            },
        }
    }
}

/// The steps of confinement; [`run`] calls them in order.
pub trait Steps {
    fn landlock_ruleset(&mut self, files: &FsPolicy) -> Result<(), String>;
    fn chroot(&mut self, dir: &Path) -> Result<(), String>;
    fn drop_to(&mut self, uid: u32, gid: u32) -> Result<(), String>;
    fn harden(&mut self) -> Result<(), String>;
    fn landlock_self(&mut self, required: bool) -> Result<(), String>;
    /// Let the setup-time threads confine themselves (Landlock when
    /// `landlock`, capabilities when `drop_caps`); returns once all have.
    fn open_gate(&mut self, landlock: bool, drop_caps: bool);
    fn seccomp(&mut self, violation: Violation) -> Result<(), String>;
    fn release_gate(&mut self);
}

/// Confine the process as `p` says, in the documented order.
pub fn run(p: &Policy, s: &mut impl Steps) -> Result<(), String> {
    if p.enabled {
        s.landlock_ruleset(&p.files)?;
    }
    if let Some(dir) = &p.chroot {
        s.chroot(dir)?;
    }
    if let Some((uid, gid)) = p.run_as {
        s.drop_to(uid, gid)?;
    }
    if p.enabled {
        s.harden()?;
        s.landlock_self(p.landlock_required)?;
    }
    s.open_gate(p.enabled, p.run_as.is_some());
    moat_sys::timeline::mark("sandbox: landlock and privileges");
    if p.enabled {
        s.seccomp(p.violation)?;
    }
    s.release_gate();
    moat_sys::timeline::mark("sandbox: seccomp");
    Ok(())
}

/// The real steps.
#[derive(Default)]
struct Real {
    ruleset: Option<Arc<::landlock::RulesetCreated>>,
}

impl Steps for Real {
    fn landlock_ruleset(&mut self, files: &FsPolicy) -> Result<(), String> {
        let rules = landlock::ruleset(files).map_err(|e| format!("-sandbox on: {e}"))?;
        self.ruleset = Some(Arc::new(rules));
        Ok(())
    }

    fn chroot(&mut self, dir: &Path) -> Result<(), String> {
        crate::privs::enter_chroot(dir).map_err(|e| format!("-run-with chroot: {e}"))
    }

    fn drop_to(&mut self, uid: u32, gid: u32) -> Result<(), String> {
        crate::privs::drop_to(uid, gid).map_err(|e| format!("-run-with user: {e}"))
    }

    fn harden(&mut self) -> Result<(), String> {
        crate::harden().map_err(|e| format!("-sandbox on: {e}"))
    }

    fn landlock_self(&mut self, required: bool) -> Result<(), String> {
        let Some(rules) = &self.ruleset else {
            return Ok(());
        };
        let status = landlock::restrict_thread(rules).map_err(|e| format!("-sandbox on: {e}"))?;
        let not_enforced = status.ruleset == ::landlock::RulesetStatus::NotEnforced;
        if required && not_enforced {
            return Err(format!(
                "-sandbox on,landlock=required: {}",
                landlock::describe(&status)
            ));
        }
        if not_enforced {
            // Said without MOAT_LOG: file access is then not limited at all.
            log::warn!("{}", landlock::describe(&status));
        } else {
            log::info!("{}", landlock::describe(&status));
        }
        Ok(())
    }

    fn open_gate(&mut self, landlock: bool, drop_caps: bool) {
        let rules = self.ruleset.clone().filter(|_| landlock);
        if rules.is_none() && !drop_caps {
            moat_sys::gate::open(None);
            return;
        }
        moat_sys::gate::open(Some(Arc::new(move || {
            if let Some(r) = &rules {
                landlock::restrict_thread(r)?;
            }
            if drop_caps {
                crate::privs::give_up_capabilities()?;
            }
            Ok(())
        })));
    }

    fn seccomp(&mut self, violation: Violation) -> Result<(), String> {
        if violation == Violation::Log {
            eprintln!(
                "moat: warning: MOAT_SECCOMP_LOG=1: system calls outside the allow-list are logged, not refused; \
                 the sandbox does not protect this host"
            );
        }
        crate::install_filter(violation).map_err(|e| format!("-sandbox on: {e}"))?;
        // Each thread role then narrows that list for its own threads.
        let roles = crate::RoleFilters::new(violation).map_err(|e| format!("-sandbox on: {e}"))?;
        moat_sys::role::set_hook(Box::new(move |role| roles.apply(role)));
        Ok(())
    }

    fn release_gate(&mut self) {
        moat_sys::gate::release();
    }
}

/// Confine this process as `p` says (see the module doc for the order).
pub fn confine(p: &Policy) -> Result<(), String> {
    run(p, &mut Real::default())?;
    if !p.enabled {
        eprintln!(
            "moat: warning: -sandbox off: no seccomp filter; a guest that escapes into moat can make any system call"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_config::Backing;

    /// Steps that only record their names.
    #[derive(Default)]
    struct Record(Vec<String>);

    impl Steps for Record {
        fn landlock_ruleset(&mut self, _: &FsPolicy) -> Result<(), String> {
            self.0.push("ruleset".into());
            Ok(())
        }
        fn chroot(&mut self, _: &Path) -> Result<(), String> {
            self.0.push("chroot".into());
            Ok(())
        }
        fn drop_to(&mut self, _: u32, _: u32) -> Result<(), String> {
            self.0.push("drop".into());
            Ok(())
        }
        fn harden(&mut self) -> Result<(), String> {
            self.0.push("harden".into());
            Ok(())
        }
        fn landlock_self(&mut self, _: bool) -> Result<(), String> {
            self.0.push("landlock".into());
            Ok(())
        }
        fn open_gate(&mut self, landlock: bool, caps: bool) {
            self.0
                .push(format!("gate(landlock={landlock},caps={caps})"));
        }
        fn seccomp(&mut self, _: Violation) -> Result<(), String> {
            self.0.push("seccomp".into());
            Ok(())
        }
        fn release_gate(&mut self) {
            self.0.push("release".into());
        }
    }

    fn policy(enabled: bool, chroot: bool, drop: bool) -> Policy {
        Policy {
            enabled,
            landlock_required: false,
            files: FsPolicy::default(),
            chroot: chroot.then(|| PathBuf::from("/var/empty")),
            run_as: drop.then_some((65534, 65534)),
            violation: Violation::Kill,
        }
    }

    fn order(p: &Policy) -> Vec<String> {
        let mut r = Record::default();
        run(p, &mut r).unwrap();
        r.0
    }

    #[test]
    fn the_ruleset_comes_before_chroot_and_seccomp_after_every_thread_is_ready() {
        assert_eq!(
            order(&policy(true, true, true)),
            [
                "ruleset",
                "chroot",
                "drop",
                "harden",
                "landlock",
                "gate(landlock=true,caps=true)",
                "seccomp",
                "release"
            ]
        );
    }

    #[test]
    fn without_the_sandbox_the_drop_still_reaches_every_thread() {
        assert_eq!(
            order(&policy(false, false, true)),
            ["drop", "gate(landlock=false,caps=true)", "release"]
        );
        assert_eq!(
            order(&policy(false, false, false)),
            ["gate(landlock=false,caps=false)", "release"]
        );
        assert_eq!(
            order(&policy(true, false, false)),
            [
                "ruleset",
                "harden",
                "landlock",
                "gate(landlock=true,caps=false)",
                "seccomp",
                "release"
            ]
        );
    }

    /// A failing step stops the sequence: nothing after it runs, and the
    /// gated threads are never released unconfined.
    #[test]
    fn a_failed_step_releases_nothing() {
        struct FailDrop(Record);
        impl Steps for FailDrop {
            fn landlock_ruleset(&mut self, f: &FsPolicy) -> Result<(), String> {
                self.0.landlock_ruleset(f)
            }
            fn chroot(&mut self, d: &Path) -> Result<(), String> {
                self.0.chroot(d)
            }
            fn drop_to(&mut self, _: u32, _: u32) -> Result<(), String> {
                Err("no".into())
            }
            fn harden(&mut self) -> Result<(), String> {
                self.0.harden()
            }
            fn landlock_self(&mut self, r: bool) -> Result<(), String> {
                self.0.landlock_self(r)
            }
            fn open_gate(&mut self, l: bool, c: bool) {
                self.0.open_gate(l, c)
            }
            fn seccomp(&mut self, v: Violation) -> Result<(), String> {
                self.0.seccomp(v)
            }
            fn release_gate(&mut self) {
                self.0.release_gate()
            }
        }
        let mut s = FailDrop(Record::default());
        assert!(run(&policy(true, true, true), &mut s).is_err());
        assert_eq!(s.0 .0, ["ruleset", "chroot"]);
    }

    #[test]
    fn the_policy_lists_each_image_as_its_drive_uses_it() {
        let mut cfg = VmConfig::default();
        let mut d = moat_config::DriveConfig {
            id: None,
            qdev: None,
            index: 0,
            file: "/img/top.qcow2".into(),
            format: moat_config::DriveFormat::Qcow2,
            backing: Backing::Layer(Box::new(moat_config::ImageLayer {
                file: "/img/base.raw".into(),
                format: moat_config::DriveFormat::Raw,
                backing: Backing::Unnamed,
                data_file: None,
            })),
            data_file: Some("/img/data".into()),
            throttle: Default::default(),
            read_only: false,
            cache: moat_config::CacheMode::Writeback,
            discard_unmap: false,
            serial: None,
            werror: moat_config::WERROR_DEFAULT,
            rerror: moat_config::RERROR_DEFAULT,
            num_queues: 1,
        };
        cfg.drives.push(d.clone());
        d.file = "/dev/fdset/3".into();
        d.backing = Backing::None;
        d.data_file = None;
        d.read_only = true;
        cfg.drives.push(d);
        let p = Policy::for_vm(&cfg, None);
        assert_eq!(
            p.files.read_write,
            [PathBuf::from("/img/top.qcow2"), "/img/data".into()]
        );
        assert_eq!(p.files.read, [PathBuf::from("/img/base.raw")]);
    }
}
