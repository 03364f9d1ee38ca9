//! The VM's cgroup: v2 where the controllers are enabled, v1 otherwise.
//!
//! v1: one directory per controller hierarchy, under the jailer's own
//! cgroup there (so moat stays inside whatever limits its launcher has):
//! `<mount><own path>/<parent>/<id>`. v2: `<mount>/<parent>/<id>`, with the
//! controllers enabled down the way (the root and `<parent>` hold no tasks,
//! as v2 requires).

use crate::args::{CgroupVersion, Limits};
use std::fs::File;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The cgroup directories made for one VM; removed by [`Cgroup::remove`].
#[derive(Debug)]
pub struct Cgroup {
    pub version: u8,
    /// The VM's own cgroups (one per v1 hierarchy, or the v2 one).
    pub leaves: Vec<PathBuf>,
    /// Parent directories this run made (removed at the end when empty).
    pub parents: Vec<PathBuf>,
}

/// Mount points from /proc/self/mountinfo: (fstype, super options, mount point).
fn mounts() -> Vec<(String, String, PathBuf)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?.to_string();
            let opts = post.nth(1).unwrap_or_default().to_string();
            Some((fstype, opts, PathBuf::from(point)))
        })
        .collect()
}

/// Our own cgroup path in a v1 hierarchy with this controller, from the
/// text of /proc/self/cgroup.
fn own_v1_path(own: &str, controller: &str) -> String {
    own.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .next()
        .unwrap_or_else(|| "/".into())
}

fn v2_mount() -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|(t, _, _)| t == "cgroup2")
        .map(|(_, _, p)| p)
}

/// The v2 controllers moat-jail uses that the v2 root offers.
fn v2_controllers(root: &Path) -> Vec<String> {
    let have = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    have.split_whitespace()
        .filter(|c| ["cpu", "cpuset", "memory", "pids", "io"].contains(c))
        .map(str::to_string)
        .collect()
}

/// Each controller and whether the limits need it (`io`: the I/O
/// controller's name, `io` in v2, `blkio` in v1).
fn needed<'a>(l: &Limits, io: &'a str) -> [(&'a str, bool); 5] {
    [
        ("cpu", l.cpu_quota_us.is_some() || l.cpu_weight.is_some()),
        ("cpuset", l.cpuset_cpus.is_some() || l.cpuset_mems.is_some()),
        ("memory", l.memory_max.is_some()),
        ("pids", l.pids_max.is_some()),
        (io, !l.io_max.is_empty()),
    ]
}

fn write(path: &Path, v: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(v.as_bytes()))
        .map_err(|e| format!("cgroup: writing '{v}' to {}: {e}", path.display()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

impl Cgroup {
    /// Make the VM's cgroup and set its limits. On error, what was made is
    /// removed again.
    pub fn create(
        version: CgroupVersion,
        parent: &str,
        id: &str,
        limits: &Limits,
    ) -> Result<Cgroup, String> {
        let v2 = v2_mount().filter(|m| {
            let c = v2_controllers(m);
            ["cpu", "memory", "pids"]
                .iter()
                .all(|want| c.iter().any(|h| h == want))
        });
        let use_v2 = match version {
            CgroupVersion::V2 => {
                if v2.is_none() {
                    return Err("--cgroup-version 2: no cgroup2 mount with the cpu, memory and pids controllers".into());
                }
                true
            }
            CgroupVersion::V1 => false,
            CgroupVersion::Auto => v2.is_some(),
        };
        let mut cg = Cgroup {
            version: if use_v2 { 2 } else { 1 },
            leaves: vec![],
            parents: vec![],
        };
        let r = if use_v2 {
            cg.create_v2(&v2.unwrap_or_default(), parent, id, limits)
        } else {
            cg.create_v1(parent, id, limits)
        };
        match r {
            Ok(()) => Ok(cg),
            Err(e) => {
                cg.remove();
                Err(e)
            }
        }
    }

    /// Make a parent directory (it may exist) or the VM's own (it must not).
    fn mkdir(&mut self, dir: &Path, own: bool) -> Result<(), String> {
        match std::fs::create_dir(dir) {
            Ok(()) if own => {
                self.leaves.push(dir.to_path_buf());
                Ok(())
            }
            Ok(()) => {
                self.parents.push(dir.to_path_buf());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !own => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(format!(
                "cgroup {} exists: another VM with this id is running, or one was not cleaned up",
                dir.display()
            )),
            Err(e) => Err(format!("cgroup: creating {}: {e}", dir.display())),
        }
    }

    fn create_v2(&mut self, root: &Path, parent: &str, id: &str, l: &Limits) -> Result<(), String> {
        let ctrls = v2_controllers(root);
        for (c, wanted) in needed(l, "io") {
            if wanted && !ctrls.iter().any(|h| h == c) {
                return Err(format!("cgroup v2: the {c} controller is not available"));
            }
        }
        let enable: String = ctrls.iter().map(|c| format!("+{c} ")).collect();
        let p = root.join(parent);
        self.mkdir(&p, false)?;
        write(&root.join("cgroup.subtree_control"), enable.trim())?;
        write(&p.join("cgroup.subtree_control"), enable.trim())?;
        let d = p.join(id);
        self.mkdir(&d, true)?;
        if let Some(q) = l.cpu_quota_us {
            let period = l.cpu_period_us.unwrap_or(100_000);
            write(&d.join("cpu.max"), &format!("{q} {period}"))?;
        }
        if let Some(w) = l.cpu_weight {
            write(&d.join("cpu.weight"), &w.to_string())?;
        }
        if let Some(c) = &l.cpuset_cpus {
            write(&d.join("cpuset.cpus"), c)?;
        }
        if let Some(m) = &l.cpuset_mems {
            write(&d.join("cpuset.mems"), m)?;
        }
        if let Some(m) = l.memory_max {
            write(&d.join("memory.max"), &m.to_string())?;
            // No swapping past the limit either.
            let _ = write(&d.join("memory.swap.max"), "0");
        }
        if let Some(n) = l.pids_max {
            write(&d.join("pids.max"), &n.to_string())?;
        }
        for io in &l.io_max {
            let mut v = format!("{}:{}", io.major, io.minor);
            if io.rbps != 0 {
                v += &format!(" rbps={}", io.rbps);
            }
            if io.wbps != 0 {
                v += &format!(" wbps={}", io.wbps);
            }
            write(&d.join("io.max"), &v)?;
        }
        Ok(())
    }

    fn create_v1(&mut self, parent: &str, id: &str, l: &Limits) -> Result<(), String> {
        let hierarchies: Vec<(String, PathBuf)> = mounts()
            .into_iter()
            .filter(|(t, _, _)| t == "cgroup")
            .flat_map(|(_, opts, point)| {
                opts.split(',')
                    .filter(|o| ["cpu", "cpuacct", "cpuset", "memory", "pids", "blkio"].contains(o))
                    .map(|o| (o.to_string(), point.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let own_cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let dir_of = |ctrl: &str| -> Option<PathBuf> {
            let (_, point) = hierarchies.iter().find(|(c, _)| c == ctrl)?;
            let own = own_v1_path(&own_cgroups, ctrl);
            Some(point.join(own.trim_start_matches('/')))
        };
        for (c, wanted) in needed(l, "blkio") {
            if wanted && dir_of(c).is_none() {
                return Err(format!("cgroup v1: no hierarchy with the {c} controller"));
            }
        }
        // Every hierarchy we know (several controllers may share one mount).
        let mut made: Vec<PathBuf> = vec![];
        for ctrl in ["cpu", "cpuacct", "cpuset", "memory", "pids", "blkio"] {
            let Some(base) = dir_of(ctrl) else { continue };
            let p = base.join(parent);
            let d = p.join(id);
            if made.contains(&d) {
                continue;
            }
            self.mkdir(&p, false)?;
            if ctrl == "cpuset" {
                // v1 cpusets start empty; a task cannot join an empty one.
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if read(&p.join(f)).is_empty() {
                        write(&p.join(f), &read(&base.join(f)))?;
                    }
                }
            }
            self.mkdir(&d, true)?;
            made.push(d.clone());
            match ctrl {
                "cpu" => {
                    if let Some(q) = l.cpu_quota_us {
                        let period = l.cpu_period_us.unwrap_or(100_000);
                        write(&d.join("cpu.cfs_period_us"), &period.to_string())?;
                        write(&d.join("cpu.cfs_quota_us"), &q.to_string())?;
                    }
                    if let Some(w) = l.cpu_weight {
                        // v2's weight 100 is v1's 1024 shares.
                        write(&d.join("cpu.shares"), &(w * 1024 / 100).max(2).to_string())?;
                    }
                }
                "cpuset" => {
                    let cpus = l
                        .cpuset_cpus
                        .clone()
                        .unwrap_or_else(|| read(&p.join("cpuset.cpus")));
                    let mems = l
                        .cpuset_mems
                        .clone()
                        .unwrap_or_else(|| read(&p.join("cpuset.mems")));
                    write(&d.join("cpuset.cpus"), &cpus)?;
                    write(&d.join("cpuset.mems"), &mems)?;
                }
                "memory" => {
                    if let Some(m) = l.memory_max {
                        write(&d.join("memory.limit_in_bytes"), &m.to_string())?;
                    }
                }
                "pids" => {
                    if let Some(n) = l.pids_max {
                        write(&d.join("pids.max"), &n.to_string())?;
                    }
                }
                "blkio" => {
                    for io in &l.io_max {
                        let dev = format!("{}:{}", io.major, io.minor);
                        if io.rbps != 0 {
                            write(
                                &d.join("blkio.throttle.read_bps_device"),
                                &format!("{dev} {}", io.rbps),
                            )?;
                        }
                        if io.wbps != 0 {
                            write(
                                &d.join("blkio.throttle.write_bps_device"),
                                &format!("{dev} {}", io.wbps),
                            )?;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files of the VM's cgroup(s), opened for the child
    /// to write "0" (itself) into before it runs moat.
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, String> {
        self.leaves
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(|f: File| f.into())
                    .map_err(|e| format!("cgroup: {}: {e}", p.display()))
            })
            .collect()
    }

    /// Remove the VM's cgroups (the VM's tasks may take a moment to leave
    /// after it ends, so EBUSY is retried briefly), then the parents made
    /// for them if no other VM uses them.
    pub fn remove(&mut self) {
        for d in self.leaves.drain(..) {
            for attempt in 0..300 {
                match std::fs::remove_dir(&d) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 299 => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => {
                        eprintln!("moat-jail: removing cgroup {}: {e}", d.display());
                        break;
                    }
                    Ok(()) => break,
                }
            }
        }
        for d in self.parents.drain(..).rev() {
            let _ = std::fs::remove_dir(&d);
        }
    }
}
