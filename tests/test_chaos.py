"""Chaos: everything at once, ``kill -9`` included, on SQLite and on two
PostgreSQL replicas, for several random seeds.

Each run (about ``HITL_TEST_CHAOS_SECONDS`` of load) drives real service
processes against the fake LiveChat, itself a process, with all of this at
the same time:

- end users (the bot side) sending messages, each through
  ``hitl_service.client.HitlClient`` with its request id, retried until
  acknowledged (a refusal because the session ended is not an
  acknowledgement);
- stream consumers following the whole log: one ``HitlClient.events()``
  that is dropped and resumed from its saved cursor now and then (a consumer
  restarting), and one on the raw stub that reconnects itself and keeps
  everything it was sent, unfiltered; and one following a single session;
- agents writing in LiveChat (the fake's control API) to the chats of the
  open handoffs;
- the fake delivering every webhook at random: dropped (LiveChat gave up),
  sent twice, delayed and overtaken by later ones (``webhook_chaos``); on
  PostgreSQL every webhook is registered for both replicas as well;
- ``kill -9`` of a service process at random moments, then a restart on the
  same SQLite file or database (and the same ports);
- now and then a handoff stopped (StopHitl) and a new one started for the
  same end user (StartHitl: a new thread in the same LiveChat chat).

Then the load stops, and catch-up (``HITL_RECONCILE_INTERVAL`` 2 s) is let
recover what the dropped webhooks and the kills lost. The checks:

- every agent message LiveChat holds in a handoff's thread is in that
  session's events exactly once, ahead of its ``ended``; in the order its
  webhook came (LiveChat does not order deliveries, and a message recovered
  by catch-up comes after later ones), with LiveChat's time, by which it
  sorts back into LiveChat's order;
- every acknowledged SendMessage is in the chat exactly once, in the order
  acknowledged, and none refused is;
- each consumer saw the log exactly as it is, across its reconnects and
  restarts: cursors strictly increasing, none missing, none twice;
- every process not killed exits 0 on SIGTERM, and no process logged an
  error or a traceback.

Seeds: ``HITL_TEST_CHAOS_SEEDS`` is a count (seeds 1..N; 1 by default) or a
comma-separated list of seeds to replay. Each run prints its numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest

from hitl_service.client import (
    FailedPreconditionError,
    HitlClient,
    HitlRpcError,
    RetryPolicy,
)
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers.livechat.memory import OWN_CUSTOM_ID_PREFIX
from tests.ports import free_port
from tests.processes import FakeLiveChatProcess, ServiceProcess, run_cli
from tests.replicas.helpers import Fake, until
from tests.support import read_log

pytestmark = [pytest.mark.slow]

T = TypeVar("T")
AGENT = "jane@acme.example"
SLOTS = 4  # end users, each with one open handoff at a time


def _seeds() -> list[int]:
    raw = os.environ.get("HITL_TEST_CHAOS_SEEDS", "1").strip()
    if "," in raw:
        return [int(part) for part in raw.split(",") if part.strip()]
    return list(range(1, int(raw) + 1))


SEEDS = _seeds()
LOAD_SECONDS = float(os.environ.get("HITL_TEST_CHAOS_SECONDS", "20"))
TIMEOUT = 120 + 2 * LOAD_SECONDS  # pytest-timeout per seed


def service_env(fake: FakeLiveChatProcess, cwd: Path, store_url: str) -> dict[str, str]:
    """One service process: fixed ports (the same after a restart)."""
    return {
        **fake.env,
        # As docs/livechat.md says to with replicas: a process just
        # restarted (kill -9) has not learned the bridge's id yet, and took
        # the late webhook of its own start-up transfer, after the agent
        # joined, for a transfer back to the queue (a documented limit).
        "HITL_LIVECHAT_AGENT_ID": "bridge@acme.example",
        "HITL_PROVIDER": "livechat",
        "HITL_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "HITL_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "HITL_STORE_URL": store_url,
        "HITL_STORE_POOL_MIN": "1",
        "HITL_STORE_POOL_MAX": "8",
        "HITL_DATA_DIR": str(cwd / "data"),
        "HITL_PROVIDER_TIMEOUT": "2s",  # leases of killed attempts expire soon
        "HITL_LIVECHAT_SERVER_TIMEOUT": "2",  # the fake acts at once
        "HITL_REQUEST_BUDGET": "5s",
        "HITL_RECONCILE_INTERVAL": "2s",  # catch-up repairs lost webhooks
        "HITL_GRACE_SECONDS": "1s",
        "HITL_LOG_LEVEL": "info",
    }


@dataclass
class Slot:
    """One end user and the handoff open for it now."""

    index: int
    user_id: str = ""
    session: pb.Session | None = None
    thread_id: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # agents vs. stop/start
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Stats:
    kills: int = 0
    restarts_s: list[float] = field(default_factory=list)
    handoffs: int = 0
    stops: int = 0
    refused: int = 0
    retried_sends: int = 0
    agent_messages: int = 0
    consumer_restarts: int = 0
    faults: int = 0
    raw_reconnects: int = 0


@dataclass
class Chaos:
    """The load, what it was told, and the killer."""

    client: HitlClient
    fake: Fake
    services: list[ServiceProcess]
    rng: random.Random
    target: str
    options: list[tuple[str, str | int]]
    slots: list[Slot] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    acked: dict[str, list[str]] = field(default_factory=dict)  # session -> request ids
    refused: dict[str, list[str]] = field(default_factory=dict)  # session -> request ids
    threads: dict[str, tuple[str, str]] = field(default_factory=dict)  # session -> chat, thread
    stopped: list[str] = field(default_factory=list)  # sessions stopped
    killed: set[int] = field(default_factory=set)  # pids killed
    stats: Stats = field(default_factory=Stats)
    resumed: list[pb.Event] = field(default_factory=list)  # HitlClient.events, resumed
    one_session: list[pb.Event] = field(default_factory=list)  # HitlClient.events(session)
    raw: list[pb.Event] = field(default_factory=list)  # the raw stub, unfiltered

    # -- handoffs -----------------------------------------------------------------

    async def open_handoff(self, slot: Slot, number: int) -> None:
        """StartHitl for the slot's user, the agent joins; the caller holds the lock."""
        session = await patiently(
            lambda: self.client.start_hitl(
                slot.user_id,
                title=f"chaos {slot.index}",
                request_id=f"start-{slot.index}-{number}",
            )
        )
        await self.fake.control("agent_join", chat_id=session.external_chat_id, agent_id=AGENT)
        chat = await self.fake.chat(session.external_chat_id)
        self.threads[session.id] = (chat["id"], chat["threads"][-1]["id"])
        self.acked.setdefault(session.id, [])
        self.refused.setdefault(session.id, [])
        slot.session = session
        self.stats.handoffs += 1
        slot.changed.set()

    async def churn(self) -> None:
        """Now and then a handoff stopped and a new one started for its user."""
        number = 0
        while not self.stopping.is_set():
            await self.pause(2.0, 5.0)
            if self.stopping.is_set():
                return
            number += 1
            slot = self.rng.choice(self.slots)
            async with slot.lock:  # no agent writes to it meanwhile
                assert slot.session is not None
                old = slot.session
                slot.changed.clear()
                ended = await patiently(functools.partial(self.client.stop_hitl, old.id, "chaos"))
                assert ended.state == pb.SESSION_STATE_ENDED, ended
                self.stopped.append(old.id)
                self.stats.stops += 1
                await self.open_handoff(slot, number)

    # -- end users ----------------------------------------------------------------

    async def sender(self, slot: Slot) -> None:
        """One end user writing, each message retried until acknowledged or
        refused because its session ended (then on to the new handoff)."""
        number = 0
        while not self.stopping.is_set():
            session = slot.session
            assert session is not None
            number += 1
            request_id = f"u{slot.index}-{number}"
            while True:
                try:
                    await self.client.send_message(
                        session.id, f"message {request_id}", request_id=request_id
                    )
                except FailedPreconditionError as exc:
                    if exc.reason not in ("SESSION_ENDED", "SESSION_NOT_OPEN"):
                        raise
                    self.refused[session.id].append(request_id)
                    self.stats.refused += 1
                    await self.wait_changed(slot, session)
                    break
                except HitlRpcError as exc:
                    # The client's retries ran out (a long restart): the
                    # bot retries the same request id.
                    if exc.code not in RETRYABLE:
                        raise
                    self.stats.retried_sends += 1
                    continue
                self.acked[session.id].append(request_id)
                break
            await asyncio.sleep(self.rng.uniform(0, 0.05))  # pacing, not synchronization

    async def wait_changed(self, slot: Slot, session: pb.Session) -> None:
        """Until the slot's next handoff is open (or the load stops)."""
        while slot.session is session and not self.stopping.is_set():
            changed = asyncio.ensure_future(slot.changed.wait())
            stopping = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait([changed, stopping], return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stopping.cancel()

    # -- agents -------------------------------------------------------------------

    async def agents(self) -> None:
        """Agents writing at LiveChat to the open handoffs' chats."""
        number = 0
        while not self.stopping.is_set():
            number += 1
            slot = self.rng.choice(self.slots)
            async with slot.lock:
                assert slot.session is not None
                await self.fake.control(
                    "agent_message",
                    chat_id=slot.session.external_chat_id,
                    agent_id=AGENT,
                    text=f"agent {number}",
                )
                self.stats.agent_messages += 1
            await asyncio.sleep(self.rng.uniform(0, 0.04))  # an agent's pace

    # -- consumers ----------------------------------------------------------------

    async def resumed_consumer(self) -> None:
        """``HitlClient.events``, now and then dropped and resumed from its
        saved cursor, as a consumer process restarting would."""
        cursor = "0"
        while True:
            stream = self.client.events(after=cursor)
            take = self.rng.randint(20, 200)
            async with stream:
                async for event in stream:
                    self.resumed.append(event)
                    take -= 1
                    if take <= 0:
                        break
            cursor = stream.cursor
            self.stats.consumer_restarts += 1

    async def session_consumer(self, session_id: str) -> None:
        """One session's events only, through ``HitlClient.events``."""
        async for event in self.client.events(session_id=session_id, after="0"):
            self.one_session.append(event)

    async def raw_consumer(self) -> None:
        """The raw stub, reconnecting after the last cursor it got, keeping
        everything it is sent (so a repeat or a gap shows)."""
        cursor = "0"
        async with grpc.aio.insecure_channel(self.target, options=self.options) as channel:
            stub = pb_grpc.HitlServiceStub(channel)
            while True:
                call = stub.StreamEvents(pb.StreamEventsRequest(after_cursor=cursor))
                take = self.rng.randint(20, 300)
                try:
                    async for event in call:
                        self.raw.append(event)
                        cursor = event.cursor
                        take -= 1
                        if take <= 0:
                            break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise
                    await asyncio.sleep(0.1)  # a reconnect back-off
                finally:
                    call.cancel()
                self.stats.raw_reconnects += 1

    # -- the killer ---------------------------------------------------------------

    async def killer(self) -> None:
        """``kill -9`` of a service process at random moments, then a restart."""
        while not self.stopping.is_set():
            await self.pause(1.5, 4.0)
            if self.stopping.is_set():
                return
            # Now and then every replica at once.
            everyone = len(self.services) > 1 and self.rng.random() < 0.2
            victims = self.services if everyone else [self.rng.choice(self.services)]
            for service in victims:
                assert service.proc is not None
                self.killed.add(service.proc.pid)
                await service.kill()
                self.stats.kills += 1
            await self.pause(0.0, 1.0)  # down for a while
            started = time.monotonic()
            await asyncio.gather(*(service.start() for service in victims))
            self.stats.restarts_s.append(time.monotonic() - started)

    async def faults(self) -> None:
        """LiveChat failing a call now and then (each fault hits one call)."""
        while not self.stopping.is_set():
            await self.pause(0.3, 1.5)
            method, fault = self.rng.choice(FAULTS)
            await self.fake.control("add_fault", method=method, times=1, **fault)
            self.stats.faults += 1

    async def pause(self, low: float, high: float) -> None:
        """A random wait that ends early when the load stops (pacing)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), self.rng.uniform(low, high))


def agent_events(chat: dict[str, Any], thread_id: str) -> list[str]:
    """Ids of the agent's messages in one thread, in LiveChat's order."""
    for thread in chat["threads"]:
        if thread["id"] == thread_id:
            return [
                str(e["id"])
                for e in thread["events"]
                if e.get("author_id") == AGENT and e.get("type") == "message"
            ]
    raise AssertionError(f"no thread {thread_id}")


def custom_ids(chat: dict[str, Any], thread_id: str) -> list[str]:
    """Request ids of the end user's messages in one thread, in order."""
    for thread in chat["threads"]:
        if thread["id"] == thread_id:
            return [
                str(e["custom_id"])
                for e in thread["events"]
                if e.get("custom_id") and not e["custom_id"].startswith(OWN_CUSTOM_ID_PREFIX)
            ]
    raise AssertionError(f"no thread {thread_id}")


def log_problems(service: ServiceProcess) -> list[str]:
    """Lines at error level or with a traceback, and lines that are not JSON
    (the gRPC C core's plain text, or a line a kill cut: each is one write,
    which a kill does not cut)."""
    found = []
    for line in service.log().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            found.append(line)
            continue
        if entry.get("level") in ("error", "critical") or "exception" in entry:
            found.append(line)
    return found


# What LiveChat does wrong now and then: fail, answer late (past the
# service's timeouts: an uncertain send, looked for before it is sent again)
# or act and lose the answer.
FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("send_event", {"kind": "lost_response"}),
    ("send_event", {"kind": "error", "error_type": "internal"}),
    ("send_event", {"kind": "error", "error_type": "service_unavailable", "retry_after": "1"}),
    ("send_event", {"kind": "delay", "delay": 3.0}),
    ("get_chat", {"kind": "error", "error_type": "internal"}),
    ("list_threads", {"kind": "error", "error_type": "internal"}),
    ("deactivate_chat", {"kind": "lost_response"}),
    ("resume_chat", {"kind": "lost_response"}),
]
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def patiently(call: Callable[[], Awaitable[T]]) -> T:
    """A safe-to-repeat call, repeated when even the client's retries ran out."""
    for _ in range(5):
        try:
            return await call()
        except HitlRpcError as exc:
            if exc.code not in RETRYABLE:
                raise
    return await call()


Topology = Callable[[FakeLiveChatProcess, Path], Awaitable[list[ServiceProcess]]]


async def run_chaos(seed: int, tmp_path: Path, topology: Topology, label: str) -> None:
    rng = random.Random(seed)
    fake_process = await FakeLiveChatProcess(
        webhook_secret="whsec-chaos-5e1b7", live_clock=True
    ).start()
    control = httpx.AsyncClient(base_url=fake_process.url, timeout=30)
    fake = Fake(fake_process, control)
    services: list[ServiceProcess] = []
    tasks: list[asyncio.Task[None]] = []
    client: HitlClient | None = None
    try:
        # LiveChat's schedule, shortened: a few retries within seconds, then lost.
        await fake.control("set_config", webhook_attempts=4, webhook_retry_delays=[0.2, 0.5, 1])
        services = await topology(fake_process, tmp_path)
        targets = ",".join(s.grpc_target for s in services)
        target = f"ipv4:{targets}"
        options: list[tuple[str, str | int]] = [("grpc.lb_policy_name", "round_robin")]
        client = HitlClient(
            target,
            options=options,
            retry=RetryPolicy(attempts=400, initial_backoff=0.05, max_backoff=0.5),
            default_timeout=30,
        )
        chaos = Chaos(client, fake, services, rng, target, options)
        for index in range(SLOTS):
            slot = Slot(index)
            user = await client.create_user(f"U{index}", external_id=f"chaos-{index}")
            slot.user_id = user.id
            async with slot.lock:
                await chaos.open_handoff(slot, 0)
            chaos.slots.append(slot)
        assert chaos.slots[0].session is not None
        first = chaos.slots[0].session.id
        await fake.control("webhook_chaos", drop=0.08, duplicate=0.2, max_delay=0.6, seed=seed)
        load = [
            *(asyncio.create_task(chaos.sender(slot)) for slot in chaos.slots),
            asyncio.create_task(chaos.agents()),
            asyncio.create_task(chaos.churn()),
            asyncio.create_task(chaos.killer()),
            asyncio.create_task(chaos.faults()),
        ]
        consumers = [
            asyncio.create_task(chaos.resumed_consumer()),
            asyncio.create_task(chaos.raw_consumer()),
            asyncio.create_task(chaos.session_consumer(first)),
        ]
        tasks = [*load, *consumers]
        ends = time.monotonic() + LOAD_SECONDS
        await until(
            lambda: time.monotonic() > ends or any(t.done() for t in tasks),
            timeout=LOAD_SECONDS + 30,
            what="the load's time",
        )
        for task in tasks:
            if task.done():
                task.result()  # raises what stopped it
                raise AssertionError(f"{task.get_name()} ended early")
        chaos.stopping.set()
        await asyncio.wait_for(asyncio.gather(*load), 90)
        await fake.control("webhook_chaos")  # off: what is left goes as usual
        await fake.control("clear_faults")
        await until(fake.deliveries_settled, timeout=60, what="the fake's webhooks")

        # Catch-up: every agent message LiveChat holds for an open handoff
        # reaches its session (the ended ones had their history read before
        # the end).
        stub = client.stub

        async def at_livechat() -> dict[str, list[str]]:
            wanted = {}
            for session_id, (chat_id, thread_id) in chaos.threads.items():
                wanted[session_id] = agent_events(await fake.chat(chat_id), thread_id)
            return wanted

        def logged(log: list[pb.Event]) -> dict[str, list[str]]:
            found: dict[str, list[str]] = {s: [] for s in chaos.threads}
            for e in log:
                if e.WhichOneof("kind") == "agent_message":
                    found.setdefault(e.session_id, []).append(e.agent_message.message.id)
            return found

        async def caught_up() -> bool:
            wanted, log = await at_livechat(), await read_log(stub)
            have = logged(log)
            return all(set(ids) <= set(have[s]) for s, ids in wanted.items())

        await until(caught_up, timeout=60, what="catch-up of the agents' messages")
        log = await read_log(stub)
        head = int(log[-1].cursor)
        await until(
            lambda: all(
                events and int(events[-1].cursor) >= head for events in (chaos.resumed, chaos.raw)
            ),
            timeout=60,
            what="the consumers",
        )

        # The log: cursors strictly increasing; each consumer saw it all,
        # once, in order.
        cursors = [int(e.cursor) for e in log]
        assert cursors == sorted(set(cursors)), "the log repeats or reorders cursors"
        for name, seen in (("resumed", chaos.resumed), ("raw", chaos.raw)):
            got = [int(e.cursor) for e in seen if int(e.cursor) <= head]
            assert got == cursors, f"the {name} consumer: {_diff(got, cursors)}"
        own = [int(e.cursor) for e in log if e.session_id == first]
        await until(
            lambda: [int(e.cursor) for e in chaos.one_session] == own,
            timeout=30,
            what=f"the consumer of session {first}",
        )

        # Agents' messages: each LiveChat holds, once, before the end of its
        # session. In the order their webhooks came (a late or lost one,
        # recovered by catch-up, after those written later), each with
        # LiveChat's time, by which it sorts back into LiveChat's order.
        wanted, have = await at_livechat(), logged(log)
        written = {
            e.agent_message.message.id: e.occurred_at.ToNanoseconds()
            for e in log
            if e.WhichOneof("kind") == "agent_message"
            and e.occurred_at == e.agent_message.message.created_at
        }
        late = 0  # streamed after a message the agent wrote later
        for session_id, ids in wanted.items():
            streamed = have[session_id]
            assert sorted(streamed) == sorted(ids), f"session {session_id}: {_diff(streamed, ids)}"
            by_time = sorted(streamed, key=lambda message_id: written[message_id])
            assert by_time == ids, f"session {session_id}: LiveChat {ids}, by time {by_time}"
            place = {message_id: n for n, message_id in enumerate(ids)}
            highest = -1
            for message_id in streamed:
                late += place[message_id] < highest
                highest = max(highest, place[message_id])
        ended_at: dict[str, int] = {}
        last_at: dict[str, int] = {}
        kinds = Counter((e.session_id, e.WhichOneof("kind")) for e in log)
        for position, e in enumerate(log):
            last_at[e.session_id] = position
            if e.WhichOneof("kind") == "ended":
                ended_at[e.session_id] = position
        for session_id in chaos.stopped:
            assert kinds[(session_id, "ended")] == 1, session_id
            assert ended_at[session_id] == last_at[session_id], f"{session_id}: after its end"
        for session_id in chaos.threads:
            assert kinds[(session_id, "started")] == 1, session_id
        for slot in chaos.slots:  # the open handoffs: held by the agent who joined
            assert slot.session is not None
            now = await client.get_session(slot.session.id)
            assert now.state == pb.SESSION_STATE_ASSIGNED, now
            assert now.agent.id == AGENT, now

        # Sends: each acknowledged one at LiveChat once, in order; none refused.
        sent = 0
        for session_id, (chat_id, thread_id) in chaos.threads.items():
            at = custom_ids(await fake.chat(chat_id), thread_id)
            assert at == chaos.acked[session_id], (
                f"session {session_id}: acked {chaos.acked[session_id]}, LiveChat {at}"
            )
            assert not set(at) & set(chaos.refused[session_id])
            sent += len(at)

        deliveries = await fake.deliveries()
        dropped = sum(d["outcome"] == "dropped" for d in deliveries)
        failed = sum(d["outcome"] == "failed" for d in deliveries)
        doubled = sum(d["copy"] == 1 for d in deliveries)
        agent_logged = sum(len(ids) for ids in have.values())
        stats = chaos.stats
        print(
            f"\nchaos {label} seed {seed}: {LOAD_SECONDS:.0f} s, {stats.kills} kills, "
            f"{stats.faults} LiveChat faults, "
            f"(restarts {', '.join(f'{t:.1f}' for t in stats.restarts_s)} s), "
            f"{sent} sends acked ({stats.refused} refused after a stop, "
            f"{stats.retried_sends} retried past the client), "
            f"{stats.agent_messages} agent messages ({agent_logged} logged, {late} out of "
            f"LiveChat's order), "
            f"{stats.handoffs} handoffs ({stats.stops} stopped), {len(deliveries)} webhook "
            f"deliveries: {doubled} doubled, {dropped} dropped, {failed} given up; "
            f"log head {head}; consumer restarts {stats.consumer_restarts}, "
            f"raw reconnects {stats.raw_reconnects}"
        )
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        await client.close()
        client = None

        # Shutdown: every process exits 0; no error in any log.
        codes = [await service.terminate(timeout=60) for service in services]
        assert codes == [0] * len(services), codes
        problems = [line for service in services for line in log_problems(service)]
        assert not problems, "\n".join(problems[:20])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if client is not None:
            await client.close()
        for service in services:
            if service.proc is not None and service.proc.returncode is None:
                await service.kill()
        await control.aclose()
        await fake_process.stop()


def _diff(got: list[Any], want: list[Any]) -> str:
    missing = sorted(set(want) - set(got))[:10]
    repeated = [c for c, n in Counter(got).items() if n > 1][:10]
    return f"missing {missing}, repeated {repeated}, {len(got)} seen of {len(want)}"


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_on_sqlite(seed: int, tmp_path: Path) -> None:
    async def one_process(fake: FakeLiveChatProcess, tmp: Path) -> list[ServiceProcess]:
        env = service_env(fake, tmp, f"sqlite:///{tmp}/hitl.db")
        service = ServiceProcess(env, cwd=tmp)
        url = f"http://{env['HITL_HTTP_ADDR']}/webhooks/livechat"
        await run_cli(env, tmp, "livechat", "register-webhooks", "--url", url)
        await service.start()
        return [service]

    await run_chaos(seed, tmp_path, one_process, "sqlite")


@pytest.mark.postgres
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_on_two_postgres_replicas(seed: int, tmp_path: Path, postgres_dsn: str) -> None:
    async def two_replicas(fake: FakeLiveChatProcess, tmp: Path) -> list[ServiceProcess]:
        replicas = []
        for name in ("a", "b"):
            cwd = tmp / name
            cwd.mkdir()
            replicas.append(
                ServiceProcess(service_env(fake, cwd, postgres_dsn), cwd=cwd, name=name)
            )
        await asyncio.gather(*(replica.start() for replica in replicas))
        control = httpx.AsyncClient(base_url=fake.url, timeout=30)
        try:
            for replica in replicas:  # each webhook goes to both
                await Fake(fake, control).register_webhooks(
                    f"{replica.http_base}/webhooks/livechat"
                )
        finally:
            await control.aclose()
        return replicas

    await run_chaos(seed, tmp_path, two_replicas, "postgres")
