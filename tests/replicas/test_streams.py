"""Two replicas on one database: the event log and streams are shared."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.replicas.helpers import cursors, deployment, make_session, text, until
from tests.support import TIMEOUT, EventCollector, expect_error, rid

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


async def log_head(dsn: str) -> int:
    """The newest committed cursor, straight from the database."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT seq FROM event_log_head"))
    finally:
        await conn.close()


def agent_texts(events: list[pb.Event], session_id: str) -> list[str]:
    return [
        e.agent_message.message.text
        for e in events
        if e.session_id == session_id and e.WhichOneof("kind") == "agent_message"
    ]


# The settings for PgBouncer in transaction mode: no LISTEN (polling only)
# and no named prepared statements.
BEHIND_PGBOUNCER = {"HITL_STORE_POLL_ONLY": "true", "HITL_STORE_STATEMENT_CACHE": "0"}


class TestWebhooksReachEveryReplica:
    @pytest.mark.parametrize("env", [{}, BEHIND_PGBOUNCER], ids=["listen", "poll-only"])
    async def test_a_webhook_to_a_reaches_a_stream_on_b_in_order_once(
        self, postgres_dsn: str, tmp_path: Path, env: dict[str, str]
    ) -> None:
        async with deployment(postgres_dsn, tmp_path, **env) as d:
            a, b = d["a"], d["b"]
            await d.fake.register_webhooks(a.webhook_url)  # LiveChat only knows A
            async with (
                EventCollector(b.stub, after="0") as on_b,
                EventCollector(a.stub, after="0") as on_a,
            ):
                session = await make_session(a.stub, "ada")
                chat = session.external_chat_id
                await d.fake.control("agent_join", chat_id=chat)
                lines = [f"agent line {i}" for i in range(20)]
                for line in lines:
                    await d.fake.control("agent_message", chat_id=chat, text=line)
                await until(
                    lambda: len(agent_texts(on_b.events, session.id)) == len(lines),
                    what="the agent's messages on B",
                )
                assert agent_texts(on_b.events, session.id) == lines
                deliveries = await d.fake.deliveries()
                assert deliveries
                assert {x["url"] for x in deliveries} == {a.webhook_url}

                # Now LiveChat delivers every webhook to both replicas at
                # once: the dedupe keys in the database keep one copy.
                await d.fake.register_webhooks(b.webhook_url)
                more = [f"twice delivered {i}" for i in range(10)]
                for line in more:
                    await d.fake.control("agent_message", chat_id=chat, text=line)
                await until(d.fake.deliveries_settled, what="webhook deliveries")
                deliveries = await d.fake.deliveries()
                assert {x["outcome"] for x in deliveries} == {"delivered"}
                assert {x["url"] for x in deliveries} == {a.webhook_url, b.webhook_url}
                head = await log_head(d.dsn)
                await until(
                    lambda: on_b.events and int(on_b.events[-1].cursor) >= head,
                    what="B's stream to reach the head",
                )
                await until(
                    lambda: on_a.events and int(on_a.events[-1].cursor) >= head,
                    what="A's stream to reach the head",
                )
            assert agent_texts(on_b.events, session.id) == lines + more
            # No gaps, no duplicates, and both replicas show the same log.
            assert cursors(on_b.events) == list(range(1, head + 1))
            assert [(e.cursor, e.WhichOneof("kind")) for e in on_a.events] == [
                (e.cursor, e.WhichOneof("kind")) for e in on_b.events
            ]


class TestMessagesAcrossReplicas:
    async def test_send_on_b_for_a_session_started_on_a(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            session = await make_session(a.stub, "grace")
            sent = []
            for i, replica in enumerate((b, a, b, b, a)):
                request = text(rid(), session.id, f"user line {i} via {replica.name}")
                response = await replica.stub.SendMessage(request, timeout=TIMEOUT)
                assert response.message_id
                assert response.external_message_id
                sent.append(request.request_id)
            # A retry on the other replica answers from the record: not sent again.
            again = await a.stub.SendMessage(
                text(sent[0], session.id, "user line 0 via b"), timeout=TIMEOUT
            )
            assert again.external_message_id
            assert await d.fake.custom_ids(session.external_chat_id) == sent
            sends = await d.fake.calls("send_event")
            assert sorted(
                custom_id
                for c in sends
                if not (custom_id := c["body"]["event"]["custom_id"]).startswith("hitl:")
            ) == sorted(sent)

    async def test_stop_on_b_for_a_session_started_on_a(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            await d.fake.register_webhooks(a.webhook_url)
            session = await make_session(a.stub, "hopper")
            chat = session.external_chat_id
            await d.fake.control("agent_join", chat_id=chat)
            stopped = await b.stub.StopHitl(
                pb.StopHitlRequest(session_id=session.id, reason="solved"), timeout=TIMEOUT
            )
            assert stopped.session.state == pb.SESSION_STATE_ENDED
            assert not (await d.fake.chat(chat))["thread"]["active"]
            late = text(rid(), session.id, "one more thing")
            error = await expect_error(
                a.stub.SendMessage(late, timeout=TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION
            )
            assert error.reason == "SESSION_ENDED"
            # LiveChat's own end notification reaches A afterwards: no second end.
            await until(d.fake.deliveries_settled, what="webhook deliveries")
            assert {x["outcome"] for x in await d.fake.deliveries()} == {"delivered"}
            head = await log_head(d.dsn)
            async with EventCollector(a.stub, session_id=session.id, after="0") as events:
                await until(
                    lambda: events.events and int(events.events[-1].cursor) >= head,
                    what="the session's events",
                )
            kinds = [e.WhichOneof("kind") for e in events.events]
            assert kinds.count("ended") == 1
            assert kinds[-1] == "ended"


class TestStreamClientMoves:
    async def test_a_client_moving_from_a_to_b_with_its_cursor_misses_nothing(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            await d.fake.register_webhooks(b.webhook_url)
            session = await make_session(b.stub, "lin")
            chat = session.external_chat_id
            await d.fake.control("agent_join", chat_id=chat)
            lines = [f"line {i}" for i in range(60)]

            async def agent_talks() -> None:
                for line in lines:
                    await d.fake.control("agent_message", chat_id=chat, text=line)

            talking = asyncio.create_task(agent_talks())
            try:
                # First connection: A, from the beginning, for a while.
                received: list[pb.Event] = []
                async with EventCollector(a.stub, session_id=session.id, after="0") as on_a:
                    await until(
                        lambda: len(agent_texts(on_a.events, session.id)) >= 15,
                        what="15 messages on A",
                    )
                    received.extend(on_a.events)
                last = received[-1].cursor
                # Second connection: B, resuming after the last cursor seen.
                async with EventCollector(b.stub, session_id=session.id, after=last) as on_b:
                    await until(
                        lambda: len(agent_texts(received + on_b.events, session.id)) >= len(lines),
                        what="every message after moving to B",
                    )
                    received.extend(on_b.events)
                await talking
            finally:
                talking.cancel()
            assert agent_texts(received, session.id) == lines
            got = cursors(received)
            assert got == sorted(set(got)), "a cursor arrived twice or out of order"
            # Nothing of the session is missing: the log by cursor agrees.
            async with EventCollector(a.stub, session_id=session.id, after="0") as full:
                await until(lambda: len(full.events) >= len(received), what="the full log")
            assert cursors(full.events)[: len(got)] == got

    async def test_a_client_of_a_killed_replica_resumes_on_the_other(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            await d.fake.register_webhooks(b.webhook_url)
            session = await make_session(b.stub, "kai")
            chat = session.external_chat_id
            await d.fake.control("agent_join", chat_id=chat)
            lines = [f"line {i}" for i in range(40)]
            received: list[pb.Event] = []
            on_a = EventCollector(a.stub, after="0")
            await asyncio.wait_for(on_a.ready.wait(), TIMEOUT)
            for line in lines[:20]:
                await d.fake.control("agent_message", chat_id=chat, text=line)
            await until(lambda: len(agent_texts(on_a.events, session.id)) >= 10, what="10 on A")
            await a.kill()
            await until(lambda: on_a.error is not None, what="A's stream to break")
            assert on_a.error is not None
            assert on_a.error.code() == grpc.StatusCode.UNAVAILABLE
            received.extend(on_a.events)
            await on_a.__aexit__()
            for line in lines[20:]:
                await d.fake.control("agent_message", chat_id=chat, text=line)
            async with EventCollector(b.stub, after=received[-1].cursor) as on_b:
                await until(
                    lambda: len(agent_texts(received + on_b.events, session.id)) >= len(lines),
                    what="every message after moving to B",
                )
                received.extend(on_b.events)
            assert agent_texts(received, session.id) == lines
            assert cursors(received) == list(range(1, len(received) + 1))
