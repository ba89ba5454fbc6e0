"""primed against the floor: round trips, throughput, live buffers, memory, the codec.

    python -m benchmarks.bench [--quick | --smoke] [--targets memfd,vgem,virtio_gpu,...]
                               [--part host|vm|vm612] [--sections roundtrip,...]
                               [--json OUT] [--codec | --no-codec]
    python -m benchmarks.bench --merge OUT PART.json... [--svg-dir DIR] [--markdown]
    python -m benchmarks.bench --show RESULTS.json [--markdown]

The first form measures on this machine and writes one JSON part; the second
merges parts (the host's and the VMs'), judges the targets, prints the table,
and writes the merged JSON and one SVG chart per target. ``scripts/bench`` runs
the host part (memfd), the VM part (vgem, virtio_gpu), the part in a VM on the
6.12 kernel (heap_system, udmabuf: round trips only), then the merge. Figures
are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
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

import primed
from benchmarks import codec, cpu, profile, report, workloads
from benchmarks.workloads import Target
from primed.daemon.policy import Quotas


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
    cpu_samples: int = 4000  #: round trips per runner for the CPU counts (64x64)
    cpu_budget: float = 20.0
    batch_samples: int = 40  #: batches of BATCH buffers per runner
    batch_budget: float = 10.0
    batch_block: int = 5
    profile_round_trips: int = 0  #: round trips under py-spy (0: no profile)
    profile_rate: int = 500  #: py-spy's samples per second


SIZES = ((64, 64), (640, 480), (1920, 1080), (3840, 2160))
SMALL_AND_BIG = ((64, 64), (3840, 2160))
# By mode, then by part: the VM emulates its CPU (TCG), so everything there is
# about 50 times slower, and gets longer runs and fewer samples. A part named
# vm-something (vm612, on the 6.12 kernel) takes the vm plan.
PLANS = {
    "full": {
        "host": Plan(
            SIZES, 5000, 12.0, 250, (1, 8, 64, 256), 8, 3.0,
            (10, 1000, 100000), 3000, 8.0, 256, 20000, 60.0, 3,
            profile_round_trips=20000,
        ),
        "vm": Plan(
            SIZES, 300, 8.0, 10, (1, 8, 64, 256), 8, 3.0,
            (10, 1000, 100000), 200, 6.0, 256, 2000, 180.0, 1,
            cpu_samples=300, cpu_budget=10.0, batch_samples=10, batch_block=2,
            profile_round_trips=2000, profile_rate=200,
        ),
    },
    "quick": {
        "host": Plan(
            ((64, 64),), 1000, 1.5, 100, (1, 8, 64), 8, 0.5,
            (10, 1000, 10000), 500, 1.0, 64, 2000, 60.0, 3,
            cpu_samples=1000, cpu_budget=4.0, batch_samples=10, batch_budget=3.0,
            profile_round_trips=3000,
        ),
        "vm": Plan(
            ((64, 64),), 30, 1.0, 10, (1, 8), 4, 0.5,
            (10, 1000), 20, 1.0, 8, 500, 180.0, 1,
            cpu_samples=30, cpu_budget=2.0, batch_samples=2, batch_block=1,
            profile_round_trips=200, profile_rate=200,
        ),
    },
    "smoke": {
        "host": Plan(
            ((64, 64),), 20, 0.5, 10, (8, 64), 2, 0.2,
            (10, 50), 20, 0.5, 4, 200, 60.0, 1,
            cpu_samples=20, cpu_budget=0.5, batch_samples=2, batch_budget=0.5, batch_block=1,
            # py-spy at 500/s with --gil: 200 round trips (16 ms) often gave the
            # client's loop no sample at all; 2000 give it dozens.
            profile_round_trips=2000,
        ),
    },
}  # fmt: skip
#: Buffers per batch: the most one ALLOCATED datagram carries (SCM_MAX_FD).
BATCH = 253
#: Targets whose live-buffer levels are profiled (first and last level), when the plan profiles.
PROFILE_LIVE = {"vgem"}
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


def cpu_per_round_trip(target: Target, plan: Plan, workdir: Path) -> dict[str, Any]:
    """CPU per 64x64 round trip, client and server counted apart, for the Python
    runners and for the C client against primed's daemon and the floor's server:
    blocking, on an epoll loop and on trio, so that what an event loop adds, and what
    trio's wake-up path adds to that, are apart from primed's own work.

    One daemon serves the primed runners; the floor's blocking server serves one
    connection at a time, so the Python and the C floor clients get one each.
    """
    me = os.getpid()
    binary = cpu.build_c_client(workdir)
    with (
        workloads.primed_server(target, workdir, plan.start_timeout) as daemon,
        workloads.floor_server(target, workdir, "blocking", plan.start_timeout) as base,
        workloads.floor_server(target, workdir, "blocking", plan.start_timeout) as base_c,
        workloads.floor_server(target, workdir, "epoll", plan.start_timeout) as epoll_c,
        workloads.floor_server(target, workdir, "trio", plan.start_timeout) as trio_c,
    ):
        in_process = workloads.InProcess(target)
        floor_rt = workloads.FloorRoundTrips(base.path, target)
        blocking = workloads.BlockingRoundTrips(daemon.path, target)
        trio_rt = workloads.TrioRoundTrips(daemon.path, target)
        c_floor = cpu.CRoundTrips(binary, "floor", base_c.path)
        c_primed = cpu.CRoundTrips(binary, "primed", daemon.path)
        c_epoll = cpu.CRoundTrips(binary, "floor", epoll_c.path)
        c_trio = cpu.CRoundTrips(binary, "floor", trio_c.path)
        try:
            runners = {
                "in_process": cpu.Metered(functools.partial(in_process.block, 64, 64), me, None),
                "floor": cpu.Metered(functools.partial(floor_rt.block, 64, 64), me, base.pid),
                "blocking": cpu.Metered(functools.partial(blocking.block, 64, 64), me, daemon.pid),
                "trio": cpu.Metered(functools.partial(trio_rt.block, 64, 64), me, daemon.pid),
                "c_floor": cpu.Metered(c_floor.block, c_floor.pid, base_c.pid),
                "c_primed": cpu.Metered(c_primed.block, c_primed.pid, daemon.pid),
                "c_floor_epoll": cpu.Metered(c_epoll.block, c_epoll.pid, epoll_c.pid),
                "c_floor_trio": cpu.Metered(c_trio.block, c_trio.pid, trio_c.pid),
            }
            usage, taken = cpu.metered(runners, plan.cpu_samples, plan.cpu_budget, plan.rt_block)
        finally:
            in_process.close()
            floor_rt.close()
            blocking.close()
            trio_rt.close()
            c_floor.close()
            c_primed.close()
            c_epoll.close()
            c_trio.close()
    result: dict[str, Any] = {"size": "64x64", "perf": cpu.perf_instructions()}
    for name, use in usage.items():
        result[name] = {**use.per_round_trip(), **workloads.stats(taken[name])}
    say(
        "  CPU per round trip: "
        + ", ".join(
            f"{name} {result[name]['client_us']:.0f}+{result[name]['server_us']:.0f} us"
            for name in usage
        )
    )
    return result


def batch(target: Target, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Per buffer: one ALLOCATE of BATCH buffers and one RELEASE of them all, against
    the memfd backend's kernel calls for as many buffers in one process."""
    me = os.getpid()
    with workloads.primed_server(target, workdir, plan.start_timeout) as daemon:
        client = primed.connect(daemon.path, name="bench")
        try:

            def primed_batches(count: int) -> list[int]:
                clock = time.perf_counter_ns
                samples = []
                for _ in range(count):
                    start = clock()
                    client.release(*client.allocate_many(64, 64, "XR24", BATCH))
                    samples.append(clock() - start)
                return samples

            in_process = cpu.InProcessBatch(BATCH)
            usage, taken = cpu.metered(
                {
                    "in_process": cpu.Metered(in_process.block, me, None),
                    "primed": cpu.Metered(primed_batches, me, daemon.pid),
                },
                plan.batch_samples,
                plan.batch_budget,
                plan.batch_block,
            )
        finally:
            client.close()
    result: dict[str, Any] = {"count": BATCH, "size": "64x64"}
    for name, use in usage.items():
        result[name] = {
            **use.per_round_trip(per=BATCH),
            "batch_median_us": workloads.stats(taken[name])["median_us"],
        }
    say(
        f"  batch of {BATCH}, per buffer: in-process {result['in_process']['wall_us']:.1f} us, "
        f"primed {result['primed']['wall_us']:.1f} us "
        f"(daemon {result['primed']['server_us']:.1f}, client {result['primed']['client_us']:.1f})"
    )
    return result


def profiled_round_trips(
    daemon: workloads.Server, rt: workloads.BlockingRoundTrips, plan: Plan, out: Path
) -> dict[str, Any]:
    """py-spy on the daemon while ``rt`` does the plan's round trips (64x64); the
    summary, and the daemon's CPU (and user CPU) per round trip during them, the
    sampling's cost included."""
    before, (user, _) = cpu.cpu_ns(daemon.pid), cpu.stat_ns(daemon.pid)
    with profile.sampled(daemon.pid, out, plan.profile_rate):
        taken = rt.block(64, 64, plan.profile_round_trips)
    spent, (user_after, _) = cpu.cpu_ns(daemon.pid) - before, cpu.stat_ns(daemon.pid)
    summary = profile.summarise(out)
    summary["round_trips"] = len(taken)
    summary["median_us"] = workloads.stats(taken)["median_us"]
    summary["daemon_cpu_us"] = spent / max(1, len(taken)) / 1000
    summary["daemon_user_us"] = (user_after - user) / max(1, len(taken)) / 1000
    return summary


#: A blocking client doing round trips on its own: argv[1] the socket, argv[2] how many.
_CLIENT_LOOP = (
    "import sys\n"
    "from benchmarks.workloads import BlockingRoundTrips, Target\n"
    "runs = BlockingRoundTrips(sys.argv[1], Target('memfd'))\n"
    "runs.block(64, 64, 200)\n"
    "runs.block(64, 64, int(sys.argv[2]))\n"
    "runs.close()\n"
)
_CLIENT_STEP = "BlockingRoundTrips.block (benchmarks/workloads.py)"


def profile_client(target: Target, plan: Plan, workdir: Path) -> dict[str, Any]:
    """Where the blocking client's CPU goes in the 64x64 round trip: py-spy on a client
    process of its own, the samples under its round-trip loop only."""
    out = workdir / "spy-client.txt"
    with workloads.primed_server(target, workdir, plan.start_timeout) as daemon:
        argv = [sys.executable, "-c", _CLIENT_LOOP, daemon.path, str(plan.profile_round_trips)]
        profile.recorded(argv, out, plan.profile_rate)
    return profile.summarise(out, within=_CLIENT_STEP)


def profile_daemon(target: Target, plan: Plan, workdir: Path) -> dict[str, Any] | None:
    """Where the daemon's CPU goes in the blocking 64x64 round trip (py-spy), or None
    when the plan takes no profile; {"error": why} when py-spy can't."""
    if not plan.profile_round_trips:
        return None
    with workloads.primed_server(target, workdir, plan.start_timeout) as daemon:
        rt = workloads.BlockingRoundTrips(daemon.path, target)
        try:
            rt.block(64, 64, 200)  # warm-up
            try:
                summary = profiled_round_trips(daemon, rt, plan, workdir / "spy.txt")
            except RuntimeError as e:
                say(f"  profile: {e}")
                return {"error": str(e)}
        finally:
            rt.close()
    say(f"  profile: {summary['samples']} samples, top: {summary['self'][0]['function']}")
    try:
        summary["client"] = profile_client(target, plan, workdir)
    except RuntimeError as e:
        summary["client"] = {"error": str(e)}
    return summary


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
                        kind,
                        server.path,
                        clients,
                        window,
                        plan.duration,
                        workdir,
                        plan.warm_up,
                        timeout=plan.start_timeout,
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
        nofile = workloads.raise_nofile()
        cap = nofile - FD_MARGIN
        note = f"memfd: one fd per live buffer, RLIMIT_NOFILE {nofile}"
        # The buffers are one client's, which also makes the round trips' buffer: the
        # daemon's default quota per client, cut from the same RLIMIT_NOFILE (an eighth
        # of its buffer bound), less that one, is the most it may hold.
        quota = Quotas.for_nofile(nofile).buffers_per_client - 1
        if quota < cap:
            cap = quota
            note += f", at most {quota} (the daemon's quota per client, less one)"
    elif cap is not None:
        note = f"{target.name}: at most {cap} (allocation is slow under emulation)"
    if cap is not None:
        levels = sorted({min(level, cap) for level in levels})
    rows = []
    profiling = bool(plan.profile_round_trips) and target.name in PROFILE_LIVE
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
                floor_rt.client.hold(*workloads.HELD, level - held)
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
                if profiling and level in (levels[0], levels[-1]):
                    try:
                        out = workdir / f"spy-{target.name}-{level}.txt"
                        row["profile"] = profiled_round_trips(daemon, blocking, plan, out)
                    except RuntimeError as e:
                        row["profile"] = {"error": str(e)}
                        say(f"  profile: {e}")
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


#: The measurements, in the order they run; cpu, batch and profile on memfd only.
SECTIONS = ("roundtrip", "cpu", "batch", "profile", "throughput", "live_buffers", "idle_clients")
_MEMFD_ONLY = {"cpu", "batch", "profile"}
#: Sections whose processes take turns (one request at a time): run on one CPU
#: (workloads.pinned says why). The throughput runs are about using every CPU, and
#: the profiles' own figures are shares, so they run where the scheduler puts them.
_PINNED = {"roundtrip", "cpu", "batch", "live_buffers", "idle_clients"}


def not_taken(target: Target, section: str) -> str | None:
    """Why ``section`` is not measured on ``target``, or None if it is."""
    if target.dmabuf and section != "roundtrip":
        # Issue #14 asks the round-trip table of them; the rest is not sized for
        # them (100,000 live heap buffers are 1.6 GB of pinned pages in a 2 GB VM).
        return "round trips only on a heap or udmabuf"
    if (target.card is not None or target.dmabuf) and section in _MEMFD_ONLY:
        return "memfd only"
    return None


def run_target(
    target: Target, plan: Plan, workdir: Path, sections: tuple[str, ...] = SECTIONS
) -> dict[str, Any]:
    say(f"{target.name}: {target.node or 'no device'}")
    started = time.monotonic()
    runs = {
        "roundtrip": roundtrips,
        "cpu": cpu_per_round_trip,
        "batch": batch,
        "profile": profile_daemon,
        "throughput": throughput,
        "live_buffers": live_buffers,
        "idle_clients": idle_memory,
    }
    result: dict[str, Any] = {"target": dataclasses.asdict(target)}
    skipped = {}
    for name in SECTIONS:
        if name not in sections:
            continue
        why = not_taken(target, name)
        if why is None:
            with workloads.pinned() if name in _PINNED else contextlib.nullcontext():
                result[name] = runs[name](target, plan, workdir)
        else:
            skipped[name] = why
    if skipped:
        result["skipped"] = skipped
        say(
            f"  not measured on {target.name}: "
            + ", ".join(f"{k} ({v})" for k, v in skipped.items())
        )
    result["seconds"] = time.monotonic() - started
    return result


def measure(
    names: list[str],
    mode: str,
    with_codec: bool,
    part: str,
    sections: tuple[str, ...] = SECTIONS,
) -> dict[str, Any]:
    plans = PLANS[mode]
    plan = plans.get(part) or plans.get("vm" if part.startswith("vm") else "host", plans["host"])
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
            result["targets"][target.name] = run_target(target, plan, Path(tmp), sections)
            result["targets"][target.name]["where"] = part
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    parser.add_argument(
        "--targets",
        default="memfd",
        help="comma-separated: memfd, vgem, virtio_gpu, heap_NAME (heap_system), udmabuf "
        "(default memfd)",
    )
    parser.add_argument(
        "--part",
        default="host",
        help="a label for this part (host, vm, vm612: vm* take the vm plan)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated measurements to take (default all: {','.join(SECTIONS)})",
    )
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
    sections = tuple(args.sections.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    result = measure(args.targets.split(","), args.mode or "full", args.codec, args.part, sections)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(report.table(report.merge([result])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
