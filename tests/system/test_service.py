"""primed as users install it: the README's install section under systemd 252 as PID 1,
then what the README claims, checked as unprivileged users. The tests run in file order
and each sets up the state it needs (a stopped service, a configuration file)."""

from __future__ import annotations

import grp
import itertools
import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.system.conftest import (
    CONFIG,
    PYTHON,
    SOCKET,
    Journal,
    as_user,
    python_as,
    restart_with,
    run,
    show,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("installed")

#: As alice: connect with the installed library, allocate, write and read through a map.
ALLOCATE_AND_MAP = """
import json, os, primed
with primed.connect(name="system test") as client:
    buffer = client.allocate(64, 64, "XR24")
    with buffer.map() as pixels:
        pixels[:4] = b"\\x01\\x02\\x03\\x04"
    with buffer.map(write=False) as pixels:
        seen = bytes(pixels[:4]).hex()
    node = client.info.node
    buffer.close()
opened = {}
for path in ("/dev/dri/card0", "/dev/dri/renderD128"):
    try:
        os.close(os.open(path, os.O_RDWR))
        opened[path] = "opened"
    except OSError as e:
        opened[path] = e.strerror
print(json.dumps({"seen": seen, "node": node, "opened": opened}))
"""

#: Each of N connections: how long until the daemon's unasked ERROR, and what it said.
REFUSED = """
import json, socket, sys, time, primed
from primed.wire import protocol
answers = []
for _ in range(int(sys.argv[1])):
    start = time.monotonic()
    try:
        with primed.connect(name="burst") as client:
            answers.append({"served": True})
            continue
    except primed.ServerError as e:
        answers.append({"code": e.code.name, "text": e.text,
                        "seconds": time.monotonic() - start})
# Unasked: a raw connection that sends nothing still reads the ERROR, serial 0.
with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
    raw.settimeout(10)
    raw.connect("/run/primed/primed.sock")
    serial, message = protocol.decode(raw.recv(65536), 0, "reply")
    eof = raw.recv(65536)
print(json.dumps({"answers": answers, "raw": [serial, type(message).__name__, eof.hex()]}))
"""


def main_pid() -> int:
    return int(show("primed.service", "MainPID"))


def status_text() -> str:
    return show("primed.service", "StatusText")


def wait_status(prefix: str, timeout: float = 30.0) -> str:
    wait_for(lambda: status_text().startswith(prefix), f"STATUS= starting {prefix!r}", timeout)
    return status_text()


def info_as(user: str) -> str:
    done = as_user(user, "primed", "info")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


# --- the install section and socket activation ----------------------------------------------


def test_the_install_section_ran(installed: dict[str, float]) -> None:
    assert installed["commands"] >= 8
    assert show("primed.socket", "ActiveState") == "active"
    assert show("primed.socket", "UnitFileState") == "enabled"
    assert show("primed.service", "ActiveState") == "inactive"  # nobody has connected yet
    primed_group = grp.getgrnam("primed")
    assert primed_group.gr_gid < 1000  # a system group, as systemd-sysusers makes them
    info = os.stat(SOCKET)
    assert stat.S_ISSOCK(info.st_mode)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, primed_group.gr_gid, 0o660)


def test_socket_activation() -> None:
    journal = Journal()
    shown = info_as("alice")
    assert "backend: drm" in shown
    assert re.search(r"device:  /dev/dri/card\d \(virtio_gpu ", shown), shown
    assert show("primed.service", "ActiveState") == "active"
    journal.wait(f"listens on {SOCKET}")  # "socket activation: fd 3 (NAME) listens on ..."
    summary = r"\d+ client\(s\), \d+ buffer\(s\), \d+\.\d MiB"
    assert re.fullmatch(f"serving drm buffers on {SOCKET}: {summary}", status_text())
    shown = run("systemctl", "status", "--no-pager", "primed").stdout
    assert f'Status: "serving drm buffers on {SOCKET}: ' in shown


def test_the_hardening_is_in_force() -> None:
    if show("primed.service", "ActiveState") != "active":
        info_as("alice")
    fields = proc_status(main_pid())
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # a filter
    uid = int(fields["Uid"].split()[0])
    assert 61184 <= uid <= 65519  # DynamicUser='s range
    groups = {int(g) for g in fields["Groups"].split()}
    # SupplementaryGroups=: video for the card nodes, render for the import matrix's probe;
    # never primed, the clients' group.
    assert {grp.getgrnam("video").gr_gid, grp.getgrnam("render").gr_gid} <= groups
    assert grp.getgrnam("primed").gr_gid not in groups
    limits = Path(f"/proc/{main_pid()}/limits").read_text()
    assert re.search(r"Max open files\s+524288\s+524288", limits), limits  # LimitNOFILE=


def test_security_score_online_matches_offline() -> None:
    online = run("systemd-analyze", "security", "--no-pager", "primed.service").stdout
    offline = run(
        "systemd-analyze", "security", "--offline=yes", "/etc/systemd/system/primed.service"
    ).stdout
    pattern = r"Overall exposure level for primed\.service: (\d+\.\d)"
    scores = [re.search(pattern, text) for text in (online, offline)]
    assert scores[0] is not None and scores[1] is not None, online + offline
    assert float(scores[0][1]) <= 1.2
    assert scores[0][1] == scores[1][1]


# --- the groups ------------------------------------------------------------------------------


def test_the_client_group_gets_buffers_and_opens_no_node() -> None:
    render = os.stat("/dev/dri/renderD128")
    assert (grp.getgrgid(render.st_gid).gr_name, stat.S_IMODE(render.st_mode)) == ("render", 0o660)
    result = python_as("alice", ALLOCATE_AND_MAP)
    assert isinstance(result, dict)
    assert result["seen"] == "01020304"
    assert result["node"].startswith("/dev/dri/card")
    assert result["opened"] == {
        "/dev/dri/card0": "Permission denied",
        "/dev/dri/renderD128": "Permission denied",
    }


def test_video_opens_card_nodes_but_not_the_socket() -> None:
    done = as_user("bob", "primed", "info")
    assert done.returncode == 1
    assert "Permission denied" in done.stderr
    opened = as_user("bob", PYTHON, "-c", "import os; os.open('/dev/dri/card0', os.O_RDWR)")
    assert opened.returncode == 0, opened.stderr  # and so could make dumb buffers itself


def test_the_import_matrix_has_the_render_node() -> None:
    """The service measured its import matrix on the render node (it is in render): a
    client of the primed group alone, which may not open the node, is told what an import
    there gives."""
    done = as_user("alice", "primed", "info", "--json")
    assert done.returncode == 0, done.stderr
    described = json.loads(done.stdout)
    assert described["imports"] == [
        {"node": "/dev/dri/renderD128", "driver": "virtio_gpu", "imports": {"card0": "ok"}}
    ], described


def test_importing_on_a_render_node_needs_render() -> None:
    denied = as_user("alice", "primed", "alloc", "64x64", "--import", "/dev/dri/renderD128")
    assert denied.returncode == 1
    assert "cannot open /dev/dri/renderD128 to import on it: Permission denied" in denied.stderr
    assert "its group render may open it" in denied.stderr
    allowed = as_user("carol", "primed", "alloc", "64x64", "--import", "/dev/dri/renderD128")
    assert allowed.returncode == 0, allowed.stderr
    assert re.search(r"buffer 1: 64x64 XR24 .* handle \d+", allowed.stdout), allowed.stdout


# --- reload ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("example_config")
def test_reload_with_good_bad_and_non_utf8_files() -> None:
    info_as("alice")
    pid = main_pid()
    restarts = show("primed.service", "NRestarts")
    journal = Journal()
    # A device other than the one running: the reload takes the limits and warns
    # that the device needs a restart (the node is not opened, so it need not exist).
    CONFIG.write_text('device = "/dev/dri/card9"\n[limits]\nmax_width = 1000\n')
    run("systemctl", "reload", "primed")
    journal.wait("reloaded; 0 client(s) stay connected")
    assert "limits:  1000x16384," in info_as("alice")

    CONFIG.write_text("[limits]\nmax_width = -1\n")
    run("systemctl", "reload", "primed")
    wait_for(lambda: status_text().endswith("; last reload refused, see the log"), "refusal")
    journal.wait(f"{CONFIG}: limits.max_width: -1 is not within 1..4294967295")
    assert "limits:  1000x16384," in info_as("alice")  # the running configuration stays

    CONFIG.write_bytes(b"[limits]\nmax_width = 2000 # \xe9t\xe9\n")
    run("systemctl", "reload", "primed")
    journal.wait(f"{CONFIG}: not valid TOML: not UTF-8: byte 0xe9 (at line 2, column 20)")
    assert "limits:  1000x16384," in info_as("alice")
    assert main_pid() == pid  # not one reload killed it
    assert show("primed.service", "NRestarts") == restarts

    # The journal's priorities come from the daemon's <N> prefixes.
    entries = journal.entries()

    def priority(text: str) -> set[str]:
        return {e["PRIORITY"] for e in entries if text in str(e.get("MESSAGE", ""))}

    assert priority("reload refused, the running configuration stays") == {"3"}
    assert priority("reload: device changed; that takes a restart") == {"4"}
    assert priority("reloaded; 0 client(s) stay connected") == {"6"}
    assert not [m for m in journal.messages() if re.match(r"<\d>", m)]


# --- the watchdog ----------------------------------------------------------------------------

DROP_IN = Path("/etc/systemd/system/primed.service.d")


def test_the_watchdog() -> None:
    """Alive past WatchdogSec= (shortened to 8 s by a drop-in, so the test stays short);
    a SIGSTOPped daemon is killed and started again."""
    DROP_IN.mkdir(exist_ok=True)
    (DROP_IN / "watchdog.conf").write_text("[Service]\nWatchdogSec=8s\n")
    try:
        run("systemctl", "daemon-reload")
        run("systemctl", "restart", "primed.service")
        pid = main_pid()
        started = int(show("primed.service", "ExecMainStartTimestampMonotonic"))
        restarts = int(show("primed.service", "NRestarts"))
        # A ping after WatchdogSec has passed since the start: it lived past the timeout.
        wait_for(
            lambda: int(show("primed.service", "WatchdogTimestampMonotonic")) > started + 9_000_000,
            "a watchdog ping 9 s after the start",
        )
        assert (main_pid(), show("primed.service", "ActiveState")) == (pid, "active")

        journal = Journal()
        os.kill(pid, signal.SIGSTOP)
        journal.wait("Watchdog timeout", timeout=30)
        wait_for(lambda: main_pid() not in (0, pid), "a new main process", timeout=60)
        wait_status("serving drm buffers")
        assert int(show("primed.service", "NRestarts")) == restarts + 1
        assert "backend: drm" in info_as("alice")
    finally:
        (DROP_IN / "watchdog.conf").unlink()
        run("systemctl", "daemon-reload")
        run("systemctl", "restart", "primed.service")


# --- a bad configuration at start ------------------------------------------------------------


@pytest.mark.usefixtures("example_config")
def test_a_bad_file_at_start_is_told_to_clients_until_a_reload_mends_it() -> None:
    restart_with("[limits]\nmax_width = -1\n")
    journal = Journal()
    first = as_user("alice", "primed", "info")  # starts the service, which refuses
    assert first.returncode == 1
    assert (
        f"primed info: INTERNAL: primed can't serve: {CONFIG}: limits.max_width: -1 is not "
        "within 1..4294967295; mend that, then run: systemctl reload primed"
    ) in first.stderr
    pid = main_pid()
    restarts = show("primed.service", "NRestarts")
    assert status_text().startswith(f"refusing clients: {CONFIG}: limits.max_width: -1")

    # A burst of clients: each told at once, and not one more start.
    result = python_as("alice", REFUSED, "40")
    assert isinstance(result, dict)
    answers = result["answers"]
    assert len(answers) == 40
    for answer in answers:
        assert answer["code"] == "INTERNAL", answer
        assert f"{CONFIG}: limits.max_width: -1 is not within" in answer["text"]
        assert answer["seconds"] < 1.0, answer
    assert result["raw"] == [0, "Error", ""]  # serial 0, unasked; then a clean end
    assert main_pid() == pid
    assert show("primed.service", "NRestarts") == restarts
    assert show("primed.socket", "ActiveState") == "active"
    assert show("primed.socket", "Result") == "success"
    assert os.path.exists(SOCKET)
    assert not [m for m in journal.messages() if "start-limit" in m]

    # Mended, and reloaded: it serves on the same socket, in the same process.
    CONFIG.write_text("[limits]\nmax_width = 500\n")
    run("systemctl", "reload", "primed")
    wait_status("serving drm buffers")
    assert "limits:  500x16384," in info_as("alice")
    assert main_pid() == pid


@pytest.mark.usefixtures("example_config")
def test_a_non_utf8_file_at_start_is_mended_by_the_next_start() -> None:
    restart_with(b"# \xff\n")
    first = as_user("alice", "primed", "info")
    assert first.returncode == 1
    assert f"{CONFIG}: not valid TOML: not UTF-8: byte 0xff (at line 1, column 3)" in first.stderr
    assert show("primed.service", "ActiveState") == "active"
    CONFIG.write_text("[limits]\nmax_width = 600\n")
    run("systemctl", "stop", "primed.service")
    assert "limits:  600x16384," in info_as("alice")  # the next start serves


@pytest.mark.usefixtures("example_config")
def test_a_card_node_that_wont_open_is_told_too() -> None:
    restart_with('device = "/dev/dri/card9"\n')
    first = as_user("alice", "primed", "info")
    assert first.returncode == 1
    assert "primed can't serve: open /dev/dri/card9: No such file or directory" in first.stderr
    CONFIG.write_text('device = "/dev/dri/card0"\n')
    run("systemctl", "reload", "primed")
    wait_status("serving drm buffers")
    assert "device:  /dev/dri/card0" in info_as("alice")


def test_starts_that_fail_anyway_keep_the_socket() -> None:
    """A start that fails outright (here ExecStart=/bin/false, as a broken install would)
    with a client waiting: retried every RestartSec=, past the default start limit of 5,
    and the socket stays; once mended, the waiting client is served, with no reset-failed."""
    DROP_IN.mkdir(exist_ok=True)
    (DROP_IN / "broken.conf").write_text("[Service]\nExecStart=\nExecStart=/bin/false\n")
    run("systemctl", "stop", "primed.service")
    run("systemctl", "daemon-reload")
    journal = Journal()
    waiting = None
    try:
        # Connects, then waits for the Welcome as long as it takes (timeout=None: the
        # client's default gives up on a handshake after a few seconds).
        waiting = subprocess_as_alice(
            "import primed, sys\n"
            "with primed.connect(name='patient', timeout=None) as c:\n"
            "    print(c.info.backend.name, flush=True)\n"
        )

        def failures() -> int:
            return sum("Failed with result 'exit-code'" in m for m in journal.messages())

        wait_for(lambda: failures() >= 6, "6 failed starts", timeout=90)
        starts = [
            int(e["__MONOTONIC_TIMESTAMP"])
            for e in journal.entries()
            if "Failed with result 'exit-code'" in str(e.get("MESSAGE", ""))
        ]
        gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(starts)]
        assert min(gaps) >= 1.9, gaps  # paced by RestartSec=2s, client or no client
        assert show("primed.socket", "ActiveState") == "active"
        assert os.path.exists(SOCKET)
        assert not [m for m in journal.messages() if "start-limit" in m]
    finally:
        (DROP_IN / "broken.conf").unlink()
        run("systemctl", "daemon-reload")
    assert waiting is not None
    out, err = waiting.communicate(timeout=60)
    assert (waiting.returncode, out) == (0, "DRM\n"), err
    assert show("primed.socket", "Result") == "success"


SETPRIV_ALICE = ["setpriv", "--reuid=alice", "--regid=alice", "--init-groups", "--reset-env"]


def subprocess_as_alice(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "setpriv",
            "--reuid=alice",
            "--regid=alice",
            "--init-groups",
            "--reset-env",
            PYTHON,
            "-c",
            code,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --- stop --------------------------------------------------------------------------------------


def test_stop_removes_the_socket() -> None:
    run("systemctl", "stop", "primed.socket", "primed.service")
    assert not os.path.lexists(SOCKET)
    done = as_user("alice", "primed", "info")
    assert done.returncode == 1
    assert "No such file or directory" in done.stderr
    run("systemctl", "start", "primed.socket")
    assert stat.S_ISSOCK(os.stat(SOCKET).st_mode)
    start = time.monotonic()
    assert "backend: drm" in info_as("alice")
    print(f"a socket-activated start answered in {time.monotonic() - start:.1f} s")
