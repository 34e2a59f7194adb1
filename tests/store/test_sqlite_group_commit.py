"""SQLite group commit: concurrent transactions share COMMITs, and one
member's failure undoes that member alone."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hitl_service.errors import StoreUnavailable
from hitl_service.store import sqlite as sqlite_module
from hitl_service.store.sqlite import SqliteStore
from providers.types import Queued
from tests.store.factories import T0, make_user
from tests.store.helpers import Boom
from tests.support import wait_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from hitl_service.domain import User


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "hitl.db")
    await store.open()
    yield store
    await store.close()


def count_statements(store: SqliteStore) -> Counter[str]:
    """Counts the writer's statements by their first word (BEGIN, COMMIT, ...)."""
    seen: Counter[str] = Counter()
    writer = store._writer
    assert writer is not None
    writer.set_trace_callback(lambda sql: seen.update([sql.split(None, 1)[0].upper()]))
    return seen


async def add(store: SqliteStore, user: User, *, fail: bool = False, lazy: bool = False) -> int:
    async with store.transaction(lazy=lazy) as tx:
        await tx.insert_user(user)
        seq = await tx.append_event("s", user.id, T0, Queued())
        if fail:
            raise Boom
        return seq


async def test_concurrent_transactions_share_commits(sqlite_store: SqliteStore) -> None:
    seen = count_statements(sqlite_store)
    users = [make_user() for _ in range(16)]
    cursors = await asyncio.gather(*(add(sqlite_store, u) for u in users))
    assert len(set(cursors)) == 16
    # Every body after the first finds the batch open and joins it.
    assert seen["COMMIT"] < 16, seen
    assert seen["BEGIN"] == seen["COMMIT"]
    for user in users:
        assert await sqlite_store.get_user(user.id) == user


async def test_a_lone_transaction_commits_at_once_without_a_savepoint(
    sqlite_store: SqliteStore,
) -> None:
    seen = count_statements(sqlite_store)
    user = make_user()
    await add(sqlite_store, user)
    assert seen["COMMIT"] == 1
    assert seen["SAVEPOINT"] == 0
    assert await sqlite_store.get_user(user.id) == user


@pytest.mark.parametrize("failing", [0, 5, 15])
async def test_a_failing_member_is_undone_alone(sqlite_store: SqliteStore, failing: int) -> None:
    """The first member (the batch's own transaction), a middle and the last one."""
    users = [make_user() for _ in range(16)]
    outcomes = await asyncio.gather(
        *(add(sqlite_store, u, fail=i == failing) for i, u in enumerate(users)),
        return_exceptions=True,
    )
    for i, (user, outcome) in enumerate(zip(users, outcomes, strict=True)):
        stored = await sqlite_store.get_user(user.id)
        if i == failing:
            assert isinstance(outcome, Boom)
            assert stored is None
        else:
            assert isinstance(outcome, int), outcome
            assert stored == user
    events = await sqlite_store.read_events(after=0, limit=100)
    assert sorted(e.seq for e in events) == sorted(o for o in outcomes if isinstance(o, int))


async def test_a_lazy_commit_is_taken_along_by_the_next_transaction(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "LAZY_COMMIT_DELAY", 3600.0)  # only company commits it
    seen = count_statements(sqlite_store)
    first, second = make_user(), make_user()
    lazy = asyncio.create_task(add(sqlite_store, first, lazy=True))
    await wait_for(lambda: sqlite_store._lazy is not None, what="the lazy batch to wait")
    assert not lazy.done()  # waiting for its COMMIT
    assert await sqlite_store.get_user(first.id) is None  # readers see commits only
    await add(sqlite_store, second)
    await lazy
    assert seen["COMMIT"] == 1  # one COMMIT for both
    assert await sqlite_store.get_user(first.id) == first
    assert await sqlite_store.get_user(second.id) == second


async def test_a_lazy_commit_alone_commits_after_its_delay(sqlite_store: SqliteStore) -> None:
    seen = count_statements(sqlite_store)
    user = make_user()
    await add(sqlite_store, user, lazy=True)
    assert seen["COMMIT"] == 1
    assert await sqlite_store.get_user(user.id) == user


async def test_closing_commits_a_waiting_lazy_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "LAZY_COMMIT_DELAY", 3600.0)
    store = SqliteStore(tmp_path / "lazy.db")
    await store.open()
    user = make_user()
    lazy = asyncio.create_task(add(store, user, lazy=True))
    seen = count_statements(store)
    await wait_for(lambda: store._lazy is not None, what="the lazy batch to wait")
    await store.close()
    await lazy
    assert seen["COMMIT"] == 1
    again = SqliteStore(tmp_path / "lazy.db")
    await again.open()
    try:
        assert await again.get_user(user.id) == user
    finally:
        await again.close()


async def test_a_cancelled_commit_task_does_not_wedge_later_writes(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = sqlite_store
    monkeypatch.setattr(store, "_gathered", 2.0)  # under load: every COMMIT waits a turn
    first = asyncio.create_task(add(store, make_user()))
    for _ in range(100):  # loop turns: the task runs in the turn after it is made
        if store._flusher is not None:
            break
        await asyncio.sleep(0)
    assert store._flusher is not None
    store._flusher.cancel()  # e.g. torn down with the loop's other tasks
    later = make_user()
    await add(store, later)  # starts a commit task of its own, which takes both
    await first
    assert await store.get_user(later.id) == later


async def append_many(store: SqliteStore, count: int) -> None:
    async with store.transaction() as tx:
        for _ in range(count):
            await tx.append_event("s", "u", T0, Queued())


async def test_a_full_disk_is_store_unavailable(sqlite_store: SqliteStore) -> None:
    writer = sqlite_store._writer
    assert writer is not None
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")  # no page more: "disk is full"
    try:
        with pytest.raises(StoreUnavailable, match="full"):
            await append_many(sqlite_store, 2000)
    finally:
        writer.execute("PRAGMA max_page_count = 1073741823")
    user = make_user()
    await add(sqlite_store, user)  # the failed body was undone; writes go on
    assert await sqlite_store.get_user(user.id) == user


async def test_ping_fails_while_writes_fail_and_recovers_with_them(
    sqlite_store: SqliteStore,
) -> None:
    """A read answers on a file that takes no writes; readiness must not."""
    writer = sqlite_store._writer
    assert writer is not None
    await sqlite_store.ping()
    writer.execute("PRAGMA query_only = ON")  # every write now fails, reads go on
    try:
        with pytest.raises(StoreUnavailable):
            await add(sqlite_store, make_user())
        with pytest.raises(StoreUnavailable):
            await sqlite_store.ping()
    finally:
        writer.execute("PRAGMA query_only = OFF")
    await sqlite_store.ping()  # the probe write goes through again
    user = make_user()
    await add(sqlite_store, user)
    assert await sqlite_store.get_user(user.id) == user


async def test_a_file_sqlite_may_only_read_is_refused_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite opens a file it may not write (another owner, a read-only
    mount) read-only without a word: reads work, every write fails. The
    start must stop instead of serving a replica that refuses every write.
    (Permissions cannot show it to root, so the connection is opened
    read-only the way SQLite falls back to.)"""
    path = tmp_path / "hitl.db"
    first = SqliteStore(path)
    await first.open()
    await first.close()
    connect = sqlite3.connect

    def read_only(database: Path, **options: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(f"file:{database}?mode=ro", uri=True, **options)
        return conn

    monkeypatch.setattr(sqlite3, "connect", read_only)
    store = SqliteStore(path)
    with pytest.raises(StoreUnavailable, match="readonly"):
        await store.open()
    await store.close()
