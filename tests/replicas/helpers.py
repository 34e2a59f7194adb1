"""Several ``hitl-service serve`` processes on one PostgreSQL database.

``deployment()`` starts the fake LiveChat as its own process and replicas
(``a``, ``b``, ...) that share one database and that fake, each with its own
working and data directory and free ports. The fake records every
``send_event`` with its ``custom_id`` (our request id), so counting
custom ids in its chats counts what agents really received, whichever
replica sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers.livechat.commands import WEBHOOKS
from providers.livechat.memory import OWN_CUSTOM_ID_PREFIX
from tests.processes import FakeLiveChatProcess, ServiceProcess
from tests.support import TIMEOUT, rich_error, rid

T = TypeVar("T")

# Codes after which a client retries the same request (same request_id),
# possibly on another replica: the replica died or the provider has not
# confirmed yet (DELIVERY_PENDING, START_IN_PROGRESS).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def replica_env(dsn: str, fake: FakeLiveChatProcess, cwd: Path, **extra: str) -> dict[str, str]:
    """Settings for one replica: the shared database, the fake, free ports."""
    env = {
        **fake.env,
        "HITL_PROVIDER": "livechat",
        "HITL_GRPC_ADDR": "127.0.0.1:0",
        "HITL_HTTP_ADDR": "127.0.0.1:0",
        "HITL_STORE_URL": dsn,
        "HITL_STORE_POOL_MIN": "1",
        "HITL_STORE_POOL_MAX": "8",
        "HITL_DATA_DIR": str(cwd / "data"),
        "HITL_PROVIDER_TIMEOUT": "2s",
        "HITL_LIVECHAT_SERVER_TIMEOUT": "2",  # the fake acts at once; keeps leases short
        "HITL_REQUEST_BUDGET": "5s",
        "HITL_GRACE_SECONDS": "1s",
        # Catch-up would poll the fake in the background; these tests
        # follow webhooks only.
        "HITL_RECONCILE_INTERVAL": "0",
        "HITL_LOG_LEVEL": "info",
    }
    env.update(extra)
    return env


class Fake:
    """The fake LiveChat process and an HTTP client for its control API."""

    def __init__(self, process: FakeLiveChatProcess, http: httpx.AsyncClient) -> None:
        self.process = process
        self.http = http

    async def control(self, action: str, **kwargs: Any) -> Any:
        """``POST /_control/<action>`` (a ``FakeLiveChat`` method)."""
        response = await self.http.post(f"/_control/{action}", json=kwargs)
        assert response.status_code == 200, response.text
        return response.json()["result"]

    async def calls(self, method: str) -> list[dict[str, Any]]:
        """Recorded API calls of ``method``."""
        response = await self.http.get("/_control/calls", params={"method": method})
        response.raise_for_status()
        calls: list[dict[str, Any]] = response.json()
        return calls

    async def chat(self, chat_id: str) -> dict[str, Any]:
        """A chat with all its threads and their events."""
        response = await self.http.get(f"/_control/chats/{chat_id}")
        response.raise_for_status()
        chat: dict[str, Any] = response.json()
        return chat

    async def custom_ids(self, chat_id: str) -> list[str]:
        """The ``custom_id`` of every user message in the chat, oldest first.

        These are the messages the agent sees; each carries its SendMessage
        request id. Events the service posts itself when a handoff starts
        (the bot transcript, marked with its own prefix) are left out.
        """
        chat = await self.chat(chat_id)
        return [
            str(event["custom_id"])
            for thread in chat["threads"]
            for event in thread["events"]
            if event.get("custom_id") and not event["custom_id"].startswith(OWN_CUSTOM_ID_PREFIX)
        ]

    async def register_webhooks(self, url: str) -> None:
        """Registers the webhooks the service needs, pointing at ``url``.

        Through the configuration API, like ``hitl-service livechat
        register-webhooks`` (which keeps one URL; this adds one more
        registration per action, as an operator could).
        """
        env = self.process.env
        for action, filters in WEBHOOKS:
            body: dict[str, Any] = {
                "url": url,
                "description": f"replica test: {action}",
                "action": action,
                "secret_key": env["HITL_LIVECHAT_WEBHOOK_SECRET"],
                "owner_client_id": env["HITL_LIVECHAT_CLIENT_ID"],
                "type": "license",
            }
            if filters:
                body["filters"] = dict(filters)
            response = await self.http.post(
                "/v3.6/configuration/action/register_webhook",
                json=body,
                headers={"Authorization": f"Basic {env['HITL_LIVECHAT_AGENT_TOKEN']}"},
            )
            assert response.status_code == 200, response.text

    async def deliveries_settled(self) -> bool:
        """True when every webhook delivery has an outcome (none pending)."""
        return all(d["outcome"] != "pending" for d in await self.deliveries())

    async def deliveries(self) -> list[dict[str, Any]]:
        """Webhook deliveries: ``url``, ``action``, ``attempts``, ``outcome``."""
        response = await self.http.get("/_control/deliveries")
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()
        return found


@dataclass
class Replica:
    """One service process and a gRPC channel to it."""

    process: ServiceProcess
    channel: grpc.aio.Channel | None = None
    alive: bool = True

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def stub(self) -> pb_grpc.HitlServiceAsyncStub:
        assert self.channel is not None, f"replica {self.name} is not connected"
        return pb_grpc.HitlServiceStub(self.channel)

    @property
    def webhook_url(self) -> str:
        return f"{self.process.http_base}/webhooks/livechat"

    async def connect(self) -> None:
        self.channel = self.process.channel()
        await asyncio.wait_for(self.channel.channel_ready(), TIMEOUT)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    def freeze(self) -> None:
        """SIGSTOP: the process does nothing more until ``thaw()`` or ``kill()``."""
        assert self.process.proc is not None
        self.process.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after ``freeze()``."""
        assert self.process.proc is not None
        self.process.proc.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, leases and transactions are left behind.

        The channel stays open (calls on it fail with UNAVAILABLE, as a
        client's would) until the deployment ends.
        """
        self.alive = False
        await self.process.kill()


@dataclass
class Deployment:
    """Replicas on one database, sharing one fake LiveChat."""

    dsn: str
    fake: Fake
    replicas: dict[str, Replica] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Replica:
        return self.replicas[name]


@contextlib.asynccontextmanager
async def deployment(
    dsn: str,
    tmp_path: Path,
    names: Iterable[str] = ("a", "b"),
    **env: str,
) -> AsyncIterator[Deployment]:
    """Starts the fake, then the replicas together (they migrate the empty
    database concurrently, which the advisory lock makes safe)."""
    fake_process = await FakeLiveChatProcess().start()
    http = httpx.AsyncClient(base_url=fake_process.url, timeout=TIMEOUT)
    found = Deployment(dsn, Fake(fake_process, http))
    try:
        processes = []
        for name in names:
            cwd = tmp_path / name
            cwd.mkdir()
            processes.append(
                ServiceProcess(replica_env(dsn, fake_process, cwd, **env), cwd=cwd, name=name)
            )
        # Registered before any await that may fail, so teardown finds them all.
        for process in processes:
            found.replicas[process.name] = Replica(process)
        await asyncio.gather(*(p.start() for p in processes))
        for replica in found.replicas.values():
            await replica.connect()
        yield found
    finally:
        for replica in found.replicas.values():
            await replica.close()
            if replica.process.proc is not None:
                await replica.process.terminate(timeout=15)
        await http.aclose()
        await fake_process.stop()


async def until(
    predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition"
) -> Any:
    """Polls ``predicate`` until it is truthy; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def call_with_retries(
    replicas: Callable[[int], Replica],
    call: Callable[[pb_grpc.HitlServiceAsyncStub], Awaitable[T]],
    *,
    deadline: float = 60.0,
) -> tuple[T, int]:
    """Calls ``call`` like a client behind a load balancer would.

    ``replicas(attempt)`` picks the replica of each attempt; UNAVAILABLE
    (a dead replica, DELIVERY_PENDING, START_IN_PROGRESS) and
    DEADLINE_EXCEEDED are retried with the same request, anything else
    raises.

    Returns:
        The answer and how many attempts it took.
    """
    give_up = time.monotonic() + deadline
    attempt = 0
    while True:
        replica = replicas(attempt)
        attempt += 1
        try:
            return await call(replica.stub), attempt
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > give_up:
                error = rich_error(exc)
                raise AssertionError(
                    f"{replica.name}: {error.code} {error.reason}: {error.message}"
                ) from None
        await asyncio.sleep(0.05)  # a client's retry pause, not synchronization


async def make_session(
    stub: pb_grpc.HitlServiceAsyncStub, name: str, *, request_id: str = ""
) -> pb.Session:
    """Creates a user and starts a handoff for it on ``stub``."""
    user = (
        await stub.CreateUser(
            pb.CreateUserRequest(name=name, external_id=f"crm-{name}"), timeout=TIMEOUT
        )
    ).user
    response = await stub.StartHitl(
        pb.StartHitlRequest(user_id=user.id, title=f"Help {name}", request_id=request_id or rid()),
        timeout=TIMEOUT,
    )
    return response.session


def text(request_id: str, session_id: str, body: str) -> pb.SendMessageRequest:
    """A SendMessage request."""
    return pb.SendMessageRequest(
        session_id=session_id, message=pb.Message(text=body), request_id=request_id
    )


def cursors(events: Iterable[pb.Event]) -> list[int]:
    """The events' cursors as numbers."""
    return [int(e.cursor) for e in events]
