"""The lock that keeps a second process off a served SQLite file
(``<database>.lock``) is held exactly while the store is open; closing the
store waits for the transaction holding its writer."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from hitl_service.errors import StoreUnavailable
from hitl_service.store.sqlite import SqliteStore
from tests.store.factories import make_user
from tests.support import wait_for


def lock_is_free(path: Path) -> bool:
    """Whether another holder (a new open file description) can take it."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases it again if taken
    return True


async def test_the_lock_is_held_while_open(tmp_path: Path) -> None:
    path = tmp_path / "hitl.db"
    store = SqliteStore(path, exclusive=True)
    await store.open()
    try:
        assert not lock_is_free(path)
    finally:
        await store.close()
    assert lock_is_free(path)


async def test_an_open_that_fails_late_releases_the_lock_and_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Embedded, the process goes on: a lock kept by a failed open would
    # refuse its next attempt and every other process for good.
    async def unreadable(self: SqliteStore) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SqliteStore, "_read_head", unreadable)
    path = tmp_path / "hitl.db"
    store = SqliteStore(path, exclusive=True)
    with pytest.raises(StoreUnavailable, match="disk I/O error"):
        await store.open()
    assert (store._writer, store._reader, store._checkpointer) == (None, None, None)
    assert lock_is_free(path)


async def _close_during_a_busy_begin(path: Path, *, gathered: float = 0.0) -> None:
    """Closes the store while a transaction's BEGIN waits out another
    connection's lock; checks the transaction's write is kept."""
    store = SqliteStore(path, exclusive=True)
    await store.open()
    store._gathered = gathered
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the database
    user = make_user()

    async def write() -> None:
        async with store.transaction() as tx:
            await tx.insert_user(user)

    writer = asyncio.create_task(write())
    await wait_for(lambda: store._write_lock.locked(), what="the BEGIN retrying")
    closing = asyncio.create_task(store.close())
    await wait_for(lambda: store._write_lock._waiters, what="close waiting for the write lock")
    assert store._writer is not None  # still the BEGIN's
    other.execute("COMMIT")  # the database frees up
    other.close()
    await writer  # began, and committed on an open connection
    await closing
    reopened = SqliteStore(path)
    await reopened.open()
    try:
        assert await reopened.get_user(user.id) == user
    finally:
        await reopened.close()


async def test_close_waits_for_a_begin_retrying_on_a_busy_database(tmp_path: Path) -> None:
    # A BEGIN waiting out another connection's lock holds the writer across
    # its retries; closing it meanwhile in a worker thread crashed the
    # process inside SQLite (seen with upkeep still running at close).
    await _close_during_a_busy_begin(tmp_path / "hitl.db")


async def test_an_open_cancelled_while_its_thread_works_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SIGTERM during the start cancels the open while its worker thread
    # still opens connections: closing then must not run under that thread
    # (a connection closed while it is in use) nor miss what it opens after.
    migrating, finished = threading.Event(), threading.Event()
    connect, open_blocking = SqliteStore._connect, SqliteStore._open_blocking

    def slow_connect(self: SqliteStore, busy_timeout: float) -> sqlite3.Connection:
        if self._writer is not None:  # the writer is open and migrated
            migrating.set()
            time.sleep(0.3)
        return connect(self, busy_timeout)

    def watched_open(self: SqliteStore) -> None:
        try:
            open_blocking(self)
        finally:
            finished.set()

    monkeypatch.setattr(SqliteStore, "_connect", slow_connect)
    monkeypatch.setattr(SqliteStore, "_open_blocking", watched_open)
    path = tmp_path / "hitl.db"
    store = SqliteStore(path, exclusive=True)
    opening = asyncio.create_task(store.open())
    assert await asyncio.to_thread(migrating.wait, 5)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert await asyncio.to_thread(finished.wait, 5)  # the thread has done its all
    assert (store._writer, store._reader, store._checkpointer) == (None, None, None)
    assert lock_is_free(path)


async def test_close_commits_a_batch_left_for_its_flush_meanwhile(tmp_path: Path) -> None:
    # Under load a COMMIT waits for a task of its own (group commit): a
    # transaction that ends while close waits for the write lock leaves its
    # batch to that task, queued behind close, and closing the writer then
    # rolled back a body that had run (its caller got StoreUnavailable).
    await _close_during_a_busy_begin(tmp_path / "hitl.db", gathered=100.0)  # waits gather
