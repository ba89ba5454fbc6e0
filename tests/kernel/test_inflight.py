"""Flow control and fds in flight on the VM's kernel, with dma-buf fds from vgem.

The transport waits on writability because an AF_UNIX socket polls writable exactly
while SIOCOUTQ is at most a quarter of its send buffer (unix_writable): checked here
on this kernel as on the host's. And the kernel's limit on fds in flight (the
sender's RLIMIT_NOFILE; root is exempt) is met by a daemon of an unprivileged uid
serving vgem buffers, while an attacker uid opens one shared buffer over and over,
reading nothing, and a victim uid keeps allocating.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from tests.host.test_backpressure import check_writability_rule
from tests.host.test_inflight import DAEMON_UID, attack_and_check, start_unprivileged
from tests.kernel.conftest import START_TIMEOUT, Nodes


def test_writability_is_the_room_threshold() -> None:
    check_writability_rule()


def test_an_attacker_uid_on_vgem_leaves_other_uids_served(nodes: dict[str, Nodes]) -> None:
    card = nodes["vgem"].card
    before = os.stat(card)
    directory = Path(tempfile.mkdtemp(prefix="primed-", dir="/tmp"))
    # The daemon's uid must open the card node: give it the node's group for the test.
    os.chown(card, -1, DAEMON_UID)
    os.chmod(card, 0o660)
    try:
        daemon = start_unprivileged(
            directory, "--device", card, groups=(DAEMON_UID,), timeout=START_TIMEOUT
        )
        try:
            attack_and_check(daemon, "kernel (vgem)", timeout=START_TIMEOUT)
        finally:
            daemon.stop(signal.SIGTERM, timeout=60)
    finally:
        os.chown(card, -1, before.st_gid)
        os.chmod(card, before.st_mode & 0o7777)
        shutil.rmtree(directory, ignore_errors=True)
