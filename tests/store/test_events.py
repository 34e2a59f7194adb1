"""Contract: the event log, cursors and wake-ups; dedupe keys; parked events."""

from __future__ import annotations

import asyncio

import pytest

from hitl_service.store.base import Store, Tx
from providers.types import (
    Agent,
    AgentAssigned,
    AgentLeft,
    AgentMessage,
    Author,
    ButtonKind,
    Card,
    CardButton,
    Ended,
    EndedBy,
    Failed,
    InboundEvent,
    Location,
    LogKind,
    Media,
    MediaKind,
    Message,
    Queued,
    Started,
    Transferred,
)
from tests.store.conftest import OpenStore
from tests.store.factories import T0, at
from tests.store.helpers import Boom, rolled_back

BOB = Agent(id="bob@example.com", name="Bob", avatar_url="https://example.com/bob.png")
EVERY_KIND: list[LogKind] = [
    Started(provider="livechat", external_chat_id="C1", group_id="2"),
    Queued(position=3, wait_seconds=40),
    AgentAssigned(agent=BOB),
    AgentMessage(message=Message(body="hello ünïcødé ✓", author=Author.AGENT, id="m1"), agent=BOB),
    AgentMessage(
        message=Message(
            body=Media(MediaKind.IMAGE, "https://x/y.png", "y.png", "image/png", 1234, "cap"),
            created_at=at(1),
        ),
        agent=BOB,
    ),
    AgentMessage(message=Message(body=Location(52.5, 13.4, "Berlin", "Somewhere 1")), agent=BOB),
    AgentMessage(
        message=Message(
            body=Card("T", "S", "https://x/i.png", (CardButton("Go", ButtonKind.URL, "https://x"),))
        ),
        agent=BOB,
    ),
    Transferred(from_agent=BOB, to_group_id="5", reason="skills", to_agent=None),
    Transferred(from_agent=None, to_agent=Agent(id="eve")),
    Ended(reason="resolved", by=EndedBy.AGENT),
    Failed(code="START_REFUSED", detail="no agents"),
]


async def _append(store: Store, *kinds: LogKind, session_id: str = "ses_1") -> list[int]:
    async with store.transaction() as tx:
        return [await tx.append_event(session_id, "usr_1", T0, kind) for kind in kinds]


class TestLog:
    async def test_empty_log(self, store: Store) -> None:
        assert await store.head() == 0
        assert list(await store.read_events(after=0, limit=10)) == []

    async def test_cursors_increase_and_every_kind_round_trips(self, store: Store) -> None:
        cursors = await _append(store, *EVERY_KIND)
        assert cursors == sorted(cursors)
        assert len(set(cursors)) == len(cursors)
        assert cursors[0] > 0
        events = list(await store.read_events(after=0, limit=100))
        assert [e.seq for e in events] == cursors
        assert [e.kind for e in events] == EVERY_KIND
        assert all(e.session_id == "ses_1" and e.user_id == "usr_1" for e in events)
        assert all(e.occurred_at == T0 for e in events)
        assert await store.head() == cursors[-1]

    async def test_cursors_keep_increasing_across_transactions(self, store: Store) -> None:
        first = await _append(store, Queued(1), Queued(2))
        second = await _append(store, Queued(3))
        assert second[0] > first[-1]

    async def test_read_after_cursor_with_limit_and_session_filter(self, store: Store) -> None:
        a1, b1, a2, b2, a3 = [
            (await _append(store, Queued(i), session_id=sid))[0]
            for i, sid in enumerate(["A", "B", "A", "B", "A"])
        ]
        assert [e.seq for e in await store.read_events(after=0, limit=2)] == [a1, b1]
        assert [e.seq for e in await store.read_events(after=b1, limit=10)] == [a2, b2, a3]
        assert [e.seq for e in await store.read_events(after=0, limit=10, session_id="A")] == [
            a1,
            a2,
            a3,
        ]
        assert [e.seq for e in await store.read_events(after=a1, limit=1, session_id="A")] == [a2]
        assert [e.seq for e in await store.read_events(after=b2, limit=10, session_id="B")] == []
        assert list(await store.read_events(after=a3, limit=10)) == []

    async def test_occurred_at_keeps_the_instant(self, store: Store) -> None:
        async with store.transaction() as tx:
            await tx.append_event("s", "u", at(0.000001), Queued())
        (event,) = await store.read_events(after=0, limit=1)
        assert event.occurred_at == at(0.000001)
        assert event.occurred_at.utcoffset() is not None


class TestWaitForEvents:
    async def test_returns_at_once_when_the_head_is_past_after(self, store: Store) -> None:
        (cursor,) = await _append(store, Queued())
        await asyncio.wait_for(store.wait_for_events(cursor - 1, timeout=60), 30)

    async def test_wakes_on_commit(self, store: Store) -> None:
        after = await store.head()
        waiter = asyncio.create_task(store.wait_for_events(after, timeout=60))
        await asyncio.sleep(0)  # let the waiter park (a yield, not a timed sleep)
        assert not waiter.done()
        async with store.transaction() as tx:
            await tx.append_event("s", "u", T0, Queued())
            await asyncio.sleep(0)
            assert not waiter.done(), "woke before the commit"
        await asyncio.wait_for(waiter, 30)
        assert await store.head() > after

    async def test_times_out_without_events(self, store: Store) -> None:
        await _append(store, Queued())
        head = await store.head()
        await store.wait_for_events(head, timeout=0.05)
        assert await store.head() == head

    async def test_a_rolled_back_append_wakes_nobody(self, store: Store) -> None:
        head = await store.head()
        waiter = asyncio.create_task(store.wait_for_events(head, timeout=0.2))

        async def append(tx: Tx) -> None:
            await tx.append_event("s", "u", T0, Queued())

        with pytest.raises(Boom):
            await rolled_back(store, append)
        await waiter
        assert await store.head() == head
        assert list(await store.read_events(after=0, limit=10)) == []

    async def test_close_releases_waiters(self, open_store: OpenStore) -> None:
        store = await open_store()
        waiter = asyncio.create_task(store.wait_for_events(await store.head(), timeout=60))
        await asyncio.sleep(0)
        await store.close()
        await asyncio.wait_for(waiter, 30)


class TestDedupeKeys:
    async def test_second_claim_is_false(self, store: Store) -> None:
        async with store.transaction() as tx:
            assert await tx.claim_dedupe_key("livechat", "k1", T0)
            assert not await tx.claim_dedupe_key("livechat", "k1", T0)
            assert await tx.claim_dedupe_key("local", "k1", T0)
        async with store.transaction() as tx:
            assert not await tx.claim_dedupe_key("livechat", "k1", at(1))
            assert await tx.claim_dedupe_key("livechat", "k2", at(1))

    async def test_a_rolled_back_claim_is_forgotten(self, store: Store) -> None:
        async def claim(tx: Tx) -> None:
            assert await tx.claim_dedupe_key("livechat", "k1", T0)

        with pytest.raises(Boom):
            await rolled_back(store, claim)
        async with store.transaction() as tx:
            assert await tx.claim_dedupe_key("livechat", "k1", T0)


def _parked(chat: str, n: int) -> InboundEvent:
    return InboundEvent(
        external_chat_id=chat,
        kind=AgentMessage(message=Message(body=f"msg {n}", author=Author.AGENT), agent=BOB),
        dedupe_key=f"{chat}-{n}",
        occurred_at=at(n),
        author_id="bob",
    )


class TestParkedEvents:
    async def _park(self, tx: Tx, provider: str, *events: InboundEvent) -> None:
        for event in events:
            await tx.park_event(provider, event, T0)

    async def test_take_returns_oldest_first_and_removes(self, store: Store) -> None:
        c1 = [_parked("C1", n) for n in range(4)]
        async with store.transaction() as tx:
            await self._park(tx, "livechat", c1[0], _parked("C2", 9), c1[1])
            await self._park(tx, "local", _parked("C1", 8))
        async with store.transaction() as tx:
            await self._park(tx, "livechat", c1[2], c1[3])
        async with store.transaction() as tx:
            assert await tx.take_parked_events("livechat", "C1") == c1
            assert await tx.take_parked_events("livechat", "C1") == []
        async with store.transaction() as tx:
            assert await tx.take_parked_events("livechat", "C2") == [_parked("C2", 9)]
            assert await tx.take_parked_events("local", "C1") == [_parked("C1", 8)]
            assert await tx.take_parked_events("livechat", "C3") == []

    async def test_a_repeatable_event_stays_repeatable(self, store: Store) -> None:
        leave = InboundEvent("C1", AgentLeft(agent=BOB), "left-C1", repeatable=True)
        async with store.transaction() as tx:
            await self._park(tx, "livechat", leave)
        async with store.transaction() as tx:
            assert await tx.take_parked_events("livechat", "C1") == [leave]

    async def test_take_in_a_rolled_back_transaction_keeps_them(self, store: Store) -> None:
        async with store.transaction() as tx:
            await self._park(tx, "livechat", _parked("C1", 1))

        async def take(tx: Tx) -> None:
            assert len(await tx.take_parked_events("livechat", "C1")) == 1

        with pytest.raises(Boom):
            await rolled_back(store, take)
        async with store.transaction() as tx:
            assert await tx.take_parked_events("livechat", "C1") == [_parked("C1", 1)]
