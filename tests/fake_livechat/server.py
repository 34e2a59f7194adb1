"""Runs the fake in-process (tests) and scripts what agents do."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
from collections.abc import Generator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from tests.fake_livechat.app import build_app
from tests.fake_livechat.clock import FakeClock
from tests.fake_livechat.config import FakeConfig
from tests.fake_livechat.delivery import WebhookDelivery
from tests.fake_livechat.errors import LcError
from tests.fake_livechat.faults import Fault, Faults
from tests.fake_livechat.model import Call, Chat
from tests.fake_livechat.state import FakeState, Seed


class _Server(uvicorn.Server):
    """uvicorn without signal handling (the test runner owns signals)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ServedApp:
    """An ASGI app served by uvicorn on 127.0.0.1 in the current event loop."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        """Starts serving; returns once the socket listens."""
        self._task = asyncio.create_task(self._server.serve(), name="uvicorn")
        async with asyncio.timeout(timeout):
            while not self._server.started:
                if self._task.done():
                    await self._task  # raises the start-up failure
                    raise RuntimeError("uvicorn exited during start-up")
                await asyncio.sleep(0.005)  # polling a predicate under a deadline
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stops serving and waits for uvicorn to finish."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None


class FakeLiveChat:
    """The fake LiveChat: state, HTTP app, webhook delivery and agent scripts.

    Use ``async with FakeLiveChat() as fake:``; ``fake.url`` is the base of
    both the API and the accounts routes, ``fake.env()`` the provider settings.
    """

    def __init__(
        self,
        config: FakeConfig | None = None,
        clock: FakeClock | None = None,
        seed: Seed | None = None,
    ) -> None:
        self.state = FakeState(
            config=config or FakeConfig(), clock=clock or FakeClock(), seed=seed or Seed()
        )
        self.faults = Faults()
        self.delivery = WebhookDelivery(self.state)
        self.state.emit = self.delivery.on_emit
        self.app = build_app(self)
        self._served: ServedApp | None = None
        self._release = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeLiveChat:
        """Serves the fake and starts webhook delivery."""
        self._release = asyncio.Event()
        self._served = ServedApp(self.app, host, port)
        await self._served.start()
        self.state.base_url = self._served.url
        await self.delivery.start()
        return self

    async def stop(self) -> None:
        """Releases delayed answers, stops delivery and the server."""
        self._release.set()
        await self.delivery.stop()
        if self._served is not None:
            await self._served.stop()
            self._served = None

    async def __aenter__(self) -> FakeLiveChat:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Base URL of the fake (API and accounts)."""
        assert self._served is not None, "the fake is not started"
        return self._served.url

    async def wait_released(self, seconds: float) -> None:
        """Waits ``seconds`` or until the fake stops (for ``delay`` faults)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._release.wait(), seconds)

    # -- settings for the provider ---------------------------------------------------

    @property
    def agent_token(self) -> str:
        """Base64 of ``account_id:PAT`` for the seeded bridge agent."""
        raw = f"{self.state.seed.bridge_account_id}:{self.state.seed.bridge_pat}"
        return base64.b64encode(raw.encode()).decode()

    def env(
        self,
        webhook_secret: str = "whsec-test-0123456789",
        **overrides: str,
    ) -> dict[str, str]:
        """``HITL_LIVECHAT_*`` settings pointing at this fake."""
        seed = self.state.seed
        env = {
            "HITL_LIVECHAT_CLIENT_ID": seed.client_id,
            "HITL_LIVECHAT_ORGANIZATION_ID": seed.organization_id,
            "HITL_LIVECHAT_AGENT_TOKEN": self.agent_token,
            "HITL_LIVECHAT_WEBHOOK_SECRET": webhook_secret,
            "HITL_LIVECHAT_GROUP_ID": "0",
            "HITL_LIVECHAT_REDIRECT_URI": seed.redirect_uris[0],
            "HITL_LIVECHAT_API_URL": self.url,
            "HITL_LIVECHAT_ACCOUNTS_URL": self.url,
            # Media URLs in tests point at this fake, on a loopback address.
            "HITL_LIVECHAT_MEDIA_HOSTS": "127.0.0.1",
        }
        env.update(overrides)
        return env

    # -- knobs -----------------------------------------------------------------------

    def add_fault(self, method: str, **kwargs: Any) -> Fault:
        """Scripts a failure (see :class:`Fault`)."""
        return self.faults.add(Fault(method=method, **kwargs))

    def clear_faults(self) -> None:
        """Removes all scripted failures."""
        self.faults.clear()

    def set_config(self, **knobs: Any) -> None:
        """Changes :class:`FakeConfig` knobs."""
        for key, value in knobs.items():
            if not hasattr(self.state.config, key):
                raise TypeError(f"unknown knob {key}")
            setattr(self.state.config, key, tuple(value) if isinstance(value, list) else value)

    def webhook_chaos(
        self, drop: float = 0.0, duplicate: float = 0.0, max_delay: float = 0.0, seed: int = 0
    ) -> None:
        """Every webhook delivery from now on dropped, doubled, delayed and
        reordered at random (``WebhookDelivery.chaos``); all zero: off."""
        self.delivery.chaos(drop, duplicate, max_delay, seed)

    def advance_clock(self, seconds: float) -> None:
        """Moves the fake's clock forward."""
        self.state.clock.advance(seconds)

    # -- inspection ------------------------------------------------------------------

    def calls(self, method: str | None = None, api: str | None = None) -> list[Call]:
        """Recorded calls, optionally of one method / API."""
        return [
            c
            for c in self.state.calls
            if (method is None or c.method == method) and (api is None or c.api == api)
        ]

    def chat(self, chat_id: str) -> Chat:
        """A chat of the state."""
        return self.state.chat(chat_id)

    def events(self, chat_id: str) -> list[dict[str, Any]]:
        """Every event of every thread of a chat, oldest first."""
        return [e for t in self.state.chat(chat_id).threads for e in t.events]

    # -- what agents, customers and the router do ------------------------------------

    def agent_join(
        self,
        chat_id: str,
        agent_id: str = "jane@acme.example",
        visibility: str = "all",
        reason: str = "manual",
    ) -> None:
        """An agent joins (or is assigned to) the chat: ``user_added_to_chat``."""
        chat = self.state.chat(chat_id)
        self.state.add_user(
            chat, agent_id, "agent", visibility, requester_id=agent_id, reason=reason
        )

    def agent_message(
        self,
        chat_id: str,
        agent_id: str = "jane@acme.example",
        *,
        text: str | None = None,
        file: dict[str, Any] | None = None,
        rich: dict[str, Any] | None = None,
        visibility: str = "all",
        custom_id: str | None = None,
        legacy_recipients: bool = False,
    ) -> dict[str, Any]:
        """An agent writes: a message, a file (``{name, content_type, size}``),
        a rich message (``{template_id, elements}``) or an internal note
        (``visibility="agents"``). Returns the stored event."""
        state = self.state
        chat = state.chat(chat_id)
        if agent_id not in chat.users:
            raise LcError("validation", "Requester is not a user of this chat")
        if not chat.active:
            raise LcError("chat_inactive", "Chat is inactive")
        raw: dict[str, Any]
        if file is not None:
            name = file.get("name", "file.bin")
            content_type = file.get("content_type", "application/octet-stream")
            url = state.upload(name, bytes(file.get("size", 16)), content_type)["url"]
            raw = {"type": "file", "url": url}
        elif rich is not None:
            raw = {"type": "rich_message", **rich}
        else:
            raw = {"type": "message", "text": text or "Hello from the agent"}
        raw["visibility"] = visibility
        if custom_id is not None:
            raw["custom_id"] = custom_id
        event = state._event(chat.thread, agent_id, raw)
        if legacy_recipients:
            event["recipients"] = event.pop("visibility")
        state.add_event(chat, event, "agent")
        return dict(event)

    def transfer(
        self,
        chat_id: str,
        *,
        agent_ids: list[str] | None = None,
        group_ids: list[int] | None = None,
        reason: str = "manual",
        queue: bool = False,
        requester_id: str | None = "jane@acme.example",
    ) -> None:
        """A transfer (to agents, or to groups with or without a queue)."""
        state = self.state
        chat = state.chat(chat_id)
        groups = group_ids if group_ids is not None else list(chat.group_ids)
        if queue:
            state.queue(chat, groups, requester_id=requester_id, reason=reason)
            return
        if agent_ids:
            state._assign(chat, agent_ids, groups, requester_id, reason)
            return
        chat.group_ids = groups
        payload: dict[str, Any] = {
            "chat_id": chat.id,
            "thread_id": chat.thread.id,
            "reason": reason,
            "transferred_to": {"group_ids": groups},
        }
        if requester_id is not None:
            payload["requester_id"] = requester_id
        state._emit("chat_transferred", payload, chat)

    def agent_leave(self, chat_id: str, agent_id: str = "jane@acme.example") -> None:
        """An agent leaves: ``user_removed_from_chat``."""
        self.state.remove_user(self.state.chat(chat_id), agent_id, requester_id=agent_id)

    def agent_close(self, chat_id: str, agent_id: str = "jane@acme.example") -> None:
        """An agent closes the chat: ``chat_deactivated`` with ``user_id``."""
        chat = self.state.chat(chat_id)
        if not chat.active:
            raise LcError("chat_inactive", "Chat is already inactive")
        self.state.deactivate(chat, agent_id, "manual_archived_agent")

    def customer_close(self, chat_id: str) -> None:
        """The customer closes the chat."""
        chat = self.state.chat(chat_id)
        self.state.deactivate(chat, chat.customer_id, "manual_archived_customer")

    def router_close(self, chat_id: str) -> None:
        """The router closes an idle thread: ``chat_deactivated`` without ``user_id``."""
        chat = self.state.chat(chat_id)
        if not chat.active:
            raise LcError("chat_inactive", "Chat is already inactive")
        self.state.deactivate(chat, None, "routing.archived_inactive")

    def snapshot(self) -> dict[str, Any]:
        """The knobs in force (for debugging)."""
        return dataclasses.asdict(self.state.config)
