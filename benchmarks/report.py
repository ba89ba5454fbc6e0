"""The benchmark's results as tables (text or Markdown), targets judged, and SVG charts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from benchmarks import codec

Row = Sequence[str]

# What the issue asks of primed; each is judged on one run's ratios.
RT_TARGET = 1.3
CODEC_US = 10.0
CODEC_SHARE = 0.15
THROUGHPUT = 10000.0
LIVE_TARGET = 1.15
BYTES_PER_BUFFER = 2048
BYTES_PER_CLIENT = 20480
BIG_TARGET = 1.1


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
    """Each target: what it asks, the figure measured, and whether it is met (None: not run)."""
    goals: list[dict[str, Any]] = []

    def goal(name: str, asked: str, value: float | None, met: bool | None, shown: str) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            met, shown = None, "not measured"
        goals.append({"name": name, "asked": asked, "value": value, "met": met, "shown": shown})

    small = _rt(result, "memfd", "64x64")
    ratio, shown = None, ""
    if small:
        primed_us, floor_us = small["blocking"]["median_us"], small["floor"]["median_us"]
        ratio = _ratio(primed_us, floor_us)
        shown = f"{ratio:.2f}x ({primed_us:.0f} vs {floor_us:.0f} us)"
    goal(
        "Round trip, blocking client, 64x64 (memfd)",
        f"<= {RT_TARGET}x floor",
        ratio,
        ratio is not None and ratio <= RT_TARGET,
        shown,
    )
    rows = {row["message"]: row for row in result.get("codec", [])}
    pair = None
    if "ALLOCATE" in rows and "ALLOCATED" in rows:
        pair = rows["ALLOCATE"]["total_us"] + rows["ALLOCATED"]["total_us"]
    goal(
        "Codec: Allocate + Allocated, encode + decode",
        f"< {CODEC_US:.0f} us",
        pair,
        pair is not None and pair < CODEC_US,
        f"{pair:.1f} us" if pair is not None else "",
    )
    share = None
    if rows and small:
        share = codec.round_trip_us(list(rows.values())) / small["blocking"]["median_us"]
    goal(
        "Codec share of the round trip (4 messages)",
        f"<= {CODEC_SHARE:.0%}",
        share,
        share is not None and share <= CODEC_SHARE,
        f"{share:.1%}" if share is not None else "",
    )
    for pipelined in (False, True):
        at64 = _tp(result, "memfd", 64, pipelined).get("primed", {}).get("pairs_per_s")
        at8 = _tp(result, "memfd", 8, pipelined).get("primed", {}).get("pairs_per_s")
        met = at64 is not None and at8 is not None and at64 >= THROUGHPUT and at64 >= at8
        goal(
            f"Throughput, 64 clients{' pipelined' if pipelined else ''} (memfd)",
            f">= {THROUGHPUT:,.0f}/s and >= 8 clients",
            at64,
            met,
            f"{at64:,.0f}/s (8 clients: {at8:,.0f}/s)" if at64 is not None and at8 else "",
        )
    for target in ("vgem", "memfd"):
        live = result["targets"].get(target, {}).get("live_buffers")
        growth = None
        shown = ""
        if live and len(live["levels"]) > 1:
            first, last = live["levels"][0], live["levels"][-1]
            growth = _ratio(last["primed"]["median_us"], first["primed"]["median_us"])
            kernel = _ratio(_median(last, "in_process"), _median(first, "in_process"))
            shown = (
                f"{growth:.2f}x ({last['live']:,}: {last['primed']['median_us']:.0f} us, "
                f"{first['live']:,}: {first['primed']['median_us']:.0f} us; "
                f"in-process ioctls alone {kernel:.2f}x)"
            )
        goal(
            f"Live buffers, most vs {live['levels'][0]['live'] if live else 10} ({target})",
            f"<= {LIVE_TARGET}x",
            growth,
            growth is not None and growth <= LIVE_TARGET,
            shown,
        )
    for target in ("memfd", "vgem"):
        data = result["targets"].get(target, {})
        per_buffer = data.get("live_buffers", {}).get("rss_per_buffer", {}).get("primed")
        goal(
            f"RSS per live buffer ({target})",
            f"<= {BYTES_PER_BUFFER} B",
            per_buffer,
            per_buffer is not None and per_buffer <= BYTES_PER_BUFFER,
            f"{per_buffer:,.0f} B" if per_buffer is not None else "",
        )
        per_client = data.get("idle_clients", {}).get("primed")
        goal(
            f"RSS per idle client ({target})",
            f"<= {BYTES_PER_CLIENT // 1024} KB",
            per_client,
            per_client is not None and per_client <= BYTES_PER_CLIENT,
            f"{per_client:,.0f} B" if per_client is not None else "",
        )
    big = _rt(result, "virtio_gpu", "3840x2160")
    ratio = _ratio(big["blocking"]["median_us"], big["in_process"]["median_us"]) if big else None
    goal(
        "virtio-gpu 3840x2160 round trip vs in-process ioctls",
        f"<= {BIG_TARGET}x",
        ratio,
        ratio is not None and ratio <= BIG_TARGET,
        f"{ratio:.2f}x ({big['blocking']['median_us'] / 1000:.1f} vs "
        f"{big['in_process']['median_us'] / 1000:.1f} ms)"
        if big and ratio is not None
        else "",
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


def _us(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value / 1000:.1f} ms" if value >= 10000 else f"{value:.0f} us"


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def sections(result: dict[str, Any]) -> list[tuple[str, Row, list[Row]]]:
    """Every table: a title, a header and rows of cells."""
    out: list[tuple[str, Row, list[Row]]] = []
    for name, data in result["targets"].items():
        rows: list[Row] = []
        for row in data["roundtrip"]:
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
        out.append(
            (
                f"{name}: one allocate + receive + import + release round trip (median / p99)",
                ["size", "in-process", "floor", "primed blocking", "ratio", "primed trio", "ratio"],
                rows,
            )
        )
        rows = []
        for row in data["throughput"]:
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
        live = data["live_buffers"]
        rows = []
        first = live["levels"][0]
        for row in live["levels"]:
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
    rows = [
        [
            g["name"],
            g["asked"],
            g["shown"],
            {True: "met", False: "NOT met", None: "-"}[g["met"]],
        ]
        for g in result["goals"]
    ]
    out.append(("targets", ["target", "asked", "measured", ""], rows))
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
        path = directory / f"throughput-{name}.svg"
        machine = machines.get(data.get("where", ""), "")
        path.write_text(chart(name, data, machine))
        yield path
