"""The ``primed`` command as a user runs it, against a live memfd daemon."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import primed
from primed import formats
from primed.errors import ErrorCode
from primed.kernel import drm
from tests.support import Daemon, StartDaemon, wait_for


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PRIMED_SOCKET"}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "primed", *args],
        check=False,
        env=environment() if env is None else env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def succeeds(*args: str, env: dict[str, str] | None = None) -> str:
    done = cli(*args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def fails(code: int, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a command that must exit with ``code`` and print nothing; returns its stderr."""
    done = cli(*args, env=env)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stdout == ""
    return done.stderr


INFO = {
    "version": 2,
    "backend": "memfd",
    "driver": "memfd",
    "driver_version": "0.0.0",
    "node": "",
    "limits": {
        "max_width": 16384,
        "max_height": 16384,
        "max_size": 1 << 30,
        "max_count": 1024,
    },
    "allocators": [
        {
            "name": "memfd",
            "kind": "memfd",
            "usage": ["cpu"],
            "driver": "memfd",
            "driver_version": "0.0.0",
            "node": "",
        }
    ],
    "imports": [],  # the host has no DRM render node
}


def test_info_json(shared: Daemon) -> None:
    assert json.loads(succeeds("info", "--socket", shared.socket, "--json")) == INFO


def test_info_text(shared: Daemon) -> None:
    assert succeeds("info", "--socket", shared.socket).splitlines() == [
        "backend: memfd",
        "protocol version: 2",
        "limits:  16384x16384, 1073741824 bytes per buffer, 1024 buffers per request",
        "allocators (the first is the default):",
        "  memfd: memfd, memfd; usage cpu",
        "imports: no DRM render node",
    ]


def expected_buffers(width: int, height: int, code: str, count: int) -> list[dict[str, object]]:
    lay = formats.layout(formats.lookup(code), width, height)
    size = -(-lay.size // 4096) * 4096
    planes = [{"offset": p.offset, "pitch": p.pitch} for p in lay.planes]
    return [
        {
            "id": i,
            "width": width,
            "height": height,
            "format": code,
            "modifier": 0,
            "size": size,
            "planes": planes,
            "allocator": "memfd",
        }
        for i in range(1, count + 1)
    ]


def test_alloc_json(shared: Daemon) -> None:
    out = succeeds(
        "alloc", "64x48", "--format", "NV12", "--count", "2", "--socket", shared.socket, "--json"
    )
    described = json.loads(out)
    assert described == {"buffers": expected_buffers(64, 48, "NV12", 2)}
    assert described["buffers"][0]["planes"] == [
        {"offset": 0, "pitch": 64},
        {"offset": 64 * 48, "pitch": 64},
    ]


@pytest.mark.parametrize("spec", ["YUV420", "yu12", str(formats.fourcc("YU12"))])
def test_alloc_format_by_any_name(shared: Daemon, spec: str) -> None:
    if spec.isdigit():  # the command takes text only; an integer is not a name
        assert "unsupported format" in fails(
            1, "alloc", "64x64", "--format", spec, "--socket", shared.socket
        )
        return
    out = succeeds("alloc", "64x64", "--format", spec, "--socket", shared.socket, "--json")
    assert json.loads(out) == {"buffers": expected_buffers(64, 64, "YU12", 1)}


def test_alloc_text(shared: Daemon) -> None:
    out = succeeds("alloc", "1920x1080", "--format", "NV12", "--socket", shared.socket)
    assert out.splitlines() == [
        "buffer 1: 1920x1080 NV12 modifier 0x0 size 3112960 "
        "[0: offset 0 pitch 1920] [1: offset 2073600 pitch 1920]"
    ]
    out = succeeds("alloc", "100x10", "--count", "2", "--socket", shared.socket)
    assert out.splitlines() == [
        f"buffer {i}: 100x10 XR24 modifier 0x0 size 8192 [0: offset 0 pitch 448]" for i in (1, 2)
    ]


def test_unknown_format(shared: Daemon) -> None:
    err = fails(1, "alloc", "64x64", "--format", "ZZZZ", "--socket", shared.socket)
    assert err.startswith("primed alloc: unsupported format 'ZZZZ'")


@pytest.mark.parametrize("size", ["64by48", "64x", "x48", "64x-1", "1.5x2", "64x48x2", "axb", ""])
def test_bad_size_text(shared: Daemon, size: str) -> None:
    err = fails(2, "alloc", size, "--socket", shared.socket)
    assert "expected WIDTHxHEIGHT" in err
    assert err.startswith("usage: primed alloc")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["0x0"], "INVALID_ARGUMENT"),
        (["64x64", "--count", "0"], "INVALID_ARGUMENT"),
        (["63x64", "--format", "NV12"], "INVALID_ARGUMENT"),
        (["99999x16"], "LIMIT_EXCEEDED"),
        (["64x64", "--count", "1025"], "LIMIT_EXCEEDED"),
    ],
    ids=["0x0", "count 0", "odd NV12", "too wide", "too many"],
)
def test_daemon_refusals(shared: Daemon, args: list[str], code: str) -> None:
    err = fails(1, "alloc", *args, "--socket", shared.socket)
    assert err.startswith(f"primed alloc: {code}: ")
    assert len(err.splitlines()) == 1, "an error is one line, not a traceback"


def test_no_daemon_listening(sock_dir: Path) -> None:
    missing = str(sock_dir / "nobody.sock")
    err = fails(1, "info", "--socket", missing)
    assert err.startswith("primed info: ") and "No such file or directory" in err
    assert missing in err
    stale = sock_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as bound:
        bound.bind(str(stale))
    err = fails(1, "alloc", "64x64", "--socket", str(stale))
    assert err.startswith("primed alloc: ") and "Connection refused" in err
    assert str(stale) in err
    assert len(err.splitlines()) == 1


def test_devices() -> None:
    # This host has no /dev/dri; where one exists, the command must list what drm.nodes() finds.
    found = drm.nodes()
    listed = json.loads(succeeds("devices", "--json"))
    assert listed == [{"path": n.path, "driver": n.driver, "primary": n.primary} for n in found]
    text = succeeds("devices")
    if not os.path.isdir("/dev/dri"):
        assert listed == []
        assert text == "no DRM nodes under /dev/dri\n"
    else:
        for node in found:
            assert f"{node.path}\t{node.driver}\t" in text


def test_primed_socket_is_honoured(shared: Daemon, sock_dir: Path) -> None:
    env = environment(PRIMED_SOCKET=shared.socket)
    assert json.loads(succeeds("info", "--json", env=env)) == INFO
    assert len(json.loads(succeeds("alloc", "16x16", "--json", env=env))["buffers"]) == 1
    # --socket wins over the variable.
    elsewhere = environment(PRIMED_SOCKET=str(sock_dir / "nobody.sock"))
    assert json.loads(succeeds("info", "--json", "--socket", shared.socket, env=elsewhere)) == INFO
    assert "nobody.sock" in fails(1, "info", env=elsewhere)


def test_serve_honours_primed_socket(spawn: StartDaemon) -> None:
    daemon = spawn(name="from-env.sock", via_env=True)
    env = environment(PRIMED_SOCKET=daemon.socket)
    assert json.loads(succeeds("info", "--json", env=env))["backend"] == "memfd"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--backend", "memfd", "--device", "/dev/null"], 2, "--device"),
        (["--backend", "memfd", "--max-size", str(1 << 32)], 2, "--max-size"),
        (["--device", "/nonexistent/card0"], 1, "open /nonexistent/card0"),
        (["--backend", "vulkan"], 2, "invalid choice"),
        (["--backend", "memfd", "--hello-timeout", "0"], 2, "--hello-timeout: 0.0 is not within"),
        (["--backend", "memfd", "--connections-per-uid", "-1"], 2, "--connections-per-uid: -1"),
        # A heap no kernel has: a host with dma-buf heaps answers the same.
        (["--heap", "primed-none"], 1, "open /dev/dma_heap/primed-none ("),
        (["--backend", "memfd", "--heap", "system"], 2, "--heap makes no sense"),
        (["--heap", "system", "--heap", "system"], 2, "--heap: 'system' is named twice"),
    ],
    ids=[
        "device with memfd",
        "max-size",
        "missing device",
        "unknown backend",
        "hello-timeout",
        "connections-per-uid",
        "missing heap",
        "heap with memfd",
        "heap twice",
    ],
)
def test_serve_refuses(sock_dir: Path, args: list[str], code: int, message: str) -> None:
    path = sock_dir / "refused.sock"
    err = fails(code, "serve", *args, "--socket", str(path))
    assert message in err
    assert not path.exists()


def test_no_command() -> None:
    assert "usage: primed" in fails(2)


def test_console_script(shared: Daemon) -> None:
    script = Path(sys.executable).parent / "primed"
    assert script.is_file(), f"{script} is missing: is primed installed in this environment?"
    done = subprocess.run(
        [str(script), "info", "--json", "--socket", shared.socket],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == INFO


def test_serve_connections_per_uid(spawn: StartDaemon) -> None:
    # The flag overrides the default share; the connection past it is refused with
    # LIMIT_EXCEEDED naming the limit, and the log says what limits the daemon runs with.
    daemon = spawn("--connections-per-uid", "2")
    with primed.connect(daemon.socket), primed.connect(daemon.socket):
        with pytest.raises(primed.ServerError) as refused:
            primed.connect(daemon.socket)
        assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
        assert refused.value.text == "connections per uid (2): 2 open"

    def admitted() -> bool:
        try:
            with primed.connect(daemon.socket):
                return True
        except primed.ServerError as e:
            assert e.code == ErrorCode.LIMIT_EXCEEDED
            return False

    # The share is free again once the daemon has seen them go (in its own time).
    wait_for(admitted, "the two connections' end")
    log = daemon.stop()
    assert "per uid" in log and "limits for " in log
    assert f"refused a client (pid {os.getpid()}, uid {os.getuid()}" in log
