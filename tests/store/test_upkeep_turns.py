"""Turns of periodic upkeep (``Tx.take_turn``), on both backends."""

from __future__ import annotations

import asyncio

from hitl_service.store.base import Store
from tests.store.conftest import OpenStore
from tests.store.factories import at


async def take(
    store: Store, job: str, now: float, until: float, stale_after: float | None = None
) -> bool:
    stale = None if stale_after is None else at(stale_after)
    async with store.transaction() as tx:
        return await tx.take_turn(job, at(now), at(until), stale_after=stale)


class TestTakeTurn:
    async def test_a_turn_is_taken_once_until_it_ends(self, store: Store) -> None:
        assert await take(store, "catch_up", 0, 54)  # the first caller
        assert not await take(store, "catch_up", 0, 54)
        assert not await take(store, "catch_up", 53.9, 108)
        assert await take(store, "catch_up", 54, 108)  # ends at 54: free again
        assert not await take(store, "catch_up", 60, 114)  # the new turn holds

    async def test_jobs_have_turns_of_their_own(self, store: Store) -> None:
        assert await take(store, "catch_up", 0, 54)
        assert await take(store, "prune", 0, 3240)
        assert not await take(store, "prune", 100, 3340)

    async def test_a_refused_turn_changes_nothing(self, store: Store) -> None:
        assert await take(store, "prune", 0, 100)
        assert not await take(store, "prune", 50, 500)  # would end later: refused
        assert await take(store, "prune", 100, 200)  # still ends at 100

    async def test_a_turn_ending_further_ahead_than_any_is_taken_to_is_free(
        self, store: Store
    ) -> None:
        # Taken for 54 s by a clock an hour ahead of the one now asking.
        assert await take(store, "catch_up", 3600, 3654)
        assert not await take(store, "catch_up", 0, 54)  # as before, without the bound
        assert not await take(store, "catch_up", 0, 54, stale_after=3654)
        assert await take(store, "catch_up", 0, 54, stale_after=65)
        assert not await take(store, "catch_up", 10, 64, stale_after=75)  # this turn holds

    async def test_concurrent_replicas_get_one_turn_between_them(
        self, store: Store, open_store: OpenStore
    ) -> None:
        others = [await open_store() for _ in range(3)]
        for round_ in range(5):
            start = round_ * 60.0
            taken = await asyncio.gather(
                *(take(s, "catch_up", start, start + 54) for s in [store, *others])
            )
            assert sorted(taken) == [False, False, False, True], round_
