"""Fixtures for the end-to-end tests: the real service (``build_app`` with
``HITL_PROVIDER=livechat``) on 127.0.0.1 port 0, the fake LiveChat served
in-process, webhooks delivered by the fake to the service's real sidecar, and
a local HTTP server for the media files end users send.

Fixtures:
    fake: the in-process fake LiveChat (fast webhook retries).
    media: a local media server (``media.url(name, type, size)``).
    make_service: builds, starts and wires a service against ``fake``;
        keyword arguments override environment variables.
    lc: ``make_service()`` with the defaults.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hitl_service.app import App
from hitl_service.clock import Clock
from hitl_service.core import sessions
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers.livechat import LiveChatProvider
from tests.conftest import start_app
from tests.fake_livechat import FakeConfig, FakeLiveChat, ServedApp
from tests.fake_livechat.clock import LiveClock
from tests.support import TIMEOUT, EventCollector, rid, wait_for

WEBHOOK_SECRET = "whsec-integration-7d41c2e9b05a"
JANE = ("jane@acme.example", "Jane Doe", "https://cdn.example/jane.png")
JOE = ("joe@acme.example", "Joe Roe", "")


def media_bytes(name: str, size: int) -> bytes:
    """Deterministic content for a media file (so the test can compare)."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class MediaServer:
    """Serves ``GET /media/<name>?type=<mime>&size=<bytes>`` on 127.0.0.1."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._served = ServedApp(Starlette(routes=[Route("/media/{name}", self._get)]))

    async def _get(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.requests.append(name)
        size = int(request.query_params.get("size", "64"))
        content_type = request.query_params.get("type", "application/octet-stream")
        return Response(media_bytes(name, size), media_type=content_type)

    def url(self, name: str, content_type: str, size: int) -> str:
        """The URL an end user's media message points at."""
        return f"{self._served.url}/media/{name}?type={content_type}&size={size}"

    async def start(self) -> None:
        await self._served.start()

    async def stop(self) -> None:
        await self._served.stop()


class Out(io.StringIO):
    """Collects what a command prints."""


@dataclass
class LiveChatService:
    """A started service wired to the fake, and a client for it."""

    app: App
    fake: FakeLiveChat
    stub: pb_grpc.HitlServiceAsyncStub
    http: httpx.AsyncClient
    media: MediaServer
    env: dict[str, str]
    channel: grpc.aio.Channel

    @property
    def provider(self) -> LiveChatProvider:
        provider = self.app.provider
        assert isinstance(provider, LiveChatProvider)
        return provider

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}/webhooks/livechat"

    async def register_webhooks(self) -> str:
        """``hitl-service livechat register-webhooks`` against the sidecar URL."""
        out = Out()
        status = await self.provider.run_command(
            ["register-webhooks", "--url", self.webhook_url], out
        )
        assert status == 0, out.getvalue()
        return out.getvalue()

    async def user(self, name: str = "Ada Lovelace", **fields: str) -> pb.User:
        fields.setdefault("external_id", rid())
        fields.setdefault("email", "ada@example.com")
        response = await self.stub.CreateUser(
            pb.CreateUserRequest(name=name, **fields), timeout=TIMEOUT
        )
        return response.user

    async def start(self, user_id: str = "", **fields: Any) -> pb.Session:
        """StartHitl (a new user unless ``user_id`` is given)."""
        if not user_id:
            user_id = (await self.user()).id
        fields.setdefault("request_id", rid())
        fields.setdefault("title", "Refund for order #123")
        response = await self.stub.StartHitl(
            pb.StartHitlRequest(user_id=user_id, **fields), timeout=TIMEOUT
        )
        return response.session

    async def send(
        self, session_id: str, message: pb.Message | str, request_id: str = "", **kwargs: Any
    ) -> pb.SendMessageResponse:
        if isinstance(message, str):
            message = pb.Message(text=message)
        kwargs.setdefault("timeout", TIMEOUT)
        return await self.stub.SendMessage(
            pb.SendMessageRequest(
                session_id=session_id, message=message, request_id=request_id or rid()
            ),
            **kwargs,
        )

    async def session(self, session_id: str) -> pb.Session:
        response = await self.stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT
        )
        return response.session

    async def delivered(self) -> None:
        """Waits until the fake has no webhook pending or in flight."""
        await self.fake.delivery.idle(timeout=TIMEOUT)

    def with_custom_id(self, chat_id: str, custom_id: str) -> list[dict[str, Any]]:
        """Events at the fake (any thread) carrying ``custom_id``."""
        return [e for e in self.fake.events(chat_id) if e.get("custom_id") == custom_id]

    async def log(self, session_id: str = "") -> list[pb.Event]:
        """Every event in the log (of one session), read through StreamEvents."""
        head = await self.app.store.head()
        if head == 0:
            return []
        async with EventCollector(self.stub, after="0") as collector:
            await wait_for(
                lambda: collector.events and int(collector.events[-1].cursor) >= head,
                what=f"the log up to cursor {head}",
            )
        return [e for e in collector.events if not session_id or e.session_id == session_id]


def kinds(events: list[pb.Event]) -> list[str]:
    """Event kinds in order."""
    return [str(e.WhichOneof("kind")) for e in events]


def livechat_env(
    service_env: dict[str, str], fake: FakeLiveChat, **overrides: str
) -> dict[str, str]:
    """The service's environment for the LiveChat provider against ``fake``."""
    env = {
        **service_env,
        **fake.env(webhook_secret=WEBHOOK_SECRET),
        "HITL_PROVIDER": "livechat",
        # Catch-up would repair what webhooks miss; these tests prove the
        # webhook path itself, so it only runs where a test turns it on.
        "HITL_RECONCILE_INTERVAL": "0",
    }
    env.update(overrides)
    return env


@pytest.fixture
async def fake() -> AsyncIterator[FakeLiveChat]:
    config = FakeConfig(webhook_retry_delays=(0.05, 0.1, 0.2))
    async with FakeLiveChat(config=config, clock=LiveClock()) as running:
        yield running


@pytest.fixture
async def media() -> AsyncIterator[MediaServer]:
    server = MediaServer()
    await server.start()
    yield server
    await server.stop()


MakeService = Callable[..., Awaitable[LiveChatService]]


async def start_cut_off(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch, **env: str
) -> tuple[LiveChatService, pb.StartHitlRequest]:
    """A StartHitl whose process "dies" after LiveChat opened the chat, before
    the session recorded it; returns a second service on the same store (not
    yet swept: the session is still STARTING) and the request to retry."""
    first = await make_service(**env)
    user = await first.user()
    never = asyncio.Event()

    async def commit_dies(*args: Any, **kwargs: Any) -> Any:
        await never.wait()  # the "crash": the session never records the chat

    monkeypatch.setattr(sessions, "_commit_start", commit_dies)
    request = pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="Refund")
    with pytest.raises(grpc.aio.AioRpcError):
        await first.stub.StartHitl(request, timeout=2)
    await first.app.stop(grace=0.1)
    for task in list(first.app.core._starts):  # died with the process
        task.cancel()
    monkeypatch.undo()
    return await make_service(register=False, **env), request


@pytest.fixture
async def make_service(
    service_env: dict[str, str], fake: FakeLiveChat, media: MediaServer
) -> AsyncIterator[MakeService]:
    made: list[LiveChatService] = []

    async def make(
        *, register: bool = True, clock: Clock | None = None, **overrides: str
    ) -> LiveChatService:
        env = livechat_env(service_env, fake, **overrides)
        app = await start_app(env, clock=clock)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}")
        service = LiveChatService(
            app=app,
            fake=fake,
            stub=pb_grpc.HitlServiceStub(channel),
            http=http,
            media=media,
            env=env,
            channel=channel,
        )
        made.append(service)
        if register:
            await service.register_webhooks()
        return service

    yield make
    # Webhooks still queued at the fake would go to a stopped sidecar.
    await fake.delivery.stop()
    for service in made:
        await service.http.aclose()
        await service.channel.close()
        await service.app.stop(grace=1)


@pytest.fixture
async def lc(make_service: MakeService) -> LiveChatService:
    return await make_service()
