"""Two replicas on one database: session rules and idempotency hold across them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests.replicas.helpers import Replica, call_with_retries, deployment, make_session, text
from tests.support import TIMEOUT, rich_error, rid

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

USERS = 8


async def new_user(stub: pb_grpc.HitlServiceAsyncStub, name: str) -> pb.User:
    response = await stub.CreateUser(
        pb.CreateUserRequest(name=name, external_id=f"crm-{name}"), timeout=TIMEOUT
    )
    return response.user


async def started_chats(fake_calls: list[dict[str, object]]) -> int:
    return sum(1 for c in fake_calls if c["status"] == 200)


class TestOneOpenSession:
    async def test_concurrent_starts_for_one_user_on_both_replicas_open_one_session(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            # CreateUser races too: one user per external id.
            pairs = await asyncio.gather(
                *(
                    asyncio.gather(new_user(a.stub, f"u{i}"), new_user(b.stub, f"u{i}"))
                    for i in range(USERS)
                )
            )
            assert all(x.id == y.id for x, y in pairs)

            async def start(replica: Replica, user_id: str) -> pb.Session | str:
                request = pb.StartHitlRequest(user_id=user_id, title="race", request_id=rid())
                try:
                    return (await replica.stub.StartHitl(request, timeout=TIMEOUT)).session
                except grpc.aio.AioRpcError as exc:
                    error = rich_error(exc)
                    assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error.message
                    assert error.reason == "SESSION_ALREADY_OPEN"
                    return error.metadata["session_id"]

            results = await asyncio.gather(
                *(asyncio.gather(start(a, x.id), start(b, x.id)) for x, _ in pairs)
            )
            for (user, _), outcome in zip(pairs, results, strict=True):
                won = [r for r in outcome if isinstance(r, pb.Session)]
                lost = [r for r in outcome if isinstance(r, str)]
                assert len(won) == 1, outcome
                assert len(lost) == 1, outcome
                assert lost[0] == won[0].id  # the refusal names the open session
                listed = await b.stub.ListSessions(
                    pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT
                )
                assert [s.id for s in listed.sessions] == [won[0].id]
            assert await started_chats(await d.fake.calls("start_chat")) == USERS


class TestIdempotencyAcrossReplicas:
    async def test_one_start_request_sent_to_both_replicas_opens_one_session(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            users = [await new_user(a.stub, f"v{i}") for i in range(USERS)]

            async def start(first: Replica, request: pb.StartHitlRequest) -> pb.Session:
                # A client retries START_IN_PROGRESS with the same request.
                response, _ = await call_with_retries(
                    lambda attempt: first,
                    lambda stub: stub.StartHitl(request, timeout=TIMEOUT),
                    deadline=30,
                )
                return response.session

            requests = [
                pb.StartHitlRequest(user_id=u.id, title="same", request_id=rid()) for u in users
            ]
            results = await asyncio.gather(
                *(asyncio.gather(start(a, r), start(b, r)) for r in requests)
            )
            for x, y in results:
                assert x.id == y.id
                assert x.external_chat_id == y.external_chat_id
            assert await started_chats(await d.fake.calls("start_chat")) == USERS

    async def test_one_message_sent_to_both_replicas_is_delivered_once(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            sessions = await asyncio.gather(
                *(make_session((a, b)[i % 2].stub, f"w{i}") for i in range(USERS))
            )
            requests = [text(rid(), s.id, "hello") for s in sessions for _ in range(3)]
            answers = await asyncio.gather(
                *(
                    asyncio.gather(
                        a.stub.SendMessage(r, timeout=TIMEOUT),
                        b.stub.SendMessage(r, timeout=TIMEOUT),
                    )
                    for r in requests
                )
            )
            for x, y in answers:
                assert x.message_id == y.message_id
                assert x.external_message_id == y.external_message_id
            for session in sessions:
                ids = [r.request_id for r in requests if r.session_id == session.id]
                assert sorted(await d.fake.custom_ids(session.external_chat_id)) == sorted(ids)
