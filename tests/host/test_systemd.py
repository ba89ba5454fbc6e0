"""primed under systemd, without systemd as PID 1: the unit files checked by
systemd-analyze, socket activation through systemd-socket-activate, and the
sd_notify messages read from a datagram socket given as NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import trio

import primed
from primed.daemon import systemd
from primed.errors import ErrorCode
from primed.wire import protocol
from tests.support import Daemon, can_connect, start_daemon, wait_for

UNITS = Path(__file__).parents[2] / "systemd"
#: What the service runs: a pip-installed primed (README, "Install as a system service").
EXEC_START = (
    "ExecStart=/usr/local/bin/primed serve --config /etc/primed/primed.toml --keep-fd-limit"
)
_names = itertools.count()


class Notifications:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        #: The value of NOTIFY_SOCKET.
        self.address = address
        #: Every message read so far: (when it came, its fields).
        self.seen: list[tuple[float, dict[str, str]]] = []

    def read(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append((time.monotonic(), fields))
        return fields

    def expect(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        """The next message that holds ``key``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.read(left)
            if fields is not None and key in fields:
                return fields
        raise AssertionError(f"no {key}= within {timeout} s; seen: {self.seen}")

    def for_a_while(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        """Every message that comes in the next ``seconds``."""
        start = len(self.seen)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.read(left)
        return self.seen[start:]


@pytest.fixture(params=["path", "abstract"])
def notify(request: pytest.FixtureRequest, sock_dir: Path) -> Iterator[Notifications]:
    if request.param == "path":
        address = str(sock_dir / "notify.sock")
    else:
        address = f"@primed-test-{os.getpid()}-{next(_names)}"
    listener = Notifications(address)
    with listener.sock:
        yield listener


def serve(sock_dir: Path, notify: Notifications, *args: str, **env: str) -> Daemon:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "LISTEN_"))}
    environ.update(NOTIFY_SOCKET=notify.address, **env)
    return start_daemon(sock_dir / "primed.sock", "--backend", "memfd", *args, env=environ)


# --- the unit files ------------------------------------------------------------------------


def test_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the units as shipped, but for ExecStart's path: verify
    fails while the binary does not exist, so the copy runs this virtualenv's primed."""
    service = (UNITS / "primed.service").read_text()
    assert service.count(EXEC_START) == 1
    installed = Path(sys.executable).parent / "primed"
    assert installed.is_file()
    (tmp_path / "primed.service").write_text(
        service.replace(EXEC_START, EXEC_START.replace("/usr/local/bin/primed", str(installed)))
    )
    shutil.copy(UNITS / "primed.socket", tmp_path / "primed.socket")
    done = subprocess.run(
        ["systemd-analyze", "verify", tmp_path / "primed.socket", tmp_path / "primed.service"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_service_security_score() -> None:
    """The exposure score must stay at 1.2 or below (``--threshold`` counts in tenths)."""
    done = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--threshold=12",
            UNITS / "primed.service",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"Overall exposure level for primed\.service: (\d+\.\d)", done.stdout)
    assert found is not None, done.stdout
    assert float(found[1]) <= 1.2


def test_units_say_what_the_readme_says() -> None:
    sock = (UNITS / "primed.socket").read_text().splitlines()
    for line in (
        "ListenSequentialPacket=/run/primed/primed.sock",
        "SocketGroup=primed",
        "SocketMode=0660",
        "RemoveOnStop=yes",
        "WantedBy=sockets.target",
    ):
        assert line in sock
    service = (UNITS / "primed.service").read_text().splitlines()
    for line in (
        "Type=notify",
        "DynamicUser=yes",
        "SupplementaryGroups=video render primed-heap kvm",
        "DevicePolicy=closed",
        "DeviceAllow=char-drm rw",
        "DeviceAllow=char-dma_heap r",
        "DeviceAllow=/dev/udmabuf rw",
        "ExecReload=/bin/kill -HUP $MAINPID",
        EXEC_START,
        "StartLimitIntervalSec=0",
        "Restart=on-failure",
        "RestartSec=2s",
        "LimitNOFILE=524288",
        # Not the unit's name, primed: that is the clients' group, and a dynamic user
        # can't take a name a static group has.
        "User=primed-daemon",
    ):
        assert line in service
    assert not any(
        line.startswith(("PrivateDevices=", "RestartPreventExitStatus=", "Type=notify-"))
        for line in service
    )


def test_sysusers_makes_the_socket_group(tmp_path: Path) -> None:
    """systemd-sysusers, on an empty root, makes the group the socket unit names."""
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", UNITS / "primed.sysusers"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    groups = [line.split(":") for line in (tmp_path / "etc" / "group").read_text().splitlines()]
    assert [(g[0], int(g[2]) < 1000) for g in groups] == [("primed", True), ("primed-heap", True)]


def test_the_readme_installs_the_group_before_the_socket() -> None:
    readme = (UNITS.parent / "README.md").read_text()
    section = readme.split("\n## Install as a system service\n", 1)[1].split("\n## ", 1)[0]
    commands = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    sysusers = commands.index(
        "install -D -m 644 systemd/primed.sysusers /etc/sysusers.d/primed.conf"
    )
    assert commands[sysusers + 1] == "systemd-sysusers"
    assert commands.index("systemctl enable --now primed.socket") > sysusers + 1
    assert "usermod -aG primed alice" in commands


# --- socket activation ---------------------------------------------------------------------


class Activated:
    """systemd-socket-activate, which runs its command at the first connection."""

    def __init__(self, process: subprocess.Popen[bytes], log: IO[bytes]):
        self.process = process
        self._log = log

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


@contextlib.contextmanager
def activate(path: Path, *options: str, command: list[str]) -> Iterator[Activated]:
    """systemd-socket-activate listening at ``path`` with ``options``, until the block ends."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            ["systemd-socket-activate", "--listen", str(path), *options, *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        activated = Activated(process, log)
        try:
            wait_for(lambda: path.exists() or process.poll() is not None, "the socket")
            assert process.poll() is None, activated.output()
            yield activated
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            path.unlink(missing_ok=True)


def primed_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "primed", "serve", "--backend", "memfd", *args]


def test_socket_activation(sock_dir: Path, notify: Notifications) -> None:
    path = sock_dir / "activated.sock"
    with activate(
        path,
        "--seqpacket",
        "--fdname=primed",
        f"--setenv=NOTIFY_SOCKET={notify.address}",
        command=primed_command("--socket", str(sock_dir / "unused.sock")),
    ) as activator:
        inode = path.stat().st_ino
        with primed.connect(str(path)) as client:  # this connection starts primed
            client.release(client.allocate(64, 64, "NV12"))
        ready = notify.expect("READY")
        assert ready["STATUS"].startswith(f"serving memfd buffers on {path}: ")
        assert path.stat().st_ino == inode  # served on the socket it was given
        assert not os.path.lexists(sock_dir / "unused.sock")
        with primed.connect(str(path)) as again:
            assert again.info.backend == primed.Backend.MEMFD
        activator.process.send_signal(signal.SIGTERM)
        assert activator.process.wait(10) == 0, activator.output()
        assert notify.expect("STOPPING")["STOPPING"] == "1"
        log = activator.output()
        assert f"socket activation: fd 3 (primed) listens on {path}" in log
        assert f"serving the socket systemd passed, {path}, not " in log
        assert path.exists()  # the socket is systemd's to remove, not primed's


def test_activation_with_a_stream_socket_is_refused(sock_dir: Path) -> None:
    path = sock_dir / "stream.sock"
    with activate(path, command=primed_command()) as activator:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.connect(str(path))
        assert activator.process.wait(30) == 2
        assert "is not a listening AF_UNIX SOCK_SEQPACKET socket" in activator.output()


def test_a_bad_file_under_socket_activation_is_told_to_every_client(
    sock_dir: Path, notify: Notifications
) -> None:
    """Socket-activated, primed doesn't exit on a bad file (systemd would start it again
    for the waiting client, and again): each client gets one ERROR, serial 0, at once;
    SIGHUP rereads the file and, once it is good, primed serves on the same socket."""
    config = sock_dir / "primed.toml"
    config.write_bytes(b"[limits]\nmax_width = -1\n")
    path = sock_dir / "activated.sock"
    told = (
        f"primed can't serve: {config}: limits.max_width: -1 is not within 1..4294967295; "
        "mend that, then run: systemctl reload primed"
    )
    with activate(
        path,
        "--seqpacket",
        "--fdname=primed",
        f"--setenv=NOTIFY_SOCKET={notify.address}",
        command=primed_command("--config", str(config)),
    ) as activator:
        with pytest.raises(primed.ServerError) as first:  # this connection starts primed
            primed.connect(str(path))
        assert (first.value.code, first.value.text) == (ErrorCode.INTERNAL, told)
        ready = notify.expect("READY")
        assert ready["STATUS"] == "refusing clients: " + told.removeprefix("primed can't serve: ")
        for _ in range(20):
            start = time.monotonic()
            with pytest.raises(primed.ServerError, match=r"limits\.max_width: -1"):
                primed.connect(str(path))
            assert time.monotonic() - start < 1.0
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as raw:
            raw.settimeout(10)
            raw.connect(str(path))  # and sends nothing: the ERROR comes unasked
            serial, message = protocol.decode(raw.recv(65536), 0, "reply")
            assert (serial, message) == (0, protocol.Error(ErrorCode.INTERNAL, 0, told))
            assert raw.recv(65536) == b""  # hung up on, gracefully

        config.write_bytes(b"[limits]\nmax_width = 100 # \xe9\n")
        activator.process.send_signal(signal.SIGHUP)
        notify.expect("RELOADING")
        ready = notify.expect("READY")
        assert "not valid TOML: not UTF-8: byte 0xe9 (at line 2, column 19)" in ready["STATUS"]
        with pytest.raises(primed.ServerError, match="not UTF-8"):
            primed.connect(str(path))

        config.write_text("[limits]\nmax_width = 100\n")
        activator.process.send_signal(signal.SIGHUP)
        notify.expect("RELOADING")
        assert notify.expect("READY")["STATUS"].startswith(f"serving memfd buffers on {path}: ")
        with primed.connect(str(path)) as client:
            assert client.info.limits.max_width == 100
            client.release(client.allocate(100, 10))
        activator.process.send_signal(signal.SIGTERM)
        assert activator.process.wait(10) == 0, activator.output()
        log = activator.output()
    assert log.count("refusing clients until a reload (SIGHUP) mends this") == 2
    assert "Traceback" not in log


def test_a_device_that_wont_open_under_socket_activation_is_told(sock_dir: Path) -> None:
    path = sock_dir / "activated.sock"
    command = [sys.executable, "-m", "primed", "serve", "--device", str(sock_dir / "card9")]
    with activate(path, "--seqpacket", command=command) as activator:
        with pytest.raises(primed.ServerError) as refused:
            primed.connect(str(path))
        assert refused.value.text.startswith(
            f"primed can't serve: open {sock_dir}/card9: No such file or directory; "
        )
        activator.process.send_signal(signal.SIGTERM)
        assert activator.process.wait(10) == 0, activator.output()


def test_run_by_hand_a_bad_file_still_exits_2(sock_dir: Path) -> None:
    config = sock_dir / "primed.toml"
    config.write_bytes(b"\xff")
    done = subprocess.run(
        [*primed_command("--config", str(config), "--socket", str(sock_dir / "x.sock"))],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"{config}: not valid TOML: not UTF-8: byte 0xff" in done.stderr


#: Runs the rest of its argv with the soft RLIMIT_NOFILE at 256, below the hard one.
LOW_NOFILE = """
import os, resource, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.parametrize("keep", [True, False])
def test_keep_fd_limit(sock_dir: Path, keep: bool) -> None:
    """``--keep-fd-limit`` (the unit's ExecStart, where LimitNOFILE= sets the limit) leaves
    the soft limit alone; without it primed raises it to the hard one."""
    path = sock_dir / "fd.sock"
    flags = ["--keep-fd-limit"] if keep else []
    process = subprocess.Popen(
        [sys.executable, "-c", LOW_NOFILE, *primed_command("--socket", str(path), *flags)[1:]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: can_connect(str(path)) or process.poll() is not None, "primed")
        assert process.poll() is None
        limits = Path(f"/proc/{process.pid}/limits").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
    found = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits)
    assert found is not None, limits
    soft, hard = int(found[1]), int(found[2])
    assert soft == (256 if keep else hard)
    assert hard > 256


def test_listen_fds_meant_for_another_process_are_ignored(sock_dir: Path) -> None:
    environ = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="x")
    daemon = start_daemon(sock_dir / "own.sock", "--backend", "memfd", env=environ)
    assert can_connect(daemon.socket)
    assert "socket activation" not in daemon.stop()


# --- sd_notify -----------------------------------------------------------------------------


def test_notify_ready_reload_stop(sock_dir: Path, notify: Notifications) -> None:
    config = sock_dir / "primed.toml"
    config.write_text("[limits]\nmax_width = 100\n")
    daemon = serve(sock_dir, notify, "--config", str(config))
    try:
        ready = notify.expect("READY")
        assert ready == {
            "READY": "1",
            "STATUS": f"serving memfd buffers on {daemon.socket}: "
            "0 client(s), 0 buffer(s), 0.0 MiB",
        }
        before = time.monotonic_ns() // 1000
        daemon.process.send_signal(signal.SIGHUP)
        reloading = notify.expect("RELOADING")
        assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
        assert notify.expect("READY")["STATUS"].endswith("0.0 MiB")

        config.write_text("[limits]\nmax_width = -1\n")
        daemon.process.send_signal(signal.SIGHUP)
        notify.expect("RELOADING")
        assert notify.expect("READY")["STATUS"].endswith("; last reload refused, see the log")
        assert "limits.max_width: -1 is not within" in daemon.log()

        config.write_bytes(b"[limits]\nmax_width = 100 # \xff\n")  # not UTF-8
        daemon.process.send_signal(signal.SIGHUP)
        notify.expect("RELOADING")
        assert notify.expect("READY")["STATUS"].endswith("; last reload refused, see the log")
        assert f"{config}: not valid TOML: not UTF-8: byte 0xff" in daemon.log()
        assert daemon.process.poll() is None
        with primed.connect(daemon.socket) as client:
            assert client.info.limits.max_width == 100  # the running configuration stays
    finally:
        log = daemon.stop()
    assert notify.expect("STOPPING") == {"STOPPING": "1", "STATUS": "stopping"}
    assert "stopped" in log


def test_watchdog_pings_at_half_the_timeout(sock_dir: Path, notify: Notifications) -> None:
    daemon = serve(sock_dir, notify, WATCHDOG_USEC="200000")
    try:
        notify.expect("READY")
        seen = notify.for_a_while(1.0)
    finally:
        daemon.stop()
    pings = [when for when, fields in seen if fields.get("WATCHDOG") == "1"]
    assert 8 <= len(pings) <= 12, seen
    mean = (pings[-1] - pings[0]) / (len(pings) - 1)
    assert 0.085 <= mean <= 0.115, pings


def test_status_follows_clients(sock_dir: Path, notify: Notifications) -> None:
    daemon = serve(sock_dir, notify, WATCHDOG_USEC="200000")
    try:
        notify.expect("READY")
        with primed.connect(daemon.socket) as client:
            held = client.allocate_many(512, 512, "XR24", 2)
            wanted = "1 client(s), 2 buffer(s), 2.0 MiB"
            deadline = time.monotonic() + 10
            while not notify.expect("STATUS")["STATUS"].endswith(wanted):
                assert time.monotonic() < deadline, notify.seen
            client.release(*held)
    finally:
        daemon.stop()


@pytest.mark.parametrize("pid", ["1", "not-a-pid"])
def test_no_watchdog_for_another_process(sock_dir: Path, notify: Notifications, pid: str) -> None:
    daemon = serve(sock_dir, notify, WATCHDOG_USEC="100000", WATCHDOG_PID=pid)
    try:
        notify.expect("READY")
        seen = notify.for_a_while(0.5)
    finally:
        daemon.stop()
    assert not [fields for _, fields in seen if "WATCHDOG" in fields]


# --- sd_notify when systemd's queue is full ------------------------------------------------


def fill(listener: Notifications) -> int:
    """Send to ``listener`` until its receive queue is full, as a busy systemd's would be;
    the number of messages queued."""
    address = listener.sock.getsockname()
    queued = 0
    with socket.socket(
        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    ) as filler:
        for _ in range(100_000):
            try:
                filler.sendto(b"FILLER=1", address)
            except BlockingIOError:
                break
            queued += 1
    # A fresh socket is refused too: the queue is full, not the filler's buffer.
    with (
        socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        ) as probe,
        pytest.raises(BlockingIOError),
    ):
        probe.sendto(b"PROBE=1", address)
    return queued


@pytest.fixture
def full(notify: Notifications) -> Notifications:
    """A notify socket nobody reads, its queue full."""
    assert fill(notify) > 0
    return notify


def test_a_full_queue_never_makes_notify_wait(full: Notifications) -> None:
    with systemd.Notifier(full.address) as notifier:
        returned = threading.Event()
        rescued: list[bytes] = []

        def rescue() -> None:
            # A send still waiting by now blocks: make room in the queue so that it ends.
            if not returned.wait(0.5):
                rescued.append(full.sock.recv(4096))

        thread = threading.Thread(target=rescue)
        thread.start()
        try:
            start = time.monotonic()
            sent = [notifier.notify("STATUS=busy"), notifier.notify("WATCHDOG=1")]
            took = time.monotonic() - start
        finally:
            returned.set()
            thread.join()
        assert not rescued, f"notify waited for room in systemd's queue ({took:.3f} s)"
        assert sent == [False, False]
        assert notifier.dropped == 2
        assert not notifier.pending
        print(f"two notifications dropped at a full queue in {took * 1e6:.0f} us")


async def test_a_ready_that_cant_go_is_kept_and_sent_once_there_is_room(
    full: Notifications, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="primed")
    full.sock.setblocking(False)
    with systemd.Notifier(full.address) as notifier:
        notifier.ready("serving")  # returns at once: kept
        assert notifier.pending
        seen: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.heartbeat, lambda: "serving", 0.02)
            # This task runs on while the heartbeat meets the full queue again and again:
            # each WATCHDOG=1 is dropped (it may not overtake the kept READY=1).
            ticks = 0
            with trio.fail_after(10):
                while notifier.dropped < 5:
                    await trio.sleep(0.005)
                    ticks += 1
            assert notifier.pending
            # systemd reads its queue: the READY=1 comes, before any later message.
            with trio.fail_after(10):
                while not any(message.startswith(b"READY=1") for message in seen):
                    await trio.lowlevel.wait_readable(full.sock)
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            message = full.sock.recv(4096)
                            if not message.startswith(b"FILLER="):
                                seen.append(message)
            nursery.cancel_scope.cancel()
    assert seen[0] == b"READY=1\nSTATUS=serving"
    assert not notifier.pending
    assert ticks > 0
    warned = [r for r in caplog.records if "dropped until systemd takes them" in r.message]
    assert len(warned) == 1, caplog.text
    assert "sd_notify: systemd takes notifications again" in caplog.text


# --- the sandbox ---------------------------------------------------------------------------

#: Runs the rest of its argv under the kernel's memory-deny-write-execute (PR_SET_MDWE, Linux
#: 6.3), what systemd's MemoryDenyWriteExecute=yes asks of seccomp: no mapping may become
#: both writable and executable. It checks the kernel refuses one before it runs primed.
MDWE_LAUNCHER = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()
    sys.exit("a writable, executable mapping was allowed")
except PermissionError:
    pass
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_serves_without_writable_executable_memory(sock_dir: Path) -> None:
    """MemoryDenyWriteExecute=yes in the unit holds: primed never needs W+X memory."""
    path = sock_dir / "mdwe.sock"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, "-c", MDWE_LAUNCHER, *primed_command("--socket", str(path))[1:]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: can_connect(str(path)) or process.poll() is not None, "primed")
            assert process.poll() is None, "primed exited before it served"
            with primed.connect(str(path)) as client:
                for fmt in ("XR24", "NV12", "P010"):
                    client.release(*client.allocate_many(64, 64, fmt, 3))
            process.send_signal(signal.SIGHUP)
            process.send_signal(signal.SIGTERM)
            code = process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert code == 0, output
    assert "Traceback" not in output
