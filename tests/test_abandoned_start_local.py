"""A given-up start's close (HITL_ABANDON_AFTER) on the local console: what
counts as the user having a handoff open again."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers.errors import ProviderAuthError
from providers.local.provider import LocalProvider
from providers.types import ProviderUser, StartRequest, StartResult
from tests.conftest import start_app
from tests.support import TIMEOUT, rid, wait_for


def _close_attempts(app: Any) -> float:
    registry = app.metrics.registry
    return sum(
        registry.get_sample_value(
            "hitl_outbox_attempts_total", {"kind": "stop", "outcome": outcome}
        )
        or 0.0
        for outcome in ("done", "retry", "failed")
    )


def _status(local: LocalProvider, chat_id: str) -> str:
    _, conversations = local.snapshot()
    return str(next(c["status"] for c in conversations if c["id"] == chat_id))


async def test_a_handoff_still_starting_when_the_close_falls_due_does_not_cancel_it(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Generous budgets: the second start below is held, not timed out.
    env = {
        **service_env,
        "HITL_ABANDON_AFTER": "0.5s",
        "HITL_PROVIDER_TIMEOUT": "20s",
        "HITL_REQUEST_BUDGET": "30s",
    }
    app = await start_app(env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.HitlServiceStub(channel)
            local = app.provider
            assert isinstance(local, LocalProvider)
            user = (
                await stub.CreateUser(
                    pb.CreateUserRequest(name="Ada", external_id=rid()), timeout=TIMEOUT
                )
            ).user

            # 1. A start that opens the conversation, then fails on our side
            #    (INTERNAL): its close is scheduled.
            opened: list[str] = []
            real_start = local.start

            async def start_then_bug(
                request: StartRequest, provider_user: ProviderUser, *, timeout: float
            ) -> StartResult:
                result = await real_start(request, provider_user, timeout=timeout)
                opened.append(result.chat.external_chat_id)
                raise RuntimeError("a bug after the provider answered")

            monkeypatch.setattr(local, "start", start_then_bug)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.StartHitl(
                    pb.StartHitlRequest(user_id=user.id, request_id=rid()), timeout=TIMEOUT
                )
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            monkeypatch.setattr(local, "start", real_start)
            [chat_id] = opened
            assert _status(local, chat_id) == "waiting"

            # 2. The user's next start is still STARTING when the close falls
            #    due, then fails before the provider's start is ever called (a
            #    refused identity; an outage alike): it took nothing over.
            async def upsert_down(*args: Any, **kwargs: Any) -> ProviderUser:
                await wait_for(
                    lambda: _close_attempts(app) >= 1, timeout=15, what="the close's attempt"
                )
                raise ProviderAuthError("HITL_SCRIPTED_TOKEN", "the token was revoked")

            monkeypatch.setattr(local, "upsert_user", upsert_down)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.StartHitl(
                    pb.StartHitlRequest(user_id=user.id, request_id=rid()), timeout=TIMEOUT * 2
                )
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            # Nobody has a handoff open: the given-up conversation is closed.
            await wait_for(
                lambda: _status(local, chat_id) == "ended",
                timeout=10,
                what="the given-up conversation to be closed",
            )
    finally:
        await app.stop(grace=1)
