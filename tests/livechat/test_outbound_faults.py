"""Outbound faults: gateway errors, slow media, lost access, and SSRF via IPv6 forms."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from providers.base import ProviderDeps
from providers.errors import ProviderAuthError, ProviderRejected, ProviderUnavailable
from providers.livechat import LiveChatProvider, create, media_guard
from providers.livechat.client import AnsweredUnavailable
from providers.types import Media, MediaKind, Message
from tests.fake_livechat import FakeClock, FakeLiveChat
from tests.livechat.conftest import WEBHOOK_SECRET, RecordingSink, Session, start_session


def customer_texts(fake: FakeLiveChat, session: Session) -> list[str]:
    uid = session.user.external_user_id
    return [
        str(e.get("text"))
        for e in fake.events(session.chat_id)
        if e.get("author_id") == uid and e.get("type") == "message"
    ]


# -- a 5xx that is not LiveChat's answer ------------------------------------------------


class GatewayTimeoutOnce(httpx.AsyncBaseTransport):
    """A load balancer giving up: 504 to us, while the call reaches LiveChat later."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.pending: list[asyncio.Task[None]] = []
        self.release = asyncio.Event()  # when the held call reaches LiveChat
        self.armed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.armed and request.url.path.endswith("/customer/action/send_event"):
            self.armed = False
            await request.aread()

            async def forward() -> None:
                await self.release.wait()
                response = await self.inner.handle_async_request(request)
                await response.aread()

            self.pending.append(asyncio.create_task(forward()))
            return httpx.Response(504, text="<html>504 Gateway Time-out</html>")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def gateway_provider(
    fake: FakeLiveChat, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[tuple[LiveChatProvider, GatewayTimeoutOnce]]:
    transport = GatewayTimeoutOnce()
    deps = ProviderDeps(
        env=fake.env(webhook_secret=WEBHOOK_SECRET),
        sink=RecordingSink(),
        clock=clock,
        registry=CollectorRegistry(),
        data_dir=tmp_path,
        http_transport=transport,
    )
    provider = create(deps)
    await provider.open()
    yield provider, transport
    transport.release.set()
    await asyncio.gather(*transport.pending)
    await provider.close()


async def test_gateway_504_then_retry_does_not_duplicate(
    gateway_provider: tuple[LiveChatProvider, GatewayTimeoutOnce],
    fake: FakeLiveChat,
    clock: FakeClock,
) -> None:
    provider, transport = gateway_provider
    session = await start_session(provider)
    message = Message("pay me back")
    transport.armed = True
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, message, request_id="r-1", uncertain=False, timeout=5
        )
    assert info.value.uncertain
    assert not isinstance(info.value, AnsweredUnavailable)
    # The send is still on its way to LiveChat: looking for it now would miss it.
    with pytest.raises(ProviderUnavailable) as early:
        await provider.send(
            session.chat, session.user, message, request_id="r-1", uncertain=True, timeout=5
        )
    assert early.value.retry_after
    transport.release.set()
    await asyncio.gather(*transport.pending)
    clock.advance(provider.settings.server_timeout)
    await provider.send(
        session.chat, session.user, message, request_id="r-1", uncertain=True, timeout=5
    )
    assert customer_texts(fake, session) == ["pay me back"]


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "status": 502},
        {"kind": "status", "status": 503, "body": "<html>503</html>", "content_type": "text/html"},
        {"kind": "status", "status": 504, "body": "<html>504</html>", "content_type": "text/html"},
        {"kind": "error", "error_type": "request_timeout"},
    ],
    ids=["502 without LiveChat's body", "503 page", "504 page", "request_timeout"],
)
async def test_unfinished_calls_make_the_retry_wait(
    provider: LiveChatProvider, fake: FakeLiveChat, clock: FakeClock, fault: dict[str, Any]
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", api="customer", **fault)
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.uncertain
    assert not isinstance(info.value, AnsweredUnavailable)
    with pytest.raises(ProviderUnavailable) as early:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=True, timeout=5
        )
    assert early.value.retry_after
    clock.advance(provider.settings.server_timeout)
    await provider.send(
        session.chat, session.user, Message("hi"), request_id="m1", uncertain=True, timeout=5
    )
    assert customer_texts(fake, session) == ["hi"]


async def test_livechat_error_body_on_a_5xx_is_an_answer(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    fake.add_fault("send_event", api="customer", error_type="internal", status=500)
    with pytest.raises(AnsweredUnavailable):
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    # LiveChat said it failed: the retry checks and sends at once.
    await provider.send(
        session.chat, session.user, Message("hi"), request_id="m1", uncertain=True, timeout=5
    )
    assert customer_texts(fake, session) == ["hi"]


# -- a 4xx that is not LiveChat's answer ---------------------------------------------

_PROXY_PAGE = (
    "<html><head><title>{status} {title}</title><style>body {{ color: red }}</style></head>"
    "<body><h1>{title}</h1><p>Your client has issued a request this organization's group "
    "proxy would not pass.</p><pre>Authorization: Basic {token}\nBearer dal:Cx1abcDEF</pre>"
    + "<p>padding</p>" * 200
    + "<p>END-OF-PAGE</p></body></html>"
)


@pytest.mark.parametrize(
    ("status", "retry_after", "uncertain", "wait"),
    [
        (408, None, True, None),  # the proxy gave up; LiveChat may run the call
        (425, None, False, None),
        (429, "7", False, 7.0),
        (429, None, False, 1.0),  # the rate-limit back-off
    ],
)
async def test_a_proxys_transient_4xx_is_worth_retrying(
    provider: LiveChatProvider,
    fake: FakeLiveChat,
    status: int,
    retry_after: str | None,
    uncertain: bool,
    wait: float | None,
) -> None:
    session = await start_session(provider)
    page = _PROXY_PAGE.format(status=status, title="Request Timeout", token="x")
    fake.add_fault(
        "send_event",
        api="customer",
        kind="status",
        status=status,
        body=page,
        content_type="text/html",
        retry_after=retry_after,
    )
    with pytest.raises(ProviderUnavailable) as info:
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
    assert info.value.uncertain is uncertain
    assert isinstance(info.value, AnsweredUnavailable) is not uncertain
    # A call that may still run makes the retry wait as long as LiveChat may take.
    assert info.value.retry_after == (provider.settings.server_timeout if uncertain else wait)


@pytest.mark.parametrize("status", [408, 425])
async def test_a_proxys_transient_4xx_on_the_token_endpoint_is_worth_retrying(
    provider: LiveChatProvider, fake: FakeLiveChat, status: int
) -> None:
    fake.add_fault("customer_token", kind="status", status=status, body="<html>busy</html>")
    with pytest.raises(ProviderUnavailable):
        await start_session(provider)


@pytest.mark.parametrize(
    ("api", "method", "status"),
    [("customer", "send_event", 400), ("customer", "send_event", 403), ("agent", "get_chat", 404)],
)
async def test_a_proxys_other_4xx_is_a_refusal_quoting_a_little_of_it(
    provider: LiveChatProvider, fake: FakeLiveChat, api: str, method: str, status: int
) -> None:
    session = await start_session(provider)
    page = _PROXY_PAGE.format(status=status, title="Forbidden", token=fake.agent_token)
    fake.add_fault(
        method, api=api, kind="status", status=status, body=page, content_type="text/html"
    )
    call = (
        provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
        if method == "send_event"
        else provider.catch_up(session.chat, session.user, "", timeout=5)
    )
    with pytest.raises(ProviderRejected) as info:
        await call
    # Not taken for a LiveChat refusal naming a setting (the page says
    # "client", "organization", "group").
    assert not isinstance(info.value, ProviderAuthError)
    assert info.value.code == f"HTTP_{status}"
    text = str(info.value)
    assert f"HTTP {status}" in text
    assert f"{status} Forbidden" in text  # enough to recognize the page
    assert "END-OF-PAGE" not in text
    assert "<" not in text
    assert len(text) < 400
    assert fake.agent_token not in text
    assert "dal:Cx1abcDEF" not in text


async def test_a_proxys_4xx_on_the_token_endpoint_is_a_clear_refusal(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    page = _PROXY_PAGE.format(status=403, title="Forbidden", token="x")
    fake.add_fault("customer_token", kind="status", status=403, body=page)
    with pytest.raises(ProviderRejected) as info:
        await start_session(provider)
    assert not isinstance(info.value, ProviderAuthError)  # the page says "client"
    assert info.value.code == "HTTP_403"
    assert "403 Forbidden" in str(info.value)
    assert "END-OF-PAGE" not in str(info.value)


# -- a slow media host ---------------------------------------------------------------


async def _trickling_server() -> tuple[asyncio.Server, int]:
    """Answers 200 and then sends its body a byte at a time, far too slowly."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        )
        try:
            while True:
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)  # the slowness under test, not synchronization
        except (ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def test_slow_media_still_reaches_the_agent_as_a_link(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await start_session(provider)
    server, port = await _trickling_server()
    url = f"http://127.0.0.1:{port}/cat.png"
    media = Media(MediaKind.IMAGE, url, "cat.png", "image/png", 100000)
    async with server:
        await provider.send(
            session.chat, session.user, Message(media), request_id="m-1", uncertain=False, timeout=2
        )
        server.close()
    [text] = customer_texts(fake, session)
    assert url in text


# -- stop after a transfer to a group the bridge agent is not in ------------------------


async def _stopped_after_foreign_transfer(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> Session:
    """A session an agent moved to a group the bridge agent is not in, then stopped."""
    bridge = fake.state.bridge
    bridge.all_access, bridge.group_ids = False, {0}  # chats--access:rw in group 0 only
    session = await start_session(provider)
    fake.transfer(session.chat_id, group_ids=[19])  # an agent moves it to another group
    await provider.stop(session.chat, session.user, "bot done", timeout=5)
    return session


async def test_stop_after_transfer_to_foreign_group_closes_chat(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    session = await _stopped_after_foreign_transfer(provider, fake)
    assert not fake.chat(session.chat_id).active
    [agent_call] = fake.calls("deactivate_chat", api="agent")
    assert agent_call.error_type == "missing_access"
    assert [c.body for c in fake.calls("deactivate_chat", api="customer")] == [
        {"id": session.chat_id}
    ]


async def test_returning_user_whose_chat_went_to_a_foreign_group_gets_a_handoff(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    first = await _stopped_after_foreign_transfer(provider, fake)
    old_customer = first.user.external_user_id
    # The same end user comes back: the bridge agent can neither resume nor
    # read that chat, so it must not fail every handoff of this user for good
    # (blaming the agent token); it opens a chat for a new customer instead.
    second = await start_session(provider, user=first.user, request_id="start-2")
    assert second.chat_id != first.chat_id
    assert fake.chat(second.chat_id).active
    assert second.user.external_user_id != old_customer
    assert second.user.state["customer_id"] == second.user.external_user_id
    assert second.result.chat.state["customer_id"] == second.user.external_user_id
    assert fake.state.customers[second.user.external_user_id].name == "Ada Lovelace"
    assert not fake.chat(first.chat_id).active


# -- a start whose transfer fails ---------------------------------------------------------


async def test_failed_transfer_at_start_closes_the_chat(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    fake.add_fault("transfer_chat", error_type="validation", message="Something else went wrong")
    with pytest.raises(ProviderRejected):
        await start_session(provider)
    [chat] = fake.state.chats.values()
    assert not chat.active


# -- IPv6 forms of private IPv4 addresses -------------------------------------------------


def _resolve_to(monkeypatch: pytest.MonkeyPatch, addr: str) -> None:
    async def getaddrinfo(
        self: asyncio.AbstractEventLoop, host: str, port: int, **kw: Any
    ) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, port, 0, 0))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(
    "addr",
    [
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254 (cloud metadata)
        "64:ff9b::a00:5",  # NAT64 of 10.0.0.5
        "64:ff9b:1::a00:5",  # local-use NAT64
        "::ffff:0:a9fe:a9fe",  # IPv4-translated
        "::ffff:10.0.0.5",  # IPv4-mapped
        "::a00:5",  # IPv4-compatible
        "2002:a9fe:a9fe::1",  # 6to4
        "2001:0:4136:e378:8000:63bf:f5ff:fffa",  # Teredo, client 10.0.0.5
    ],
)
async def test_guard_refuses_ipv6_forms_of_private_ipv4(
    monkeypatch: pytest.MonkeyPatch, addr: str
) -> None:
    _resolve_to(monkeypatch, addr)
    with pytest.raises(media_guard.MediaRefused):
        await media_guard.vet("http://metadata.attacker.example/latest/", ())


@pytest.mark.parametrize("addr", ["64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111"])
async def test_guard_allows_ipv6_forms_of_public_ipv4(
    monkeypatch: pytest.MonkeyPatch, addr: str
) -> None:
    _resolve_to(monkeypatch, addr)
    pinned = await media_guard.vet("http://media.example/cat.png", ())
    assert pinned.url == f"http://[{addr}]/cat.png"
    assert pinned.host_header == "media.example"


async def test_a_token_without_a_scope_does_not_replace_a_returning_customer(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    """LiveChat answers ``authorization`` for a missing scope as much as for
    a chat out of the bridge agent's reach. A personal access token without
    the scope to resume and start chats refuses every start: the caller is
    told to fix the token, and the end users keep their LiveChat customers."""
    first = await start_session(provider)
    await provider.stop(first.chat, first.user, "bot done", timeout=5)
    customer = first.user.external_user_id
    for method in ("resume_chat", "start_chat"):
        fake.add_fault(method, error_type="authorization", message="Missing scope", times=None)
    with pytest.raises(ProviderAuthError, match="HITL_LIVECHAT_AGENT_TOKEN"):
        await start_session(provider, user=first.user, request_id="start-2")
    assert first.user.external_user_id == customer
    assert first.user.state["customer_id"] == customer
    assert len(fake.state.customers) == 1
