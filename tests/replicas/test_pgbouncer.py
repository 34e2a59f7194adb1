"""Replicas through a real PgBouncer in transaction mode, with the settings
README.md ("Connection poolers") documents for it.

PgBouncer (``tests/pgbouncer_fixture.py``) gives each database two server
connections (``default_pool_size = 2``) while two replicas open up to eight
client connections each: transactions of different clients take turns on
the same server connections, so session state one leaves behind (a named
prepared statement, a session advisory lock, LISTEN, a plain SET) would be
met by another, or missed by the next transaction of its own client.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.secret import Secret
from hitl_service.store.migrations import migrations
from hitl_service.store.postgres import PostgresStore
from tests.pgbouncer_fixture import PgBouncer
from tests.replicas.helpers import cursors, deployment, make_session, text, until
from tests.support import TIMEOUT, EventCollector, rid

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

# README.md, "Connection poolers": PgBouncer in transaction mode before 1.21.
BEHIND_PGBOUNCER = {"HITL_STORE_POLL_ONLY": "true", "HITL_STORE_STATEMENT_CACHE": "0"}
SENDS = 16  # concurrent SendMessage calls, over both replicas
AGENT_LINES = 12
# B's stream learns of A's commits by polling (poll-only): about a second.
STREAM_DEADLINE = 10.0


def agent_texts(events: list[pb.Event], session_id: str) -> list[str]:
    return [
        e.agent_message.message.text
        for e in events
        if e.session_id == session_id and e.WhichOneof("kind") == "agent_message"
    ]


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Rows of one statement on a connection of its own."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def pinned(url: str) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A client connection through PgBouncer inside a transaction: it holds
    one server connection until the block ends."""
    conn = await asyncpg.connect(url, statement_cache_size=0)
    try:
        async with conn.transaction():
            yield conn
    finally:
        await conn.close()


async def leftover_session_state(pgbouncer: PgBouncer, dsn: str) -> list[dict[str, Any]]:
    """What each of the pooler's server connections still carries from the
    transactions it ran: named prepared statements, LISTEN channels,
    advisory locks, and the settings the store changes (with SET LOCAL)."""
    url = pgbouncer.url(dsn)
    async with pinned(url) as first, pinned(url) as second:  # the pool holds two
        found = []
        for conn in (first, second):
            row = await conn.fetchrow(
                "SELECT pg_backend_pid() AS pid,"
                " ARRAY(SELECT name FROM pg_prepared_statements) AS statements,"
                " ARRAY(SELECT pg_listening_channels()) AS channels,"
                " (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
                "  AND locktype = 'advisory') AS advisory_locks,"
                " current_setting('statement_timeout') AS statement_timeout,"
                " current_setting('lock_timeout') AS lock_timeout"
            )
            assert row is not None
            found.append(dict(row.items()))
    return found


class TestThroughPgBouncer:
    async def test_a_handoff_over_two_replicas_sharing_two_server_connections(
        self, pgbouncer: PgBouncer, postgres_dsn: str, tmp_path: Path
    ) -> None:
        via = pgbouncer.url(postgres_dsn)
        # Both replicas start together on the empty database: the schema is
        # created through PgBouncer, under the migration's advisory lock.
        async with deployment(via, tmp_path, **BEHIND_PGBOUNCER) as d:
            a, b = d["a"], d["b"]
            applied = await fetch(postgres_dsn, "SELECT version FROM schema_version ORDER BY 1")
            newest = migrations("postgres")[-1][0]
            assert [r["version"] for r in applied] == list(range(1, newest + 1))
            await d.fake.register_webhooks(a.webhook_url)  # LiveChat only knows A
            async with EventCollector(b.stub, after="0") as on_b:
                session = await make_session(a.stub, "ada")
                chat = session.external_chat_id
                await d.fake.control("agent_join", chat_id=chat)
                lines = [f"agent line {i}" for i in range(AGENT_LINES)]

                async def agent_talks() -> None:
                    for line in lines:
                        await d.fake.control("agent_message", chat_id=chat, text=line)

                async def send(i: int) -> str:
                    replica = (a, b)[i % 2]
                    request = text(rid(), session.id, f"user line {i} via {replica.name}")
                    response = await replica.stub.SendMessage(request, timeout=TIMEOUT)
                    assert response.external_message_id
                    return request.request_id

                # The user writes while the agent does: 16 sends at once on
                # both replicas, and webhooks into A.
                talking = asyncio.create_task(agent_talks())
                sent = await asyncio.gather(*(send(i) for i in range(SENDS)))
                await talking
                await until(
                    lambda: len(agent_texts(on_b.events, session.id)) == len(lines),
                    timeout=STREAM_DEADLINE,
                    what="the agent's messages on B's stream (polling through PgBouncer)",
                )
                assert agent_texts(on_b.events, session.id) == lines

                # Each message reached the agent once, in the service's order.
                at_agent = await d.fake.custom_ids(chat)
                assert sorted(at_agent) == sorted(sent)
                in_outbox = await fetch(
                    postgres_dsn,
                    "SELECT request_id FROM outbox WHERE session_id = $1 AND kind = 'send'"
                    " ORDER BY pos",
                    session.id,
                )
                assert at_agent == [r["request_id"] for r in in_outbox]

                stopped = await b.stub.StopHitl(
                    pb.StopHitlRequest(session_id=session.id, reason="solved"), timeout=TIMEOUT
                )
                assert stopped.session.state == pb.SESSION_STATE_ENDED
                await until(
                    lambda: "ended" in on_b.kinds(session.id),
                    timeout=STREAM_DEADLINE,
                    what="the end on B's stream",
                )
            # B's stream: the log from its start, once, in order.
            assert cursors(on_b.events) == list(range(1, len(on_b.events) + 1))
            assert on_b.kinds(session.id).count("ended") == 1

            await self.assert_multiplexed(pgbouncer, postgres_dsn)
            for replica in (a, b):
                assert not re.search(r"prepared statement", replica.process.log())

    async def assert_multiplexed(self, pgbouncer: PgBouncer, postgres_dsn: str) -> None:
        """Many client connections shared two server connections, which
        carry nothing over from one transaction to the next."""
        database = postgres_dsn.rsplit("/", 1)[1]
        logins = pgbouncer.log().count(f"login attempt: db={database} ")
        assert logins > 2 * 2, f"{logins} client logins: the pool was not shared"
        servers = await fetch(
            postgres_dsn,
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = $1"
            " AND pid <> pg_backend_pid()",
            database,
        )
        assert servers[0]["n"] <= 2  # default_pool_size; the replicas reach no further
        defaults = await fetch(
            postgres_dsn,
            "SELECT current_setting('statement_timeout') AS s,"
            " current_setting('lock_timeout') AS l",
        )
        states = await leftover_session_state(pgbouncer, postgres_dsn)
        assert len({state["pid"] for state in states}) == 2
        for state in states:
            assert state["statements"] == [], state
            assert state["channels"] == [], state
            assert state["advisory_locks"] == 0, state
            assert (state["statement_timeout"], state["lock_timeout"]) == (
                defaults[0]["s"],
                defaults[0]["l"],
            ), state


class TestWhyTheStatementCacheIsOff:
    """PgBouncer 1.18 in transaction mode does not follow named prepared
    statements: one prepared on a server connection is missing on the
    next. asyncpg names (and caches) the statements it prepares unless its
    cache is off (HITL_STORE_STATEMENT_CACHE=0)."""

    @pytest.mark.parametrize("cache", [0, 100], ids=["cache-off", "cache-on"])
    async def test_a_repeated_read_on_another_server_connection(
        self, pgbouncer: PgBouncer, postgres_dsn: str, cache: int
    ) -> None:
        store = PostgresStore(
            Secret(pgbouncer.url(postgres_dsn)),
            pool_min=1,
            pool_max=1,
            poll_only=True,
            statement_cache_size=cache,
        )
        await store.open()  # migrates through the pooler, on one server connection
        try:
            newest = migrations("postgres")[-1][0]
            assert await store.schema_version() == newest  # prepared on that connection
            # Another client takes that server connection: the next read of
            # the store's client runs on a second one.
            async with pinned(pgbouncer.url(postgres_dsn)):
                if cache:
                    with pytest.raises(
                        asyncpg.InvalidSQLStatementNameError,
                        match=r'prepared statement "__asyncpg_stmt_\w+__" does not exist',
                    ):
                        await store.schema_version()
                else:
                    assert await store.schema_version() == newest
        finally:
            await store.close()
