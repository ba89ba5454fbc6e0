"""What the benchmark does: the servers it starts and the work its clients do.

Every measurement runs primed and the floor (benchmarks/floor.py) side by side on
the same backend, so that each primed figure has the floor's beside it. Timing
uses ``time.perf_counter_ns``; nothing here asserts anything about time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import trio

import primed
from benchmarks import floor
from primed.kernel import drm, heap, udmabuf

#: Sample size of each worker's latencies in the throughput runs.
LATENCY_SAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Target:
    """Where buffers come from: ``memfd``; a DRM driver's card node (allocating) and
    render node (importing, as a client would); or a dma-buf heap (``heap``, its name)
    or udmabuf, whose dma-bufs a client maps (virtio-gpu refuses to import them)."""

    name: str
    card: str | None = None
    render: str | None = None
    heap: str | None = None
    udmabuf: bool = False

    @property
    def dmabuf(self) -> bool:
        """A dma-buf allocator with no DRM node: a heap or udmabuf."""
        return self.heap is not None or self.udmabuf

    @property
    def node(self) -> str | None:
        """The node the buffers come from (None: memfd)."""
        if self.heap is not None:
            return os.path.join(heap.HEAP_ROOT, self.heap)
        return udmabuf.UDMABUF_DEVICE if self.udmabuf else self.card

    @property
    def backend(self) -> str:
        """The floor's backend (benchmarks/floor.py's --backend) for this target."""
        if self.heap is not None:
            return "heap"
        if self.udmabuf:
            return "udmabuf"
        return "memfd" if self.card is None else "drm"

    def floor_backend(self) -> list[str]:
        """The floor's (benchmarks/floor.py) options for this target."""
        if self.heap is not None:
            return ["--backend", "heap", "--heap", self.heap]
        if self.card is not None:
            return ["--backend", "drm", "--device", self.card]
        return ["--backend", self.backend]

    def primed_backend(self) -> list[str]:
        """``primed serve``'s options serving this target's allocator alone."""
        if self.heap is not None:
            return ["--heap", self.heap]
        if self.udmabuf:
            return ["--udmabuf"]
        if self.card is not None:
            return ["--device", self.card]
        return ["--backend", "memfd"]


#: Target names for a dma-buf heap: ``heap_`` and the heap's name (heap_system).
HEAP_PREFIX = "heap_"


def find_targets(names: list[str]) -> list[Target]:
    """The targets named (memfd, vgem, virtio_gpu, heap_NAME, udmabuf), with their
    nodes found (DRM ones by driver name).

    Raises LookupError for a driver with no card or render node here, or a heap or
    udmabuf this kernel lacks.
    """
    found: dict[str, dict[bool, str]] = {}
    for node in drm.nodes():
        found.setdefault(node.driver, {}).setdefault(node.primary, node.path)
    targets = []
    for name in names:
        if name == "memfd":
            targets.append(Target("memfd"))
            continue
        if name.startswith(HEAP_PREFIX) or name == "udmabuf":
            if name == "udmabuf":
                target = Target(name, udmabuf=True)
            else:
                target = Target(name, heap=name.removeprefix(HEAP_PREFIX))
            if not os.path.exists(target.node or ""):
                raise LookupError(f"no {target.node} for {name} (heaps here: {heap.heaps()})")
            targets.append(target)
            continue
        nodes = found.get(name, {})
        if True not in nodes or False not in nodes:
            raise LookupError(f"no card and render node for {name} (found {found})")
        targets.append(Target(name, nodes[True], nodes[False]))
    return targets


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard one; returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def stats(samples_ns: list[int]) -> dict[str, float]:
    """Median and p99 in microseconds, and the sample count."""
    if not samples_ns:
        return {"median_us": float("nan"), "p99_us": float("nan"), "n": 0}
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "median_us": statistics.median(ordered) / 1000,
        "p99_us": p99 / 1000,
        "n": len(ordered),
    }


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for {pid}")


def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class Server:
    """A server process (primed or the floor) listening on ``path``."""

    def __init__(self, argv: list[str], path: str, timeout: float):
        self.path = path
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while not _connectable(path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[2:4]} did not start:\n{self.stop()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stop(self) -> str:
        """Stop it (SIGTERM, then SIGKILL); returns what it logged."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        self._log.close()
        return text


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Run the block, and every process it starts, on one CPU (the lowest this
    process may use); the processes started before keep their CPUs.

    A serial round trip is a wake-up each way. Across two CPUs each wake-up of a
    sleeping process is an inter-processor interrupt and, in a virtual machine, an
    exit to the hypervisor to wake a halted vCPU: on this project's machines about
    50 us a side, charged in part to the woken process as CPU. That swamps the work
    measured, and which runner pays it depends on where the scheduler happens to put
    each pair (in one run the floor's pair mostly shared a CPU and primed's did not:
    floor 24 us, primed 206 us; both on one CPU, 20 and 68 us). On one CPU a wake-up
    is a context switch, the same for every runner."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def away(pid: int) -> None:
    """Move ``pid`` (an observer such as py-spy, started inside :func:`pinned`) off the
    pinned CPU, onto every other one this machine has, if it has another."""
    mine = os.sched_getaffinity(0)
    others = set(range(os.cpu_count() or 1)) - mine
    if len(mine) == 1 and others:
        os.sched_setaffinity(pid, others)


#: Width and height of each buffer held for the live-buffer levels: one page, so that
#: 100,000 of them (400 MB) fit within a daemon's byte bound (half the memory) in a
#: VM of 2 GiB. The count is what is measured, not the size.
HELD = (32, 32)

#: The quotas the benchmark's daemon switches off: every per-uid one, and the bytes
#: per client, which 100,000 held buffers outgrow.
_QUOTAS_OFF = (
    "buffers_per_uid",
    "bytes_per_uid",
    "connections_per_uid",
    "tokens_per_uid",
    "fds_in_flight_per_uid",
    "bytes_per_client",
)


@contextlib.contextmanager
def primed_server(target: Target, workdir: Path, timeout: float) -> Iterator[Server]:
    """``primed serve`` on ``target``, with :data:`_QUOTAS_OFF` off.

    Every client of the benchmark runs as one uid, standing for many users: the
    default per-uid shares (an eighth of each daemon-wide bound) would refuse the
    256-client throughput run's buffers. The buffers per client and the daemon-wide
    bounds stay as a daemon has them."""
    config = workdir / "primed.toml"
    config.write_text("[quotas]\n" + "".join(f"{key} = 0\n" for key in _QUOTAS_OFF))
    path = str(workdir / f"primed-{time.monotonic_ns()}.sock")
    argv = [sys.executable, "-m", "primed", "serve", "--config", str(config), "--socket", path]
    server = Server([*argv, "--log-level", "warning", *target.primed_backend()], path, timeout)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def floor_server(target: Target, workdir: Path, mode: str, timeout: float) -> Iterator[Server]:
    """The floor's server on ``target``: ``blocking`` (one connection at a time), ``epoll``
    or ``trio`` (every connection at once, from that event loop)."""
    path = str(workdir / f"floor-{time.monotonic_ns()}.sock")
    argv = [sys.executable, "-m", "benchmarks.floor", "--socket", path, "--mode", mode]
    server = Server([*argv, *target.floor_backend()], path, timeout)
    try:
        yield server
    finally:
        server.stop()


def primed_importer(target: Target) -> tuple[Callable[[primed.Buffer], None], Callable[[], None]]:
    """What a primed client does with a buffer it got, and how to clean up after.

    With a render node, import it (PRIME_FD_TO_HANDLE) and close the import
    (GEM_CLOSE); on memfd, map and unmap it; a heap's or udmabuf's dma-buf the same,
    Buffer.map bracketing the access with DMA_BUF_IOCTL_SYNC.
    """
    if target.render is None:

        def cpu_map(buffer: primed.Buffer) -> None:
            with buffer.map():
                pass

        return cpu_map, lambda: None
    device = primed.Device(target.render)

    def prime_import(buffer: primed.Buffer) -> None:
        device.import_buffer(buffer).close()

    return prime_import, device.close


# Round trips: allocate, receive, import, release; one at a time.


class InProcess:
    """The same ioctls with no socket: allocate, export, import, close, free.

    Like a server, it can hold buffers (on the same DRM fd, or as memfds).
    """

    def __init__(self, target: Target):
        self.kernel = floor.open_kernel(target.backend, target.card, target.heap)
        self.use, self._done = floor.importer(target.render, target.dmabuf)
        self.held: list[int] = []

    def hold(self, count: int) -> None:
        for _ in range(count):
            self.held.append(self.kernel.allocate(*HELD)[0])

    def block(self, width: int, height: int, count: int) -> list[int]:
        kernel, use, clock = self.kernel, self.use, time.perf_counter_ns
        samples = []
        for _ in range(count):
            start = clock()
            floor.in_process(kernel, use, width, height)
            samples.append(clock() - start)
        return samples

    def close(self) -> None:
        for ref in self.held:
            self.kernel.free(ref)
        self._done()
        self.kernel.close()


class FloorRoundTrips:
    """Round trips through the floor's server on one connection."""

    def __init__(self, path: str, target: Target):
        self.client = floor.Client(path)
        self.use, self._done = floor.importer(target.render, target.dmabuf)

    def block(self, width: int, height: int, count: int) -> list[int]:
        client, use, clock = self.client, self.use, time.perf_counter_ns
        samples = []
        for _ in range(count):
            start = clock()
            ident, fd, size = client.allocate(width, height)
            use(fd, size)
            os.close(fd)
            client.release(ident)
            samples.append(clock() - start)
        return samples

    def close(self) -> None:
        self._done()
        self.client.close()


class BlockingRoundTrips:
    """Round trips through primed with the blocking client, on one connection."""

    def __init__(self, path: str, target: Target):
        self.client = primed.connect(path, name="bench")
        self.use, self._done = primed_importer(target)

    def block(self, width: int, height: int, count: int) -> list[int]:
        client, use, clock = self.client, self.use, time.perf_counter_ns
        samples = []
        for _ in range(count):
            start = clock()
            buffer = client.allocate(width, height, "XR24")
            use(buffer)
            client.release(buffer)
            samples.append(clock() - start)
        return samples

    def close(self) -> None:
        self._done()
        self.client.close()


class TrioRoundTrips:
    """Round trips through primed with the trio client, on one connection kept open in a
    trio loop of its own (a thread), as a trio program keeps its client: a block is run
    there with trio.from_thread, so that neither trio.run's start nor the HELLO falls
    on the round trips (they did once: a connection per block added about 8 us of each
    side's CPU per round trip in the quick plan's blocks)."""

    def __init__(self, path: str, target: Target, timeout: float = 30.0):
        self.use, self._done = primed_importer(target)
        self._client: primed.AsyncClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._failed: BaseException | None = None
        ready = threading.Event()

        async def keep() -> None:
            try:
                async with primed.connect_async(path, name="bench") as client:
                    self._client, self._stop = client, trio.Event()
                    self._token = trio.lowlevel.current_trio_token()
                    ready.set()
                    await self._stop.wait()
            except BaseException as e:
                self._failed = e
                raise
            finally:
                ready.set()

        self._thread = threading.Thread(target=trio.run, args=(keep,), daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._token is None:
            self._done()
            raise RuntimeError(f"the trio client did not connect: {self._failed!r}")

    def block(self, width: int, height: int, count: int) -> list[int]:
        client = self._client
        assert client is not None

        async def run() -> list[int]:
            clock, use, samples = time.perf_counter_ns, self.use, []
            for _ in range(count):
                start = clock()
                buffer = await client.allocate(width, height, "XR24")
                use(buffer)
                await client.release(buffer)
                samples.append(clock() - start)
            return samples

        return trio.from_thread.run(run, trio_token=self._token)

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()
        self._done()


def interleaved(
    runners: Mapping[str, Callable[[int], list[int]]], samples: int, budget: float, block: int
) -> dict[str, list[int]]:
    """Run each runner in blocks, taking turns, until each has ``samples`` samples or
    ``budget`` seconds have passed (but at least one block each after a warm-up block).

    Taking turns spreads the machine's drift over all of them alike.
    """
    for run in runners.values():
        run(max(1, block // 4))  # warm-up
    taken: dict[str, list[int]] = {name: [] for name in runners}
    deadline = time.monotonic() + budget
    while True:
        for name, run in runners.items():
            taken[name] += run(block)
        if all(len(s) >= samples for s in taken.values()) or time.monotonic() > deadline:
            return taken


# Throughput: many client processes, each allocating and releasing as fast as it can.


def _floor_unit(width: int, height: int, window: int) -> Callable[[floor.Client], None]:
    def unit(client: floor.Client) -> None:
        for _ in range(window):
            client.send_allocate(width, height)
        got = [client.receive_allocated() for _ in range(window)]
        for ident, fd, _ in got:
            os.close(fd)
            client.send_release(ident)
        for _ in range(window):
            client.receive_released()

    return unit


def _primed_unit(width: int, height: int, window: int) -> Callable[[primed.Client], None]:
    if window == 1:

        def one(client: primed.Client) -> None:
            client.release(client.allocate(width, height, "XR24"))

        return one

    def many(client: primed.Client) -> None:
        pending = [client.start_allocate(width, height, "XR24") for _ in range(window)]
        buffers = [p.wait() for p in pending]
        released = [client.start_release(b) for b in buffers]
        for buffer in buffers:
            buffer.close()
        for p in released:
            p.wait()

    return many


def _worker(
    kind: str,
    path: str,
    size: tuple[int, int],
    window: int,
    warm_up: int,
    ready: int,
    go: int,
    out: str,
) -> None:
    """A throughput client process: connect, warm up, say ready, then run units from
    the go signal until the deadline it carries (finishing the one under way), and
    write {"units", "end", "latency_ns"} to ``out``."""
    client: Any
    if kind == "floor":
        client = floor.Client(path)
        unit: Callable[[Any], None] = _floor_unit(*size, window)
    else:
        # No handshake deadline: under emulation 64 clients saying hello at once wait
        # longer than the default 5 s; the parent bounds the whole start instead.
        client = primed.connect(path, name="bench", timeout=None)
        unit = _primed_unit(*size, window)
    for _ in range(warm_up):  # the pages a forked child shares with its parent get copied now
        unit(client)
    os.write(ready, b".")
    _, deadline = struct.unpack("dd", os.read(go, 16))
    clock = time.perf_counter_ns
    units = 0
    latencies: list[int] = []
    end = time.monotonic()
    while end < deadline:
        start = clock()
        unit(client)
        end = time.monotonic()
        units += 1
        if len(latencies) < LATENCY_SAMPLES:
            latencies.append(clock() - start)
    client.close()
    Path(out).write_text(json.dumps({"units": units, "end": end, "latency_ns": latencies}))


def _failure(out: str) -> str:
    """What a throughput client that failed wrote, or "" (none written, or no failure)."""
    try:
        return str(json.loads(Path(out).read_text()).get("error", ""))
    except (OSError, ValueError):
        return ""


def throughput(
    kind: str,
    path: str,
    clients: int,
    window: int,
    duration: float,
    workdir: Path,
    warm_up: int,
    size: tuple[int, int] = (64, 64),
    timeout: float = 60.0,
) -> dict[str, float]:
    """``clients`` processes allocating and releasing on ``path`` for ``duration`` seconds,
    each with ``window`` requests of each kind in flight (1: not pipelined).

    Returns pairs per second (every unit begun before the deadline counts, over the
    time until the last one ended), and the median and p99 time of one unit (one
    pair, or ``window`` pairs when pipelined) in microseconds.
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    outs = [str(workdir / f"worker-{i}.json") for i in range(clients)]
    pids = []
    started = False
    try:
        for out in outs:
            pid = os.fork()
            if pid == 0:  # pragma: no cover (the child)
                code = 0
                try:
                    os.close(ready_r)
                    os.close(go_w)
                    _worker(kind, path, size, window, warm_up, ready_w, go_r, out)
                except BaseException as e:
                    Path(out).write_text(json.dumps({"error": repr(e)}))
                    code = 1
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(ready_w)  # so that the pipe reads EOF once every child has gone
        ready_w = -1
        deadline = time.monotonic() + timeout
        arrived = 0
        while arrived < clients:
            readable, _, _ = select.select([ready_r], [], [], max(0.0, deadline - time.monotonic()))
            got = os.read(ready_r, clients) if readable else b""
            if not got:
                failed = [_failure(out) for out in outs]
                raise RuntimeError(
                    f"only {arrived} of {clients} {kind} clients got ready"
                    + ("" if readable else f" in {timeout:.0f} s")
                    + f": {'; '.join(f for f in failed if f) or 'no error written'}"
                )
            arrived += len(got)
        start = time.monotonic()
        signal_bytes = struct.pack("dd", start, start + duration) * clients
        view = memoryview(signal_bytes)
        while view:
            view = view[os.write(go_w, view) :]
        started = True
    finally:
        os.close(go_w)  # a child still waiting for the go signal reads EOF and ends
        if ready_w >= 0:
            os.close(ready_w)
        os.close(ready_r)
        os.close(go_r)
        for pid in pids:
            if not started:  # one may be stuck in its warm-up: end them all
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    units = 0
    end = start + duration
    latencies: list[int] = []
    for out in outs:
        result = json.loads(Path(out).read_text())
        os.unlink(out)
        if "error" in result:
            raise RuntimeError(f"a {kind} client failed: {result['error']}")
        units += result["units"]
        end = max(end, result["end"])
        latencies += result["latency_ns"]
    latency = stats(latencies)
    return {
        "pairs_per_s": units * window / (end - start),
        "unit_median_us": latency["median_us"],
        "unit_p99_us": latency["p99_us"],
    }


# Idle clients: connections that said hello and then do nothing.


@contextlib.contextmanager
def idle_clients(kind: str, path: str, count: int, timeout: float = 120.0) -> Iterator[None]:
    """``count`` connections held open by a child process while the block runs."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 0
        try:
            os.close(ready_r)
            os.close(stop_w)
            raise_nofile()
            held: list[Any] = []
            for _ in range(count):
                held.append(floor.Client(path) if kind == "floor" else primed.connect(path))
            os.write(ready_w, b".")
            os.read(stop_r, 1)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(stop_r)
    try:
        readable, _, _ = select.select([ready_r], [], [], timeout)
        if not readable or os.read(ready_r, 1) != b".":
            raise RuntimeError(f"{count} idle {kind} clients did not connect")
        yield
    finally:
        os.close(stop_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def settle(server: Server, quiet: float = 0.3, timeout: float = 10.0) -> int:
    """The server's RSS once it stopped changing for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = server.rss(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = server.rss()
        if now != last:
            last, since = now, time.monotonic()
    return last


def hold_primed(client: primed.Client, count: int, size: tuple[int, int] = HELD) -> None:
    """Have the daemon keep ``count`` more buffers for ``client`` (their fds closed here)."""
    while count > 0:
        batch = min(count, 1024)
        for buffer in client.allocate_many(*size, "XR24", batch):
            buffer.close()
        count -= batch
