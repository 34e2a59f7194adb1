"""Crash test (issue 5): ``kill -9`` the service at random points of mixed
traffic, restart it on the same SQLite file, and check that nothing was lost
or doubled.

The service and the fake LiveChat are separate processes. The driver sends
end-user messages from several sessions (each request id retried until OK,
through DELIVERY_PENDING and dead connections alike) while agents reply
through the fake's control API, whose webhooks reach the sidecar. A killer
SIGKILLs the service after a random amount of progress, then restarts it.

At the end:
- every webhook event the fake got a 200 for is in the event log exactly once;
- every accepted message is in the LiveChat chat exactly once;
- the log's cursors are 1..head without gaps or repeats.

Set ``HITL_CRASH_SEED`` to replay a run; the seed is printed.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests.integration.conftest import JANE
from tests.ports import free_port
from tests.processes import FakeLiveChatProcess, ServiceProcess, run_cli
from tests.support import read_log, rich_error, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROUNDS = 6
SESSIONS = 4
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


@dataclass
class Driver:
    """Traffic against a service that may die at any moment."""

    service: ServiceProcess
    fake: httpx.AsyncClient
    rng: random.Random
    up: asyncio.Event = field(default_factory=asyncio.Event)
    channel: grpc.aio.Channel | None = None
    stub: Any = None
    progress: int = 0
    accepted: dict[str, str] = field(default_factory=dict)  # request id -> chat id
    pending_answers: int = 0
    lost_calls: int = 0
    agent_messages: int = 0
    stopping: bool = False
    old_channels: list[grpc.aio.Channel] = field(default_factory=list)
    restart_seconds: list[float] = field(default_factory=list)

    def connect(self) -> None:
        self.channel = self.service.channel()
        self.stub = pb_grpc.HitlServiceStub(self.channel)
        self.up.set()

    async def crash_and_restart(self) -> None:
        self.up.clear()
        await self.service.kill()
        # The old channel stays open: closing it would cancel the calls in
        # flight locally instead of letting them see the server die.
        assert self.channel is not None
        self.old_channels.append(self.channel)
        started = time.monotonic()
        await self.service.start()
        self.restart_seconds.append(time.monotonic() - started)
        self.connect()

    async def close(self) -> None:
        for channel in [*self.old_channels, *([self.channel] if self.channel else [])]:
            await channel.close()

    async def rpc(self, method: str, request: Any) -> Any:
        """Calls until answered, across kills (the request id makes it safe)."""
        while True:
            await self.up.wait()
            stub = self.stub
            try:
                return await getattr(stub, method)(request, timeout=5)
            except grpc.aio.AioRpcError as exc:
                error = rich_error(exc)
                if error.reason == "DELIVERY_PENDING":
                    self.pending_answers += 1
                    continue
                if exc.code() not in RETRYABLE:
                    raise
                self.lost_calls += 1
                if stub is self.stub and self.up.is_set():
                    await asyncio.sleep(0.05)  # a client's retry back-off

    async def control(self, action: str, **kwargs: Any) -> None:
        answer = await self.fake.post(f"/_control/{action}", json=kwargs)
        assert answer.status_code == 200, answer.text

    async def converse(self, index: int, session: pb.Session) -> None:
        """One session's end user writing, and now and then its agent replying."""
        chat_id = session.external_chat_id
        number = 0
        while not self.stopping:
            number += 1
            request_id = f"crash-{index}-{number}"
            await self.rpc(
                "SendMessage",
                pb.SendMessageRequest(
                    session_id=session.id,
                    message=pb.Message(text=f"user {index} message {number}"),
                    request_id=request_id,
                ),
            )
            self.accepted[request_id] = chat_id
            self.progress += 1
            if self.rng.random() < 0.6:
                await self.control(
                    "agent_message",
                    chat_id=chat_id,
                    agent_id=JANE[0],
                    text=f"agent reply {index}-{number}",
                )
                self.agent_messages += 1

    async def killer(self, rounds: int) -> None:
        for _ in range(rounds):
            target = self.progress + self.rng.randint(2, 10)

            def reached(target: int = target) -> bool:
                return self.progress >= target

            await wait_for(reached, timeout=60, what="progress")
            await self.crash_and_restart()


async def test_kill_9_at_random_points_loses_and_doubles_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("HITL_CRASH_SEED", random.randrange(1 << 32)))
    print(f"crash test seed: {seed} (replay with HITL_CRASH_SEED={seed})")
    rng = random.Random(seed)
    fake = await FakeLiveChatProcess(webhook_secret="whsec-crash-test-93c1").start()
    http_port = free_port()
    env = {
        **fake.env,
        "HITL_PROVIDER": "livechat",
        "HITL_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        # A fixed sidecar port: the registered webhook URL survives restarts.
        "HITL_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "HITL_STORE_URL": f"sqlite:///{tmp_path}/hitl.db",
        "HITL_DATA_DIR": str(tmp_path / "data"),
        "HITL_PROVIDER_TIMEOUT": "1s",  # leases of crashed attempts expire in 4 s
        "HITL_LIVECHAT_SERVER_TIMEOUT": "2",  # the fake acts at once; no 15 s lease
        "HITL_REQUEST_BUDGET": "3s",
        "HITL_RECONCILE_INTERVAL": "1s",  # catch-up repairs webhooks lost while down
        "HITL_GRACE_SECONDS": "1s",
    }
    service = ServiceProcess(env, cwd=tmp_path)
    try:
        await run_cli(
            env,
            tmp_path,
            "livechat",
            "register-webhooks",
            "--url",
            f"http://127.0.0.1:{http_port}/webhooks/livechat",
        )
        async with httpx.AsyncClient(base_url=fake.url, timeout=10) as control:
            await service.start()
            driver = Driver(service, control, rng)
            driver.connect()
            sessions = []
            for index in range(SESSIONS):
                user = await driver.rpc(
                    "CreateUser",
                    pb.CreateUserRequest(name=f"User {index}", external_id=f"crash-user-{index}"),
                )
                started = await driver.rpc(
                    "StartHitl",
                    pb.StartHitlRequest(
                        user_id=user.user.id, title=f"crash {index}", request_id=f"start-{index}"
                    ),
                )
                sessions.append(started.session)
                await driver.control(
                    "agent_join", chat_id=started.session.external_chat_id, agent_id=JANE[0]
                )
            talkers = [asyncio.create_task(driver.converse(i, s)) for i, s in enumerate(sessions)]
            try:
                await driver.killer(ROUNDS)
                target = driver.progress + 10  # some traffic after the last restart
                await wait_for(lambda: driver.progress >= target, timeout=60, what="traffic")
            finally:
                driver.stopping = True
                await asyncio.wait_for(asyncio.gather(*talkers), 60)

            # Quiet: no webhook still pending at the fake.
            async def deliveries() -> list[dict[str, Any]]:
                return list((await control.get("/_control/deliveries")).json())

            async def quiet() -> bool:
                return all(d["outcome"] != "pending" for d in await deliveries())

            await wait_for(quiet, timeout=30, what="the fake's webhook queue to drain")
            delivered = await deliveries()
            assert driver.stub is not None
            log = await read_log(driver.stub)

            # Cursors: 1..head, no gap, no repeat.
            assert [int(e.cursor) for e in log] == list(range(1, len(log) + 1))

            # Each session started once, queued once, got Jane once.
            per_session = Counter((e.session_id, e.WhichOneof("kind")) for e in log)
            for session in sessions:
                for kind in ("started", "queued", "agent_assigned"):
                    assert per_session[(session.id, kind)] == 1, (session.id, kind)

            # Acknowledged webhook events: in the log exactly once.
            logged = Counter(
                e.agent_message.message.id for e in log if e.WhichOneof("kind") == "agent_message"
            )
            assert all(n == 1 for n in logged.values()), logged.most_common(3)
            acked = {
                d["envelope"]["payload"]["event"]["id"]
                for d in delivered
                if d["action"] == "incoming_event"
                and "200" in d["attempts"]
                and d["envelope"]["payload"]["event"]["type"] == "message"
            }
            missing = acked - set(logged)
            assert not missing, f"acknowledged but not logged: {sorted(missing)[:5]}"

            # Accepted messages: at LiveChat exactly once.
            at_fake: Counter[str] = Counter()
            for session in sessions:
                chat = (await control.get(f"/_control/chats/{session.external_chat_id}")).json()
                for thread in chat["threads"]:
                    for event in thread["events"]:
                        if event.get("custom_id", "").startswith("crash-"):
                            at_fake[event["custom_id"]] += 1
            assert set(at_fake) == set(driver.accepted)
            doubled = {k: n for k, n in at_fake.items() if n != 1}
            assert not doubled, f"sent more than once: {doubled}"

            failed = [d for d in delivered if d["outcome"] == "failed"]
            print(
                f"crash test: seed {seed}, {ROUNDS} kills, {len(driver.accepted)} messages "
                f"accepted (each once at LiveChat), {driver.pending_answers} DELIVERY_PENDING "
                f"answers, {driver.lost_calls} calls cut off by kills, "
                f"{driver.agent_messages} agent replies, {len(acked)} acknowledged and "
                f"{len(failed)} given-up webhook deliveries, {len(logged)} agent messages "
                f"logged once each, log head {len(log)}; restarts took "
                f"{', '.join(f'{t:.1f}' for t in driver.restart_seconds)} s"
            )
            await driver.close()
    finally:
        if service.proc is not None and service.proc.returncode is None:
            await service.terminate()
        await fake.stop()
