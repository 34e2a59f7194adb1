"""Log test (issue 5): a full LiveChat flow with every secret set, the service
as a real process logging JSON at debug level, and errors provoked on purpose;
no secret appears anywhere in what the processes print.

The secrets: the agent token (Base64) and the personal access token inside
it, the webhook secret and the previous one, the API tokens, and every
customer token and identity cookie the fake LiveChat issued.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests.fake_livechat import FakeLiveChat
from tests.integration.conftest import JANE, MediaServer
from tests.ports import free_port
from tests.processes import ROOT
from tests.support import TIMEOUT, rich_error, wait_for

pytestmark = pytest.mark.slow

WEBHOOK_SECRET = "whsec-logtest-4f8a1c0e7d29"
PREVIOUS_SECRET = "whsec-previous-91be3a55c0d1"
API_TOKENS = ("api-token-alpha-6a3f0c81e2", "api-token-beta-c27e91d4aa")


class Captured:
    """A process whose stdout and stderr are both kept."""

    def __init__(self, *args: str, env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Task[None]] = []

    async def start(self) -> Captured:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hitl_service",
            *self.args,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)},
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self._pump(self.proc.stdout, self.stdout)),
            asyncio.create_task(self._pump(self.proc.stderr, self.stderr)),
        ]
        return self

    @staticmethod
    async def _pump(stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode(errors="replace"))

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.gather(*self._pumps)
        return code

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    @property
    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)


async def run(*args: str, env: dict[str, str], cwd: Path) -> Captured:
    done = await Captured(*args, env=env, cwd=cwd).start()
    await done.wait()
    return done


async def serving(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service="hitl.v1.HitlService"), timeout=2
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    return False


async def test_no_secret_appears_in_any_output(
    tmp_path: Path, fake: FakeLiveChat, media: MediaServer
) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **fake.env(webhook_secret=WEBHOOK_SECRET),
        "HITL_LIVECHAT_WEBHOOK_SECRET_PREVIOUS": PREVIOUS_SECRET,
        "HITL_API_TOKENS": ",".join(API_TOKENS),
        "HITL_PROVIDER": "livechat",
        "HITL_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "HITL_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "HITL_STORE_URL": f"sqlite:///{tmp_path}/hitl.db",
        "HITL_DATA_DIR": str(tmp_path / "data"),
        "HITL_LOG_FORMAT": "json",
        "HITL_LOG_LEVEL": "debug",
        "HITL_PROVIDER_TIMEOUT": "1s",
        "HITL_REQUEST_BUDGET": "4s",
        "HITL_RECONCILE_INTERVAL": "1s",
        "HITL_LIVECHAT_SERVER_TIMEOUT": "2",
    }
    hook_url = f"http://127.0.0.1:{http_port}/webhooks/livechat"
    outputs = [
        await run("check", env=env, cwd=tmp_path),
        await run("livechat", "register-webhooks", "--url", hook_url, env=env, cwd=tmp_path),
    ]
    service = await Captured("serve", env=env, cwd=tmp_path).start()
    outputs.append(service)
    target = f"127.0.0.1:{grpc_port}"
    try:
        await wait_for(lambda: serving(target), timeout=60, what="the service")
        auth = (("authorization", f"Bearer {API_TOKENS[1]}"),)
        async with (
            grpc.aio.insecure_channel(target) as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http,
        ):
            stub: Any = pb_grpc.HitlServiceStub(channel)

            async def call(method: str, request: Any) -> Any:
                """Calls with the API token; retries while delivery is pending."""
                for _ in range(5):
                    try:
                        return await getattr(stub, method)(request, metadata=auth, timeout=TIMEOUT)
                    except grpc.aio.AioRpcError as exc:
                        if rich_error(exc).reason != "DELIVERY_PENDING":
                            raise
                raise AssertionError(f"{method} still pending")

            # A caller with a wrong API token.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateUser(
                    pb.CreateUserRequest(name="x"),
                    metadata=(("authorization", "Bearer " + API_TOKENS[0][:-1]),),
                    timeout=TIMEOUT,
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

            user = (await call("CreateUser", pb.CreateUserRequest(name="Ada", email="a@b.co"))).user
            session = (
                await call(
                    "StartHitl",
                    pb.StartHitlRequest(user_id=user.id, title="secrets?", request_id="log-1"),
                )
            ).session
            chat_id = session.external_chat_id
            await call(
                "SendMessage",
                pb.SendMessageRequest(
                    session_id=session.id, message=pb.Message(text="hello"), request_id="log-2"
                ),
            )
            media_message = pb.Message(
                media=pb.Media(
                    kind=pb.MEDIA_KIND_FILE,
                    url=media.url("statement.pdf", "application/pdf", 1500),
                    name="statement.pdf",
                )
            )
            await call(
                "SendMessage",
                pb.SendMessageRequest(
                    session_id=session.id, message=media_message, request_id="log-3"
                ),
            )
            fake.agent_join(chat_id, JANE[0])
            fake.agent_message(chat_id, JANE[0], text="agent here")
            stream = stub.StreamEvents(
                pb.StreamEventsRequest(session_id=session.id, after_cursor="0"),
                metadata=auth,
                timeout=TIMEOUT,
            )
            async for event in stream:
                if event.WhichOneof("kind") == "agent_message":
                    break
            stream.cancel()

            # Webhooks with a wrong secret, and with the right one but a wrong shape.
            thread_id = fake.chat(chat_id).thread.id
            forged = {
                "action": "incoming_event",
                "secret_key": "whsec-wrong-value-0000",
                "payload": {"chat_id": chat_id, "thread_id": thread_id},
            }
            assert (await http.post("/webhooks/livechat", json=forged)).status_code == 401
            forged["secret_key"] = WEBHOOK_SECRET
            assert (await http.post("/webhooks/livechat", json=forged)).status_code == 400
            forged["secret_key"] = PREVIOUS_SECRET
            assert (await http.post("/webhooks/livechat", json=forged)).status_code == 400
            assert (await http.post("/webhooks/livechat", content=b"{oops")).status_code == 400

            # The customer token expires; the first refresh fails at LiveChat.
            fake.advance_clock(8 * 3600 + 60)
            fake.add_fault("customer_token", api="accounts", kind="status", status=500)
            await call(
                "SendMessage",
                pb.SendMessageRequest(
                    session_id=session.id, message=pb.Message(text="later"), request_id="log-4"
                ),
            )
            # Sends failing: a 5xx (retried), a lost answer, then a refusal.
            fake.add_fault("send_event", api="customer", error_type="internal", times=2)
            fake.add_fault("send_event", api="customer", kind="lost_response")
            await call(
                "SendMessage",
                pb.SendMessageRequest(
                    session_id=session.id, message=pb.Message(text="flaky"), request_id="log-5"
                ),
            )
            fake.add_fault("send_event", api="customer", error_type="validation")
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(
                    "SendMessage",
                    pb.SendMessageRequest(
                        session_id=session.id, message=pb.Message(text="no"), request_id="log-6"
                    ),
                )
            assert rich_error(failed.value).code == grpc.StatusCode.FAILED_PRECONDITION
            # A stop refused for the agent token, then a stop that works.
            fake.add_fault("deactivate_chat", api="agent", error_type="authentication")
            with pytest.raises(grpc.aio.AioRpcError) as stop_refused:
                await call("StopHitl", pb.StopHitlRequest(session_id=session.id))
            error = rich_error(stop_refused.value)
            assert error.metadata.get("setting") == "HITL_LIVECHAT_AGENT_TOKEN"
            await call("StopHitl", pb.StopHitlRequest(session_id=session.id))
    finally:
        await service.stop()

    everything = "".join(o.output for o in outputs)
    agent_token = env["HITL_LIVECHAT_AGENT_TOKEN"]
    pat = base64.b64decode(agent_token).decode().split(":", 1)[1]
    issued = [t.value for t in fake.state.tokens.values()]
    cookies = [v for c in fake.state.customers.values() for v in (c.cid, c.cst)]
    secrets = {
        "agent token": [agent_token],
        "personal access token": [pat],
        "webhook secret": [WEBHOOK_SECRET],
        "previous webhook secret": [PREVIOUS_SECRET],
        "API tokens": list(API_TOKENS),
        "customer tokens": issued,
        "customer cookies": cookies,
    }
    assert issued
    assert cookies
    leaks = {what: v for what, values in secrets.items() for v in values if v in everything}
    assert not leaks, f"secrets in the output: {sorted(leaks)}"
    # The output is really there and covers the provoked errors.
    for expected in (
        "service.ready",
        "webhook.done",
        "livechat.customer_token_refreshed",
        "livechat.error",
        "outbox.retry",
        "UNAUTHENTICATED",
        "livechat.call",  # debug lines of every LiveChat call
        "all checks passed",
        "registered: incoming_event",
        str(fake.chat(chat_id).customer_id),  # ids are logged, secrets are not
    ):
        assert expected in everything, expected
    assert re.search(r'"outcome": ?"rejected"', everything)
