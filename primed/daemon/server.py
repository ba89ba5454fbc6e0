"""The daemon's public names, where they have always been importable from.

The daemon is three layers: :mod:`primed.daemon.core` (sessions, buffers,
tokens, quotas, every request's rules; no I/O), :mod:`primed.daemon.transport`
(the accept loop, each client's socket, flow control and timeouts) and
:mod:`primed.daemon.process` (binding, signals, systemd). This module re-exports
what callers use, so that ``from primed.daemon.server import run`` keeps working.
"""

from __future__ import annotations

from primed.daemon.core import LIST_PAGE_BUFFERS, LIST_PAGE_CLIENTS, Core
from primed.daemon.process import bind, run
from primed.daemon.sessions import Session
from primed.daemon.transport import QUEUED_BYTES, SEND_TIMEOUT, Daemon, credentials

__all__ = [
    "LIST_PAGE_BUFFERS",
    "LIST_PAGE_CLIENTS",
    "QUEUED_BYTES",
    "SEND_TIMEOUT",
    "Core",
    "Daemon",
    "Session",
    "bind",
    "credentials",
    "run",
]
