"""primed list, stats and dump on a live memfd daemon, and who may see what."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

import primed
from primed import formats
from primed.cli import png
from primed.errors import ErrorCode
from primed.wire.schema import Opcode
from tests.host.conftest import StartDaemon
from tests.support import Daemon, client_command, start_daemon

NOBODY = 65534

# Becomes uid NOBODY before it connects (SO_PEERCRED is taken at connect time),
# then prints what it may list, and what open_buffer(1, 1) says.
AS_NOBODY = """
import json, os, sys, primed
os.setgroups([])
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
with primed.connect(sys.argv[1]) as client:
    mine = client.allocate(16, 16)
    seen = {
        "clients": [c.uid for c in client.clients()],
        "buffers": [(b.client, b.id) for b in client.buffers()],
    }
    try:
        client.open_buffer(1, 1).close()
        seen["open"] = "opened"
    except primed.ServerError as e:
        seen["open"] = e.code.name
    print(json.dumps(seen))
"""


def read_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, channels, rows) of a PNG written by primed.cli.png (filter 0, 8-bit)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        at += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3, 6: 4}[colour]
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + width * channels
    rows = [raw[y * stride + 1 : (y + 1) * stride] for y in range(height)]
    assert depth == 8 and all(raw[y * stride] == 0 for y in range(height))
    return width, height, channels, rows


def run_as_nobody(daemon: Daemon) -> dict[str, object]:
    done = subprocess.run(
        client_command(AS_NOBODY, daemon.socket, str(NOBODY)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.fixture
def open_daemon() -> Iterator[Daemon]:
    """A daemon whose socket every uid can reach."""
    directory = tempfile.mkdtemp(prefix="primed-", dir="/tmp")
    os.chmod(directory, 0o755)
    daemon = start_daemon(
        Path(directory) / "open.sock", "--backend", "memfd", "--socket-mode", "666"
    )
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_root_lists_everyone_others_only_themselves(open_daemon: Daemon) -> None:
    assert os.getuid() == 0, "this test needs root, to run a client as another uid"
    with primed.connect(open_daemon.socket, name="first") as first:
        (me,) = first.clients()  # root sees everyone; right now that is just us
        bufs = first.allocate_many(32, 16, "NV12", 2)
        first.share(bufs[1])
        first.share(bufs[1])
        seen = run_as_nobody(open_daemon)
        # Nobody sees itself and its own buffer only, and may not open ours.
        assert seen["clients"] == [NOBODY] and seen["open"] == "PERMISSION_DENIED"
        theirs = cast(list[list[int]], seen["buffers"])
        assert len(theirs) == 1 and theirs[0][1] == 1 and theirs[0][0] > me.number
        with primed.connect(open_daemon.socket, name="second") as second:
            clients = second.clients()
            assert [(c.name, c.buffers) for c in clients] == [("first", 2), ("second", 0)]
            assert clients[0].pid == os.getpid() and clients[0].held_bytes == 2 * bufs[0].size
            listed = second.buffers()
            assert [(b.client, b.id, b.tokens) for b in listed] == [
                (me.number, 1, 0),
                (me.number, 2, 2),
            ]
            assert listed[0].fourcc == formats.fourcc("NV12") and listed[0].size == bufs[0].size
            with second.open_buffer(me.number, 2) as opened:
                assert opened.id == 0 and opened.format == "NV12"
            with pytest.raises(primed.ServerError) as missing:
                second.open_buffer(me.number, 99)
            assert missing.value.code == ErrorCode.UNKNOWN_BUFFER


def test_listing_pages_through_many_buffers(shared: Daemon) -> None:
    with primed.connect(shared.socket) as client:
        client.allocate_many(16, 16, "XR24", 1000)
        # Several pages (the daemon sends at most 256 buffers a page), every buffer once.
        mine = [b for b in client.buffers() if b.id <= 1000]
        assert sorted(b.id for b in mine if b.client == mine[0].client)[-1000:] == list(
            range(1, 1001)
        )


def test_stats_count_requests_errors_and_events(spawn: StartDaemon) -> None:
    daemon = spawn()
    with primed.connect(daemon.socket) as client:
        client.allocate_many(16, 16, "XR24", 3)
        for _ in range(2):
            with pytest.raises(primed.ServerError):
                client.release(77)
        stats = client.stats()
    counters = {(kind, key): count for kind, key, count in stats.counters}
    assert counters[(1, Opcode.HELLO)] == 1
    assert counters[(1, Opcode.ALLOCATE)] == 1
    assert counters[(1, Opcode.RELEASE)] == 2
    assert counters[(2, ErrorCode.UNKNOWN_BUFFER)] == 2
    assert counters[(3, 1)] == 0 and counters[(3, 2)] == 0
    assert (stats.clients, stats.buffers, stats.tokens) == (1, 3, 0)
    assert stats.uptime_ms > 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "primed", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_list_and_stats(shared: Daemon) -> None:
    with primed.connect(shared.socket, name="holder") as client:
        client.allocate(64, 32, "YU12")
        listed = _cli("list", "--json", "--socket", shared.socket)
        assert listed.returncode == 0, listed.stderr
        found = json.loads(listed.stdout)
        holder = next(c for c in found["clients"] if c["name"] == "holder")
        assert any(
            b["client"] == holder["number"] and b["format"] == "YU12" for b in found["buffers"]
        )
        table = _cli("list", "--socket", shared.socket)
        assert "holder" in table.stdout and "YU12" in table.stdout
        stats = _cli("stats", "--json", "--socket", shared.socket)
        assert stats.returncode == 0, stats.stderr
        summary = json.loads(stats.stdout)
        assert summary["requests"]["ALLOCATE"] >= 1 and summary["clients"] >= 2


@pytest.mark.parametrize("code", ["XR24", "AR24", "XB24", "RG24", "BG24", "RG16", "R8"])
def test_dump_writes_the_pixels_as_png(shared: Daemon, tmp_path: Path, code: str) -> None:
    fmt = formats.lookup(code)
    with primed.connect(shared.socket) as client:
        buf = client.allocate(8, 4, code)
        pitch = buf.planes[0].pitch
        with buf.map() as pixels:
            for y in range(4):
                for x in range(8):
                    at = y * pitch + x * fmt.cpp[0]
                    pixels[at : at + fmt.cpp[0]] = bytes((x * 16 + y, 200 - x, 17 * y, 255))[
                        : fmt.cpp[0]
                    ]
        out = tmp_path / "dump.png"
        done = _cli("dump", client.share(buf), "--png", str(out), "--socket", shared.socket)
        assert done.returncode == 0, done.stderr
        width, height, channels, rows = read_png(out.read_bytes())
        assert (width, height) == (8, 4)
        with buf.map(write=False) as pixels:
            for y in range(4):
                for x in range(8):
                    at = y * pitch + x * fmt.cpp[0]
                    got = rows[y][x * channels : (x + 1) * channels]
                    assert got == expected_rgb(code, bytes(pixels[at : at + fmt.cpp[0]])), (x, y)


def expected_rgb(code: str, px: bytes) -> bytes:
    """What a pixel of ``code`` (its bytes in memory, little-endian DRM) looks like in RGB(A)."""
    if code in ("RG16", "BG16"):
        (value,) = struct.unpack("<H", px)
        hi, mid, lo = value >> 11, value >> 5 & 63, value & 31
        r, b = (hi, lo) if code == "RG16" else (lo, hi)
        return bytes((r << 3 | r >> 2, mid << 2 | mid >> 4, b << 3 | b >> 2))
    order = {"XR24": (2, 1, 0), "AR24": (2, 1, 0, 3), "XB24": (0, 1, 2), "RG24": (2, 1, 0),
             "BG24": (0, 1, 2), "R8": (0,)}[code]  # fmt: skip
    return bytes(px[i] for i in order)


def test_nv12_dump_converts_colours(shared: Daemon) -> None:
    with primed.connect(shared.socket) as client, client.allocate(4, 2, "NV12") as buf:
        (_, y_pitch), (uv_offset, uv_pitch) = ((p.offset, p.pitch) for p in buf.planes)
        with buf.map() as pixels:
            pixels[0:4] = bytes((16, 235, 81, 41))  # black, white, red's and blue's luma
            pixels[y_pitch : y_pitch + 4] = bytes((16, 235, 81, 41))
            pixels[uv_offset : uv_offset + 4] = bytes((128, 128, 90, 240))  # grey; red's UV
        with buf.map(write=False) as pixels:
            image = png.from_pixels(pixels, 4, 2, buf.fourcc, ((0, y_pitch), (uv_offset, uv_pitch)))
    _, _, _, rows = read_png(image)
    black, white, red = rows[0][0:3], rows[0][3:6], rows[0][6:9]
    assert black == b"\0\0\0" and white == b"\xff\xff\xff"
    assert red[0] > 200 and red[1] < 40 and red[2] < 40, red


def test_dump_refuses_a_format_it_cannot_draw(shared: Daemon, tmp_path: Path) -> None:
    with primed.connect(shared.socket) as client:
        buf = client.allocate(8, 8, "P010")
        done = _cli(
            "dump", client.share(buf), "--png", str(tmp_path / "x.png"), "--socket", shared.socket
        )
        assert done.returncode == 1 and "can't draw P010" in done.stderr


def _dump_cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "primed", "dump", *args],
        input=stdin,
        env={**{k: v for k, v in os.environ.items() if k != "PRIMED_TOKEN"}, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("way", ["stdin", "file", "env", "argv"])
def test_dump_takes_the_token_off_the_command_line(
    shared: Daemon, tmp_path: Path, way: str
) -> None:
    out = tmp_path / "dump.png"
    with primed.connect(shared.socket) as client, client.allocate(4, 2) as buf:
        token = client.share(buf)
        common = ("--png", str(out), "--socket", shared.socket)
        secret = tmp_path / "token"
        secret.write_text(token + "\n")
        done = {
            "stdin": lambda: _dump_cli("-", *common, stdin=token + "\n"),
            "file": lambda: _dump_cli("--token-file", str(secret), *common),
            "env": lambda: _dump_cli(*common, env={"PRIMED_TOKEN": token}),
            "argv": lambda: _dump_cli(token, *common),
        }[way]()
        assert done.returncode == 0, done.stderr
        assert read_png(out.read_bytes())[:2] == (4, 2)
        warned = "can be read by every user" in done.stderr
        assert warned == (way == "argv"), done.stderr


def test_dump_by_client_and_id_needs_no_token(shared: Daemon, tmp_path: Path) -> None:
    with primed.connect(shared.socket, name="owner") as client, client.allocate(4, 2) as buf:
        number = next(c.number for c in client.clients() if c.name == "owner")
        out = tmp_path / "dump.png"
        done = _dump_cli(f"{number}:{buf.id}", "--png", str(out), "--socket", shared.socket)
        assert done.returncode == 0 and done.stderr == "", done.stderr


def test_dump_wants_the_token_from_exactly_one_place(shared: Daemon, tmp_path: Path) -> None:
    common = ("--png", str(tmp_path / "x.png"), "--socket", shared.socket)
    (tmp_path / "token").write_text("00" * 16)
    nothing = _dump_cli(*common)
    assert nothing.returncode == 1 and "no buffer given" in nothing.stderr
    twice = _dump_cli("-", "--token-file", str(tmp_path / "token"), *common, stdin="00" * 16)
    assert twice.returncode == 1 and "give the token once" in twice.stderr
