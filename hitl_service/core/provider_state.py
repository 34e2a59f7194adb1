"""What a provider call changed in its user's and chat's state, to persist.

Providers update ``ProviderUser.state`` and ``ProviderChat.state`` in place
(a token renewed, a cursor moved), and may do so before the call fails: a
refresh token spent on the way to an outage is gone, so what changed is
kept whatever the call's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hitl_service.core.context import CoreContext
    from hitl_service.store.base import Tx
    from providers.types import ProviderChat, ProviderUser

# How long the save after a call cut off (cancelled) may take: the shutdown
# waits for the cancelled call, and a store that hangs must not hold it.
CUT_OFF_SAVE_SECONDS = 2.0


class StateWatch:
    """The state of a user and a chat as they were before a provider call."""

    __slots__ = ("_chat_before", "_user_before", "chat", "user")

    def __init__(self, user: ProviderUser, chat: ProviderChat) -> None:
        self.user, self.chat = user, chat
        self._user_before, self._chat_before = dict(user.state), dict(chat.state)

    @property
    def user_changed(self) -> bool:
        return self.user.state != self._user_before

    @property
    def chat_changed(self) -> bool:
        return self.chat.state != self._chat_before

    async def save(self, tx: Tx, ctx: CoreContext, session_id: str, user_id: str) -> None:
        """Writes what changed (within ``tx``)."""
        if self.user_changed:
            await tx.put_provider_user(user_id, ctx.provider_name, self.user)
        if self.chat_changed:
            current = await tx.get_session(session_id)
            if current is not None:
                current.chat_state = dict(self.chat.state)
                await tx.update_session(current)

    async def save_after_failure(
        self, ctx: CoreContext, session_id: str, user_id: str, *, cut_off: bool = False
    ) -> None:
        """Writes what a failed call changed, in a transaction of its own.

        After a call ``cut_off`` (cancelled), within ``CUT_OFF_SAVE_SECONDS``
        and raising nothing: the cancellation must go on (the shutdown waits
        for it); unsaved, a token is renewed once more by the next call.
        """
        if not (self.user_changed or self.chat_changed):
            return
        if not cut_off:
            async with ctx.store.transaction() as tx:
                await self.save(tx, ctx, session_id, user_id)
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CUT_OFF_SAVE_SECONDS), ctx.store.transaction() as tx:
                await self.save(tx, ctx, session_id, user_id)
