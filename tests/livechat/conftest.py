"""Fixtures for the LiveChat provider tests: the fake on 127.0.0.1:0, a
provider pointing at it, and a webhook receiver that behaves like the sidecar."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.base import ProviderDeps
from providers.errors import WebhookRejected
from providers.livechat import LiveChatProvider, create
from providers.types import InboundEvent, UserProfile, WebhookBatch
from tests.fake_livechat import FakeClock, FakeLiveChat, ServedApp

WEBHOOK_SECRET = "whsec-test-0123456789"
KindT = TypeVar("KindT")


def kind_of(event: InboundEvent, kind: type[KindT]) -> KindT:
    """The event's kind, asserting its type (narrows for mypy)."""
    assert isinstance(event.kind, kind), event.kind
    return event.kind


class RecordingSink:
    """An EventSink that keeps what it is given."""

    def __init__(self) -> None:
        self.batches: list[WebhookBatch] = []

    async def deliver(self, batch: WebhookBatch) -> int:
        self.batches.append(batch)
        return len(batch.events)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Polls ``predicate`` until it holds, failing after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a polled predicate under a deadline
            await asyncio.sleep(0.005)


@dataclass
class Receiver:
    """A sidecar stand-in: ``POST /webhooks/livechat`` -> ``parse_webhook``.

    Keeps accepted batches and, like the core, the dedupe keys it has seen.
    """

    provider: LiveChatProvider
    batches: list[WebhookBatch] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    keys: dict[str, InboundEvent] = field(default_factory=dict)
    duplicates: int = 0
    fail_next: int = 0
    served: ServedApp | None = None

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        if self.fail_next > 0:
            self.fail_next -= 1
            return JSONResponse({"error": "store down"}, status_code=503)
        try:
            batch = self.provider.parse_webhook(request.headers, body)
        except WebhookRejected as exc:
            self.rejected.append((exc.status, exc.reason))
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        self.batches.append(batch)
        for event in batch.events:
            if event.dedupe_key in self.keys:
                self.duplicates += 1
            else:
                self.keys[event.dedupe_key] = event
        return Response(status_code=200)

    @property
    def url(self) -> str:
        assert self.served is not None
        return self.served.url + "/webhooks/livechat"

    @property
    def events(self) -> list[InboundEvent]:
        """Unique events in arrival order."""
        return list(self.keys.values())

    def kinds(self, kind: type) -> list[Any]:
        return [e.kind for e in self.events if isinstance(e.kind, kind)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeLiveChat]:
    async with FakeLiveChat(clock=clock) as running:
        yield running


MakeProvider = Callable[..., Awaitable[LiveChatProvider]]


@pytest.fixture
async def make_provider(
    fake: FakeLiveChat, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[MakeProvider]:
    """Builds opened providers against the fake; env overrides as kwargs."""
    made: list[LiveChatProvider] = []

    async def make(
        sink: RecordingSink | None = None, registry: CollectorRegistry | None = None, **env: str
    ) -> LiveChatProvider:
        deps = ProviderDeps(
            env=fake.env(webhook_secret=WEBHOOK_SECRET, **env),
            sink=sink or RecordingSink(),
            clock=clock,
            registry=registry or CollectorRegistry(),
            data_dir=tmp_path,
        )
        provider = create(deps)
        await provider.open()
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()


@pytest.fixture
async def provider(make_provider: MakeProvider) -> LiveChatProvider:
    return await make_provider()


@pytest.fixture
async def receiver(provider: LiveChatProvider, fake: FakeLiveChat) -> AsyncIterator[Receiver]:
    """The sidecar stand-in, with the webhooks registered at the fake."""
    rec = Receiver(provider)
    app = Starlette(routes=[Route("/webhooks/livechat", rec.handle, methods=["POST"])])
    rec.served = ServedApp(app)
    await rec.served.start()
    out: list[str] = []

    class _Out:
        def write(self, text: str) -> int:
            out.append(text)
            return len(text)

    status = await provider.run_command(["register-webhooks", "--url", rec.url], _Out())  # type: ignore[arg-type]
    assert status == 0, "".join(out)
    yield rec
    await fake.delivery.stop()
    await rec.served.stop()


def offline_provider(data_dir: Path, **env: str) -> LiveChatProvider:
    """A provider with fixed settings and no server (for parse_webhook)."""
    from tests.fake_livechat import Seed

    seed = Seed()
    import base64

    token = base64.b64encode(f"{seed.bridge_account_id}:{seed.bridge_pat}".encode()).decode()
    settings = {
        "HITL_LIVECHAT_CLIENT_ID": seed.client_id,
        "HITL_LIVECHAT_ORGANIZATION_ID": seed.organization_id,
        "HITL_LIVECHAT_AGENT_TOKEN": token,
        "HITL_LIVECHAT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "HITL_LIVECHAT_REDIRECT_URI": seed.redirect_uris[0],
        "HITL_LIVECHAT_API_URL": "http://127.0.0.1:9",
        "HITL_LIVECHAT_ACCOUNTS_URL": "http://127.0.0.1:9",
        **env,
    }
    deps = ProviderDeps(
        env=settings,
        sink=RecordingSink(),
        clock=FakeClock(),
        registry=CollectorRegistry(),
        data_dir=data_dir,
    )
    return create(deps)


@pytest.fixture
def profile() -> UserProfile:
    return UserProfile(id="u-1", name="Ada Lovelace", email="ada@example.com")


@dataclass
class Session:
    """A started handoff: the provider's user and chat."""

    user: Any
    result: Any

    @property
    def chat(self) -> Any:
        return self.result.chat

    @property
    def chat_id(self) -> str:
        return str(self.result.chat.external_chat_id)


async def start_session(
    provider: LiveChatProvider,
    profile: UserProfile | None = None,
    *,
    user: Any = None,
    timeout: float = 5.0,
    **request: Any,
) -> Session:
    """upsert_user + start, as the core does for StartHitl."""
    from providers.types import StartRequest

    profile = profile or UserProfile(id="u-1", name="Ada Lovelace", email="ada@example.com")
    user = await provider.upsert_user(profile, user, timeout=timeout)
    request.setdefault("session_id", "s-1")
    request.setdefault("request_id", "start-1")
    result = await provider.start(StartRequest(user=profile, **request), user, timeout=timeout)
    return Session(user, result)
