"""The daemon's configuration: a TOML file, checked key by key, and command-line overrides.

``systemd/primed.toml`` documents every key. :func:`load` reads a file (or
none: every key has a default), lays the command line's overrides over it, and
returns a :class:`Config`, or raises :class:`ConfigError` naming the file and
the key at fault. Nothing else in the daemon reads the file.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import resource
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from primed.client.connection import socket_path
from primed.daemon.policy import Bounds, Policy, Quotas
from primed.errors import PrimedError
from primed.formats import Limits

#: Read when ``serve`` is given no ``--config`` and the file exists.
DEFAULT_PATH = "/etc/primed/primed.toml"

BACKENDS = ("drm", "memfd")
LOG_LEVELS = ("debug", "info", "warning", "error")

_U32 = (1 << 32) - 1
_U63 = (1 << 63) - 1


class ConfigError(PrimedError, ValueError):
    """The configuration is unusable; the message names where and which key."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """Everything ``primed serve`` is told, from the file and the command line."""

    #: A card node, or several (their dumb buffers are allocators, the first the
    #: default). None: the first card node that makes dumb buffers, unless a heap or
    #: udmabuf is named.
    device: str | tuple[str, ...] | None = None
    backend: str = "drm"
    heap: tuple[str, ...] = ()  #: dma-buf heaps to serve, by name (e.g. "system")
    udmabuf: bool = False  #: serve udmabuf (/dev/udmabuf)
    socket: str | None = None  #: None: $PRIMED_SOCKET, else /run/primed/primed.sock
    socket_mode: int = 0o660
    log_level: str = "info"
    send_timeout: float = 10.0  #: seconds a reply may wait for a client that does not read
    hello_timeout: float = 5.0  #: seconds a new connection has to send HELLO
    limits: Limits = dataclasses.field(default_factory=Limits)
    policy: Policy = dataclasses.field(default_factory=Policy)
    source: str | None = None  #: the file read, if any
    nofile: int = 0  #: the RLIMIT_NOFILE the default quotas and the bounds were cut from

    @property
    def socket_path(self) -> str:
        return socket_path(self.socket)

    @property
    def devices(self) -> tuple[str, ...]:
        """The card nodes named, in order (none if ``device`` is None)."""
        if self.device is None:
            return ()
        return (self.device,) if isinstance(self.device, str) else self.device


#: Keys a reload cannot change: they take effect when the daemon restarts.
RESTART_KEYS = (
    "device",
    "backend",
    "heap",
    "udmabuf",
    "socket",
    "socket_mode",
    "send_timeout",
    "hello_timeout",
)

#: The command-line flag that overrides each key.
FLAGS = {
    "device": "--device",
    "backend": "--backend",
    "heap": "--heap",
    "udmabuf": "--udmabuf",
    "socket": "--socket",
    "socket_mode": "--socket-mode",
    "log_level": "--log-level",
    "send_timeout": "--send-timeout",
    "hello_timeout": "--hello-timeout",
    "limits.max_width": "--max-width",
    "limits.max_height": "--max-height",
    "limits.max_size": "--max-size",
    "limits.max_count": "--max-count",
    "quotas.connections_per_uid": "--connections-per-uid",
}

_TABLES = ("access", "limits", "quotas")


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_describe(value)}")
    return value


def _strings(key: str, value: object) -> tuple[str, ...]:
    """A non-empty string, or a non-empty array of them with no repeats, as a tuple."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ValueError(f"expected a non-empty string or an array of them, got {_describe(value)}")
    twice = next((item for i, item in enumerate(items) if item in items[:i]), None)
    if twice is not None:
        raise ValueError(f"{twice!r} is named twice")
    return tuple(str(item) for item in items)


def _devices(key: str, value: object) -> str | tuple[str, ...]:
    """One card node as a string, several as a tuple."""
    paths = _strings(key, value)
    return paths[0] if len(paths) == 1 else paths


def _heaps(key: str, value: object) -> tuple[str, ...]:
    """A heap's name, or an array of them (empty: none)."""
    if value == []:
        return ()
    names = _strings(key, value)
    for name in names:
        if "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a heap name (as under /dev/dma_heap)")
    return names


def _boolean(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def convert(key: str, value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {_describe(value)}")
        return str(value)

    return convert


def _integer(low: int, high: int) -> Callable[[str, object], int]:
    def convert(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if not low <= value <= high:
            raise ValueError(f"{value} is not within {low}..{high}")
        return value

    return convert


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BYTES = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def _bytes(low: int, high: int) -> Callable[[str, object], int]:
    check = _integer(low, high)

    def convert(key: str, value: object) -> int:
        if isinstance(value, str):
            found = _BYTES.fullmatch(value)
            if found is None:
                raise ValueError(f'expected bytes, e.g. 1048576 or "64M", got {value!r}')
            value = int(found[1]) * _UNITS[found[2].upper()]
        return check(key, value)

    return convert


def _seconds(low: float, high: float) -> Callable[[str, object], float]:
    def convert(key: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected seconds, got {_describe(value)}")
        if not low <= value <= high:
            raise ValueError(f"{value} is not within {low:g}..{high:g}")
        return float(value)

    return convert


def _mode(key: str, value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError(f'expected permissions such as 0o660 or "0660", got {_describe(value)}')


def _uid(name: object) -> int:
    if isinstance(name, str):
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            raise ValueError(f"no user named {name!r}") from None
    return _integer(0, _U32 - 1)("", name)


def _gid(name: object) -> int:
    if isinstance(name, str):
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise ValueError(f"no group named {name!r}") from None
    return _integer(0, _U32 - 1)("", name)


def _ids(resolve: Callable[[object], int]) -> Callable[[str, object], frozenset[int]]:
    def convert(key: str, value: object) -> frozenset[int]:
        if not isinstance(value, list):
            raise ValueError(f"expected an array of names or numbers, got {_describe(value)}")
        return frozenset(resolve(item) for item in value)

    return convert


def _one_id(resolve: Callable[[object], int]) -> Callable[[str, object], int]:
    def convert(key: str, value: object) -> int:
        return resolve(value)

    return convert


#: Every key the file may hold (tables flattened), and what makes its value.
KEYS: dict[str, Callable[[str, Any], Any]] = {
    "device": _devices,
    "backend": _choice(BACKENDS),
    "heap": _heaps,
    "udmabuf": _boolean,
    "socket": _string,
    "socket_mode": _mode,
    "log_level": _choice(LOG_LEVELS),
    "send_timeout": _seconds(0.1, 3600),
    "hello_timeout": _seconds(0.1, 3600),
    "access.allowed_uids": _ids(_uid),
    "access.allowed_gids": _ids(_gid),
    "access.admin_group": _one_id(_gid),
    "limits.max_width": _integer(1, _U32),
    "limits.max_height": _integer(1, _U32),
    # Plane offsets are 32-bit, as in KMS.
    "limits.max_size": _bytes(1, _U32),
    "limits.max_count": _integer(1, _U32),
    "quotas.buffers_per_client": _integer(0, _U63),
    "quotas.bytes_per_client": _bytes(0, _U63),
    "quotas.buffers_per_uid": _integer(0, _U63),
    "quotas.bytes_per_uid": _bytes(0, _U63),
    "quotas.connections_per_uid": _integer(0, _U32),
    "quotas.tokens_per_uid": _integer(0, _U32),
    "quotas.tokens_per_buffer": _integer(0, _U32),
    "quotas.fds_in_flight_per_uid": _integer(0, _U32),
}

#: Used when the kernel reports no limit (RLIM_INFINITY) and /proc/sys/fs/nr_open is unreadable.
_NR_OPEN = 1 << 20


def fd_limit(raised: bool = True) -> int:
    """The RLIMIT_NOFILE the daemon will run with: the hard limit if it raises its soft
    limit to it (``raised``, what ``serve`` does unless --keep-fd-limit), else the soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if raised else soft
    if limit == resource.RLIM_INFINITY:  # Linux caps it at fs.nr_open all the same
        try:
            with open("/proc/sys/fs/nr_open") as file:
                return int(file.read())
        except (OSError, ValueError):
            return _NR_OPEN
    return int(limit)


def memory_total() -> int:
    """MemTotal from /proc/meminfo in bytes; 0 if it can't be read."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _flatten(data: Mapping[str, object], where: str) -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key}: expected a table ([{key}]), got {value!r}")
            for inner, item in value.items():
                flat[f"{key}.{inner}"] = item
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(KEYS))
    if unknown:
        table = unknown[0].rpartition(".")[0]
        known = [key for key in KEYS if key.rpartition(".")[0] == table]
        if not table:
            known += [f"[{name}]" for name in _TABLES]
        raise ConfigError(f"{where}: unknown key {unknown[0]}; known: {', '.join(known)}")
    return flat


def read(path: str) -> dict[str, object]:
    """The keys of the TOML file at ``path``, flattened (``limits.max_width``); unchecked.

    Raises ConfigError if it can't be read, is not TOML (UTF-8 included), or has an
    unknown key.
    """
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    # Decoded here, not by tomllib.load: its UnicodeDecodeError is no ConfigError, and
    # would end a daemon that rereads a mangled file on SIGHUP.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            f"{path}: not valid TOML: not UTF-8: byte {raw[e.start]:#04x} "
            f"(at line {line}, column {column})"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return _flatten(data, path)


def build(
    keys: Mapping[str, object],
    *,
    source: str | None = None,
    flags: Iterable[str] = (),
    nofile: int = 1024,
    memory: int = 0,
) -> Config:
    """A Config from flattened ``keys``; the keys in ``flags`` came from the command line.

    A quota the keys leave out takes its default for a daemon of ``nofile`` fds on a
    machine of ``memory`` bytes (:meth:`Quotas.for_nofile`); the daemon-wide bounds are
    always :meth:`Bounds.for_nofile`'s. Raises ConfigError naming the first bad key (as
    its flag, if it came from one).
    """
    given = set(flags)
    values: dict[str, Any] = {}
    for key, value in keys.items():
        convert = KEYS.get(key)
        if convert is None:
            raise ConfigError(f"{source or 'configuration'}: unknown key {key}")
        try:
            values[key] = convert(key, value)
        except ValueError as e:
            if key in given:
                raise ConfigError(f"command line: {FLAGS[key]}: {e}") from None
            raise ConfigError(f"{source or 'configuration'}: {key}: {e}") from None
    defaults = Limits()
    limits = Limits(
        values.get("limits.max_width", defaults.max_width),
        values.get("limits.max_height", defaults.max_height),
        values.get("limits.max_size", defaults.max_size),
        values.get("limits.max_count", defaults.max_count),
    )
    given_quotas = {
        key.partition(".")[2]: value for key, value in values.items() if key.startswith("quotas.")
    }
    # A memfd buffer holds one of the daemon's fds; a dumb buffer is a GEM handle.
    fd_each = values.get("backend", "drm") == "memfd"
    quotas = dataclasses.replace(Quotas.for_nofile(nofile, memory, fd_each), **given_quotas)
    policy = Policy(
        values.get("access.allowed_uids", frozenset()),
        values.get("access.allowed_gids", frozenset()),
        values.get("access.admin_group"),
        quotas,
        Bounds.for_nofile(nofile, memory, fd_each),
    )
    return Config(
        device=values.get("device"),
        backend=values.get("backend", "drm"),
        heap=values.get("heap", ()),
        udmabuf=values.get("udmabuf", False),
        socket=values.get("socket"),
        socket_mode=values.get("socket_mode", 0o660),
        log_level=values.get("log_level", "info"),
        send_timeout=values.get("send_timeout", 10.0),
        hello_timeout=values.get("hello_timeout", 5.0),
        limits=limits,
        policy=policy,
        source=source,
        nofile=nofile,
    )


def load(
    path: str | None,
    overrides: Mapping[str, object] | None = None,
    *,
    nofile: int | None = None,
    memory: int | None = None,
) -> Config:
    """The configuration in the file at ``path`` (None: no file), with ``overrides``
    (flattened keys, as from the command line) laid over it.

    The default quotas and the bounds are cut from ``nofile`` (default: the hard
    RLIMIT_NOFILE, :func:`fd_limit`) and ``memory`` (default: MemTotal). Raises
    ConfigError naming the file and the key at fault.
    """
    keys = read(path) if path is not None else {}
    given = dict(overrides or {})
    unknown = set(given) - set(FLAGS)
    if unknown:
        raise ValueError(f"no command-line flag sets {sorted(unknown)}")
    keys.update(given)
    return build(
        keys,
        source=path,
        flags=given,
        nofile=fd_limit() if nofile is None else nofile,
        memory=memory_total() if memory is None else memory,
    )


def default_path(path: str | None) -> str | None:
    """The file ``serve`` reads: ``path`` if given, else DEFAULT_PATH if it exists."""
    if path is not None:
        return path
    return DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None


def restart_needed(running: Config, new: Config, node: str | None = None) -> list[str]:
    """The RESTART_KEYS in which ``new`` differs from what runs.

    ``running`` is the configuration the daemon started with, not the last one a
    reload read: a reload applies none of these keys, so a change stays to be
    warned of on every reload until the file matches what runs again. ``node``
    is the card node the daemon picked when started without a ``device`` (or the
    one it opened): a ``device`` naming it is no change.
    """
    changed = []
    for key in RESTART_KEYS:
        if key == "device" and node and new.devices == (node,) and running.devices in ((), (node,)):
            continue
        if getattr(running, key) != getattr(new, key):
            changed.append(key)
    return changed
