"""Reliability on a real kernel, in the VM: fresh buffers zeroed on vgem and virtio-gpu,
load on vgem, clients killed while holding mappings and GEM handles (the registry and
vgem's Shmem return to baseline), and the daemon killed while clients hold buffers."""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import primed
from primed import fdpass
from primed.errors import ConnectionLost
from primed.kernel import drm
from primed.wire.schema import MAX_FDS
from tests.kernel.conftest import Nodes, serve
from tests.kernel.test_drm_path import shmem_kib
from tests.reliability import (
    LOAD,
    Fuzzer,
    count,
    fd_sources,
    percentile,
    record,
    run_load,
    settled_registry,
    stats,
    vm_rss_kib,
)
from tests.support import Daemon, settled_fds, wait_for, wait_for_fds

KERNEL = f"Linux {platform.release()}"
#: For tests of vgem alone: they share the module's vgem daemon (it starts slowly).
VGEM_ONLY = pytest.mark.parametrize("driver", ["vgem"], indirect=True)
FRESH = count(40, 400)


def test_fresh_buffers_are_always_zeroed(daemon: Daemon, driver: str) -> None:
    rng = random.Random()
    clients = [primed.connect(daemon.socket, name=f"writer {n}") for n in range(3)]
    held: list[list[primed.Buffer]] = [[] for _ in clients]
    checked = 0
    while checked < FRESH:
        n = rng.randrange(len(clients))
        width, height = rng.choice(((64, 64), (256, 256), (320, 240)))
        for buf in clients[n].allocate_many(width, height, "XR24", rng.randrange(1, 3)):
            with buf.map() as pixels:
                assert not any(pixels), f"{driver}: buffer {checked} is not zeroed"
                pixels[:] = bytes([rng.randrange(1, 256)]) * len(pixels)
            held[n].append(buf)
            checked += 1
        while len(held[n]) > 3:
            clients[n].release(held[n].pop(rng.randrange(len(held[n]))))
    for client in clients:
        client.close()
    settled_registry(daemon.socket, timeout=120)
    record(
        f"fresh buffers are always zeroed ({driver})",
        "vm",
        f"{KERNEL}, {driver}: 3 clients allocated {checked} dumb buffers of 3 sizes, "
        "painted each with a non-zero byte through its dma-buf mapping and released them "
        "in random order while the others allocated",
        "every fresh buffer read as all zeroes",
        buffers=checked,
    )


LOAD_CLIENTS = count(30, 100)
LOAD_PROCESSES = 2
LOAD_ROUNDS = count(40, 300)  # per process
HELD = 10


@VGEM_ONLY
def test_load_on_vgem(daemon: Daemon, driver: str) -> None:
    running = daemon
    settled_registry(running.socket, timeout=120)
    baseline_fds = settled_fds(running.pid)
    baseline_rss = vm_rss_kib(running.pid)
    per_process = LOAD_CLIENTS // LOAD_PROCESSES
    started = time.monotonic()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, running.socket, str(per_process), str(HELD),
             str(LOAD_ROUNDS), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in range(LOAD_PROCESSES)
    ]  # fmt: skip
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline()
            assert line == "ready\n", f"{line!r}: {worker.communicate(timeout=120)[1]}"
        setup_time = time.monotonic() - started
        holding_fds = settled_fds(running.pid)
        held_rss = vm_rss_kib(running.pid)
        results, wall = run_load(workers, timeout=120)
        during = stats(running.socket)
        assert (during.clients, during.buffers) == (
            per_process * LOAD_PROCESSES + 1,
            per_process * LOAD_PROCESSES * HELD,
        ), during
        for worker in workers:
            _, err = worker.communicate("stop\n", timeout=120)
            assert worker.returncode == 0, f"a load client failed:\n{err}"
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    assert not [n for kind, _, n in during.counters if kind == 2], during.counters
    settled_registry(running.socket, timeout=120)
    wait_for_fds(running.pid, baseline_fds, timeout=60)
    after_rss = vm_rss_kib(running.pid)
    clients = per_process * LOAD_PROCESSES
    latencies = [x for r in results for x in r["latencies"]]
    requests = sum(r["requests"] for r in results)
    rate = requests / wall
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    figures = {
        "clients": clients,
        "buffers held": clients * HELD,
        "requests": requests,
        "requests/s": round(rate),
        "p50 ms": round(p50, 2),
        "p99 ms": round(p99, 2),
        "setup s": round(setup_time, 1),
        "daemon fds": {"baseline": baseline_fds, "holding": holding_fds},
        "daemon VmRSS KiB": {"baseline": baseline_rss, "holding": held_rss, "after": after_rss},
    }
    print(f"\nload (vgem): {json.dumps(figures)}")
    record(
        "clients holding ten buffers each (vgem)",
        "vm",
        f"{KERNEL}, vgem, software emulation: {clients} connections from "
        f"{LOAD_PROCESSES} processes, each holding {HELD} dumb buffers (set up in "
        f"{setup_time:.0f} s); then {requests:,} requests (release, allocate, single-use "
        "share and open from another connection, query) from both processes at once",
        f"every request answered, no Error; {rate:,.0f} requests/s, latency p50 "
        f"{p50:.1f} ms, p99 {p99:.1f} ms (under TCG: ratios only); daemon fds "
        f"{baseline_fds} -> {holding_fds} (on DRM a buffer is a GEM handle, not an fd), "
        f"VmRSS {baseline_rss / 1024:.0f} -> {held_rss / 1024:.0f} MiB; fds and registry "
        "back at baseline",
        **figures,
    )


KILLS = count(12, 60)
MIB = 1 << 20


def _doomed(path: str, render: str, stage: str, seed: int, ready: int) -> None:
    """A vgem client until its SIGKILL (runs in a forked child)."""
    rng = random.Random(seed)
    client = primed.connect(path, name="doomed")
    device = primed.Device(render)
    if stage == "mid-request":
        os.write(ready, b"r")
        while True:
            bufs = client.allocate_many(512, 512, "XR24", rng.randrange(1, 3))
            imported = [device.import_buffer(b) for b in bufs]
            with bufs[0].map() as pixels:
                pixels[::4096] = b"\x02" * len(pixels[::4096])
            client.share(bufs[0])
            for handle in imported:
                handle.close()
            client.release(*bufs)
    bufs = client.allocate_many(512, 512, "XR24", rng.randrange(1, 4))  # 1 MiB each
    views = []
    for buf in bufs:
        view = buf.map().__enter__()
        view[::4096] = b"\x01" * len(view[::4096])  # every page in Shmem
        views.append(view)
    handles = [device.import_buffer(b) for b in bufs]
    client.share(bufs[0], once=True)
    os.write(ready, b"r")
    time.sleep(3600)
    del views, handles


def _holder(path: str, tokens: int, render: str, ready: int) -> None:
    """Opens the token read from ``tokens``, imports and maps it, holds it until SIGKILL."""
    token = os.read(tokens, 100).decode()
    with primed.connect(path, name="holder") as client:
        buf = client.open_shared(token)
    device = primed.Device(render)
    handle = device.import_buffer(buf)
    view = buf.map(write=False).__enter__()
    assert view[0] == 1
    buf.close()  # the mapping and the GEM handle keep it
    os.write(ready, b"r")
    time.sleep(3600)
    del handle, view


def _fork(target: object, *args: object) -> tuple[int, int]:
    """Fork a child running ``target(*args, write_end)``; (pid, read end)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child never returns)
        code = 0
        try:
            os.close(read_end)
            target(*args, write_end)  # type: ignore[operator]
        except BaseException as e:  # the parent reads it where it expects b"r"
            os.write(write_end, f"failed: {e!r}".encode()[:500])
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"the client exited by itself ({status})"


@VGEM_ONLY
def test_clients_killed_holding_mappings_and_imports(
    daemon: Daemon, driver: str, nodes: dict[str, Nodes]
) -> None:
    running = daemon
    settled_registry(running.socket, timeout=120)
    baseline_fds = settled_fds(running.pid)
    baseline = shmem_kib()
    rng = random.Random()
    by_stage = {"holding": 0, "mid-request": 0}
    # One owner's buffer goes to a holder in another process first: its memory
    # must outlive the owner's SIGKILL, and go once the holder is killed too.
    # Forked before the owner connects, so that it holds no copy of its socket.
    tokens, send_token = os.pipe()
    holder, ready = _fork(_holder, running.socket, tokens, nodes["vgem"].render)
    os.close(tokens)
    try:
        with primed.connect(running.socket, name="first owner") as owner:
            buf = owner.allocate(1024, 1024, "XR24")  # 4 MiB
            with buf.map() as pixels:
                pixels[::4096] = b"\x01" * len(pixels[::4096])
            os.write(send_token, owner.share(buf).encode())
            said = os.read(ready, 500)
            assert said == b"r", f"the holder failed: {said!r}"
            buf.close()
    finally:
        os.close(ready)
        os.close(send_token)
    wait_for(lambda: stats(running.socket).buffers == 0, "the owner's disconnect", 60)
    kept = shmem_kib() - baseline
    assert kept >= 4 * 1024 - 64, f"Shmem {kept} kB above baseline, the holder's 4 MiB gone"
    peak = kept
    for n in range(KILLS):
        stage = "mid-request" if n % 3 == 2 else "holding"
        pid, ready = _fork(
            _doomed, running.socket, nodes["vgem"].render, stage, rng.randrange(2**32)
        )
        try:
            said = os.read(ready, 500)
            assert said == b"r", f"{stage}: the client failed: {said!r}"
            if stage == "mid-request":
                time.sleep(rng.random() * 0.3)
            peak = max(peak, shmem_kib() - baseline)
            _kill(pid)
        finally:
            os.close(ready)
        by_stage[stage] += 1
    settled_registry(running.socket, timeout=120)
    wait_for_fds(running.pid, baseline_fds, timeout=60)
    # The holder still holds its 4 MiB; the killed clients' memory is gone.
    wait_for(lambda: shmem_kib() - baseline < 4 * 1024 + 2048, "the killed clients' Shmem", 60)
    assert shmem_kib() - baseline >= 4 * 1024 - 64
    _kill(holder)
    wait_for(lambda: shmem_kib() - baseline < 2048, "Shmem back at its baseline", 60)
    final = shmem_kib() - baseline
    record(
        "clients killed with SIGKILL holding mappings and GEM handles (vgem)",
        "vm",
        f"{KERNEL}, vgem: {KILLS} client processes killed ({by_stage}): holding 1-3 MiB "
        "of written, mapped buffers with GEM handles imported on the render node and a "
        "live token, or in a loop of allocate, import, write, share, release; one "
        "buffer's holder (mapped, imported, in another process) outlived its owner",
        f"daemon fds and registry back at baseline; vgem's Shmem (up to {peak / 1024:.0f} "
        f"MiB above baseline) kept the holder's 4 MiB after the owner's death and the "
        f"kills, and came back to baseline ({final:+d} kB) once the holder was killed too",
        kills=KILLS,
        shmem_peak_kib=peak,
        shmem_final_kib=final,
    )


def test_daemon_killed_while_clients_hold_buffers(
    tmp_path: Path, driver: str, nodes: dict[str, Nodes]
) -> None:
    running = serve(tmp_path / "doomed.sock", "--device", nodes[driver].card)
    client = primed.connect(running.socket)
    bufs = client.allocate_many(256, 128, "XR24", 4)
    patterns = [random.Random(n).randbytes(b.size) for n, b in enumerate(bufs)]
    views = []
    with primed.Device(nodes[driver].render) as device:
        for buf, pattern in zip(bufs, patterns, strict=True):
            view = buf.map().__enter__()
            view[:] = pattern
            views.append(view)
        handles = [device.import_buffer(b) for b in bufs]
        running.kill()
        # Mappings, fds and GEM handles all still reach the same pages.
        for view, pattern in zip(views, patterns, strict=True):
            assert bytes(view) == pattern
        for buf, pattern in zip(bufs, patterns, strict=True):
            with buf.map(write=False) as pixels:
                assert bytes(pixels) == pattern
        for n, (handle, buf) in enumerate(zip(handles, bufs, strict=True)):
            exported = drm.handle_to_fd(device.fd, handle.handle)
            try:
                assert os.fstat(exported).st_ino == os.fstat(buf.fd).st_ino
                with primed.Mapping(exported, buf.size, write=True, sync=True) as pixels:
                    assert bytes(pixels) == patterns[n]
                    pixels[:4] = b"\xde\xad\xbe\xef"  # and writes reach the others
            finally:
                os.close(exported)
            assert bytes(views[n][:4]) == b"\xde\xad\xbe\xef"
        for view in views:
            view.release()
        for handle in handles:
            handle.close()
    with pytest.raises(ConnectionLost):
        client.allocate(16, 16, "XR24")
    client.close()
    for buf in bufs:
        buf.close()
    record(
        f"daemon killed with SIGKILL ({driver})",
        "vm",
        f"{KERNEL}, {driver}: a client held 4 painted buffers as fds, mappings and GEM "
        "handles imported on the render node, then the daemon was killed",
        "every mapping and fd read back its paint; each GEM handle re-exported the same "
        "dma-buf (same inode), read the paint and wrote to the pages the mappings see; "
        "the next request raised ConnectionLost",
        buffers=4,
    )


FUZZED = count(2_000, 20_000)


@VGEM_ONLY
def test_fuzzed_fds_reach_the_daemon_and_are_closed(
    daemon: Daemon, driver: str, nodes: dict[str, Nodes]
) -> None:
    # This kernel lacks SO_PASSRIGHTS, so unlike on a newer host the fds the fuzzer
    # attaches really arrive: pipes, sockets, memfds, 253 at once, and dma-bufs.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        assert not fdpass.refuse_rights(probe), "this kernel refuses fds: nothing to test"
    settled_registry(daemon.socket, timeout=120)
    baseline = settled_fds(daemon.pid)
    card = drm.open_node(nodes[driver].card)
    dumb = drm.create_dumb(card, 64, 64, 32)

    def dmabuf() -> list[int]:
        return [drm.handle_to_fd(card, dumb.handle)]

    seed = random.randrange(1, 2**32)
    fuzzer = Fuzzer(daemon.socket, seed, {**fd_sources(), "dma-buf": dmabuf})
    try:
        fuzzer.run(FUZZED)
    finally:
        drm.destroy_dumb(card, dumb.handle)
        os.close(card)
    assert daemon.process.poll() is None
    settled_registry(daemon.socket, timeout=120)
    wait_for_fds(daemon.pid, baseline, timeout=120)
    record(
        "fuzzed datagrams with fds, on a kernel that delivers them",
        "vm",
        f"{KERNEL}, vgem: {FUZZED:,} fuzzed datagrams (seed {seed}), some carrying pipes, "
        f"sockets, memfds, {MAX_FDS} fds at once or a dma-buf",
        "every datagram answered with an Error or a sound reply, or only its own connection "
        "dropped; every fd that reached the daemon closed (daemon fds and registry back at "
        "baseline)",
        messages=FUZZED,
        sent=dict(fuzzer.sent),
    )
