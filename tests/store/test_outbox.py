"""Contract: the outbox (head of queue, claims, leases, updates) and idempotency."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import pytest

from hitl_service.domain import IdempotencyRecord, OutboxItem, OutboxKind, OutboxStatus
from hitl_service.store.base import DuplicateKey, Store, Tx
from tests.store.conftest import Backend
from tests.store.factories import T0, at, make_outbox
from tests.store.helpers import Boom, rolled_back


async def _insert(store: Store, *items: OutboxItem) -> list[bool]:
    async with store.transaction() as tx:
        return [await tx.insert_outbox(item) for item in items]


async def _claim(
    store: Store, owner: str = "w1", *, now: float = 0, lease: float = 30, limit: int = 10
) -> list[OutboxItem]:
    async with store.transaction() as tx:
        return await tx.claim_outbox(owner, at(now), at(now + lease), limit)


async def _finish(store: Store, item: OutboxItem, status: OutboxStatus = OutboxStatus.DONE) -> None:
    item.status, item.done_at, item.lease_owner, item.lease_until = status, at(1), "", None
    async with store.transaction() as tx:
        await tx.update_outbox(item)


class TestInsert:
    async def test_head_of_queue_per_session(self, store: Store) -> None:
        a1, a2, b1 = make_outbox("A"), make_outbox("A"), make_outbox("B")
        assert await _insert(store, a1, a2, b1) == [True, False, True]
        assert await store.get_outbox(a1.id) == a1
        async with store.transaction() as tx:
            assert await tx.get_outbox(a2.id) == a2
            assert await tx.get_outbox("out_missing") is None
        assert await store.get_outbox("out_missing") is None

    async def test_head_again_once_earlier_items_are_finished(self, store: Store) -> None:
        a1, a2, a3 = make_outbox("A"), make_outbox("A"), make_outbox("A")
        await _insert(store, a1, a2)
        await _finish(store, a1)
        assert await _insert(store, a3) == [False]  # a2 is still pending
        await _finish(store, a2, OutboxStatus.FAILED)
        await _finish(store, a3)
        assert await _insert(store, make_outbox("A")) == [True]


class TestClaim:
    async def test_only_due_unleased_heads_in_insertion_order(self, store: Store) -> None:
        a1, a2 = make_outbox("A"), make_outbox("A")
        b1 = make_outbox("B", next_attempt_at=at(100))  # not due yet
        c1 = make_outbox("C", lease_owner="old", lease_until=at(50))  # leased
        d1 = make_outbox("D", status=OutboxStatus.DONE, done_at=T0)
        e1 = make_outbox("E")
        await _insert(store, a1, a2, b1, c1, d1, e1)
        claimed = await _claim(store, "w1", now=10, lease=30)
        assert [i.id for i in claimed] == [a1.id, e1.id]
        for item in claimed:
            assert (item.lease_owner, item.lease_until) == ("w1", at(40))
            assert await store.get_outbox(item.id) == item

    async def test_leased_items_are_not_claimed_again_until_the_lease_ends(
        self, store: Store
    ) -> None:
        item = make_outbox("A")
        await _insert(store, item)
        assert [i.id for i in await _claim(store, "w1", now=0, lease=30)] == [item.id]
        assert await _claim(store, "w2", now=29) == []
        again = await _claim(store, "w2", now=30)  # lease_until <= now: expired
        assert [(i.id, i.lease_owner, i.lease_until) for i in again] == [(item.id, "w2", at(60))]

    async def test_fifo_per_session(self, store: Store) -> None:
        items = [make_outbox("A") for _ in range(3)]
        await _insert(store, *items)
        order = []
        for _ in items:
            (claimed,) = await _claim(store)
            assert await _claim(store) == []  # the next one waits for this one
            order.append(claimed.id)
            await _finish(store, claimed)
        assert order == [i.id for i in items]
        assert await _claim(store) == []

    async def test_limit(self, store: Store) -> None:
        items = [make_outbox(f"S{n}") for n in range(5)]
        await _insert(store, *items)
        assert [i.id for i in await _claim(store, limit=2)] == [i.id for i in items[:2]]
        assert [i.id for i in await _claim(store, limit=10)] == [i.id for i in items[2:]]

    async def test_a_rolled_back_claim_leaves_no_lease(self, store: Store) -> None:
        item = make_outbox("A")
        await _insert(store, item)

        async def claim(tx: Tx) -> None:
            assert await tx.claim_outbox("w1", T0, at(30), 10)

        with pytest.raises(Boom):
            await rolled_back(store, claim)
        assert await store.get_outbox(item.id) == item


class TestQueue:
    """Items behind a pending one wait out of the claims' sight until it settles."""

    async def test_a_failed_head_lets_the_next_one_out(self, store: Store) -> None:
        a1, a2, a3 = make_outbox("A"), make_outbox("A"), make_outbox("A")
        await _insert(store, a1, a2, a3)
        assert [i.id for i in await _claim(store)] == [a1.id]
        await _finish(store, a1, OutboxStatus.FAILED)
        assert [i.id for i in await _claim(store)] == [a2.id]

    async def test_an_ended_session_lets_its_stop_out(self, store: Store) -> None:
        send = make_outbox("A")
        stop = make_outbox("A", kind=OutboxKind.STOP)
        await _insert(store, send, make_outbox("A"), stop)
        async with store.transaction() as tx:
            assert len(await tx.fail_pending_outbox("A", at(5), "SESSION_ENDED", "ended")) == 2
        assert [i.id for i in await _claim(store)] == [stop.id]

    async def test_a_send_in_flight_stays_ahead_of_what_an_end_leaves(self, store: Store) -> None:
        flying, queued = make_outbox("A", attempts=1), make_outbox("A", kind=OutboxKind.STOP)
        await _insert(store, flying, make_outbox("A"), queued)
        async with store.transaction() as tx:
            await tx.fail_pending_outbox("A", at(5), "SESSION_ENDED", "ended")
        assert [i.id for i in await _claim(store)] == [flying.id]
        await _finish(store, flying)
        assert [i.id for i in await _claim(store, now=1)] == [queued.id]

    async def test_items_an_older_release_left_queued_are_let_out(
        self, store: Store, backend: Backend
    ) -> None:
        head, behind = make_outbox("A"), make_outbox("A")
        await _insert(store, head, behind, make_outbox("B"))
        # An older release settles the head without letting the next one out.
        await backend.execute(f"UPDATE outbox SET status = 'done' WHERE id = '{head.id}'")
        assert [i.session_id for i in await _claim(store)] == ["B"]
        assert await store.unqueue_stranded_outbox() == 1
        assert [i.id for i in await _claim(store)] == [behind.id]
        assert await store.unqueue_stranded_outbox() == 0

    async def test_the_next_due_time_is_the_stats_one(self, store: Store) -> None:
        async def both(now: float) -> datetime | None:
            due = await store.outbox_next_due(at(now))
            assert due == (await store.outbox_stats())[1]
            return due

        assert await both(0) is None
        head, behind = make_outbox("A"), make_outbox("A", next_attempt_at=at(3))
        await _insert(store, head)
        await _claim(store, now=1, lease=30)
        assert await both(1) == at(31)  # the lease's end
        await _insert(store, behind)
        # Due, though not claimable: the head's settle must wake the loop.
        assert await both(1) == at(3)
        await _insert(store, make_outbox("B", next_attempt_at=at(2), attempts=1))
        assert await both(1) == at(2)
        await _insert(store, make_outbox("C", next_attempt_at=at(600), attempts=1))
        assert await both(1) == at(2)


class TestUpdate:
    async def test_every_field_round_trips(self, store: Store) -> None:
        item = make_outbox("A", kind=OutboxKind.STOP, payload={"reason": "bye", "by": "caller"})
        await _insert(store, item)
        changed = dataclasses.replace(
            item,
            status=OutboxStatus.DONE,
            attempts=3,
            attempts_settled=2,
            next_attempt_at=at(20),
            lease_owner="w9",
            lease_until=at(25),
            last_error="timeout",
            error_code="PROVIDER_TIMEOUT",
            result={"external_message_id": "m-1", "nested": [1, {"a": None}]},
            done_at=at(21),
        )
        async with store.transaction() as tx:
            await tx.update_outbox(changed)
        stored = await store.get_outbox(item.id)
        assert stored == changed
        assert stored is not None
        assert (stored.attempts, stored.attempts_settled) == (3, 2)
        async with store.transaction() as tx:
            await tx.update_outbox(item)  # back to the empty values
        assert await store.get_outbox(item.id) == item

    async def test_a_lease_guard_writes_only_for_the_lease_holder(self, store: Store) -> None:
        item = make_outbox("A")
        await _insert(store, item)
        [claimed] = await _claim(store, "w2")  # w2 took the item over
        late = dataclasses.replace(claimed, last_error="late", lease_owner="", lease_until=None)
        async with store.transaction() as tx:
            assert not await tx.update_outbox(late, leased_by="w1")
        assert await store.get_outbox(item.id) == claimed  # untouched
        async with store.transaction() as tx:
            assert await tx.update_outbox(late, leased_by="w2")
            assert await tx.update_outbox(late)  # unguarded: always
        assert await store.get_outbox(item.id) == late


class TestFailPending:
    async def test_fails_only_pending_sends_of_the_session(self, store: Store) -> None:
        done = make_outbox("A", status=OutboxStatus.DONE, done_at=T0)
        s1, s2 = make_outbox("A"), make_outbox("A")
        stop = make_outbox("A", kind=OutboxKind.STOP)
        other = make_outbox("B")
        await _insert(store, done, s1, stop, s2, other)
        async with store.transaction() as tx:
            ids = await tx.fail_pending_outbox("A", at(5), "SESSION_ENDED", "the session ended")
        assert ids == [s1.id, s2.id]
        for item in (s1, s2):
            stored = await store.get_outbox(item.id)
            assert stored == dataclasses.replace(
                item,
                status=OutboxStatus.FAILED,
                error_code="SESSION_ENDED",
                last_error="the session ended",
                done_at=at(5),
            )
        for untouched in (done, stop, other):
            assert await store.get_outbox(untouched.id) == untouched
        async with store.transaction() as tx:
            assert await tx.fail_pending_outbox("A", at(6), "X", "x") == []

    async def test_clears_a_lease(self, store: Store) -> None:
        item = make_outbox("A")
        await _insert(store, item)
        await _claim(store, "w1")
        async with store.transaction() as tx:
            assert await tx.fail_pending_outbox("A", at(5), "C", "m") == [item.id]
        stored = await store.get_outbox(item.id)
        assert stored is not None
        assert (stored.lease_owner, stored.lease_until) == ("", None)


class TestStats:
    async def test_counts_pending_and_earliest_due(self, store: Store) -> None:
        assert await store.outbox_stats() == (0, None)
        await _insert(
            store,
            # Retries, due later.
            make_outbox("A", next_attempt_at=at(30), attempts=1),
            make_outbox("A", next_attempt_at=at(10), attempts=2, attempts_settled=2),
            make_outbox("B", next_attempt_at=at(20), attempts=1),
            make_outbox("C", status=OutboxStatus.DONE, next_attempt_at=at(1), done_at=T0),
        )
        assert await store.outbox_stats() == (3, at(10))

    async def test_items_scheduled_for_later_are_no_backlog(self, store: Store) -> None:
        # A given-up start's close, due HITL_ABANDON_AFTER after it was stored.
        await _insert(store, make_outbox("A", kind=OutboxKind.STOP, next_attempt_at=at(600)))
        assert await store.outbox_stats() == (0, at(600))  # the loop still wakes for it
        await _insert(store, make_outbox("B"), make_outbox("C", next_attempt_at=at(5), attempts=1))
        assert await store.outbox_stats() == (2, T0)


class TestPullIn:
    """Times further ahead than any writer sets: its clock was stepped back
    since (``Store.pull_in_outbox``). ``now`` is 0; the bounds 60 s ahead,
    960 s after an uncertain attempt; a scheduled first attempt is brought
    to 600 s."""

    async def _pull_in(self, store: Store) -> tuple[int, int]:
        return await store.pull_in_outbox(
            T0,
            lease_by=at(60),
            due_by=at(60),
            uncertain_by=at(960),
            scheduled_by=at(660),
            scheduled_to=at(600),
        )

    async def test_leases_and_due_times_beyond_the_bounds_come_in(self, store: Store) -> None:
        leased = make_outbox("A", attempts=1, lease_owner="w1", lease_until=at(3630))
        queued = make_outbox("A", created_at=at(3600), next_attempt_at=at(3600))
        retry = make_outbox("B", attempts=2, attempts_settled=2, next_attempt_at=at(3610))
        uncertain = make_outbox("E", attempts=2, attempts_settled=1, next_attempt_at=at(3615))
        abandon = make_outbox(
            "C", kind=OutboxKind.STOP, created_at=at(3600), next_attempt_at=at(4200)
        )
        retried_abandon = make_outbox(
            "D", kind=OutboxKind.STOP, attempts=1, created_at=at(3600), next_attempt_at=at(3610)
        )
        await _insert(store, leased, queued, retry, uncertain, abandon, retried_abandon)
        assert await self._pull_in(store) == (1, 5)
        pulled = (leased, queued, retry, uncertain)
        got = {item.id: await store.get_outbox(item.id) for item in pulled}
        assert {i: (g.lease_until, g.next_attempt_at) for i, g in got.items() if g} == {
            leased.id: (T0, T0),
            queued.id: (None, T0),
            retry.id: (None, T0),
            uncertain.id: (None, T0),
        }
        # An abandon keeps the time a retry of its start has to reuse the chat.
        stored = await store.get_outbox(abandon.id)
        assert stored is not None
        assert (stored.created_at, stored.next_attempt_at) == (T0, at(600))
        stored = await store.get_outbox(retried_abandon.id)
        assert stored is not None
        assert stored.next_attempt_at == T0
        assert await self._pull_in(store) == (0, 0)  # once

    async def test_times_within_the_bounds_stay(self, store: Store) -> None:
        items = [
            make_outbox("A", attempts=1, lease_owner="w1", lease_until=at(60)),
            make_outbox("B", attempts=1, attempts_settled=1, next_attempt_at=at(60)),
            # The provider may still act on the uncertain attempt for 900 s.
            make_outbox("E", attempts=1, next_attempt_at=at(900)),
            make_outbox("C", kind=OutboxKind.STOP, next_attempt_at=at(660)),
            make_outbox("D", status=OutboxStatus.DONE, done_at=T0, next_attempt_at=at(3600)),
        ]
        await _insert(store, *items)
        assert await self._pull_in(store) == (0, 0)
        assert [await store.get_outbox(item.id) for item in items] == items


class TestIdempotency:
    async def test_put_get_duplicate_delete(self, store: Store) -> None:
        record = IdempotencyRecord("start", "req-1", "hash-1", "ses_1", T0)
        async with store.transaction() as tx:
            assert await tx.get_idempotency("start", "req-1") is None
            await tx.put_idempotency(record)
            assert await tx.get_idempotency("start", "req-1") == record
        other_scope = IdempotencyRecord("send", "req-1", "hash-2", "msg_1", T0)
        async with store.transaction() as tx:
            with pytest.raises(DuplicateKey):
                await tx.put_idempotency(IdempotencyRecord("start", "req-1", "h", "x", at(1)))
            # Still usable after the refusal; same key in another scope is fine.
            await tx.put_idempotency(other_scope)
            assert await tx.get_idempotency("start", "req-1") == record
        async with store.transaction() as tx:
            await tx.delete_idempotency("start", "req-1")
            assert await tx.get_idempotency("start", "req-1") is None
            assert await tx.get_idempotency("send", "req-1") == other_scope
            await tx.delete_idempotency("start", "req-unknown")
