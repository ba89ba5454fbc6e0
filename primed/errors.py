"""The one family of exceptions primed raises.

Every error is a :class:`PrimedError`. Protocol errors are split by who is at
fault, as h11 does: :class:`LocalProtocolError` means this side built something
invalid, :class:`RemoteProtocolError` means the peer sent something invalid.
Kernel failures keep their errno (:class:`KernelError` is also an ``OSError``).
"""

from __future__ import annotations

import enum
import errno as _errno
import os


class ErrorCode(enum.IntEnum):
    """Codes carried by an Error reply (protocol/PROTOCOL.md, "Error codes")."""

    #: The request was malformed; the server closes the connection after this reply.
    BAD_MESSAGE = 1
    #: The opcode is not one the server knows; the connection stays open.
    UNKNOWN_OPCODE = 2
    #: No protocol version is spoken by both sides.
    UNSUPPORTED_VERSION = 3
    #: A request arrived out of order (anything before Hello, or a second Hello).
    BAD_STATE = 4
    #: A field's value is not acceptable (zero size, unknown flag bits).
    INVALID_ARGUMENT = 5
    #: The fourcc is not in the server's format table.
    UNSUPPORTED_FORMAT = 6
    #: A configured limit (width, height, bytes, count) was exceeded.
    LIMIT_EXCEEDED = 7
    #: A buffer id is not one of this client's live buffers.
    UNKNOWN_BUFFER = 8
    #: The kernel refused an ioctl; the reply's errno says why.
    KERNEL = 9
    #: The client's quota of buffers or bytes is used up.
    QUOTA_EXCEEDED = 10
    #: Policy refuses this client the request.
    PERMISSION_DENIED = 11
    #: The server failed in a way that is its own fault.
    INTERNAL = 12
    #: The token is wrong, revoked, used up, dead with its buffer, or not for this client:
    #: one answer for all, so that nothing is learnt about other clients' tokens.
    UNKNOWN_TOKEN = 13
    #: Version 2: no allocator has the name asked for, or none serves the usage asked for.
    NO_ALLOCATOR = 14


class PrimedError(Exception):
    """Root of every exception primed raises on purpose."""


class ProtocolError(PrimedError):
    """A message broke the wire protocol.

    ``code`` is the :class:`ErrorCode` the server answers with, ``serial`` the
    request id when the header was readable (else 0).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_MESSAGE, serial: int = 0):
        super().__init__(message)
        self.code = code
        self.serial = serial


class LocalProtocolError(ProtocolError):
    """This side tried to build or send a message the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent a message the protocol does not allow."""


class ConnectionLost(PrimedError, ConnectionError):
    """The connection to the daemon (or peer) closed while a reply was awaited, or
    was used after it had failed. Also a ConnectionError (an OSError)."""


class Timeout(PrimedError, TimeoutError):
    """No answer came in the time allowed (see :func:`primed.connect`'s ``timeout``).

    The connection is unusable from then on (later calls raise ConnectionLost):
    the answer may still come, and nothing would tell it from a later one's.
    Also a TimeoutError (an OSError)."""


class ServerError(PrimedError):
    """The daemon answered a request with an Error reply.

    Attributes mirror the reply: ``code`` (:class:`ErrorCode`), ``errno`` (0 unless
    the kernel refused something) and ``text`` (a human-readable reason).
    """

    def __init__(self, code: ErrorCode, errno: int, text: str):
        detail = f" ({_errno.errorcode.get(errno, errno)}: {os.strerror(errno)})" if errno else ""
        super().__init__(f"{code.name}: {text}{detail}")
        self.code = code
        self.errno = errno
        self.text = text


class KernelError(PrimedError, OSError):
    """An ioctl or system call failed; ``errno`` is the kernel's answer."""

    def __init__(self, errno: int, what: str):
        OSError.__init__(self, errno, f"{what}: {os.strerror(errno)}")
        self.what = what


class NoDevice(KernelError):
    """No DRM node fits (none present, or none whose driver can do what was asked)."""


class NotImportable(PrimedError):
    """The buffer cannot become a GEM handle (e.g. a memfd buffer, which is CPU-only)."""


class UnknownFormat(PrimedError, ValueError):
    """A format name or fourcc that is not in primed's table. Also a ValueError."""


class LayoutError(PrimedError, ValueError):
    """A request the format table or the limits refuse; ``limit`` says if a limit was hit.

    Also a ValueError.
    """

    def __init__(self, message: str, *, limit: bool = False):
        super().__init__(message)
        self.limit = limit


def server_error(code: int, errno: int, text: str) -> ServerError:
    """Build a :class:`ServerError` from an Error reply's raw fields."""
    try:
        known = ErrorCode(code)
    except ValueError:
        known = ErrorCode.INTERNAL
        text = f"unknown error code {code}: {text}"
    return ServerError(known, errno, text)
