"""primed against the floor: round trips, throughput, live buffers, memory, the codec.

    python -m benchmarks.bench [--quick | --smoke] [--targets memfd,vgem,virtio_gpu]
                               [--json OUT] [--codec | --no-codec]
    python -m benchmarks.bench --merge OUT PART.json... [--svg-dir DIR] [--markdown]
    python -m benchmarks.bench --show RESULTS.json [--markdown]

The first form measures on this machine and writes one JSON part; the second
merges parts (the host's and the VM's), judges the targets, prints the table,
and writes the merged JSON and one SVG chart per target. ``scripts/bench`` runs
the host part, then the VM part, then the merge. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import codec, report, workloads
from benchmarks.workloads import Target


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each measurement to take."""

    sizes: tuple[tuple[int, int], ...]
    rt_samples: int  #: round trips wanted per runner and size
    rt_budget: float  #: seconds per size at most (all runners together)
    rt_block: int  #: round trips per turn
    clients: tuple[int, ...]
    window: int  #: requests of each kind in flight when pipelined
    duration: float  #: seconds per throughput run
    live: tuple[int, ...]  #: live buffer counts
    live_samples: int
    live_budget: float
    idle_clients: int
    codec_iterations: int
    start_timeout: float
    warm_up: int  #: units each throughput client runs before the clock starts


SIZES = ((64, 64), (640, 480), (1920, 1080), (3840, 2160))
SMALL_AND_BIG = ((64, 64), (3840, 2160))
# By mode, then by part: the VM emulates its CPU (TCG), so everything there is
# about 50 times slower, and gets longer runs and fewer samples.
PLANS = {
    "full": {
        "host": Plan(
            SIZES, 5000, 12.0, 250, (1, 8, 64, 256), 8, 3.0,
            (10, 1000, 100000), 3000, 8.0, 256, 20000, 60.0, 3,
        ),
        "vm": Plan(
            SIZES, 300, 8.0, 10, (1, 8, 64, 256), 8, 3.0,
            (10, 1000, 100000), 200, 6.0, 256, 2000, 180.0, 1,
        ),
    },
    "quick": {
        "host": Plan(
            SMALL_AND_BIG, 1000, 1.5, 100, (1, 8, 64), 8, 0.5,
            (10, 1000, 10000), 500, 1.0, 64, 2000, 60.0, 3,
        ),
        "vm": Plan(
            SMALL_AND_BIG, 30, 1.0, 10, (1, 8), 4, 0.5,
            (10, 1000), 20, 1.0, 8, 500, 180.0, 1,
        ),
    },
    "smoke": {
        "host": Plan(
            ((64, 64),), 20, 0.5, 10, (1, 2), 2, 0.2,
            (10, 50), 20, 0.5, 4, 200, 60.0, 1,
        ),
    },
}  # fmt: skip
#: Live buffers per target at most: virtio-gpu allocates in milliseconds under emulation.
LIVE_CAP = {"virtio_gpu": 1000}
#: Client processes per target at most, for the same reason.
CLIENTS_CAP = {"virtio_gpu": 64}
#: fds kept free below RLIMIT_NOFILE when memfd buffers are held: the benchmark
#: holds as many in-process, and receives up to 1024 at once while filling the daemon.
FD_MARGIN = 1536


def machine() -> dict[str, Any]:
    """What this ran on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "virtualised": _hypervisor(),
        "load_before": os.getloadavg()[0],  #: other work on the machine skews every figure
    }


def _hypervisor() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " hypervisor" in line for line in cpuinfo)
    except OSError:
        return False


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def roundtrips(target: Target, plan: Plan, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    with (
        workloads.primed_server(target, workdir, plan.start_timeout) as daemon,
        workloads.floor_server(target, workdir, "blocking", plan.start_timeout) as base,
    ):
        in_process = workloads.InProcess(target)
        floor_rt = workloads.FloorRoundTrips(base.path, target)
        blocking = workloads.BlockingRoundTrips(daemon.path, target)
        trio_rt = workloads.TrioRoundTrips(daemon.path, target)
        try:
            for width, height in plan.sizes:
                runners = {
                    "in_process": functools.partial(in_process.block, width, height),
                    "floor": functools.partial(floor_rt.block, width, height),
                    "blocking": functools.partial(blocking.block, width, height),
                    "trio": functools.partial(trio_rt.block, width, height),
                }
                taken = workloads.interleaved(
                    runners, plan.rt_samples, plan.rt_budget, plan.rt_block
                )
                row: dict[str, Any] = {"size": f"{width}x{height}"}
                row.update({name: workloads.stats(s) for name, s in taken.items()})
                rows.append(row)
                say(f"  round trip {row['size']}: " + report.brief(row))
        finally:
            in_process.close()
            floor_rt.close()
            blocking.close()
            trio_rt.close()
    return rows


def throughput(target: Target, plan: Plan, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    with (
        workloads.primed_server(target, workdir, plan.start_timeout) as daemon,
        workloads.floor_server(target, workdir, "epoll", plan.start_timeout) as base,
    ):
        for clients in plan.clients:
            if clients > CLIENTS_CAP.get(target.name, clients):
                continue
            for window in (1, plan.window):
                row: dict[str, Any] = {
                    "clients": clients,
                    "pipelined": window > 1,
                    "window": window,
                }
                for kind, server in (("floor", base), ("primed", daemon)):
                    row[kind] = workloads.throughput(
                        kind, server.path, clients, window, plan.duration, workdir, plan.warm_up
                    )
                rows.append(row)
                say(
                    f"  throughput {clients} client(s){' pipelined' if window > 1 else ''}: "
                    f"floor {row['floor']['pairs_per_s']:.0f}/s, "
                    f"primed {row['primed']['pairs_per_s']:.0f}/s"
                )
    return rows


def live_buffers(target: Target, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Cost per round trip with many live buffers, and the RSS each adds."""
    levels = list(plan.live)
    cap = LIVE_CAP.get(target.name)
    note = ""
    if target.card is None:
        cap = workloads.raise_nofile() - FD_MARGIN
        note = f"memfd: one fd per live buffer, RLIMIT_NOFILE {cap + FD_MARGIN}"
    elif cap is not None:
        note = f"{target.name}: at most {cap} (allocation is slow under emulation)"
    if cap is not None:
        levels = sorted({min(level, cap) for level in levels})
    rows = []
    with (
        workloads.primed_server(target, workdir, plan.start_timeout) as daemon,
        workloads.floor_server(target, workdir, "blocking", plan.start_timeout) as base,
    ):
        in_process = workloads.InProcess(target)
        floor_rt = workloads.FloorRoundTrips(base.path, target)
        blocking = workloads.BlockingRoundTrips(daemon.path, target)
        try:
            held = 0
            for level in levels:
                workloads.hold_primed(blocking.client, level - held)
                floor_rt.client.hold(64, 64, level - held)
                in_process.hold(level - held)
                held = level
                taken = workloads.interleaved(
                    {
                        "in_process": functools.partial(in_process.block, 64, 64),
                        "floor": functools.partial(floor_rt.block, 64, 64),
                        "primed": functools.partial(blocking.block, 64, 64),
                    },
                    plan.live_samples,
                    plan.live_budget,
                    plan.rt_block,
                )
                row: dict[str, Any] = {"live": level}
                row.update({name: workloads.stats(s) for name, s in taken.items()})
                row["rss"] = {"floor": workloads.settle(base), "primed": workloads.settle(daemon)}
                rows.append(row)
                say(f"  {level} live buffers: " + report.brief(row))
        finally:
            in_process.close()
            floor_rt.close()
            blocking.close()
    first, last = rows[0], rows[-1]
    added = last["live"] - first["live"]
    per_buffer = {
        kind: (last["rss"][kind] - first["rss"][kind]) / added if added else float("nan")
        for kind in ("floor", "primed")
    }
    return {"levels": rows, "note": note, "rss_per_buffer": per_buffer}


def idle_memory(target: Target, plan: Plan, workdir: Path) -> dict[str, Any]:
    """The RSS each connected, idle client adds."""
    result: dict[str, Any] = {"clients": plan.idle_clients}
    with (
        workloads.primed_server(target, workdir, plan.start_timeout) as daemon,
        workloads.floor_server(target, workdir, "epoll", plan.start_timeout) as base,
    ):
        for kind, server in (("floor", base), ("primed", daemon)):
            with workloads.idle_clients(kind, server.path, 4):
                pass  # warm up: the first connections grow structures once
            before = workloads.settle(server)
            with workloads.idle_clients(kind, server.path, plan.idle_clients):
                after = workloads.settle(server)
            result[kind] = (after - before) / plan.idle_clients
    say(f"  per idle client: floor {result['floor']:.0f} B, primed {result['primed']:.0f} B")
    return result


def run_target(target: Target, plan: Plan, workdir: Path) -> dict[str, Any]:
    say(f"{target.name}: {target.card or 'no device'}")
    started = time.monotonic()
    result: dict[str, Any] = {
        "target": dataclasses.asdict(target),
        "roundtrip": roundtrips(target, plan, workdir),
        "throughput": throughput(target, plan, workdir),
        "live_buffers": live_buffers(target, plan, workdir),
        "idle_clients": idle_memory(target, plan, workdir),
    }
    result["seconds"] = time.monotonic() - started
    return result


def measure(names: list[str], mode: str, with_codec: bool, part: str) -> dict[str, Any]:
    plans = PLANS[mode]
    plan = plans.get(part, plans["host"])
    workloads.raise_nofile()
    result: dict[str, Any] = {
        "part": part,
        "mode": mode,
        "machine": machine(),
        "plan": dataclasses.asdict(plan),
        "targets": {},
    }
    if with_codec:
        say("codec")
        result["codec"] = codec.measure(plan.codec_iterations)
    with tempfile.TemporaryDirectory(prefix="primed-bench-", dir="/tmp") as tmp:
        for target in workloads.find_targets(names):
            result["targets"][target.name] = run_target(target, plan, Path(tmp))
            result["targets"][target.name]["where"] = part
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    parser.add_argument("--targets", default="memfd", help="comma-separated (default memfd)")
    parser.add_argument("--part", default="host", help="a label for this part (host, vm)")
    parser.add_argument("--json", metavar="OUT", help="write the results here")
    parser.add_argument("--codec", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--merge", metavar="OUT", help="merge the PART files into OUT")
    parser.add_argument("--svg-dir", metavar="DIR", help="with --merge: write charts here")
    parser.add_argument("--show", metavar="RESULTS", help="print the tables of merged results")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("parts", nargs="*", metavar="PART.json")
    args = parser.parse_args(argv)

    if args.show:
        shown = report.merge([json.loads(Path(args.show).read_text())])
        print(report.markdown(shown) if args.markdown else report.table(shown))
        return 0
    if args.merge:
        merged = report.merge([json.loads(Path(p).read_text()) for p in args.parts])
        Path(args.merge).write_text(json.dumps(merged, indent=1) + "\n")
        if args.svg_dir:
            for path in report.write_charts(merged, Path(args.svg_dir)):
                say(f"chart: {path}")
        print(report.markdown(merged) if args.markdown else report.table(merged))
        return 0
    result = measure(args.targets.split(","), args.mode or "full", args.codec, args.part)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(report.table(report.merge([result])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
