"""Contract: users and provider identities."""

from __future__ import annotations

import pytest

from hitl_service.store.base import DuplicateKey, Store
from providers.types import ProviderUser
from tests.store.factories import at, make_user


class TestUsers:
    async def test_insert_then_read_everywhere(self, store: Store) -> None:
        user = make_user()
        async with store.transaction() as tx:
            await tx.insert_user(user)
            assert await tx.get_user(user.id) == user
        assert await store.get_user(user.id) == user
        async with store.transaction() as tx:
            assert await tx.get_user_by_external_id(user.external_id) == user
            assert await tx.get_user_by_external_id("nobody") is None
            assert await tx.get_user("usr_missing") is None
        assert await store.get_user("usr_missing") is None

    async def test_users_without_external_id_do_not_collide(self, store: Store) -> None:
        first, second = make_user(external_id=""), make_user(external_id="")
        async with store.transaction() as tx:
            await tx.insert_user(first)
            await tx.insert_user(second)
        assert await store.get_user(first.id) == first
        assert await store.get_user(second.id) == second

    async def test_duplicate_external_id_raises_and_the_transaction_goes_on(
        self, store: Store
    ) -> None:
        user = make_user(external_id="caller-42")
        async with store.transaction() as tx:
            await tx.insert_user(user)
        other = make_user(external_id="caller-42", name="Impostor")
        survivor = make_user()
        async with store.transaction() as tx:
            with pytest.raises(DuplicateKey):
                await tx.insert_user(other)
            # The failed insert must not poison the rest of the transaction.
            assert await tx.get_user_by_external_id("caller-42") == user
            await tx.insert_user(survivor)
        assert await store.get_user(other.id) is None
        assert await store.get_user(survivor.id) == survivor

    async def test_duplicate_id_raises(self, store: Store) -> None:
        user = make_user()
        async with store.transaction() as tx:
            await tx.insert_user(user)
        with pytest.raises(DuplicateKey):
            async with store.transaction() as tx:
                await tx.insert_user(make_user(id=user.id))

    async def test_update_saves_profile_fields_only(self, store: Store) -> None:
        user = make_user()
        async with store.transaction() as tx:
            await tx.insert_user(user)
        user.name, user.email, user.picture_url = "Grace Hopper", "grace@example.org", ""
        user.updated_at = at(60)
        async with store.transaction() as tx:
            await tx.update_user(user)
        assert await store.get_user(user.id) == user


class TestProviderUsers:
    async def test_put_inserts_then_replaces(self, store: Store) -> None:
        user = make_user()
        async with store.transaction() as tx:
            await tx.insert_user(user)
            assert await tx.get_provider_user(user.id, "livechat") is None
            await tx.put_provider_user(
                user.id, "livechat", ProviderUser("cust-1", {"token": "t1", "n": [1, 2]})
            )
            assert await tx.get_provider_user(user.id, "livechat") == ProviderUser(
                "cust-1", {"token": "t1", "n": [1, 2]}
            )
        async with store.transaction() as tx:
            await tx.put_provider_user(user.id, "livechat", ProviderUser("cust-2", {}))
            await tx.put_provider_user(user.id, "local", ProviderUser("loc-1", {"x": None}))
        assert await store.get_provider_user(user.id, "livechat") == ProviderUser("cust-2", {})
        assert await store.get_provider_user(user.id, "local") == ProviderUser("loc-1", {"x": None})
        assert await store.get_provider_user(user.id, "other") is None
