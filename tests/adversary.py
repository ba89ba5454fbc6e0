"""The adversarial suite's cast: a daemon of its own uid, a victim that keeps working
and attackers that try to exhaust one shared resource each, every one a process of
its own unprivileged uid (the tests run as root and switch uids before exec).

The daemon runs as root without CAP_SYS_ADMIN and CAP_SYS_RESOURCE in its bounding
set: the kernel charges fds in flight to the sender's user up to its RLIMIT_NOFILE
but exempts a sender with either capability, so only then does the daemon meet the
limits a system service meets. (It can't simply be another uid: the interpreter may
live where only root can read.) Its socket is in a folder every uid may traverse,
with mode 666. For the same reason a worker starts as root and becomes its uid once
it has imported what it needs.

Run as ``python -m tests.adversary UID victim PATH TIMEOUT`` or ``python -m
tests.adversary UID attack MODE PATH JSON`` (what :class:`Worker` does): each reads
one JSON command a line on stdin and answers one JSON line on stdout.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import primed
from primed import fdpass
from primed.errors import ErrorCode, ServerError
from primed.wire import protocol
from primed.wire.schema import VERSION
from tests.reliability import vm_rss_kib
from tests.support import Daemon, can_connect, count_fds, cpu_seconds, settled_fds, wait_for_fds

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "systemd" / "primed.toml"
#: The attacker's uid, the victim's; more attackers from ATTACKERS up.
ATTACKER, VICTIM = 61001, 61002
ATTACKERS = 61010
#: The two configurations the issue names: no config file at all, and the shipped one.
CONFIGS = ("none", "shipped")
#: A victim request unanswered for this long counts as failed.
VICTIM_TIMEOUT = 5.0
#: The stated bound on the victim's p99 under attack: 10x its baseline p99 plus 20 ms
#: (generous: 2 cores shared by the daemon, the attackers, the victim and other jobs).
P99_FACTOR, P99_SLACK_MS = 10.0, 20.0
#: VmRSS the daemon may keep above its baseline once the attacker has gone.
RSS_MARGIN_KIB = 16 * 1024
XR24 = 0x34325258


# --- the daemon, as its own uid -----------------------------------------------------------


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_CAPBSET_DROP = 24
_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE = 21, 24


def limited(nofile: int | None, drop_caps: bool = False) -> Callable[[], None]:
    """A preexec_fn: set RLIMIT_NOFILE (root may raise it) and, with ``drop_caps``, drop
    CAP_SYS_ADMIN and CAP_SYS_RESOURCE from the bounding set (so root's exec lacks them)."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if drop_caps:
            for cap in (_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE):
                if _LIBC.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return limit


def become(uid: int) -> None:
    """Switch this process to ``uid`` (and its gid), with no supplementary groups."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


@contextmanager
def open_folder() -> Iterator[Path]:
    """A folder every uid may traverse, for the daemon's socket and config file."""
    assert os.getuid() == 0, "the adversarial suite runs as root, to switch uids"
    folder = Path(tempfile.mkdtemp(prefix="primed-adv-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def config_args(config: str, folder: Path, access: str = "") -> list[str]:
    """Serve arguments for ``config`` ("none" or "shipped"); ``access`` (TOML lines for
    the [access] table) needs a file, which for "none" holds those lines alone."""
    if config == "none" and not access:
        return []
    text = f"[access]\n{access}\n" if config == "none" else SHIPPED.read_text()
    if config == "shipped" and access:
        assert "\n[access]\n" in text, "the shipped file has no [access] table"
        text = text.replace("\n[access]\n", f"\n[access]\n{access}\n", 1)
    path = folder / "primed.toml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return ["--config", str(path)]


def serve_as(
    folder: Path,
    *args: str,
    nofile: int = 2048,
    timeout: float = 15.0,
) -> Daemon:
    """``primed serve ARGS``, with RLIMIT_NOFILE ``nofile`` and without the capabilities
    that lift the kernel's limits, on a socket of mode 666 in ``folder``; returns a
    tests.support.Daemon once it accepts clients."""
    path = str(folder / "primed.sock")
    log = tempfile.TemporaryFile()  # noqa: SIM115 (the Daemon closes it)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "primed", "serve", *args, "--socket", path,
             "--socket-mode", "666"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            preexec_fn=limited(nofile, drop_caps=True),  # noqa: PLW1509 (no threads here)
        )  # fmt: skip
    except BaseException:
        log.close()
        raise
    daemon = Daemon(process, path, log)
    deadline = time.monotonic() + timeout
    while not can_connect(path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"daemon did not start ({process.poll()}):\n{daemon.kill()}")
        time.sleep(0.01)
    return daemon


# --- workers ------------------------------------------------------------------------------


class Worker:
    """A victim or attacker process of ``uid``, driven by JSON lines."""

    def __init__(self, uid: int, *argv: str, nofile: int = 4096):
        self.uid = uid
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.adversary", str(uid), *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            preexec_fn=limited(nofile),  # noqa: PLW1509 (no threads here)
        )  # fmt: skip

    def send(self, **command: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def answer(self, timeout: float = 120.0) -> dict[str, Any]:
        """The next JSON line; fails with the worker's stderr if none comes in time."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            if self.process.poll() is None:
                self.process.kill()
            _, err = self.process.communicate()
            raise AssertionError(
                f"worker of uid {self.uid} gave no answer in {timeout} s "
                f"(exit {self.process.returncode}):\n{err[-3000:]}"
            )
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, timeout: float = 120.0, **command: object) -> dict[str, Any]:
        self.send(**command)
        return self.answer(timeout)

    def finish(self, timeout: float = 60.0) -> None:
        """Close its stdin (it leaves, closing everything) and wait for it."""
        if self.process.poll() is None:
            try:
                self.process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def victim(path: str) -> Worker:
    return Worker(VICTIM, "victim", path, str(VICTIM_TIMEOUT))


def attacker(
    mode: str, path: str, uid: int = ATTACKER, nofile: int = 8192, **args: object
) -> Worker:
    return Worker(uid, "attack", mode, path, json.dumps(args), nofile=nofile)


# --- what a run found ---------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


class Verdict:
    """The checks of one attack: each noted (passed or not) before any is asserted, so
    that the report shows a failing attack's figures too."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failed.append(what)

    def result(self) -> str:
        return "passed" if not self.failed else "FAILED: " + "; ".join(self.failed)

    def assert_passed(self) -> None:
        assert not self.failed, "\n".join(self.failed)


def judge_victim(verdict: Verdict, baseline: dict[str, Any], attacked: dict[str, Any]) -> str:
    """Check the victim's phases: no error at all, p99 within the bound; a summary."""
    for phase in (baseline, attacked):
        if phase["failed"]:
            shown = "; ".join(f"{n}x {e}" for e, n in list(phase["errors"].items())[:4])
            verdict.check(
                False, f"{phase['failed']} victim request(s) failed ({phase['phase']}): {shown}"
            )
    verdict.check(attacked["rounds"] > 0, "the victim completed no round under attack")
    b99, a99 = baseline["p99_ms"], attacked["p99_ms"]
    bound = P99_FACTOR * b99 + P99_SLACK_MS
    verdict.check(
        a99 <= bound,
        f"victim p99 {a99:.1f} ms under attack, over the bound {bound:.1f} ms "
        f"({P99_FACTOR:g}x baseline {b99:.1f} ms + {P99_SLACK_MS:g} ms)",
    )
    return (
        f"{baseline['p50_ms']:.2f}/{b99:.2f} -> {attacked['p50_ms']:.2f}/{a99:.2f} ms "
        f"(bound {bound:.1f} ms; {baseline['requests']}, {attacked['requests']} requests)"
    )


# --- one attack, start to end -------------------------------------------------------------

#: Victim rounds per phase (each about six requests), and the phase's time bound.
ROUNDS_REDUCED, ROUNDS_FULL, PHASE_SECONDS = 120, 400, 12.0


def _stats(path: str) -> protocol.Statistics:
    with primed.connect(path, name="adversarial stats", timeout=10) as client:
        return client.stats()


def run_attack(
    daemon: Daemon,
    verdict: Verdict,
    start: Callable[[Worker], list[Worker]],
    rounds: int,
    *,
    before: Callable[[], None] | None = None,
    during: Callable[[], None] | None = None,
    after: Callable[[Worker], None] | None = None,
    leave_wait: float = 60.0,
) -> dict[str, Any]:
    """Baseline the victim, start the attackers (``start(victim)`` returns them; each
    then says it is ready), run ``before``, then the victim's attacked phase (``during``
    runs as it starts; ``after(victim)`` once it is over, the attackers still there),
    let the attackers finish and go, then check that the daemon's fds come back to
    their baseline and its VmRSS to within RSS_MARGIN_KIB of it."""
    base_fds = settled_fds(daemon.pid)
    base_rss = vm_rss_kib(daemon.pid)
    worker = victim(daemon.socket)
    attackers: list[Worker] = []
    found: dict[str, Any] = {}
    try:
        found["baseline"] = worker.ask(
            op="rounds", n=rounds, seconds=PHASE_SECONDS, phase="baseline"
        )
        attackers = start(worker)
        found["ready"] = [a.answer(timeout=300) for a in attackers]
        if before is not None:
            before()
        cpu, since = cpu_seconds(daemon.pid), time.monotonic()
        worker.send(op="rounds", n=rounds, seconds=PHASE_SECONDS, phase="attack")
        if during is not None:
            during()
        found["attack"] = worker.answer(timeout=PHASE_SECONDS + 60)
        found["attack_cpu"] = (cpu_seconds(daemon.pid) - cpu) / (time.monotonic() - since)
        if after is not None:
            after(worker)
        found["peak_fds"] = count_fds(daemon.pid)  # the attack goes on: no settling
        found["peak_rss"] = vm_rss_kib(daemon.pid)
        for a in attackers:
            a.send(op="go")
        found["end"] = [a.answer(timeout=leave_wait + 60) for a in attackers]
    finally:
        for a in attackers:
            a.finish()
        worker.finish()
    found["victim"] = judge_victim(verdict, found["baseline"], found["attack"])
    try:
        deadline = time.monotonic() + leave_wait
        while (now := _stats(daemon.socket)).clients > 1 or now.buffers or now.tokens:
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon still holds {now} after the attack")
            time.sleep(0.1)
        wait_for_fds(daemon.pid, base_fds, timeout=leave_wait)
    except (AssertionError, OSError, ServerError) as e:
        verdict.check(False, f"not back to baseline ({base_fds} fds): {str(e)[:300]}")
    found["fds"] = (base_fds, found.get("peak_fds"), count_fds(daemon.pid))
    found["rss_kib"] = (base_rss, found.get("peak_rss"), vm_rss_kib(daemon.pid))
    verdict.check(
        found["rss_kib"][2] <= base_rss + RSS_MARGIN_KIB,
        f"daemon VmRSS {found['rss_kib'][2] / 1024:.0f} MiB after the attack, over its "
        f"baseline {base_rss / 1024:.0f} MiB + {RSS_MARGIN_KIB // 1024} MiB",
    )
    verdict.check("internal error" not in daemon.log(), "the daemon logged an internal error")
    return found


def figures(found: dict[str, Any]) -> dict[str, object]:
    """What a row of the report shows beside the verdict."""
    b, a = found["baseline"], found["attack"]
    fds, rss = found["fds"], found["rss_kib"]
    return {
        "victim errors": b["failed"] + a["failed"],
        "victim requests": b["requests"] + a["requests"],
        "daemon CPU under attack": f"{found['attack_cpu']:.0%}",
        "daemon fds": f"{fds[0]} -> {fds[1]} -> {fds[2]}",
        "daemon VmRSS MiB": f"{rss[0] / 1024:.0f} -> {rss[1] / 1024:.0f} -> {rss[2] / 1024:.0f}",
    }


def hellos_of(found: dict[str, Any]) -> dict[str, int]:
    """What every attacker's connections were told at HELLO, added up."""
    hellos: Counter[str] = Counter()
    for ready in found["ready"]:
        hellos.update(ready["hellos"])
    return dict(hellos)


# --- the victim ---------------------------------------------------------------------------


def _describe(e: BaseException) -> str:
    if isinstance(e, ServerError):
        name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else ""
        return " ".join(part for part in (e.code.name, name, e.text) if part)
    return f"{type(e).__name__}: {e}"


class _Counted(Exception):
    """A failure already counted among the victim's errors."""


def _victim(path: str, timeout: float) -> None:
    """Rounds of work on demand: each connects afresh, allocates, paints, shares once,
    opens from its long-lived connection, reads back, queries and releases, every
    request timed; errors are counted, never raised."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no connection in {timeout} s")

    # A connect() that waits for room in a full backlog has no timeout of its own.
    signal.signal(signal.SIGALRM, expire)

    def connect(name: str) -> primed.Client:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return primed.connect(path, name=name, timeout=timeout)
        except OSError as e:
            if e.errno is None:  # our alarm, renamed by connect()
                raise TimeoutError(f"connect() waited {timeout} s for the backlog") from None
            raise
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    home: primed.Client | None = None
    anchor: primed.Buffer | None = None  # home's, while home lives
    kept: list[primed.Buffer] = []
    latencies: list[float] = []
    step = "connect"

    def timed(what: str, call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        nonlocal step
        step = what
        started = time.perf_counter()
        result = call(*args, **kw)
        latencies.append(time.perf_counter() - started)
        return result

    errors: list[str] = []

    def opened(client: primed.Client, token: str) -> primed.Buffer:
        """OPEN_SHARED of a ONCE token; if it fails, once more: PROTOCOL.md says an
        open that failed leaves the token unspent (both failures are counted)."""
        try:
            return timed("open_shared", client.open_shared, token)  # type: ignore[no-any-return]
        except ServerError as e:
            errors.append(f"open_shared: {_describe(e)}")
            try:
                return client.open_shared(token)
            except ServerError as again:
                errors.append(f"open_shared again, after a failed open: {_describe(again)}")
                raise _Counted from again

    for line in sys.stdin:
        command = json.loads(line)
        latencies.clear()
        errors.clear()
        done = 0
        if command["op"] == "rounds":
            end = time.monotonic() + command["seconds"]
            while done < command["n"] and time.monotonic() < end:
                step = "connect"
                try:
                    if home is None:
                        home = timed("connect", connect, "victim")
                    if anchor is None:
                        anchor = timed("allocate", home.allocate, 64, 64, "XR24")
                        with anchor.map() as pixels:
                            pixels[:6] = b"anchor"
                    fresh = timed("connect", connect, "victim round")
                    with fresh:
                        # A buffer held since the phase began, shared once and opened
                        # before anything new is allocated.
                        token = timed("share", home.share, anchor, once=True)
                        with opened(fresh, token) as other, other.map(write=False) as pixels:
                            assert bytes(pixels[:6]) == b"anchor", "the anchor lost its data"
                        buf = timed("allocate", fresh.allocate, 64, 64, "XR24")
                        mark = (done + 1).to_bytes(8, "little")
                        with buf.map() as pixels:
                            pixels[:8] = mark
                        token = timed("share", fresh.share, buf, once=True)
                        with opened(home, token) as other, other.map(write=False) as pixels:
                            assert bytes(pixels[:8]) == mark, "the shared buffer lost its paint"
                        used = timed("query", fresh.query).used_buffers
                        assert used == 1, f"query: {used} buffers held, 1 expected"
                        assert timed("release", fresh.release, buf) == 1
                    done += 1
                except Exception as e:  # counted: the test says which and how many
                    if not isinstance(e, _Counted):
                        errors.append(f"{step}: {_describe(e)}")
                    if isinstance(e, ServerError | _Counted):  # answers: the connection is sound
                        time.sleep(0.01)
                        continue
                    if anchor is not None:
                        anchor.close()
                        anchor = None
                    if home is not None:
                        home.close()
                        home = None
                    time.sleep(0.01)  # a failed round is not retried in a tight loop
        elif command["op"] == "share_out":  # buffers kept, shared with command["uid"]
            if home is None:
                home = connect("victim")
            tokens = []
            for n in range(command["n"]):
                buf = home.allocate(64, 64, "XR24")
                kept.append(buf)
                os.pwrite(buf.fd, n.to_bytes(8, "little"), 0)
                tokens.append(home.share(buf, uids=[command["uid"]]))
            print(json.dumps({"tokens": tokens}), flush=True)
            continue
        elif command["op"] == "check_kept":  # the owner's fds still write at offset 0
            for n, buf in enumerate(kept):
                flags = fcntl.fcntl(buf.fd, fcntl.F_GETFL)
                if flags & (os.O_APPEND | os.O_NONBLOCK):
                    errors.append(f"buffer {buf.id}: flags {flags:#o} on the owner's fd")
                try:
                    os.pwrite(buf.fd, b"owner", 0)
                    if os.pread(buf.fd, 5, 0) != b"owner":
                        errors.append(f"buffer {buf.id}: pwrite at 0 did not land at 0")
                except OSError as e:
                    errors.append(f"buffer {buf.id}: pwrite: {_describe(e)}")
                done = n + 1
        ms = [x * 1e3 for x in latencies]
        print(json.dumps({
            "phase": command.get("phase", command["op"]), "rounds": done, "requests": len(ms),
            "errors": dict(Counter(errors).most_common(20)), "failed": len(errors),
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms, default=0.0),
        }), flush=True)  # fmt: skip
    for buf in kept:
        buf.close()
    if anchor is not None:
        anchor.close()
    if home is not None:
        home.close()


# --- attackers ----------------------------------------------------------------------------


def _raw(path: str, hello: bool = True, timeout: float = 2.0) -> tuple[socket.socket, str]:
    """A raw connection (and, if ``hello``, what the HELLO got: "Welcome" or an error).

    While the daemon's backlog is full a connect() fails at once with EAGAIN: it is
    tried again until ``timeout``, then TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except BlockingIOError:
                sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the backlog stayed full for {timeout} s") from None
                time.sleep(0.005)
                continue
            if not hello:
                return sock, "connected"
            try:
                sock.send(protocol.encode(protocol.Hello(VERSION, VERSION, "attacker"), 1))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused at once: what it was told is there to read
            return sock, _read(sock)
        except BaseException:
            sock.close()
            raise


def _read(sock: socket.socket) -> str:
    """One reply's kind ("Welcome", "error LIMIT_EXCEEDED ...", "hung up"); fds closed."""
    try:
        data, fds = fdpass.recv(sock)
    except (ConnectionResetError, fdpass.Truncated):
        return "hung up"
    fdpass.close_fds(fds)
    if not data:
        return "hung up"
    _, reply = protocol.decode(data, len(fds), "reply")
    if isinstance(reply, protocol.Error):
        return f"error {ErrorCode(reply.code).name}: {reply.text}"
    return type(reply).__name__ + (f" +{len(fds)} fds" if fds else "")


def _drain(socks: Sequence[socket.socket], seconds: float) -> dict[str, Any]:
    """Read what every socket gets, waiting up to ``seconds`` for each to hang up:
    replies by kind (errors by code and serial), fds, hang-ups, and a few error texts."""
    seen: Counter[str] = Counter()
    texts: set[str] = set()
    live = {s.fileno(): s for s in socks}
    poller = select.poll()  # select() takes no fd past 1023
    for fd in live:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + seconds
    while live and time.monotonic() < deadline:
        wait = min(0.5, max(0.0, deadline - time.monotonic()))
        for fd, _ in poller.poll(wait * 1000):
            try:
                data, fds = fdpass.recv(live[fd])
            except ConnectionResetError:
                # The daemon closed its end with requests of ours unread; what it had
                # sent is still queued here, and comes next.
                seen["reset"] += 1
                continue
            except (BlockingIOError, TimeoutError, fdpass.Truncated):
                data, fds = b"", []
            seen["fds"] += len(fds)
            fdpass.close_fds(fds)
            if not data:
                del live[fd]
                poller.unregister(fd)
                seen["hung up"] += 1
                continue
            serial, reply = protocol.decode(data, len(fds), "reply")
            name = type(reply).__name__
            if isinstance(reply, protocol.Error):
                name = f"error {ErrorCode(reply.code).name}" + (" (serial 0)" if not serial else "")
                if len(texts) < 4:
                    texts.add(reply.text)
            seen[name] += 1
    seen["still open"] = len(live)
    return {"seen": seen, "texts": sorted(texts)}


def _wait_line() -> bool:
    """Block until the test's next line; False once stdin has closed."""
    return bool(sys.stdin.readline())


def _attack(mode: str, path: str, args: dict[str, Any]) -> None:
    held: list[Any] = []  # every connection and buffer, closed when the attacker leaves
    out: dict[str, Any] = {}
    try:
        if mode == "in_flight":
            # One buffer shared with everyone; many connections each ask for it
            # args["opens"] times and never read: the daemon's fds queue in their sockets.
            owner = primed.connect(path, name="attacker owner")
            held.append(owner)
            token = bytes.fromhex(owner.share(owner.allocate(16, 16, "XR24")))
            hellos: Counter[str] = Counter()
            for _ in range(args["connections"]):
                try:
                    sock, got = _raw(path)
                except OSError as e:
                    hellos[f"connect: {_describe(e)}"] += 1
                    break
                held.append(sock)
                hellos[got.split(":")[0]] += 1
                if got != "Welcome":
                    continue
                try:
                    for serial in range(2, 2 + args["opens"]):
                        sock.send(protocol.encode(protocol.OpenShared(token), serial))
                except OSError as e:  # our socket full, or hung up on
                    hellos[f"send: {_describe(e)}"] += 1
            out["hellos"] = hellos
            print(json.dumps(out), flush=True)
            _wait_line()
            socks = [s for s in held if isinstance(s, socket.socket)]
            out["drained"] = _drain(socks, 0.5)
        elif mode == "idle":
            # Connections that never say HELLO, as many as connect() allows.
            made = 0
            stopped = ""
            started = time.monotonic()
            for _ in range(args["connections"]):
                try:
                    sock, _ = _raw(path, hello=False, timeout=3.0)
                except OSError as e:
                    stopped = _describe(e)
                    break
                held.append(sock)
                made += 1
            out.update(made=made, stopped=stopped, seconds=round(time.monotonic() - started, 2))
            print(json.dumps(out), flush=True)
            _wait_line()
            started = time.monotonic()
            out["ended"] = _drain([s for s in held if isinstance(s, socket.socket)], args["wait"])
            out["waited"] = round(time.monotonic() - started, 2)
        elif mode == "tokens":
            # Each connection shares one buffer as often as the daemon lets it, every
            # token naming 64 uids.
            uids = list(range(70000, 70064))
            made = 0
            stops: Counter[str] = Counter()
            for n in range(args["connections"]):
                try:
                    client = primed.connect(path, name=f"tokens {n}", timeout=10)
                except (OSError, ServerError) as e:
                    stops[f"connect: {_describe(e)}"] += 1
                    break
                held.append(client)
                try:
                    buf = client.allocate(16, 16, "XR24")
                    for _ in range(args["per_connection"]):
                        client.share(buf, uids=uids)
                        made += 1
                except ServerError as e:
                    stops[_describe(e)] += 1
            out.update(tokens=made, stops=stops)
            print(json.dumps(out), flush=True)
            _wait_line()
        elif mode == "stall":
            # Connections with ~40 replies unread and an OPEN_SHARED the daemon must hold
            # back; they never read.
            owner = primed.connect(path, name="staller owner")
            held.append(owner)
            token = bytes.fromhex(owner.share(owner.allocate(16, 16, "XR24")))
            hellos = Counter()
            for _ in range(args["connections"]):
                try:
                    sock, got = _raw(path)
                except OSError as e:
                    hellos[f"connect: {_describe(e)}"] += 1
                    break
                held.append(sock)
                hellos[got.split(":")[0]] += 1
                if got != "Welcome":
                    continue
                try:
                    for serial in range(2, 42):
                        sock.send(protocol.encode(protocol.Query(), serial))
                    sock.send(protocol.encode(protocol.OpenShared(token), 42))
                except OSError as e:
                    hellos[f"send: {_describe(e)}"] += 1
            out["hellos"] = hellos
            print(json.dumps(out), flush=True)
            _wait_line()
        elif mode == "list":
            # Many buffers on one connection, then LISTs of them kept in flight.
            sock, got = _raw(path, timeout=60)
            held.append(sock)
            assert got == "Welcome", got
            count = 0
            stopped = ""
            serial = 2
            batch = 1000  # then one at a time, to take all that a quota allows
            while count < args["buffers"] and not stopped:
                ask = min(batch, args["buffers"] - count)
                sock.send(protocol.encode(protocol.Allocate(1, 1, XR24, ask), serial))
                serial += 1
                while True:
                    data, fds = fdpass.recv(sock)
                    fdpass.close_fds(fds)
                    _, reply = protocol.decode(data, len(fds), "reply")
                    if isinstance(reply, protocol.Error):
                        if batch == 1:
                            stopped = f"{ErrorCode(reply.code).name}: {reply.text}"
                        batch = 1
                        break
                    assert isinstance(reply, protocol.Allocated), reply
                    count += len(reply.buffers)
                    if reply.index + len(reply.buffers) >= reply.total:
                        break
            out.update(held=count, stopped=stopped)
            print(json.dumps(out), flush=True)
            lists = 0
            in_flight = 0
            sock.settimeout(30)
            cursor = 0  # where the last page said the next starts: every page is asked for
            while not select.select([sys.stdin], [], [], 0)[0]:
                while in_flight < args["in_flight"]:
                    sock.send(protocol.encode(protocol.List(protocol.LIST_BUFFERS, cursor), serial))
                    serial += 1
                    in_flight += 1
                data, fds = fdpass.recv(sock)
                fdpass.close_fds(fds)
                _, reply = protocol.decode(data, len(fds), "reply")
                if isinstance(reply, protocol.Listed):
                    cursor = reply.next
                in_flight -= 1
                lists += 1
            sys.stdin.readline()
            out["lists"] = lists
        elif mode == "tiny":
            # 1x1 buffers, on up to args["connections"] connections, until refused.
            count = 0
            stops = Counter()
            for n in range(args["connections"]):
                try:
                    client = primed.connect(path, name=f"tiny {n}", timeout=10)
                except (OSError, ServerError) as e:
                    stops[f"connect: {_describe(e)}"] += 1
                    break
                held.append(client)
                batch = 64  # then one at a time: the attack is to take the last fds too
                while count < args["limit"]:
                    try:
                        for buf in client.allocate_many(1, 1, "XR24", batch):
                            buf.close()  # our fd only: the daemon's stays, and its id ours
                        count += batch
                    except ServerError as e:
                        if batch == 1:
                            stops[_describe(e)] += 1
                            break
                        batch = 1
                if count >= args["limit"]:
                    break
            out.update(held=count, stops=stops)
            print(json.dumps(out), flush=True)
            _wait_line()
        elif mode == "churn":
            # Connections that each keep a costly request in flight: an ALLOCATE of
            # args["count"] 1x1 buffers, then their RELEASE, then again, until told to go.
            churning: list[socket.socket] = []
            hellos = Counter()
            for _ in range(args["connections"]):
                sock, got = _raw(path, timeout=10)
                held.append(sock)
                hellos[got.split(":")[0]] += 1
                if got == "Welcome":
                    churning.append(sock)
            out["hellos"] = hellos
            print(json.dumps(out), flush=True)
            ask = protocol.encode(protocol.Allocate(1, 1, XR24, args["count"]), 2)
            ids: dict[int, list[int]] = {}  # per socket: the ids of the batch being delivered
            for sock in churning:
                sock.send(ask)
                ids[sock.fileno()] = []
            by_fd = {s.fileno(): s for s in churning}
            poller = select.poll()
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            got_back: Counter[str] = Counter()
            while not select.select([sys.stdin], [], [], 0)[0]:
                for fd, _ in poller.poll(100):
                    sock = by_fd[fd]
                    data, fds = fdpass.recv(sock)
                    fdpass.close_fds(fds)
                    if not data:
                        poller.unregister(fd)
                        got_back["hung up"] += 1
                        continue
                    _, reply = protocol.decode(data, len(fds), "reply")
                    if isinstance(reply, protocol.Allocated):
                        ids[fd] += [b.id for b in reply.buffers]
                        if reply.index + len(reply.buffers) < reply.total:
                            continue  # more parts of this batch to come
                        sock.send(protocol.encode(protocol.Release(tuple(ids[fd])), 3))
                        ids[fd] = []
                        got_back["batches"] += 1
                    else:
                        if isinstance(reply, protocol.Error):
                            got_back[f"error {ErrorCode(reply.code).name}"] += 1
                        sock.send(ask)
            sys.stdin.readline()
            out["seen"] = got_back
        elif mode == "flags":
            # Opens each buffer the victim shared and sets O_APPEND and O_NONBLOCK on it.
            client = primed.connect(path, name="flags")
            held.append(client)
            flagged = 0
            for token in args["tokens"]:
                buf = client.open_shared(token)
                held.append(buf)
                flags = fcntl.fcntl(buf.fd, fcntl.F_GETFL)
                fcntl.fcntl(buf.fd, fcntl.F_SETFL, flags | os.O_APPEND | os.O_NONBLOCK)
                flagged += bool(fcntl.fcntl(buf.fd, fcntl.F_GETFL) & os.O_APPEND)
            out["flagged"] = flagged
            print(json.dumps(out), flush=True)
            _wait_line()
        elif mode == "hold":
            # Connections each holding a buffer; after the reload, what each is told.
            hellos = Counter()
            for _ in range(args["connections"]):
                sock, got = _raw(path)
                held.append(sock)
                hellos[got.split(":")[0]] += 1
                sock.send(protocol.encode(protocol.Allocate(16, 16, XR24, 1), 2))
                hellos[_read(sock).split(":")[0]] += 1
            out["hellos"] = hellos
            print(json.dumps(out), flush=True)
            _wait_line()
            out["told"] = _drain([s for s in held if isinstance(s, socket.socket)], args["wait"])
        elif mode == "refused":
            # Reconnect in a loop for args["seconds"]; one more try args["again"] s after
            # the start, once the log's window has passed.
            print(json.dumps({"started": True}), flush=True)
            started = time.monotonic()
            seen: Counter[str] = Counter()
            while time.monotonic() - started < args["seconds"] and sum(seen.values()) < args["max"]:
                try:
                    primed.connect(path, timeout=5).close()
                    seen["admitted"] += 1
                except ServerError as e:
                    seen[_describe(e)] += 1
            time.sleep(max(0.0, started + args["again"] - time.monotonic()))
            try:
                primed.connect(path, timeout=5).close()
                seen["admitted"] += 1
            except ServerError as e:
                seen[_describe(e)] += 1
            out.update(seen=seen, attempts=sum(seen.values()))
            _wait_line()
        else:
            raise SystemExit(f"no attack {mode!r}")
    finally:
        for thing in reversed(held):
            thing.close()
    print(json.dumps(out), flush=True)
    _wait_line()


def main(argv: list[str]) -> None:
    become(int(argv.pop(0)))
    if argv[0] == "victim":
        _victim(argv[1], float(argv[2]))
    elif argv[0] == "attack":
        _attack(argv[1], argv[2], json.loads(argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
