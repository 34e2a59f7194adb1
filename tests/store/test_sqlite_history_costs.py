"""SQLite: what every webhook or claim reads does not grow with the history
kept (ended sessions), only with what is open."""

from __future__ import annotations

from pathlib import Path

from hitl_service.domain import SessionState
from hitl_service.store.sqlite import SqliteStore
from tests.store.factories import T0, make_session, make_user


async def _end_sessions(store: SqliteStore, count: int) -> None:
    async with store.transaction() as tx:
        for _ in range(count):
            user = make_user()
            await tx.insert_user(user)
            await tx.insert_session(
                make_session(user.id, state=SessionState.ENDED, ended_at=T0, external_chat_id="c")
            )


async def _steps_of_has_starting_sessions(store: SqliteStore, expected: bool) -> int:
    """SQLite virtual-machine steps (its unit of work) the check takes."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    async with store.transaction() as tx:
        tx.connection.set_progress_handler(count, 1)
        try:
            assert await tx.has_starting_sessions("livechat") is expected
        finally:
            tx.connection.set_progress_handler(None, 1)
    return steps


async def test_the_starting_check_of_a_foreign_webhook_reads_open_sessions_only(
    tmp_path: Path,
) -> None:
    # Each webhook event for a chat that is not ours (LiveChat sends a whole
    # license's) asks whether a start is in flight, in the write transaction.
    store = SqliteStore(tmp_path / "hitl.db")
    await store.open()
    try:
        user = make_user()
        async with store.transaction() as tx:
            await tx.insert_user(user)
            await tx.insert_session(make_session(user.id, state=SessionState.QUEUED))
        await _end_sessions(store, 500)
        before = await _steps_of_has_starting_sessions(store, False)
        await _end_sessions(store, 2000)
        assert await _steps_of_has_starting_sessions(store, False) == before
        starter = make_user()
        async with store.transaction() as tx:
            await tx.insert_user(starter)
            await tx.insert_session(make_session(starter.id, state=SessionState.STARTING))
        assert await _steps_of_has_starting_sessions(store, True)
    finally:
        await store.close()


async def _steps_of_listing(store: SqliteStore, state: SessionState) -> int:
    """Virtual-machine steps of a ListSessions page filtered by ``state``."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    connections = [store._writer, store._reader]  # either may serve the read
    for conn in connections:
        assert conn is not None
        conn.set_progress_handler(count, 1)
    try:
        found = await store.list_sessions(user_id="", state=state, before=None, limit=50)
    finally:
        for conn in connections:
            assert conn is not None
            conn.set_progress_handler(None, 1)
    assert [s.state for s in found] == [state]
    return steps


async def test_listing_sessions_in_an_open_state_reads_open_sessions_only(
    tmp_path: Path,
) -> None:
    # An operator's "what is queued now" must not walk every ended session
    # kept (it ran on the event loop: 228 ms at 200,000 sessions).
    store = SqliteStore(tmp_path / "hitl.db")
    await store.open()
    try:
        user = make_user()
        async with store.transaction() as tx:
            await tx.insert_user(user)
            await tx.insert_session(make_session(user.id, state=SessionState.QUEUED))
        await _end_sessions(store, 500)
        before = await _steps_of_listing(store, SessionState.QUEUED)
        await _end_sessions(store, 2000)
        assert await _steps_of_listing(store, SessionState.QUEUED) == before
    finally:
        await store.close()
