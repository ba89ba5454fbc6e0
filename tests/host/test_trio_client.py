"""The trio client has what the blocking one has: introspection, open_buffer, pipelining."""

from __future__ import annotations

import dataclasses
import os

import trio
import trio.testing

import primed
from primed.errors import ErrorCode
from primed.wire.schema import Opcode
from tests.host.conftest import StartDaemon


async def test_trio_lists_what_the_blocking_client_lists(spawn: StartDaemon) -> None:
    daemon = spawn()
    with primed.connect(daemon.socket, name="holder") as holder:
        held = holder.allocate_many(16, 8, "XR24", 2)
        async with primed.connect_async(daemon.socket, name="trio") as client:
            mine = await client.allocate_many(32, 16, "NV12", 3)
            clients = await client.clients()
            assert sorted(c.name for c in clients) == ["holder", "trio"]
            assert {c.name: c.buffers for c in clients} == {"holder": 2, "trio": 3}
            assert clients == holder.clients()
            buffers = await client.buffers()
            aged = {(b.client, b.id): dataclasses.replace(b, age_ms=0) for b in buffers}
            assert aged == {
                (b.client, b.id): dataclasses.replace(b, age_ms=0) for b in holder.buffers()
            }
            number = {c.name: c.number for c in clients}
            assert sorted((b.client, b.id) for b in buffers) == sorted(
                [(number["holder"], 1), (number["holder"], 2)]
                + [(number["trio"], i) for i in (1, 2, 3)]
            )
            stats = await client.stats()
            assert (stats.clients, stats.buffers) == (2, 5)
            assert stats.held_bytes == sum(b.size for b in held + mine)
            counted = {key: n for kind, key, n in stats.counters if kind == 1}
            assert counted[Opcode.ALLOCATE] == 2 and counted[Opcode.LIST] >= 2
            await client.release(*mine)
        for b in held:
            b.close()


async def test_trio_open_buffer_sees_the_owners_pixels(spawn: StartDaemon) -> None:
    daemon = spawn()
    with primed.connect(daemon.socket, name="owner") as owner:
        buf = owner.allocate(16, 16, "XR24")
        with buf, buf.map() as pixels:
            pixels[:4] = b"\x01\x02\x03\x04"
        async with primed.connect_async(daemon.socket) as client:
            number = next(c.number for c in await client.clients() if c.name == "owner")
            with await client.open_buffer(number, buf.id) as opened:
                assert (opened.id, opened.width, opened.format) == (0, 16, "XR24")
                with opened.map(write=False) as seen:
                    assert bytes(seen[:4]) == b"\x01\x02\x03\x04"
            try:
                await client.open_buffer(number, buf.id + 1)
            except primed.ServerError as e:
                assert e.code == ErrorCode.UNKNOWN_BUFFER
            else:
                raise AssertionError("opened a buffer that does not exist")


async def test_trio_pipelined_requests_come_back_in_any_order(spawn: StartDaemon) -> None:
    daemon = spawn()
    async with primed.connect_async(daemon.socket) as client:
        singles = [await client.start_allocate(16 * (i + 1), 16) for i in range(10)]
        group = await client.start_allocate_many(8, 8, "NV12", 5)
        assert len({p.serial for p in singles} | {group.serial}) == 11
        many = await group.wait()  # the last sent, waited first
        assert [b.id for b in many] == [11, 12, 13, 14, 15]
        got = [await p.wait() for p in reversed(singles)]
        assert [b.width for b in got] == [16 * (i + 1) for i in reversed(range(10))]
        assert [b.id for b in got] == list(range(10, 0, -1))
        releases = [await client.start_release(b) for b in got]
        last = await client.start_release(*many)
        assert await last.wait() == 5
        assert [await r.wait() for r in releases] == [1] * 10
        assert (await client.stats()).buffers == 0
        for b in got + many:
            b.close()


async def test_trio_abandoned_pending_gives_its_buffers_back(spawn: StartDaemon) -> None:
    daemon = spawn()
    async with primed.connect_async(daemon.socket) as client:
        pending = await client.start_allocate_many(16, 16, "XR24", 4)
        with trio.move_on_after(0) as scope:  # cancelled at its first checkpoint
            await pending.wait()
        assert scope.cancelled_caught
        # Its answer comes before this one's: by now it was either given back on
        # arrival, or (answered already) queued for a task that is done once all block.
        await client.release(await client.allocate(16, 16))
        await trio.testing.wait_all_tasks_blocked()
        assert await client.buffers() == []
        assert (await client.stats()).buffers == 0


async def test_trio_pending_never_waited_is_closed_with_the_connection(
    spawn: StartDaemon,
) -> None:
    daemon = spawn()
    before = len(os.listdir("/proc/self/fd"))
    async with primed.connect_async(daemon.socket) as client:
        pending = await client.start_allocate(16, 16)
        await client.query()  # answered after it: its buffer is held for it now
        assert len(os.listdir("/proc/self/fd")) == before + 2  # the socket, the buffer
    assert len(os.listdir("/proc/self/fd")) == before
    try:
        await pending.wait()
    except primed.ConnectionLost:
        pass
    else:
        raise AssertionError("a pending answer outlived its connection")
