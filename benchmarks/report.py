"""The benchmark's results as tables (text or Markdown), targets judged, and SVG charts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

Row = Sequence[str]

# What issue #14 asks of primed; each is judged on one run's ratios, never asserted.
RT_BLOCKING = 2.0  #: blocking round trip, 64x64 memfd, against the floor
RT_TRIO = 2.5  #: trio client's round trip against the floor
CPU_DAEMON = 2.0  #: daemon CPU per round trip against the floor's server
CPU_CLIENT = 2.0  #: client CPU per round trip against the floor's client
CPU_C_DAEMON = 2.0  #: daemon CPU per round trip, C client, against the floor's server
BATCH = 1.5  #: per buffer of a 253-buffer ALLOCATE + RELEASE against in-process
THROUGHPUT = 10000.0  #: pairs/s at 64 clients, one pair at a time (and >= 8 clients)
LIVE_TARGET = 1.15  #: vgem round trip at 100,000 live buffers against 10
CODEC_US = 10.0  #: Allocate + Allocated, encode + decode


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the host's and the VM's parts (or earlier merged results, to
    which later parts add or replace targets), with the targets judged."""
    merged: dict[str, Any] = {"machines": {}, "targets": {}, "modes": {}}
    for part in parts:
        if "machines" in part:
            merged["machines"].update(part["machines"])
            merged["modes"].update(part["modes"])
        else:
            merged["machines"][part["part"]] = part["machine"]
            merged["modes"][part["part"]] = part["mode"]
        merged["targets"].update(part["targets"])
        if "codec" in part:
            merged["codec"] = part["codec"]
    merged["goals"] = judge(merged)
    return merged


def _ratio(value: float, base: float) -> float:
    return value / base if base and not math.isnan(base) else float("nan")


def _rt(result: dict[str, Any], target: str, size: str) -> dict[str, Any] | None:
    for row in result["targets"].get(target, {}).get("roundtrip", []):
        if row["size"] == size:
            return dict(row)
    return None


def _tp(result: dict[str, Any], target: str, clients: int, pipelined: bool) -> dict[str, Any]:
    for row in result["targets"].get(target, {}).get("throughput", []):
        if row["clients"] == clients and row["pipelined"] == pipelined:
            return dict(row)
    return {}


def judge(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: the floor's (or baseline) figure, primed's, their ratio, the bound,
    and whether it is met (None: not measured in this run)."""
    goals: list[dict[str, Any]] = []

    def goal(
        name: str,
        baseline: str,
        measured: str,
        ratio: float | None,
        bound: str,
        met: bool | None,
    ) -> None:
        if ratio is not None and math.isnan(ratio):
            ratio = None
        if met is None or (ratio is None and bound.startswith(("<=", ">="))):
            baseline, measured, met = "not measured", "", None
        goals.append(
            {
                "name": name,
                "baseline": baseline,
                "primed": measured,
                "ratio": ratio,
                "bound": bound,
                "met": met,
            }
        )

    def at_most(value: float | None, bound: float) -> bool | None:
        return None if value is None or math.isnan(value) else value <= bound

    small = _rt(result, "memfd", "64x64")
    for runner, bound, label in (
        ("blocking", RT_BLOCKING, "blocking client"),
        ("trio", RT_TRIO, "trio client"),
    ):
        ratio = fl = pr = None
        if small:
            fl, pr = small["floor"]["median_us"], small[runner]["median_us"]
            ratio = _ratio(pr, fl)
        goal(
            f"Round trip, {label}, 64x64 memfd (median)",
            f"floor {_us(fl)}" if fl is not None else "",
            _us(pr) if pr is not None else "",
            ratio,
            f"<= {bound}x",
            at_most(ratio, bound),
        )
    counts = result["targets"].get("memfd", {}).get("cpu")
    for name, base, runner, side, bound in (
        ("Daemon CPU per round trip (Python client)", "floor", "blocking", "server", CPU_DAEMON),
        ("Client CPU per round trip (blocking)", "floor", "blocking", "client", CPU_CLIENT),
        ("Daemon CPU per round trip (C client)", "c_floor", "c_primed", "server", CPU_C_DAEMON),
    ):
        ratio = fl = pr = None
        if counts:
            fl, pr = counts[base][f"{side}_us"], counts[runner][f"{side}_us"]
            ratio = _ratio(pr, fl)
        who = "floor server" if side == "server" else "floor client"
        goal(
            name,
            f"{who} {fl:.1f} us" if fl is not None else "",
            f"{pr:.1f} us" if pr is not None else "",
            ratio,
            f"<= {bound}x",
            at_most(ratio, bound),
        )
    batch = result["targets"].get("memfd", {}).get("batch")
    ratio = None
    base_cpu = primed_cpu = 0.0
    if batch:
        # CPU, not wall time: the exchange is sequential (one request, one reply), so
        # on an idle machine its wall time is about this sum, and CPU holds still
        # when other work preempts the processes.
        base_cpu = batch["in_process"]["client_us"]
        primed_cpu = batch["primed"]["client_us"] + batch["primed"]["server_us"]
        ratio = _ratio(primed_cpu, base_cpu)
    goal(
        f"Batch of {batch['count'] if batch else 253}: CPU per buffer, ALLOCATE + RELEASE",
        f"in-process {base_cpu:.1f} us" if batch else "",
        f"{primed_cpu:.1f} us (daemon {batch['primed']['server_us']:.1f})" if batch else "",
        ratio,
        f"<= {BATCH}x",
        at_most(ratio, BATCH),
    )
    at64 = _tp(result, "memfd", 64, False).get("primed", {}).get("pairs_per_s")
    at8 = _tp(result, "memfd", 8, False).get("primed", {}).get("pairs_per_s")
    ratio = None
    if at64 is not None and at8 is not None:
        ratio = at64 / max(THROUGHPUT, at8)
    goal(
        "Throughput, 64 clients, one pair at a time (memfd)",
        f"{THROUGHPUT:,.0f}/s; 8 clients {at8:,.0f}/s" if at8 is not None else "",
        f"{at64:,.0f}/s" if at64 is not None else "",
        ratio,
        ">= 1.0x (of the larger)",
        None if ratio is None else ratio >= 1.0,
    )
    live = result["targets"].get("vgem", {}).get("live_buffers")
    ratio = None
    name = "Live buffers, most vs 10 (vgem)"
    if live and len(live["levels"]) > 1:
        first, last = live["levels"][0], live["levels"][-1]
        name = f"Live buffers, {last['live']:,} vs {first['live']:,} (vgem)"
        ratio = _ratio(last["primed"]["median_us"], first["primed"]["median_us"])
    goal(
        name,
        f"{first['live']:,} live: {_us(first['primed']['median_us'])}" if ratio else "",
        f"{last['live']:,} live: {_us(last['primed']['median_us'])}" if ratio else "",
        ratio,
        f"<= {LIVE_TARGET}x",
        at_most(ratio, LIVE_TARGET),
    )
    rows = {row["message"]: row for row in result.get("codec", [])}
    pair = None
    if "ALLOCATE" in rows and "ALLOCATED" in rows:
        pair = rows["ALLOCATE"]["total_us"] + rows["ALLOCATED"]["total_us"]
    goal(
        "Codec: Allocate + Allocated, encode + decode",
        f"struct {2 * rows['ALLOCATE']['floor_us']:.2f} us" if pair is not None else "",
        f"{pair:.1f} us" if pair is not None else "",
        None,
        f"< {CODEC_US:.0f} us",
        None if pair is None else pair < CODEC_US,
    )
    return goals


def brief(row: dict[str, Any]) -> str:
    """One line of medians, for progress output."""
    parts = []
    for name, value in row.items():
        if isinstance(value, dict) and "median_us" in value:
            parts.append(f"{name} {value['median_us']:.0f} us")
    return ", ".join(parts)


def _median(row: dict[str, Any], runner: str) -> float:
    return float(row.get(runner, {}).get("median_us", float("nan")))


def _us(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value / 1000:.1f} ms" if value >= 10000 else f"{value:.0f} us"


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def sections(result: dict[str, Any]) -> list[tuple[str, Row, list[Row]]]:
    """Every table: a title, a header and rows of cells."""
    out: list[tuple[str, Row, list[Row]]] = []
    for name, data in result["targets"].items():
        rows: list[Row] = []
        for row in data.get("roundtrip", []):
            fl = row["floor"]["median_us"]
            rows.append(
                [
                    row["size"],
                    _us(row["in_process"]["median_us"]),
                    f"{_us(fl)} / {_us(row['floor']['p99_us'])}",
                    f"{_us(row['blocking']['median_us'])} / {_us(row['blocking']['p99_us'])}",
                    _x(_ratio(row["blocking"]["median_us"], fl)),
                    f"{_us(row['trio']['median_us'])} / {_us(row['trio']['p99_us'])}",
                    _x(_ratio(row["trio"]["median_us"], fl)),
                ]
            )
        if rows:
            out.append(
                (
                    f"{name}: one allocate + receive + import + release round trip (median / p99)",
                    [
                        "size",
                        "in-process",
                        "floor",
                        "primed blocking",
                        "ratio",
                        "primed trio",
                        "ratio",
                    ],
                    rows,
                )
            )
        out += _cpu_sections(name, data)
        rows = []
        for row in data.get("throughput", []):
            fl, pr = row["floor"], row["primed"]
            rows.append(
                [
                    str(row["clients"]),
                    f"{row['window']} in flight" if row["pipelined"] else "no",
                    f"{fl['pairs_per_s']:,.0f}",
                    f"{pr['pairs_per_s']:,.0f}",
                    _x(_ratio(pr["pairs_per_s"], fl["pairs_per_s"])),
                    _us(fl["unit_median_us"]),
                    _us(pr["unit_median_us"]),
                ]
            )
        if rows:
            out.append(
                (
                    f"{name}: allocate + release pairs per second, client processes",
                    [
                        "clients",
                        "pipelined",
                        "floor /s",
                        "primed /s",
                        "ratio",
                        "floor unit",
                        "primed unit",
                    ],
                    rows,
                )
            )
        live = data.get("live_buffers", {"levels": [], "note": ""})
        rows = []
        for row in live["levels"]:
            first = live["levels"][0]
            kernel = _median(row, "in_process")
            rows.append(
                [
                    f"{row['live']:,}",
                    _us(kernel),
                    _us(row["floor"]["median_us"]),
                    _us(row["primed"]["median_us"]),
                    _x(_ratio(row["primed"]["median_us"], row["floor"]["median_us"])),
                    _x(_ratio(row["primed"]["median_us"], first["primed"]["median_us"])),
                    _x(_ratio(kernel, _median(first, "in_process"))),
                    f"{row['rss']['primed'] / 2**20:.1f} MiB",
                ]
            )
        if rows:
            out.append(
                (
                    f"{name}: round trip (64x64) with live buffers held"
                    + (f" ({live['note']})" if live["note"] else ""),
                    [
                        "live",
                        "in-process",
                        "floor",
                        "primed",
                        "ratio",
                        "primed vs first",
                        "in-process vs first",
                        "primed RSS",
                    ],
                    rows,
                )
            )
        if "rss_per_buffer" not in live or "idle_clients" not in data:
            continue
        per_buffer, idle = live["rss_per_buffer"], data["idle_clients"]
        out.append(
            (
                f"{name}: daemon memory (RSS growth)",
                ["per", "floor", "primed", "ratio"],
                [
                    [
                        "live buffer",
                        f"{per_buffer['floor']:,.0f} B",
                        f"{per_buffer['primed']:,.0f} B",
                        _x(_ratio(per_buffer["primed"], per_buffer["floor"])),
                    ],
                    [
                        f"idle client ({idle['clients']})",
                        f"{idle['floor']:,.0f} B",
                        f"{idle['primed']:,.0f} B",
                        _x(_ratio(idle["primed"], idle["floor"])),
                    ],
                ],
            )
        )
    if result.get("codec"):
        rows = [
            [
                row["message"],
                f"{row['encode_us']:.2f}",
                f"{row['decode_us']:.2f}",
                f"{row['total_us']:.2f}",
                f"{row['floor_us']:.2f}",
                _x(_ratio(row["total_us"], row["floor_us"])),
            ]
            for row in result["codec"]
        ]
        out.append(
            (
                "codec: one message of each kind (us; floor: struct pack + unpack, no checks)",
                ["message", "encode", "decode", "both", "floor", "ratio"],
                rows,
            )
        )
    out.append(targets(result))
    return out


def targets(result: dict[str, Any]) -> tuple[str, Row, list[Row]]:
    """The table of issue #14's targets."""
    rows: list[Row] = [
        [
            g["name"],
            g["baseline"],
            g["primed"],
            "-" if g["ratio"] is None else f"{g['ratio']:.2f}x",
            g["bound"],
            {True: "met", False: "MISSED", None: "-"}[g["met"]],
        ]
        for g in result["goals"]
    ]
    header = ["target", "floor / baseline", "primed", "ratio", "bound", ""]
    return ("targets (issue #14)", header, rows)


_RUNNERS = {
    "in_process": "in-process (no socket)",
    "floor": "floor, Python client",
    "blocking": "primed, blocking client",
    "trio": "primed, trio client",
    "c_floor": "floor, C client",
    "c_floor_epoll": "floor on an epoll loop, C client",
    "c_floor_trio": "floor on trio, C client",
    "c_primed": "primed, C client",
    "primed": "primed, blocking client",
}


def _split(row: dict[str, Any], side: str) -> str:
    if side == "server" and not row[f"{side}_us"] and not row[f"{side}_sys_us"]:
        return "-"
    return (
        f"{row[f'{side}_us']:.1f} us "
        f"({row[f'{side}_user_us']:.0f} user, {row[f'{side}_sys_us']:.0f} sys)"
    )


def _profile_rows(summary: dict[str, Any], cpu_us: float | None) -> list[Row]:
    rows: list[Row] = []
    for kind in ("self", "total"):
        for entry in summary[kind]:
            share = entry["share"]
            rows.append(
                [
                    kind,
                    entry["function"],
                    f"{share:.1%}",
                    "-" if cpu_us is None else f"{share * cpu_us:.1f} us",
                ]
            )
    return rows


def _cpu_sections(name: str, data: dict[str, Any]) -> list[tuple[str, Row, list[Row]]]:
    """The CPU counts, the batches and the profiles of one target, where measured."""
    out: list[tuple[str, Row, list[Row]]] = []
    counts = data.get("cpu")
    if counts:
        rows: list[Row] = []
        for runner, label in _RUNNERS.items():
            if runner not in counts:
                continue
            row = counts[runner]
            rows.append(
                [
                    label,
                    _us(row["median_us"]),
                    _split(row, "client"),
                    _split(row, "server"),
                    f"{row['client_us'] + row['server_us']:.1f} us",
                ]
            )
        perf = counts.get("perf", "")
        out.append(
            (
                f"{name}: CPU per 64x64 round trip, per process (clock_gettime of each "
                "process's CPU clock; user/sys from /proc/PID/stat)"
                + ("" if perf == "yes" else f" [instruction counts: {perf}]"),
                ["runner", "wall median", "client CPU", "server CPU", "both"],
                rows,
            )
        )
    batch = data.get("batch")
    if batch:
        rows = []
        for runner in ("in_process", "primed"):
            row = batch[runner]
            rows.append(
                [
                    _RUNNERS[runner],
                    f"{row['client_us'] + row['server_us']:.1f} us",
                    _split(row, "client"),
                    _split(row, "server"),
                    f"{row['batch_median_us'] / batch['count']:.1f} us",
                    f"{row['wall_us']:.1f} us",
                ]
            )
        out.append(
            (
                f"{name}: one ALLOCATE of {batch['count']} ({batch['size']}) + one RELEASE, "
                "per buffer (in-process: memfd_create, ftruncate, seals, reopen, close)",
                ["runner", "CPU", "client CPU", "daemon CPU", "wall (median)", "wall (mean)"],
                rows,
            )
        )
    summary = data.get("profile")
    if summary and "error" not in summary:
        per_rt = counts["blocking"]["server_user_us"] if counts else None
        out.append(
            (
                f"{name}: where the daemon's Python time goes, blocking 64x64 round trip "
                f"(py-spy --gil, {summary['samples']} samples; us: share of the daemon's "
                "user CPU per round trip, from the CPU counts)",
                ["", "function", "share", "us"],
                _profile_rows(summary, per_rt),
            )
        )
        client = summary.get("client", {})
        if "error" in client:
            out.append((f"{name}: client profile", ["error"], [[client["error"]]]))
        elif client:
            per_rt = counts["blocking"]["client_user_us"] if counts else None
            out.append(
                (
                    f"{name}: where the blocking client's Python time goes, 64x64 round trip "
                    f"(py-spy --gil, {client['samples']} samples in its round-trip loop; us: "
                    "share of the client's user CPU per round trip, from the CPU counts)",
                    ["", "function", "share", "us"],
                    _profile_rows(client, per_rt),
                )
            )
    elif summary:
        out.append((f"{name}: daemon profile", ["error"], [[summary["error"]]]))
    for level in data.get("live_buffers", {}).get("levels", []):
        got = level.get("profile")
        if got and "error" not in got:
            out.append(
                (
                    f"{name}: where the daemon's Python time goes at {level['live']:,} live "
                    f"buffers (py-spy --gil, {got['samples']} samples; {got['round_trips']} "
                    f"round trips while sampled, median {_us(got['median_us'])}, daemon CPU "
                    f"{got['daemon_cpu_us']:.0f} us each, {got['daemon_user_us']:.0f} user; "
                    "us: share of that user CPU)",
                    ["", "function", "share", "us"],
                    _profile_rows(got, got.get("daemon_user_us")),
                )
            )
        elif got:
            out.append(
                (f"{name}: daemon profile at {level['live']:,}", ["error"], [[got["error"]]])
            )
    return out


def _machines(result: dict[str, Any]) -> list[str]:
    return [
        f"{part}: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}"
        + (" (virtualised)" if m.get("virtualised") else "")
        + (f"; load average {m['load_before']:.1f} at the start" if "load_before" in m else "")
        for part, m in result["machines"].items()
    ]


def table(result: dict[str, Any]) -> str:
    """Plain text, columns aligned."""
    lines = [f"machine {line}" for line in _machines(result)]
    for title, header, rows in sections(result):
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines += ["", title]
        for r in [header, *rows]:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The same tables in Markdown."""
    lines = [f"- {line}" for line in _machines(result)]
    for title, header, rows in sections(result):
        lines += ["", f"**{title}**", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join(" --- " for _ in header) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# Charts: hand-written SVG, two panels side by side.

_COLOURS = {"floor": "#7f7f7f", "primed": "#1f77b4"}


def _ticks(top: float) -> list[float]:
    if top <= 0 or math.isnan(top):
        return [0.0, 1.0]
    step = 10 ** math.floor(math.log10(top / 4))
    for factor in (1, 2, 5, 10):
        if top / (step * factor) <= 5:
            step *= factor
            break
    return [step * i for i in range(int(top / step) + 2)]


def _label(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _panel(
    x0: float,
    title: str,
    clients: list[int],
    series: list[tuple[str, str, bool, list[float]]],
    log: bool = False,
) -> list[str]:
    """One panel: ``series`` are (label, kind, dashed, values per client count); the
    y axis starts at 0, or is logarithmic."""
    left, top, plot_w, plot_h = 60.0, 40.0, 320.0, 200.0
    values = [v for _, _, _, vs in series for v in vs if not math.isnan(v) and v > 0]
    if log:
        low = 10.0 ** math.floor(math.log10(min(values, default=1.0)))
        high = 10.0 ** math.ceil(math.log10(max(values, default=10.0)))
        high = max(high, low * 10)
        ticks = [low * 10**i for i in range(round(math.log10(high / low)) + 1)]

        def fraction(v: float) -> float:
            return math.log10(v / low) / math.log10(high / low)
    else:
        ticks = _ticks(max(values, default=1.0))

        def fraction(v: float) -> float:
            return v / ticks[-1]

    out = [f'<text x="{x0 + left}" y="24" font-weight="bold">{escape(title)}</text>']

    def px(i: int) -> float:
        return x0 + left + (plot_w * i / max(1, len(clients) - 1))

    def py(v: float) -> float:
        return top + plot_h * (1 - fraction(v))

    for tick in ticks:
        y = py(tick)
        out.append(
            f'<line x1="{x0 + left}" y1="{y:.1f}" x2="{x0 + left + plot_w}" y2="{y:.1f}" '
            'stroke="#e0e0e0"/>'
        )
        out.append(
            f'<text x="{x0 + left - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(tick)}</text>'
        )
    for i, count in enumerate(clients):
        out.append(
            f'<text x="{px(i):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{count}</text>'
        )
    out.append(
        f'<text x="{x0 + left + plot_w / 2}" y="{top + plot_h + 36}" text-anchor="middle">'
        "client processes</text>"
    )
    for n, (label, kind, dashed, vs) in enumerate(series):
        shown = [(i, v) for i, v in enumerate(vs) if not math.isnan(v) and (v > 0 or not log)]
        points = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in shown)
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        colour = _COLOURS[kind]
        out.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        for i, v in shown:
            out.append(f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}"/>')
        lx = x0 + left + (n % 2) * 170
        ly = top + plot_h + 58 + 16 * (n // 2)
        out.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{colour}" '
            f'stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{lx + 30}" y="{ly + 4}">{escape(label)}</text>')
    return out


def chart(name: str, data: dict[str, Any], machine: str) -> str:
    """Throughput and latency against client processes, primed beside the floor."""
    rows = data["throughput"]
    clients = sorted({row["clients"] for row in rows})

    def pick(kind: str, pipelined: bool, field: str) -> list[float]:
        by = {r["clients"]: r[kind][field] for r in rows if r["pipelined"] == pipelined}
        return [float(by.get(c, float("nan"))) for c in clients]

    window = max((r["window"] for r in rows), default=1)
    left = _panel(
        0,
        f"{name}: allocate + release pairs per second",
        clients,
        [
            ("floor", "floor", False, pick("floor", False, "pairs_per_s")),
            ("primed", "primed", False, pick("primed", False, "pairs_per_s")),
            (f"floor, {window} in flight", "floor", True, pick("floor", True, "pairs_per_s")),
            (f"primed, {window} in flight", "primed", True, pick("primed", True, "pairs_per_s")),
        ],
    )
    right = _panel(
        420,
        f"{name}: one pair's latency, us (not pipelined)",
        clients,
        [
            ("floor median", "floor", False, pick("floor", False, "unit_median_us")),
            ("primed median", "primed", False, pick("primed", False, "unit_median_us")),
            ("floor p99", "floor", True, pick("floor", False, "unit_p99_us")),
            ("primed p99", "primed", True, pick("primed", False, "unit_p99_us")),
        ],
        log=True,
    )
    body = "\n".join(
        [
            '<svg xmlns="http://www.w3.org/2000/svg" width="840" height="360" '
            'viewBox="0 0 840 360" font-family="sans-serif" font-size="12">',
            '<rect width="840" height="360" fill="white"/>',
            *left,
            *right,
            f'<text x="10" y="350" fill="#555">{escape(machine)}</text>',
            "</svg>",
        ]
    )
    return body + "\n"


def write_charts(result: dict[str, Any], directory: Path) -> Iterable[Path]:
    """One SVG per target, named ``throughput-TARGET.svg``; yields each path."""
    directory.mkdir(parents=True, exist_ok=True)
    machines = dict(zip(result["machines"], _machines(result), strict=True))
    for name, data in result["targets"].items():
        if not data.get("throughput"):
            continue
        path = directory / f"throughput-{name}.svg"
        machine = machines.get(data.get("where", ""), "")
        path.write_text(chart(name, data, machine))
        yield path
