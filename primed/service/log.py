"""Logging to stderr in a form journald reads well.

Under systemd (JOURNAL_STREAM is set) each line starts with a ``<N>`` syslog
priority, which journald turns into the entry's priority and strips; on a
terminal the level is written as a word instead.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def setup(level: str = "info") -> None:
    """Send the ``primed`` logger's records at ``level`` and above to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("primed: %(levelname)s: %(message)s"))
    logger = logging.getLogger("primed")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
