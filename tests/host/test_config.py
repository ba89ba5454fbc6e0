"""The configuration file: every key checked and named when wrong, flags over the file,
and SIGHUP reloading it in a running daemon without dropping its clients."""

from __future__ import annotations

import dataclasses
import grp
import os
import re
import resource
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import primed
from primed.daemon.policy import Bounds, Policy, Quotas
from primed.errors import ErrorCode
from primed.formats import Limits
from primed.service import config
from primed.service.config import Config, ConfigError
from tests.host.conftest import StartDaemon
from tests.support import Daemon, can_connect, wait_for

EXAMPLE = Path(__file__).parents[2] / "systemd" / "primed.toml"


def write(directory: Path, text: str, name: str = "primed.toml") -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


# --- the file ------------------------------------------------------------------------------


def test_no_file_means_the_defaults() -> None:
    loaded = config.load(None, nofile=20000, memory=8 << 30)
    assert loaded == Config(policy=loaded.policy, nofile=20000)
    assert loaded.limits == Limits()
    # No file is no reason to serve without quotas: they are cut from the fd limit.
    # (The default backend is drm: a buffer is a GEM handle, not an fd.)
    assert loaded.policy == Policy(
        quotas=Quotas.for_nofile(20000, 8 << 30, fd_each=False),
        bounds=Bounds.for_nofile(20000, 8 << 30, fd_each=False),
    )


@pytest.mark.parametrize(
    ("nofile", "per_uid", "bounds"),
    [
        # (connections, buffers, tokens, fds in flight) per uid, then daemon-wide
        (1024, (30, 60, 4096, 253), (240, 480, 65536, 512)),
        (20000, (585, 1171, 4096, 1250), (4687, 9375, 65536, 10000)),
        (524288, (15360, 30720, 4096, 32768), (122880, 245760, 65536, 262144)),
    ],
)
def test_the_default_quotas_for_a_few_fd_limits(
    nofile: int, per_uid: tuple[int, ...], bounds: tuple[int, ...]
) -> None:
    # The table in systemd/primed.toml and docs/deployment.md (memfd: a buffer, an fd).
    policy = config.load(None, {"backend": "memfd"}, nofile=nofile, memory=16 << 30).policy
    q, b = policy.quotas, policy.bounds
    assert (q.connections_per_uid, q.buffers_per_uid, q.tokens_per_uid) == per_uid[:3]
    assert q.fds_in_flight_per_uid == per_uid[3]
    assert (b.connections, b.buffers, b.tokens, b.fds_in_flight) == bounds
    assert (q.buffers_per_client, q.tokens_per_buffer) == (q.buffers_per_uid, 1024)
    assert q.bytes_per_uid == q.bytes_per_client == 2 << 30 and b.bytes == 8 << 30
    # One uid at its shares holds an eighth of the fds the bounds leave the clients,
    # and the bounds leave the reserve free.
    assert b.connections + b.buffers + b.fd_reserve <= nofile
    assert q.connections_per_uid + q.buffers_per_uid <= (b.connections + b.buffers) // 8 + 1


def test_the_defaults_follow_the_hard_fd_limit() -> None:
    # What the daemon raises its soft limit to; --keep-fd-limit keeps the soft one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert config.load(None).nofile == config.fd_limit() == hard
    assert config.fd_limit(raised=False) == soft
    assert config.memory_total() > 0


def test_a_zero_in_the_file_switches_a_quota_off(tmp_path: Path) -> None:
    # Left out: the default. 0: no quota (the daemon-wide bounds still hold).
    path = write(tmp_path, "[quotas]\nconnections_per_uid = 0\nbuffers_per_uid = 7\n")
    loaded = config.load(path, nofile=1024, memory=8 << 30)
    default = Quotas.for_nofile(1024, 8 << 30, fd_each=False)
    assert loaded.policy.quotas == dataclasses.replace(
        default, connections_per_uid=0, buffers_per_uid=7
    )
    assert loaded.policy.bounds == Bounds.for_nofile(1024, 8 << 30, fd_each=False)


def test_every_key(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    text = f"""
        device = "/dev/dri/card1"
        backend = "memfd"
        socket = "/tmp/x.sock"
        socket_mode = "0600"
        log_level = "debug"
        hello_timeout = 2.5
        [access]
        allowed_uids = ["root", 1000]
        allowed_gids = ["{group}", 44]
        admin_group = {os.getgid()}
        [limits]
        max_width = 4096
        max_height = 2160
        max_size = "64M"
        max_count = 8
        [quotas]
        buffers_per_client = 16
        bytes_per_client = "1GiB"
        buffers_per_uid = 64
        bytes_per_uid = 1048576
        connections_per_uid = 9
        tokens_per_uid = 100
        tokens_per_buffer = 10
        fds_in_flight_per_uid = 300
    """
    path = write(tmp_path, "\n".join(line.strip() for line in text.splitlines()))
    assert config.load(path, nofile=4096, memory=1 << 30) == Config(
        device="/dev/dri/card1",
        backend="memfd",
        socket="/tmp/x.sock",
        socket_mode=0o600,
        log_level="debug",
        hello_timeout=2.5,
        limits=Limits(4096, 2160, 64 << 20, 8),
        policy=Policy(
            frozenset({0, 1000}),
            frozenset({os.getgid(), 44}),
            os.getgid(),
            Quotas(16, 1 << 30, 64, 1 << 20, 9, 100, 10, 300),
            Bounds.for_nofile(4096, 1 << 30),
        ),
        source=path,
        nofile=4096,
    )


def test_the_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    # The shipped file leaves every quota to the defaults cut from RLIMIT_NOFILE.
    shipped = config.load(str(EXAMPLE), nofile=4096).policy.quotas
    assert shipped == config.load(None, nofile=4096).policy.quotas
    uncommented = re.sub(r"(?m)^#(\w+ = )", r"\1", text)
    data = tomllib.loads(uncommented)
    flat = {
        f"{table}.{key}": value
        for table, inner in data.items()
        if isinstance(inner, dict)
        for key, value in inner.items()
    } | {key: value for key, value in data.items() if not isinstance(value, dict)}
    assert set(flat) == set(config.KEYS)
    del flat["access.admin_group"]  # names a group this machine need not have
    shown = config.build(flat, source="the example")
    assert shown.limits == Limits()  # the commented-out values are the defaults
    assert (shown.backend, shown.socket_mode, shown.log_level) == ("drm", 0o660, "info")
    assert shown.socket_path == primed.DEFAULT_SOCKET


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[limits]\nmax_width = "wide"', "limits.max_width: expected an integer, got 'wide'"),
        ("[limits]\nmax_width = true", "limits.max_width: expected an integer, got True"),
        ("[limits]\nmax_height = 0", "limits.max_height: 0 is not within 1..4294967295"),
        ('[limits]\nmax_size = "4G"', "limits.max_size: 4294967296 is not within 1..4294967295"),
        ('[limits]\nmax_size = "lots"', "limits.max_size: expected bytes"),
        ("[limits]\nmax_widht = 1", "unknown key limits.max_widht; known: limits.max_width,"),
        ("colour = 1", "unknown key colour; known: device, backend,"),
        ("limits = 5", "limits: expected a table ([limits]), got 5"),
        ('backend = "gpu"', "backend: expected one of drm, memfd; got 'gpu'"),
        ('log_level = "loud"', "log_level: expected one of debug, info, warning, error"),
        ('socket = ""', "socket: expected a non-empty string, got ''"),
        ('socket_mode = "rw"', "socket_mode: expected permissions"),
        ("socket_mode = 0o1777", "socket_mode: expected permissions"),
        ('[access]\nallowed_uids = "root"', "access.allowed_uids: expected an array"),
        ('[access]\nallowed_uids = ["no-such-user-x"]', "no user named 'no-such-user-x'"),
        ("[access]\nallowed_gids = [-1]", "access.allowed_gids: -1 is not within"),
        ('[access]\nadmin_group = "no-such-group-x"', "access.admin_group: no group named"),
        ("[quotas]\nbytes_per_uid = -1", "quotas.bytes_per_uid: -1 is not within 0.."),
        ("[limits]\nmax_width = ", "not valid TOML: Invalid value (at line 2, column 13)"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as bad:
        config.load(path)
    assert str(bad.value).startswith(f"{path}: ")
    assert message in str(bad.value)


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    """Latin-1 where UTF-8 belongs is a ConfigError naming the line, not a UnicodeDecodeError
    (which no caller catches: it ended the daemon on SIGHUP)."""
    path = tmp_path / "primed.toml"
    path.write_bytes(b'log_level = "info"\n# caf\xe9\n')
    with pytest.raises(ConfigError) as bad:
        config.load(str(path))
    assert str(bad.value) == f"{path}: not valid TOML: not UTF-8: byte 0xe9 (at line 2, column 6)"


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"/nothing\.toml: cannot read: No such file"):
        config.load(str(tmp_path / "nothing.toml"))


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[limits]\nmax_width = 100\nmax_height = 100\nbackend = "drm"')
    with pytest.raises(ConfigError, match=r"unknown key limits\.backend"):
        config.load(path)
    path = write(tmp_path, 'backend = "drm"\n[limits]\nmax_width = 100\nmax_height = 100\n')
    loaded = config.load(path, {"limits.max_width": 300, "backend": "memfd"})
    assert (loaded.limits.max_width, loaded.limits.max_height) == (300, 100)
    assert loaded.backend == "memfd"
    with pytest.raises(ConfigError, match=r"^command line: --max-size: 4294967296 is not"):
        config.load(path, {"limits.max_size": 1 << 32})


def test_what_a_reload_cannot_change() -> None:
    old = Config()
    new = Config(backend="memfd", socket="/x", limits=Limits(1, 1, 1, 1), log_level="debug")
    assert config.restart_needed(old, new) == ["backend", "socket"]


# --- a daemon ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[limits]\nmax_width = "wide"\n', "limits.max_width: expected an integer, got 'wide'"),
        (b"# \xff\n", "not valid TOML: not UTF-8: byte 0xff (at line 1, column 3)"),
        (None, "cannot read: No such file or directory"),
    ],
)
def test_a_bad_file_at_start(sock_dir: Path, text: str | bytes | None, message: str) -> None:
    if isinstance(text, bytes):
        (sock_dir / "primed.toml").write_bytes(text)
    path = write(sock_dir, text) if isinstance(text, str) else str(sock_dir / "primed.toml")
    if text is None:
        path = str(sock_dir / "absent.toml")
    socket_path = str(sock_dir / "primed.sock")
    done = subprocess.run(
        [sys.executable, "-m", "primed", "serve", "--config", path, "--socket", socket_path],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert f"primed: ERROR: {path}: {message}" in done.stderr
    assert not os.path.lexists(socket_path)


def reload(daemon: Daemon, what: str) -> None:
    """SIGHUP, then wait until the log says ``what`` once more than it did."""
    before = daemon.log().count(what)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.log().count(what) > before, f"{what!r} in the daemon's log")


def test_reload_keeps_clients_and_applies_the_new_file(spawn: StartDaemon, sock_dir: Path) -> None:
    path = write(sock_dir, "[limits]\nmax_width = 100\n[quotas]\nbuffers_per_client = 1\n")
    daemon = spawn("--config", path, "--max-height", "50")
    with primed.connect(daemon.socket) as client:
        assert (client.info.limits.max_width, client.info.limits.max_height) == (100, 50)
        held = client.allocate(100, 50)
        with pytest.raises(primed.ServerError, match="quota: 1 buffers per client"):
            client.allocate(1, 1)

        write(
            sock_dir,
            "[limits]\nmax_width = 200\nmax_height = 999\n[quotas]\nbuffers_per_client = 3\n",
        )
        reload(daemon, "reloaded; 1 client(s) stay connected")
        wider = client.allocate_many(200, 50, "XR24", 2)  # the same connection, under the new rules
        with pytest.raises(primed.ServerError, match="quota: 3 buffers per client; 3 held"):
            client.allocate(1, 1)
        with primed.connect(daemon.socket) as newcomer:
            # --max-height was given: the flag still beats the file.
            assert (newcomer.info.limits.max_width, newcomer.info.limits.max_height) == (200, 50)

        write(sock_dir, "[limits]\nmax_width = 300\n[quotas]\nbuffers_per_client = -5\n")
        reload(daemon, "reload refused, the running configuration stays")
        assert f"{path}: quotas.buffers_per_client: -5 is not within" in daemon.log()
        with pytest.raises(primed.ServerError) as wide:
            client.allocate(300, 1)  # the old limit holds
        assert wide.value.code == ErrorCode.LIMIT_EXCEEDED
        client.release(held, *wider)
        client.release(*client.allocate_many(200, 50, "XR24", 3))

        Path(path).write_bytes(b"[limits]\nmax_width = 300 # \x80\n")
        reload(daemon, "reload refused, the running configuration stays")
        assert f"{path}: not valid TOML: not UTF-8: byte 0x80 (at line 2, column 19)" in (
            daemon.log()
        )
        assert daemon.process.poll() is None
        with pytest.raises(primed.ServerError):
            client.allocate(300, 1)

        os.unlink(path)
        reload(daemon, "reload refused, the running configuration stays")
        assert "cannot read: No such file or directory" in daemon.log()
        write(sock_dir, 'device = "/dev/dri/card9"\n')
        reload(daemon, "reloaded; 1 client(s) stay connected")
        assert "reload: device changed; that takes a restart" in daemon.log()
        client.release(*client.allocate_many(1, 1, "XR24", 10))  # the quota went with its key
    assert can_connect(daemon.socket)


def test_a_restart_warning_holds_until_the_file_matches_what_runs(
    spawn: StartDaemon, sock_dir: Path
) -> None:
    """A reload applies no device change, so each reload compares against the device
    the daemon started with, not against the file read last."""
    path = write(sock_dir, 'device = "/dev/dri/card7"\n')
    daemon = spawn("--config", path)
    warning = "reload: device changed; that takes a restart"
    warned = []
    for device in ("card8", "card8", "card7", "card8"):
        write(sock_dir, f'device = "/dev/dri/{device}"\n')
        before = daemon.log().count(warning)
        reload(daemon, "reloaded; 0 client(s) stay connected")
        warned.append(daemon.log().count(warning) - before)
    assert warned == [1, 1, 0, 1], daemon.log()


def test_a_device_named_as_the_one_picked_is_no_change() -> None:
    running = Config()  # no device: the daemon picked one, /dev/dri/card0
    assert config.restart_needed(running, Config(device="/dev/dri/card0"), "/dev/dri/card0") == []
    assert config.restart_needed(running, Config(device="/dev/dri/card1"), "/dev/dri/card0") == [
        "device"
    ]
    assert config.restart_needed(running, running, "/dev/dri/card0") == []
    assert config.restart_needed(Config(device="/dev/dri/card0"), running, "/dev/dri/card0") == [
        "device"
    ]


def test_dumb_buffers_are_not_bounded_by_the_fd_limit() -> None:
    # A memfd buffer holds one of the daemon's fds, a dumb buffer a GEM handle: only
    # memfd's buffer bound and quotas are cut from RLIMIT_NOFILE.
    memfd = config.load(None, {"backend": "memfd"}, nofile=1024, memory=1 << 34).policy
    drm = config.load(None, {"backend": "drm"}, nofile=1024, memory=1 << 34).policy
    assert memfd.bounds.buffers == 480 and memfd.quotas.buffers_per_uid == 60
    assert drm.bounds.buffers == 1 << 20 and drm.quotas.buffers_per_uid == 1 << 17
    assert drm.bounds.connections == memfd.bounds.connections == 240
    assert drm.quotas.bytes_per_uid == memfd.quotas.bytes_per_uid == 1 << 31


def test_several_allocators(tmp_path: Path) -> None:
    text = 'device = ["/dev/dri/card0", "/dev/dri/card1"]\nheap = "system"\nudmabuf = true\n'
    loaded = config.load(write(tmp_path, text), nofile=4096)
    assert loaded.devices == ("/dev/dri/card0", "/dev/dri/card1")
    assert (loaded.heap, loaded.udmabuf) == (("system",), True)
    # One device, in the file or on the command line, is the string it always was.
    one = config.load(None, {"device": ["/dev/dri/card1"], "heap": ["system", "reserved"]})
    assert (one.device, one.devices, one.heap) == (
        "/dev/dri/card1",
        ("/dev/dri/card1",),
        ("system", "reserved"),
    )
    assert config.load(write(tmp_path, "heap = []\n")).heap == ()
    # Each is a restart-only key.
    assert config.restart_needed(Config(), loaded) == ["device", "heap", "udmabuf"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device = []", "device: expected a non-empty string or an array of them"),
        (
            'device = ["/dev/dri/card0", "/dev/dri/card0"]',
            "device: '/dev/dri/card0' is named twice",
        ),
        ('heap = "a/b"', "heap: 'a/b' is not a heap name"),
        ("heap = [1]", "heap: expected a non-empty string"),
        ('udmabuf = "yes"', "udmabuf: expected true or false, got 'yes'"),
    ],
)
def test_bad_allocator_keys(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(write(tmp_path, text + "\n"))
