"""Passing fds with SCM_RIGHTS, and the hygiene that goes with it.

Shared by the daemon and both clients, so the rules live in one place:
receive with MSG_CMSG_CLOEXEC; every fd that arrived is the receiver's to close
on every path; a truncated datagram or truncated ancillary data (MSG_TRUNC,
MSG_CTRUNC: fds dropped by RLIMIT_NOFILE or an LSM) makes the whole message bad,
and the fds that did arrive are closed before the error is raised.
"""

from __future__ import annotations

import array
import os
import resource
import socket
import sys
from collections.abc import Iterable
from typing import Any

from primed.errors import RemoteProtocolError
from primed.wire.schema import MAX_FDS, MAX_MESSAGE

#: Ancillary buffer big enough for the most fds one message may carry.
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
#: Receive flags: fds arrive close-on-exec, so no child inherits them by accident.
RECV_FLAGS = socket.MSG_CMSG_CLOEXEC
# Plain ints: combining socket.MsgFlag members costs microseconds on every receive.
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)
_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_FD_SIZE = array.array("i").itemsize
_ORDER = sys.byteorder
# SO_PASSRIGHTS (Linux 6.16): 0 makes the kernel refuse fds sent to this socket.
SO_PASSRIGHTS = 83


class Truncated(RemoteProtocolError):
    """The datagram or its fds did not arrive whole; the fds that did arrive were closed.

    ``datagram`` is the datagram's bytes when only its fds were cut off (MSG_CTRUNC:
    the bytes are whole), else None. :func:`recv` and :func:`recv_async` set it.
    """

    datagram: bytes | None = None


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already gone, so one failure can't leak the rest."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def take_fds(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """The fds a recvmsg() returned; raises :class:`Truncated` (closing them) if cut short."""
    if not ancdata and not msg_flags & _TRUNCATED:
        return []
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % fds.itemsize
            fds.frombytes(data[:usable])
    if msg_flags & _TRUNCATED:
        close_fds(fds)
        what = "its fds were cut off (MSG_CTRUNC)" if msg_flags & _CTRUNC else "too long"
        raise Truncated(f"message truncated: {what}")
    return fds.tolist()


def rights(fds: list[int]) -> list[tuple[int, int, Any]]:
    """The ancillary data for sendmsg() that passes ``fds``."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def refuse_rights(sock: socket.socket | Any) -> bool:
    """Ask the kernel to refuse fds sent to ``sock`` (SO_PASSRIGHTS=0); False where unsupported."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        return False
    return True


def _received(
    data: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int
) -> tuple[bytes, list[int]]:
    # The common cases first, each decided by what take_fds would decide: nothing
    # cut, and no fds or exactly one in one SCM_RIGHTS message.
    if not msg_flags & _TRUNCATED:
        if not ancdata:
            return data, []
        if len(ancdata) == 1:
            level, kind, raw = ancdata[0]
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS and len(raw) == _FD_SIZE:
                return data, [int.from_bytes(raw, _ORDER, signed=True)]
    try:
        return data, take_fds(ancdata, msg_flags)
    except Truncated as e:
        if not msg_flags & socket.MSG_TRUNC:
            e.datagram = data
        raise


def recv(sock: socket.socket, size: int = MAX_MESSAGE) -> tuple[bytes, list[int]]:
    """Receive one datagram (on a stream socket: up to ``size`` bytes) and its fds;
    ``(b"", [])`` is the end of the stream. Raises :class:`Truncated` (having closed
    what arrived), OSError (BlockingIOError from a non-blocking socket with nothing
    to read)."""
    data, ancdata, msg_flags, _ = sock.recvmsg(size, ANCILLARY_SPACE, RECV_FLAGS)
    return _received(data, ancdata, msg_flags)


async def recv_async(sock: Any, size: int = MAX_MESSAGE) -> tuple[bytes, list[int]]:
    """As :func:`recv`, from a trio socket (or anything with an awaitable ``recvmsg``)."""
    data, ancdata, msg_flags, _ = await sock.recvmsg(size, ANCILLARY_SPACE, RECV_FLAGS)
    return _received(data, ancdata, msg_flags)


async def hang_up(sock: Any) -> None:
    """Close our side of a trio socket so that the peer still reads what we sent.

    A socket closed with unread messages makes the peer's next recv fail with
    ECONNRESET before it reads ours; so stop the peer sending, then drop what it
    sent (closing any fds in it) until the end of the stream. The caller closes
    the socket and bounds the wait.
    """
    sock.shutdown(socket.SHUT_RDWR)
    while True:
        try:
            data, fds = await recv_async(sock)
        except RemoteProtocolError:
            continue  # truncated: what arrived was closed
        close_fds(fds)
        if not data and not fds:
            return


def send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send one datagram with ``fds``; the caller keeps (and closes) its own fds."""
    if fds:
        sock.sendmsg([data], rights(fds))
    else:
        sock.send(data)  # the same datagram; send() skips sendmsg's argument parsing


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one, and return it.

    The daemon holds an fd per client, and on the memfd backend one per live
    buffer: the usual soft limit of 1024 would cap both long before the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
