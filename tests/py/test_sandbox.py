"""The seccomp sandbox of a running moat, seen from /proc."""
import glob
import os

import pytest


from test_qmp import connect


def statuses(pid):
    out = {}
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        fields = dict(line.split(":", 1) for line in open(path).read().splitlines() if ":" in line)
        out[fields["Name"].strip()] = (fields["Seccomp"].strip(), fields["NoNewPrivs"].strip())
    return out


def run_and_reset(moat, tmp_path, append, extra):
    """A guest with a disk that runs, is reset over QMP (a new VM: vCPU
    threads, KVM fds, guest RAM) and finds its disk again."""
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    m = moat(append=append, extra=["-drive", f"file={img},format=raw,if=virtio"] + extra)
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest to run")
    q.cmd("system_reset")
    m.wait_for(lambda: m.console().count("boot: pvh") >= 2, "the second boot")
    m.wait_for(lambda: m.console().count("blk: 1 devices") >= 2, "the disk after reset")
    return m, q


def filter_counts(pid):
    """Thread name -> how many seccomp filters it runs under."""
    out = {}
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        fields = dict(line.split(":", 1) for line in open(path).read().splitlines() if ":" in line)
        out.setdefault(fields["Name"].strip(), set()).add(int(fields["Seccomp_filters"]))
    return out


def test_every_thread_is_filtered(moat, tmp_path):
    m, q = run_and_reset(moat, tmp_path, "blk=1 blk_len=4096 action=count", ["-smp", "2"])
    st = statuses(m.proc.pid)
    assert len(st) >= 5, st  # main, vCPUs, serial, block I/O, monitor, signals
    assert all(v == ("2", "1") for v in st.values()), st
    # The process-wide filter everywhere, and each role's own on top (the
    # threads of the VM made by the reset too).
    counts = filter_counts(m.proc.pid)
    for name in ["vcpu0", "vcpu1", "virtio-blk", "monitor-accept", "signals"]:
        assert counts.get(name) == {2}, (name, counts)
    assert q.cmd("query-status")["status"] == "running"
    q.close()


def test_sandbox_off_warns_and_filters_nothing(moat):
    m = moat(extra=["-sandbox", "off"])
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest to run")
    st = statuses(m.proc.pid)
    assert all(v[0] == "0" for v in st.values()), st
    q.cmd("quit")
    m.wait_exit()
    assert b"-sandbox off" in m.proc.stderr.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop from")
def test_run_with_user_drops_everything(moat, tmp_path):
    # The reset's new VM comes from the /dev/kvm descriptor kept from startup.
    m, q = run_and_reset(moat, tmp_path, "blk=1 blk_len=4096 blk_write=1 action=count",
                         ["-run-with", "user=65534:65534"])
    assert "FAIL" not in m.console()
    for path in glob.glob(f"/proc/{m.proc.pid}/task/*/status"):
        f = dict(line.split(":", 1) for line in open(path).read().splitlines() if ":" in line)
        assert f["Uid"].split() == ["65534"] * 4, f["Uid"]
        assert f["Gid"].split() == ["65534"] * 4, f["Gid"]
        assert f["Groups"].strip() == ""
        for cap_set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]:
            assert int(f[cap_set], 16) == 0, (cap_set, f)
        assert f["Seccomp"].strip() == "2" and f["NoNewPrivs"].strip() == "1"
    q.close()


def caps_of(pid):
    """Thread name -> its five capability sets."""
    out = {}
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        f = dict(line.split(":", 1) for line in open(path).read().splitlines() if ":" in line)
        out[f["Name"].strip()] = {k: int(f[k], 16) for k in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]}
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv needs root to hand out capabilities")
def test_capabilities_held_by_a_non_root_starter_are_all_given_up(tmp_path):
    """A user holding ambient capabilities starts moat with -run-with: the
    uid change between two non-root uids clears nothing, so moat kept
    CapEff 0x62 (setgid, kill, dac_override) in every thread."""
    import subprocess
    import time
    from conftest import GUEST, MOAT
    guest = tmp_path / "guest.elf"
    guest.write_bytes(open(GUEST, "rb").read())
    os.chmod(tmp_path, 0o755)
    base = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    moat_args = [MOAT, "-kernel", str(guest), "-append", "action=count", "-serial", "null",
                 "-run-with", "user=65534:65534"]
    # Without CAP_SETPCAP the bounding set cannot be emptied: refused, and said why.
    caps = "+setgid,+kill,+dac_override"
    p = subprocess.run(base + [f"--inh-caps={caps}", f"--ambient-caps={caps}"] + moat_args,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "CAP_SETPCAP" in p.stderr, p
    # With it, every set of every thread ends up empty.
    caps += ",+setpcap"
    proc = subprocess.Popen(base + [f"--inh-caps={caps}", f"--ambient-caps={caps}"] + moat_args,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while len(caps_of(proc.pid)) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        held = caps_of(proc.pid)
        assert "vcpu0" in held, held
        for name, sets in held.items():
            if name.startswith("kvm-"):
                continue  # the kernel's own worker, not moat's
            assert all(v == 0 for v in sets.values()), (name, sets)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_run_with_chroot(moat, tmp_path):
    root = tmp_path / "empty-root"
    root.mkdir()
    m = moat(extra=["-run-with", f"user=65534:65534,chroot={root}"])
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest to run")
    assert os.readlink(f"/proc/{m.proc.pid}/root") == str(root)
    assert q.cmd("query-status")["status"] == "running"
    q.close()


def test_bad_run_with_is_refused(tmp_path):
    import subprocess
    from conftest import GUEST, MOAT
    for args, want in [(["-run-with", "user=no-such-user-here"], "not found"),
                       (["-run-with", "user=0:0"], "uid 0")]:
        p = subprocess.run([MOAT, "-kernel", GUEST] + args, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and want in p.stderr, (args, p.stderr)


def test_inherited_descriptors_are_closed(moat):
    r, w = os.pipe()
    os.set_inheritable(r, True)
    pipe = os.readlink(f"/proc/self/fd/{r}")
    m = moat(pass_fds=(r,))
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest to run")
    held = [os.readlink(p) for p in glob.glob(f"/proc/{m.proc.pid}/fd/*")]
    assert pipe not in held, held
    q.close()
    os.close(r)
    os.close(w)


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is for root")
def test_root_without_a_drop_is_refused(tmp_path):
    import subprocess
    from conftest import GUEST, MOAT
    env = {k: v for k, v in os.environ.items() if k != "MOAT_DANGEROUSLY_ALLOW_ROOT"}
    sock = tmp_path / "qmp.sock"
    argv = [MOAT, "-kernel", GUEST, "-append", "action=count", "-serial", "null",
            "-qmp", f"unix:{sock},server=on,wait=off"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 1, p
    assert "refusing to start: running as root" in p.stderr, p.stderr
    assert "-run-with user=" in p.stderr and "moat-jail" in p.stderr, p.stderr
    assert not sock.exists()  # refused before opening anything
    # The development switch lets it run, and says how dangerous that is.
    p = subprocess.run([MOAT, "-kernel", GUEST, "-append", "action=poweroff", "-serial", "null"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(env, MOAT_DANGEROUSLY_ALLOW_ROOT="1"))
    assert p.returncode == 0, p
    assert "owns this host" in p.stderr, p.stderr


def test_landlock_limits_what_the_monitor_can_open(moat, tmp_path):
    """With the sandbox on, a monitor request for a file the VM was not
    configured with is refused by the kernel (Landlock), while the
    configured image and a descriptor handed in over the socket still work."""
    from test_qmp import qmp_error
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * (1 << 20))
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 4096)
    os.chmod(other, 0o666)  # not a permission problem: only Landlock stands in the way
    m = moat(extra=["-drive", f"file={disk},format=raw,if=virtio"])
    q = connect(m)
    want = f"Could not open '{other}': Permission denied"
    assert qmp_error(q, "blockdev-add", **{"driver": "raw", "node-name": "n1",
                                           "file": {"driver": "file", "filename": str(other)}}) == want
    assert qmp_error(q, "blockdev-add", **{"driver": "raw", "node-name": "n1",
                                           "file": {"driver": "file", "filename": "/etc/passwd"}}) \
        == "Could not open '/etc/passwd': Permission denied"
    # The configured image is on the list.
    q.cmd("blockdev-add", **{"driver": "raw", "node-name": "n1", "read-only": True,
                             "file": {"driver": "file", "filename": str(disk)}})
    # The unlisted file, handed in as a descriptor, works: no path needed.
    f = open(other, "rb")
    q.send_fd_scm(f.fileno())
    q.cmd("add-fd", **{"fdset-id": 7})
    q.cmd("blockdev-add", **{"driver": "raw", "node-name": "n2", "read-only": True,
                             "file": {"driver": "file", "filename": "/dev/fdset/7"}})
    nodes = {n["node-name"] for n in q.cmd("query-named-block-nodes")}
    assert {"n1", "n2"} <= nodes
    f.close()
    q.close()


def test_stop_and_continue_under_the_sandbox(moat):
    """kill -STOP / -CONT (an administrator pausing the process) resumes
    interrupted sleeps through restart_syscall; the filters must allow it."""
    import signal
    import time
    m = moat()
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest to run")
    for _ in range(5):
        os.kill(m.proc.pid, signal.SIGSTOP)
        time.sleep(0.2)
        os.kill(m.proc.pid, signal.SIGCONT)
        time.sleep(0.1)
    n = m.count()
    m.wait_for(lambda: m.count() > n + 3, "the guest to go on counting")
    assert q.cmd("query-status")["status"] == "running"
    q.close()


def test_seccomp_log_mode_says_the_sandbox_is_off(moat, monkeypatch):
    """MOAT_SECCOMP_LOG=1 (finding what a new feature needs) logs instead of
    killing: moat must say so, every time."""
    monkeypatch.setenv("MOAT_SECCOMP_LOG", "1")
    m = moat()
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest to run")
    q.cmd("quit")
    m.wait_exit()
    err = m.proc.stderr.read()
    assert b"MOAT_SECCOMP_LOG=1" in err and b"does not protect this host" in err, err
