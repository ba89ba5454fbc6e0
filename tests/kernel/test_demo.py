"""The README's first command: examples/demo.py, as scripts/demo runs it in the VM.

The demo checks itself (for every allocator, the pixels process B reads back through
each import are the ones process A drew, and every render node's answer is the one
the import matrix gave) and exits 1 otherwise; this test runs it as a user would and
checks that it served every allocator this kernel has: both DRM devices on 6.1,
plus the system heap and udmabuf on 6.12.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.kernel.conftest import START_TIMEOUT, Nodes

DEMO = Path(__file__).parents[2] / "examples" / "demo.py"


def test_demo_serves_every_allocator(nodes: dict[str, Nodes]) -> None:
    expected = sorted(os.path.basename(nodes[d].card) for d in ("virtio_gpu", "vgem"))
    if os.path.exists("/dev/dma_heap/system"):
        expected.append("heap:system")
    if os.path.exists("/dev/udmabuf"):
        expected.append("udmabuf")
    done = subprocess.run(
        [sys.executable, "-u", str(DEMO)],
        check=False,
        capture_output=True,
        text=True,
        timeout=4 * START_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"for all {len(expected)} allocators, B saw exactly the pixels A drew" in out, out
    for name in expected:
        assert f": {name}: buffer " in out, out
        assert f"opened {name} buffer by token" in out, out
    # The matrix as the drivers behave: vgem's render node imports every buffer;
    # virtio-gpu's only its own (card0 or card1, whichever virtio-gpu's is).
    vgem_row = next(line for line in out.splitlines() if f"{nodes['vgem'].render} (vgem)" in line)
    assert vgem_row.split()[2:] == ["ok"] * len(expected), vgem_row
    virtio_row = next(
        line for line in out.splitlines() if f"{nodes['virtio_gpu'].render} (virtio_gpu)" in line
    )
    assert sorted(virtio_row.split()[2:]) == ["ENODEV"] * (len(expected) - 1) + ["ok"], virtio_row
