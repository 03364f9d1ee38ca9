"""QMP against a running moat, with the real qemu.qmp client (PyPI)."""
import json
import os
import re
import socket
import stat
import subprocess
import time

import pytest
from conftest import GUEST, MOAT
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol


def connect(m):
    q = QEMUMonitorProtocol(m.qmp_path)
    q.connect(negotiate=True)
    q.settimeout(30)
    return q


def raw(m, path=None):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path or m.qmp_path)
    f = s.makefile("rwb")
    greeting = json.loads(f.readline())
    return s, f, greeting


def send(f, obj):
    f.write(obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n")
    f.flush()


def reply(f):
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            return msg


def event(q, name, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ev = q.pull_event(wait=max(0.01, end - time.monotonic()))
        if ev and ev["event"] == name:
            return ev
    raise AssertionError(f"no {name} event")


def test_greeting_and_negotiation(moat):
    m = moat()
    s, f, greeting = raw(m)
    assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert greeting["QMP"]["version"]["package"].startswith("moat ")
    assert greeting["QMP"]["capabilities"] == []
    send(f, {"execute": "query-status", "id": 1})
    r = reply(f)
    assert r["error"]["class"] == "CommandNotFound" and r["id"] == 1
    send(f, {"execute": "qmp_capabilities", "id": {"any": ["json", 1]}})
    assert reply(f) == {"return": {}, "id": {"any": ["json", 1]}}
    send(f, {"execute": "qmp_capabilities"})
    assert reply(f)["error"]["class"] == "CommandNotFound"
    s.close()


def test_queries(moat):
    m = moat(extra=["-smp", "2", "-uuid", "6f1f1a62-7a1c-4a56-b4a3-1d2b6a4f2e10"])
    q = connect(m)
    assert q.cmd("query-version")["qemu"]["major"] == 7
    names = {c["name"] for c in q.cmd("query-commands")}
    for c in ["qmp_capabilities", "query-status", "stop", "cont", "system_reset", "system_powerdown",
              "quit", "human-monitor-command", "getfd", "closefd", "add-fd", "remove-fd",
              "query-fdsets", "query-qmp-schema", "query-cpus-fast", "query-kvm", "query-uuid", "query-name"]:
        assert c in names
    assert q.cmd("query-status") == {"running": True, "singlestep": False, "status": "running"}
    assert q.cmd("query-name") == {"name": "pytest-vm"}
    assert q.cmd("query-uuid") == {"UUID": "6f1f1a62-7a1c-4a56-b4a3-1d2b6a4f2e10"}
    assert q.cmd("query-kvm") == {"enabled": True, "present": True}
    cpus = q.cmd("query-cpus-fast")
    assert [c["cpu-index"] for c in cpus] == [0, 1]
    for c in cpus:
        assert c["target"] == "x86_64"
        # thread-id names a real thread of the moat process.
        assert os.path.exists(f"/proc/{m.proc.pid}/task/{c['thread-id']}")
    schema = q.cmd("query-qmp-schema")
    assert any(e["name"] == "query-status" and e["meta-type"] == "command" for e in schema)
    q.close()


def test_argument_checking(moat):
    m = moat()
    q = connect(m)
    for name, args, text in [
        ("stop", {"force": True}, "Parameter 'force' is unexpected"),
        ("getfd", {}, "Parameter 'fdname' is missing"),
        ("getfd", {"fdname": 7}, "Invalid parameter type for 'fdname', expected: string"),
        ("human-monitor-command", {"command-line": 1}, "Invalid parameter type"),
    ]:
        with pytest.raises(ExecuteError) as e:
            q.cmd(name, **args)
        assert e.value.error_class == "GenericError"
        assert text in e.value.error.error.desc
    with pytest.raises(ExecuteError) as e:
        q.cmd("no-such-command")
    assert e.value.error_class == "CommandNotFound"
    with pytest.raises(ExecuteError) as e:
        q.cmd("migrate", uri="exec:touch /tmp/pwned")
    assert "never spawn" in e.value.error.error.desc
    q.close()


def test_stop_really_stops_the_guest(moat):
    m = moat()
    q = connect(m)
    m.wait_for(lambda: m.count() > 20, "the guest to count")
    q.cmd("stop")
    event(q, "STOP")
    assert q.cmd("query-status")["status"] == "paused"
    # Output the guest wrote before the stop may still be on its way to the file.
    time.sleep(0.3)
    frozen = m.count()
    time.sleep(1.0)
    assert m.count() == frozen, "the guest kept running while paused"
    q.cmd("cont")
    event(q, "RESUME")
    m.wait_for(lambda: m.count() > frozen + 20, "the guest to count again")
    # The guest continues where it was: the counter is not restarted.
    assert "count 0\n" in m.console() and m.console().count("count 0\n") == 1
    q.close()


def test_start_paused_then_cont(moat):
    m = moat(paused=True)
    q = connect(m)
    assert q.cmd("query-status") == {"running": False, "singlestep": False, "status": "prelaunch"}
    time.sleep(0.3)
    assert m.count() == 0
    q.cmd("cont")
    event(q, "RESUME")
    assert q.cmd("query-status")["status"] == "running"
    m.wait_for(lambda: m.count() > 5, "the guest to run")
    q.close()


def test_system_reset_reboots_the_guest(moat):
    m = moat()
    q = connect(m)
    m.wait_for(lambda: m.count() > 5, "first boot")
    q.cmd("system_reset")
    ev = event(q, "RESET")
    assert ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    m.wait_for(lambda: m.console().count("count 0\n") == 2, "the second boot")
    assert q.cmd("query-status")["status"] == "running"
    q.close()


@pytest.mark.parametrize("append, extra, waiting, reason, done", [
    # ACPI: the GED's power button; the guest powers off.
    ("action=wait-powerdown", [], "waiting for the power button", "guest-shutdown",
     "power button pressed"),
    # No ACPI: CTRL+ALT+DEL on the i8042; the guest resets (-no-reboot ends moat).
    ("action=wait-cad", ["-M", "microvm,acpi=off", "-no-reboot"], "waiting for ctrl-alt-del",
     "guest-reset", "ctrl-alt-del received"),
])
def test_system_powerdown(moat, append, extra, waiting, reason, done):
    m = moat(append=append, extra=extra)
    q = connect(m)
    m.wait_for(lambda: waiting in m.console(), "the guest")
    q.cmd("system_powerdown")
    event(q, "POWERDOWN")
    ev = event(q, "SHUTDOWN")
    assert ev["data"] == {"guest": True, "reason": reason}
    assert m.wait_exit() == 0
    assert done in m.console()


def test_quit(moat):
    m = moat()
    q = connect(m)
    q.cmd("quit")
    ev = event(q, "SHUTDOWN")
    assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert m.wait_exit() == 0
    assert not os.path.exists(m.qmp_path) or stat.S_ISSOCK(os.stat(m.qmp_path).st_mode)


def test_guest_reset_with_no_reboot(moat):
    m = moat(append="action=reboot-once", extra=["-no-reboot"], paused=True)
    q = connect(m)
    q.cmd("cont")
    ev = event(q, "SHUTDOWN")
    assert ev["data"] == {"guest": True, "reason": "guest-reset"}
    assert m.wait_exit() == 0


@pytest.mark.parametrize("paused", [False, True])
def test_system_reset_with_no_reboot_is_a_shutdown(moat, paused):
    """QEMU 7.2: with -no-reboot, a monitor's system_reset shuts down (in
    any run state, prelaunch too): SHUTDOWN, no RESET, exit 0."""
    m = moat(extra=["-no-reboot"], paused=paused)
    q = connect(m)
    if not paused:
        m.wait_for(lambda: m.count() > 2, "the guest to run")
    q.cmd("system_reset")
    seen = []
    while not seen or seen[-1]["event"] != "SHUTDOWN":
        seen.append(q.pull_event(wait=30))
    assert [e["event"] for e in seen] == ["SHUTDOWN"], seen
    assert seen[-1]["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    assert m.wait_exit() == 0


def test_fd_passing(moat, tmp_path):
    m = moat()
    q = connect(m)
    r, w = os.pipe()
    q.send_fd_scm(r)
    q.cmd("getfd", fdname="mypipe")
    q.cmd("closefd", fdname="mypipe")
    with pytest.raises(ExecuteError) as e:
        q.cmd("closefd", fdname="mypipe")
    assert "not found" in e.value.error.error.desc
    with pytest.raises(ExecuteError) as e:
        q.cmd("getfd", fdname="nothing-sent")
    assert "No file descriptor supplied via SCM_RIGHTS" in e.value.error.error.desc
    f = open(tmp_path / "disk.img", "wb")
    q.send_fd_scm(f.fileno())
    added = q.cmd("add-fd", **{"fdset-id": 3, "opaque": "disk"})
    assert added["fdset-id"] == 3
    # The descriptor moat holds really is our file.
    target = os.readlink(f"/proc/{m.proc.pid}/fd/{added['fd']}")
    assert target == str(tmp_path / "disk.img")
    assert q.cmd("query-fdsets") == [{"fdset-id": 3, "fds": [{"fd": added["fd"], "opaque": "disk"}]}]
    q.cmd("remove-fd", **{"fdset-id": 3, "fd": added["fd"]})
    assert q.cmd("query-fdsets") == []
    with pytest.raises(ExecuteError):
        q.cmd("remove-fd", **{"fdset-id": 3})
    os.close(r)
    os.close(w)
    q.close()


def test_hmp(moat):
    m = moat(hmp=True)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(m.hmp_path)

    def until_prompt():
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        return data.decode()

    assert until_prompt().startswith("QEMU 7.2.0 monitor - type 'help' for more information")

    def hmp(line):
        s.sendall(line.encode() + b"\n")
        out = until_prompt()[: -len("(qemu) ")]
        # QEMU's readline echoes the line as it is typed, then CRLF.
        echo, _, rest = out.partition("\r\n")
        assert echo.endswith(line + "\x1b[K"), repr(echo)
        return rest

    assert hmp("info status") == "VM status: running\r\n"
    assert hmp("stop") == ""
    assert hmp("info status") == "VM status: paused\r\n"
    assert hmp("cont") == ""
    assert hmp("info version").startswith("7.2.0moat ")
    assert hmp("info name") == "pytest-vm\r\n"
    assert hmp("info kvm") == "kvm support: enabled\r\n"
    assert hmp("info cpus").startswith("* CPU #0: thread_id=")
    assert "RIP=" in hmp("info registers")
    assert "system_reset" in hmp("help")
    assert hmp("frobnicate") == "unknown command: 'frobnicate'\r\n"
    # The QMP route to HMP runs the same commands.
    q = connect(m)
    assert q.cmd("human-monitor-command", **{"command-line": "info status"}) == "VM status: running\r\n"
    q.close()
    s.close()


def test_socket_is_private_and_never_clobbers_files(moat, tmp_path):
    m = moat()
    assert stat.S_IMODE(os.stat(m.qmp_path).st_mode) == 0o600
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    import subprocess
    from conftest import GUEST, MOAT
    r = subprocess.run([MOAT, "-kernel", GUEST, "-qmp", f"unix:{precious},server=on,wait=off"],
                       capture_output=True, timeout=60)
    assert r.returncode == 1
    assert b"not a socket" in r.stderr
    assert precious.read_text() == "keep me"


def test_insecure_tcp_monitor_is_refused():
    import subprocess
    from conftest import GUEST, MOAT
    for args in (["-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"],
                 ["-chardev", "socket,id=c0,host=127.0.0.1,port=4445,server=on,wait=off", "-mon", "chardev=c0,mode=control"],
                 ["-monitor", "tcp:127.0.0.1:4446,server,nowait"]):
        r = subprocess.run([MOAT, "-kernel", GUEST] + args, capture_output=True, timeout=60)
        assert r.returncode == 1, args
        assert b"plaintext TCP monitors do not exist" in r.stderr, r.stderr


# ---- hostile clients: the VM keeps running and other clients are served ----

def test_malformed_json_is_answered(moat):
    m = moat()
    s, f, _ = raw(m)
    send(f, {"execute": "qmp_capabilities"})
    reply(f)
    send(f, b"{\"execute\": nonsense}\n")
    r = reply(f)
    assert r["error"]["class"] == "GenericError"
    send(f, b"[1, 2]\n")
    assert "must be a JSON object" in reply(f)["error"]["desc"]
    send(f, {"execute": "query-status"})
    assert reply(f)["return"]["status"] == "running"
    s.close()


def test_oversized_message_disconnects_only_that_client(moat):
    m = moat()
    s, f, _ = raw(m)
    send(f, {"execute": "qmp_capabilities"})
    reply(f)
    try:
        s.sendall(b'{"execute": "' + b"x" * (2 << 20))
    except (BrokenPipeError, ConnectionResetError):
        pass  # moat hung up on us mid-message: that is the point
    # An error (if it got through before the hang-up), then end of stream.
    lines = []
    try:
        while True:
            line = f.readline()
            if not line:
                break
            lines.append(json.loads(line))
    except ConnectionResetError:
        pass
    assert all(r["error"]["class"] == "GenericError" for r in lines), lines
    before = m.count()
    m.wait_for(lambda: m.count() > before + 10, "the guest to keep running")
    q = connect(m)
    assert q.cmd("query-status")["status"] == "running"
    q.close()


def test_client_that_never_reads_is_dropped(moat):
    m = moat()
    s, f, _ = raw(m)
    send(f, {"execute": "qmp_capabilities"})
    reply(f)
    # Ask for large replies and never read them.
    s.setblocking(False)
    msg = (json.dumps({"execute": "query-qmp-schema"}) + "\n").encode()
    sent = 0
    dropped = False
    for _ in range(20000):
        try:
            sent += s.send(msg)
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
            break
    assert dropped, "moat kept a client that never reads"
    q = connect(m)
    assert q.cmd("query-status")["status"] == "running"
    before = m.count()
    m.wait_for(lambda: m.count() > before + 10, "the guest to keep running")
    q.close()


def test_many_clients_and_disconnect_mid_command(moat):
    m = moat()
    socks = []
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(m.qmp_path)
        socks.append(s)
    # Half of them vanish in the middle of a command.
    for s in socks[:10]:
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-st')
        s.close()
    for s in socks[10:]:
        s.close()
    q = connect(m)
    assert q.cmd("query-status")["status"] == "running"
    q.close()


def test_block_queries(moat, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    m = moat(append="blk=1 blk_len=65536 action=count",
             extra=["-drive", f"file={img},format=raw,if=none,id=disk0",
                    "-device", "virtio-blk-device,drive=disk0"])
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest to read its disk")
    blk = q.cmd("query-block")
    assert len(blk) == 1
    b = blk[0]
    assert b["device"] == "disk0" and b["removable"] is False
    assert b["qdev"] == "/machine/peripheral-anon/device[0]"
    assert b["inserted"]["file"] == str(img) and b["inserted"]["ro"] is False
    assert b["inserted"]["image"]["virtual-size"] == 1 << 20
    assert b["inserted"]["image"]["format"] == "raw"
    st = q.cmd("query-blockstats")[0]
    assert st["device"] == "disk0"
    assert st["stats"]["rd_operations"] >= 1
    assert st["stats"]["rd_bytes"] >= 65536
    assert st["stats"]["wr_operations"] == 0
    with pytest.raises(ExecuteError) as e:
        q.cmd("eject", device="disk0")
    assert e.value.error_class == "GenericError" and "not removable" in e.value.error.error.desc
    with pytest.raises(ExecuteError) as e:
        q.cmd("eject", device="nope")
    assert e.value.error_class == "DeviceNotFound"
    q.close()


def stat_keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= stat_keys(v, prefix + k + ".")
    return out


def test_blockstats_count_as_qemu_does(moat, tmp_path):
    """query-blockstats counts what QEMU's virtio-blk counts: bytes and
    operations done, host failures (a write to a read-only drive), guest
    mistakes as invalid (reads past the end, a partial sector), the time
    each kind took, the idle time since, the highest offset written, and a
    raw image's file node below it; the fields are QEMU's own (a QEMU with
    the same drives is asked too)."""
    disk, ro = tmp_path / "d.img", tmp_path / "ro.img"
    disk.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    ro.write_bytes(b"\0" * (1 << 20))
    drives = ["-drive", f"file={disk},format=raw,if=none,id=d0",
              "-device", "virtio-blk-device,drive=d0",
              "-drive", f"file={ro},format=raw,if=none,id=d1,readonly=on",
              "-device", "virtio-blk-device,drive=d1"]
    m = moat(append="blk=2 blk_len=65536 blk_write=1 blk_oob=1 blk_ro=1 action=count", extra=drives)
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest's disk checks")
    assert "FAIL" not in m.console(), m.console()
    stats = {s["device"]: s for s in q.cmd("query-blockstats")}
    d0, d1 = stats["d0"]["stats"], stats["d1"]["stats"]
    # 64 KiB read, 4 KiB written at sector 8, flushed, read back.
    assert d0["rd_bytes"] == 65536 + 4096 and d0["wr_bytes"] == 4096, d0
    assert d0["wr_operations"] == 1 and d0["flush_operations"] == 1, d0
    assert d0["wr_highest_offset"] == 8 * 512 + 4096, d0
    # Past the end, across the end, a partial sector: the guest's mistakes.
    assert d0["invalid_rd_operations"] == 3 and d0["failed_rd_operations"] == 0, d0
    for k in ["rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns"]:
        assert d0[k] > 0, (k, d0)
    # The write to the read-only drive failed on the host side.
    assert d1["failed_wr_operations"] == 1 and d1["wr_operations"] == 0, d1
    assert d1["invalid_wr_operations"] == 0 and d1["wr_highest_offset"] == 0, d1
    idle = d0["idle_time_ns"]
    time.sleep(0.2)
    assert q.cmd("query-blockstats")[0]["stats"]["idle_time_ns"] >= idle + 150_000_000
    # The raw image's file, below it.
    parent = stats["d0"]["parent"]
    file_node = next(n for n in q.cmd("query-named-block-nodes") if n["file"] == str(disk) and n["drv"] == "file")
    assert parent["node-name"] == file_node["node-name"]
    assert parent["stats"]["wr_highest_offset"] == 8 * 512 + 4096
    assert parent["stats"]["rd_bytes"] == 0  # accounted on the device, as QEMU
    assert parent["driver-specific"] == {"driver": "file", "discard-nb-ok": 0,
                                         "discard-nb-failed": 0, "discard-bytes-ok": 0}
    q.close()
    # QEMU's fields, no more and no fewer (its drives saw no I/O: no idle time).
    out = subprocess.run(["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-display", "none",
                          "-qmp", "stdio", *drives], input=b'{"execute":"qmp_capabilities"}\n'
                         b'{"execute":"query-blockstats"}\n{"execute":"quit"}\n',
                         capture_output=True, timeout=60).stdout.decode()
    theirs = [json.loads(line) for line in out.splitlines() if '"return": [' in line][0]["return"]
    ours = {s["device"]: s for s in q_stats_without_idle(stats)}
    for s in theirs:
        assert stat_keys(s) == stat_keys(ours[s["device"]]), (s, ours[s["device"]])


def q_stats_without_idle(stats):
    out = []
    for s in stats.values():
        s = json.loads(json.dumps(s))
        s["stats"].pop("idle_time_ns", None)
        out.append(s)
    return out


def qemu_session(args, commands):
    """The replies of a QEMU given `args` to `commands`, in order."""
    lines = [json.dumps({"execute": "qmp_capabilities"})]
    lines += [json.dumps(c) for c in commands] + [json.dumps({"execute": "quit"})]
    out = subprocess.run(["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-display", "none",
                          "-qmp", "stdio", *args], input="\n".join(lines).encode() + b"\n",
                         capture_output=True, timeout=60).stdout.decode()
    replies = [json.loads(line) for line in out.splitlines() if line.strip()]
    replies = [r for r in replies if "return" in r or "error" in r]
    return replies[1:1 + len(commands)]


def test_unused_drive_is_kept_as_qemu_keeps_it(moat, tmp_path):
    """An if=none drive no device uses stays, as in QEMU: query-block lists
    it removable and without a qdev, query-blockstats and
    query-named-block-nodes too; eject closes its image (the medium goes,
    the drive stays), after which throttling it is refused as QEMU words
    it. QEMU with the same drives answers the same commands alongside."""
    disk, spare = tmp_path / "d.img", tmp_path / "spare.img"
    disk.write_bytes(b"\0" * (1 << 20))
    spare.write_bytes(b"\0" * (1 << 20))
    args = ["-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-device,drive=d0",
            "-drive", f"file={spare},format=raw,if=none,id=spare"]
    limits = {"device": "spare", "bps": 1 << 20, "bps_rd": 0, "bps_wr": 0,
              "iops": 0, "iops_rd": 0, "iops_wr": 0}
    commands = [{"execute": "query-block"}, {"execute": "query-blockstats"},
                {"execute": "eject", "arguments": {"device": "spare"}},
                {"execute": "query-block"}, {"execute": "query-blockstats"},
                {"execute": "block_set_io_throttle", "arguments": limits},
                {"execute": "eject", "arguments": {"device": "d0"}}]
    theirs = qemu_session(args, commands)
    m = moat(extra=args + ["-S"])
    q = connect(m)
    nodes = [n["file"] for n in q.cmd("query-named-block-nodes")]
    assert nodes == [str(spare)] * 2 + [str(disk)] * 2, nodes  # (newest first, as QEMU lists them)
    ours = []
    for c in commands:
        try:
            ours.append({"return": q.cmd(c["execute"], **c.get("arguments", {}))})
        except ExecuteError as e:
            ours.append({"error": {"class": e.error_class, "desc": e.error.error.desc}})
    blk = {b["device"]: b for b in ours[0]["return"]}
    assert blk["spare"]["removable"] is True and "qdev" not in blk["spare"], blk
    assert blk["spare"]["inserted"]["file"] == str(spare)
    assert blk["d0"]["qdev"] == "/machine/peripheral-anon/device[0]" and blk["d0"]["removable"] is False
    after = {b["device"]: b for b in ours[3]["return"]}
    assert "inserted" not in after["spare"] and "inserted" in after["d0"], after
    assert all(os.readlink(p) != str(spare) for p in glob_fds(m.proc.pid)), "the ejected image is closed"
    assert [n["file"] for n in q.cmd("query-named-block-nodes")] == [str(disk)] * 2
    # The same shapes, results and errors as QEMU's.
    for mine, qemu, c in zip(ours, theirs, commands):
        assert mine.keys() == qemu.keys(), (c, mine, qemu)
        if "error" in mine:
            assert mine["error"] == qemu["error"], (c, mine, qemu)
        elif isinstance(mine["return"], list):
            for a, b in zip(sorted(mine["return"], key=lambda x: x["device"]),
                            sorted(qemu["return"], key=lambda x: x["device"])):
                a = {k: v for k, v in a.items() if k != "io-status"}  # (QEMU's has none before
                b = {k: v for k, v in b.items() if k != "io-status"}  # the guest runs)
                skip = {"stats.idle_time_ns"}
                assert stat_keys(a) - skip == stat_keys(b) - skip, (c, a, b)
    q.close()


def test_a_drive_without_a_file_has_no_medium_as_in_qemu(moat, tmp_path):
    """-drive if=none,id=X without a file is a drive with no medium: the
    monitor shows it removable and not inserted, eject is a no-op, and
    throttling it says there is no medium; a device cannot use it. The
    same commands to a QEMU with the same options give the same answers."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * (1 << 20))
    # (The drives are listed in the order of the -drive options, as QEMU lists them.)
    args = ["-drive", "if=none,id=cd0", "-drive", f"file={disk},format=raw,if=none,id=d0",
            "-device", "virtio-blk-device,drive=d0", "-drive", "if=none,id=cd1,readonly=on,werror=stop,media=cdrom"]
    limits = {"device": "cd0", "bps": 1, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
    commands = [{"execute": "query-block"}, {"execute": "query-blockstats"},
                {"execute": "query-named-block-nodes"},
                {"execute": "eject", "arguments": {"device": "cd0"}},
                {"execute": "block_set_io_throttle", "arguments": limits},
                {"execute": "human-monitor-command", "arguments": {"command-line": "info block"}}]
    theirs = qemu_session(args, commands)
    q = connect(moat(extra=args + ["-S"]))
    ours = answers(q, commands)
    q.close()
    nameless = lambda v: json.loads(re.sub(r"#block\d+", "#block", json.dumps(v)))
    for mine, qemu, c in zip(ours, theirs, commands):
        if c["execute"] == "query-blockstats":
            assert [stat_keys(x) for x in mine["return"]] == [stat_keys(x) for x in qemu["return"]], (mine, qemu)
        elif c["execute"] in ("query-block", "query-named-block-nodes"):
            # (The used drive's image details are other tests'.)
            assert [b.get("device") for b in mine["return"]] == [b.get("device") for b in qemu["return"]]
            assert [b.get("file") for b in mine["return"]] == [b.get("file") for b in qemu["return"]]
        else:
            assert nameless(mine) == nameless(qemu), (c, mine, qemu)
    empty = {"device": "cd0", "locked": False, "removable": True, "type": "unknown"}
    assert ours[0]["return"][0] == theirs[0]["return"][0] == empty
    # A device needs a medium (QEMU's words); a drive's id is its own.
    for bad, want in [(["-drive", "if=none,id=e", "-device", "virtio-blk-device,drive=e"],
                       "Device needs media, but drive is empty"),
                      (["-drive", "if=none,id=e", "-drive", "if=none,id=e"], "Duplicate ID 'e' for drive"),
                      (["-drive", "if=none,id=e,format=raw"], 'A block device must be specified for "file"'),
                      (["-drive", "if=none,id=e,cache=none"], "Must specify either driver or file")]:
        r = subprocess.run([MOAT, "-kernel", GUEST, *bad], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and want in r.stderr, r.stderr


def answers(q, commands):
    """Each command's reply as QMP puts it on the wire (return or error)."""
    out = []
    for c in commands:
        try:
            out.append({"return": q.cmd(c["execute"], **c.get("arguments", {}))})
        except ExecuteError as e:
            out.append({"error": {"class": e.error_class, "desc": e.error.error.desc}})
    return out


def test_devices_are_named_as_qemu_names_them(moat, tmp_path):
    """A device's qdev is its id= when it has one, else its place among the
    id-less -devices of every kind; eject and block_set_io_throttle find a
    drive by its device's id (id=) apart from the drive's name (device=),
    with QEMU's errors for an unknown id and for a device with no drive;
    limits set by id= are grouped under the id. QEMU given the same
    options answers the same commands alongside."""
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    args = ["-device", "virtio-rng-device,id=r1", "-device", "virtio-rng-device",
            "-drive", f"file={img},format=raw,if=none,id=d1,readonly=on",
            "-device", "virtio-blk-device,drive=d1,id=vd1",
            "-drive", f"file={img},format=raw,if=none,id=d3,readonly=on",
            "-device", "virtio-blk-device,drive=d3"]
    limits = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 10, "iops_rd": 0, "iops_wr": 0}
    commands = [{"execute": "query-block"}]
    commands += [{"execute": "eject", "arguments": a} for a in
                 [{"id": "vd1"}, {"id": "nope"}, {"id": "r1"}, {"id": "d1"}, {"device": "vd1"},
                  {"device": "d1", "id": "vd1"}]]
    commands += [{"execute": "block_set_io_throttle", "arguments": {**limits, **a}} for a in
                 [{"id": "vd1"}, {"id": "/machine/peripheral-anon/device[1]"}, {"device": "d3"}]]
    commands += [{"execute": "query-block"}]
    theirs = qemu_session(args, commands)
    q = connect(moat(extra=args + ["-S"]))
    ours = answers(q, commands)
    # (Where moat is stricter: QEMU would make d3 share vd1's limits.)
    with pytest.raises(ExecuteError, match="moat shares no limits between drives"):
        q.cmd("block_set_io_throttle", device="d3", group="vd1", **limits)
    q.close()
    qdevs = lambda r: {b["device"]: b["qdev"] for b in r["return"]}
    groups = lambda r: {b["device"]: b["inserted"].get("group") for b in r["return"]}
    assert qdevs(ours[0]) == {"d1": "vd1", "d3": "/machine/peripheral-anon/device[1]"}, ours[0]
    # (A group keeps the name its limits were first set by.)
    assert groups(ours[-1]) == {"d1": "vd1", "d3": "/machine/peripheral-anon/device[1]"}, ours[-1]
    for mine, qemu, c in zip(ours, theirs, commands):
        assert mine.keys() == qemu.keys(), (c, mine, qemu)
        if "error" in mine:
            assert mine["error"] == qemu["error"], (c, mine, qemu)
    assert qdevs(ours[0]) == qdevs(theirs[0]) and groups(ours[-1]) == groups(theirs[-1])


def backed_drive(tmp_path, id, size="4M"):
    """A qcow2 image over a qcow2 backing image, and the options that
    make it drive `id` of a virtio-blk device (the backing layer named)."""
    base, top = tmp_path / f"{id}-base.qcow2", tmp_path / f"{id}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), size], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)],
                   check=True)
    return base, top, ["-drive", f"file={top},format=qcow2,if=none,id={id},backing.driver=qcow2,"
                       f"backing.file.filename={base}", "-device", f"virtio-blk-device,drive={id}"]


class QemuPeer:
    """A paused QEMU given the same options, to ask alongside moat."""

    def __init__(self, tmp_path, args):
        path = tmp_path / "qemu-qmp.sock"
        self.proc = subprocess.Popen(["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-display", "none",
                                      "-S", "-qmp", f"unix:{path},server=on,wait=off", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + 60
        while not path.exists():
            assert self.proc.poll() is None and time.monotonic() < end, self.proc.stderr.read()
            time.sleep(0.05)
        self.q = QEMUMonitorProtocol(str(path))
        self.q.connect(negotiate=True)
        self.q.settimeout(30)

    def close(self):
        self.q.close()
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def qemu_peer(tmp_path):
    """Start a QemuPeer; it is ended with the test, whatever happens."""
    started = []

    def start(args):
        started.append(QemuPeer(tmp_path, args))
        return started[-1]
    yield start
    for p in started:
        if p.proc.poll() is None:
            try:
                p.q.close()
            except Exception:
                pass
            p.proc.kill()
            p.proc.wait()


def test_image_chains_are_listed_as_qemu_lists_them(moat, qemu_peer, tmp_path):
    """Every node of every chain is named and listed as QEMU does: a
    backing layer's node and its file, an external data file's node, each
    drive's chain from its lowest layer up and the newest drive first,
    blockdev-add's nodes before them; query-blockstats nests each layer
    below a drive under "backing" and counts a data-file image's writes on
    its data file's node; with query-nodes it lists each node's own, in
    the order QEMU made them. blockdev-del says which nodes it will not
    delete, as QEMU says it; thresholds on any node are kept. QEMU given
    the same options answers alongside (node numbers differ: the nodes are
    compared by their files, drivers and places)."""
    base, top, args = backed_drive(tmp_path, "d0")
    ext = tmp_path / "ext.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'ext.data'},data_file_raw=on", str(ext), "4M"], check=True)
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    args += ["-drive", f"file={ext},format=qcow2,if=none,id=e,data-file.filename={tmp_path / 'ext.data'}",
            "-device", "virtio-blk-device,drive=e",
            "-drive", f"file={raw},format=raw,if=none,id=spare,readonly=on"]
    add = {"driver": "qcow2", "node-name": "added", "read-only": True, "backing": None,
           "file": {"driver": "file", "filename": str(base)}}
    peers = {"moat": connect(moat(extra=args + ["-S"])), "qemu": qemu_peer(args)}
    seen = {}
    for who, q in peers.items():
        q = getattr(q, "q", q)
        q.cmd("blockdev-add", **add)
        nodes = q.cmd("query-named-block-nodes")
        stats = q.cmd("query-blockstats") + q.cmd("query-blockstats", **{"query-nodes": True})
        names = [n["node-name"] for n in nodes]
        by_file = {(n["file"], n["drv"]): n["node-name"] for n in nodes}
        # Deleting: a drive's node, a node of a drive's chain, a node's
        # file, a name no node has, then the node made above.
        dels = [by_file[(str(top), "qcow2")], by_file[(str(base), "qcow2")],
                by_file[(str(ext) , "file")], "nope", "added"]
        # Node names as places in the list, so the two can be compared.
        place = lambda v: (re.sub(r"#block\d+|added", lambda m: f"<{names.index(m.group(0))}>", v)
                           if isinstance(v, str) else v)
        errors = []
        for d in dels:
            try:
                q.cmd("blockdev-del", **{"node-name": d})
                errors.append(None)
            except ExecuteError as e:
                errors.append(place(e.error.error.desc.replace(d, "NODE")))
        # A threshold on a backing layer's node stays (nothing writes there).
        b = by_file[(str(base), "qcow2")]
        q.cmd("block-set-write-threshold", **{"node-name": b, "write-threshold": 4096})
        kept = {n["node-name"]: n["write_threshold"] for n in q.cmd("query-named-block-nodes")}[b]
        listing = [(n["node-name"] if not n["node-name"].startswith("#") else "auto", n["file"], n["drv"],
                    n["ro"], n.get("backing_file"), n["backing_file_depth"]) for n in nodes]
        tree = json.loads(json.dumps(stats), object_hook=lambda d: {k: place(v) for k, v in d.items()
                                                                      if k not in ("stats", "idle_time_ns")})
        seen[who] = (listing, tree, errors, kept)
    for q in peers.values():
        q.close()
    assert seen["moat"][0] == seen["qemu"][0], (seen["moat"][0], seen["qemu"][0])
    assert seen["moat"][1] == seen["qemu"][1], (seen["moat"][1], seen["qemu"][1])
    assert seen["moat"][2] == seen["qemu"][2], (seen["moat"][2], seen["qemu"][2])
    assert seen["moat"][3] == seen["qemu"][3] == 4096
    # What moat lists: 2 nodes for added, 2 + 2 for d0's chain, 3 for e, 2 for spare.
    assert len(seen["moat"][0]) == 11, seen["moat"][0]


def test_hmp_block_commands_print_as_qemus(moat, qemu_peer, tmp_path):
    """HMP's info block (all, one, -n, -v), info blockstats, eject and
    block_set_io_throttle, with their argument errors: the text QEMU
    prints for the same options, byte for byte (node numbers aside)."""
    _, _, args = backed_drive(tmp_path, "d0", size="64M")
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\0" * (10 << 20))
    args += ["-drive", f"file={raw},format=raw,if=none,id=d1,readonly=on",
            "-device", "virtio-blk-device,drive=d1,id=vd1",
            "-drive", f"file={raw},format=raw,if=none,id=spare,readonly=on"]
    lines = ["info block", "info block -v", "info block -n", "info block d1", "info block nope",
             "info block -z", "info block d1 x", "info blockstats", "info blockstats x",
             "eject", "eject nope", "eject -f d1", "eject d1 x", "eject -z d1",
             "block_set_io_throttle", "block_set_io_throttle d1 x", "block_set_io_throttle d1 1",
             "block_set_io_throttle nope 1 0 0 0 0 0", "block_set_io_throttle d1 1 1 0 0 0 0",
             "block_set_io_throttle d1 -1 0 0 0 0 0", "block_set_io_throttle d1 0x10 0 0 0 0 0",
             "info block d1", "eject spare", "info block", "help eject", "help block_set_io_throttle"]
    peers = {"moat": connect(moat(extra=args + ["-S"])), "qemu": qemu_peer(args)}
    out = {}
    for who, q in peers.items():
        q = getattr(q, "q", q)
        out[who] = [re.sub(r"#block\d+", "#block", q.cmd("human-monitor-command", **{"command-line": line}))
                    for line in lines]
    for q in peers.values():
        q.close()
    for line, mine, qemu in zip(lines, out["moat"], out["qemu"]):
        assert mine == qemu, (line, mine, qemu)
    assert "Backing file:     " in out["moat"][0] and "I/O throttling:   bps=16 " in out["moat"][21]


def qemu_img_info(path):
    out = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_image_info_as_qemu_reports_it(moat, tmp_path):
    """query-block and query-named-block-nodes describe each image as QEMU
    does (qemu-img info, which shares QEMU's ImageInfo, is the oracle):
    cluster size and the qcow2 header's format-specific data for qcow2
    version 2 and 3, zstd, lazy refcounts, 8-bit refcounts, extended L2,
    an external data file, and each layer of a backing chain, with the
    backing file as the header names it (a relative name too) and in
    full, also when the drive is opened without its backing file; every
    node has the fields QEMU's schema makes mandatory. The sandbox is on."""
    def img(name, *opts, size="4M", backing=None):
        p = tmp_path / name
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if backing:
            args += ["-F", "qcow2", "-b", str(backing)]
        for o in opts:
            args += ["-o", o]
        subprocess.run(args + [str(p), size], check=True)
        return p

    base = img("base.qcow2", "compat=0.10", "cluster_size=4096")
    top = img("top.qcow2", "lazy_refcounts=on,refcount_bits=8,compression_type=zstd", backing=base)
    ext = img("ext.qcow2", f"data_file={tmp_path / 'ext.data'},data_file_raw=on")
    sub = img("sub.qcow2", "extended_l2=on,cluster_size=16384")
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * (1 << 20))
    rel = img("rel.qcow2", backing="base.qcow2")  # (named relative to its own directory)
    cut = img("cut.qcow2", backing="base.qcow2")
    drives = [
        (top, f"backing.driver=qcow2,backing.file.filename={base},backing.backing="),
        (ext, f"data-file.filename={tmp_path / 'ext.data'}"),
        (sub, None),
        (raw, None),
        (rel, f"backing.driver=qcow2,backing.file.filename={base},backing.backing="),
        (cut, "backing="),
    ]
    extra = []
    for i, (p, opt) in enumerate(drives):
        fmt = "raw" if p == raw else "qcow2"
        extra += ["-drive", f"file={p},format={fmt},if=none,id=d{i}" + (f",{opt}" if opt else ""),
                  "-device", f"virtio-blk-device,drive=d{i}"]
    m = moat(extra=extra)
    q = connect(m)
    blk = {b["device"]: b for b in q.cmd("query-block")}
    keys = ["filename", "format", "virtual-size", "cluster-size", "format-specific", "backing-filename",
            "full-backing-filename", "backing-filename-format"]
    for i, (p, opt) in enumerate(drives):
        chain = qemu_img_info(p)
        got = blk[f"d{i}"]["inserted"]["image"]
        if opt == "backing=":  # (opened without the layer below, which is not shown)
            chain = chain[:1]
            assert "backing_file" not in blk[f"d{i}"]["inserted"]
        for want in chain:
            assert {k: got.get(k) for k in keys} == {k: want.get(k) for k in keys}, (p, got, want)
            got = got.get("backing-image", {})
        assert got == {}, p
    mandatory = {"file", "ro", "drv", "encrypted", "detect_zeroes", "bps", "bps_rd", "bps_wr", "iops",
                 "iops_rd", "iops_wr", "image", "cache", "write_threshold", "backing_file_depth"}
    nodes = q.cmd("query-named-block-nodes")
    for n in nodes:
        assert mandatory <= n.keys(), n
    # Each drive's node over its protocol node, the file (the order, and
    # the nodes of lower layers and data files: see
    # test_image_chains_are_listed_as_qemu_lists_them).
    for i, (p, _) in enumerate(drives):
        fmt = next(n for n in nodes if n["node-name"] == blk[f"d{i}"]["inserted"]["node-name"])
        file = next(n for n in nodes if n["file"] == str(p) and n["drv"] == "file")
        assert fmt["file"] == str(p) and fmt["drv"] == ("raw" if p == raw else "qcow2")
        assert file["file"] == str(p) and file["image"]["filename"] == str(p)
        assert file["image"]["format"] == "file" and "backing-image" not in file["image"]
        assert file["image"]["virtual-size"] == -(-os.path.getsize(p) // 512) * 512
        assert file["node-name"].startswith("#block") and file["node-name"] != fmt["node-name"]
    q.close()


def test_write_threshold_on_a_qcow2_file_node(moat, tmp_path):
    """libvirt's use: a threshold on a qcow2 image's file node, in file
    offsets. The guest's writes allocate clusters past the file's end; the
    first of the image's own writes (data or metadata) ending past the
    threshold raises BLOCK_WRITE_THRESHOLD for the file node, once. The
    file's highest offset written shows as query-blockstats' parent."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    m = moat(append="blk=1 blk_storm=50 blk_noflush=1 action=count", paused=True,
             extra=["-drive", f"file={img},format=qcow2,if=none,id=d0",
                    "-device", "virtio-blk-device,drive=d0"])
    q = connect(m)
    fmt, file = q.cmd("query-named-block-nodes")
    assert fmt["drv"] == "qcow2" and file["drv"] == "file", (fmt, file)
    size = os.path.getsize(img)
    q.cmd("block-set-write-threshold", **{"node-name": file["node-name"], "write-threshold": size})
    assert q.cmd("query-named-block-nodes")[1]["write_threshold"] == size
    q.cmd("cont")
    ev = event(q, "BLOCK_WRITE_THRESHOLD")["data"]
    assert ev["node-name"] == file["node-name"] and ev["write-threshold"] == size, ev
    assert 0 < ev["amount-exceeded"] <= 1 << 20, ev
    m.wait_for(lambda: "storm done" in m.console(), "the storm to finish")
    assert q.cmd("query-named-block-nodes")[1]["write_threshold"] == 0  # disarmed
    later = [e["event"] for e in q.get_events(wait=False)]
    assert "BLOCK_WRITE_THRESHOLD" not in later, later
    parent = q.cmd("query-blockstats")[0]["parent"]
    assert parent["node-name"] == file["node-name"]
    high = parent["stats"]["wr_highest_offset"]
    assert size + ev["amount-exceeded"] <= high <= os.path.getsize(img), (high, size)
    # Each node's own, as query-nodes lists them: the file's and the guest's.
    flat = {e["node-name"]: e for e in q.cmd("query-blockstats", **{"query-nodes": True})}
    assert flat[file["node-name"]]["stats"]["wr_highest_offset"] == high
    guest = q.cmd("query-blockstats")[0]["stats"]["wr_highest_offset"]
    assert flat[fmt["node-name"]]["stats"]["wr_highest_offset"] == guest > 0
    assert flat[fmt["node-name"]]["parent"]["node-name"] == file["node-name"]
    q.close()


def test_write_threshold_on_a_data_file_node(moat, tmp_path):
    """An image with an external data file: the guest's data goes to the
    data file, which is the node QEMU counts writes on (query-blockstats'
    parent). A threshold on the data file's node fires on the guest's
    writes; one on the image's own file (its metadata) is refused, since
    moat does not watch that file."""
    img, data = tmp_path / "d.qcow2", tmp_path / "d.data"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on",
                    str(img), "4M"], check=True)
    m = moat(append="blk=1 blk_storm=50 blk_noflush=1 action=count", paused=True,
             extra=["-drive", f"file={img},format=qcow2,if=none,id=d0,data-file.filename={data}",
                    "-device", "virtio-blk-device,drive=d0"])
    q = connect(m)
    data_node, fmt, file = q.cmd("query-named-block-nodes")
    assert [n["file"] for n in (data_node, fmt, file)] == [str(data), str(img), str(img)]
    with pytest.raises(ExecuteError, match="set the threshold on the data file's node"):
        q.cmd("block-set-write-threshold", **{"node-name": file["node-name"], "write-threshold": 1})
    q.cmd("block-set-write-threshold", **{"node-name": data_node["node-name"], "write-threshold": 1})
    q.cmd("cont")
    ev = event(q, "BLOCK_WRITE_THRESHOLD")["data"]
    assert ev["node-name"] == data_node["node-name"] and ev["write-threshold"] == 1, ev
    m.wait_for(lambda: "storm done" in m.console(), "the storm to finish")
    parent = q.cmd("query-blockstats")[0]["parent"]
    assert parent["node-name"] == data_node["node-name"]
    assert 0 < parent["stats"]["wr_highest_offset"] <= 4 << 20, parent
    q.close()


def test_block_set_io_throttle(moat, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (4 << 20))
    # The guest writes 4 KiB blocks without end; the drive starts held to
    # two write operations a second.
    m = moat(append="blk=1 blk_storm=300 blk_noflush=1 action=count",
             extra=["-drive", f"file={img},format=raw,if=none,id=disk0,throttling.iops-write=2",
                    "-device", "virtio-blk-device,drive=disk0"])
    q = connect(m)
    ins = q.cmd("query-block")[0]["inserted"]
    assert (ins["iops_wr"], ins["bps"], ins["group"]) == (2, 0, "disk0")
    assert "iops_wr_max" not in ins

    def writes():
        return q.cmd("query-blockstats")[0]["stats"]["wr_operations"]

    # Held: over a measured interval no more than the rate (plus the
    # initial bucket) gets through. A slow host only lowers the count.
    t0, w0 = time.monotonic(), writes()
    time.sleep(1.5)
    t1, w1 = time.monotonic(), writes()
    assert w1 - w0 <= 2 * (t1 - t0) + 2, (w0, w1, t1 - t0)
    assert "storm done" not in m.console()

    q.cmd("block_set_io_throttle", device="disk0", bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0,
          iops_wr=100, iops_wr_max=200, iops_wr_max_length=3, iops_size=8192)
    ins = q.cmd("query-block")[0]["inserted"]
    assert (ins["iops_wr"], ins["iops_wr_max"], ins["iops_wr_max_length"], ins["iops_size"]) == (100, 200, 3, 8192)
    assert "bps_max" not in ins

    for bad, msg in [
        (dict(bps=10, bps_rd=5), "cannot be used at the same time"),
        (dict(bps_max=10), "require corresponding"),
        (dict(bps=10, bps_max=5), "cannot be lower"),
        (dict(bps=10, bps_max_length=2), "burst length set without burst rate"),
        (dict(iops_size=512), "iops size requires an iops value"),
        (dict(bps=-1), "must be within"),
    ]:
        args = dict(device="disk0", bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
        args.update(bad)
        with pytest.raises(ExecuteError) as e:
            q.cmd("block_set_io_throttle", **args)
        assert e.value.error_class == "GenericError" and msg in e.value.error.error.desc, bad
    with pytest.raises(ExecuteError) as e:
        q.cmd("block_set_io_throttle", device="nope", bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
    assert e.value.error_class == "DeviceNotFound"
    with pytest.raises(ExecuteError) as e:
        q.cmd("block_set_io_throttle", device="disk0", bps=0)
    assert "Parameter 'bps_rd' is missing" in e.value.error.error.desc

    # All zero lifts the limits: the storm runs to its end.
    q.cmd("block_set_io_throttle", device="disk0", bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
    ins = q.cmd("query-block")[0]["inserted"]
    assert ins["iops_wr"] == 0 and "group" not in ins
    m.wait_for(lambda: "storm done" in m.console(), "the storm to finish")
    assert writes() >= 300
    q.close()


def test_block_set_write_threshold(moat, tmp_path):
    """QEMU's write threshold: the first write, write-zeroes or discard
    ending past it raises BLOCK_WRITE_THRESHOLD once and disarms it."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (4 << 20))
    m = moat(append="blk=1 blk_storm=300 blk_noflush=1 action=count", paused=True,
             extra=["-drive", f"file={img},format=raw,if=none,id=disk0",
                    "-device", "virtio-blk-device,drive=disk0"])
    q = connect(m)
    node = q.cmd("query-block")[0]["inserted"]["node-name"]
    file_node = q.cmd("query-named-block-nodes")[1]["node-name"]  # the raw image's file
    assert q.cmd("query-named-block-nodes")[0]["write_threshold"] == 0
    with pytest.raises(ExecuteError) as e:
        q.cmd("block-set-write-threshold", **{"node-name": "nope", "write-threshold": 1})
    assert e.value.error_class == "GenericError"
    assert e.value.error.error.desc == "Device 'nope' not found"
    threshold = (2 << 20) + 100
    q.cmd("block-set-write-threshold", **{"node-name": node, "write-threshold": threshold})
    assert q.cmd("query-named-block-nodes")[0]["write_threshold"] == threshold
    assert q.cmd("query-block")[0]["inserted"]["write_threshold"] == threshold
    # The protocol node (a raw image's file offsets are the guest's) has its own.
    file_threshold = (3 << 20) + 7
    q.cmd("block-set-write-threshold", **{"node-name": file_node, "write-threshold": file_threshold})
    assert q.cmd("query-named-block-nodes")[1]["write_threshold"] == file_threshold
    assert q.cmd("query-named-block-nodes")[0]["write_threshold"] == threshold

    def first_past(t):
        # The guest's storm, replayed: 4 KiB writes at xorshift32 blocks.
        x = 1
        for i in range(300):
            x ^= (x << 13) & 0xFFFFFFFF
            x ^= x >> 17
            x ^= (x << 5) & 0xFFFFFFFF
            end = (x % 1024) * 4096 + 4096
            if end > t:
                return i, end

    q.cmd("cont")
    # One event each, in the order the writes pass them (the drive's node
    # first when one write passes both).
    want = sorted([(first_past(threshold), 0, node, threshold),
                   (first_past(file_threshold), 1, file_node, file_threshold)])
    evs = [event(q, "BLOCK_WRITE_THRESHOLD")["data"] for _ in want]
    assert evs == [{"node-name": n, "amount-exceeded": end - t, "write-threshold": t}
                   for (_, end), _, n, t in want], evs
    m.wait_for(lambda: "storm done" in m.console(), "the storm to finish")
    # Disarmed: later writes past it raised nothing more (events come
    # before the reply that follows them).
    assert q.cmd("query-named-block-nodes")[0]["write_threshold"] == 0
    assert q.cmd("query-named-block-nodes")[1]["write_threshold"] == 0
    later = [e["event"] for e in q.get_events(wait=False)]
    assert "BLOCK_WRITE_THRESHOLD" not in later, later
    q.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_block_io_error_event(moat, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        img = mnt / "disk.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)  # sparse: the guest's writes fill the tmpfs
        # werror=report (the default, enospc, stops the VM: see
        # tests/virtio_blk.rs).
        m = moat(append="blk=1 blk_storm=2000 action=count",
                 extra=["-drive", f"file={img},format=raw,if=none,id=disk0,werror=report",
                        "-device", "virtio-blk-device,drive=disk0"])
        q = connect(m)
        ev = event(q, "BLOCK_IO_ERROR")
        assert ev["data"] == {"device": "disk0", "node-name": "#block001", "operation": "write",
                              "action": "report", "nospace": True,
                              "reason": "No space left on device"}, ev
        # The guest got an I/O error status, and keeps running.
        m.wait_for(lambda: "storm write" in m.console() and m.count() > 0, "the guest to go on")
        assert q.cmd("query-status")["status"] == "running"
        assert q.cmd("query-blockstats")[0]["stats"]["failed_wr_operations"] >= 1
        q.close()
        m.kill()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def fnv1a(data):
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def test_drives_from_fd_sets(moat, tmp_path):
    """-add-fd + file=/dev/fdset/N: moat uses the descriptors it was handed;
    the files are unlinked before it starts, so no path could reach them."""
    data = bytes((i * 37 + 11) & 0xFF for i in range(1 << 20))
    rw_path, ro_path = tmp_path / "rw.img", tmp_path / "ro.img"
    rw_path.write_bytes(data)
    ro_path.write_bytes(data[::-1])
    rw = os.open(rw_path, os.O_RDWR)
    ro = os.open(ro_path, os.O_RDONLY)
    os.unlink(rw_path)
    os.unlink(ro_path)
    m = moat(append=f"blk=2 blk_len=65536 blk_sum={fnv1a(data[:65536]):#x} blk_write=1 blk_ro=1 action=count",
             extra=["-add-fd", f"fd={rw},set=1,opaque=rw-disk", "-add-fd", f"fd={ro},set=2",
                    "-drive", "file=/dev/fdset/1,format=raw,if=virtio",
                    "-drive", "file=/dev/fdset/2,format=raw,if=virtio,readonly=on"],
             pass_fds=(rw, ro))
    q = connect(m)
    m.wait_for(lambda: m.count() > 0, "the guest's disk checks")
    assert "FAIL" not in m.console(), m.console()
    sets = q.cmd("query-fdsets")
    assert [s["fdset-id"] for s in sets] == [1, 2]
    assert sets[0]["fds"][0]["opaque"] == "rw-disk" and "opaque" not in sets[1]["fds"][0]
    assert q.cmd("query-block")[0]["inserted"]["file"] == "/dev/fdset/1"
    # The guest's write (sectors 8..15) reached the unlinked file.
    got = os.pread(rw, 4096, 4096)
    assert got == bytes((i * 7 + 3) & 0xFF for i in range(4096))
    q.close()
    m.kill()
    # A read-write drive from a set that only has a read-only descriptor,
    # a missing set, and a close-on-exec (moat-internal) fd are refused.
    for extra, want in [
        (["-add-fd", f"fd={ro},set=2", "-drive", "file=/dev/fdset/2,format=raw"], "Permission denied"),
        (["-drive", "file=/dev/fdset/7,format=raw"], "No such file"),
    ]:
        p = subprocess.run([MOAT, "-kernel", GUEST] + extra, pass_fds=(ro,),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and want in p.stderr, (extra, p.stderr)
    p = subprocess.run([MOAT, "-kernel", GUEST, "-add-fd", f"fd={ro},set=1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "not valid or already in use" in p.stderr, p.stderr
    os.close(rw)
    os.close(ro)


def qmp_error(q, cmd, **args):
    with pytest.raises(ExecuteError) as e:
        q.cmd(cmd, **args)
    return e.value.error.error.desc


def test_blockdev_add_and_del(moat, tmp_path):
    """blockdev-add opens a node (microvm has no hotplug, so no device uses
    it, as with QEMU's microvm); query-named-block-nodes lists it with the
    -drive nodes; blockdev-del closes it. Errors as QEMU words them."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * (1 << 20))
    extra = tmp_path / "extra.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "4M"], check=True)
    based = tmp_path / "based.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(disk),
                    str(based)], check=True)
    m = moat(extra=["-drive", f"file={disk},format=raw,if=virtio", "-sandbox", "off"])
    q = connect(m)
    q.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "extra0", "read-only": True,
                             "file": {"driver": "file", "filename": str(extra)}})
    q.cmd("blockdev-add", **{"driver": "file", "node-name": "plain", "filename": str(disk)})
    nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}
    assert nodes["extra0"]["drv"] == "qcow2" and nodes["extra0"]["ro"] is True
    assert nodes["extra0"]["image"]["virtual-size"] == 4 << 20
    assert nodes["extra0"]["file"] == str(extra)
    assert nodes["plain"]["drv"] == "file" and nodes["plain"]["ro"] is False
    assert "#block001" in nodes  # the -drive's node
    for args, want in [
        ({"driver": "raw", "node-name": "extra0", "file": {"driver": "file", "filename": str(disk)}},
         "Duplicate nodes with node-name='extra0'"),
        ({"driver": "raw", "file": {"driver": "file", "filename": str(disk)}},
         "'node-name' must be specified for the root node"),
        ({"driver": "raw", "node-name": "1bad", "file": {"driver": "file", "filename": str(disk)}},
         "Invalid node-name: '1bad'"),
        ({"driver": "raw", "node-name": "n", "file": {"driver": "file", "filename": str(tmp_path / "nope")}},
         f"Could not open '{tmp_path / 'nope'}': No such file or directory"),
        ({"driver": "vmdk", "node-name": "n", "file": {"driver": "file", "filename": str(disk)}},
         "Parameter 'driver' does not accept value 'vmdk'"),
        ({"driver": "raw", "node-name": "n", "file": {"driver": "file", "filename": str(disk), "x": 1}},
         "Parameter 'file.x' is unexpected"),
        # moat opens nothing an image names by itself: the backing is named, or null.
        ({"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": str(based)}},
         "backing"),
    ]:
        assert want in qmp_error(q, "blockdev-add", **args), args
    q.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "based", "read-only": True, "backing": None,
                             "file": {"driver": "file", "filename": str(based)}})
    q.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "chain", "read-only": True,
                             "file": {"driver": "file", "filename": str(based)},
                             "backing": {"driver": "raw", "file": {"driver": "file", "filename": str(disk)}}})
    assert {n["node-name"]: n for n in q.cmd("query-named-block-nodes")}["chain"]["backing_file_depth"] == 1
    assert qmp_error(q, "blockdev-del", **{"node-name": "#block001"}) == "Node #block001 is in use"
    assert qmp_error(q, "blockdev-del", **{"node-name": "zzz"}) == "Failed to find node with node-name='zzz'"
    q.cmd("blockdev-del", **{"node-name": "extra0"})
    assert "extra0" not in {n["node-name"] for n in q.cmd("query-named-block-nodes")}
    held = [os.readlink(p) for p in glob_fds(m.proc.pid)]
    assert str(extra) not in held  # closed
    q.close()


def glob_fds(pid):
    import glob
    return glob.glob(f"/proc/{pid}/fd/*")


def test_sockets_are_removed_at_exit(moat, tmp_path):
    """As QEMU does: the monitor's socket file goes when moat exits (with
    the sandbox on, Landlock lets moat remove files in that directory)."""
    m = moat(hmp=True)
    q = connect(m)
    assert os.path.exists(m.qmp_path) and os.path.exists(m.hmp_path)
    q.cmd("quit")
    assert m.wait_exit() == 0
    assert not os.path.exists(m.qmp_path) and not os.path.exists(m.hmp_path)


def test_monitor_on_an_inherited_socket(moat, tmp_path):
    """-chardev socket,fd=N (how libvirt hands QEMU its monitor): a listening
    UNIX socket made by the parent; moat never needs the path. A descriptor
    that is not one is refused."""
    path = str(tmp_path / "passed.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    fd = lsock.fileno()
    m = moat(qmp=False, pass_fds=(fd,),
             extra=["-chardev", f"socket,id=mon0,fd={fd},server=on,wait=off",
                    "-mon", "chardev=mon0,mode=control"])
    lsock.close()
    q = QEMUMonitorProtocol(path)
    q.connect(negotiate=True)
    q.settimeout(30)
    assert q.cmd("query-status")["status"] == "running"
    q.cmd("quit")
    assert m.wait_exit() == 0  # (no close(): moat hangs up as it exits, as QEMU does)
    assert os.path.exists(path)  # the caller's socket file: moat leaves it
    f = open(tmp_path / "plain", "w")
    for extra, pass_fds, want in [
        ([f"socket,id=mon0,fd={f.fileno()},server=on"], (f.fileno(),), "not a socket"),
        (["socket,id=mon0,fd=77,server=on"], (), "not valid"),
        (["socket,id=mon0,fd=x,server=on"], (), "expected the number"),
    ]:
        p = subprocess.run([MOAT, "-kernel", GUEST, "-chardev"] + extra + ["-mon", "chardev=mon0"],
                           capture_output=True, text=True, timeout=60, pass_fds=pass_fds)
        assert p.returncode == 1 and want in p.stderr, (extra, p.stderr)
    f.close()


def test_kernel_from_an_fd_set(tmp_path):
    """-kernel and -initrd accept /dev/fdset/N too: the guest boots from a
    descriptor of a file moat is never told the path of."""
    k = open(GUEST, "rb")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"moat" * 1000)
    i = open(initrd, "rb")
    serial = tmp_path / "serial.log"
    p = subprocess.run([MOAT, "-add-fd", f"fd={k.fileno()},set=1", "-add-fd", f"fd={i.fileno()},set=2",
                        "-kernel", "/dev/fdset/1", "-initrd", "/dev/fdset/2",
                        "-append", "initrd_len=4000 action=poweroff", "-serial", f"file:{serial}"],
                       capture_output=True, text=True, timeout=60, pass_fds=(k.fileno(), i.fileno()))
    assert p.returncode == 0, p.stderr
    out = serial.read_text()
    assert "RESULT: PASS" in out and "FAIL" not in out, out
    k.close()
    i.close()
