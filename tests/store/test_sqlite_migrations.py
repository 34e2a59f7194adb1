"""SQLite schema upgrades: a database written by an older version keeps its
rows, their order and their meaning."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import pytest

from hitl_service.domain import IdempotencyRecord, OutboxStatus
from hitl_service.store import sqlite as sqlite_module
from hitl_service.store.migrations import migrations
from hitl_service.store.sqlite import SqliteStore
from tests.store.factories import T0, at, make_outbox, make_session, make_user

if TYPE_CHECKING:
    from pathlib import Path


async def test_version_2_keeps_idempotency_and_the_outbox_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hitl.db"
    monkeypatch.setattr(sqlite_module, "migrations", lambda d: migrations(d)[:1])
    # Version 1's sessions had no waiting_since (version 4).
    v1_insert = sqlite_module._SQL_INSERT_SESSION.replace(", waiting_since", "")
    v1_insert = v1_insert.replace(", :waiting_since", "")
    monkeypatch.setattr(sqlite_module, "_SQL_INSERT_SESSION", v1_insert)
    # ... nor outbox.queued (version 7).
    v1_outbox = sqlite_module._SQL_INSERT_OUTBOX.replace(", queued", "").replace(", :queued", "")
    monkeypatch.setattr(sqlite_module, "_SQL_INSERT_OUTBOX", v1_outbox)
    old = SqliteStore(path)
    await old.open()
    user = make_user()
    session = make_session(user.id)
    done, head, behind = (make_outbox(session.id) for _ in range(3))
    done.status = OutboxStatus.DONE
    record = IdempotencyRecord("SendMessage", "req-1", "hash", head.id, T0)
    async with old.transaction() as tx:
        await tx.insert_user(user)
        await tx.insert_session(session)
        for item in (done, head, behind):
            await tx.insert_outbox(item)
        await tx.put_idempotency(record)
    assert await old.schema_version() == 1
    await old.close()
    monkeypatch.undo()

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.schema_version() == max(v for v, _ in migrations("sqlite"))
        async with store.transaction() as tx:
            assert await tx.get_idempotency("SendMessage", "req-1") == record
            claimed = await tx.claim_outbox("me", at(1), at(60), 10)
            # Still the head of its session's queue, and only it.
            assert [i.id for i in claimed] == [head.id]
            later = make_outbox(session.id)
            assert not await tx.insert_outbox(later)  # queued behind the old ones
        assert await store.get_outbox(done.id) == done
        assert await store.get_session(session.id) == session  # waiting_since: None
        conn = sqlite3.connect(path)
        try:
            (ddl,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'idempotency'")
            assert "WITHOUT ROWID" in ddl[0]
            positions = [r[0] for r in conn.execute("SELECT pos FROM outbox ORDER BY pos")]
            assert len(positions) == 4
            # Version 7 marked the one behind the head: claims pass over it.
            queued = conn.execute("SELECT id, queued FROM outbox WHERE status = 'pending'")
            assert sorted(queued) == sorted([(head.id, 0), (behind.id, 1), (later.id, 1)])
            assert not list(conn.execute("SELECT * FROM sqlite_sequence WHERE name = 'outbox'"))
        finally:
            conn.close()
    finally:
        await store.close()
