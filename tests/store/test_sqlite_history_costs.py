"""SQLite: what every webhook, claim or open-state listing reads does not grow
with the history kept (ended sessions), only with what is open; what a claim
reads does not grow with the items queued behind their session's head."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from hitl_service.domain import SessionState
from hitl_service.store.sqlite import SqliteStore
from tests.store.factories import T0, at, make_outbox, make_session, make_user


async def _end_sessions(store: SqliteStore, count: int) -> None:
    async with store.transaction() as tx:
        for _ in range(count):
            user = make_user()
            await tx.insert_user(user)
            await tx.insert_session(
                make_session(user.id, state=SessionState.ENDED, ended_at=T0, external_chat_id="c")
            )


@contextmanager
def _steps(*connections: sqlite3.Connection | None) -> Iterator[list[int]]:
    """Counts SQLite virtual-machine steps (its unit of work) on ``connections``
    while the block runs: ``[count]`` once it is over."""
    counted = [0]

    def count() -> int:
        counted[0] += 1
        return 0  # go on

    for conn in connections:
        assert conn is not None
        conn.set_progress_handler(count, 1)
    try:
        yield counted
    finally:
        for conn in connections:
            assert conn is not None
            conn.set_progress_handler(None, 1)


@pytest.fixture
async def kept(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A store with one queued session and 500 ended ones."""
    opened = SqliteStore(tmp_path / "hitl.db")
    await opened.open()
    user = make_user()
    async with opened.transaction() as tx:
        await tx.insert_user(user)
        await tx.insert_session(make_session(user.id, state=SessionState.QUEUED))
    await _end_sessions(opened, 500)
    yield opened
    await opened.close()


async def _steps_of_has_starting_sessions(store: SqliteStore, expected: bool) -> int:
    async with store.transaction() as tx:
        with _steps(tx.connection) as counted:
            assert await tx.has_starting_sessions("livechat") is expected
    return counted[0]


async def _steps_of_listing(store: SqliteStore, state: SessionState) -> int:
    """A ListSessions page filtered by ``state`` (either connection may serve it)."""
    with _steps(store._writer, store._reader) as counted:
        found = await store.list_sessions(user_id="", state=state, before=None, limit=50)
    assert [s.state for s in found] == [state]
    return counted[0]


async def test_the_starting_check_of_a_foreign_webhook_reads_open_sessions_only(
    kept: SqliteStore,
) -> None:
    store = kept
    # Each webhook event for a chat that is not ours (LiveChat sends a whole
    # license's) asks whether a start is in flight, in the write transaction.
    before = await _steps_of_has_starting_sessions(store, False)
    await _end_sessions(store, 2000)
    assert await _steps_of_has_starting_sessions(store, False) == before
    starter = make_user()
    async with store.transaction() as tx:
        await tx.insert_user(starter)
        await tx.insert_session(make_session(starter.id, state=SessionState.STARTING))
    assert await _steps_of_has_starting_sessions(store, True)


async def test_listing_sessions_in_an_open_state_reads_open_sessions_only(
    kept: SqliteStore,
) -> None:
    store = kept
    # An operator's "what is queued now" must not walk every ended session
    # kept (it ran on the event loop: 228 ms at 200,000 sessions).
    before = await _steps_of_listing(store, SessionState.QUEUED)
    await _end_sessions(store, 2000)
    assert await _steps_of_listing(store, SessionState.QUEUED) == before


async def test_listing_failed_sessions_reads_failed_sessions_only(kept: SqliteStore) -> None:
    store = kept
    user = make_user()
    async with store.transaction() as tx:
        await tx.insert_user(user)
        await tx.insert_session(
            make_session(user.id, state=SessionState.FAILED, ended_at=T0, external_chat_id="c")
        )
    # "Which handoffs failed?": a page of them walked every session kept by
    # creation time, most of them ended.
    before = await _steps_of_listing(store, SessionState.FAILED)
    await _end_sessions(store, 2000)
    assert await _steps_of_listing(store, SessionState.FAILED) == before


async def test_claims_read_the_heads_not_the_queue_behind_them(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "hitl.db")
    await store.open()

    async def queue(session_id: str, count: int) -> None:
        async with store.transaction() as tx:
            for _ in range(count):
                await tx.insert_outbox(make_outbox(session_id))

    async def steps_of_a_pass() -> tuple[int, int]:
        """What the outbox loop reads per wake-up: the next due time, a claim."""
        with _steps(store._writer, store._reader) as due:
            assert await store.outbox_next_due(at(1)) == T0  # the queued ones
        async with store.transaction() as tx:
            with _steps(tx.connection) as claim:
                assert await tx.claim_outbox("w", at(1), at(60), 64) == []
        return due[0], claim[0]

    try:
        await queue("busy", 10)
        await queue("quiet", 1)
        async with store.transaction() as tx:  # both heads in flight
            assert len(await tx.claim_outbox("w", T0, at(60), 64)) == 2
        async with store.transaction() as tx:  # sessions waiting for a retry
            for n in range(10):
                await tx.insert_outbox(make_outbox(f"later{n}", next_attempt_at=at(600)))
        before = await steps_of_a_pass()
        # Each settle of the head wakes the loop: with 20,000 sends behind one
        # head, every pass walked them all (~23 sends/s drained); so it did
        # every session waiting for a retry (an outage's recovery).
        await queue("busy", 2000)
        async with store.transaction() as tx:
            for n in range(2000):
                await tx.insert_outbox(make_outbox(f"more{n}", next_attempt_at=at(600 + n)))
        assert await steps_of_a_pass() == before
    finally:
        await store.close()


async def test_a_page_deep_in_the_listing_reads_from_its_cursor(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "hitl.db")
    await store.open()

    async def add(count: int, first: int) -> None:
        async with store.transaction() as tx:
            for n in range(first, first + count):
                user = make_user()
                await tx.insert_user(user)
                await tx.insert_session(
                    make_session(user.id, state=SessionState.ENDED, created_at=at(n), ended_at=T0)
                )

    async def steps_of_the_page_before(cursor: tuple[datetime, str]) -> int:
        with _steps(store._writer, store._reader) as counted:
            found = await store.list_sessions(user_id="", state=None, before=cursor, limit=50)
        assert len(found) == 50
        return counted[0]

    try:
        await add(100, 0)
        oldest = await store.list_sessions(user_id="", state=None, before=None, limit=100)
        cursor = (oldest[-51].created_at, oldest[-51].id)  # 50 older ones below it
        before = await steps_of_the_page_before(cursor)
        # Paging an operator's history: each page walked every session newer
        # than its cursor (35 ms a page 100,000 sessions deep, on the loop).
        await add(2000, 100)
        assert await steps_of_the_page_before(cursor) == before
    finally:
        await store.close()


async def test_the_starting_check_does_not_read_the_open_sessions(kept: SqliteStore) -> None:
    store = kept
    # Through sessions_open it read every open session: 10 ms per webhook
    # event of a foreign chat at 10,000 open, in the write transaction.
    before = await _steps_of_has_starting_sessions(store, False)
    async with store.transaction() as tx:
        for _ in range(2000):
            user = make_user()
            await tx.insert_user(user)
            await tx.insert_session(make_session(user.id, state=SessionState.ASSIGNED))
    assert await _steps_of_has_starting_sessions(store, False) == before
