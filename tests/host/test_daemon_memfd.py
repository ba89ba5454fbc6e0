"""The daemon as a real process on the memfd backend, with real client processes.

No DRM device is needed: the daemon serves sealed memfds laid out like dumb
buffers. What these tests see is what the kernel does with the sockets, fds
and mappings; nothing is mocked.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest
import trio
import trio.testing

import primed
from primed import fdpass, formats
from primed.client.buffer import Buffer
from primed.errors import ErrorCode
from primed.wire import protocol
from primed.wire.schema import MAX_FDS, MAX_MESSAGE, MAX_RELEASE, VERSION, Backend, Opcode
from tests.support import (
    Daemon,
    StartDaemon,
    can_connect,
    count_fds,
    run_client,
    settled_fds,
    short_dir,
    spawn_client,
    start_daemon,
    wait_for_fds,
)

XR24 = formats.fourcc("XR24")
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def page_round(size: int) -> int:
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class Raw:
    """A client that speaks the wire format by hand, to send what primed's clients never would."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Raw:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sock.close()

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self.sock.sendmsg([data], fdpass.rights(list(fds)))

    def request(self, message: protocol.Request, serial: int) -> None:
        self.send(protocol.encode(message, serial))

    def receive(self) -> tuple[int, protocol.Message, list[int]]:
        data, fds = fdpass.recv(self.sock)
        assert data or fds, "the daemon closed the connection"
        serial, message = protocol.decode(data, len(fds), "reply")
        return serial, message, fds

    def error(self, serial: int) -> protocol.Error:
        got, message, fds = self.receive()
        assert not fds
        assert isinstance(message, protocol.Error), message
        assert got == serial, message
        return message

    def hello(self, serial: int = 1) -> protocol.Welcome:
        self.request(protocol.Hello(VERSION, VERSION, "raw"), serial)
        got, message, fds = self.receive()
        assert (got, fds) == (serial, [])
        assert isinstance(message, protocol.Welcome), message
        return message

    def allocates(self, serial: int) -> None:
        """One Allocate round trip works on this connection."""
        self.request(protocol.Allocate(16, 16, XR24), serial)
        got, message, fds = self.receive()
        fdpass.close_fds(fds)
        assert got == serial
        assert isinstance(message, protocol.Allocated), message
        assert len(fds) == 1

    def at_eof(self) -> bool:
        data, fds = fdpass.recv(self.sock)
        fdpass.close_fds(fds)
        return data == b"" and not fds


def works(client: primed.Client) -> None:
    """A well-behaved client can still allocate and release."""
    buf = client.allocate(32, 32, "XR24")
    assert client.release(buf) == 1


# --- the handshake and allocation ---------------------------------------------------------


def test_handshake(client: primed.Client) -> None:
    info = client.info
    assert info.backend == Backend.MEMFD
    assert info.version == VERSION
    assert info.driver == "memfd"
    assert info.node == ""
    assert info.limits == formats.Limits()


def check_memfd(buf: Buffer) -> None:
    """``buf.fd`` is a sealed memfd of ``buf.size`` bytes, received close-on-exec."""
    assert os.fstat(buf.fd).st_size == buf.size
    assert os.readlink(f"/proc/self/fd/{buf.fd}").startswith("/memfd:primed:")
    assert fcntl.fcntl(buf.fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    assert fcntl.fcntl(buf.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    with pytest.raises(PermissionError):
        os.ftruncate(buf.fd, buf.size // 2)


def test_allocate_one(client: primed.Client) -> None:
    buf = client.allocate(640, 480, "XRGB8888")
    with buf:
        assert (buf.id, buf.width, buf.height, buf.format) == (1, 640, 480, "XR24")
        assert (buf.fourcc, buf.modifier, buf.backend) == (XR24, 0, Backend.MEMFD)
        assert [(p.offset, p.pitch) for p in buf.planes] == [(0, 2560)]
        assert buf.size == 2560 * 480
        check_memfd(buf)


def test_allocate_three(client: primed.Client) -> None:
    bufs = client.allocate_many(64, 64, "NV12", 3)
    assert [b.id for b in bufs] == [1, 2, 3]
    assert len({os.fstat(b.fd).st_ino for b in bufs}) == 3, "three buffers, three memfds"
    assert client.release(*bufs) == 3
    assert all(b.closed for b in bufs)
    assert [b.id for b in client.allocate_many(64, 64, "NV12", 2)] == [4, 5]


def test_allocate_600_arrives_in_parts(shared: Daemon) -> None:
    total = 600
    with Raw(shared.socket) as raw:
        raw.hello()
        raw.request(protocol.Allocate(16, 16, XR24, total), 2)
        fds: list[int] = []
        try:
            parts = []
            while len(fds) < total:
                serial, message, got = raw.receive()
                fds += got
                assert serial == 2
                assert isinstance(message, protocol.Allocated)
                assert len(got) == len(message.buffers)
                parts.append((message.index, len(message.buffers), message.total))
                assert [b.id for b in message.buffers] == list(
                    range(message.index + 1, message.index + len(got) + 1)
                )
            assert parts == [(0, MAX_FDS, total), (MAX_FDS, MAX_FDS, total), (506, 94, total)]
            assert len({os.fstat(fd).st_ino for fd in fds}) == total
        finally:
            fdpass.close_fds(fds)


def test_allocate_600_with_the_client(client: primed.Client) -> None:
    bufs = client.allocate_many(16, 16, "XR24", 600)
    try:
        assert [b.id for b in bufs] == list(range(1, 601))
        assert len({os.fstat(b.fd).st_ino for b in bufs}) == 600
        assert client.release(*bufs) == 600
    finally:
        for b in bufs:
            b.close()


@pytest.mark.parametrize("code", sorted(f.code for f in formats.FORMATS.values()))
def test_every_format(client: primed.Client, code: str) -> None:
    fmt = formats.lookup(code)
    width, height = 66, 42
    with client.allocate(width, height, code) as buf:
        expected = formats.plan(fmt, width, height, client.info.limits)
        assert (buf.width, buf.height, buf.format, buf.fourcc) == (width, height, code, fmt.fourcc)
        assert [(p.offset, p.pitch) for p in buf.planes] == [
            (p.offset, p.pitch) for p in expected.planes
        ]
        assert buf.size == page_round(expected.size)
        check_memfd(buf)
        with buf.map() as pixels:
            pixels[0] = 0x11
            pixels[expected.size - 1] = 0x22
        with buf.map(write=False) as pixels:
            assert (pixels[0], pixels[expected.size - 1]) == (0x11, 0x22)
    assert client.release(buf.id) == 1


# --- pixels between processes -----------------------------------------------------------------

READ_THEN_WRITE = """
import hashlib, mmap, random, sys
fd, size, seed = map(int, sys.argv[1:4])
with mmap.mmap(fd, size) as pixels:
    print(hashlib.sha256(pixels).hexdigest())
    pixels[:] = random.Random(seed).randbytes(size)
"""

ALLOCATE_AND_SEND = """
import json, random, socket, sys
import primed
channel = socket.socket(fileno=int(sys.argv[2]))
with primed.connect(sys.argv[1]) as client:
    buf = client.allocate(320, 240, "NV12")
    with buf.map() as pixels:
        pixels[:] = random.Random(int(sys.argv[3])).randbytes(buf.size)
    socket.send_fds(channel, [json.dumps(buf.describe()).encode()], [buf.fd])
    client.release(buf)
channel.close()
"""


def test_pixels_through_an_inherited_fd(client: primed.Client) -> None:
    with client.allocate(320, 240, "XR24") as buf:
        pattern = random.Random(1).randbytes(buf.size)
        with buf.map() as pixels:
            pixels[:] = pattern
        seen = run_client(
            READ_THEN_WRITE, str(buf.fd), str(buf.size), "2", pass_fds=(buf.fd,)
        ).strip()
        assert seen == sha256(pattern)
        with buf.map(write=False) as pixels:
            assert bytes(pixels) == random.Random(2).randbytes(buf.size)


def test_pixels_through_scm_rights_outlive_the_sender(shared: Daemon) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        sender = spawn_client(
            ALLOCATE_AND_SEND, shared.socket, str(theirs.fileno()), "3", pass_fds=(theirs.fileno(),)
        )
        with sender:
            message, fds, _, _ = socket.recv_fds(ours, 4096, 1)
            _, errors = sender.communicate(timeout=30)
        assert sender.returncode == 0, errors
    assert len(fds) == 1
    fd = fds[0]
    try:
        described = json.loads(message)
        assert described["format"] == "NV12" and len(described["planes"]) == 2
        # The sender released the buffer and exited: only this fd holds the memory.
        with mmap.mmap(fd, described["size"]) as pixels:
            assert pixels[:] == random.Random(3).randbytes(described["size"])
    finally:
        os.close(fd)


def test_one_holders_file_flags_do_not_reach_another(shared: Daemon) -> None:
    # Every delivery of a memfd buffer (ALLOCATE, OPEN_SHARED) is its own open file
    # description: a holder that sets O_APPEND on its fd does not make the owner's
    # pwrite append past the sealed end (EPERM). The seals still bind both.
    with primed.connect(shared.socket) as owner, primed.connect(shared.socket) as holder:
        mine = owner.allocate(64, 64, "XR24")
        theirs = holder.open_shared(owner.share(mine))
        with mine, theirs:
            assert os.fstat(mine.fd).st_ino == os.fstat(theirs.fd).st_ino
            flags = fcntl.fcntl(theirs.fd, fcntl.F_GETFL)
            fcntl.fcntl(theirs.fd, fcntl.F_SETFL, flags | os.O_APPEND)
            assert not fcntl.fcntl(mine.fd, fcntl.F_GETFL) & os.O_APPEND
            assert os.pwrite(mine.fd, b"owner", 0) == 5
            assert os.pread(theirs.fd, 5, 0) == b"owner"
            for fd in (mine.fd, theirs.fd):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, mine.size * 2)
            again = holder.open_shared(owner.share(mine))
            with again:  # a second open of the same token's buffer: a description again
                assert not fcntl.fcntl(again.fd, fcntl.F_GETFL) & os.O_APPEND


# --- release --------------------------------------------------------------------------------


def test_release_keeps_fds_and_mappings_valid(client: primed.Client) -> None:
    buf = client.allocate(64, 64, "XR24")
    pattern = random.Random(4).randbytes(buf.size)
    with buf.map() as pixels:
        pixels[:] = pattern
        assert client.release(buf) == 1
        assert buf.closed
        assert bytes(pixels) == pattern
        pixels[0] ^= 0xFF
    kept = client.allocate(64, 64, "XR24")
    with kept:
        assert client.release(kept, close=False) == 1
        with kept.map() as pixels:
            pixels[:] = pattern
        with kept.map(write=False) as pixels:
            assert bytes(pixels) == pattern
        with pytest.raises(primed.ServerError) as again:
            client.release(kept)
        assert again.value.code == ErrorCode.UNKNOWN_BUFFER
        assert not kept.closed


@pytest.mark.parametrize("bad", [[999], [1, 999], [1, 1], [0]], ids=str)
def test_release_of_unknown_ids_releases_nothing(client: primed.Client, bad: list[int]) -> None:
    bufs = client.allocate_many(16, 16, "XR24", 2)
    assert [b.id for b in bufs] == [1, 2]
    with pytest.raises(primed.ServerError) as refused:
        client.release(*bad)
    assert refused.value.code == ErrorCode.UNKNOWN_BUFFER
    assert client.release(*bufs) == 2  # both were still there


def test_ids_belong_to_their_client(shared: Daemon, client: primed.Client) -> None:
    mine = client.allocate(16, 16, "XR24")
    with primed.connect(shared.socket) as other:
        with pytest.raises(primed.ServerError) as refused:
            other.release(mine.id)
        assert refused.value.code == ErrorCode.UNKNOWN_BUFFER
        assert other.allocate(16, 16, "XR24").id == 1
    assert client.release(mine) == 1


# --- errors a client can cause with well-formed requests -------------------------------------

ERRORS = [
    ("unsupported fourcc", 64, 64, formats.fourcc("ZZZZ"), 1, ErrorCode.UNSUPPORTED_FORMAT),
    ("fourcc 0", 64, 64, 0, 1, ErrorCode.UNSUPPORTED_FORMAT),
    ("0x0", 0, 0, XR24, 1, ErrorCode.INVALID_ARGUMENT),
    ("zero width", 0, 64, XR24, 1, ErrorCode.INVALID_ARGUMENT),
    ("odd NV12", 63, 64, formats.fourcc("NV12"), 1, ErrorCode.INVALID_ARGUMENT),
    ("odd YU12 height", 64, 63, formats.fourcc("YU12"), 1, ErrorCode.INVALID_ARGUMENT),
    ("too wide", 16385, 16, XR24, 1, ErrorCode.LIMIT_EXCEEDED),
    ("too high", 16, 16385, XR24, 1, ErrorCode.LIMIT_EXCEEDED),
    ("huge", 0xFFFFFFFF, 0xFFFFFFFF, XR24, 1, ErrorCode.LIMIT_EXCEEDED),
    ("count 0", 64, 64, XR24, 0, ErrorCode.INVALID_ARGUMENT),
    ("count over max_count", 64, 64, XR24, 1025, ErrorCode.LIMIT_EXCEEDED),
    ("count 2**32-1", 64, 64, XR24, 0xFFFFFFFF, ErrorCode.LIMIT_EXCEEDED),
]


@pytest.mark.parametrize(
    ("width", "height", "fourcc", "count", "code"),
    [e[1:] for e in ERRORS],
    ids=[e[0] for e in ERRORS],
)
def test_request_errors(
    client: primed.Client, width: int, height: int, fourcc: int, count: int, code: ErrorCode
) -> None:
    with pytest.raises(primed.ServerError) as refused:
        client.allocate_many(width, height, fourcc, count)
    assert refused.value.code == code
    assert refused.value.errno == 0
    assert refused.value.text
    # Nothing was allocated: the next buffer still gets the first id.
    assert client.allocate(16, 16, "XR24").id == 1


def test_unknown_format_text_is_refused_locally(client: primed.Client) -> None:
    with pytest.raises(ValueError, match="unsupported format"):
        client.allocate(64, 64, "ZZZZ")
    works(client)


def test_unknown_flags(shared: Daemon) -> None:
    with Raw(shared.socket) as raw:
        raw.hello()
        raw.request(protocol.Allocate(16, 16, XR24, 1, flags=1), 2)
        assert raw.error(2).code == ErrorCode.INVALID_ARGUMENT
        raw.allocates(3)


def test_configured_limits(spawn: StartDaemon) -> None:
    daemon = spawn(
        "--max-width", "256", "--max-height", "128", "--max-size", "65536", "--max-count", "4"
    )
    with primed.connect(daemon.socket) as client:
        assert client.info.limits == formats.Limits(256, 128, 65536, 4)
        assert client.allocate(128, 128, "XR24").size == 65536
        assert len(client.allocate_many(16, 16, "XR24", 4)) == 4
        for width, height, count in ((257, 1, 1), (1, 129, 1), (129, 128, 1), (16, 16, 5)):
            with pytest.raises(primed.ServerError) as refused:
                client.allocate_many(width, height, "XR24", count)
            assert refused.value.code == ErrorCode.LIMIT_EXCEEDED, (width, height, count)
        assert client.allocate(16, 16, "XR24").id == 6


def test_a_low_fd_limit_is_met_by_the_bound_and_nothing_is_kept(
    spawn: StartDaemon, tmp_path: Path
) -> None:
    # Under a low RLIMIT_NOFILE (64) one client asks for ever more buffers, the per-client
    # and per-uid quotas switched off: the daemon-wide bound (cut from the fd limit)
    # answers before the daemon runs out of fds, or, where the copies sent take the last
    # fds, the kernel's EMFILE travels back as KERNEL. Either way the daemon keeps none
    # of the buffers it had made for the request, and goes on serving.
    config = tmp_path / "primed.toml"
    config.write_text("[quotas]\nbuffers_per_client = 0\nbuffers_per_uid = 0\n")
    daemon = spawn("--config", str(config), nofile=64)
    with primed.connect(daemon.socket) as client:
        works(client)
        connected = settled_fds(daemon.pid)
        refused = set()
        for count in range(1, 64):
            try:
                bufs = client.allocate_many(16, 16, "XR24", count)
            except primed.ServerError as e:
                if e.code == ErrorCode.KERNEL:
                    assert e.errno == errno.EMFILE, e
                    refused.add(e.text.partition(":")[0])
                else:
                    assert e.code == ErrorCode.QUOTA_EXCEEDED, e
                    assert e.text.startswith("bound: 16 buffers daemon-wide"), e
                    refused.add("bound")
            else:
                assert len(bufs) == count
                client.release(*bufs)
            wait_for_fds(daemon.pid, connected)
        assert "bound" in refused and "memfd_create" not in refused, refused
        works(client)


# --- malformed datagrams ------------------------------------------------------------------

HEADER = struct.Struct("<HHII")  # opcode, nfds, size, serial
ALLOC = protocol.encode(protocol.Allocate(16, 16, XR24), 7)


def header(opcode: int, nfds: int, size: int, serial: int) -> bytes:
    return HEADER.pack(opcode, nfds, size, serial)


def resized(datagram: bytes, body: bytes) -> bytes:
    opcode, nfds, _, serial = HEADER.unpack_from(datagram)
    return header(opcode, nfds, len(body), serial) + body


ALLOC_BODY = ALLOC[HEADER.size :]
RELEASE_HEAD = struct.Struct("<II")
HELLO_HEAD = struct.Struct("<HHIHH")

# name: (datagram, Error code or None for no reply, its serial, whether the connection closes)
MALFORMED: dict[str, tuple[bytes, ErrorCode | None, int, bool]] = {
    "empty datagram": (b"", None, 0, True),
    "short header": (ALLOC[:6], ErrorCode.BAD_MESSAGE, 0, True),
    "header without its body": (ALLOC[: HEADER.size], ErrorCode.BAD_MESSAGE, 7, True),
    "size field too large": (
        header(Opcode.ALLOCATE, 0, len(ALLOC_BODY) + 1, 7) + ALLOC_BODY,
        ErrorCode.BAD_MESSAGE,
        7,
        True,
    ),
    "size field too small": (
        header(Opcode.ALLOCATE, 0, len(ALLOC_BODY) - 1, 7) + ALLOC_BODY,
        ErrorCode.BAD_MESSAGE,
        7,
        True,
    ),
    "trailing bytes": (resized(ALLOC, ALLOC_BODY + b"\0" * 4), ErrorCode.BAD_MESSAGE, 7, True),
    "short body": (resized(ALLOC, ALLOC_BODY[:-4]), ErrorCode.BAD_MESSAGE, 7, True),
    "fd count without fds": (
        header(Opcode.ALLOCATE, 1, len(ALLOC_BODY), 7) + ALLOC_BODY,
        ErrorCode.BAD_MESSAGE,
        7,
        True,
    ),
    "longer than any message": (
        header(Opcode.ALLOCATE, 0, MAX_MESSAGE, 7) + bytes(MAX_MESSAGE),
        ErrorCode.BAD_MESSAGE,
        0,
        True,
    ),
    "reserved field set": (
        header(Opcode.RELEASE, 0, 16, 8) + RELEASE_HEAD.pack(1, 1) + struct.pack("<Q", 1),
        ErrorCode.BAD_MESSAGE,
        8,
        True,
    ),
    "release count beyond its body": (
        header(Opcode.RELEASE, 0, 16, 8) + RELEASE_HEAD.pack(5, 0) + struct.pack("<Q", 1),
        ErrorCode.BAD_MESSAGE,
        8,
        True,
    ),
    "release count over the maximum": (
        header(Opcode.RELEASE, 0, 8, 8) + RELEASE_HEAD.pack(MAX_RELEASE + 1, 0),
        ErrorCode.BAD_MESSAGE,
        8,
        True,
    ),
    "name that is not UTF-8": (
        header(Opcode.HELLO, 0, 12, 9) + HELLO_HEAD.pack(1, 1, 0, 2, 0) + b"\xff\xfe",
        ErrorCode.BAD_MESSAGE,
        9,
        True,
    ),
    "name longer than its body": (
        header(Opcode.HELLO, 0, 13, 9) + HELLO_HEAD.pack(1, 1, 0, 10, 0) + b"abc",
        ErrorCode.BAD_MESSAGE,
        9,
        True,
    ),
    "unknown opcode": (header(0x0777, 0, 4, 10) + b"abcd", ErrorCode.UNKNOWN_OPCODE, 10, False),
    "unknown opcode, no body": (header(0x7FFF, 0, 0, 11), ErrorCode.UNKNOWN_OPCODE, 11, False),
    "a reply's opcode": (
        protocol.encode(protocol.Released(1), 12),
        ErrorCode.UNKNOWN_OPCODE,
        12,
        False,
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_datagram(shared: Daemon, client: primed.Client, case: str) -> None:
    datagram, code, serial, closes = MALFORMED[case]
    with Raw(shared.socket) as raw:
        raw.hello()
        raw.send(datagram)
        if code is not None:
            error = raw.error(serial)
            assert error.code == code, error.text
            assert error.text
        if closes:
            assert raw.at_eof()
        else:
            raw.allocates(20)
    assert shared.process.poll() is None
    works(client)


def test_unknown_opcode_before_hello(shared: Daemon) -> None:
    with Raw(shared.socket) as raw:
        raw.send(header(0x0777, 0, 0, 5))
        assert raw.error(5).code == ErrorCode.UNKNOWN_OPCODE
        raw.hello(6)
        raw.allocates(7)


def passrights_supported() -> bool:
    """Whether this kernel has SO_PASSRIGHTS (Linux 6.16+)."""
    one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with one, two:
        return fdpass.refuse_rights(one)


@pytest.mark.parametrize("declared", [0, 1], ids=["undeclared fd", "declared fd"])
def test_request_with_an_fd_attached(shared: Daemon, client: primed.Client, declared: int) -> None:
    read_end, write_end = os.pipe()
    try:
        with Raw(shared.socket) as raw:
            raw.hello()
            datagram = header(Opcode.ALLOCATE, declared, len(ALLOC_BODY), 7) + ALLOC_BODY
            if passrights_supported():
                # The daemon's sockets refuse fds: the kernel fails the send itself.
                with pytest.raises(PermissionError):
                    raw.send(datagram, [write_end])
                raw.allocates(8)
            else:
                raw.send(datagram, [write_end])
                assert raw.error(7).code == ErrorCode.BAD_MESSAGE
                assert raw.at_eof()
        os.close(write_end)
        write_end = -1
        # No copy of the write end is left open in the daemon: the pipe reads end-of-file.
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""
    finally:
        fdpass.close_fds([fd for fd in (read_end, write_end) if fd >= 0])
    works(client)


@pytest.mark.parametrize(
    "request_",
    [protocol.Allocate(16, 16, XR24), protocol.Release((1,))],
    ids=["allocate", "release"],
)
def test_request_before_hello(shared: Daemon, request_: protocol.Request) -> None:
    with Raw(shared.socket) as raw:
        raw.request(request_, 5)
        assert raw.error(5).code == ErrorCode.BAD_STATE
        assert raw.at_eof()


def test_second_hello(shared: Daemon) -> None:
    with Raw(shared.socket) as raw:
        raw.hello(1)
        raw.request(protocol.Hello(VERSION, VERSION, "again"), 2)
        assert raw.error(2).code == ErrorCode.BAD_STATE
        raw.allocates(3)


def test_version_negotiation(shared: Daemon) -> None:
    with Raw(shared.socket) as raw:
        raw.request(protocol.Hello(VERSION + 1, VERSION + 5, "future"), 1)
        assert raw.error(1).code == ErrorCode.UNSUPPORTED_VERSION
        raw.request(protocol.Hello(0, 0, "past"), 2)
        assert raw.error(2).code == ErrorCode.UNSUPPORTED_VERSION
        raw.request(protocol.Hello(1, VERSION + 5, "wide"), 3)
        _, welcome, _ = raw.receive()
        assert isinstance(welcome, protocol.Welcome)
        assert welcome.version == VERSION
        raw.allocates(4)


# --- the daemon's own fds ----------------------------------------------------------------------

KEEP_BUFFERS = """
import sys
import primed
client = primed.connect(sys.argv[1])
buffers = client.allocate_many(64, 64, "XR24", int(sys.argv[2]))
print(len(buffers), flush=True)
if sys.argv[3] == "wait":
    sys.stdin.read()
"""

ASK_AND_WAIT = """
import socket, sys
from primed import formats
from primed.wire import protocol
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect(sys.argv[1])
sock.send(protocol.encode(protocol.Hello(name="never reads"), 1))
sock.send(protocol.encode(protocol.Allocate(16, 16, formats.fourcc("XR24"), 600), 2))
print("asked", flush=True)
sys.stdin.read()
"""

HELD = 40


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    """A daemon only these tests use, and its fd count with no client connected."""
    directory, made = short_dir(tmp_path_factory.mktemp("quiet"))
    daemon = start_daemon(directory / "primed.sock", "--backend", "memfd")
    try:
        with primed.connect(daemon.socket) as warm:
            works(warm)
        yield daemon, settled_fds(daemon.pid)
    finally:
        daemon.stop()
        if made:
            shutil.rmtree(directory, ignore_errors=True)


def test_fds_released_buffers(quiet: tuple[Daemon, int]) -> None:
    daemon, baseline = quiet
    wait_for_fds(daemon.pid, baseline)
    with primed.connect(daemon.socket) as client:
        bufs = client.allocate_many(64, 64, "XR24", HELD)
        # One memfd per buffer and the connection: the exported copies are closed.
        wait_for_fds(daemon.pid, baseline + 1 + HELD)
        client.release(*bufs)
        wait_for_fds(daemon.pid, baseline + 1)
    wait_for_fds(daemon.pid, baseline)


def test_fds_disconnect_without_release(quiet: tuple[Daemon, int]) -> None:
    daemon, baseline = quiet
    wait_for_fds(daemon.pid, baseline)
    client = primed.connect(daemon.socket)
    bufs = client.allocate_many(64, 64, "XR24", HELD)
    wait_for_fds(daemon.pid, baseline + 1 + HELD)
    client.close()
    wait_for_fds(daemon.pid, baseline)
    for b in bufs:  # ours stay valid
        with b.map(write=False) as pixels:
            assert len(pixels) == b.size
        b.close()


@pytest.mark.parametrize("how", ["exit", "SIGKILL"])
def test_fds_client_process_goes_away(quiet: tuple[Daemon, int], how: str) -> None:
    daemon, baseline = quiet
    wait_for_fds(daemon.pid, baseline)
    mode = "wait" if how == "SIGKILL" else "exit"
    with spawn_client(KEEP_BUFFERS, daemon.socket, str(HELD), mode) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == str(HELD)
        if how == "SIGKILL":
            assert count_fds(daemon.pid) >= baseline + 1 + HELD
            holder.kill()
        holder.wait(30)
    wait_for_fds(daemon.pid, baseline)


def test_fds_client_killed_with_replies_unread(quiet: tuple[Daemon, int]) -> None:
    daemon, baseline = quiet
    wait_for_fds(daemon.pid, baseline)
    with spawn_client(ASK_AND_WAIT, daemon.socket) as asker:
        assert asker.stdout is not None
        assert asker.stdout.readline().strip() == "asked"
        wait_for_fds(daemon.pid, baseline + 1 + 600)
        asker.send_signal(signal.SIGKILL)
        asker.wait(30)
    wait_for_fds(daemon.pid, baseline)


def test_fds_after_abuse(quiet: tuple[Daemon, int]) -> None:
    daemon, baseline = quiet
    wait_for_fds(daemon.pid, baseline)
    for datagram, _, _, _ in MALFORMED.values():
        with Raw(daemon.socket) as raw:
            raw.hello()
            raw.request(protocol.Allocate(16, 16, XR24, 3), 2)
            for _ in range(3):  # the reply may come in one part, but read it all
                _, message, fds = raw.receive()
                fdpass.close_fds(fds)
                assert isinstance(message, protocol.Allocated)
                if message.index + len(message.buffers) == message.total:
                    break
            raw.send(datagram)
    wait_for_fds(daemon.pid, baseline)


async def test_trio_cancelled_allocate_gives_its_buffers_back(quiet: tuple[Daemon, int]) -> None:
    daemon, baseline = quiet
    wait_for_fds(daemon.pid, baseline)
    async with primed.connect_async(daemon.socket) as client:
        cancelled = 0
        for _ in range(50):
            got: list[Buffer] = []
            scope = trio.CancelScope()

            async def allocate(scope: trio.CancelScope = scope, got: list[Buffer] = got) -> None:
                with scope:
                    got.extend(await client.allocate_many(16, 16, "XR24", HELD))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(allocate)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
            if scope.cancelled_caught:
                cancelled += 1
                if cancelled == 3:
                    break
            else:
                await client.release(*got)
        assert cancelled, "no allocate was ever cancelled in flight"
        # Replies come in order: once this one is back, every abandoned reply
        # before it was given back.
        await client.release(await client.allocate(16, 16, "XR24"))
        assert count_fds(daemon.pid) == baseline + 1
    wait_for_fds(daemon.pid, baseline)


# --- the trio client ---------------------------------------------------------------------------


async def test_trio_tasks_share_one_connection(shared: Daemon) -> None:
    async with primed.connect_async(shared.socket, name="trio") as client:
        assert client.info.backend == Backend.MEMFD
        held: dict[int, list[Buffer]] = {}

        async def worker(n: int) -> None:
            mine = []
            for i in range(4):
                width, height = 16 * (n + 1), 8 * (i + 1)
                buf = await client.allocate(width, height, "XR24")
                assert (buf.width, buf.height) == (width, height)
                mine.append(buf)
            group = await client.allocate_many(32, 32, "NV12", n + 1)
            assert len(group) == n + 1 and all(b.format == "NV12" for b in group)
            mine += group
            held[n] = mine

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(worker, n)
        ids = sorted(b.id for bufs in held.values() for b in bufs)
        assert ids == list(range(1, len(ids) + 1))
        assert len({os.fstat(b.fd).st_ino for bufs in held.values() for b in bufs}) == len(ids)

        released: list[int] = []

        async def give_back(bufs: list[Buffer]) -> None:
            released.append(await client.release(*bufs))

        async with trio.open_nursery() as nursery:
            for bufs in held.values():
                nursery.start_soon(give_back, bufs)
        assert sum(released) == len(ids)
        with pytest.raises(primed.ServerError) as refused:
            await client.release(ids[0])
        assert refused.value.code == ErrorCode.UNKNOWN_BUFFER


async def test_trio_errors_reach_the_right_task(shared: Daemon) -> None:
    async with primed.connect_async(shared.socket) as client:
        outcomes: dict[str, object] = {}

        async def good() -> None:
            outcomes["good"] = (await client.allocate(64, 64, "XR24")).width

        async def bad() -> None:
            try:
                await client.allocate(0, 0, "XR24")
            except primed.ServerError as e:
                outcomes["bad"] = e.code

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(bad)
                nursery.start_soon(good)
        assert outcomes == {"good": 64, "bad": ErrorCode.INVALID_ARGUMENT}


async def test_trio_connect_names_the_missing_socket(sock_dir: Path) -> None:
    missing = str(sock_dir / "nobody.sock")
    with pytest.raises(FileNotFoundError, match=r"nobody\.sock"):
        async with primed.connect_async(missing):
            pass  # pragma: no cover


def test_blocking_connect_names_the_missing_socket(sock_dir: Path) -> None:
    missing = str(sock_dir / "nobody.sock")
    with pytest.raises(FileNotFoundError, match=r"nobody\.sock"):
        primed.connect(missing)


# --- the daemon's life ------------------------------------------------------------------------


def test_blocking_client_sees_connection_lost(spawn: StartDaemon) -> None:
    daemon = spawn()
    client = primed.connect(daemon.socket)
    try:
        buf = client.allocate(64, 64, "XR24")
        daemon.stop()
        with pytest.raises(primed.ConnectionLost):
            client.allocate(64, 64, "XR24")
        with buf, buf.map() as pixels:  # the buffer outlives the daemon
            pixels[0] = 1
    finally:
        client.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_daemon_with_clients_connected(
    spawn: StartDaemon, signum: signal.Signals
) -> None:
    daemon = spawn()
    with (
        primed.connect(daemon.socket) as holder,
        Raw(daemon.socket) as silent,
        spawn_client(KEEP_BUFFERS, daemon.socket, "3", "wait") as other,
    ):
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "3"
        bufs = holder.allocate_many(32, 32, "XR24", 3)
        log = daemon.stop(signum)  # exit 0, socket removed
        assert f"{signum.name}: stopping" in log
        assert silent.at_eof()
        for b in bufs:
            with b, b.map() as pixels:
                pixels[-1] = 1
        other.kill()
        other.wait(30)
    assert not can_connect(daemon.socket)


def test_second_daemon_on_a_live_socket_refuses(spawn: StartDaemon) -> None:
    first = spawn()
    done = subprocess.run(
        [sys.executable, "-m", "primed", "serve", "--backend", "memfd", "--socket", first.socket],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done.stderr
    assert "already listens" in done.stderr
    # The loser left the winner's socket alone.
    with primed.connect(first.socket) as client:
        works(client)


def test_stale_socket_is_replaced(spawn: StartDaemon) -> None:
    crashed = spawn()
    crashed.kill()  # no chance to clean up
    assert os.path.exists(crashed.socket) and not can_connect(crashed.socket)
    again = spawn()
    assert again.socket == crashed.socket
    with primed.connect(again.socket) as client:
        works(client)


def test_a_file_that_is_not_a_socket_is_left_alone(sock_dir: Path) -> None:
    path = sock_dir / "not-a-socket"
    path.write_text("precious")
    done = subprocess.run(
        [sys.executable, "-m", "primed", "serve", "--backend", "memfd", "--socket", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "not a socket" in done.stderr
    assert path.read_text() == "precious"


async def test_trio_client_lets_the_callers_exception_through(shared: Daemon) -> None:
    with pytest.raises(KeyError, match="mine"):
        async with primed.connect_async(shared.socket) as client:
            await client.allocate(16, 16)
            raise KeyError("mine")
