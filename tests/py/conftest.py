"""Fixtures for the monitor tests: a real moat running a Tier 1 guest.

MOAT_BIN and MOAT_TEST_PVH are set by tests/monitor_py.rs (cargo test)."""
import os
import subprocess
import time

import pytest

MOAT = os.environ["MOAT_BIN"]
GUEST = os.environ["MOAT_TEST_PVH"]


class Moat:
    def __init__(self, tmp_path, append="action=count", extra=(), qmp=True, hmp=False, paused=False,
                 pass_fds=()):
        self.dir = tmp_path
        self.qmp_path = str(tmp_path / "qmp.sock")
        self.hmp_path = str(tmp_path / "hmp.sock")
        self.serial = tmp_path / "serial.log"
        args = [MOAT, "-kernel", GUEST, "-append", append, "-serial", f"file:{self.serial}", "-name", "pytest-vm"]
        if qmp:
            args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if hmp:
            args += ["-chardev", f"socket,id=hmp0,path={self.hmp_path},server=on,wait=off",
                     "-mon", "chardev=hmp0,mode=readline"]
        if paused:
            args.append("-S")
        args += list(extra)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, pass_fds=pass_fds)
        for path in ([self.qmp_path] if qmp else []) + ([self.hmp_path] if hmp else []):
            self.wait_for(lambda: os.path.exists(path), f"socket {path}")

    def wait_for(self, cond, what, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"moat exited ({self.proc.returncode}) waiting for {what}: "
                                     f"{self.proc.stderr.read().decode()}")
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    def console(self):
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self):
        """Lines the counting guest has printed so far."""
        return self.console().count("count ")

    def wait_exit(self, timeout=60):
        return self.proc.wait(timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def moat(tmp_path):
    started = []

    def start(**kw):
        m = Moat(tmp_path, **kw)
        started.append(m)
        return m

    yield start
    for m in started:
        m.kill()
