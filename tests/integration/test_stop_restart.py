"""StopHitl across a process restart: the service and the fake LiveChat as
real processes; the service is killed (SIGKILL) or stopped (SIGTERM) while
its stop waits for LiveChat, and the restarted process closes the chat,
once, and ends the session once.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests.ports import free_port
from tests.processes import FakeLiveChatProcess, ServiceProcess, run_cli
from tests.support import expect_error, read_log, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def session_log(stub: pb_grpc.HitlServiceAsyncStub, session_id: str) -> list[Any]:
    """The session's events, up to the head of the log when called."""
    async with asyncio.timeout(30):
        return [e for e in await read_log(stub) if e.session_id == session_id]


@pytest.mark.parametrize(
    ("how", "fault"),
    [
        ("kill", "drop"),
        ("term", "drop"),
        ("kill", "lost_response"),  # LiveChat closed it; the answer never came
        ("term", "delay"),  # the shutdown cuts off the attempt in flight; LiveChat acts later
    ],
)
async def test_a_stop_pending_across_a_restart_closes_the_chat_once(
    tmp_path: Path, how: str, fault: str
) -> None:
    fake = await FakeLiveChatProcess(webhook_secret="whsec-stop-restart-5e1d").start()
    http_port = free_port()
    env = {
        **fake.env,
        "HITL_PROVIDER": "livechat",
        "HITL_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "HITL_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "HITL_STORE_URL": f"sqlite:///{tmp_path}/hitl.db",
        "HITL_DATA_DIR": str(tmp_path / "data"),
        "HITL_PROVIDER_TIMEOUT": "1s",  # leases of killed attempts expire in seconds
        "HITL_LIVECHAT_SERVER_TIMEOUT": "2",
        "HITL_REQUEST_BUDGET": "3s",
        "HITL_GRACE_SECONDS": "1s",
    }
    service = ServiceProcess(env, cwd=tmp_path)
    channels: list[grpc.aio.Channel] = []
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

            async def act(action: str, **kwargs: Any) -> Any:
                answer = await control.post(f"/_control/{action}", json=kwargs)
                assert answer.status_code == 200, answer.text
                return answer.json()["result"]

            async def chat(chat_id: str) -> dict[str, Any]:
                return dict((await control.get(f"/_control/chats/{chat_id}")).json())

            async def deactivations(chat_id: str) -> list[dict[str, Any]]:
                calls = (await control.get("/_control/calls?method=deactivate_chat")).json()
                return [c for c in calls if c["body"].get("id") == chat_id]

            await service.start()
            channels.append(service.channel())
            stub = pb_grpc.HitlServiceStub(channels[-1])
            user = (await stub.CreateUser(pb.CreateUserRequest(name="Ada"), timeout=10)).user
            session = (
                await stub.StartHitl(
                    pb.StartHitlRequest(user_id=user.id, request_id="start-1", title="Refund"),
                    timeout=10,
                )
            ).session
            chat_id = session.external_chat_id
            await act("agent_join", chat_id=chat_id, agent_id="jane@acme.example")
            await act(
                "add_fault",
                method="deactivate_chat",
                kind=fault,
                times=1 if fault == "lost_response" else None,
                delay=8.0 if fault == "delay" else 0.0,
            )
            if fault == "drop":
                await act("add_fault", method="get_chat", kind="drop", times=None)
            request = pb.StopHitlRequest(session_id=session.id, reason="bye")
            if fault in ("drop", "delay"):
                error = await expect_error(
                    stub.StopHitl(request, timeout=2), grpc.StatusCode.UNAVAILABLE
                )
                assert error.reason == "STOP_PENDING"
            else:
                # The deactivate is made (the chat closes) and its answer lost.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.StopHitl(request, timeout=0.5)
                await wait_for(
                    lambda: deactivations(chat_id), timeout=30, what="the deactivate_chat"
                )
            if how == "kill":
                await service.kill()
            else:
                assert await service.terminate() == 0
            await act("clear_faults")
            await service.start()
            channels.append(service.channel())
            stub = pb_grpc.HitlServiceStub(channels[-1])

            async def is_ended() -> bool:
                got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=5)
                return bool(got.session.state == pb.SESSION_STATE_ENDED)

            await wait_for(is_ended, timeout=60, what="the session ended")
            final = (
                await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=5)
            ).session
            assert (final.ended_by, final.end_reason) == (pb.ENDED_BY_CALLER, "bye")
            assert not (await chat(chat_id))["threads"][-1]["active"]
            assert len((await chat(chat_id))["threads"]) == 1
            done = [c for c in await deactivations(chat_id) if c["status"] == 200]
            assert len(done) == 1

            async def quiet() -> bool:
                found = (await control.get("/_control/deliveries")).json()
                return all(d["outcome"] != "pending" for d in found)

            await wait_for(quiet, timeout=30, what="webhooks delivered")
            events = await session_log(stub, session.id)
            all_events = [e for e in events if e.WhichOneof("kind") == "ended"]
            assert [(e.ended.by, e.ended.reason) for e in all_events] == [
                (pb.ENDED_BY_CALLER, "bye")
            ]
    finally:
        for channel in channels:
            await channel.close()
        if service.proc is not None and service.proc.returncode is None:
            await service.kill()
        await fake.stop()
