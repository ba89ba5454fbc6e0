"""The benchmark runs end to end on tiny counts and writes well-formed results.

Nothing here looks at a figure's size: timings are never asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import bench, cpu, profile, report, workloads

SECTIONS = ("roundtrip", "cpu", "batch", "profile", "throughput", "live_buffers", "idle_clients")
#: Every target issue #14 sets, by the start of its row's name.
TARGETS = (
    "Round trip, blocking client",
    "Round trip, trio client",
    "Daemon CPU per round trip (Python client)",
    "Client CPU per round trip (blocking)",
    "Daemon CPU per round trip (C client)",
    "Batch of 253",
    "Throughput, 64 clients, one pair at a time",
    "Live buffers",
    "Codec: Allocate + Allocated",
)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_smoke_run_writes_every_section(tmp_path: Path) -> None:
    part = tmp_path / "host.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--smoke", "--json", str(part)],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(part.read_text())
    assert result["part"] == "host"
    assert result["mode"] == "smoke"
    assert {"cpu", "cores", "kernel", "python"} <= set(result["machine"])

    memfd = result["targets"]["memfd"]
    assert set(SECTIONS) <= set(memfd)
    for row in memfd["roundtrip"]:
        for runner in ("in_process", "floor", "blocking", "trio"):
            assert row[runner]["n"] > 0
            assert _number(row[runner]["median_us"]) and _number(row[runner]["p99_us"])
    assert {(row["clients"], row["pipelined"]) for row in memfd["throughput"]} == {
        (8, False),
        (8, True),
        (64, False),
        (64, True),
    }
    for row in memfd["throughput"]:
        for kind in ("floor", "primed"):
            assert _number(row[kind]["pairs_per_s"])
    levels = memfd["live_buffers"]["levels"]
    assert [level["live"] for level in levels] == [10, 50]
    assert all(_number(level["primed"]["median_us"]) for level in levels)
    assert set(memfd["live_buffers"]["rss_per_buffer"]) == {"floor", "primed"}
    assert _number(memfd["idle_clients"]["primed"])

    counts = memfd["cpu"]
    served = ("floor", "blocking", "trio", "c_floor", "c_floor_epoll", "c_floor_trio", "c_primed")
    for runner in ("in_process", *served):
        assert counts[runner]["n"] > 0, runner
        assert counts[runner]["client_us"] > 0, runner  # every runner's client did work
    for runner in served:
        assert counts[runner]["server_us"] > 0, runner  # and so did the server it talked to
    assert counts["in_process"]["server_us"] == 0
    batch = memfd["batch"]
    assert batch["count"] == 253
    assert batch["primed"]["n"] > 0 and batch["in_process"]["n"] > 0
    assert batch["primed"]["server_us"] > 0
    spied = memfd["profile"]
    if profile.py_spy() is None:
        assert "not installed" in spied["error"]
    else:
        assert "error" not in spied, spied
        assert spied["samples"] > 0
        assert spied["round_trips"] == bench.PLANS["smoke"]["host"].profile_round_trips
        assert all(0 < entry["share"] <= 1 for entry in spied["self"] + spied["total"])
        client = spied["client"]
        assert "error" not in client, client
        assert client["samples"] > 0  # samples under the client's round-trip loop
        # The client library's own steps (Client.allocate itself is left out when, on a
        # busy machine, every sample fell under it: a frame on every stack says nothing).
        assert any("(primed/client/" in e["function"] for e in client["total"]), client

    kinds = {row["message"] for row in result["codec"]}
    assert {"HELLO", "ALLOCATE", "ALLOCATED", "RELEASE", "RELEASED", "ERROR"} <= kinds
    for row in result["codec"]:
        assert row["total_us"] == row["encode_us"] + row["decode_us"]

    printed = done.stdout[done.stdout.index("targets (issue #14)") :]
    goals = report.merge([result])["goals"]
    assert len(goals) == len(TARGETS)
    for start, goal in zip(TARGETS, goals, strict=True):
        assert goal["name"].startswith(start)
        assert goal["name"] in printed  # every target has its row in the table
    measured = {g["name"].split(",")[0]: g["met"] for g in goals}
    # The host part measures everything but the VM's live vgem buffers.
    assert measured["Live buffers"] is None
    assert all(g["met"] is not None for g in goals if not g["name"].startswith("Live"))


def test_merge_judges_targets_and_draws_charts(tmp_path: Path) -> None:
    """Merging a host part and a VM part: every target judged or marked not measured."""
    row = {"median_us": 10.0, "p99_us": 20.0, "n": 5}
    rate = {"pairs_per_s": 100.0, "unit_median_us": 10.0, "unit_p99_us": 20.0}

    def target(name: str, sizes: list[str]) -> dict[str, object]:
        return {
            "target": {"name": name},
            "where": "host" if name == "memfd" else "vm",
            "roundtrip": [
                {"size": s, "in_process": row, "floor": row, "blocking": row, "trio": row}
                for s in sizes
            ],
            "throughput": [
                {
                    "clients": c,
                    "pipelined": p,
                    "window": 4 if p else 1,
                    "floor": rate,
                    "primed": rate,
                }
                for c in (1, 8, 64)
                for p in (False, True)
            ],
            "live_buffers": {
                "levels": [
                    {"live": n, "floor": row, "primed": row, "rss": {"floor": 1, "primed": 1}}
                    for n in (10, 1000)
                ],
                "note": "",
                "rss_per_buffer": {"floor": 100.0, "primed": 300.0},
            },
            "idle_clients": {"clients": 4, "floor": 100.0, "primed": 1000.0},
        }

    def usage(client: float, server: float) -> dict[str, float]:
        return {
            "n": 10,
            "wall_us": client + server,
            "client_us": client,
            "server_us": server,
            "client_user_us": client,
            "client_sys_us": 0.0,
            "server_user_us": server,
            "server_sys_us": 0.0,
            "median_us": client + server,
            "p99_us": client + server,
        }

    machine = {"cpu": "x", "cores": 2, "kernel": "6", "python": "3.11", "virtualised": True}
    host = {
        "part": "host",
        "mode": "smoke",
        "machine": machine,
        "targets": {
            "memfd": {
                **target("memfd", ["64x64"]),
                "cpu": {
                    "size": "64x64",
                    "perf": "no perf on PATH",
                    "in_process": usage(10.0, 0.0),
                    "floor": usage(20.0, 20.0),
                    "blocking": usage(30.0, 50.0),  # client 1.5x, daemon 2.5x
                    "trio": usage(60.0, 50.0),
                    "c_floor": usage(5.0, 20.0),
                    "c_primed": usage(5.0, 30.0),  # daemon 1.5x
                },
                "batch": {
                    "count": 253,
                    "size": "64x64",
                    "in_process": {**usage(10.0, 0.0), "batch_median_us": 2530.0},
                    "primed": {**usage(5.0, 15.0), "batch_median_us": 5060.0},  # 2.0x
                },
                "profile": {
                    "samples": 10,
                    "waiting": 2,
                    "round_trips": 100,
                    "median_us": 10.0,
                    "daemon_cpu_us": 50.0,
                    "self": [{"function": "f (primed/x.py)", "share": 1.0}],
                    "total": [{"function": "f (primed/x.py)", "share": 1.0}],
                },
            }
        },
        "codec": [
            {"message": m, "encode_us": 1.0, "decode_us": 1.0, "total_us": 2.0, "floor_us": 0.2}
            for m in ("ALLOCATE", "ALLOCATED", "RELEASE", "RELEASED")
        ],
    }
    vm = {
        "part": "vm",
        "mode": "smoke",
        "machine": machine,
        "targets": {
            "vgem": target("vgem", ["64x64"]),
            "virtio_gpu": target("virtio_gpu", ["64x64", "3840x2160"]),
        },
    }
    merged = report.merge([host, vm])
    goals = merged["goals"]
    assert all(g["name"].startswith(t) for g, t in zip(goals, TARGETS, strict=True))
    judged = {goal["name"]: (goal["ratio"], goal["met"]) for goal in goals}
    assert judged["Round trip, blocking client, 64x64 memfd (median)"] == (1.0, True)
    assert judged["Daemon CPU per round trip (Python client)"] == (2.5, False)
    assert judged["Client CPU per round trip (blocking)"] == (1.5, True)
    assert judged["Daemon CPU per round trip (C client)"] == (1.5, True)
    assert judged["Batch of 253: CPU per buffer, ALLOCATE + RELEASE"] == (2.0, False)
    # 100 pairs/s at 64 clients, against the larger of 10,000/s and 8 clients' 100/s.
    assert judged["Throughput, 64 clients, one pair at a time (memfd)"] == (0.01, False)
    assert judged["Live buffers, 1,000 vs 10 (vgem)"] == (1.0, True)
    assert judged["Codec: Allocate + Allocated, encode + decode"] == (None, True)
    assert all(g["ratio"] is None or not math.isnan(g["ratio"]) for g in goals)
    json.dumps(merged)  # plain data throughout
    text = report.table(merged)
    assert "MISSED" in text and "where the daemon's Python time goes" in text

    charts = list(report.write_charts(merged, tmp_path))
    assert {p.name for p in charts} == {
        "throughput-memfd.svg",
        "throughput-vgem.svg",
        "throughput-virtio_gpu.svg",
    }
    for chart in charts:
        text = chart.read_text()
        assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
    assert "| target |" in report.markdown(merged)


def test_a_part_without_a_target_leaves_its_rows_unmeasured() -> None:
    machine = {"cpu": "x", "cores": 2, "kernel": "6", "python": "3.11"}
    merged = report.merge([{"part": "host", "mode": "smoke", "machine": machine, "targets": {}}])
    assert len(merged["goals"]) == len(TARGETS)
    for goal in merged["goals"]:
        assert goal["met"] is None and goal["ratio"] is None
        assert goal["baseline"] == "not measured"


def test_cpu_clock_of_a_process_is_its_cpu_time() -> None:
    """The clock id computed for a pid reads that process's CPU time: here our own,
    between two readings of the process clock."""
    me = os.getpid()
    before = time.process_time_ns()
    mine = cpu.cpu_ns(me)
    after = time.process_time_ns()
    assert before <= mine <= after
    user, system = cpu.stat_ns(me)
    assert 0 <= user + system <= after + 2 * 10**7  # clock ticks lag by at most one each


def test_profile_summary_sums_self_and_total_and_sets_waiting_apart(tmp_path: Path) -> None:
    raw = tmp_path / "spy.txt"
    raw.write_text(
        "main (primed/cli/main.py:1);handle (primed/daemon/core.py:5);"
        "encode (primed/wire/codec.py:9) 6\n"
        "main (primed/cli/main.py:1);handle (primed/daemon/core.py:7) 2\n"
        "main (primed/cli/main.py:1);EpollIOManager.get_events (trio/_core/_io_epoll.py:3) 5\n"
        "main (primed/cli/main.py:2);recv (socket.py:4) 2\n"
    )
    summary = profile.summarise(raw)
    assert summary["samples"] == 10 and summary["waiting"] == 5
    own = {e["function"]: e["share"] for e in summary["self"]}
    assert own == {
        "encode (primed/wire/codec.py)": 0.6,
        "handle (primed/daemon/core.py)": 0.2,
        "recv (socket.py)": 0.2,
    }
    total = {e["function"]: e["share"] for e in summary["total"]}
    # Only primed's own functions, each counted once per sample whatever its line,
    # but none that is on every stack (main).
    assert total == {
        "handle (primed/daemon/core.py)": 0.8,
        "encode (primed/wire/codec.py)": 0.6,
    }


def test_throughput_clients_that_fail_to_start_raise_instead_of_hanging(tmp_path: Path) -> None:
    """Clients that die before they are ready (here: nothing listens) end the run with
    their error; the parent does not wait for them for ever."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"only 0 of 3 primed clients got ready: .*Error"):
        workloads.throughput(
            "primed", str(tmp_path / "nothing.sock"), 3, 1, 0.1, tmp_path, 1, timeout=60.0
        )
    assert time.monotonic() - started < 60.0  # EOF said so, not the timeout


def test_heap_and_udmabuf_targets_skip_all_but_the_round_trip(tmp_path: Path) -> None:
    """A dma-buf heap's or udmabuf's target takes the round trip alone: asked for every
    other section, it measures none (nothing is opened) and says why, without an error."""
    plan = bench.PLANS["smoke"]["host"]
    for target in (
        workloads.Target("heap_system", heap="system"),
        workloads.Target("udmabuf", udmabuf=True),
    ):
        assert bench.not_taken(target, "roundtrip") is None
        others = tuple(s for s in SECTIONS if s != "roundtrip")
        result = bench.run_target(target, plan, tmp_path, others)
        assert set(result["skipped"]) == set(others)
        assert not set(others) & set(result)
    assert target.floor_backend() == ["--backend", "udmabuf"]
    assert workloads.Target("heap_system", heap="system").primed_backend() == ["--heap", "system"]
    assert workloads.Target("heap_system", heap="system").node == "/dev/dma_heap/system"
    vgem = workloads.Target("vgem", "/dev/dri/card1", "/dev/dri/renderD129")
    assert bench.not_taken(vgem, "cpu") == "memfd only"
    assert bench.not_taken(vgem, "throughput") is None
    assert all(bench.not_taken(workloads.Target("memfd"), s) is None for s in SECTIONS)


def test_a_missing_heap_or_udmabuf_is_a_lookup_error() -> None:
    if not os.path.exists("/dev/dma_heap/no-such-heap"):
        with pytest.raises(LookupError, match="no-such-heap"):
            workloads.find_targets(["heap_no-such-heap"])
