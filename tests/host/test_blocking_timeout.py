"""The blocking client's waits are bounded: against a daemon that says nothing, and a
Pending waited on twice."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

import primed
from primed.client import blocking
from primed.wire import protocol
from primed.wire.protocol import Released, Welcome
from primed.wire.schema import VERSION, Backend

WELCOME = Welcome(VERSION, Backend.MEMFD, 4096, 4096, 1 << 24, 16)


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def _mute_daemon(tmp_path: Path) -> tuple[socket.socket, str]:
    """A listening socket nobody accepts from or reads: connect() succeeds (the
    kernel queues the connection), and no WELCOME ever comes."""
    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(4)
    return listener, path


def test_handshake_with_a_mute_daemon_times_out(tmp_path: Path) -> None:
    listener, path = _mute_daemon(tmp_path)
    with listener:
        began = time.monotonic()
        with pytest.raises(primed.Timeout) as caught:
            primed.connect(path, timeout=0.2)
        assert 0.2 <= time.monotonic() - began < 5
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value, primed.PrimedError)


def test_handshake_is_bounded_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocking, "HANDSHAKE_TIMEOUT", 0.1)  # 5 s is too long for a test
    listener, path = _mute_daemon(tmp_path)
    with listener, pytest.raises(primed.Timeout):
        primed.connect(path)


def test_a_call_that_times_out_leaves_the_connection_unusable() -> None:
    ours, daemon = _pair()
    with daemon:
        daemon.send(protocol.encode(WELCOME, 1))  # the answer to the HELLO to come
        with primed.Client(ours, timeout=0.1) as client:
            with pytest.raises(primed.Timeout):
                client.query()  # never answered
            with pytest.raises(primed.ConnectionLost):
                client.stats()


def test_a_call_waits_for_ever_unless_told() -> None:
    ours, daemon = _pair()
    with daemon:
        daemon.send(protocol.encode(WELCOME, 1))
        with primed.Client(ours) as client:
            assert client._timeout is None
            pending = client.start_release(5)
            with pytest.raises(primed.Timeout):
                pending.wait(timeout=0.05)  # a bound for this wait alone


def test_waiting_twice_gives_the_same_answer() -> None:
    ours, daemon = _pair()
    with daemon:
        daemon.send(protocol.encode(WELCOME, 1))
        daemon.send(protocol.encode(Released(1), 2))
        with primed.Client(ours, timeout=2) as client:
            pending = client.start_release(5)
            assert pending.wait() == 1
            assert pending.wait() == 1  # answered already: no read, no block


def test_waiting_twice_on_a_timed_out_call_raises_again() -> None:
    ours, daemon = _pair()
    with daemon:
        daemon.send(protocol.encode(WELCOME, 1))
        with primed.Client(ours, timeout=0.05) as client:
            pending = client.start_release(5)
            with pytest.raises(primed.Timeout):
                pending.wait()
            with pytest.raises(primed.Timeout):
                pending.wait()
