"""PostgreSQL upgrades: a migration on a database other replicas (the
previous release) keep using."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from hitl_service.secret import Secret
from hitl_service.store import postgres as postgres_module
from hitl_service.store.migrations import migrations
from hitl_service.store.postgres import PostgresStore
from tests.store.helpers import eventually, until_blocked

pytestmark = pytest.mark.postgres

NEWEST = max(version for version, _ in migrations("postgres"))


async def previous_version(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database as version 3 left it (0004 alters sessions)."""
    monkeypatch.setattr(
        postgres_module, "migrations", lambda d: [m for m in migrations(d) if m[0] <= 3]
    )
    store = PostgresStore(Secret(dsn), pool_min=1, pool_max=2)
    await store.open()
    await store.close()
    monkeypatch.undo()


class TestMigrationBesideRunningReplicas:
    async def test_a_migration_waiting_for_a_lock_does_not_stall_the_running_replicas(
        self, postgres_dsn: str, monitor: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        await previous_version(postgres_dsn, monkeypatch)
        assert await monitor.fetchval("SELECT MAX(version) FROM schema_version") == 3
        # Something holds an ordinary lock on sessions for a while: pg_dump
        # (a backup), a report query, a replica frozen mid-transaction.
        holder = await asyncpg.connect(postgres_dsn)
        reader = await asyncpg.connect(postgres_dsn)  # an old replica serving traffic
        store = PostgresStore(Secret(postgres_dsn), pool_min=1, pool_max=2)
        opening: asyncio.Task[Any] | None = None
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.fetchval("SELECT count(*) FROM sessions")
            opening = asyncio.create_task(store.open())  # the new release starts
            await until_blocked(monitor, opening, "the new replica's migration")
            # The old replicas keep answering while the new one waits to migrate.
            try:
                await asyncio.wait_for(reader.fetchval("SELECT count(*) FROM sessions"), 5)
            except TimeoutError:
                pytest.fail("a read of sessions waited >5 s behind the queued migration")
            await tx.rollback()
            await asyncio.wait_for(opening, 30)
            assert await store.schema_version() == NEWEST
        finally:
            if opening is not None and not opening.done():
                opening.cancel()
            await holder.close()
            await reader.close()
            await store.close()

    async def test_new_replicas_starting_together_pause_in_turn_not_back_to_back(
        self, postgres_dsn: str, monitor: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A migration steps aside between its tries so the running replicas
        get through; it used to give up the migration lock for its pause, and
        the next new replica waiting for that lock asked for the table at
        once: with two or more starting together, the running replicas' writes
        were queued behind one of them all the time (the upgrade drill: one
        write per 2 s instead of ~130 in 20 s)."""
        await previous_version(postgres_dsn, monkeypatch)
        monkeypatch.setattr(postgres_module, "_MIGRATION_LOCK_TIMEOUT_MS", 200)
        tries: list[PostgresStore] = []
        migrate_once = PostgresStore._migrate_once

        async def counted(self: PostgresStore, *args: Any) -> None:
            tries.append(self)
            await migrate_once(self, *args)

        monkeypatch.setattr(PostgresStore, "_migrate_once", counted)
        holder = await asyncpg.connect(postgres_dsn)  # a backup holding sessions
        gate = await asyncpg.connect(postgres_dsn)  # so both new replicas queue first
        stores = [PostgresStore(Secret(postgres_dsn), pool_min=1, pool_max=2) for _ in range(2)]
        opening: list[asyncio.Task[None]] = []
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.fetchval("SELECT count(*) FROM sessions")
            await gate.execute("SELECT pg_advisory_lock($1)", postgres_module._MIGRATION_LOCK)
            opening = [asyncio.create_task(s.open()) for s in stores]

            async def both_queued() -> bool:
                waiting = await monitor.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return int(waiting) == 2

            await eventually(both_queued, "both new replicas waiting for the migration lock")
            await gate.execute("SELECT pg_advisory_unlock($1)", postgres_module._MIGRATION_LOCK)
            # Three tries: two pauses of the first replica to take the lock.
            await eventually(lambda: len(tries) >= 3, "three tries at the migration")
            assert all(store is tries[0] for store in tries), (
                "another new replica tried while the first paused: the running "
                "replicas got no pause"
            )
            await tx.rollback()
            await asyncio.wait_for(asyncio.gather(*opening), 30)
            assert [await s.schema_version() for s in stores] == [NEWEST, NEWEST]
            assert await monitor.fetchval("SELECT count(*) FROM schema_version") == NEWEST
        finally:
            for task in opening:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*opening, return_exceptions=True)
            await holder.close()
            await gate.close()
            for store in stores:
                await store.close()
