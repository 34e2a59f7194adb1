"""End users: registered by the caller, upserted by ``external_id``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hitl_service.domain import User, new_id
from hitl_service.errors import NotFound
from hitl_service.store.base import DuplicateKey

if TYPE_CHECKING:
    from hitl_service.core.commands import CreateUser
    from hitl_service.core.context import CoreContext


async def create_user(ctx: CoreContext, cmd: CreateUser) -> User:
    """Creates a user, or updates the one with the same ``external_id``.

    The provider is not called: its identity for the user is made when the
    first handoff starts, and refreshed with these details on every start.
    """
    for _ in range(2):  # a concurrent insert of the same external id: retry as update
        now = ctx.clock.now()
        async with ctx.store.transaction() as tx:
            existing = (
                await tx.get_user_by_external_id(cmd.external_id) if cmd.external_id else None
            )
            if existing is not None:
                existing.name = cmd.name
                existing.email = cmd.email
                existing.picture_url = cmd.picture_url
                existing.updated_at = now
                await tx.update_user(existing)
                return existing
            user = User(
                id=new_id("usr"),
                name=cmd.name,
                email=cmd.email,
                picture_url=cmd.picture_url,
                external_id=cmd.external_id,
                created_at=now,
                updated_at=now,
            )
            try:
                await tx.insert_user(user)
            except DuplicateKey:
                continue
            return user
    raise DuplicateKey("users.external_id")  # pragma: no cover - needs two lost races


async def get_user(ctx: CoreContext, user_id: str) -> User:
    """The user, or ``NotFound``."""
    user = await ctx.store.get_user(user_id)
    if user is None:
        raise NotFound("user", user_id)
    return user
