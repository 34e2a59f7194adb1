"""A rollback: this release opened on a database a newer release migrated."""

from __future__ import annotations

import sqlite3

import asyncpg
from structlog.testing import capture_logs

from hitl_service.store.migrations import migrations
from tests.store.conftest import Backend, OpenStore

NEWEST = max(version for version, _ in migrations("sqlite"))


async def migrated_by_a_newer_release(backend: Backend) -> None:
    sql = f"INSERT INTO schema_version (version, applied_at) VALUES ({NEWEST + 1}, '2030-01-01')"
    if backend.name == "sqlite":
        conn = sqlite3.connect(backend.target)
        try:
            conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
    else:
        pg = await asyncpg.connect(backend.target)
        try:
            await pg.execute(sql)
        finally:
            await pg.close()


async def test_opening_a_schema_newer_than_this_release_says_so(
    backend: Backend, open_store: OpenStore
) -> None:
    store = await open_store()
    await store.close()
    await migrated_by_a_newer_release(backend)
    with capture_logs() as logs:
        reopened = await open_store()
    assert await reopened.schema_version() == NEWEST + 1
    newer = [e for e in logs if e["event"] == "store.schema_newer"]
    assert newer, [e["event"] for e in logs]
    assert newer[0]["version"] == NEWEST + 1
    assert newer[0]["known"] == NEWEST
