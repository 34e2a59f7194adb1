"""Contract: transactions, schema, reopening, dead letters and pruning."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from hitl_service.domain import (
    DeadLetter,
    IdempotencyRecord,
    OutboxStatus,
    Session,
    SessionState,
    User,
)
from hitl_service.errors import StoreUnavailable
from hitl_service.store import postgres as postgres_module
from hitl_service.store import sqlite as sqlite_module
from hitl_service.store.base import Store, Tx
from hitl_service.store.migrations import migrations
from providers.types import AgentMessage, InboundEvent, Message, ProviderUser, Queued
from tests.store.conftest import Backend, OpenStore
from tests.store.factories import T0, at, make_outbox, make_session, make_user
from tests.store.helpers import Boom, rolled_back
from tests.store.test_events import BOB


class TestTransactions:
    async def test_an_exception_rolls_everything_back(self, store: Store) -> None:
        user = make_user()
        session = make_session(user.id)
        item = make_outbox(session.id)

        async def everything(tx: Tx) -> None:
            await tx.insert_user(user)
            await tx.put_provider_user(user.id, "livechat", ProviderUser("c"))
            await tx.insert_session(session)
            await tx.append_event(session.id, user.id, T0, Queued())
            await tx.claim_dedupe_key("livechat", "k", T0)
            await tx.put_idempotency(IdempotencyRecord("s", "k", "h", "r", T0))
            await tx.insert_outbox(item)
            await tx.add_dead_letter(DeadLetter("dl_1", "livechat", T0, "bad", b"{}"))

        with pytest.raises(Boom):
            await rolled_back(store, everything)
        assert await store.get_user(user.id) is None
        assert await store.get_provider_user(user.id, "livechat") is None
        assert await store.get_session(session.id) is None
        assert await store.head() == 0
        assert list(await store.read_events(after=0, limit=10)) == []
        assert await store.get_outbox(item.id) is None
        assert await store.list_dead_letters(10) == []
        assert await store.outbox_stats() == (0, None)
        async with store.transaction() as tx:
            assert await tx.claim_dedupe_key("livechat", "k", T0)
            assert await tx.get_idempotency("s", "k") is None

    async def test_a_cancelled_transaction_rolls_back_and_the_store_goes_on(
        self, store: Store
    ) -> None:
        user = make_user()
        inside = asyncio.Event()

        async def stuck() -> None:
            async with store.transaction() as tx:
                await tx.insert_user(user)
                await tx.append_event("s", user.id, T0, Queued())
                inside.set()
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(stuck())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.get_user(user.id) is None
        assert await store.head() == 0
        async with store.transaction() as tx:
            await tx.insert_user(user)
            assert await tx.append_event("s", user.id, T0, Queued()) > 0
        assert await store.get_user(user.id) == user

    async def test_concurrent_transactions_on_one_store_all_commit(self, store: Store) -> None:
        users = [make_user() for _ in range(12)]

        async def add(user: User) -> int:
            async with store.transaction() as tx:
                await tx.insert_user(user)
                return await tx.append_event("s", user.id, T0, Queued())

        cursors = await asyncio.gather(*(add(u) for u in users))
        assert sorted(cursors) == [e.seq for e in await store.read_events(after=0, limit=100)]
        assert len(set(cursors)) == len(users)
        for user in users:
            assert await store.get_user(user.id) == user

    async def test_commit_is_visible_to_plain_reads(self, store: Store) -> None:
        user = make_user()
        async with store.transaction() as tx:
            await tx.insert_user(user)
        assert await store.get_user(user.id) == user


class TestSchemaAndReopen:
    async def test_schema_version_is_the_newest_migration(self, store: Store) -> None:
        newest = max(v for v, _ in migrations("sqlite"))
        assert newest == max(v for v, _ in migrations("postgres"))
        assert await store.schema_version() == newest

    async def test_ping(self, store: Store) -> None:
        await store.ping()

    async def test_reopen_keeps_everything_and_cursors_continue(
        self, backend: Backend, open_store: OpenStore
    ) -> None:
        first = await open_store()
        assert first.backend == backend.name
        user = make_user()
        session = make_session(user.id)
        item = make_outbox(session.id)
        async with first.transaction() as tx:
            await tx.insert_user(user)
            await tx.insert_session(session)
            cursors = [await tx.append_event(session.id, user.id, T0, Queued(n)) for n in range(3)]
            await tx.insert_outbox(item)
            await tx.claim_dedupe_key("livechat", "k", T0)
        await first.close()

        second = await open_store()
        assert await second.schema_version() == max(v for v, _ in migrations("sqlite"))
        assert await second.get_user(user.id) == user
        assert await second.get_session(session.id) == session
        assert await second.get_outbox(item.id) == item
        assert await second.head() == cursors[-1]
        assert [e.seq for e in await second.read_events(after=0, limit=10)] == cursors
        async with second.transaction() as tx:
            assert not await tx.claim_dedupe_key("livechat", "k", T0)
            nxt = await tx.append_event(session.id, user.id, T0, Queued(9))
        assert nxt > cursors[-1]

    async def test_a_closed_store_is_unavailable(self, open_store: OpenStore) -> None:
        store = await open_store()
        await store.close()
        with pytest.raises(StoreUnavailable):
            await store.get_user("usr_1")
        with pytest.raises(StoreUnavailable):
            async with store.transaction():
                pass  # pragma: no cover - never entered


class TestDeadLetters:
    async def test_newest_first_with_limit_and_exact_bytes(self, store: Store) -> None:
        letters = [
            DeadLetter(f"dl_{n}", "livechat", at(n), f"reason {n}", bytes([0, 255, n]) + b"{")
            for n in range(4)
        ]
        async with store.transaction() as tx:
            for letter in letters:
                await tx.add_dead_letter(letter)
        assert await store.list_dead_letters(10) == letters[::-1]
        assert await store.list_dead_letters(2) == letters[:1:-1]

    async def test_go_with_the_retention_only(self, store: Store) -> None:
        """They hold message text: HITL_RETENTION removes them with the
        sessions; without it they stay for inspection."""
        letters = [DeadLetter(f"dl_{n}", "livechat", at(n), "ingest failed", b"{}") for n in (1, 9)]
        async with store.transaction() as tx:
            for letter in letters:
                await tx.add_dead_letter(letter)
        cutoffs = {"idempotency_before": at(0), "dedupe_before": at(0), "parked_before": at(0)}
        assert await store.prune(**cutoffs) == 0
        assert await store.prune(**cutoffs, sessions_before=at(5)) == 1
        assert await store.list_dead_letters(10) == letters[1:]


class TestPrune:
    async def test_deletes_only_expired_rows(self, store: Store) -> None:
        old_done = make_outbox("A", status=OutboxStatus.DONE, done_at=at(1))
        new_done = make_outbox("A", status=OutboxStatus.FAILED, done_at=at(100))
        old_pending = make_outbox("B", created_at=at(0))
        parked = InboundEvent("C1", AgentMessage(Message("x"), BOB), "d1")
        async with store.transaction() as tx:
            await tx.put_idempotency(IdempotencyRecord("s", "old", "h", "r", at(1)))
            await tx.put_idempotency(IdempotencyRecord("s", "new", "h", "r", at(100)))
            for item in (old_done, new_done, old_pending):
                await tx.insert_outbox(item)
            await tx.claim_dedupe_key("p", "old", at(1))
            await tx.claim_dedupe_key("p", "new", at(100))
            await tx.park_event("p", parked, at(1))
            await tx.park_event("p", InboundEvent("C2", Queued(), "d2"), at(100))
        removed = await store.prune(
            idempotency_before=at(50), dedupe_before=at(50), parked_before=at(50)
        )
        assert removed == 4
        assert await store.get_outbox(old_done.id) is None
        assert await store.get_outbox(new_done.id) == new_done
        assert await store.get_outbox(old_pending.id) == old_pending
        async with store.transaction() as tx:
            assert await tx.get_idempotency("s", "old") is None
            assert await tx.get_idempotency("s", "new") is not None
            assert await tx.claim_dedupe_key("p", "old", at(200))
            assert not await tx.claim_dedupe_key("p", "new", at(200))
            assert await tx.take_parked_events("p", "C1") == []
            assert len(await tx.take_parked_events("p", "C2")) == 1
        assert (
            await store.prune(idempotency_before=at(50), dedupe_before=at(50), parked_before=at(50))
            == 0
        )

    async def test_finished_items_go_batch_by_batch_and_the_rest_stays(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(sqlite_module, "PRUNE_BATCH", 3)  # SQLite walks the table
        items = [
            make_outbox("A", created_at=at(n))
            if n % 4 == 0  # still pending, however old
            else make_outbox("A", created_at=at(n), status=OutboxStatus.DONE, done_at=at(n + 1))
            for n in range(12)
        ]
        async with store.transaction() as tx:
            for item in items:
                await tx.insert_outbox(item)
        removed = await store.prune(
            idempotency_before=at(8), dedupe_before=at(0), parked_before=at(0)
        )
        gone = {i.id for i in items if i.done_at is not None and i.done_at < at(8)}
        assert removed == len(gone) == 5
        for item in items:
            assert (await store.get_outbox(item.id) is None) == (item.id in gone), item

    async def test_separate_cutoffs(self, store: Store) -> None:
        async with store.transaction() as tx:
            await tx.put_idempotency(IdempotencyRecord("s", "k", "h", "r", at(10)))
            await tx.claim_dedupe_key("p", "k", at(10))
            await tx.park_event("p", InboundEvent("C", Queued(), "d"), at(10))
        assert (
            await store.prune(idempotency_before=at(5), dedupe_before=at(20), parked_before=at(5))
            == 1
        )
        assert (
            await store.prune(idempotency_before=at(5), dedupe_before=at(5), parked_before=at(20))
            == 1
        )
        assert (
            await store.prune(idempotency_before=at(20), dedupe_before=at(5), parked_before=at(5))
            == 1
        )


class TestRetention:
    """``prune(sessions_before=...)``: HITL_RETENTION's deletions."""

    async def given(self, store: Store, ended: dict[str, float], events: int) -> dict[str, Session]:
        """Sessions (one user each) by name: those in ``ended`` ended at that
        offset (``failed_*`` as FAILED), the rest open since ``at(0)``; each
        with ``events`` log events."""
        sessions: dict[str, Session] = {}
        async with store.transaction() as tx:
            for name in ("old", "failed_old", "recent", "open_ancient"):
                user = make_user()
                await tx.insert_user(user)
                await tx.put_provider_user(user.id, "livechat", ProviderUser(f"c-{name}"))
                if name in ended:
                    state = SessionState.FAILED if name.startswith("failed") else SessionState.ENDED
                    session = make_session(user.id, state=state, ended_at=at(ended[name]))
                else:
                    session = make_session(user.id)
                await tx.insert_session(session)
                for n in range(events):
                    await tx.append_event(session.id, user.id, at(n), Queued(n))
                sessions[name] = session
        return sessions

    async def test_deletes_sessions_ended_before_the_cutoff_with_their_events(
        self, store: Store
    ) -> None:
        sessions = await self.given(store, {"old": 10, "failed_old": 20, "recent": 1000}, 3)
        head = await store.head()
        removed = await store.prune(
            idempotency_before=at(0),
            dedupe_before=at(0),
            parked_before=at(0),
            sessions_before=at(500),
        )
        assert removed == 2 * (3 + 1)  # two sessions, three events each
        gone = {sessions["old"].id, sessions["failed_old"].id}
        for name, session in sessions.items():
            stored = await store.get_session(session.id)
            assert (stored is None) == (session.id in gone), name
            events = await store.read_events(after=0, limit=100, session_id=session.id)
            assert len(events) == (0 if session.id in gone else 3), name
            # Users and their provider identities stay: a user may come back.
            assert await store.get_user(session.user_id) is not None
            assert await store.get_provider_user(session.user_id, "livechat") is not None
            listed = await store.list_sessions(
                user_id=session.user_id, state=None, before=None, limit=10
            )
            assert [s.id for s in listed] == ([] if session.id in gone else [session.id])
        assert {e.session_id for e in await store.read_events(after=0, limit=100)} == {
            sessions["recent"].id,
            sessions["open_ancient"].id,
        }
        # Cursors go on from where they were, never reused.
        assert await store.head() == head
        async with store.transaction() as tx:
            assert await tx.append_event("s", "u", at(2000), Queued()) == head + 1
        assert (
            await store.prune(
                idempotency_before=at(0),
                dedupe_before=at(0),
                parked_before=at(0),
                sessions_before=at(500),
            )
            == 0
        )

    async def test_without_a_cutoff_sessions_stay(self, store: Store) -> None:
        sessions = await self.given(store, {"old": 10, "failed_old": 20, "recent": 1000}, 2)
        assert (
            await store.prune(idempotency_before=at(0), dedupe_before=at(0), parked_before=at(0))
            == 0
        )
        for session in sessions.values():
            assert await store.get_session(session.id) is not None

    async def test_many_events_go_batch_by_batch(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(sqlite_module, "PRUNE_BATCH", 2)
        monkeypatch.setattr(postgres_module, "PRUNE_BATCH", 2)
        sessions = await self.given(store, {"old": 10, "failed_old": 20, "recent": 1000}, 5)
        transactions = 0
        real = store.transaction

        def counted(**options: Any) -> AbstractAsyncContextManager[Tx]:
            nonlocal transactions
            transactions += 1
            return real(**options)

        monkeypatch.setattr(store, "transaction", counted)
        removed = await store.prune(
            idempotency_before=at(0),
            dedupe_before=at(0),
            parked_before=at(0),
            sessions_before=at(500),
        )
        assert removed == 2 * (5 + 1)
        assert transactions >= 5  # ten events, two a transaction
        assert await store.get_session(sessions["old"].id) is None
        assert await store.get_session(sessions["failed_old"].id) is None
        kept = {e.session_id for e in await store.read_events(after=0, limit=100)}
        assert kept == {sessions["recent"].id, sessions["open_ancient"].id}
        assert await store.get_session(sessions["open_ancient"].id) == sessions["open_ancient"]

    async def test_a_session_with_a_pending_send_waits_for_it(self, store: Store) -> None:
        sessions = await self.given(store, {"old": 10}, 1)
        item = make_outbox(sessions["old"].id)
        async with store.transaction() as tx:
            await tx.insert_outbox(item)
        cutoffs = {
            "idempotency_before": at(0),
            "dedupe_before": at(0),
            "parked_before": at(0),
            "sessions_before": at(500),
        }
        assert await store.prune(**cutoffs) == 0
        assert await store.get_session(sessions["old"].id) is not None
        item.status, item.done_at = OutboxStatus.FAILED, at(20)
        async with store.transaction() as tx:
            assert await tx.update_outbox(item)
        assert await store.prune(**cutoffs) == 2
        assert await store.get_session(sessions["old"].id) is None

    async def test_a_reopened_store_keeps_its_head_when_the_newest_events_went(
        self, open_store: OpenStore
    ) -> None:
        first = await open_store()
        sessions = await self.given(first, {"old": 10}, 0)
        async with first.transaction() as tx:
            old = sessions["old"]
            for n in range(3):
                head = await tx.append_event(old.id, old.user_id, at(n), Queued(n))
        await first.prune(
            idempotency_before=at(0),
            dedupe_before=at(0),
            parked_before=at(0),
            sessions_before=at(500),
        )
        await first.close()
        second = await open_store()
        # A client resuming from the last cursor it saw is not "ahead of the log".
        assert await second.head() == head
        async with second.transaction() as tx:
            assert await tx.append_event("s", "u", at(600), Queued()) == head + 1
