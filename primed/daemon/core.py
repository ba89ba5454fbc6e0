"""The daemon's core: every protocol rule, and no I/O.

Theory of operation. The core owns the sessions, their buffers, the share
tokens, the quota ledger and the counters. It is driven by a transport
(:mod:`primed.daemon.transport`) that moves datagrams and fds and keeps time;
the core never sees a socket, never waits and never closes an fd. The only
kernel calls it makes go through the injected backend (allocate, export, free).

For each request the transport calls :meth:`Core.receive` (a datagram) or
:meth:`Core.handle` (a decoded request) and gets an :data:`Outcome` back:

- an :class:`Answer`: one reply with no fds, and whether to drop the client
  after sending it (a malformed message, a request before HELLO, a refusal);
- ``bytes``: one reply with no fds, already encoded, and the client stays (the
  answers of :meth:`Core.receive`'s fast paths, which build no message object);
- a :class:`Delivery`: replies that carry fds. The transport sends them part
  by part: for each, it waits until the client has room, calls
  :meth:`Delivery.datagram` (synchronous: the lookup and the export happen
  there, after the transport's last await; it is :meth:`Delivery.export`'s
  reply, encoded), sends it with the fds it listed, and closes those fds
  whatever happened. If the export or the send fails with a KernelError or
  ETOOMANYREFS, it sends the Answer :meth:`Delivery.failed` returns instead,
  and stops. After each part sent it
  calls :meth:`Delivery.sent`; a part the transport will not send (the client's
  uid has too many fds in flight) ends the request with :meth:`Delivery.refused`.

Fd ownership. Every fd a backend exports is appended, the moment it exists,
to a list the transport owns and closes in a ``finally``: the core holds no fd
across a return. Allocations are the backend's until adopted by a session (an
allocation not adopted is freed in a ``finally``), the session's until released
or until the client goes (:meth:`Core.disconnect`).

Errors are built in one place (:meth:`Core._error`), which counts them.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import errno
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from primed import formats
from primed.daemon.policy import Ledger, Peer, Policy, QuotaExceeded
from primed.daemon.ratelimit import LogLimiter, held_note
from primed.daemon.sessions import Ordered, Session, Token, Tokens
from primed.errors import ErrorCode, KernelError, ProtocolError, RemoteProtocolError
from primed.formats import LayoutError, Limits
from primed.kernel.allocation import Allocation, Allocators, BufferSource, Owner
from primed.wire import protocol
from primed.wire.protocol import (
    USAGE_CPU,
    USAGE_SCANOUT,
    USAGES,
    Allocate,
    Allocated,
    AllocateFrom,
    AllocatorInfo,
    BufferEntry,
    BufferInfo,
    ClientEntry,
    DeviceImports,
    Error,
    FormatInfo,
    Hello,
    List,
    Listed,
    OpenBuffer,
    OpenShared,
    Queried,
    Query,
    Release,
    Released,
    Reply,
    Request,
    Revoke,
    Revoked,
    Share,
    Shared,
    Statistics,
    Stats,
    Welcome,
)
from primed.wire.schema import MAX_FDS, MIN_VERSION, VERSION, Opcode

log = logging.getLogger("primed")

#: The most entries a LISTED page of this daemon may hold: each fits in one datagram
#: with room to spare (PROTOCOL.md promises clients no more).
LIST_PAGE_CLIENTS = 200
LIST_PAGE_BUFFERS = 1000
#: Buffers this daemon puts in one page: fewer than the most, so that building and
#: encoding a page holds the event loop about a millisecond, not several.
SERVED_PAGE_BUFFERS = 256
#: Buffers of one ALLOCATE made within the request's handling; a larger batch is made
#: one buffer per Delivery.prepare() (each is a few system calls: 10-40 us for a memfd,
#: more for a dumb buffer), so no batch holds the event loop for long.
MADE_AT_ONCE = 8
#: The largest listing key (LIST's u32 ``start``); past it the buffers' keys are renumbered.
MAX_LISTING_KEY = (1 << 32) - 1
#: The one answer to every token that can't be opened or revoked, whatever the reason.
NO_TOKEN = "no such token"
#: The kinds of log line that connections coming and going write.
_CONNECTION_LINES = frozenset({"connected", "named", "disconnected"})
#: The usage bits, as ALLOCATE_FROM's refusals name them.
_USAGE_NAMES = ((USAGE_SCANOUT, "scanout"), (USAGE_CPU, "CPU access"))
#: What QUERY reports of the format table: it never changes while the daemon runs.
_FORMATS = tuple(FormatInfo(f.fourcc, f.cpp, f.hsub, f.vsub) for f in formats.FORMATS.values())


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """Send ``reply`` (no fds) with ``serial``; then end the connection if ``drop``."""

    serial: int
    reply: Reply
    drop: bool = False


class Delivery(abc.ABC):
    """Replies carrying fds, for request ``serial``, to be sent part by part.

    The contract the transport keeps: while :attr:`pending`, wait until the
    client has room, then call :meth:`export` with no await in between, send
    what it returns with the fds it appended, and close those fds right after
    the send whatever happens. A buffer or token looked up in export() is thus
    exported before anything else can run: nothing can revoke, use up or free
    it (and the kernel reuse its handle or fd number) between the lookup and
    the export.
    """

    def __init__(self, serial: int):
        self.serial = serial

    @property
    @abc.abstractmethod
    def pending(self) -> bool:
        """Whether a part remains to be exported and sent."""

    @property
    @abc.abstractmethod
    def part_fds(self) -> int:
        """How many fds the next part carries, at most (for the fds-in-flight budget)."""

    @property
    def ready(self) -> bool:
        """Whether the next part can be exported; while not, the transport calls
        :meth:`prepare` (with room for others to run between calls) first."""
        return True

    def prepare(self) -> None:  # noqa: B027 (most deliveries are ready at once)
        """One step of the work due before the next part (making one buffer of a
        batch): synchronous, a few system calls at most."""

    def sent(self) -> None:  # noqa: B027 (most deliveries have nothing to do then)
        """The part export() last returned was sent: what hangs on its delivery
        (a ONCE token being spent) happens now."""

    @abc.abstractmethod
    def export(self, fds: list[int]) -> Reply:
        """The next part's reply; each fd it carries is appended to ``fds`` as it is
        exported (the caller's to close). May return an Error with no fds. Raises
        KernelError if the backend could not export."""

    def datagram(self, fds: list[int]) -> bytes:
        """:meth:`export`'s reply, encoded with this request's serial: what the transport
        sends. A delivery may pack it without building the reply (the same bytes)."""
        return protocol.encode(self.export(fds), self.serial)

    @abc.abstractmethod
    def failed(self, error: OSError) -> Answer:
        """The whole request failed (export: KernelError; send: ETOOMANYREFS): undo
        it and say so. Nothing is pending afterwards."""

    @abc.abstractmethod
    def refused(self, text: str) -> Answer:
        """The transport will not send the next part (``text`` says which limit): undo
        the request as :meth:`failed` does and answer LIMIT_EXCEEDED with ``text``."""


Outcome = Answer | Delivery
#: What :meth:`Core.receive` returns: an Outcome, or (its fast paths) a reply already encoded.
Received = Outcome | bytes


def _info(ident: int, allocation: Allocation) -> BufferInfo:
    return BufferInfo(
        ident,
        allocation.width,
        allocation.height,
        allocation.fourcc,
        allocation.modifier,
        allocation.size,
        allocation.planes,
    )


def _tightest(*quotas: int) -> int:
    """The smallest quota that is set (0 where none is)."""
    return min((q for q in quotas if q), default=0)


class Core:
    """Sessions, buffers, tokens, quotas and counters; the handlers of every request."""

    def __init__(
        self,
        backend: BufferSource,
        limits: Limits | None = None,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``backend`` is one allocator, or several (an :class:`Allocators`: the first is
        the default). ``clock`` (seconds) paces the rate-limited log lines."""
        self.backend = backend
        self._allocators = Allocators.of(backend)
        self.limits = limits or Limits()
        self.policy = policy or Policy()
        self.ledger = Ledger()
        self.sessions: set[Session] = set()
        self.tokens = Tokens(self.ledger)
        self._numbers = itertools.count(1)
        self._clients: Ordered[Session] = Ordered()  # by number: the listing of clients
        # Every buffer, in the order allocated: listing key -> its owner (whose ``listed``
        # maps the key to the buffer's id). Keys count up; see _key().
        self._buffers: Ordered[Session] = Ordered()
        self._last_key = 0
        #: Warnings and repeated errors: a burst per uid and kind, then counted.
        self.logs = LogLimiter(clock=clock)
        #: Lines of connections coming and going, which a client makes as often as it
        #: connects: a roomier burst, limited all the same.
        self.connection_logs = LogLimiter(burst=50, clock=clock)
        self.stats = {"requests": 0, "errors": 0, "bad_messages": 0, "refused": 0}
        self.requests_by_opcode: collections.Counter[int] = collections.Counter()
        self.errors_by_code: collections.Counter[int] = collections.Counter()
        self.started = time.monotonic()
        self._handlers: dict[type[Request], Callable[[Session, int, Any], Outcome]] = {
            Allocate: self._allocate_request,
            Release: self._release,
            Share: self._share,
            OpenShared: self._open_shared,
            Revoke: self._revoke,
            Query: self._query,
            List: self._list,
            Stats: self._stats,
            OpenBuffer: self._open_buffer,
            AllocateFrom: self._allocate_from,
        }
        #: raw opcode -> a fast path of receive(): an Outcome, or None to go the general way
        self._fast: dict[int, Callable[[Session, bytes, int], Received | None]] = {
            int(Opcode.ALLOCATE): self._fast_allocate,
            int(Opcode.RELEASE): self._fast_release,
        }

    @property
    def allocators(self) -> Allocators:
        """Every allocator served, the default first: ``backend`` itself when it is an
        Allocators (whose export and free reach the allocator each Allocation names),
        else that one source alone."""
        known, backend = self._allocators, self.backend
        if known is not backend and known.served[0].source is not backend:
            known = self._allocators = Allocators.of(backend)  # replaced (fault injection)
        return known

    # --- the daemon as a whole -----------------------------------------------------------

    @property
    def live_buffers(self) -> int:
        return self.ledger.total.buffers

    @property
    def held_bytes(self) -> int:
        return self.ledger.total.bytes

    def summary(self) -> str:
        """One line on what the daemon holds now."""
        return (
            f"{len(self.sessions)} client(s), {self.live_buffers} buffer(s), "
            f"{self.held_bytes / (1 << 20):.1f} MiB"
        )

    def configure(self, limits: Limits, policy: Policy) -> list[Session]:
        """New rules: connected clients meet them from their next request. Returns the
        sessions the new access rules refuse (the transport disconnects them)."""
        self.limits, self.policy = limits, policy
        refused = [s for s in self.sessions if policy.refusal(s.account.peer) is not None]
        for session in sorted(refused, key=lambda s: s.number):
            self._log(
                logging.WARNING,
                session.uid,
                "reload",
                "reload: %s is no longer allowed; disconnecting it",
                session,
            )
        return refused

    def _log(self, level: int, uid: int, kind: str, message: str, *args: object) -> None:
        """Log a line that a uid can provoke at will: rate-limited per uid and kind, the
        line after a burst saying how many were held back."""
        if not log.isEnabledFor(level):
            return
        limiter = self.connection_logs if kind in _CONNECTION_LINES else self.logs
        held = limiter.allow(uid, kind)
        if held is not None:
            log.log(level, message + "%s", *args, held_note(held))

    # --- connections ---------------------------------------------------------------------

    def refusal(self, peer: Peer) -> Answer | None:
        """None if ``peer`` may connect; else the ERROR to send before hanging up:
        PERMISSION_DENIED if the access rules refuse it, LIMIT_EXCEEDED if one more
        connection would pass the daemon's bound or the uid's share. The transport
        calls :meth:`connect` right after, with no await in between."""
        why = self.policy.refusal(peer)
        code = ErrorCode.PERMISSION_DENIED
        if why is None:
            why = self.ledger.connection_refusal(peer, self.policy)
            code = ErrorCode.LIMIT_EXCEEDED
            if why is None:
                return None
        self.stats["refused"] += 1
        self._log(
            logging.WARNING,
            peer.uid,
            "refused",
            "refused a client (pid %d, uid %d, gid %d): %s",
            peer.pid,
            peer.uid,
            peer.gid,
            why,
        )
        return self._error(0, code, why, drop=True)

    def connect(self, peer: Peer) -> Session:
        """A new session for an admitted ``peer``."""
        session = Session(next(self._numbers), peer.pid, peer.uid, peer.gid, self.ledger.open(peer))
        self.sessions.add(session)
        self._clients.add(session.number, session)
        self._log(logging.INFO, peer.uid, "connected", "%s connected", session)
        return session

    def disconnect(self, session: Session) -> int:
        """Forget ``session``, freeing its buffers and killing its tokens; returns how many."""
        self.sessions.discard(session)
        self._clients.pop(session.number)
        count = len(session.buffers)
        for ident in list(session.buffers):
            self._drop(session, ident)
        self.ledger.close(session.account)
        self._log(
            logging.INFO,
            session.uid,
            "disconnected",
            "%s disconnected; freed %d buffer(s)",
            session,
            count,
        )
        return count

    # --- requests ------------------------------------------------------------------------

    def receive(self, session: Session, data: bytes, nfds: int) -> Received:
        """What to do about one datagram that came with ``nfds`` fds (already closed:
        no request carries any, but the header must count them).

        The requests a client repeats most (ALLOCATE, RELEASE of one id) go by a table
        on the raw opcode to handlers that read the datagram straight into values
        (no message object); anything such a handler does not take (None: malformed,
        before HELLO, an error to answer) goes the general way, which decodes in full
        and says what is wrong."""
        if len(data) >= 2 and session.version:
            fast = self._fast.get(data[0] | data[1] << 8)
            if fast is not None:
                outcome = fast(session, data, nfds)
                if outcome is not None:
                    return outcome
        try:
            serial, request = protocol.decode(data, nfds, "request")
        except protocol.UnknownOpcode as e:
            self.stats["errors"] += 1
            self._log(logging.INFO, session.uid, "unknown opcode", "%s: %s", session, e)
            return self._error(e.serial, e.code, str(e))
        except RemoteProtocolError as e:
            return self.bad_message(session, e)
        return self.handle(session, serial, cast(Request, request))

    def bad_message(self, session: Session, error: ProtocolError) -> Answer:
        """The client sent something malformed: tell it why, then drop it."""
        self.stats["bad_messages"] += 1
        self._log(
            logging.WARNING,
            session.uid,
            "bad message",
            "%s sent a bad message, disconnecting: %s",
            session,
            error,
        )
        return self._error(error.serial, ErrorCode.BAD_MESSAGE, str(error), drop=True)

    def _fast_allocate(self, session: Session, data: bytes, nfds: int) -> Received | None:
        values = protocol.allocate_request(data, nfds)
        if values is None:
            return None
        serial, width, height, fourcc, count, flags = values
        self.stats["requests"] += 1
        self.requests_by_opcode[Opcode.ALLOCATE] += 1
        return self._allocate(session, serial, width, height, fourcc, count, flags)

    def _fast_release(self, session: Session, data: bytes, nfds: int) -> Received | None:
        values = protocol.release_one(data, nfds)
        if values is None or values[1] not in session.buffers:
            return None  # not one id, or an unknown one: the general way says which
        serial, ident = values
        self.stats["requests"] += 1
        self.requests_by_opcode[Opcode.RELEASE] += 1
        self._drop(session, ident)
        return protocol.released_datagram(serial, 1)

    def handle(self, session: Session, serial: int, request: Request) -> Outcome:
        """What to do about ``request`` (a decoded request) with id ``serial``."""
        self.stats["requests"] += 1
        self.requests_by_opcode[request.OPCODE] += 1
        if isinstance(request, Hello):
            return self._hello(session, serial, request)
        if not session.version:
            return self._fail(
                session, serial, ErrorCode.BAD_STATE, "HELLO must come first", drop=True
            )
        handler = self._handlers.get(type(request))
        if handler is None:  # a request type decode() knows but this core does not handle
            return self._fail(session, serial, ErrorCode.UNKNOWN_OPCODE, repr(request))
        return handler(session, serial, request)

    # --- errors: built here only ---------------------------------------------------------

    def _error(
        self, serial: int, code: ErrorCode, text: str, err: int = 0, *, drop: bool = False
    ) -> Answer:
        self.errors_by_code[code] += 1
        return Answer(serial, Error(code, err, text), drop)

    def _fail(
        self,
        session: Session,
        serial: int,
        code: ErrorCode,
        text: str,
        err: int = 0,
        *,
        drop: bool = False,
    ) -> Answer:
        """A request refused: the Error to answer it with."""
        self.stats["errors"] += 1
        log.debug("%s: request %d failed: %s: %s", session, serial, code.name, text)
        return self._error(serial, code, text, err, drop=drop)

    def _kernel(self, session: Session, serial: int, e: OSError) -> Answer:
        """ERROR KERNEL with the errno, for a request the kernel refused. Logged (rate-limited):
        EMFILE, ENOMEM or ETOOMANYREFS mean the daemon is short of something."""
        self._log(
            logging.WARNING,
            session.uid,
            "kernel",
            "%s: the kernel refused request %d: %s",
            session,
            serial,
            e.strerror or e,
        )
        return self._fail(session, serial, ErrorCode.KERNEL, e.strerror or "", e.errno or 0)

    def _refused(self, session: Session, serial: int, code: ErrorCode, text: str) -> Answer:
        """A quota or bound refused the request: logged (rate-limited), at warning if it
        is a daemon-wide bound (the daemon is full), at info if the client's own share."""
        daemon_wide = text.startswith("bound")
        self._log(
            logging.WARNING if daemon_wide else logging.INFO,
            session.uid,
            "bound" if daemon_wide else "quota",
            "%s: request %d refused: %s",
            session,
            serial,
            text,
        )
        return self._fail(session, serial, code, text)

    # --- handlers ------------------------------------------------------------------------

    def _hello(self, session: Session, serial: int, hello: Hello) -> Answer:
        if session.version:
            return self._fail(session, serial, ErrorCode.BAD_STATE, "HELLO was already sent")
        version = min(hello.max_version, VERSION)
        if version < max(hello.min_version, MIN_VERSION):
            return self._fail(
                session,
                serial,
                ErrorCode.UNSUPPORTED_VERSION,
                f"client speaks {hello.min_version}..{hello.max_version}, "
                f"server {MIN_VERSION}..{VERSION}",
            )
        session.version = version
        session.name = hello.name
        if hello.name:
            self._log(
                logging.INFO,
                session.uid,
                "named",
                "client %d is %r",
                session.number,
                hello.name,
            )
        driver, limits = self.backend.driver, self.limits
        welcome = Welcome(
            version,
            self.backend.kind,
            limits.max_width,
            limits.max_height,
            limits.max_size,
            limits.max_count,
            driver.name,
            (driver.major, driver.minor, driver.patch),
            self.backend.node,
            self._listing() if version > 1 else (),  # version 1 has no list
        )
        return Answer(serial, welcome)

    def _listing(self) -> tuple[AllocatorInfo, ...]:
        """WELCOME's allocator list (version 2)."""
        return tuple(
            AllocatorInfo(
                s.name,
                s.kind,
                s.usage,
                s.source.driver.name,
                (s.source.driver.major, s.source.driver.minor, s.source.driver.patch),
                s.source.node,
            )
            for s in self.allocators.served
        )

    def _allocate_from(self, session: Session, serial: int, request: AllocateFrom) -> Outcome:
        """ALLOCATE_FROM (version 2): choose the allocator, then as ALLOCATE.

        The allocator is the one called ``name``, or with no name the first (in the
        daemon's order) whose buffers serve every ``usage`` bit and, with a
        ``device``, import on it as the import matrix recorded; a named one must
        meet ``usage`` and ``device`` too. None: NO_ALLOCATOR, saying why.
        """
        if session.version < 2:
            text = "ALLOCATE_FROM is version 2; this connection speaks version 1"
            return self._fail(session, serial, ErrorCode.UNKNOWN_OPCODE, text)
        if request.usage & ~USAGES:
            text = f"unknown usage bits {request.usage & ~USAGES:#x}"
            return self._fail(session, serial, ErrorCode.INVALID_ARGUMENT, text)
        allocators = self.allocators
        served = allocators.served
        names = ", ".join(s.name for s in served)
        if request.name:
            index = allocators.index(request.name)
            if index is None:
                text = f"no allocator named {request.name!r} (served: {names})"
                return self._fail(session, serial, ErrorCode.NO_ALLOCATOR, text)
            candidates = [index]
        else:
            candidates = list(range(len(served)))
        row = None
        if request.device:
            row = allocators.matrix.row(request.device)
            if row is None:
                known = ", ".join(r.node for r in allocators.matrix.rows) or "none"
                text = f"{request.device} is not in the import matrix (render nodes: {known})"
                return self._fail(session, serial, ErrorCode.NO_ALLOCATOR, text)
        fit = [
            i
            for i in candidates
            if served[i].usage & request.usage == request.usage
            and (row is None or row.imports[i] == 0)
        ]
        if not fit:
            asked = [name for bit, name in _USAGE_NAMES if request.usage & bit]
            if row is not None:
                asked.append(f"import on {request.device}")
            if request.name:
                (index,) = candidates
                lacks = [n for bit, n in _USAGE_NAMES if request.usage & bit & ~served[index].usage]
                if row is not None and row.imports[index]:
                    err = row.imports[index]
                    shown = errno.errorcode.get(err, str(err))
                    lacks.append(f"import on {request.device} ({shown})")
                text = f"{request.name}'s buffers do not serve {' and '.join(lacks)}"
            else:
                text = f"no allocator serves {' and '.join(asked)} (served: {names})"
            return self._fail(session, serial, ErrorCode.NO_ALLOCATOR, text)
        return self._allocate(
            session, serial, request.width, request.height, request.fourcc, request.count, 0, fit[0]
        )

    def _allocate_request(self, session: Session, serial: int, request: Allocate) -> Outcome:
        return self._allocate(
            session, serial, request.width, request.height, request.fourcc, request.count,
            request.flags,
        )  # fmt: skip

    def _allocate(
        self,
        session: Session,
        serial: int,
        width: int,
        height: int,
        fourcc: int,
        count: int,
        flags: int,
        source: int = 0,
    ) -> Outcome:
        """ALLOCATE: ``count`` buffers of one format and size, delivered with their fds.

        Checked in this order, the first failure answering:

        1. the fourcc is in the format table, else UNSUPPORTED_FORMAT;
        2. ``flags`` is 0, else INVALID_ARGUMENT;
        3. ``count`` is within 1..max_count: 0 is INVALID_ARGUMENT, more LIMIT_EXCEEDED;
        4. the size, by :func:`formats.plan`: a width or height of 0, or one the
           format's subsampling does not divide, is INVALID_ARGUMENT; over
           max_width or max_height, or a planned span over max_size, LIMIT_EXCEEDED;
        5. the quotas, on the planned size times ``count``: QUOTA_EXCEEDED;
        6. the kernel (the backend's allocate): KERNEL with its errno (a LayoutError
           the backend raises is answered as in 4);
        7. the quotas again, on the sizes the kernel returned (page-rounded, its
           own pitch): QUOTA_EXCEEDED.

        Whatever fails, the buffers made so far are freed. Past 7 the buffers are
        the client's; if exporting or sending them fails, they are released and
        the request answered with KERNEL (see :class:`_Allocation`). Steps 6 and 7
        happen here for up to MADE_AT_ONCE buffers; a larger batch is made one
        buffer per :meth:`Delivery.prepare`, so that the transport can let others
        run between them, and a failure there is the delivery's only reply. The
        buffers come from allocator ``source`` (a position in :attr:`allocators`).
        """
        fmt = formats.FORMATS.get(fourcc)
        if fmt is None:
            shown = formats.fourcc_str(fourcc)
            return self._fail(
                session, serial, ErrorCode.UNSUPPORTED_FORMAT, f"unknown fourcc {shown!r}"
            )
        if flags:
            return self._fail(
                session, serial, ErrorCode.INVALID_ARGUMENT, f"unknown flags {flags:#x}"
            )
        limits = self.limits
        if not 1 <= count <= limits.max_count:
            code = ErrorCode.INVALID_ARGUMENT if count == 0 else ErrorCode.LIMIT_EXCEEDED
            text = f"count {count} is not within 1..{limits.max_count}"
            return self._fail(session, serial, code, text)
        try:
            planned = formats.plan(fmt, width, height, limits).size
        except LayoutError as e:
            code = ErrorCode.LIMIT_EXCEEDED if e.limit else ErrorCode.INVALID_ARGUMENT
            return self._fail(session, serial, code, str(e))
        refused = self._over_quota(session, serial, count, planned * count)
        if refused is not None:
            return refused
        allocate = self.backend.allocate
        if source:  # any allocator but the default (which a test may have replaced)
            allocate = functools.partial(self.allocators.allocate_from, source)
        batch = _Allocation(self, session, serial, width, height, count, allocate, fmt, limits)
        if count > MADE_AT_ONCE:
            return batch  # made step by step, the loop free between steps (Delivery.prepare)
        made = False
        try:
            while not batch.ready:
                batch.prepare()
            made = True
        finally:
            if not made:
                batch.abandon()
        return batch.answer or batch

    def _over_quota(
        self, session: Session, serial: int, buffers: int, nbytes: int
    ) -> Answer | None:
        try:
            self.ledger.check(session.account, self.policy, buffers, nbytes)
        except QuotaExceeded as e:
            return self._refused(session, serial, ErrorCode.QUOTA_EXCEEDED, str(e))
        return None

    def _release(self, session: Session, serial: int, request: Release) -> Answer:
        unknown = [i for i in request.ids if i not in session.buffers]
        if unknown or len(set(request.ids)) != len(request.ids):
            what = f"unknown buffer id {unknown[0]}" if unknown else "an id appears twice"
            return self._fail(session, serial, ErrorCode.UNKNOWN_BUFFER, what)
        for ident in request.ids:
            self._drop(session, ident)
        return Answer(serial, Released(len(request.ids)))

    def _share(self, session: Session, serial: int, request: Share) -> Answer:
        if request.id not in session.buffers:
            text = f"unknown buffer id {request.id}"
            return self._fail(session, serial, ErrorCode.UNKNOWN_BUFFER, text)
        try:
            on_buffer = self.tokens.count(session, request.id)
            self.ledger.check_token(session.account, self.policy, on_buffer)
        except QuotaExceeded as e:
            return self._refused(session, serial, ErrorCode.LIMIT_EXCEEDED, str(e))
        token = self.tokens.issue(session, request.id, request.once, request.uids)
        return Answer(serial, Shared(token))

    def _open_shared(self, session: Session, serial: int, request: OpenShared) -> Delivery:
        def find() -> tuple[Allocation, bytes | None] | Answer:
            entry = self.tokens.get(request.token)
            if entry is None or not entry.admits(session.uid):
                return self._fail(session, serial, ErrorCode.UNKNOWN_TOKEN, NO_TOKEN)
            log.debug("%s opens a buffer of %s", session, entry.owner)
            return entry.owner.buffers[entry.id], request.token if entry.once else None

        return _HandOver(self, session, serial, find)

    def _revoke(self, session: Session, serial: int, request: Revoke) -> Answer:
        entry = self.tokens.get(request.token)
        if entry is None or entry.owner is not session:
            return self._fail(session, serial, ErrorCode.UNKNOWN_TOKEN, NO_TOKEN)
        self.tokens.forget(request.token)
        return Answer(serial, Revoked())

    def _query(self, session: Session, serial: int, request: Query) -> Answer:
        driver, limits = self.backend.driver, self.limits
        quotas = self.policy.quotas
        if self.policy.is_admin(session.account.peer):
            quota_buffers = quota_bytes = 0
        else:
            quota_buffers = _tightest(quotas.buffers_per_client, quotas.buffers_per_uid)
            quota_bytes = _tightest(quotas.bytes_per_client, quotas.bytes_per_uid)
        used = session.account.own
        reply = Queried(
            self.backend.kind,
            driver.name,
            (driver.major, driver.minor, driver.patch),
            self.backend.node,
            limits.max_width,
            limits.max_height,
            limits.max_count,
            limits.max_size,
            _FORMATS,
            (formats.MOD_LINEAR,),
            quota_buffers,
            quota_bytes,
            used.buffers,
            used.bytes,
            self._matrix() if session.version > 1 else (),  # version 1 has no matrix
        )
        return Answer(serial, reply)

    def _matrix(self) -> tuple[DeviceImports, ...]:
        """QUERIED's import matrix (version 2), as recorded at start."""
        rows = self.allocators.matrix.rows
        return tuple(DeviceImports(r.node, r.driver, r.imports) for r in rows)

    def _sees_all(self, session: Session) -> bool:
        """Root and the admin group see (and may open) every client's buffers."""
        return session.uid == 0 or self.policy.is_admin(session.account.peer)

    def _list(self, session: Session, serial: int, request: List) -> Answer:
        """One page of a listing, from the cursor ``start`` on: a client number (clients)
        or a listing key (buffers), never a position, so that entries coming and going
        between pages shift nothing. Each page costs about its size (see Ordered.page)."""
        everyone = self._sees_all(session)
        start = request.start
        if request.what == protocol.LIST_CLIENTS:
            if everyone:
                found, following = self._clients.page(start, LIST_PAGE_CLIENTS)
                clients = [s for _, s in found]
            else:
                clients, following = ([session] if start <= session.number else []), 0
            clients_page = tuple(
                ClientEntry(
                    s.number, s.pid, s.uid, s.gid, int(s.since * 1000),
                    s.account.own.buffers, s.account.own.bytes, s.name,
                )
                for s in clients
            )  # fmt: skip
            return Answer(serial, Listed(request.what, following, clients_page))
        if request.what == protocol.LIST_BUFFERS:
            if everyone:
                owned, following = self._buffers.page(start, SERVED_PAGE_BUFFERS)
                rows = [(s, s.listed[key]) for key, s in owned]
            else:
                mine, following = session.listed.page(start, SERVED_PAGE_BUFFERS)
                rows = [(session, ident) for _, ident in mine]
            now = time.monotonic()
            buffers_page = tuple(
                BufferEntry(
                    s.number, ident, a.width, a.height, a.fourcc, a.size,
                    int((now - a.born) * 1000), self.tokens.count(s, ident),
                )
                for s, ident in rows
                for a in (s.buffers[ident],)
            )  # fmt: skip
            return Answer(serial, Listed(request.what, following, buffers_page))
        text = f"LIST of kind {request.what}"
        return self._fail(session, serial, ErrorCode.INVALID_ARGUMENT, text)

    def _stats(self, session: Session, serial: int, request: Stats) -> Answer:
        counters = [
            *((1, op, n) for op, n in sorted(self.requests_by_opcode.items())),
            *((2, code, n) for code, n in sorted(self.errors_by_code.items())),
            (3, 1, self.stats["bad_messages"]),
            (3, 2, self.stats["refused"]),
        ]
        reply = Statistics(
            int((time.monotonic() - self.started) * 1000),
            len(self.sessions),
            self.live_buffers,
            self.held_bytes,
            len(self.tokens),
            tuple(counters),
        )
        return Answer(serial, reply)

    def _open_buffer(self, session: Session, serial: int, request: OpenBuffer) -> Outcome:
        if not self._sees_all(session):
            text = "only root and the admin group open other clients' buffers"
            return self._fail(session, serial, ErrorCode.PERMISSION_DENIED, text)

        def find() -> tuple[Allocation, bytes | None] | Answer:
            owner = next((s for s in self.sessions if s.number == request.client), None)
            allocation = owner.buffers.get(request.id) if owner else None
            if allocation is None:
                text = f"no buffer {request.client}:{request.id}"
                return self._fail(session, serial, ErrorCode.UNKNOWN_BUFFER, text)
            log.info("%s opens buffer %d of %s", session, request.id, owner)
            return allocation, None

        return _HandOver(self, session, serial, find)

    # --- buffers -------------------------------------------------------------------------

    def _free(self, session: Session, allocation: Allocation) -> None:
        try:
            self.backend.free(allocation)
        except OSError as e:  # never seen; log it rather than lose the session's others
            log.error("%s: freeing a buffer failed: %s", session, e)

    def _adopt(self, session: Session, allocation: Allocation) -> int:
        """Make ``allocation`` the session's, and list it; returns its id."""
        ident = session.adopt(allocation)
        if self._last_key >= MAX_LISTING_KEY:
            self._renumber()
        self._last_key += 1
        key = self._last_key
        self._buffers.add(key, session)
        session.listed.add(key, ident)
        session.keys[ident] = key
        return ident

    def _renumber(self) -> None:
        """Give the live buffers listing keys 1, 2, ... again, in their order: the keys
        ran out of LIST's 32 bits (after 2**32 allocations; a listing under way then
        may see an entry twice or miss one)."""
        live = [(session, session.listed[key]) for key, session in self._buffers.items()]
        self._buffers = Ordered()
        for session in self.sessions:
            session.listed, session.keys = Ordered(), {}
        for key, (session, ident) in enumerate(live, 1):
            self._buffers.add(key, session)
            session.listed.add(key, ident)
            session.keys[ident] = key
        self._last_key = len(live)

    def _drop(self, session: Session, ident: int) -> None:
        """Release one of the session's buffers: its tokens die, its quota is refunded."""
        if session.shares:  # most clients share nothing: no token to look for
            self.tokens.forget_buffer(session, ident)
        key = session.keys.pop(ident)
        session.listed.pop(key)
        self._buffers.pop(key)
        allocation = session.buffers.pop(ident)
        self.ledger.refund(session.account, 1, allocation.size)
        self._free(session, allocation)


class _Undoable(Delivery):
    """A delivery of this core's: failing or refusing it undoes it (:meth:`_undo`), then
    answers with the error."""

    def __init__(self, core: Core, session: Session, serial: int):
        super().__init__(serial)
        self._core, self._session = core, session

    def failed(self, error: OSError) -> Answer:
        self._undo()
        return self._core._kernel(self._session, self.serial, error)

    def refused(self, text: str) -> Answer:
        self._undo()
        return self._core._fail(self._session, self.serial, ErrorCode.LIMIT_EXCEEDED, text)

    @abc.abstractmethod
    def _undo(self) -> None:
        """Take back what the request did; nothing is pending afterwards."""


class _Allocation(_Undoable):
    """The buffers of one ALLOCATE: made one per :meth:`prepare` (steps 6 and 7 of
    :meth:`Core._allocate`), then delivered MAX_FDS to a part (SCM_MAX_FD fds per
    message), or, if making them failed, the Error that says why.

    Until all are made they are this delivery's (freed by :meth:`abandon` or an
    undo); then the session's: if a part fails, all of them are released, parts
    already sent included (on the Error the client closes what it got).
    """

    def __init__(
        self,
        core: Core,
        session: Session,
        serial: int,
        width: int,
        height: int,
        count: int,
        allocate: Callable[[formats.Format, int, int, Limits, Owner], Allocation],
        fmt: formats.Format,
        limits: Limits,
    ):
        # Set here rather than by the bases' __init__s: one call less per ALLOCATE.
        self.serial, self._core, self._session = serial, core, session
        self._width, self._height, self._count = width, height, count
        self._make, self._fmt, self._limits = allocate, fmt, limits
        self._made: list[Allocation] = []  # not the session's yet
        self._ids: list[int] = []  # the session's buffers this delivers, in order
        self._next = 0
        self._over = False  # every part sent, or the request failed or was undone
        #: The reply if making the buffers failed (then nothing is delivered)
        self.answer: Answer | None = None

    @property
    def ready(self) -> bool:
        return self.answer is not None or bool(self._ids)

    @property
    def pending(self) -> bool:
        return not self._over

    @property
    def part_fds(self) -> int:
        return min(MAX_FDS, len(self._ids) - self._next)

    def prepare(self) -> None:
        core, session = self._core, self._session
        # Named for its owner by the allocator, with the id adoption gives it below: a
        # session's requests are handled one at a time, so no other takes ids meanwhile.
        owner = Owner(session.uid, session.pid, session.next_id + len(self._made), session.name)
        try:
            self._made.append(self._make(self._fmt, self._width, self._height, self._limits, owner))
        except KernelError as e:
            self._end(core._kernel(session, self.serial, e))
            return
        except LayoutError as e:  # the backend's own refusal, past plan()'s
            code = ErrorCode.LIMIT_EXCEEDED if e.limit else ErrorCode.INVALID_ARGUMENT
            self._end(core._fail(session, self.serial, code, str(e)))
            return
        if len(self._made) < self._count:
            return
        # The quota holds the sizes made (page-rounded, the kernel's pitch), not the plan;
        # checked and charged in one step, so another request of the uid can't slip between.
        made = self._made
        refused = core._over_quota(session, self.serial, len(made), sum(a.size for a in made))
        if refused is not None:
            self._end(refused)
            return
        adopted = 0
        try:
            for allocation in made:
                core.ledger.charge(session.account, 1, allocation.size)
                self._ids.append(core._adopt(session, allocation))
                adopted += 1
        finally:
            self._made = made[adopted:]  # not the session's: freed next
            self.abandon()

    def abandon(self) -> None:
        """Free the buffers made and not yet the session's."""
        made, self._made = self._made, []
        for allocation in made:
            self._core._free(self._session, allocation)

    def _end(self, answer: Answer) -> None:
        self.abandon()
        self.answer = answer

    def _take_part(self) -> tuple[int, list[int]]:
        """The next part to send: its position and its ids (at most MAX_FDS), counted
        as sent (what export() and datagram() both deliver)."""
        index = self._next
        part = self._ids[index : index + MAX_FDS]
        self._next = index + len(part)
        self._over = self._next >= len(self._ids)
        return index, part

    def export(self, fds: list[int]) -> Reply:
        if self.answer is not None:
            self._over = True
            return self.answer.reply
        index, part = self._take_part()
        backend, buffers = self._core.backend, self._session.buffers
        for ident in part:
            fds.append(backend.export(buffers[ident]))
        # Version 2 says which allocator made them (one request, one allocator).
        allocator = buffers[part[0]].source if self._session.version > 1 else 0
        infos = tuple(_info(ident, buffers[ident]) for ident in part)
        return Allocated(len(self._ids), index, infos, allocator)

    def datagram(self, fds: list[int]) -> bytes:
        # export()'s reply packed straight from the Allocations: no BufferInfo, no Allocated.
        if self.answer is not None:
            return super().datagram(fds)
        index, part = self._take_part()
        backend, buffers = self._core.backend, self._session.buffers
        total = len(self._ids)
        if len(part) == 1:  # a part of one buffer: most ALLOCATEs are one buffer
            ident = part[0]
            a = buffers[ident]
            fds.append(backend.export(a))
            allocator = a.source if self._session.version > 1 else 0
            return protocol.one_buffer_datagram(
                self.serial, total, index, allocator,
                ident, a.width, a.height, a.fourcc, a.modifier, a.size, a.planes,
            )  # fmt: skip
        rows = []
        for ident in part:
            a = buffers[ident]
            fds.append(backend.export(a))
            rows.append((ident, a.width, a.height, a.fourcc, a.modifier, a.size, a.planes))
        allocator = buffers[part[0]].source if self._session.version > 1 else 0
        return protocol.allocated_datagram(self.serial, total, index, allocator, rows)

    def _undo(self) -> None:
        self._over = True
        self.abandon()
        for ident in self._ids:
            if ident in self._session.buffers:  # the client may have gone meanwhile
                self._core._drop(self._session, ident)


class _HandOver(_Undoable):
    """A fresh fd of someone else's buffer, as an ALLOCATED of one with id 0 (it stays
    its owner's). ``find`` looks the buffer up, in export(): after the last await."""

    def __init__(
        self,
        core: Core,
        session: Session,
        serial: int,
        find: Callable[[], tuple[Allocation, bytes | None] | Answer],
    ):
        super().__init__(core, session, serial)
        self._find = find
        self._done = False
        self._taken: tuple[bytes, Token] | None = None  # a ONCE token, out of use while sent

    @property
    def pending(self) -> bool:
        return not self._done

    @property
    def part_fds(self) -> int:
        return 1

    def export(self, fds: list[int]) -> Reply:
        self._done = True
        found = self._find()
        if isinstance(found, Answer):
            return found.reply
        allocation, once = found
        fds.append(self._core.backend.export(allocation))
        if once is not None:
            # A single-use token opens nothing more from now on, but is spent only once
            # the reply carrying its fd is sent (sent()); a failed send puts it back.
            self._taken = (once, self._core.tokens.take(once))
        allocator = allocation.source if self._session.version > 1 else 0
        return Allocated(1, 0, (_info(0, allocation),), allocator)

    def sent(self) -> None:
        self._taken = None

    def _undo(self) -> None:
        self._done = True
        if self._taken is not None:
            token, entry = self._taken
            self._taken = None
            owner = entry.owner
            if owner in self._core.sessions and entry.id in owner.buffers:
                self._core.tokens.put_back(token, entry)
