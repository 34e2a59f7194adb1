"""Contract: sessions, the one-open-session rule, lookups and listings."""

from __future__ import annotations

import dataclasses

import pytest

from hitl_service.domain import Session, SessionState, User
from hitl_service.store.base import OpenSessionExists, Store
from providers.types import Agent, EndedBy
from tests.store.factories import at, make_session, make_user


async def _user(store: Store, **fields: object) -> User:
    user = make_user(**fields)
    async with store.transaction() as tx:
        await tx.insert_user(user)
    return user


async def _insert(store: Store, *sessions: Session) -> None:
    async with store.transaction() as tx:
        for session in sessions:
            await tx.insert_session(session)


def _full(session: Session) -> Session:
    """``session`` with every optional field set."""
    return dataclasses.replace(
        session,
        state=SessionState.ASSIGNED,
        request_id="req-1",
        title="Refund",
        description="Wants a refund for order 7",
        group_id="3",
        metadata={"order": "7", "tier": "gold"},
        external_chat_id="CHAT1",
        chat_state={"thread_id": "T1", "nested": {"a": [1, 2.5, None, True]}},
        agent=Agent(id="agent@example.com", name="Bob", avatar_url="https://a/b.png"),
        updated_at=at(5),
        ended_at=at(9),
        end_reason="done",
        ended_by=EndedBy.AGENT,
        stop_requested_at=at(8),
        last_activity_at=at(7),
        catch_up_checkpoint="cp-3",
        waiting_since=at(6),
    )


class TestInsertAndRead:
    async def test_defaults_round_trip(self, store: Store) -> None:
        user = await _user(store)
        session = make_session(user.id)
        await _insert(store, session)
        assert await store.get_session(session.id) == session
        async with store.transaction() as tx:
            assert await tx.get_session(session.id) == session
            assert await tx.get_session("ses_missing") is None
        assert await store.get_session("ses_missing") is None

    async def test_every_field_round_trips(self, store: Store) -> None:
        user = await _user(store)
        session = _full(make_session(user.id))
        await _insert(store, session)
        assert await store.get_session(session.id) == session

    async def test_update_saves_every_mutable_field(self, store: Store) -> None:
        user = await _user(store)
        session = make_session(user.id, state=SessionState.STARTING)
        await _insert(store, session)
        full = _full(session)
        async with store.transaction() as tx:
            await tx.update_session(full)
        assert await store.get_session(session.id) == full
        # ...and back to the empty values (NULL agent, no timestamps).
        async with store.transaction() as tx:
            await tx.update_session(session)
        assert await store.get_session(session.id) == session


class TestOneOpenSession:
    async def test_second_open_session_names_the_first(self, store: Store) -> None:
        user = await _user(store)
        first = make_session(user.id)
        await _insert(store, first)
        second = make_session(user.id, state=SessionState.STARTING)
        other = await _user(store)
        async with store.transaction() as tx:
            with pytest.raises(OpenSessionExists) as caught:
                await tx.insert_session(second)
            assert caught.value.session_id == first.id
            # The transaction is still usable after the refusal.
            await tx.insert_session(make_session(other.id))
        assert await store.get_session(second.id) is None
        assert (
            len(await store.list_sessions(user_id=other.id, state=None, before=None, limit=10)) == 1
        )

    @pytest.mark.parametrize("closed", [SessionState.ENDED, SessionState.FAILED])
    async def test_a_closed_session_does_not_count(
        self, store: Store, closed: SessionState
    ) -> None:
        user = await _user(store)
        await _insert(store, make_session(user.id, state=closed))
        fresh = make_session(user.id)
        await _insert(store, fresh)
        assert await store.get_session(fresh.id) == fresh

    async def test_other_provider_is_independent(self, store: Store) -> None:
        user = await _user(store)
        await _insert(store, make_session(user.id, provider="livechat"))
        local = make_session(user.id, provider="local")
        await _insert(store, local)
        assert await store.get_session(local.id) == local

    async def test_ending_frees_the_slot(self, store: Store) -> None:
        user = await _user(store)
        first = make_session(user.id)
        await _insert(store, first)
        first.state = SessionState.ENDED
        async with store.transaction() as tx:
            await tx.update_session(first)
            second = make_session(user.id)
            await tx.insert_session(second)
        assert (await store.get_session(second.id)) == second

    async def test_find_open_session(self, store: Store) -> None:
        user = await _user(store)
        await _insert(store, make_session(user.id, state=SessionState.ENDED))
        open_one = make_session(user.id, state=SessionState.QUEUED)
        await _insert(store, open_one)
        async with store.transaction() as tx:
            assert await tx.find_open_session(user.id, "livechat") == open_one
            assert await tx.find_open_session(user.id, "local") is None


class TestLookups:
    async def test_find_by_chat_returns_the_newest(self, store: Store) -> None:
        user = await _user(store)
        old = make_session(user.id, state=SessionState.ENDED, external_chat_id="C1")
        new = make_session(user.id, external_chat_id="C1", created_at=at(10))
        await _insert(store, old, new)
        async with store.transaction() as tx:
            assert await tx.find_session_by_chat("livechat", "C1") == new
            assert await tx.find_session_by_chat("local", "C1") is None
            assert await tx.find_session_by_chat("livechat", "C2") is None

    async def test_find_by_chat_breaks_time_ties_by_id(self, store: Store) -> None:
        user = await _user(store)
        a = make_session(user.id, state=SessionState.ENDED, external_chat_id="C1")
        b = make_session(user.id, external_chat_id="C1")  # same created_at, larger id
        await _insert(store, a, b)
        async with store.transaction() as tx:
            assert await tx.find_session_by_chat("livechat", "C1") == b

    async def test_last_session_with_chat(self, store: Store) -> None:
        user = await _user(store)
        async with store.transaction() as tx:
            assert await tx.last_session_with_chat(user.id, "livechat") is None
        with_chat = make_session(user.id, state=SessionState.ENDED, external_chat_id="C1")
        newer_chat = make_session(
            user.id, state=SessionState.ENDED, external_chat_id="C2", created_at=at(5)
        )
        newest_without = make_session(user.id, state=SessionState.FAILED, created_at=at(9))
        await _insert(store, with_chat, newer_chat, newest_without)
        async with store.transaction() as tx:
            assert await tx.last_session_with_chat(user.id, "livechat") == newer_chat
            assert await tx.last_session_with_chat(user.id, "local") is None

    async def test_has_starting_sessions(self, store: Store) -> None:
        user, other = await _user(store), await _user(store)
        await _insert(store, make_session(user.id, state=SessionState.REQUESTED))
        async with store.transaction() as tx:
            assert not await tx.has_starting_sessions("livechat")
        await _insert(store, make_session(other.id, state=SessionState.STARTING))
        async with store.transaction() as tx:
            assert await tx.has_starting_sessions("livechat")
            assert not await tx.has_starting_sessions("local")


class TestListSessions:
    async def _population(self, store: Store) -> tuple[User, User, list[Session]]:
        alice, bob = await _user(store), await _user(store)
        states = [
            SessionState.ENDED,
            SessionState.FAILED,
            SessionState.ENDED,
            SessionState.ENDED,
            SessionState.STARTING,
        ]
        sessions = []
        # Pairs share a created_at, so the id tie-break matters.
        for i, state in enumerate(states):
            sessions.append(make_session(alice.id, state=state, created_at=at(i // 2)))
        sessions.append(make_session(bob.id, state=SessionState.ENDED, created_at=at(1)))
        sessions.append(make_session(bob.id, state=SessionState.REQUESTED, created_at=at(3)))
        await _insert(store, *sessions)
        return alice, bob, sessions

    @staticmethod
    def _newest_first(sessions: list[Session]) -> list[Session]:
        return sorted(sessions, key=lambda s: (s.created_at, s.id), reverse=True)

    async def _pages(
        self, store: Store, *, user_id: str = "", state: SessionState | None = None, limit: int
    ) -> list[Session]:
        seen: list[Session] = []
        before = None
        while True:
            page = await store.list_sessions(
                user_id=user_id, state=state, before=before, limit=limit
            )
            assert len(page) <= limit
            seen.extend(page)
            if len(page) < limit:
                return seen
            before = (page[-1].created_at, page[-1].id)

    @pytest.mark.parametrize("limit", [1, 2, 3, 100])
    async def test_keyset_pages_newest_first(self, store: Store, limit: int) -> None:
        _, _, sessions = await self._population(store)
        assert await self._pages(store, limit=limit) == self._newest_first(sessions)

    async def test_filter_by_user(self, store: Store) -> None:
        _, bob, sessions = await self._population(store)
        expected = self._newest_first([s for s in sessions if s.user_id == bob.id])
        assert await self._pages(store, user_id=bob.id, limit=1) == expected
        assert await store.list_sessions(user_id="usr_none", state=None, before=None, limit=5) == []

    async def test_filter_by_state(self, store: Store) -> None:
        alice, _, sessions = await self._population(store)
        ended = self._newest_first([s for s in sessions if s.state is SessionState.ENDED])
        assert await self._pages(store, state=SessionState.ENDED, limit=2) == ended
        alice_ended = [s for s in ended if s.user_id == alice.id]
        assert (
            await self._pages(store, user_id=alice.id, state=SessionState.ENDED, limit=2)
            == alice_ended
        )

    async def test_requested_matches_starting(self, store: Store) -> None:
        _, _, sessions = await self._population(store)
        expected = self._newest_first(
            [s for s in sessions if s.state in (SessionState.REQUESTED, SessionState.STARTING)]
        )
        assert len(expected) == 2
        assert await self._pages(store, state=SessionState.REQUESTED, limit=5) == expected
        starting = [s for s in expected if s.state is SessionState.STARTING]
        assert await self._pages(store, state=SessionState.STARTING, limit=5) == starting

    async def test_list_open_sessions_by_id(self, store: Store) -> None:
        _, _, sessions = await self._population(store)
        expected = sorted((s for s in sessions if s.state.is_open), key=lambda s: s.id)
        assert await store.list_open_sessions(after_id="", limit=10) == expected
        first = await store.list_open_sessions(after_id="", limit=1)
        rest = await store.list_open_sessions(after_id=first[0].id, limit=10)
        assert first + rest == expected
        assert await store.list_open_sessions(after_id=expected[-1].id, limit=10) == []
