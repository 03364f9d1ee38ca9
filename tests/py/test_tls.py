"""TCP monitors: TLS with client certificates (generated here with openssl)
and authorization of the certificate's distinguished name."""
import json
import socket
import ssl
import subprocess
import threading
import time

import pytest

from conftest import GUEST, MOAT, Moat


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Moat Test CA",
            "-keyout", "ca-key.pem", "-out", "ca-cert.pem", cwd=d)
    # X.509 v3 certificates with the extensions QEMU's TLS documentation gives them.
    (d / "server.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=clientAuth\n")

    def leaf(name, subj, ca="ca", ext="client.ext"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj, "-keyout", f"{name}-key.pem",
                "-out", f"{name}.csr", cwd=d)
        args = ["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
                "-CAcreateserial", "-days", "2", "-out", f"{name}-cert.pem"]
        openssl(*args, "-extfile", ext, cwd=d)

    leaf("server", "/CN=localhost", ext="server.ext")
    leaf("alice", "/C=GB/O=Moat Test/CN=alice")
    leaf("bob", "/C=GB/O=Moat Test/CN=bob")
    leaf("mallory", "/C=GB/O=Moat Test/CN=mallory")
    # eve's certificate chains to a CA the server does not trust.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Evil CA",
            "-keyout", "evil-key.pem", "-out", "evil-cert.pem", cwd=d)
    leaf("eve", "/C=GB/O=Moat Test/CN=alice", ca="evil")
    return d


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


STARTED = []


@pytest.fixture(autouse=True)
def kill_started():
    yield
    while STARTED:
        STARTED.pop().kill()


def start(tmp_path, pki, authz, wait="off"):
    port = free_port()
    m = Moat(tmp_path, qmp=False, extra=[
        "-object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=on",
        "-object", authz,
        "-chardev", f"socket,id=mon0,host=127.0.0.1,port={port},server=on,wait={wait},tls-creds=tls0,tls-authz=auth0",
        "-mon", "chardev=mon0,mode=control",
    ])
    STARTED.append(m)

    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    m.wait_for(listening, "the TLS monitor")
    return m, port


def tls_client(pki, port, who):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca-cert.pem")
    if who:
        ctx.load_cert_chain(pki / f"{who}-cert.pem", pki / f"{who}-key.pem")
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    return s


def greeting(s):
    """The first QMP line, or None if the server hung up instead."""
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                return None
            buf += chunk
    except (ssl.SSLError, ConnectionResetError, OSError):
        return None
    return json.loads(buf)


SIMPLE = "authz-simple,id=auth0,identity=CN=alice,,O=Moat Test,,C=GB"


def test_allowed_client_gets_qmp(tmp_path, pki):
    m, port = start(tmp_path, pki, SIMPLE)
    s = tls_client(pki, port, "alice")
    g = greeting(s)
    assert g and "QMP" in g
    f = s.makefile("rwb")
    f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n')
    f.flush()
    assert json.loads(f.readline()) == {"return": {}}
    assert json.loads(f.readline())["return"]["status"] == "running"
    s.close()
    m.kill()


def test_refused_clients(tmp_path, pki):
    m, port = start(tmp_path, pki, SIMPLE)
    # A valid certificate whose DN the policy does not allow.
    assert greeting(tls_client(pki, port, "mallory")) is None
    # No client certificate at all.
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        s = tls_client(pki, port, None)
        if greeting(s) is None:
            raise ssl.SSLError("refused")
    # A certificate with the allowed DN from an untrusted CA.
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        s = tls_client(pki, port, "eve")
        if greeting(s) is None:
            raise ssl.SSLError("refused")
    # Plaintext: never a greeting.
    p = socket.create_connection(("127.0.0.1", port), timeout=30)
    p.sendall(b'{"execute": "qmp_capabilities"}\n')
    data = b""
    try:
        while True:
            chunk = p.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, OSError):
        pass
    assert b"QMP" not in data
    # The allowed client still gets in, and the guest kept running.
    assert greeting(tls_client(pki, port, "alice"))
    before = m.count()
    m.wait_for(lambda: m.count() > before + 5, "the guest to keep running")
    m.kill()


def test_authz_list_json_with_glob(tmp_path, pki):
    policy = ('{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":['
              '{"match":"CN=mallory,O=Moat Test,C=GB","policy":"deny","format":"exact"},'
              '{"match":"CN=*,O=Moat Test,C=GB","policy":"allow","format":"glob"}]}')
    m, port = start(tmp_path, pki, policy)
    assert greeting(tls_client(pki, port, "alice"))
    assert greeting(tls_client(pki, port, "bob"))
    assert greeting(tls_client(pki, port, "mallory")) is None
    m.kill()


def test_openssl_s_client_as_the_client(tmp_path, pki):
    m, port = start(tmp_path, pki, SIMPLE)
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", "-verify_return_error",
         "-CAfile", str(pki / "ca-cert.pem"), "-cert", str(pki / "alice-cert.pem"),
         "-key", str(pki / "alice-key.pem")],
        input=b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n', capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert '"QMP"' in out, r.stderr.decode()
    assert '"return":{}' in out.replace(" ", "")
    assert "host-qmp-quit" in out
    assert m.wait_exit() == 0


def test_bad_tls_setup_is_refused_at_startup(tmp_path, pki):
    port = free_port()
    for objects, want in [
        ([f"tls-creds-x509,id=tls0,dir={tmp_path},endpoint=server,verify-peer=on", SIMPLE], b"ca-cert.pem"),
        ([f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=off", SIMPLE], b"verify-peer=on"),
    ]:
        args = [MOAT, "-kernel", GUEST]
        for o in objects:
            args += ["-object", o]
        args += ["-chardev", f"socket,id=m,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=tls0,tls-authz=auth0",
                 "-mon", "chardev=m,mode=control"]
        r = subprocess.run(args, capture_output=True, timeout=60)
        assert r.returncode == 1, r
        assert want in r.stderr, r.stderr


def test_strangers_holding_connections_do_not_keep_an_authorized_client_out(tmp_path, pki):
    """Twenty connections that never finish a handshake, each sending a byte
    every second: they used to hold all eight client slots (the handshake
    timeout was per read), so alice waited until they gave up."""
    m, port = start(tmp_path, pki, SIMPLE)
    stop = threading.Event()
    strangers = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    # A TLS record header announcing a 16 KiB handshake record, whose body
    # then comes a byte a second: the server can only wait for the rest.
    for s in strangers:
        s.sendall(b"\x16\x03\x01\x40\x00")

    def trickle():
        while not stop.is_set():
            for s in strangers:
                try:
                    s.send(b"\x00")
                except OSError:
                    pass
            time.sleep(1)

    t = threading.Thread(target=trickle)
    t.start()
    try:
        time.sleep(2)
        s = tls_client(pki, port, "alice")
        g = greeting(s)
        assert g and "QMP" in g
        f = s.makefile("rwb")
        f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status"}\n')
        f.flush()
        assert json.loads(f.readline()) == {"return": {}}
        assert json.loads(f.readline())["return"]["status"] == "running"
        s.close()
    finally:
        stop.set()
        t.join()
        for s in strangers:
            s.close()
    m.kill()


def test_wait_on_starts_the_guest_only_for_an_authorized_client(tmp_path, pki):
    m, port = start(tmp_path, pki, SIMPLE, wait="on")
    # A plaintext connection, one that says nothing, and a refused certificate.
    p = socket.create_connection(("127.0.0.1", port), timeout=5)
    p.sendall(b'{"execute": "qmp_capabilities"}\n')
    p.close()
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert greeting(tls_client(pki, port, "mallory")) is None
    time.sleep(2)
    assert m.count() == 0, "the guest started without an authorized client"
    assert m.proc.poll() is None
    s = tls_client(pki, port, "alice")
    g = greeting(s)
    assert g and "QMP" in g
    m.wait_for(lambda: m.count() > 3, "the guest to start")
    idle.close()
    s.close()
    m.kill()
