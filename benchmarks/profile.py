"""Where a server's CPU goes: py-spy samples of a running process, summed per function.

py-spy (a sampling profiler that reads the interpreter's stacks from outside)
records the process while the benchmark drives it; its raw output (one line per
distinct stack, ``frame;frame;... count``) is summed here into each function's
share of the samples: ``self`` (the sample's innermost frame) and ``total`` (the
function anywhere on the stack, once per sample).

Only samples that hold the GIL count (py-spy's ``--gil``): py-spy's own idle
detection does not tell a thread blocked in recvmsg or epoll_wait from one
running on this machine, so without it waiting would swamp the work. The
shares are therefore of the time spent running Python (the interpreter, and C
code called with the GIL held): of the process's user CPU, roughly; the system
calls, made with the GIL released, are its system CPU, counted apart.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import workloads

#: ``name (file:line)`` or ``name (file)``: py-spy's frame.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    """py-spy's path: beside this Python (the virtualenv), else on PATH; None if absent."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


@contextlib.contextmanager
def sampled(pid: int, out: Path, rate: int = 100, timeout: float = 60.0) -> Iterator[None]:
    """Record process ``pid`` with py-spy into ``out`` (raw format) while the block runs.

    Waits until py-spy says it samples before the block starts. Raises
    RuntimeError if py-spy is absent or can't attach.
    """
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    argv = [spy, "record", "--gil", "--pid", str(pid), "--format", "raw", "--rate", str(rate)]
    process = subprocess.Popen(
        [*argv, "--output", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    workloads.away(process.pid)  # not on the CPU of what it samples
    said = []
    try:
        # py-spy writes "Sampling process ..." once it is attached.
        for line in process.stdout:
            said.append(line)
            if "Sampling process" in line:
                break
        else:
            raise RuntimeError(f"py-spy could not attach to {pid}: {''.join(said).strip()}")
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            rest, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            rest, _ = process.communicate()
        said.append(rest or "")
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {''.join(said).strip()[-500:]}")


#: Innermost frames that are the event loop waiting for work, not work: py-spy
#: does not always see the thread as idle there, so they are counted apart.
WAITS = ("EpollIOManager.get_events", "EpollIOManager._epoll_wait")
#: The files whose functions ``total`` lists: the daemon's own steps.
OWN = ("primed/",)


def recorded(argv: list[str], out: Path, rate: int = 100, timeout: float = 600.0) -> None:
    """Run ``argv`` (a Python program) under py-spy until it exits, recording into
    ``out`` (raw format). Raises RuntimeError if py-spy is absent or the program fails."""
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    spy_argv = [spy, "record", "--gil", "--format", "raw", "--rate", str(rate)]
    done = subprocess.run(
        [*spy_argv, "--output", str(out), "--", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0 or not out.exists():
        said = (done.stdout + done.stderr).strip()[-500:]
        raise RuntimeError(f"py-spy record failed ({done.returncode}): {said}")


def _function(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['name']} ({match['file']})"


def summarise(raw: Path, top: int = 20, within: str | None = None) -> dict[str, Any]:
    """The ``top`` functions by self share of py-spy's samples in ``raw``, and the
    ``top`` of primed's own functions by total share (but those on every sample's
    stack); samples waiting in the event loop (:data:`WAITS`) are counted in
    ``waiting`` and left out of the shares. With ``within``, only the samples with
    that function (``name (file)``) on their stack count: the work under it."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";")]
        if within is not None and within not in frames:
            continue
        if any(wait in frames[-1] for wait in WAITS):
            waiting += count
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            if name.split(" (", 1)[-1].startswith(OWN):
                total[name] += count
    share = samples or 1
    # What every sample runs under (the interpreter's main, the serving loop) says nothing.
    steps = Counter({name: n for name, n in total.items() if n < share})
    return {
        "samples": samples,
        "waiting": waiting,
        "self": [{"function": f, "share": n / share} for f, n in own.most_common(top)],
        "total": [{"function": f, "share": n / share} for f, n in steps.most_common(top)],
    }
