"""Waiting on conditions (never on the clock) in store tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import asyncpg

from hitl_service.store.base import Store, Tx

Predicate = Callable[[], bool | Awaitable[bool]]


async def eventually(predicate: Predicate, what: str, *, timeout: float = 20.0) -> None:
    """Polls ``predicate`` until it holds; fails the test after ``timeout``.

    The timeout is only a guard against a hang, never an expectation.
    """
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def lock_waits(monitor: asyncpg.Connection) -> int:
    """Backends of the monitor's database that wait for a lock right now."""
    return int(
        await monitor.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
    )


async def until_blocked(monitor: asyncpg.Connection, task: asyncio.Task[object], what: str) -> None:
    """Waits until some backend waits for a lock; fails if ``task`` ends first.

    A task that completes instead of blocking means the lock this test is
    about does not exist.
    """

    async def blocked() -> bool:
        if task.done():
            raise AssertionError(f"{what}: finished instead of waiting for the lock")
        return await lock_waits(monitor) > 0

    await eventually(blocked, what)


class Boom(Exception):
    """Raised inside a transaction to make it roll back."""


async def rolled_back(store: Store, body: Callable[[Tx], Awaitable[object]]) -> None:
    """Runs ``body`` in a transaction of ``store``, then raises ``Boom``."""
    async with store.transaction() as tx:
        await body(tx)
        raise Boom
