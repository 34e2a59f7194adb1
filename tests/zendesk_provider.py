"""A third-party provider ("zendesk") as an outside author writes it from the
docs: it imports only the public ``providers`` package, and the tests install
it the documented way, as an entry point (``tests/test_third_party_provider``).
Its faults are scripted through ``HITL_ZENDESK_MODES`` and its attributes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from providers import (
    Capabilities,
    CatchUp,
    Message,
    ProviderChat,
    ProviderConfigError,
    ProviderDeps,
    ProviderUser,
    SendResult,
    StartRequest,
    StartResult,
    UserProfile,
    WebhookBatch,
    WebhookRejected,
)

if TYPE_CHECKING:
    from typing import TextIO

    from starlette.routing import BaseRoute

SendStep = Callable[[ProviderChat, ProviderUser], None]


class ZendeskProvider:
    name = "zendesk"
    capabilities = Capabilities()  # text only, no catch-up

    def __init__(self, deps: ProviderDeps) -> None:
        key = deps.env.get("HITL_ZENDESK_API_KEY", "")
        if not key:
            raise ProviderConfigError("HITL_ZENDESK_API_KEY", "is required")
        self._key = key
        modes = deps.env.get("HITL_ZENDESK_MODES", "")
        self.modes = dict(m.split("=", 1) for m in modes.split(",") if m)
        if self.modes.get("init") == "leak":  # a client library refusing the key, naming it
            raise ValueError(f"malformed API key {key!r}")
        self.sends: list[tuple[dict[str, str], Message]] = []  # user state seen, message
        self.histories: list[Sequence[Message]] = []
        self.groups: list[str] = []  # the group id of each start
        self.send_steps: list[SendStep] = []  # run by the next sends, first to last
        self.probe_hook: Callable[[float], Awaitable[list[str]]] | None = None

    async def open(self) -> None:
        await self._mode("open")

    async def close(self) -> None:
        await self._mode("close")

    async def _mode(self, call: str) -> None:
        mode = self.modes.get(call)
        if mode == "raise":  # a library's own error, not a ProviderError
            raise ConnectionRefusedError(f"[Errno 111] {call}: connection refused")
        if mode == "bug":
            raise KeyError("tenant")
        if mode == "leak":  # a library error naming the URL it called, key and all
            raise PermissionError(
                f"401 Unauthorized for https://zendesk.test/{call}?key={self._key}"
            )
        if mode == "hang":
            await asyncio.Event().wait()

    async def probe(self, *, timeout: float) -> list[str]:
        return [] if self.probe_hook is None else await self.probe_hook(timeout)

    async def upsert_user(
        self, profile: UserProfile, user: ProviderUser | None, *, timeout: float
    ) -> ProviderUser:
        if user is not None:
            return user
        return ProviderUser(f"zd-{profile.id}", {"token": "t0", "refresh": "r0"})

    async def start(
        self, request: StartRequest, user: ProviderUser, *, timeout: float
    ) -> StartResult:
        self.histories.append(request.history)
        self.groups.append(request.group_id)
        return StartResult(ProviderChat(f"zd-chat-{request.session_id}", {}), "g1")

    async def send(
        self,
        chat: ProviderChat,
        user: ProviderUser,
        message: Message,
        *,
        request_id: str,
        uncertain: bool,
        timeout: float,
    ) -> SendResult:
        self.sends.append((dict(user.state), message))
        if self.send_steps:
            self.send_steps.pop(0)(chat, user)
        return SendResult(f"zd-msg-{request_id}")

    async def stop(
        self, chat: ProviderChat, user: ProviderUser, reason: str, *, timeout: float
    ) -> None:
        return None

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookBatch:
        raise WebhookRejected(400, "no webhooks in this test")

    async def catch_up(
        self, chat: ProviderChat, user: ProviderUser, checkpoint: str, *, timeout: float
    ) -> CatchUp:
        return CatchUp()

    def routes(self) -> Sequence[BaseRoute]:
        return ()

    async def run_command(self, argv: Sequence[str], out: TextIO) -> int:
        """``hitl-service zendesk sync``: "synced", or the ``command`` mode's fault."""
        await self._mode("command")
        out.write("synced\n")
        return 0


def create(deps: ProviderDeps) -> ZendeskProvider:
    return ZendeskProvider(deps)
