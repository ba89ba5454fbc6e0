"""CPU time per process: what each side of a round trip costs, counted apart.

A round trip alternates request and reply, so its wall time is roughly the CPU
time of client and server added up; counting each process's CPU separately says
which side spends it, and holds stiller than wall time on a busy machine. Each
process is read through its CPU-time clock (``clock_gettime`` on the clock
``clock_getcpuclockid`` would give, nanoseconds, all threads) and through
``/proc/PID/stat`` (utime and stime, in clock ticks: the user/system split).

Also here: the minimal C client (benchmarks/c_client.c), built with gcc at run
time, and the in-process batch that stands for the kernel work of a 253-buffer
ALLOCATE + RELEASE on memfd.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from primed.kernel.backends import page_rounded

C_SOURCE = Path(__file__).resolve().parent / "c_client.c"
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def cpu_clock(pid: int) -> int:
    """The clock id of process ``pid``'s CPU time (glibc's clock_getcpuclockid:
    ``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)``)."""
    return ((~pid) << 3) | 2


def cpu_ns(pid: int) -> int:
    """CPU time process ``pid`` has used so far, all threads, in nanoseconds."""
    return time.clock_gettime_ns(cpu_clock(pid))


def stat_ns(pid: int) -> tuple[int, int]:
    """(user, system) CPU time of process ``pid`` from /proc/PID/stat, in nanoseconds
    (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    # The command name (field 2) may hold spaces: count fields after its ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) * _TICK_NS, int(fields[12]) * _TICK_NS


@dataclasses.dataclass
class Usage:
    """CPU and wall time summed over a runner's blocks."""

    round_trips: int = 0
    wall_ns: int = 0
    client_ns: int = 0
    server_ns: int = 0
    client_user_ns: int = 0
    client_sys_ns: int = 0
    server_user_ns: int = 0
    server_sys_ns: int = 0

    def per_round_trip(self, per: int = 1) -> dict[str, float]:
        """Microseconds per round trip (or per ``per`` units of each round trip)."""
        units = self.round_trips * per or 1
        return {
            "n": self.round_trips,
            "wall_us": self.wall_ns / units / 1000,
            "client_us": self.client_ns / units / 1000,
            "server_us": self.server_ns / units / 1000,
            "client_user_us": self.client_user_ns / units / 1000,
            "client_sys_us": self.client_sys_ns / units / 1000,
            "server_user_us": self.server_user_ns / units / 1000,
            "server_sys_us": self.server_sys_ns / units / 1000,
        }


@dataclasses.dataclass
class Metered:
    """A runner (``run(count)`` does ``count`` round trips and returns their wall
    times in ns), the process that is its client and the one that serves it (None:
    no server, as in-process)."""

    run: Callable[[int], list[int]]
    client_pid: int
    server_pid: int | None


def _read(pid: int | None) -> tuple[int, int, int]:
    if pid is None:
        return 0, 0, 0
    user, system = stat_ns(pid)
    return cpu_ns(pid), user, system


def metered(
    runners: Mapping[str, Metered], samples: int, budget: float, block: int
) -> tuple[dict[str, Usage], dict[str, list[int]]]:
    """Run each runner in blocks, taking turns (as :func:`workloads.interleaved`),
    and count the CPU of its client and server processes over its own blocks only.

    Returns the usage per runner and the wall-time samples per runner.
    """
    for runner in runners.values():
        runner.run(max(1, block // 4))  # warm-up
    usage = {name: Usage() for name in runners}
    taken: dict[str, list[int]] = {name: [] for name in runners}
    deadline = time.monotonic() + budget
    while True:
        for name, runner in runners.items():
            c0, s0 = _read(runner.client_pid), _read(runner.server_pid)
            got = runner.run(block)
            c1, s1 = _read(runner.client_pid), _read(runner.server_pid)
            use = usage[name]
            use.round_trips += len(got)
            use.wall_ns += sum(got)
            use.client_ns += c1[0] - c0[0]
            use.client_user_ns += c1[1] - c0[1]
            use.client_sys_ns += c1[2] - c0[2]
            use.server_ns += s1[0] - s0[0]
            use.server_user_ns += s1[1] - s0[1]
            use.server_sys_ns += s1[2] - s0[2]
            taken[name] += got
        if all(len(s) >= samples for s in taken.values()) or time.monotonic() > deadline:
            return usage, taken


def build_c_client(workdir: Path) -> Path:
    """Compile benchmarks/c_client.c with gcc into ``workdir``; returns the binary.

    Raises RuntimeError with gcc's output if it can't.
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no gcc or cc on PATH: the C client can't be built")
    binary = workdir / "c_client"
    done = subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(binary), str(C_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"gcc failed on {C_SOURCE}:\n{done.stdout}{done.stderr}")
    return binary


class CRoundTrips:
    """The C client as a coprocess on one connection: each block is one line to it."""

    def __init__(self, binary: Path, protocol: str, path: str):
        self.process = subprocess.Popen(
            [str(binary), protocol, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid

    def block(self, count: int) -> list[int]:
        """``count`` round trips; their wall times in ns (as the C client took them)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{count}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"the C client stopped (exit status {code})")
        # The first figure is the client's own CPU time: /proc says the same.
        return [int(v) for v in line.split()[1:]]

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


class InProcessBatch:
    """What the memfd backend's kernel calls cost for ``count`` buffers, in one process:
    per buffer memfd_create, ftruncate, F_ADD_SEALS, the export (a reopen through
    /proc/self/fd, as MemfdBackend.export) and the close of both (the daemon closes
    its copy after sending; RELEASE closes the memfd)."""

    def __init__(self, count: int, width: int = 64, height: int = 64):
        self.count = count
        self.size = page_rounded(width * 4 * height)

    def block(self, batches: int) -> list[int]:
        """``batches`` batches; the wall time of each in ns."""
        clock, size, count = time.perf_counter_ns, self.size, self.count
        samples = []
        for _ in range(batches):
            start = clock()
            fds = []
            try:
                for _ in range(count):
                    fd = os.memfd_create("primed-buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                    fds.append(fd)
                    os.ftruncate(fd, size)
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
                    os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC))
            finally:
                for fd in fds:
                    os.close(fd)
            samples.append(clock() - start)
        return samples


def perf_instructions() -> str:
    """Whether ``perf stat -e instructions`` counts here: "yes", or why not."""
    perf = shutil.which("perf")
    if perf is None:
        return "no perf on PATH"
    try:
        done = subprocess.run(
            [perf, "stat", "-x,", "-e", "instructions", "true"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"perf did not run: {e}"
    if "<not supported>" in done.stderr:
        return "perf: the instructions event is <not supported> (no hardware PMU here)"
    if done.returncode != 0 or "instructions" not in done.stderr:
        return f"perf stat failed: {done.stderr.strip()[:200]}"
    return "yes"
