"""The seccomp sandbox of a running moat, seen from /proc."""
import glob
import os


from test_qmp import connect


def statuses(pid):
    out = {}
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        fields = dict(line.split(":", 1) for line in open(path).read().splitlines() if ":" in line)
        out[fields["Name"].strip()] = (fields["Seccomp"].strip(), fields["NoNewPrivs"].strip())
    return out


def test_every_thread_is_filtered(moat, tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    m = moat(append="blk=1 blk_len=4096 action=count",
             extra=["-drive", f"file={img},format=raw,if=virtio", "-smp", "2"])
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest to run")
    # A reset rebuilds the VM (new vCPU threads, KVM fds, guest RAM) under the filter.
    q.cmd("system_reset")
    m.wait_for(lambda: m.console().count("boot: pvh") >= 2, "the second boot")
    m.wait_for(lambda: m.console().count("blk: 1 devices") >= 2, "the disk after reset")
    st = statuses(m.proc.pid)
    assert len(st) >= 5, st  # main, vCPUs, serial, block I/O, monitor, signals
    assert all(v == ("2", "1") for v in st.values()), st
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
