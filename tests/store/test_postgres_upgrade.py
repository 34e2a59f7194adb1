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
from tests.store.helpers import until_blocked

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
