"""The unit grants the dma-buf heaps and udmabuf: primed installed as the README says,
serving a card node, the system heap and udmabuf in one daemon under systemd, on a kernel
that has them (Debian's 6.12):

    PRIMED_VM_KERNEL=$(scripts/kernel) scripts/systemd-vm tests/system/test_allocators.py

Nothing here is skipped: on a kernel without heaps or udmabuf these tests fail, naming the
node. Each line of the unit that grants a node (each DeviceAllow=, each group of
SupplementaryGroups=) is taken out in turn by a drop-in, and the daemon must then refuse,
naming the node that line grants and the kernel's answer: EPERM from the device cgroup
for a DeviceAllow= line, EACCES from the node's mode for a group. The tests run in file
order; the last stops the service and puts the unit and the configuration back.
"""

from __future__ import annotations

import grp
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.conftest import (
    CLONE,
    CONFIG,
    Journal,
    as_user,
    python_as,
    restart_with,
    run,
    show,
    wait_for,
)

pytestmark = pytest.mark.usefixtures("installed")

UNIT = Path("/etc/systemd/system/primed.service")
DROP_IN = Path("/etc/systemd/system/primed.service.d/without.conf")
#: The three allocators, in the order the daemon opens them (and so the order it names
#: the first that fails).
ALLOCATORS_CONFIG = 'device = "/dev/dri/card0"\nheap = "system"\nudmabuf = true\n'
NAMES = ["card0", "heap:system", "udmabuf"]
HEAP = "/dev/dma_heap/system"
UDMABUF = "/dev/udmabuf"
CARD = "/dev/dri/card0"

#: As alice: a buffer from each allocator by name, written and read back through a map,
#: and what the kernel says made its dma-buf (fdinfo's exp_name).
EACH_ALLOCATOR = """
import json, os, primed
out = {}
with primed.connect(name="allocators") as client:
    out["listed"] = [[a.name, a.node] for a in client.allocators]
    for n, allocator in enumerate(client.allocators):
        buffer = client.allocate(64, 64, "XR24", allocator=allocator.name)
        pattern = bytes((n * 37 + i) % 251 for i in range(buffer.size))
        with buffer.map() as pixels:
            pixels[:] = pattern
        with buffer.map(write=False) as pixels:
            same = bytes(pixels) == pattern
        fdinfo = open(f"/proc/self/fdinfo/{buffer.fd}").read().splitlines()
        exp = [line.split(":", 1)[1].strip() for line in fdinfo if line.startswith("exp_name:")]
        out[allocator.name] = {"allocator": buffer.allocator, "backend": buffer.backend.name,
                               "size": buffer.size, "same": same, "exp_name": exp}
        client.release(buffer)
print(json.dumps(out))
"""


def unit_lines(key: str) -> list[str]:
    """The installed unit's values of ``key``, one per line that sets it."""
    prefix = f"{key}="
    return [
        line[len(prefix) :] for line in UNIT.read_text().splitlines() if line.startswith(prefix)
    ]


def node_info(path: str) -> tuple[int, str, int]:
    info = os.stat(path)
    assert stat.S_ISCHR(info.st_mode), path
    return info.st_uid, grp.getgrgid(info.st_gid).gr_name, stat.S_IMODE(info.st_mode)


@pytest.fixture(scope="module", autouse=True)
def allocators_config(installed: dict[str, float]) -> Iterator[None]:
    """The configuration serving all three; at the end, the shipped one, the unit without
    drop-ins, and the service stopped (the socket stays)."""
    restart_with(ALLOCATORS_CONFIG)
    yield
    DROP_IN.unlink(missing_ok=True)
    run("systemctl", "daemon-reload")
    run("systemctl", "stop", "primed.service")
    CONFIG.write_text((CLONE / "systemd" / "primed.toml").read_text())
    os.chmod(CONFIG, 0o644)


def test_the_nodes_have_the_groups_the_unit_joins() -> None:
    # Fails, not skips, on a kernel without them: os.stat raises FileNotFoundError.
    assert node_info(HEAP) == (0, "primed-heap", 0o640)  # primed.rules, applied by the README
    assert node_info(UDMABUF) == (0, "kvm", 0o660)  # Debian's own rule
    assert node_info(CARD) == (0, "video", 0o660)
    heap_group = grp.getgrnam("primed-heap")
    assert heap_group.gr_gid < 1000  # a system group, as systemd-sysusers makes them
    assert heap_group.gr_mem == []  # the service's alone
    assert unit_lines("SupplementaryGroups") == ["video render primed-heap kvm"]


def test_a_client_gets_a_buffer_from_each_allocator_by_name() -> None:
    journal = Journal()
    result = python_as("alice", EACH_ALLOCATOR)  # alice: in primed, no device group
    assert isinstance(result, dict)
    assert result["listed"] == [[NAMES[0], CARD], [NAMES[1], HEAP], [NAMES[2], UDMABUF]]
    for name in NAMES:
        got = result[name]
        assert (got["allocator"], got["backend"], got["same"]) == (name, "DRM", True), got
        assert got["size"] >= 64 * 64 * 4, got
    # Who made each dma-buf, as the kernel says: the heap, udmabuf, and the card's driver.
    assert result["heap:system"]["exp_name"] == ["system"]
    assert result["udmabuf"]["exp_name"] == ["udmabuf"]
    assert result["card0"]["exp_name"] == ["virtio_gpu"]
    assert "serving drm buffers" in show("primed.service", "StatusText")
    # The daemon runs with the unit's groups, the dynamic gid of primed-heap among them.
    status = Path(f"/proc/{show('primed.service', 'MainPID')}/status").read_text()
    fields = {k: v.strip() for k, _, v in (line.partition(":") for line in status.splitlines())}
    groups = {int(g) for g in fields["Groups"].split()} - {int(fields["Gid"].split()[0])}
    assert groups == {grp.getgrnam(g).gr_gid for g in ("video", "render", "primed-heap", "kvm")}
    # systemd found every node the unit names (on 6.1 it warns that /dev/udmabuf is missing).
    assert not [m for m in journal.messages() if "Couldn't stat device" in m]


def test_the_security_score_holds_while_serving_them() -> None:
    """The grants cost no exposure: the running service scores as the unit does offline
    (test_service.py checks the same on 6.1, where the nodes are missing)."""
    assert show("primed.service", "StatusText").startswith("serving drm buffers")
    online = run("systemd-analyze", "security", "--no-pager", "primed.service").stdout
    offline = run("systemd-analyze", "security", "--offline=yes", str(UNIT)).stdout
    pattern = r"Overall exposure level for primed\.service: (\d+\.\d)"
    scores = [re.search(pattern, text) for text in (online, offline)]
    assert scores[0] is not None and scores[1] is not None, online + offline
    assert float(scores[0][1]) <= 1.2
    assert scores[0][1] == scores[1][1]
    allowed = show("primed.service", "DeviceAllow")
    assert all(line in allowed for line in unit_lines("DeviceAllow")), allowed


def without(key: str, value: str) -> str:
    """A drop-in that resets ``key`` and sets it again without ``value``."""
    if key == "DeviceAllow":
        kept = [v for v in unit_lines(key) if v != value]
        assert len(kept) == len(unit_lines(key)) - 1, (value, unit_lines(key))
        lines = [f"{key}="] + [f"{key}={v}" for v in kept]
    else:
        (groups,) = unit_lines(key)
        kept = [g for g in groups.split() if g != value]
        assert len(kept) == len(groups.split()) - 1, (value, groups)
        lines = [f"{key}=", f"{key}={' '.join(kept)}"]
    return "[Service]\n" + "\n".join(lines) + "\n"


#: Each line that grants a node, the node, and what opening it then gives.
LINES = [
    ("DeviceAllow", "char-drm rw", CARD, "Operation not permitted"),
    ("DeviceAllow", "char-dma_heap r", HEAP, "Operation not permitted"),
    ("DeviceAllow", "/dev/udmabuf rw", UDMABUF, "Operation not permitted"),
    ("SupplementaryGroups", "video", CARD, "Permission denied"),
    ("SupplementaryGroups", "primed-heap", HEAP, "Permission denied"),
    ("SupplementaryGroups", "kvm", UDMABUF, "Permission denied"),
]


def test_every_granting_line_of_the_unit_is_tried() -> None:
    assert sorted(v for k, v, _, _ in LINES if k == "DeviceAllow") == sorted(
        unit_lines("DeviceAllow")
    )
    # render grants no allocator's node: test_without_render_the_matrix_is_empty tries it.
    assert sorted(["render"] + [v for k, v, _, _ in LINES if k == "SupplementaryGroups"]) == sorted(
        unit_lines("SupplementaryGroups")[0].split()
    )


#: The import matrix the service measures on virtio-gpu's render node: it imports its own
#: buffers, and refuses every other dma-buf with ENODEV.
MATRIX = [
    {
        "node": "/dev/dri/renderD128",
        "driver": "virtio_gpu",
        "imports": {"card0": "ok", "heap:system": "ENODEV", "udmabuf": "ENODEV"},
    }
]


def test_the_service_measures_the_import_matrix() -> None:
    done = as_user("alice", "primed", "info", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imports"] == MATRIX


def test_without_render_the_matrix_is_empty_and_the_daemon_says_why() -> None:
    DROP_IN.parent.mkdir(exist_ok=True)
    DROP_IN.write_text(without("SupplementaryGroups", "render"))
    try:
        run("systemctl", "stop", "primed.service")
        run("systemctl", "daemon-reload")
        journal = Journal()
        done = as_user("alice", "primed", "info", "--json")  # starts it: it serves
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["imports"] == []
        said = "import matrix: /dev/dri/renderD128 left out: Permission denied; "
        said += "the daemon's user needs group render"
        journal.wait(said)
    finally:
        DROP_IN.unlink()
        run("systemctl", "daemon-reload")
    run("systemctl", "stop", "primed.service")
    done = as_user("alice", "primed", "info", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["imports"] == MATRIX


@pytest.mark.parametrize(("key", "value", "node", "error"), LINES, ids=[v for _, v, _, _ in LINES])
def test_without_the_line_the_allocator_fails_naming_its_node(
    key: str, value: str, node: str, error: str
) -> None:
    DROP_IN.parent.mkdir(exist_ok=True)
    DROP_IN.write_text(without(key, value))
    try:
        run("systemctl", "stop", "primed.service")
        run("systemctl", "daemon-reload")
        shown = show("primed.service", key)
        if key == "SupplementaryGroups":
            assert value not in shown.split(), shown
        else:
            assert value.split(maxsplit=1)[0] not in shown, shown
        done = as_user("alice", "primed", "info")  # starts it; it refuses
        assert done.returncode == 1, done.stdout
        # The daemon names the node and the kernel's answer, and how to mend.
        assert f"primed can't serve: open {node}: {error}" in done.stderr, done.stderr
        assert show("primed.service", "StatusText").startswith(
            f"refusing clients: open {node}: {error}"
        )
    finally:
        DROP_IN.unlink()
        run("systemctl", "daemon-reload")
    # With the line back, the same configuration serves.
    run("systemctl", "stop", "primed.service")
    done = as_user("alice", "primed", "info")
    assert done.returncode == 0, done.stderr
    wait_for(
        lambda: show("primed.service", "StatusText").startswith("serving drm buffers"),
        "the service serving again",
    )
