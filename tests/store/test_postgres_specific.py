"""PostgreSQL only: replicas on one database, locks, NOTIFY, outages, secrets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from structlog.testing import capture_logs

from hitl_service.config import parse_store_url
from hitl_service.domain import (
    IdempotencyRecord,
    OutboxItem,
    OutboxKind,
    OutboxStatus,
    Session,
    SessionState,
    User,
)
from hitl_service.errors import StoreUnavailable
from hitl_service.secret import Secret
from hitl_service.store import postgres_tx
from hitl_service.store.base import OpenSessionExists, Tx
from hitl_service.store.migrations import migrations
from hitl_service.store.postgres import PostgresStore
from hitl_service.store.postgres_db import Db, Redactor
from providers.types import Queued
from tests.postgres_fixture import PgCluster, PostgresServer
from tests.store.factories import T0, at, make_outbox, make_session, make_user
from tests.store.helpers import Boom, eventually, lock_waits, rolled_back, until_blocked

pytestmark = pytest.mark.postgres

Make = Callable[..., PostgresStore]


@pytest.fixture
async def make(postgres_dsn: str) -> AsyncIterator[Make]:
    """Builds PostgresStores on the test database (a replica each); closes them after."""
    made: list[PostgresStore] = []

    def build(dsn: str = postgres_dsn, **options: Any) -> PostgresStore:
        store = PostgresStore(Secret(dsn), **{"pool_min": 1, "pool_max": 4, **options})
        made.append(store)
        return store

    try:
        yield build
    finally:
        for store in reversed(made):
            await store.close()


async def opened(make: Make, **options: Any) -> PostgresStore:
    store = make(**options)
    await store.open()
    return store


async def _session(store: PostgresStore, **fields: Any) -> Session:
    user = make_user()
    session = make_session(user.id, **fields)
    async with store.transaction() as tx:
        await tx.insert_user(user)
        await tx.insert_session(session)
    return session


NEWEST = max(version for version, _ in migrations("postgres"))


async def _one_pending_and_another(
    make: Make,
) -> tuple[PostgresStore, PostgresStore, OutboxItem, OutboxItem]:
    """Two replicas, a pending item of session S stored, and the next one
    (not stored yet)."""
    a, b = await opened(make), await opened(make)
    ahead, item = make_outbox("S"), make_outbox("S")
    async with a.transaction() as tx:
        await tx.insert_outbox(ahead)
    return a, b, ahead, item


class TestMigrations:
    async def test_replicas_starting_together_migrate_once(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        stores = [make() for _ in range(6)]
        await asyncio.gather(*(s.open() for s in stores))
        assert [await s.schema_version() for s in stores] == [NEWEST] * 6
        assert await monitor.fetchval("SELECT count(*) FROM schema_version") == NEWEST
        assert await monitor.fetchval("SELECT count(*) FROM event_log_head") == 1

    async def test_migrations_need_no_superuser(
        self, make: Make, monitor: asyncpg.Connection, postgres_server: PostgresServer
    ) -> None:
        if postgres_server.cluster is None:
            pytest.skip("an external server: HITL_TEST_POSTGRES_URL chose the role")
        # Our cluster's test role owns its database and nothing more, like production.
        assert not await monitor.fetchval(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        )
        store = await opened(make)
        assert await store.schema_version() == NEWEST


class TestCursorOrder:
    async def test_a_later_cursor_never_commits_before_an_earlier_one(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        """With a plain sequence, B would take cursor n+1 and commit while A holds n:
        a reader past n+1 would then never see n. The counter row makes B wait."""
        a, b, reader = await opened(make), await opened(make), await opened(make)
        head = await reader.head()

        async def append_in_b() -> int:
            async with b.transaction() as tx:
                return await tx.append_event("s", "u", T0, Queued(2))

        async with a.transaction() as tx:
            first = await tx.append_event("s", "u", T0, Queued(1))
            second_task = asyncio.create_task(append_in_b())
            await until_blocked(monitor, second_task, "B's append")
            assert list(await reader.read_events(after=head, limit=10)) == []
            assert await reader.head() == head
        second = await second_task
        assert second > first
        events = await reader.read_events(after=head, limit=10)
        assert [(e.seq, e.kind) for e in events] == [(first, Queued(1)), (second, Queued(2))]

    async def test_concurrent_appenders_and_a_tailing_reader(self, make: Make) -> None:
        writers = [await opened(make) for _ in range(2)]
        reader = await opened(make)
        per_task, tasks_per_store = 15, 3
        total = per_task * tasks_per_store * len(writers)
        committed: list[int] = []

        async def write(store: PostgresStore) -> None:
            for n in range(per_task):
                async with store.transaction() as tx:
                    seq = await tx.append_event("s", "u", T0, Queued(n))
                committed.append(seq)

        seen: list[int] = []

        async def tail() -> None:
            after = 0
            while len(seen) < total:
                batch = await reader.read_events(after=after, limit=7)
                for event in batch:
                    # Everything committed before this read is at or below it.
                    assert event.seq == after + 1, f"skipped from {after} to {event.seq}"
                    after = event.seq
                    seen.append(event.seq)
                if not batch:
                    await reader.wait_for_events(after, timeout=0.5)

        await asyncio.gather(tail(), *(write(s) for s in writers for _ in range(tasks_per_store)))
        assert seen == sorted(committed) == list(range(1, total + 1))


class TestWakeUps:
    async def test_notify_wakes_another_replica(self, make: Make) -> None:
        writer = await opened(make)
        # No safety poll during the test: only NOTIFY can wake it.
        listener = await opened(make, check_interval=3600)
        await eventually(lambda: listener.listening, "listener up")
        head = await listener.head()
        waiter = asyncio.create_task(listener.wait_for_events(head, timeout=3600))
        await asyncio.sleep(0)
        async with writer.transaction() as tx:
            await tx.append_event("s", "u", T0, Queued())
        await asyncio.wait_for(waiter, 30)
        assert await listener.head() > head

    async def test_poll_only_never_listens_and_still_wakes(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        writer = await opened(make, poll_only=True)
        poller = await opened(make, poll_only=True, poll_min=0.01, poll_max=0.05)
        head = await poller.head()
        waiter = asyncio.create_task(poller.wait_for_events(head, timeout=3600))
        await asyncio.sleep(0)
        async with writer.transaction() as tx:
            await tx.append_event("s", "u", T0, Queued())
        await asyncio.wait_for(waiter, 30)
        assert not poller.listening
        assert poller.listener_pid is None
        listens = await monitor.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND (application_name LIKE '%listen%' OR query ILIKE 'LISTEN%')"
        )
        assert listens == 0

    async def test_polling_covers_a_killed_listener(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        writer = await opened(make, poll_only=True)
        store = await opened(
            make, check_interval=3600, poll_min=0.01, poll_max=0.05, reconnect_min=3600
        )
        await eventually(lambda: store.listening, "listener up")
        await monitor.execute("SELECT pg_terminate_backend($1)", store.listener_pid)
        await eventually(lambda: not store.listening, "listener gone")
        head = await writer.head()
        waiter = asyncio.create_task(store.wait_for_events(head, timeout=3600))
        await asyncio.sleep(0)
        async with writer.transaction() as tx:
            await tx.append_event("s", "u", T0, Queued())
        await asyncio.wait_for(waiter, 30)
        assert not store.listening  # woken by polling, not by a new listener

    async def test_the_listener_comes_back_and_listens_again(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        writer = await opened(make, poll_only=True)
        store = await opened(make, check_interval=3600, reconnect_min=0.01, reconnect_max=0.05)
        await eventually(lambda: store.listening, "listener up")
        old_pid = store.listener_pid
        with capture_logs() as logs:
            await monitor.execute("SELECT pg_terminate_backend($1)", old_pid)
            await eventually(
                lambda: store.listening and store.listener_pid not in (None, old_pid),
                "listener reconnected",
            )
        assert any(e["event"] == "store.listen_lost" for e in logs)
        head = await writer.head()
        waiter = asyncio.create_task(store.wait_for_events(head, timeout=3600))
        await asyncio.sleep(0)
        async with writer.transaction() as tx:
            await tx.append_event("s", "u", T0, Queued())
        await asyncio.wait_for(waiter, 30)  # listening, no safety poll: NOTIFY did it


class TestOutboxAcrossReplicas:
    async def test_claims_skip_locked_items_and_keep_session_order(self, make: Make) -> None:
        a, b = await opened(make), await opened(make)
        s1 = [make_outbox("S1"), make_outbox("S1")]
        s2 = make_outbox("S2")
        async with a.transaction() as tx:
            for item in (*s1, s2):
                await tx.insert_outbox(item)
        async with a.transaction() as tx_a:
            claimed_a = await tx_a.claim_outbox("a", at(0), at(60), 1)
            assert [i.id for i in claimed_a] == [s1[0].id]
            # B must neither wait for A's row lock nor jump ahead to S1's second item.
            async with asyncio.timeout(20), b.transaction() as tx_b:
                claimed_b = await tx_b.claim_outbox("b", at(0), at(60), 10)
            assert [i.id for i in claimed_b] == [s2.id]
        async with b.transaction() as tx_b:
            assert await tx_b.claim_outbox("b", at(1), at(60), 10) == []

    async def test_concurrent_claimers_never_share_an_item(self, make: Make) -> None:
        stores = [await opened(make), await opened(make)]
        sessions = [f"S{n}" for n in range(6)]
        items = [make_outbox(sid) for _ in range(4) for sid in sessions]
        async with stores[0].transaction() as tx:
            for item in items:
                await tx.insert_outbox(item)
        claims: list[OutboxItem] = []
        done = 0

        async def worker(store: PostgresStore, name: str) -> None:
            nonlocal done
            while done < len(items):
                async with store.transaction() as tx:
                    got = await tx.claim_outbox(name, at(0), at(10**6), 2)
                claims.extend(got)
                for item in got:
                    finished = dataclasses.replace(item, status=OutboxStatus.DONE, done_at=at(1))
                    async with store.transaction() as tx:
                        await tx.update_outbox(finished)
                    done += 1
                if not got:
                    await asyncio.sleep(0)  # yield to the others; no timing involved

        await asyncio.gather(
            *(worker(s, f"w{i}{j}") for i, s in enumerate(stores) for j in range(3))
        )
        claimed_ids = [c.id for c in claims]
        assert sorted(claimed_ids) == sorted(i.id for i in items)  # each exactly once
        for sid in sessions:
            in_order = [i.id for i in items if i.session_id == sid]
            assert [c for c in claimed_ids if c in in_order] == in_order

    async def test_inserts_of_one_session_are_serialized(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        a, b = await opened(make), await opened(make)
        first, second = make_outbox("S"), make_outbox("S")

        async def insert_in_b() -> bool:
            async with b.transaction() as tx:
                return await tx.insert_outbox(second)

        async with a.transaction() as tx:
            assert await tx.insert_outbox(first)
            task = asyncio.create_task(insert_in_b())
            await until_blocked(monitor, task, "B's insert")
        assert not await task  # queued behind A's item, which committed first
        async with a.transaction() as tx:
            claimed = await tx.claim_outbox("w", at(0), at(60), 10)
        assert [i.id for i in claimed] == [first.id]

    async def test_an_item_stored_while_the_one_ahead_settles_is_let_out(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        a, b, ahead, item = await _one_pending_and_another(make)

        async def insert_in_b() -> bool:
            async with b.transaction() as tx:
                return await tx.insert_outbox(item)

        # The settle lets out what it sees queued: it cannot see B's item yet.
        async with a.transaction() as tx:
            await tx.update_outbox(dataclasses.replace(ahead, status=OutboxStatus.DONE))
            task = asyncio.create_task(insert_in_b())
            await until_blocked(monitor, task, "B's insert")
        assert not await task  # stored while the one ahead still looked pending
        async with a.transaction() as tx:
            claimed = await tx.claim_outbox("w", at(0), at(60), 10)
        assert [i.id for i in claimed] == [item.id]  # not left queued

    async def test_a_settle_waits_for_an_item_being_stored_behind_it(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        a, b, ahead, item = await _one_pending_and_another(make)

        async def settle_in_b() -> None:
            async with b.transaction() as tx:
                await tx.update_outbox(dataclasses.replace(ahead, status=OutboxStatus.DONE))

        async with a.transaction() as tx:
            assert not await tx.insert_outbox(item)  # queued behind ``ahead``
            task = asyncio.create_task(settle_in_b())
            await until_blocked(monitor, task, "B's settle")
        await task  # then lets out the item it now sees
        async with a.transaction() as tx:
            claimed = await tx.claim_outbox("w", at(0), at(60), 10)
        assert [i.id for i in claimed] == [item.id]

    async def test_a_settle_racing_an_end_lets_out_what_the_end_left(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        a, b = await opened(make), await opened(make)
        # The head is in flight; a send and a stop queue behind it.
        head = make_outbox("S", attempts=1)
        send, stop = make_outbox("S"), make_outbox("S", kind=OutboxKind.STOP)
        async with a.transaction() as tx:
            for item in (head, send, stop):
                await tx.insert_outbox(item)

        async def settle_in_a() -> None:
            async with a.transaction() as tx:
                await tx.update_outbox(dataclasses.replace(head, status=OutboxStatus.DONE))

        # The session ends (B) while the head's settle (A) lets out the send
        # the end is failing: each saw the other's item still pending.
        async with b.transaction() as tx:
            assert await tx.fail_pending_outbox("S", at(1), "SESSION_ENDED", "ended") == [send.id]
            task = asyncio.create_task(settle_in_a())
            await until_blocked(monitor, task, "A's settle")
        await task
        async with a.transaction() as tx:
            claimed = await tx.claim_outbox("w", at(2), at(60), 10)
        assert [i.id for i in claimed] == [stop.id]  # not left queued


class TestClaimPlan:
    """What a claim reads must not grow with the done items kept (48 h of
    them) nor with those queued behind a head, whatever plan PostgreSQL picks."""

    _DONE = (
        "INSERT INTO outbox (id, session_id, kind, request_id, payload, status, attempts, "
        "attempts_settled, next_attempt_at, lease_owner, last_error, error_code, result, "
        "created_at, done_at, queued) SELECT $1 || g, 'S' || (g % 5000), 'send', $1 || g, "
        "'{}', $2, 1, 1, $3, '', '', '', '{}', $3, $3, $4 FROM generate_series(1, $5) g"
    )

    async def _blocks_of_a_claim(self, monitor: asyncpg.Connection) -> int:
        await monitor.execute("ANALYZE outbox")
        claim = monitor.transaction()
        await claim.start()
        try:
            plan = await monitor.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + postgres_tx._SQL_CLAIM_OUTBOX,
                at(10),
                64,
                "w",
                at(70),
            )
        finally:
            await claim.rollback()  # the leases it took
        top = json.loads(plan)[0]["Plan"]
        return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])

    async def test_a_claim_reads_the_due_heads_only(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        await opened(make)  # migrated
        await monitor.execute(self._DONE, "done-a-", "done", T0, False, 20_000)
        await monitor.execute(self._DONE, "heads-", "pending", T0, False, 50)
        before = await self._blocks_of_a_claim(monitor)
        # 200,000 more done items, and 20,000 queued behind one head.
        await monitor.execute(self._DONE, "done-b-", "done", T0, False, 200_000)
        await monitor.execute(
            self._DONE.replace("'S' || (g % 5000)", "'busy'"),
            "queued-",
            "pending",
            T0,
            True,
            20_000,
        )
        # Deeper indexes cost each of the 50 heads' probes a page or two
        # more (795 -> 1,118 blocks measured); walking the done items or
        # hashing the queued ones cost 8 times as much (698 -> 5,934).
        assert await self._blocks_of_a_claim(monitor) < 2 * before


class TestStartingCheckPlan:
    async def _blocks_of_the_check(self, monitor: asyncpg.Connection) -> int:
        await monitor.execute("ANALYZE sessions")
        plan = await monitor.fetchval(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + postgres_tx._SQL_HAS_STARTING,
            "livechat",
        )
        top = json.loads(plan)[0]["Plan"]
        return int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))

    async def test_the_starting_check_does_not_read_the_open_sessions(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        store = await opened(make)
        await _session(store, state=SessionState.QUEUED)
        before = await self._blocks_of_the_check(monitor)
        # Asked for every webhook event about a chat that is not ours: it
        # read every open session (10,000 rows, 5.7 ms at 10,000 open).
        await monitor.execute(
            "INSERT INTO users (id, name, created_at, updated_at) "
            "SELECT 'u' || g, 'n', now(), now() FROM generate_series(1, 10000) g"
        )
        await monitor.execute(
            "INSERT INTO sessions (id, user_id, provider, state, created_at, updated_at) "
            "SELECT 's' || g, 'u' || g, 'livechat', 'assigned', now(), now() "
            "FROM generate_series(1, 10000) g"
        )
        assert await self._blocks_of_the_check(monitor) <= before + 2


class TestLocksAcrossReplicas:
    @pytest.mark.parametrize("lookup", ["get_session", "find_session_by_chat"])
    async def test_a_locked_session_waits_for_the_holder(
        self, make: Make, monitor: asyncpg.Connection, lookup: str
    ) -> None:
        a, b = await opened(make), await opened(make)
        session = await _session(a, external_chat_id="C1")

        async def read_in_b() -> Session | None:
            async with b.transaction() as tx:
                if lookup == "get_session":
                    return await tx.get_session(session.id)
                return await tx.find_session_by_chat("livechat", "C1")

        async with a.transaction() as tx:
            mine = await (
                tx.get_session(session.id)
                if lookup == "get_session"
                else tx.find_session_by_chat("livechat", "C1")
            )
            assert mine is not None
            task = asyncio.create_task(read_in_b())
            await until_blocked(monitor, task, "B's locking read")
            mine.state, mine.updated_at = SessionState.ASSIGNED, at(9)
            await tx.update_session(mine)
        seen = await task
        assert seen is not None
        assert (seen.state, seen.updated_at) == (SessionState.ASSIGNED, at(9))

    @pytest.mark.parametrize("moment", ["statement", "commit"])
    async def test_a_transaction_cut_off_is_closed_without_an_error(
        self,
        make: Make,
        monitor: asyncpg.Connection,
        monkeypatch: pytest.MonkeyPatch,
        moment: str,
    ) -> None:
        """A task cancelled in a transaction (the shutdown stopping the
        upkeep mid-pass). Cut off in its COMMIT, the connection was handed
        back with the transaction open, and asyncpg, resetting it, reported
        "Resetting connection with an active transaction" to the loop's
        error handler, which logs it as an error (seen in the chaos test)."""
        a, b = await opened(make), await opened(make)
        session = await _session(a)
        reported: list[str] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
        committing = asyncio.Event()
        commit = asyncpg.transaction.Transaction.commit
        commits: list[object] = []

        async def second_held(xact: asyncpg.transaction.Transaction) -> None:
            commits.append(xact)
            if len(commits) == 2:  # B's, after A's
                committing.set()
                await asyncio.Event().wait()  # cut off here
            await commit(xact)

        if moment == "commit":
            monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", second_held)

        async def in_b() -> None:
            async with b.transaction() as tx:
                await tx.get_session(session.id)

        try:
            async with a.transaction() as tx:
                await tx.get_session(session.id)
                task = asyncio.create_task(in_b())
                await until_blocked(monitor, task, "B's locking read")
                if moment == "statement":
                    task.cancel()
            if moment == "commit":
                await eventually(committing.is_set, "B's commit")
                task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            monkeypatch.undo()
            async with b.transaction() as tx:  # B's pool serves again
                assert await tx.get_session(session.id) is not None
        finally:
            loop.set_exception_handler(None)
        assert reported == []

    async def test_one_open_session_under_concurrent_starts(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        a, b = await opened(make), await opened(make)
        user = make_user()
        async with a.transaction() as tx:
            await tx.insert_user(user)
        mine, theirs, spare = (make_session(user.id) for _ in range(3))
        later_user = make_user()

        async def start_in_b() -> str:
            async with b.transaction() as tx:
                try:
                    await tx.insert_session(theirs)
                except OpenSessionExists as exc:
                    await tx.insert_user(later_user)  # the transaction lives on
                    return exc.session_id
            return ""

        async with a.transaction() as tx:
            await tx.insert_session(mine)
            task = asyncio.create_task(start_in_b())
            await until_blocked(monitor, task, "B's insert")
        assert await task == mine.id
        assert await b.get_session(theirs.id) is None
        assert await b.get_user(later_user.id) == later_user

        # If the first start rolls back instead, the second one goes through.
        mine.state = SessionState.ENDED
        async with a.transaction() as tx:
            await tx.update_session(mine)

        async def start_spare_in_b() -> None:
            async with b.transaction() as tx:
                await tx.insert_session(spare)

        tasks: list[asyncio.Task[None]] = []

        async def first_start_fails(tx: Tx) -> None:
            await tx.insert_session(make_session(user.id))
            tasks.append(asyncio.create_task(start_spare_in_b()))
            await until_blocked(monitor, tasks[0], "B's second insert")

        with pytest.raises(Boom):
            await rolled_back(a, first_start_fails)
        await tasks[0]
        assert await b.get_session(spare.id) == spare

    async def test_dedupe_claims_race_to_one_winner(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        a, b = await opened(make), await opened(make)

        async def claim_in_b() -> bool:
            async with b.transaction() as tx:
                return await tx.claim_dedupe_key("livechat", "evt-1", T0)

        async with a.transaction() as tx:
            assert await tx.claim_dedupe_key("livechat", "evt-1", T0)
            task = asyncio.create_task(claim_in_b())
            await until_blocked(monitor, task, "B's claim")
        assert not await task


class TestIdempotencyAcrossReplicas:
    async def test_a_reader_of_a_key_waits_for_its_writer_and_sees_the_record(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        """Two replicas with the same request id: the second reads the first's
        record once it commits, instead of missing the uncommitted row and
        doing the work again."""
        a, b = await opened(make), await opened(make)
        record = IdempotencyRecord("SendMessage", "req-1", "hash", "msg_1", T0)

        async def read_in_b() -> IdempotencyRecord | None:
            async with b.transaction() as tx:
                return await tx.get_idempotency("SendMessage", "req-1")

        async with a.transaction() as tx:
            assert await tx.get_idempotency("SendMessage", "req-1") is None
            task = asyncio.create_task(read_in_b())
            await until_blocked(monitor, task, "B's read of the key")
            await tx.put_idempotency(record)
        assert await task == record

    async def test_other_keys_do_not_wait(self, make: Make) -> None:
        a, b = await opened(make), await opened(make)
        async with a.transaction() as tx:
            assert await tx.get_idempotency("SendMessage", "req-1") is None
            async with asyncio.timeout(10), b.transaction() as other:
                assert await other.get_idempotency("SendMessage", "req-2") is None
                assert await other.get_idempotency("StartHitl", "req-1") is None


class TestDeadlocks:
    async def test_a_deadlock_victim_gets_store_unavailable(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        """PostgreSQL breaks the cycle by rolling one transaction back; its
        caller sees a retryable StoreUnavailable, not an internal error."""
        a, b = await opened(make), await opened(make)
        first, second = await _session(a), await _session(a)
        b_holds = asyncio.Event()

        async def lock_in_b() -> None:
            async with b.transaction() as tx:
                await tx.get_session(second.id)
                b_holds.set()
                await tx.get_session(first.id)

        outcomes: list[BaseException | None] = []

        async def lock_in_a() -> None:
            async with a.transaction() as tx:
                await tx.get_session(first.id)
                task = asyncio.create_task(lock_in_b())
                await b_holds.wait()
                await until_blocked(monitor, task, "B's second lock")
                try:
                    await tx.get_session(second.id)
                except StoreUnavailable as exc:
                    outcomes.append(exc)
                    raise
                finally:
                    outcomes.extend(await asyncio.gather(task, return_exceptions=True))

        with contextlib.suppress(StoreUnavailable):
            await lock_in_a()
        errors = [o for o in outcomes if o is not None]
        assert len(errors) == 1  # one victim, the other went through
        assert isinstance(errors[0], StoreUnavailable)
        assert "rolled back a conflicting transaction" in str(errors[0])
        assert "DeadlockDetectedError" in str(errors[0])


class TestStatementCache:
    @pytest.mark.parametrize(("size", "named"), [(100, True), (0, False)])
    async def test_the_cache_size_reaches_every_connection(
        self, make: Make, size: int, named: bool
    ) -> None:
        """0 leaves no named prepared statements behind (PgBouncer in
        transaction mode before 1.21 loses them between transactions)."""
        store = await opened(make, statement_cache_size=size)
        await _session(store)
        async with store.transaction() as tx:
            count = await tx._db.fetchval("SELECT count(*) FROM pg_prepared_statements")
        assert (count > 0) is named


PASSWORD = "s3cr3t-Pa55-in-the-url"


def _assert_clean(text: str) -> None:
    assert PASSWORD not in text
    assert "s3cr3t" not in text


def _chain(exc: BaseException) -> str:
    """Everything a traceback printer could show about ``exc``."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(f"{type(seen).__name__}: {seen!s} {seen!r}")
        nxt = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
        seen = nxt
    return "\n".join(parts)


class TestSecrets:
    async def test_repr_shows_host_and_database_only(self) -> None:
        store = PostgresStore(Secret(f"postgresql://app:{PASSWORD}@db.internal:5433/hitl"))
        text = f"{store!r} {store!s}"
        _assert_clean(text)
        assert "db.internal:5433/hitl" in text

    async def test_refused_connection_error_is_clean(self, make: Make) -> None:
        port = _unused_port()
        store = make(f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/hitl", connect_timeout=5)
        with capture_logs() as logs, pytest.raises(StoreUnavailable) as caught:
            await store.open()
        _assert_clean(_chain(caught.value))
        _assert_clean(repr(logs))
        assert f"127.0.0.1:{port}/hitl" in str(caught.value)
        with pytest.raises(StoreUnavailable):
            await store.ping()

    async def test_a_multi_host_url_fails_over_to_a_live_host(
        self, make: Make, postgres_dsn: str
    ) -> None:
        """libpq-style host lists (failover) are accepted as asyncpg takes them."""
        parts = urlsplit(postgres_dsn)
        password = parts.password or ""
        assert password  # the fixture's role has one
        live = parts.netloc.rpartition("@")[2]
        dead = f"127.0.0.1:{_unused_port()}"
        dsn = postgres_dsn.replace(f"@{live}", f"@{dead},{live}")
        url = parse_store_url(dsn)
        assert dead in url.redacted()
        assert password not in url.redacted()
        store = make(url.dsn.reveal())
        await store.open()
        await store.ping()
        assert password not in repr(store)

    async def test_wrong_password_error_is_clean(self, make: Make, postgres_dsn: str) -> None:
        parts = urlsplit(postgres_dsn)
        bad = postgres_dsn.replace(f":{parts.password}@", f":{PASSWORD}@")
        assert PASSWORD in bad
        with capture_logs() as logs, pytest.raises(StoreUnavailable) as caught:
            await make(bad).open()
        _assert_clean(_chain(caught.value))
        _assert_clean(repr(logs))
        assert "password" in str(caught.value).lower()  # says what is wrong


def _unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestOutage:
    """A private cluster that the test stops and starts again."""

    async def test_ping_fails_while_down_and_everything_recovers(
        self, postgres_cluster_factory: Callable[[], PgCluster], make: Make
    ) -> None:
        cluster = postgres_cluster_factory()
        dsn = cluster.url()  # the superuser, with a password
        password = dsn.split(":")[2].split("@")[0]
        store = make(
            dsn, check_interval=3600, reconnect_min=0.01, reconnect_max=0.1, ping_timeout=5
        )
        writer = make(dsn, poll_only=True)
        await store.open()
        await writer.open()
        await store.ping()
        async with writer.transaction() as tx:
            before = await tx.append_event("s", "u", T0, Queued(1))
        await eventually(lambda: store.listening, "listener up")

        with capture_logs() as logs:
            await asyncio.to_thread(cluster.stop)
            with pytest.raises(StoreUnavailable) as caught:
                await store.ping()
            assert password not in _chain(caught.value)
            with pytest.raises(StoreUnavailable):
                async with store.transaction() as tx:
                    await tx.append_event("s", "u", T0, Queued(2))
            with pytest.raises(StoreUnavailable):
                await store.read_events(after=0, limit=1)
            await eventually(lambda: not store.listening, "listener noticed")

            await asyncio.to_thread(cluster.start)

            async def answers() -> bool:
                try:
                    await store.ping()
                except StoreUnavailable:
                    return False
                return True

            await eventually(answers, "ping after restart")
            await eventually(lambda: store.listening, "listener back")
        assert password not in repr(logs)

        # Writes work again and cursors continue; NOTIFY reaches the new listener.
        waiter = asyncio.create_task(store.wait_for_events(before, timeout=3600))
        await asyncio.sleep(0)

        async def append() -> int:
            async with writer.transaction() as tx:
                return await tx.append_event("s", "u", T0, Queued(3))

        after = None
        for _ in range(50):  # the writer's pooled connection died with the server
            try:
                after = await append()
                break
            except StoreUnavailable:
                continue
        assert after == before + 1
        await asyncio.wait_for(waiter, 30)
        assert [e.seq for e in await store.read_events(after=0, limit=10)] == [before, after]

    async def test_a_connection_killed_inside_a_transaction_is_unavailable(
        self, make: Make, monitor: asyncpg.Connection
    ) -> None:
        """The server ends a transaction's connection (a restart's fast
        shutdown, ``pg_terminate_backend``): the caller gets StoreUnavailable.
        The pool had already taken the dead connection back, so closing it
        raised asyncpg's InterfaceError ("released back to the pool") over
        the StoreUnavailable: SendMessage answered INTERNAL (seen in a
        restart drill)."""
        store = await opened(make, check_interval=3600)
        session = await _session(store)

        async def cut_off() -> None:
            async with store.transaction() as tx:
                await tx.get_session(session.id)
                await monitor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'hitl-service' AND datname = current_database()"
                )
                conn = tx._db._target  # the transaction's pooled connection
                assert isinstance(conn, asyncpg.pool.PoolConnectionProxy)

                def closed() -> bool:
                    # Once the client has seen the socket close; detached from
                    # the pool by then (asyncpg's proxy then raises).
                    try:
                        return bool(conn.is_closed())
                    except asyncpg.InterfaceError:
                        return True

                await eventually(closed, "the client saw its connection end")
                await tx.get_session(session.id)

        with pytest.raises(StoreUnavailable):
            await cut_off()
        async with store.transaction() as tx:  # the pool serves again
            assert await tx.get_session(session.id) is not None


class TestBoundedWaits:
    """A replica frozen while it holds a row lock (SIGSTOP, a paused VM, a
    partition) must not hang the others: statements and waits for a pooled
    connection end with StoreUnavailable. (The 30 s bounds only keep a
    regression from hanging the suite.)"""

    async def test_a_lock_held_by_a_frozen_replica_times_out(
        self, make: Make, postgres_dsn: str
    ) -> None:
        store = await opened(make, statement_timeout=0.5, connect_timeout=0.5)
        _user, session = await user_with_session(store)
        frozen = await asyncpg.connect(postgres_dsn)
        try:
            await frozen.execute("BEGIN")
            await frozen.execute("SELECT id FROM sessions WHERE id = $1 FOR UPDATE", session.id)
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(lock_session(store, session.id), 30)
        finally:
            await frozen.close()

    async def test_waiting_for_a_pooled_connection_is_bounded(
        self, make: Make, postgres_dsn: str
    ) -> None:
        store = await opened(make, pool_min=1, pool_max=1, connect_timeout=0.5)
        user, session = await user_with_session(store)
        frozen = await asyncpg.connect(postgres_dsn)
        monitor = await asyncpg.connect(postgres_dsn)
        try:
            await frozen.execute("BEGIN")
            await frozen.execute("SELECT id FROM sessions WHERE id = $1 FOR UPDATE", session.id)
            stuck = asyncio.ensure_future(lock_session(store, session.id))  # the only connection
            await eventually(lambda: blocked(monitor), what="the pool's connection blocked")
            with pytest.raises(StoreUnavailable):  # no connection free: not a hang
                await asyncio.wait_for(store.get_user(user.id), 30)
            stuck.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                await stuck
        finally:
            await frozen.close()
            await monitor.close()


async def user_with_session(store: PostgresStore) -> tuple[User, Session]:
    user = make_user()
    session = make_session(user.id)
    async with store.transaction() as tx:
        await tx.insert_user(user)
        await tx.insert_session(session)
    return user, session


async def blocked(monitor: asyncpg.Connection) -> bool:
    return await lock_waits(monitor) > 0


async def lock_session(store: PostgresStore, session_id: str) -> None:
    async with store.transaction() as tx:
        await tx.get_session(session_id)  # FOR UPDATE


ReadOnly = Callable[[bool], Awaitable[None]]


class TestReadOnlyDatabase:
    """What a failover to a standby looks like to a replica: reads answer,
    writes are refused."""

    @pytest.fixture
    async def read_only(self, monitor: asyncpg.Connection) -> AsyncIterator[ReadOnly]:
        """Makes new connections to the test database start read-only, or not."""
        database = await monitor.fetchval("SELECT current_database()")

        async def switch(on: bool) -> None:
            value = (
                "SET default_transaction_read_only = on"
                if on
                else "RESET default_transaction_read_only"
            )
            await monitor.execute(f'ALTER DATABASE "{database}" {value}')

        try:
            yield switch
        finally:
            await switch(False)

    async def test_opening_says_unavailable(self, make: Make, read_only: ReadOnly) -> None:
        await read_only(True)
        store = make()
        with pytest.raises(StoreUnavailable):  # not a raw asyncpg error from the migration
            await store.open()

    async def test_an_open_store_turns_unready_and_refuses_writes(
        self, make: Make, read_only: ReadOnly
    ) -> None:
        store = await opened(make)
        await store.ping()
        await read_only(True)
        assert store._pool is not None
        await store._pool.expire_connections()  # reconnects, as after a failover
        with pytest.raises(StoreUnavailable, match="takes no writes"):
            await store.ping()
        with pytest.raises(StoreUnavailable):  # UNAVAILABLE / 503, not INTERNAL / 500
            await _session(store)
        await read_only(False)
        await store._pool.expire_connections()
        await store.ping()
        await _session(store)


class TestErrorMapping:
    async def test_a_connection_dropped_mid_error_is_unavailable(self) -> None:
        """Seen when PostgreSQL stopped under load: the next statement on a
        connection the server dropped while it reported an error raises
        asyncpg's InternalClientError. Callers must get UNAVAILABLE (retry),
        not INTERNAL, and webhooks 503, not 500."""

        class Dropped:
            async def execute(self, *args: object) -> str:
                raise asyncpg.exceptions.InternalClientError(
                    "cannot switch to state 15; another operation (2) is in progress"
                )

        redactor = Redactor(Secret(f"postgresql://app:{PASSWORD}@db.internal/hitl"))
        db = Db(Dropped(), redactor)  # type: ignore[arg-type]
        with pytest.raises(StoreUnavailable) as caught:
            await db.execute("SELECT 1")
        _assert_clean(_chain(caught.value))

    async def test_an_error_while_opening_is_unavailable(
        self, make: Make, postgres_dsn: str
    ) -> None:
        """A DSN parameter the server does not know (libpq's connect_timeout
        is a common one), or a role without rights on the database, used to
        stop `serve` and `check` with asyncpg's traceback."""
        parts = urlsplit(postgres_dsn)
        query = f"{parts.query}&" if parts.query else ""
        dsn = parts._replace(query=f"{query}connect_timeout=10").geturl()
        with capture_logs() as logs, pytest.raises(StoreUnavailable) as caught:
            await make(dsn).open()
        assert "connect_timeout" in str(caught.value)  # names what is wrong
        assert parts.password
        assert parts.password not in _chain(caught.value)
        assert parts.password not in repr(logs)
