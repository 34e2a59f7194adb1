"""SQLite: a reader that keeps a snapshot open (an online backup, a report,
a `sqlite3` shell left in a transaction) does not hold the service's writes
off while the WAL is over its size."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from hitl_service.store import sqlite as sqlite_module
from hitl_service.store.sqlite import SqliteStore
from providers.types import Queued
from tests.store.factories import T0
from tests.support import TIMEOUT


async def test_writes_go_on_while_a_reader_pins_an_oversized_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_COMMITS", 5)
    monkeypatch.setattr(sqlite_module, "WAL_FORCE_FRAMES", 10)
    path = tmp_path / "hitl.db"
    # The busy timeout bounds waits for other processes' locks; a checkpoint
    # waiting that long for the reader would hold every write off as long.
    store = SqliteStore(path, busy_timeout_ms=3_600_000)
    await store.open()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        async with store.transaction() as tx:
            await tx.append_event("s", "u", T0, Queued())
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchall()  # its snapshot

        async def write() -> None:
            for _ in range(40):  # several checkpoints, each over the limit
                async with store.transaction() as tx:
                    await tx.append_event("s", "u", T0, Queued())

        # A guard against the hang, not an expectation of speed.
        await asyncio.wait_for(write(), TIMEOUT)
    finally:
        reader.close()
        await store.close()
