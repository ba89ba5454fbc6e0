"""Load on the memfd backend: a thousand connections from a few processes, each
holding ten buffers, all served at once; the figures are printed and recorded."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from primed.daemon.policy import Bounds
from tests.host.conftest import StartDaemon
from tests.reliability import (
    LOAD,
    count,
    percentile,
    record,
    run_load,
    settled_registry,
    stats,
    vm_rss_kib,
)
from tests.support import settled_fds, wait_for_fds

PROCESSES = 10
HELD = 10
WANTED = 1000
ROUNDS = count(300, 3000)  # per process


def test_a_thousand_clients_holding_ten_buffers_each(spawn: StartDaemon, tmp_path: Path) -> None:
    # The daemon holds a socket per client and, on memfd, an fd per buffer; it raises
    # its soft RLIMIT_NOFILE to the hard one, and each client process needs its share.
    # All the clients are of one uid: its quotas are switched off, and the daemon-wide
    # bounds (from RLIMIT_NOFILE, never off) are what the count must stay within.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    bounds = Bounds.for_nofile(hard)
    room = min((hard - 200) // (HELD + 1), (bounds.buffers - 2 * HELD) // HELD)
    connections = min(WANTED, room, bounds.connections - 2) // PROCESSES * PROCESSES
    note = "" if connections == WANTED else f" (hard RLIMIT_NOFILE {hard} allows {connections})"
    per_process = connections // PROCESSES
    config = tmp_path / "primed.toml"
    config.write_text(
        "[quotas]\nbuffers_per_client = 0\nbuffers_per_uid = 0\nconnections_per_uid = 0\n"
    )
    daemon = spawn("--config", str(config))
    settled_registry(daemon.socket)
    baseline_fds = settled_fds(daemon.pid)
    baseline_rss = vm_rss_kib(daemon.pid)

    def raise_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    started = time.monotonic()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, daemon.socket,
             str(per_process), str(HELD), str(ROUNDS), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=raise_limit,  # noqa: PLW1509 (no threads here)
        )
        for seed in range(PROCESSES)
    ]  # fmt: skip
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = worker.stdout.readline()
            assert line == "ready\n", f"{line!r}: {worker.communicate(timeout=60)[1]}"
        setup_time = time.monotonic() - started
        now = stats(daemon.socket)
        assert (now.clients, now.buffers) == (connections + 1, connections * HELD), now
        peak_fds = settled_fds(daemon.pid)
        assert peak_fds >= baseline_fds + connections * (HELD + 1)
        held_rss = vm_rss_kib(daemon.pid)
        results, wall = run_load(workers, timeout=60)
        peak_rss = vm_rss_kib(daemon.pid)
        during = stats(daemon.socket)
        assert (during.clients, during.buffers) == (connections + 1, connections * HELD)
        for worker in workers:
            _, err = worker.communicate("stop\n", timeout=120)
            assert worker.returncode == 0, f"a load client failed:\n{err}"
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    errors = [n for kind, _, n in during.counters if kind == 2]
    assert not any(errors), f"the daemon answered with errors: {during.counters}"
    settled_registry(daemon.socket, timeout=60)
    wait_for_fds(daemon.pid, baseline_fds, timeout=60)
    latencies = [x for r in results for x in r["latencies"]]
    setups = [x for r in results for x in r["setup"]]
    requests = sum(r["requests"] for r in results)
    rate = requests / wall
    p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
    figures = {
        "connections": connections,
        "buffers held": connections * HELD,
        "requests": requests,
        "requests/s": round(rate),
        "p50 ms": round(p50, 3),
        "p99 ms": round(p99, 3),
        "connect+allocate p99 ms": round(percentile(setups, 99) * 1e3, 3),
        "setup s": round(setup_time, 1),
        "daemon fds": {"baseline": baseline_fds, "holding": peak_fds},
        "daemon VmRSS KiB": {"baseline": baseline_rss, "holding": held_rss, "after load": peak_rss},
    }
    print(f"\nload (memfd): {json.dumps(figures)}")
    record(
        "a thousand clients, ten buffers each (memfd)",
        "host",
        f"{connections:,} connections from {PROCESSES} processes{note}, each holding {HELD} "
        f"buffers ({connections * HELD:,} live, set up in {setup_time:.1f} s); then "
        f"{requests:,} requests (release, allocate, single-use share and open from "
        "another connection, query) on random connections from all processes at once",
        f"every request answered, no Error; {rate:,.0f} requests/s, latency p50 "
        f"{p50:.2f} ms, p99 {p99:.2f} ms (from the clients, 2 cores shared by "
        f"{PROCESSES} clients and the daemon); daemon fds {baseline_fds} -> {peak_fds}, "
        f"VmRSS {baseline_rss / 1024:.0f} -> {held_rss / 1024:.0f} MiB holding, "
        f"{peak_rss / 1024:.0f} MiB after the load; fds and registry back at baseline",
        **figures,
    )
