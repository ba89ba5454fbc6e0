"""The benchmark runs end to end on tiny counts and writes well-formed results.

Nothing here looks at a figure's size: timings are never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from benchmarks import report

SECTIONS = ("roundtrip", "throughput", "live_buffers", "idle_clients")


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
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    }
    for row in memfd["throughput"]:
        for kind in ("floor", "primed"):
            assert _number(row[kind]["pairs_per_s"])
    levels = memfd["live_buffers"]["levels"]
    assert [level["live"] for level in levels] == [10, 50]
    assert all(_number(level["primed"]["median_us"]) for level in levels)
    assert set(memfd["live_buffers"]["rss_per_buffer"]) == {"floor", "primed"}
    assert _number(memfd["idle_clients"]["primed"])

    kinds = {row["message"] for row in result["codec"]}
    assert {"HELLO", "ALLOCATE", "ALLOCATED", "RELEASE", "RELEASED", "ERROR"} <= kinds
    for row in result["codec"]:
        assert row["total_us"] == row["encode_us"] + row["decode_us"]

    assert "targets" in done.stdout  # the table was printed


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

    machine = {"cpu": "x", "cores": 2, "kernel": "6", "python": "3.11", "virtualised": True}
    host = {
        "part": "host",
        "mode": "smoke",
        "machine": machine,
        "targets": {"memfd": target("memfd", ["64x64"])},
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
    judged = {goal["name"]: goal["met"] for goal in merged["goals"]}
    assert None not in judged.values(), judged
    assert judged["Codec: Allocate + Allocated, encode + decode"] is True
    assert judged["Throughput, 64 clients (memfd)"] is False
    assert all(not math.isnan(goal["value"]) for goal in merged["goals"])
    json.dumps(merged)  # plain data throughout

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
