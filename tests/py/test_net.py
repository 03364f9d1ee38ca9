"""virtio-net against a real moat and the Tier 1 guest's driver (guests/c/net.c):
frames echoed over a stream socket (QEMU's -netdev stream framing, the peer
played by the test) and over real taps; a hostile guest and a hostile peer;
rate limits measured; set_link, query-rx-filter, NIC_RX_FILTER_CHANGED and
moat's rate-limit command over QMP."""
import asyncio
import fcntl
import os
import select
import socket
import struct
import subprocess
import time

import pytest
from conftest import GUEST, MOAT
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("02aabbccddee")
OURS = b"\x88\xb5"  # the guest's own ethertype (IEEE local experimental)
TX_CUT = 2048 - 12  # the guest echoes at most one transmit buffer


def connect(m):
    q = QEMUMonitorProtocol(m.qmp_path)
    q.connect(negotiate=True)
    q.settimeout(30)
    return q


def events(q, name, wait=0.5):
    """The `name` events that arrive within `wait` seconds."""
    got = []
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            ev = q.pull_event(wait=max(0.01, end - time.monotonic()))
        except asyncio.TimeoutError:
            break
        if ev and ev["event"] == name:
            got.append(ev)
    return got


class Peer:
    """The other end of -netdev stream: a listening UNIX socket; frames
    behind a 4-byte big-endian length, as passt speaks."""

    def __init__(self, path):
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.sock = None
        self.buf = b""

    def netdev(self, id="n0"):
        return f"stream,id={id},server=off,addr.type=unix,addr.path={self.path}"

    def accept(self):
        self.sock, _ = self.listener.accept()

    def send(self, frame):
        self.sock.sendall(struct.pack(">I", len(frame)) + frame)

    def recv(self, timeout=30):
        """The next frame, or None after `timeout` seconds."""
        end = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    f, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return f
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                d = self.sock.recv(1 << 20)
            except socket.timeout:
                return None
            if not d:
                return None
            self.buf += d

    def drain(self, quiet=1.0):
        """Drop what comes until nothing has for `quiet` seconds."""
        while self.recv(quiet) is not None:
            pass


def frame(payload, kind=b"\x08\x00"):
    return GUEST_MAC + HOST_MAC + kind + payload


def ours(word):
    return frame(word, OURS)


def echoed(f):
    return f[6:12] + f[0:6] + f[12:TX_CUT]


def start(moat, tmp_path, append, device="virtio-net-device,netdev=n0,id=net0", extra=()):
    peer = Peer(tmp_path / "passt.sock")
    m = moat(append=append, extra=["-netdev", peer.netdev(), "-device", device, *extra])
    peer.accept()
    m.wait_for(lambda: "net: echo ready" in m.console() or "net: flooding" in m.console(),
               "the guest's driver")
    return m, peer


def test_a_hostile_guest_then_frames_of_every_size_echo_whole(moat, tmp_path):
    """The guest attacks the device (looping, out-of-RAM, short, oversized
    and write-only transmit chains; bad control commands; a notify storm; a
    head index beyond the ring, which must bring DEVICE_NEEDS_RESET); then
    frames from 15 bytes to the 65550-byte maximum (spread over 33 receive
    buffers by MRG_RXBUF) come back intact. A zero-length frame from the
    peer is skipped."""
    m, peer = start(moat, tmp_path, "net=1 net_hostile=1 net_echo=1 action=poweroff")
    assert "net: hostile done" in m.console()
    peer.drain()  # what the attacks sent (the looping chain is a frame)
    sizes = [1, 46, 100, 1500, 2036, 2037, 4000, 9000, 65550 - 14]
    for i, n in enumerate(sizes):
        f = frame(bytes((i * 31 + k) % 251 for k in range(n)))
        peer.send(f)
        if i == 2:
            peer.sock.sendall(struct.pack(">I", 0))  # an empty frame: skipped
        got = peer.recv()
        assert got == echoed(f), f"frame of {len(f)} bytes: got {None if got is None else len(got)}"
    peer.send(ours(b"STOP"))
    assert m.wait_exit() == 0
    out = m.console()
    assert f"net: echoed {len(sizes)} frames" in out and "RESULT: PASS" in out, out


def test_without_mergeable_buffers_a_frame_too_big_for_one_buffer_is_dropped(moat, tmp_path):
    """No MRG_RXBUF: each frame must fit one 16 KiB receive buffer; a larger
    one is dropped (the buffer returned empty) and the next one still comes."""
    m, peer = start(moat, tmp_path, "net=1 net_nomrg=1 net_bigrx=1 net_echo=1 action=poweroff")
    small, big = frame(b"a" * 9000), frame(b"b" * 20000)
    peer.send(small)
    assert peer.recv() == echoed(small)
    peer.send(big)
    peer.send(small)
    assert peer.recv() == echoed(small), "the frame after a dropped one was lost"
    peer.send(ours(b"STOP"))
    assert m.wait_exit() == 0
    assert "net: echoed 2 frames" in m.console(), m.console()


def test_a_peer_that_breaks_the_framing_takes_the_link_down(moat, tmp_path):
    """A length beyond any frame ends the connection: moat says so once, the
    guest sees the link go down, and moat and the guest go on."""
    m, peer = start(moat, tmp_path, "net=1 net_echo=1", extra=["-qmp", f"unix:{tmp_path}/q.sock,server=on,wait=off"])
    f = frame(b"x" * 100)
    peer.send(f)
    assert peer.recv() == echoed(f)
    peer.sock.sendall(struct.pack(">I", 0x7FFFFFFF) + b"junk")
    m.wait_for(lambda: "net: link down" in m.console(), "the guest to see the link go down")
    q = QEMUMonitorProtocol(str(tmp_path / "q.sock"))
    q.connect(negotiate=True)
    assert q.cmd("query-status")["status"] == "running"
    q.cmd("quit")
    assert m.wait_exit() == 0
    assert m.proc.stderr.read().decode().count("backend failed") == 1


def test_a_stalled_peer_never_blocks_a_vcpu_nor_grows_memory(moat, tmp_path):
    """The peer stops reading while the guest sends flat out: moat keeps one
    frame waiting and takes no more from the guest; its memory stays flat,
    the monitor answers, stop and cont work, and quit ends it at once."""
    m, peer = start(moat, tmp_path, "net=1 net_flood=0 net_size=2000")

    def rss():
        with open(f"/proc/{m.proc.pid}/status") as s:
            return next(int(l.split()[1]) for l in s if l.startswith("VmRSS:"))

    time.sleep(3)
    before = rss()
    time.sleep(5)
    after = rss()
    assert after - before < 2048, f"RSS grew from {before} to {after} KiB with a stalled peer"
    q = connect(m)
    t = time.monotonic()
    q.cmd("stop")
    q.cmd("cont")
    assert q.cmd("query-status")["status"] == "running"
    q.cmd("quit")
    assert m.wait_exit() == 0
    assert time.monotonic() - t < 10
    peer.sock.close()


def rate(peer, seconds=10.0, settle=1.0):
    """Frames and frame bytes per second the peer receives over `seconds`,
    after `settle` seconds (the first bucket's worth)."""
    end_settle = time.monotonic() + settle
    while time.monotonic() < end_settle:
        peer.recv(0.2)
    frames = byts = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        f = peer.recv(max(0.01, end - time.monotonic()))
        if f is not None:
            frames += 1
            byts += len(f)
    return frames / seconds, byts / seconds


def within(got, want, tol=0.05):
    return abs(got - want) <= want * tol


def test_transmit_rate_limits_hold_and_change_live(moat, tmp_path):
    """tx-bps on the command line: a guest sending flat out (about 120
    frames/s unlimited here) gets 20000 bytes/s, within 5% over 10 s; moat's
    QMP command then sets 30 packets/s instead, and that holds too."""
    peer = Peer(tmp_path / "passt.sock")
    m = moat(append="net=1 net_flood=0 net_size=500",
             extra=["-netdev", peer.netdev(), "-device", "virtio-net-device,netdev=n0,id=net0,tx-bps=20000"])
    peer.accept()
    fps, bps = rate(peer)
    assert within(bps, 20000), f"{bps} bytes/s, limit 20000"
    q = connect(m)
    q.cmd("__dev.moat_set-net-rate-limit", **{"name": "net0", "tx-pps": 30})
    info = q.cmd("__dev.moat_query-net-rate-limits")
    assert info[0]["tx"] == {"bps": 0, "bps-burst": 0, "pps": 30, "pps-burst": 0}, info
    assert info[0]["tx-frames"] > 0
    fps, bps = rate(peer)
    assert within(fps, 30), f"{fps} frames/s, limit 30"
    with pytest.raises(ExecuteError, match="Device 'nope' not found"):
        q.cmd("__dev.moat_set-net-rate-limit", **{"name": "nope", "tx-pps": 1})
    q.cmd("quit")
    assert m.wait_exit() == 0


def test_receive_rate_limit_holds(moat, tmp_path):
    """rx-pps: the peer sends flat out, the guest echoes what it gets: 20
    frames/s reach it, within 5% over 10 s."""
    m, peer = start(moat, tmp_path, "net=1 net_echo=1",
                    device="virtio-net-device,netdev=n0,rx-pps=20")
    sock = peer.sock
    sock.setblocking(False)
    f = frame(b"r" * 200)
    wire = struct.pack(">I", len(f)) + f
    out, inbuf, times = b"", b"", []
    end = time.monotonic() + 12.5
    while time.monotonic() < end:
        r, w, _ = select.select([sock], [sock], [], 0.1)
        if w:
            if not out:
                out = wire * 16
            try:
                out = out[sock.send(out):]
            except BlockingIOError:
                pass
        if r:
            inbuf += sock.recv(1 << 20)
            while len(inbuf) >= 4 and len(inbuf) >= 4 + struct.unpack(">I", inbuf[:4])[0]:
                n = struct.unpack(">I", inbuf[:4])[0]
                inbuf = inbuf[4 + n:]
                times.append(time.monotonic())
    assert times, "nothing came back"
    # After the first bucket's worth: 10 s.
    t0 = times[0] + 1
    fps = sum(1 for t in times if t0 <= t < t0 + 10) / 10
    assert within(fps, 20), f"{fps} frames/s, limit 20"


def test_set_link_rx_filter_and_its_event(moat, tmp_path):
    """As QEMU 7.2 answers for a virtio-net-device: set_link by the NIC's or
    the netdev's name (the guest sees it; frames are dropped while down);
    query-rx-filter after the guest's filter commands; NIC_RX_FILTER_CHANGED
    once until the filter is queried."""
    m, peer = start(moat, tmp_path, "net=1 net_echo=1",
                    extra=["-qmp", f"unix:{tmp_path}/q.sock,server=on,wait=off"])
    q = QEMUMonitorProtocol(str(tmp_path / "q.sock"))
    q.connect(negotiate=True)
    q.settimeout(30)
    [f0] = q.cmd("query-rx-filter")
    assert f0["name"] == "net0" and f0["main-mac"] == "52:54:00:12:34:56"
    assert (f0["promiscuous"], f0["unicast"], f0["multicast"], f0["vlan"]) == (True, "normal", "normal", "all")
    assert len(f0["vlan-table"]) == 4096 and f0["unicast-table"] == [] and f0["broadcast-allowed"] is False

    q.cmd("set_link", **{"name": "net0", "up": False})
    m.wait_for(lambda: "net: link down" in m.console(), "link down in the guest")
    peer.send(frame(b"lost"))
    assert peer.recv(2) is None, "a frame went through a link that is down"
    q.cmd("set_link", **{"name": "n0", "up": True})
    m.wait_for(lambda: "net: link up" in m.console(), "link up in the guest")
    f = frame(b"after")
    peer.send(f)
    assert peer.recv() == echoed(f)

    peer.send(ours(b"FILTER"))
    m.wait_for(lambda: "net: filters set" in m.console(), "the guest's filter commands")
    peer.drain(0.5)
    evs = events(q, "NIC_RX_FILTER_CHANGED", 1.0)
    assert [e["data"] for e in evs] == [{"name": "net0", "path": "/machine/peripheral/net0"}], evs
    [f1] = q.cmd("query-rx-filter", **{"name": "net0"})
    assert (f1["promiscuous"], f1["multicast"], f1["unicast"]) == (False, "all", "normal")
    assert f1["unicast-table"] == ["02:00:00:00:00:01"]
    assert f1["multicast-table"] == ["01:00:5e:00:00:01", "33:33:00:00:00:01"]
    peer.send(ours(b"FILTER2"))
    m.wait_for(lambda: "net: mac set" in m.console(), "the guest's MAC change")
    assert len(events(q, "NIC_RX_FILTER_CHANGED", 1.0)) == 1
    assert q.cmd("query-rx-filter")[0]["main-mac"] == "52:54:00:00:00:99"

    for cmd, args, err in [
        ("set_link", {"name": "zz", "up": False}, "Device 'zz' not found"),
        ("query-rx-filter", {"name": "n0"}, r"net client\(n0\) isn't a NIC"),
        ("query-rx-filter", {"name": "zz"}, "invalid net client name: zz"),
    ]:
        with pytest.raises(ExecuteError, match=err):
            q.cmd(cmd, **args)
    names = [c["name"] for c in q.cmd("query-commands")]
    assert {"set_link", "query-rx-filter", "__dev.moat_set-net-rate-limit"} <= set(names)
    q.cmd("quit")
    assert m.wait_exit() == 0


def test_a_reset_mid_traffic_recovers(moat, tmp_path):
    """The guest resets and re-initialises the device while frames flow;
    afterwards frames echo again."""
    m, peer = start(moat, tmp_path, "net=1 net_echo=1 action=poweroff")
    for i in range(5):
        peer.send(frame(bytes([i]) * 300))
    peer.send(ours(b"RESET"))
    for i in range(5):
        peer.send(frame(bytes([i]) * 300))
    m.wait_for(lambda: "net: reinit" in m.console(), "the guest's re-init")
    peer.drain()
    f = frame(b"after the reset")
    peer.send(f)
    assert peer.recv() == echoed(f)
    peer.send(ours(b"STOP"))
    assert m.wait_exit() == 0
    assert "RESULT: PASS" in m.console()


# --- taps (root: creating a tap needs CAP_NET_ADMIN) ---

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000
ETH_P_ALL = 0x0003


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def tap_name():
    if os.geteuid() != 0:
        pytest.fail("tap tests need root (CAP_NET_ADMIN); run the suite as the README says")
    name = f"mt{os.getpid() % 10000}"
    yield name
    subprocess.run(["ip", "link", "del", name], capture_output=True)


class TapPeer:
    """The host side of a tap: raw frames in and out through AF_PACKET."""

    def __init__(self, name):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((name, 0))

    def send(self, f):
        self.sock.send(f)

    def recv(self, timeout=30):
        """The next frame the guest sent (not our own outgoing ones)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, addr = self.sock.recvfrom(1 << 16)
            except socket.timeout:
                return None
            if addr[2] != socket.PACKET_OUTGOING and data[:6] == HOST_MAC:
                return data
        return None


def udp_frame(sport, payload):
    """IPv4/UDP, so the tap spreads flows over its queues by their hash."""
    udp = struct.pack(">HHHH", sport, 9999, 8 + len(payload), 0) + payload
    iph = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                      bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return frame(iph + udp)


def test_a_multiqueue_tap_uses_both_queue_pairs(moat, tap_name):
    """-netdev tap,queues=2 and mq=on: the guest enables two queue pairs
    (VQ_PAIRS_SET), flows from the host spread over both, and every frame
    comes back through the tap."""
    ip("tuntap", "add", "dev", tap_name, "mode", "tap", "multi_queue")
    ip("link", "set", tap_name, "up")
    peer = TapPeer(tap_name)
    m = moat(append="net=1 net_pairs=2 net_echo=1 action=poweroff",
             extra=["-smp", "2", "-netdev", f"tap,id=n0,ifname={tap_name},queues=2,script=no,downscript=no",
                    "-device", "virtio-net-device,netdev=n0,mq=on"])
    m.wait_for(lambda: "net: echo ready" in m.console(), "the guest's driver")
    assert "pairs 2/2" in m.console(), m.console()
    for sport in range(1000, 1064):
        f = udp_frame(sport, b"q" * 64)
        peer.send(f)
        assert peer.recv() == echoed(f), f"flow {sport} did not come back"
    peer.send(ours(b"STOP"))
    assert m.wait_exit() == 0
    out = m.console()
    line = next(l for l in out.splitlines() if l.startswith("net: echoed"))
    # "net: echoed 64 frames (pair 0: A, pair 1: B)"
    a, b = (int(x) for x in line.replace(")", "").split("pair 0: ")[1].split(", pair 1: "))
    assert a > 0 and b > 0, line


def hmp(q, line):
    return q.cmd("human-monitor-command", **{"command-line": line})


def test_info_network_prints_as_qemus(moat, tap_name, tmp_path):
    """HMP's info network: each NIC queue (an id-less NIC's named
    virtio-net-device.N, N counting the queues made before it) and its
    netdev's below it, for a multiqueue tap by name, a stream to a peer
    and a NIC with an id: the text QEMU prints for the same options."""
    ip("tuntap", "add", "dev", tap_name, "mode", "tap", "multi_queue")
    args = ["-smp", "2", "-netdev", f"tap,id=n0,ifname={tap_name},queues=2,script=no,downscript=no",
            "-device", "virtio-net-device,netdev=n0,mq=on"]
    peers = [Peer(tmp_path / f"peer{i}.sock") for i in range(2)]
    texts = []
    for who, peer in zip(["moat", "qemu"], peers):
        extra = args + ["-netdev", peer.netdev("n1"), "-device", "virtio-net-device,netdev=n1,id=nic1",
                        "-device", "virtio-net-device,netdev=n2", "-netdev", peer.netdev("n2")]
        if who == "moat":
            m = moat(paused=True, extra=extra)
            peer.accept()
            q = connect(m)
        else:
            sock = tmp_path / "qemu.sock"
            proc = subprocess.Popen(["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-display", "none",
                                     "-S", "-qmp", f"unix:{sock},server=on,wait=off", *extra],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            peer.accept()
            while not sock.exists():
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
            q = QEMUMonitorProtocol(str(sock))
            q.connect(negotiate=True)
        # (QEMU names the stream's peer once connected; the peer accepted.)
        time.sleep(0.5)
        texts.append(hmp(q, "info network").replace(str(peer.path), "PEER"))
        q.close()
        if who == "qemu":
            proc.kill()
            proc.wait()
    assert texts[0] == texts[1], texts
    assert f"ifname={tap_name},script=no,downscript=no" in texts[0], texts[0]
    # (The third NIC's name counts the two queues before it and nic1's.)
    assert "virtio-net-device.3: index=0,type=nic,model=virtio-net-device" in texts[0], texts[0]


def test_a_tap_handed_in_as_a_descriptor(moat, tap_name):
    """libvirt's way: the caller opens the tap (with IFF_VNET_HDR) and passes
    the descriptor; moat needs no CAP_NET_ADMIN for it and echoes through it.
    A descriptor that is not a tap is refused by name."""
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", tap_name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    ip("link", "set", tap_name, "up")
    peer = TapPeer(tap_name)
    m = moat(append="net=1 net_echo=1 action=poweroff", pass_fds=(tun,),
             extra=["-netdev", f"tap,id=n0,fd={tun}", "-device", "virtio-net-device,netdev=n0"])
    os.close(tun)
    m.wait_for(lambda: "net: echo ready" in m.console(), "the guest's driver")
    for n in (60, 1500):
        f = frame(b"t" * n)
        peer.send(f)
        assert peer.recv() == echoed(f)
    peer.send(ours(b"STOP"))
    assert m.wait_exit() == 0
    with open(os.devnull) as null:
        r = subprocess.run([MOAT, "-kernel", GUEST, "-netdev", f"tap,id=n0,fd={null.fileno()}",
                            "-device", "virtio-net-device,netdev=n0"],
                           capture_output=True, text=True, timeout=60, pass_fds=(null.fileno(),))
    assert r.returncode == 1 and "not a tap device" in r.stderr, r.stderr


def test_refusals_reach_the_user(tmp_path):
    for args, want in [
        (["-netdev", "user,id=n0"], "passt"),
        (["-netdev", "tap,id=n0,script=/etc/qemu-ifup"], "never runs scripts"),
        (["-netdev", "tap,id=n0,vhost=on"], "vhost-net"),
        (["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={tmp_path}/none",
          "-device", "virtio-net-device,netdev=n0"], "connect to"),
    ]:
        r = subprocess.run([MOAT, "-kernel", GUEST, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and want in r.stderr, (args, r.stderr)
