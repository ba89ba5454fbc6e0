"""QEMU's screen, read from inside the VM, through a folder both sides share.

The kernel tier runs as one pytest session inside the VM, but only the host can
ask QEMU for a screendump (QMP, on a socket outside the guest). So scripts/test
runs this module on the host beside the VM (``python -m tests.kernel.screendump
--qmp SOCKET --dir DIR --parent PID``), DIR being a folder the VM mounts read-write at the
same path, and a test in the guest calls :func:`screendump`:

1. the host side writes ``DIR/ready`` once it watches the folder;
2. the guest writes ``NAME.request`` (renamed into place, never seen half-written);
3. the host sends QMP ``screendump`` with ``DIR/NAME.ppm`` (QEMU has written the
   file when it replies), then writes ``NAME.done``, or ``NAME.error`` with the
   reason, and removes the request.

The host side stops when its parent, PID (the script that runs the VM), is gone.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

READY = "ready"


class ScreenUnavailable(Exception):
    """No screendump: the host side is not running, failed, or did not answer."""


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.rename(path)


def screendump(directory: str | os.PathLike[str], name: str, timeout: float = 60.0) -> bytes:
    """Guest side: the screen as QEMU's PPM (P6) bytes. Raises ScreenUnavailable."""
    folder = Path(directory)
    if not (folder / READY).exists():
        raise ScreenUnavailable(
            f"no screendump service watches {folder} (no {READY} file): scripts/test starts it"
        )
    ppm, done, error = (folder / f"{name}.{suffix}" for suffix in ("ppm", "done", "error"))
    _write(folder / f"{name}.request", "")
    deadline = time.monotonic() + timeout
    while not done.exists():
        if error.exists():
            raise ScreenUnavailable(f"the host could not take a screendump: {error.read_text()}")
        if time.monotonic() > deadline:
            raise ScreenUnavailable(f"no screendump within {timeout} s")
        time.sleep(0.05)
    try:
        return ppm.read_bytes()
    finally:
        ppm.unlink(missing_ok=True)
        done.unlink()


def qmp_screendump(qmp: str, filename: Path, timeout: float = 30.0) -> None:
    """Host side: one QMP session that has QEMU write its screen to ``filename``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(qmp)
        with sock.makefile("rwb") as stream:

            def receive() -> dict[str, Any]:
                while True:
                    line = stream.readline()
                    if not line:
                        raise ScreenUnavailable("QEMU closed the QMP connection")
                    message: dict[str, Any] = json.loads(line)
                    if "event" not in message:
                        return message

            if "QMP" not in receive():
                raise ScreenUnavailable(f"{qmp} does not speak QMP")
            arguments = {"filename": str(filename)}
            for command in (
                {"execute": "qmp_capabilities"},
                {"execute": "screendump", "arguments": arguments},
            ):
                stream.write(json.dumps(command).encode() + b"\n")
                stream.flush()
                reply = receive()
                if "error" in reply:
                    raise ScreenUnavailable(f"{command['execute']}: {reply['error']}")


def serve(directory: Path, qmp: str, parent: int, poll: float = 0.05) -> None:
    """Host side: answer requests in ``directory`` while process ``parent`` is our parent."""
    _write(directory / READY, f"{os.getpid()}\n")
    while os.getppid() == parent:
        for request in sorted(directory.glob("*.request")):
            name = request.name.removesuffix(".request")
            try:
                qmp_screendump(qmp, directory / f"{name}.ppm")
            except (OSError, ValueError, ScreenUnavailable) as e:
                _write(directory / f"{name}.error", f"{type(e).__name__}: {e}\n")
            else:
                _write(directory / f"{name}.done", "")
            request.unlink()
        time.sleep(poll)


def main() -> None:
    parser = argparse.ArgumentParser(description="Answer a VM's screendump requests.")
    parser.add_argument("--qmp", required=True, help="QEMU's QMP socket")
    parser.add_argument("--dir", required=True, type=Path, help="the folder shared with the VM")
    parser.add_argument("--parent", required=True, type=int, help="stop when this pid is gone")
    args = parser.parse_args()
    serve(args.dir, args.qmp, args.parent)


if __name__ == "__main__":
    main()
