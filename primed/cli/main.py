"""The ``primed`` command: serve, info, alloc, devices."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import grp
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from primed import formats
from primed.client.blocking import connect
from primed.client.connection import DEFAULT_SOCKET
from primed.client.device import Device, Import
from primed.errors import ErrorCode, KernelError, PrimedError
from primed.kernel import drm, served
from primed.kernel.allocation import Allocators, DeviceRow
from primed.kernel.backends import find_dumb_node
from primed.service.config import DEFAULT_PATH as DEFAULT_CONFIG
from primed.service.config import Config
from primed.wire.schema import Opcode

#: Seconds a command waits for each answer, the daemon's WELCOME included. More than
#: the library's handshake default: a socket-activated daemon may take seconds to start
#: on a slow machine, and a person at a prompt would rather wait than be told to retry.
CLI_TIMEOUT = 30.0

log = logging.getLogger("primed")


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1920x1080, not {text!r}")
    return int(width), int(height)


def _octal(text: str) -> int:
    return int(text, 8)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="primed",
        description="Allocate DRM dumb buffers in a daemon and share them as PRIME fds.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    socket_help = f"the daemon's socket (default: $PRIMED_SOCKET, else {DEFAULT_SOCKET})"

    # Every flag but --config overrides the file's key of the same name; None: not given.
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument(
        "--config",
        metavar="PATH",
        help=f"the configuration file (default: {DEFAULT_CONFIG}, if it exists)",
    )
    serve.add_argument(
        "--device",
        action="append",
        help="a DRM card node whose dumb buffers to serve; repeat for several (default: "
        "the first that makes dumb buffers, unless --heap or --udmabuf is given)",
    )
    serve.add_argument(
        "--heap",
        action="append",
        metavar="NAME",
        help="a dma-buf heap to serve (/dev/dma_heap/NAME, e.g. system); repeat for several",
    )
    serve.add_argument(
        "--udmabuf", action="store_true", default=None, help="serve udmabuf (/dev/udmabuf)"
    )
    serve.add_argument(
        "--backend",
        choices=["drm", "memfd"],
        help="drm: the allocators above (default); memfd: sealed memfds only",
    )
    serve.add_argument("--socket", help=socket_help)
    serve.add_argument("--socket-mode", type=_octal, help="octal (default 660)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--send-timeout",
        type=float,
        metavar="SECONDS",
        help="drop a client that reads no reply for this long (default 10)",
    )
    serve.add_argument(
        "--hello-timeout",
        type=float,
        metavar="SECONDS",
        help="drop a connection that sends no HELLO for this long (default 5)",
    )
    serve.add_argument(
        "--connections-per-uid",
        type=int,
        metavar="N",
        help="connections one uid may hold open (0: no quota; default: from RLIMIT_NOFILE)",
    )
    defaults = formats.Limits()
    serve.add_argument("--max-width", type=int, help=f"default {defaults.max_width}")
    serve.add_argument("--max-height", type=int, help=f"default {defaults.max_height}")
    serve.add_argument("--max-size", type=int, help=f"per buffer (default {defaults.max_size})")
    serve.add_argument("--max-count", type=int, help=f"per request (default {defaults.max_count})")
    serve.add_argument(
        "--keep-fd-limit",
        action="store_true",
        help="keep the soft RLIMIT_NOFILE as given (the unit's LimitNOFILE= sets it) "
        "instead of raising it to the hard one",
    )

    info = commands.add_parser("info", help="what the daemon serves")
    info.add_argument("--socket", help=socket_help)
    info.add_argument("--json", action="store_true")

    alloc = commands.add_parser("alloc", help="allocate buffers and describe them")
    alloc.add_argument("size", type=_size, metavar="WIDTHxHEIGHT")
    alloc.add_argument("--format", default="XR24", help="fourcc or DRM name (default XR24)")
    alloc.add_argument("--count", type=int, default=1)
    alloc.add_argument("--import", dest="import_node", metavar="NODE", help="import on this node")
    alloc.add_argument(
        "--allocator",
        default="",
        metavar="NAME",
        help="the daemon's allocator to allocate from, as primed info lists them "
        "(default: the daemon's default; needs protocol version 2)",
    )
    alloc.add_argument("--socket", help=socket_help)
    alloc.add_argument("--json", action="store_true")

    devices = commands.add_parser("devices", help="list DRM nodes and their drivers")
    devices.add_argument("--json", action="store_true")

    listing = commands.add_parser(
        "list", help="live clients and buffers (all for root and the admin group, else yours)"
    )
    listing.add_argument("--socket", help=socket_help)
    listing.add_argument("--json", action="store_true")

    stats = commands.add_parser("stats", help="the daemon's counters and totals")
    stats.add_argument("--socket", help=socket_help)
    stats.add_argument("--json", action="store_true")

    dump = commands.add_parser("dump", help="write a buffer's pixels as a PNG")
    dump.add_argument(
        "target",
        nargs="?",
        metavar="CLIENT:ID|-",
        help="a buffer as CLIENT:ID, or - to read a share token from stdin; with neither, "
        "the token comes from --token-file or $PRIMED_TOKEN (a token here works, but "
        "every user can read it)",
    )
    dump.add_argument("--token-file", metavar="PATH", help="read the share token from PATH")
    dump.add_argument("--png", required=True, metavar="FILE")
    dump.add_argument("--socket", help=socket_help)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from primed.daemon import systemd
    from primed.daemon.policy import Policy
    from primed.daemon.server import run
    from primed.service import config as conf
    from primed.service import log as logsetup
    from primed.service import refusing

    logsetup.setup(args.log_level or "info")
    overrides = {
        key: value
        for key, flag in conf.FLAGS.items()
        if (value := getattr(args, flag[2:].replace("-", "_"))) is not None
    }
    try:
        activated = systemd.activated_listener()
    except systemd.ActivationError as e:
        log.error("%s", e)
        return 2
    # What the quotas' defaults and the bounds are cut from: the fd limit the daemon
    # will run with (run() raises the soft limit to the hard one unless told not to).
    nofile = conf.fd_limit(raised=not args.keep_fd_limit)
    while True:
        path = conf.default_path(args.config)
        try:
            config = conf.load(path, overrides, nofile=nofile)
            if config.backend == "memfd":
                given = [f for f in ("device", "heap", "udmabuf") if getattr(args, f)]
                if given:
                    log.error("--%s makes no sense with --backend memfd", given[0])
                    return 2
            logsetup.setup(config.log_level)
            backend = _open_backend(config)
            picked = backend.node  # what a reload's device may name as no change
            break
        except (PrimedError, OSError) as e:
            problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if activated is None:  # run by hand: say why and stop
                if isinstance(e, conf.ConfigError):
                    log.error("%s", e)
                    return 2
                raise
            # Socket-activated: exiting would only make systemd start primed again
            # for the waiting client, and again, until the socket unit fails. Tell
            # the clients what is wrong instead, until a reload mends it.
            log.error("%s", problem)
            if not trio.run(refusing.refuse, activated, problem):
                return 0
    log.info("configuration: %s", path or f"the defaults (there is no {conf.DEFAULT_PATH})")
    quotas, bounds = config.policy.quotas, config.policy.bounds
    log.info(
        "limits for %d fds: %d connections (%d per uid), %d buffers (%d per uid), "
        "%d tokens (%d per uid), %d fds in flight (%d per uid); 0 per uid: no quota",
        nofile,
        bounds.connections,
        quotas.connections_per_uid,
        bounds.buffers,
        quotas.buffers_per_uid,
        bounds.tokens,
        quotas.tokens_per_uid,
        bounds.fds_in_flight,
        quotas.fds_in_flight_per_uid,
    )

    def reload() -> tuple[formats.Limits, Policy]:
        new = conf.load(path or conf.default_path(None), overrides, nofile=nofile)
        # Against what runs (the configuration started with), not the last file read:
        # the warning holds on every reload until the file matches again.
        for key in conf.restart_needed(config, new, picked):
            log.warning("reload: %s changed; that takes a restart", key)
        logsetup.setup(new.log_level)
        return new.limits, new.policy

    socket = config.socket_path
    if activated is not None:
        socket = activated.getsockname()
        if config.socket is not None and config.socket != socket:
            log.info("serving the socket systemd passed, %s, not %s", socket, config.socket)
    trio.run(
        lambda: run(
            backend,
            socket,
            limits=config.limits,
            mode=config.socket_mode,
            policy=config.policy,
            reload=reload,
            activated=activated,
            send_timeout=config.send_timeout,
            hello_timeout=config.hello_timeout,
            raise_fd_limit=not args.keep_fd_limit,
        )
    )
    return 0


def _open_backend(config: Config) -> Allocators:
    """The allocators ``config`` names, opened, and the import matrix measured on them.

    Raises KernelError (NoDevice) if a node can't be opened, names one the kernel
    lacks, or (none named) no card node makes dumb buffers; ConfigError if two
    allocators would have one name.
    """
    from primed.service import config as conf

    if config.backend == "memfd":
        allocators = served.open_allocators(memfd=True)
    else:
        devices = config.devices
        if not devices and not config.heap and not config.udmabuf:
            devices = (find_dumb_node(),)
            log.info("picked %s, the first DRM node that creates dumb buffers", devices[0])
        try:
            allocators = served.open_allocators(devices, config.heap, config.udmabuf)
        except ValueError as e:  # two allocators of one name
            raise conf.ConfigError(f"{config.source or 'command line'}: {e}") from None
    try:
        allocators.matrix = served.probe_imports(allocators)
    except BaseException:
        allocators.close()
        raise
    for s in allocators.served:
        driver = s.source.driver
        log.info(
            "allocator %s: %s %d.%d.%d%s",
            s.name,
            driver.name,
            driver.major,
            driver.minor,
            driver.patch,
            f" on {s.source.node}" if s.source.node else "",
        )
    _say_unprobed(allocators.matrix.rows)
    for row in allocators.matrix.rows:
        log.info(
            "imports on %s (%s): %s",
            row.node,
            row.driver,
            ", ".join(
                f"{s.name} {_import_text(e)}"
                for s, e in zip(allocators.served, row.imports, strict=True)
            ),
        )
    return allocators


def _say_unprobed(rows: Sequence[DeviceRow], root: str = "/dev/dri") -> None:
    """Warn of each render node the import matrix leaves out, since the daemon could not
    open it: a client would otherwise see no row for its node and not know why."""
    probed = {row.node for row in rows}
    for path in sorted(glob.glob(os.path.join(root, "renderD*"))):
        if path in probed:
            continue
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            reason = e.strerror or str(e)
        else:
            reason = "not a DRM node"
        try:
            group = grp.getgrgid(os.stat(path).st_gid).gr_name
        except (OSError, KeyError):
            group = "the node's group"
        else:
            group = f"group {group}"
        log.warning(
            "import matrix: %s left out: %s; the daemon's user needs %s", path, reason, group
        )


def _import_text(err: int) -> str:
    return "ok" if not err else errno.errorcode.get(err, str(err))


def _info(args: argparse.Namespace) -> int:
    with connect(args.socket, name="primed info", timeout=CLI_TIMEOUT) as client:
        described = client.info.describe()
        if client.info.version >= 2:  # the import matrix comes with QUERY
            described["imports"] = client.query().describe()["imports"]
    if args.json:
        print(json.dumps(described))
        return 0
    print(f"backend: {described['backend']}")
    if client.info.node:
        print(f"device:  {client.info.node} ({described['driver']} {described['driver_version']})")
    print(f"protocol version: {described['version']}")
    limits = client.info.limits
    print(
        f"limits:  {limits.max_width}x{limits.max_height}, {limits.max_size} bytes per buffer, "
        f"{limits.max_count} buffers per request"
    )
    allocators: list[dict[str, Any]] = described.get("allocators", [])  # type: ignore[assignment]
    if allocators:
        print("allocators (the first is the default):")
    for a in allocators:
        node = f" on {a['node']}" if a["node"] else ""
        version = f" {a['driver_version']}" if a["kind"] == "dumb" else ""
        print(
            f"  {a['name']}: {a['kind']}, {a['driver']}{version}{node}; "
            f"usage {', '.join(a['usage'])}"
        )
    rows: list[dict[str, Any]] = described.get("imports", [])  # type: ignore[assignment]
    if allocators:
        print("imports:" if rows else "imports: no DRM render node")
    for row in rows:
        results = ", ".join(f"{name} {result}" for name, result in row["imports"].items())
        print(f"  {row['node']} ({row['driver']}): {results}")
    return 0


def _open_device(node: str) -> Device:
    """``node`` opened for imports; EACCES says which group would let this user in."""
    try:
        return Device(node)
    except KernelError as e:
        if e.errno != errno.EACCES:
            raise
        # The node's own group, as udev made it (Debian: render for renderD*, video
        # for card*); primed's socket group does not open nodes.
        try:
            group = grp.getgrgid(os.stat(node).st_gid).gr_name
        except (OSError, KeyError):
            group = "render" if os.path.basename(node).startswith("renderD") else "video"
        raise PrimedError(
            f"cannot open {node} to import on it: {os.strerror(e.errno)}; its group {group} may "
            f"open it (usermod -aG {group} USER, then log in again), or a seat's ACL "
            "(a local session); the primed group only gets buffers from the daemon"
        ) from None


def _alloc(args: argparse.Namespace) -> int:
    width, height = args.size
    imports: list[Import] = []
    device = _open_device(args.import_node) if args.import_node else None
    try:
        with connect(args.socket, name="primed alloc", timeout=CLI_TIMEOUT) as client:
            buffers = client.allocate_many(
                width, height, args.format, args.count, allocator=args.allocator
            )
            described = []
            for buffer in buffers:
                entry = buffer.describe()
                if buffer.allocator:
                    entry["allocator"] = buffer.allocator
                if device is not None:
                    imported = device.import_buffer(buffer)
                    imports.append(imported)
                    entry["handle"] = imported.handle
                described.append(entry)
                buffer.close()
    finally:
        for imported in imports:
            imported.close()
        if device is not None:
            device.close()
    if args.json:
        print(json.dumps({"buffers": described}))
        return 0
    for entry in described:
        plane_list: list[dict[str, int]] = entry["planes"]  # type: ignore[assignment]
        planes = " ".join(
            f"[{i}: offset {p['offset']} pitch {p['pitch']}]" for i, p in enumerate(plane_list)
        )
        handle = f" handle {entry['handle']}" if "handle" in entry else ""
        print(
            f"buffer {entry['id']}: {entry['width']}x{entry['height']} {entry['format']} "
            f"modifier {entry['modifier']:#x} size {entry['size']} {planes}{handle}"
        )
    return 0


def _devices(args: argparse.Namespace) -> int:
    found = drm.nodes()
    if args.json:
        print(
            json.dumps([{"path": n.path, "driver": n.driver, "primary": n.primary} for n in found])
        )
        return 0
    if not found:
        print("no DRM nodes under /dev/dri")
    for node in found:
        print(f"{node.path}\t{node.driver}\t{'primary' if node.primary else 'render'}")
    return 0


def _ms_ago(ms: int) -> str:
    seconds = ms // 1000
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _list(args: argparse.Namespace) -> int:
    with connect(args.socket, name="primed list", timeout=CLI_TIMEOUT) as client:
        clients, buffers = client.clients(), client.buffers()
    now_ms = int(time.time() * 1000)
    if args.json:
        print(
            json.dumps(
                {
                    "clients": [dataclasses.asdict(c) for c in clients],
                    "buffers": [
                        {**dataclasses.asdict(b), "format": formats.fourcc_str(b.fourcc)}
                        for b in buffers
                    ],
                }
            )
        )
        return 0
    print(
        f"{'CLIENT':>6} {'PID':>7} {'UID':>6} {'BUFFERS':>7} {'BYTES':>12} {'CONNECTED':>10}  NAME"
    )
    for c in clients:
        print(
            f"{c.number:>6} {c.pid:>7} {c.uid:>6} {c.buffers:>7} {c.held_bytes:>12} "
            f"{_ms_ago(now_ms - c.since_ms):>10}  {c.name}"
        )
    print()
    print(f"{'BUFFER':>10} {'SIZE':>11} {'FORMAT':>6} {'BYTES':>12} {'AGE':>10} {'TOKENS':>6}")
    for b in buffers:
        size = f"{b.width}x{b.height}"
        print(
            f"{f'{b.client}:{b.id}':>10} {size:>11} {formats.fourcc_str(b.fourcc):>6} "
            f"{b.size:>12} {_ms_ago(b.age_ms):>10} {b.tokens:>6}"
        )
    return 0


def _stats(args: argparse.Namespace) -> int:
    with connect(args.socket, name="primed stats", timeout=CLI_TIMEOUT) as client:
        stats = client.stats()
    names = (
        {op.value: op.name for op in Opcode},
        {code.value: code.name for code in ErrorCode},
        {1: "bad_messages", 2: "refused"},
    )
    requests, errors, events = (
        {names[i].get(k, str(k)): n for kind, k, n in stats.counters if kind == i + 1}
        for i in range(3)
    )
    summary = {
        "uptime_s": stats.uptime_ms / 1000,
        "clients": stats.clients,
        "buffers": stats.buffers,
        "bytes": stats.held_bytes,
        "tokens": stats.tokens,
        "requests": requests,
        "errors": errors,
        **events,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"uptime:  {_ms_ago(stats.uptime_ms)}")
    print(
        f"held:    {stats.clients} client(s), {stats.buffers} buffer(s), {stats.held_bytes} bytes"
    )
    print(f"tokens:  {stats.tokens}")
    print("requests: " + (", ".join(f"{k} {v}" for k, v in requests.items()) or "none"))
    print("errors:   " + (", ".join(f"{k} {v}" for k, v in errors.items()) or "none"))
    print("events:   " + ", ".join(f"{k} {v}" for k, v in events.items()))
    return 0


#: Said when a share token is given on the command line, where it is no secret.
ARGV_TOKEN_WARNING = (
    "primed dump: warning: a token on the command line can be read by every user "
    "(/proc/PID/cmdline) and may stay in shell history; pass - and the token on stdin, "
    "--token-file PATH or $PRIMED_TOKEN instead"
)


def _dump_target(args: argparse.Namespace) -> tuple[int, int] | str:
    """What ``primed dump`` is to open: (client, id), or a share token's text.

    The token comes from exactly one place: stdin (target ``-``), --token-file, the
    command line (with a warning), or else $PRIMED_TOKEN. Raises ValueError if it
    comes from two, or from none.
    """
    target: str | None = args.target
    if target is not None and target != "-":
        client_number, sep, ident = target.partition(":")
        if sep:
            if args.token_file is not None:
                raise ValueError("give CLIENT:ID or --token-file, not both")
            return int(client_number), int(ident)
    if target is not None and args.token_file is not None:
        raise ValueError("give the token once: on stdin (-), in --token-file, or in $PRIMED_TOKEN")
    if target == "-":
        return sys.stdin.readline().strip()
    if args.token_file is not None:
        with open(args.token_file, encoding="ascii") as f:
            return f.readline().strip()
    if target is not None:
        # Still accepted (scripts rely on it, and a token is revocable and may be
        # once-only), but the user should know it is on display to everyone.
        print(ARGV_TOKEN_WARNING, file=sys.stderr)
        return target
    token = os.environ.get("PRIMED_TOKEN")
    if not token:
        raise ValueError(
            "no buffer given: CLIENT:ID, - (token on stdin), --token-file or $PRIMED_TOKEN"
        )
    return token.strip()


def _dump(args: argparse.Namespace) -> int:
    from primed.cli import png

    target = _dump_target(args)  # before connecting: a bad invocation costs the daemon nothing
    with connect(args.socket, name="primed dump", timeout=CLI_TIMEOUT) as client:
        if isinstance(target, tuple):
            buffer = client.open_buffer(*target)
        else:
            buffer = client.open_shared(target)
    with buffer, buffer.map(write=False) as pixels:
        planes = tuple((p.offset, p.pitch) for p in buffer.planes)
        image = png.from_pixels(pixels, buffer.width, buffer.height, buffer.fourcc, planes)
    with open(args.png, "wb") as out:
        out.write(image)
    print(f"wrote {args.png}: {buffer.width}x{buffer.height} {buffer.format}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "serve": _serve,
        "info": _info,
        "alloc": _alloc,
        "devices": _devices,
        "list": _list,
        "stats": _stats,
        "dump": _dump,
    }[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (PrimedError, OSError, ValueError) as e:
        # A KernelError's strerror names the call and the node, and says the errno.
        shown = e.strerror if isinstance(e, KernelError) else e
        print(f"primed {args.command}: {shown}", file=sys.stderr)
        return 1
