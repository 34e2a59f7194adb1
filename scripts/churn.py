"""Churn run: leaks that only show when sessions and streams come and go.

``scripts/soak.py`` keeps a steady load; this run keeps *replacing* things
and checks that nothing grows with the number of sessions, streams,
connections or provider failures ever seen. For ``--minutes`` it runs, as
real processes, the service (``scripts/churn_probe.py``: ``serve`` plus an
in-process sampler), the fake LiveChat, and stream clients:

- sessions end every way there is: ``StopHitl``, the agent closing the chat
  (webhook), the customer and the router closing it, the queue and idle
  timeouts (``HITL_QUEUE_TIMEOUT``/``HITL_IDLE_TIMEOUT`` short), and starts
  whose caller gives up at once;
- ``SendMessage`` fails (scripted 5xx, 429, lost answers, dropped
  connections and slow answers at the fake) and is retried with the same
  ``request_id``; some calls are cancelled by a tiny client deadline;
- the fake's clock jumps 9 hours now and then (every customer token the
  service holds is expired there) and connections to it are dropped;
- stream clients in their own processes open and cancel ``StreamEvents``
  and health ``Watch`` streams; some processes are killed (SIGKILL: the
  kernel closes their sockets), and some vanish behind a relay process that
  is frozen first (SIGSTOP), so the service keeps a connection nobody
  answers on (half-open) until its keepalive closes it;
- every ``--jump-every`` seconds the traffic pauses, the service's wall clock
  moves past ``HITL_RETENTION`` and the prune runs, so the store must come
  back to the same size each time.

Every ``--sample`` seconds it records the service's RSS, open file
descriptors (by kind), threads, TCP connections, asyncio tasks, the length
of every in-memory container the probe reaches (by attribute path), the
httpx pool to the provider, stream subscribers, the Prometheus series
count, the SQLite files and each table's rows. The report lists first and
last samples and every quantity that grew; the exit status is 1 when the
run saw an error of the service, or when something is suspicious:

- an in-memory container above its size before any traffic once the churn
  is over (every session ended, every stream closed), unless it is a cache
  with a capacity (an LRU, the stream buffer) or keyed by the code itself
  (log keys, metric label combinations, open connections: ``KEYED_BY_CODE``);
- a process quantity (tasks, open files, threads, connections) grown past
  ``--max-growth``, or rising at every idle checkpoint (the clock jumps and
  the end), and objects of one type rising at every idle checkpoint by half
  the sessions or more;
- a metric series with a label value shaped like an id (session, message,
  user, chat): label cardinality that grows with sessions.

The store is judged after each jump (every table back to what retention
keeps), RSS by its samples.

    .venv/bin/python scripts/churn.py --minutes 12
    .venv/bin/python scripts/churn.py --minutes 12 --store postgres   # needs initdb
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402 - after the path set-up
import httpx  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb  # noqa: E402
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc  # noqa: E402
from scripts.soak import register_webhooks  # noqa: E402 - the soak's, as it is
from tests.processes import FakeLiveChatProcess, ServiceProcess  # noqa: E402

AGENTS = ("jane@acme.example", "joe@acme.example")
CALL_TIMEOUT = 20.0
DAY = 86400.0
JUMP = 3.6 * DAY  # past HITL_RETENTION (2 d) and, two jumps on, the 7-day dedupe keys
ENDINGS = (
    ("stop", 35),
    ("agent_close", 20),
    ("customer_close", 5),
    ("router_close", 5),
    ("queue_timeout", 10),
    ("idle_timeout", 10),
    ("cancelled_start", 5),
    ("stop_with_failures", 10),
)


# --- the child processes ------------------------------------------------------------


async def stream_client(target: str, streams: int, seed: int, http_base: str = "") -> None:
    """Opens and cancels streams until killed; prints how many it opened.

    With ``http_base``, it also keeps a few keep-alive connections to the
    sidecar busy with probes (they vanish with the process too)."""
    rng = random.Random(seed)
    opened = 0
    cursor = ""

    async def one(channel: grpc.aio.Channel) -> None:
        nonlocal opened, cursor
        stub: Any = pb_grpc.HitlServiceStub(channel)
        health: Any = health_pb2_grpc.HealthStub(channel)
        while True:
            roll = rng.random()
            if roll < 0.15:
                call = health.Watch(health_pb2.HealthCheckRequest(service="hitl.v1.HitlService"))
            elif roll < 0.3 and cursor:
                back = max(0, int(cursor) - rng.randint(0, 200))
                call = stub.StreamEvents(pb.StreamEventsRequest(after_cursor=str(back)))
            else:
                call = stub.StreamEvents(pb.StreamEventsRequest())
            opened += 1
            if opened % 20 == 0:
                print(f"opened {opened}", flush=True)
            lifetime = rng.choice((0.05, 0.3, 1.0, 3.0, 8.0))
            with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
                async with asyncio.timeout(lifetime):
                    async for event in call:
                        if hasattr(event, "cursor") and event.cursor:
                            cursor = event.cursor
            call.cancel()

    async def probes() -> None:
        if not http_base:
            return
        async with httpx.AsyncClient(base_url=http_base, timeout=10) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    await client.get(rng.choice(("/healthz", "/readyz", "/metrics")))
                await asyncio.sleep(rng.uniform(0.05, 0.5))

    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.gather(probes(), probes(), *(one(channel) for _ in range(streams)))


async def relay(target: str) -> None:
    """A TCP relay to ``target``; prints its port, then each upstream local port."""
    host, _, port = target.rpartition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        print(f"upstream {up_writer.get_extra_info('sockname')[1]}", flush=True)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


class Child:
    """A child process of this script (``stream-client`` or ``relay``)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self.got_line = asyncio.Event()

    async def start(self) -> Child:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode().strip())
            self.got_line.set()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signum)

    async def end(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    def opened(self) -> int:
        counts = [int(x.split()[1]) for x in self.lines if x.startswith("opened ")]
        return counts[-1] if counts else 0


# --- measurements -------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """RSS (KiB), threads, open fds by kind, established TCP connections."""
    status: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                status[key.lower()] = int(value.split()[0])
    kinds: Counter[str] = Counter()
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            kind = link.split(":")[0] if ":" in link else "file"
            kinds[kind] += 1
            if kind == "socket":
                inodes.add(link[8:-1])
    status["fds"] = sum(kinds.values())
    for kind, n in kinds.items():
        status[f"fds_{kind}"] = n
    states: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[9] in inodes:
                    states[
                        {"01": "established", "0A": "listen", "08": "close_wait"}.get(
                            parts[3], "other"
                        )
                    ] += 1
    for state, n in states.items():
        status[f"tcp_{state}"] = n
    return status


def server_peer_ports(pid: int) -> set[int]:
    """Remote ports of the service's established TCP connections."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[9] in inodes and parts[3] == "01":
                ports.add(int(parts[2].split(":")[1], 16))
    return ports


def sqlite_state(db: Path) -> dict[str, int]:
    """File sizes and rows per table (a short read, as an operator would)."""
    out: dict[str, int] = {}
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{db}{suffix}")
        out[f"file{suffix or '_db'}_kb"] = path.stat().st_size // 1024 if path.exists() else 0
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            out[f"rows_{table}"] = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    return out


async def postgres_state(dsn: str) -> dict[str, int]:
    """Database size and rows per table."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        out = {
            "db_kb": int(await conn.fetchval("SELECT pg_database_size(current_database())")) // 1024
        }
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        for row in tables:
            name = row["tablename"]
            out[f"rows_{name}"] = int(await conn.fetchval(f'SELECT count(*) FROM "{name}"'))
        out["pg_connections"] = int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
        )
        return out
    finally:
        await conn.close()


ID_LIKE = re.compile(r'="(ses_|msg_|usr_|[0-9A-Z]{10}"|[0-9a-f]{16,}|[0-9a-f-]{36})')


def id_labels(text: str) -> list[str]:
    """Series whose label values look like ids (sessions, messages, users,
    LiveChat chats, uuids): label cardinality that grows with sessions."""
    return [line for line in text.splitlines() if not line.startswith("#") and ID_LIKE.search(line)]


def metric_series(text: str) -> dict[str, int]:
    """Series per metric family in a /metrics answer (and the total)."""
    families: Counter[str] = Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            for suffix in ("_bucket", "_sum", "_count", "_created", "_total"):
                name = name.removesuffix(suffix)
            families[name] += 1
    return {"total": sum(families.values()), **families}


# --- the traffic --------------------------------------------------------------------


@dataclass
class Tally:
    rpcs: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)  # failures we caused
    endings: Counter[str] = field(default_factory=Counter)
    sessions_started: int = 0
    sessions_ended: int = 0
    send_retries: int = 0
    streams_in_process: int = 0
    stream_processes_killed: int = 0
    half_open: int = 0
    half_open_closed_by_server: int = 0
    half_open_left_open: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    clock_jumps: int = 0
    token_expiries: int = 0


class Churn:
    def __init__(
        self, args: argparse.Namespace, stubs: list[Any], fake: httpx.AsyncClient, fake_url: str
    ) -> None:
        self.args = args
        self.stubs = stubs
        self.fake = fake
        self.fake_url = fake_url
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.running = asyncio.Event()  # cleared while the clock jumps
        self.running.set()
        self.busy = 0  # conversations in progress
        self.idle = asyncio.Event()
        self.stop = asyncio.Event()
        self.number = 0
        self.killed_streams = 0  # streams opened by client processes since killed
        self.id_labels: list[str] = []  # metric series labelled with an id

    @property
    def stub(self) -> Any:
        """Any replica's (calls of one conversation land on all of them)."""
        return self.stubs[0] if len(self.stubs) == 1 else self.rng.choice(self.stubs)

    async def rpc(
        self,
        method: str,
        request: Any,
        *,
        timeout: float = CALL_TIMEOUT,
        expect: tuple[grpc.StatusCode, ...] = (),
    ) -> Any:
        self.tally.rpcs[method] += 1
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            key = f"{method}: {exc.code().name}"
            if exc.code() in expect:
                self.tally.expected[key] += 1
            else:
                self.tally.errors[f"{key}: {exc.details()}"[:160]] += 1
            return None

    async def agent(self, action: str, **kwargs: Any) -> bool:
        answer = await self.fake.post(f"/_control/{action}", json=kwargs)
        if answer.status_code != 200:
            # The chat may already be closed by a timeout: not the service's fault.
            self.tally.expected[f"agent {action}: {answer.status_code}"] += 1
            return False
        return True

    async def send(self, session_id: str, n: int) -> None:
        """SendMessage, retried with the same request_id while UNAVAILABLE."""
        request_id = f"churn-msg-{session_id}-{n}"
        if self.rng.random() < 0.15:
            message = pb.Message(
                media=pb.Media(
                    kind=pb.MEDIA_KIND_FILE,
                    url=f"{self.fake_url}/_media/2000/a.pdf?type=application/pdf",
                    name="a.pdf",
                    mime_type="application/pdf",
                )
            )
        else:
            message = pb.Message(text=f"churn message {n} " + "x" * self.rng.randint(0, 400))
        request = pb.SendMessageRequest(
            session_id=session_id, message=message, request_id=request_id
        )
        roll = self.rng.random()
        if roll < 0.1:
            # A caller that goes away while the RPC waits for the provider.
            self.tally.rpcs["SendMessage"] += 1
            call = self.stub.SendMessage(request, timeout=CALL_TIMEOUT)
            await asyncio.sleep(self.rng.uniform(0.05, 1.5))
            call.cancel()
            self.tally.expected["SendMessage: cancelled by the caller"] += 1
        elif roll < 0.2:
            # A caller that gives up at once: the RPC is cancelled server-side.
            await self.rpc(
                "SendMessage",
                request,
                timeout=0.02,
                expect=(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION),
            )
        for attempt in range(8):
            try:
                self.tally.rpcs["SendMessage"] += 1
                await self.stub.SendMessage(request, timeout=CALL_TIMEOUT)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.tally.send_retries += 1
                    self.tally.expected[f"SendMessage: {exc.code().name}"] += 1
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # e.g. a message the provider refused for good, a session a
                    # timeout ended: counted, not an error of the service.
                    self.tally.expected["SendMessage: FAILED_PRECONDITION"] += 1
                    return
                self.tally.errors[f"SendMessage: {exc.code().name}: {exc.details()}"[:160]] += 1
                return
        self.tally.errors["SendMessage: still unavailable after 8 tries"] += 1

    async def wait_ended(self, session_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = await self.rpc("GetSession", pb.GetSessionRequest(session_id=session_id))
            if got is None or got.session.state in (
                pb.SESSION_STATE_ENDED,
                pb.SESSION_STATE_FAILED,
            ):
                return True
            await asyncio.sleep(0.5)  # polling a condition under a deadline
        self.tally.errors["a session did not end in time"] += 1
        return False

    async def conversation(self, user: pb.User, ending: str) -> None:
        self.number += 1
        request = pb.StartHitlRequest(
            user_id=user.id,
            title=f"churn {self.number}",
            history=[pb.Message(text="hi bot", author=pb.AUTHOR_USER)],
            request_id=f"churn-start-{self.number}-{self.args.seed}",
        )
        if ending == "cancelled_start":
            await self.rpc(
                "StartHitl", request, timeout=0.05, expect=(grpc.StatusCode.DEADLINE_EXCEEDED,)
            )
            await asyncio.sleep(self.rng.random())
        started = None
        for attempt in range(5):  # a client retries a start with its request_id
            started = await self.rpc(
                "StartHitl",
                request,
                expect=(grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE),
            )
            if started is not None:
                break
            await asyncio.sleep(0.5 * (attempt + 1))
        if started is None:
            return
        self.tally.sessions_started += 1
        session = started.session
        chat_id = session.external_chat_id
        agent = self.rng.choice(AGENTS)
        faults = ending == "stop_with_failures"
        if faults:
            await self.fault()
        await self.send(session.id, 0)
        if ending == "queue_timeout":
            if await self.wait_ended(session.id, 3 * self.args.queue_timeout + 30):
                self.tally.sessions_ended += 1
                self.tally.endings[ending] += 1
            return
        joined = await self.agent("agent_join", chat_id=chat_id, agent_id=agent)
        for n in range(1, self.rng.randint(2, 6)):
            if faults and self.rng.random() < 0.5:
                await self.fault()
            await self.send(session.id, n)
            if joined and self.rng.random() < 0.5:
                await self.agent(
                    "agent_message", chat_id=chat_id, agent_id=agent, text=f"agent reply {n}"
                )
        if joined and self.rng.random() < 0.1:
            other = AGENTS[1] if agent == AGENTS[0] else AGENTS[0]
            if await self.agent("transfer", chat_id=chat_id, agent_ids=[other], requester_id=agent):
                agent = other
        if ending == "idle_timeout":
            ended = await self.wait_ended(session.id, 3 * self.args.idle_timeout + 30)
        elif ending in ("agent_close", "customer_close", "router_close") and joined:
            kwargs = {"chat_id": chat_id}
            if ending == "agent_close":
                kwargs["agent_id"] = agent
            ended = await self.agent(ending, **kwargs) and await self.wait_ended(session.id, 30)
        else:
            ended = (
                await self.rpc(
                    "StopHitl",
                    pb.StopHitlRequest(session_id=session.id, reason="done"),
                    expect=(grpc.StatusCode.UNAVAILABLE,),
                )
                is not None
            )
            if not ended:
                ended = await self.wait_ended(session.id, 60)
        if ended:
            self.tally.sessions_ended += 1
            self.tally.endings[ending] += 1

    async def fault(self) -> None:
        """One scripted failure at the fake, for the next matching call."""
        kind = self.rng.choice(("error", "error429", "lost_response", "drop", "delay"))
        body: dict[str, Any] = {"method": "send_event", "times": 1}
        if kind == "error":
            body.update(kind="error", error_type="service_unavailable")
        elif kind == "error429":
            body.update(kind="error", error_type="too_many_requests", retry_after="1")
        elif kind == "delay":
            body.update(kind="delay", delay=self.args.provider_timeout + 1)
        else:
            body.update(kind=kind)
        self.tally.faults[kind] += 1
        await self.fake.post("/_control/add_fault", json=body)

    async def worker(self, users: list[pb.User], deadline: float) -> None:
        endings, weights = zip(*ENDINGS, strict=True)
        while time.monotonic() < deadline:
            await self.running.wait()
            if time.monotonic() >= deadline:
                return
            self.busy += 1
            self.idle.clear()
            try:
                ending = self.rng.choices(endings, weights)[0]
                await self.conversation(self.rng.choice(users), ending)
            finally:
                self.busy -= 1
                if self.busy == 0:
                    self.idle.set()
            await asyncio.sleep(self.args.think)  # pacing, not synchronization

    async def in_process_streams(self, channel: grpc.aio.Channel, deadline: float) -> None:
        """Streams opened and cancelled by a client that stays (its channel is reused)."""
        stub: Any = pb_grpc.HitlServiceStub(channel)
        while time.monotonic() < deadline:
            calls = []
            for _ in range(self.rng.randint(1, 10)):
                sid = "" if self.rng.random() < 0.7 else f"no-such-{self.rng.random()}"
                calls.append(stub.StreamEvents(pb.StreamEventsRequest(session_id=sid)))
                self.tally.streams_in_process += 1
            await asyncio.sleep(self.rng.uniform(0.01, 1.0))
            for call in calls:
                call.cancel()

    async def stream_processes(self, target: str, http_base: str, deadline: float) -> None:
        """Stream client processes, killed and replaced."""
        children: list[Child] = []
        n = 0
        try:
            while time.monotonic() < deadline:
                while len(children) < self.args.stream_processes:
                    n += 1
                    children.append(
                        await Child(
                            "stream-client", target, "20", str(self.args.seed * 1000 + n), http_base
                        ).start()
                    )
                await asyncio.sleep(self.rng.uniform(5, 20))
                victim = children.pop(self.rng.randrange(len(children)))
                await victim.end()
                self.tally.stream_processes_killed += 1
                self.killed_streams += victim.opened()
        finally:
            for child in children:
                await child.end()
                self.killed_streams += child.opened()

    async def half_open(self, target: str, pid: int, deadline: float) -> None:
        """Clients that vanish behind a frozen relay: the service's side stays open."""
        frozen: list[tuple[float, Child, set[int]]] = []
        while time.monotonic() < deadline or frozen:
            if time.monotonic() < deadline - 90:
                relay_proc = await Child("relay", target).start()
                await asyncio.wait_for(relay_proc.got_line.wait(), 30)
                port = relay_proc.lines[0].split()[1]
                client = await Child(
                    "stream-client", f"127.0.0.1:{port}", "5", str(self.rng.random())
                ).start()
                await asyncio.sleep(self.rng.uniform(5, 10))
                ups = {int(x.split()[1]) for x in relay_proc.lines if x.startswith("upstream")}
                relay_proc.signal(signal.SIGSTOP)  # the relay no longer answers
                await client.end()  # the client vanishes; the service is not told
                self.killed_streams += client.opened()
                self.tally.half_open += 1
                frozen.append((time.monotonic(), relay_proc, ups))
            still: list[tuple[float, Child, set[int]]] = []
            for since, relay_proc, ups in frozen:
                if time.monotonic() - since < self.args.half_open_hold:
                    still.append((since, relay_proc, ups))
                    continue
                open_now = ups & server_peer_ports(pid)
                if open_now:
                    self.tally.half_open_left_open += 1
                else:
                    self.tally.half_open_closed_by_server += 1
                await relay_proc.end()
            frozen = still
            await asyncio.sleep(self.rng.uniform(15, 30))

    async def provider_trouble(self, deadline: float) -> None:
        """Expired tokens and dropped connections at the fake, now and then."""
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rng.uniform(20, 40))
            # Every customer token the service holds expires at the fake.
            await self.fake.post("/_control/advance_clock", json={"seconds": 9 * 3600})
            self.tally.token_expiries += 1
            # A few calls of any kind lose their connection.
            await self.fake.post(
                "/_control/add_fault", json={"method": "*", "kind": "drop", "times": 2}
            )
            self.tally.faults["drop_any"] += 1

    async def clock_jumps(self, control: Path, deadline: float, on_jump: Any) -> None:
        """Pauses traffic, moves the service's wall clock past retention, prunes."""
        offset, prunes = 0.0, 0
        while self.args.jump_every > 0:
            await asyncio.sleep(self.args.jump_every)
            if time.monotonic() > deadline - 60:
                return
            self.running.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), 120)
            await asyncio.sleep(2)  # the last settles and webhooks
            offset += JUMP
            prunes += 1
            control.write_text(json.dumps({"clock_offset": offset, "prune": prunes}))  # noqa: ASYNC240
            self.tally.clock_jumps += 1
            await on_jump(offset)
            self.running.set()


# --- the run ------------------------------------------------------------------------


def last_line(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


async def main(args: argparse.Namespace) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="hitl-churn-"))
    print(
        f"churn: {args.minutes:g} min, {args.workers} conversations at once, "
        f"store {args.store}, logs in {run_dir}",
        flush=True,
    )
    fake = await FakeLiveChatProcess().start()
    control = run_dir / "control.json"
    db = run_dir / "churn.db"
    pg = None
    env = {
        **fake.env,
        "HITL_PROVIDER": "livechat",
        "HITL_GRPC_ADDR": "127.0.0.1:0",
        "HITL_HTTP_ADDR": "127.0.0.1:0",
        "HITL_STORE_URL": f"sqlite:///{db}",
        "HITL_DATA_DIR": str(run_dir / "data"),
        "HITL_STREAM_MAX_SECONDS": "20",  # streams also end by themselves
        "HITL_QUEUE_TIMEOUT": f"{args.queue_timeout:g}s",
        "HITL_IDLE_TIMEOUT": f"{args.idle_timeout:g}s",
        "HITL_RECONCILE_INTERVAL": "30s",
        "HITL_RETENTION": "2d",
        "HITL_ABANDON_AFTER": "30s",
        "HITL_PROVIDER_TIMEOUT": f"{args.provider_timeout:g}s",
        "HITL_GRPC_IDLE_TIMEOUT": "60s",
        "CHURN_PROBE_CONTROL": str(control),
        "CHURN_PROBE_EVERY": str(args.sample),
    }
    if args.store == "postgres":
        from tests.postgres_fixture import PgInstall, RunAs, _traversable_tmp, find_bin_dir

        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SystemExit("--store postgres needs initdb and pg_ctl")
        run_as = RunAs.pick()
        base = Path(tempfile.mkdtemp(prefix="hitl-churn-pg-", dir=_traversable_tmp()))
        run_as.chown(base)
        pg = PgInstall(bin_dir, run_as, base).new_cluster()
        pg.start()
        env["HITL_STORE_URL"] = pg.url()
    if args.replicas > 1 and pg is None:
        raise SystemExit("--replicas needs --store postgres (SQLite is one process)")
    services = [
        ServiceProcess(
            {**env, "CHURN_PROBE_OUT": str(run_dir / f"probe{n}.jsonl")},
            cwd=run_dir,
            name=f"churn-service{n}",
            command=(str(ROOT / "scripts" / "churn_probe.py"),),
        )
        for n in range(args.replicas)
    ]
    service = services[0]
    samples: list[dict[str, Any]] = []
    jumps: list[dict[str, Any]] = []
    churn: Churn | None = None
    started_at = time.monotonic()
    try:
        for one in services:
            await one.start()
        assert service.proc is not None
        pid = service.proc.pid
        await register_webhooks(env, run_dir, f"{service.http_base}/webhooks/livechat")
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(grpc.aio.insecure_channel(one.grpc_target))
                for one in services
            ]
            stream_channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(service.grpc_target)
            )
            control_client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=fake.url, timeout=CALL_TIMEOUT)
            )
            sidecars = [
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=one.http_base, timeout=10)
                )
                for one in services
            ]
            churn = Churn(
                args, [pb_grpc.HitlServiceStub(c) for c in channels], control_client, fake.url
            )
            users = []
            for w in range(args.workers * args.users_per_worker):
                made = await churn.rpc(
                    "CreateUser",
                    pb.CreateUserRequest(
                        name=f"Churn user {w}",
                        email=f"churn{w}@example.com",
                        external_id=f"churn-{w}",
                    ),
                )
                if made is not None:
                    users.append(made.user)
            pools = [users[i :: args.workers] for i in range(args.workers)]

            async def sample(tag: str = "") -> dict[str, Any]:
                s: dict[str, Any] = {"t": round(time.monotonic() - started_at, 1), "tag": tag}
                s["proc"] = proc_status(pid)
                s["probe"] = last_line(run_dir / "probe0.jsonl")
                s["metrics"] = metric_series((await sidecars[0].get("/metrics")).text)
                s["replicas"] = [
                    {
                        "proc": proc_status(one.proc.pid),
                        "probe": last_line(run_dir / f"probe{n}.jsonl"),
                        "metrics": metric_series((await sidecars[n].get("/metrics")).text),
                    }
                    for n, one in enumerate(services)
                    if n and one.proc is not None
                ]
                if pg is None:
                    s["store"] = sqlite_state(db)
                else:
                    s["store"] = await postgres_state(pg.url())
                assert churn is not None
                s["sessions_started"] = churn.tally.sessions_started
                s["streams"] = churn.tally.streams_in_process + churn.killed_streams
                samples.append(s)
                return s

            async def sampler() -> None:
                while not churn.stop.is_set():
                    await sample()
                    p, st = samples[-1]["proc"], samples[-1]["store"]
                    pr = samples[-1]["probe"]
                    print(
                        f"[{samples[-1]['t']:>6}s] sessions {churn.tally.sessions_started} "
                        f"rss {p['vmrss'] // 1024} MB fds {p['fds']} threads {p['threads']} "
                        f"tasks {pr.get('tasks')} subs {pr.get('subscribers')} "
                        f"series {samples[-1]['metrics']['total']} "
                        f"rows_sessions {st.get('rows_sessions')} "
                        f"rows_events {st.get('rows_events')}",
                        flush=True,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(churn.stop.wait(), args.sample)

            async def on_jump(offset: float) -> None:
                # Two probe ticks: the first applies the control file, the
                # sweep then prunes (within HITL sweep interval).
                await asyncio.sleep(2 * args.sample + 6)
                s = await sample(f"after jump {len(jumps) + 1}")
                jumps.append({"t": s["t"], "offset_days": offset / DAY, "store": s["store"]})
                print(
                    f"clock jump {len(jumps)}: +{offset / DAY:.1f} d, store {s['store']}",
                    flush=True,
                )

            # The baseline: every replica idle, before any traffic (but the
            # users and a first request to each sidecar, whose middleware
            # Starlette builds then), in a probe line written after that.
            for n, sidecar in enumerate(sidecars):
                await sidecar.get("/readyz")
                probe = run_dir / f"probe{n}.jsonl"
                lines = len(probe.read_text().splitlines()) if probe.exists() else 0
                while not probe.exists() or len(probe.read_text().splitlines()) <= lines:  # noqa: ASYNC110
                    await asyncio.sleep(0.5)  # the probe writes its next line
            await sample("baseline")
            deadline = time.monotonic() + args.minutes * 60
            background = [
                asyncio.create_task(sampler()),
                asyncio.create_task(churn.in_process_streams(stream_channel, deadline)),
                asyncio.create_task(
                    churn.stream_processes(service.grpc_target, service.http_base, deadline)
                ),
                asyncio.create_task(churn.half_open(service.grpc_target, pid, deadline)),
                asyncio.create_task(churn.provider_trouble(deadline)),
                asyncio.create_task(churn.clock_jumps(control, deadline, on_jump)),
            ]
            await asyncio.gather(*(churn.worker(pool, deadline) for pool in pools))
            # Let timeouts, stops and streams settle, then the last sample.
            await asyncio.gather(*background[1:4])
            await asyncio.sleep(max(args.queue_timeout, args.idle_timeout) + 15)
            await sample("end")
            for n, sidecar in enumerate(sidecars):  # the series themselves, to read their labels
                text = (await sidecar.get("/metrics")).text
                (run_dir / f"metrics{n}.txt").write_text(text)
                churn.id_labels += id_labels(text)
            churn.stop.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
    finally:
        for one in services:
            if one.proc is not None and one.proc.returncode is None:
                await one.terminate()
        await fake.stop()
        if pg is not None:
            pg.destroy()
    assert churn is not None
    return report(args, churn, samples, jumps, run_dir)


# --- the report ---------------------------------------------------------------------


def flatten(sample: dict[str, Any]) -> dict[str, float]:
    flat = _flatten(sample)
    for n, replica in enumerate(sample.get("replicas", []), start=1):
        flat.update({f"r{n}.{k}": v for k, v in _flatten({**replica, "store": {}}).items()})
    return flat


def _flatten(sample: dict[str, Any]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in sample["proc"].items():
        flat[f"proc.{key}"] = value
    for key, value in sample["store"].items():
        flat[f"store.{key}"] = value
    flat["metrics.series"] = sample["metrics"]["total"]
    probe = sample["probe"]
    for key in ("tasks", "subscribers", "gc_total"):
        if key in probe:
            flat[f"probe.{key}"] = probe[key]
    for key, value in probe.get("pool", {}).items():
        flat[f"pool.{key}"] = value
    for key, value in probe.get("sizes", {}).items():
        flat[f"size.{key}"] = value
    for key, value in probe.get("gc", {}).items():
        flat[f"gc.{key}"] = value
    return flat


# Structures whose keys are written in the code (log keys, metric label
# combinations of bounded enums) or that hold open connections (bounded by
# their caps, and checked through open files): they may end above baseline.
KEYED_BY_CODE = (
    "metrics._children",
    "SecretRedactor._secret_key",
    "_warned_types",
    "_warned_lifecycle",
    "ServiceInterceptor._wrapped",
    "server_state.connections",
    "_pool._connections",
    "_pool._requests",
    "sqlite:_COLUMNS_OF",  # by SQL text, at most 256 (store/sqlite.py)
)

# Quantities that legitimately grow during the run: the store keeps what is
# within HITL_RETENTION (checked after each jump instead), and the SQLite
# files grow until freed pages are reused.
GROWS_BY_DESIGN = ("store.", "proc.vmrss")


def bound_of(key: str, flat: dict[str, float]) -> float | None:
    """The capacity a bounded cache reports for ``size.<path>`` (its own or
    its owner's ``_capacity``/``_size``), if any."""
    replica, _, path = key.rpartition("size.")  # replica: "" or "r<n>."
    for owner in (path, path.rpartition(".")[0]):
        for bound in ("#_capacity", "#_size"):
            if f"{replica}size.{owner}{bound}" in flat:
                return flat[f"{replica}size.{owner}{bound}"]
    return None


def report(
    args: argparse.Namespace,
    churn: Churn,
    samples: list[dict[str, Any]],
    jumps: list[dict[str, Any]],
    run_dir: Path,
) -> int:
    """First and last samples, the idle checkpoints, and what grew.

    Growth is judged where the load is the same: at the idle checkpoints
    (traffic paused for a clock jump, and the end, once the last sessions
    ended and streams closed). A quantity that rises at every checkpoint,
    by more than ``--min-growth`` in all, and is not a cache below its
    capacity, is a leak; so is one that grew first to last past
    ``--max-growth`` (the store and RSS aside: judged from the checkpoints).
    """
    tally = churn.tally
    warm = [s for s in samples if s["t"] >= args.warmup] or samples
    first, last = flatten(warm[0]), flatten(warm[-1])
    keys = sorted(set(first) | set(last))
    idle = [s for s in samples if s["tag"] and s["tag"] != "baseline"]
    baseline = next((flatten(s) for s in samples if s["tag"] == "baseline"), {})
    idle_flat = [flatten(s) for s in idle]

    def bounded(key: str, value: float) -> bool:
        cap = bound_of(key, last)
        if cap is not None and value <= cap:
            return True
        # An item of a bounded cache (``lru._data[*].agents``) is bounded with it.
        replica, _, path = key.rpartition("size.")
        return any(
            bound_of(f"{replica}size.{path[:i]}", last) is not None
            for i in range(len(path))
            if path.startswith("[*]", i)
        )

    def unprefixed(key: str) -> str:
        return re.sub(r"^r\d+\.", "", key)

    grown = []
    for key in keys:
        a, b = first.get(key, 0), last.get(key, 0)
        if b > a + max(args.min_growth, args.max_growth * a):
            grown.append((key, a, b, "first to last"))
    rising = []
    if len(idle_flat) >= 3:
        for key in sorted(set().union(*idle_flat)):
            values = [f.get(key, 0) for f in idle_flat]
            steps = [y - x for x, y in itertools.pairwise(values)]
            if all(d > 0 for d in steps) and values[-1] - values[0] > args.min_growth:
                rising.append((key, values[0], values[-1], "at every idle checkpoint"))
    # After the churn (every session ended, every stream closed), what is
    # kept per session, stream, connection or item must be back where it was
    # before any traffic: anything left behind is kept for good.
    left_behind = [
        (key, baseline.get(key, 0), value, "left behind after the churn")
        for key, value in last.items()
        if "size." in key
        and "#" not in key
        and value > baseline.get(key, 0)
        and not bounded(key, value)
        and not any(part in key for part in KEYED_BY_CODE)
    ]
    sessions = max(1, tally.sessions_started)
    suspicious = [
        g
        for g in grown + rising
        if not unprefixed(g[0]).startswith(GROWS_BY_DESIGN)
        and "size." not in g[0]  # judged by left_behind, against the baseline
        and unprefixed(g[0]) != "metrics.series"  # judged by its labels, below
        # Objects by type only when they rise at every idle checkpoint, by
        # half the sessions or more (a leak per session adds about one per
        # session): caches fill early (asyncpg's statements, metric children).
        and not (unprefixed(g[0]).startswith("gc.") and (g in grown or g[2] - g[1] < sessions / 2))
    ]
    suspicious += left_behind
    suspicious += [
        (f"metrics: {line}", 0, 0, "a label value that names one session, chat or user")
        for line in churn.id_labels
    ]
    flat_keys = [k for k in keys if "gc." not in k and "size." not in k]
    watched = [k for k in keys if "size." in k and "#" not in k]
    result = {
        "minutes": args.minutes,
        "store": args.store,
        "replicas": args.replicas,
        "sessions_started": tally.sessions_started,
        "sessions_ended": tally.sessions_ended,
        "endings": dict(tally.endings),
        "streams_opened": tally.streams_in_process + churn.killed_streams,
        "stream_processes_killed": tally.stream_processes_killed,
        "half_open": tally.half_open,
        "half_open_closed_by_server": tally.half_open_closed_by_server,
        "half_open_left_open": tally.half_open_left_open,
        "send_retries": tally.send_retries,
        "faults": dict(tally.faults),
        "token_expiries": tally.token_expiries,
        "clock_jumps": tally.clock_jumps,
        "rpcs": dict(tally.rpcs),
        "errors": dict(tally.errors.most_common(20)),
        "expected_failures": dict(tally.expected.most_common(20)),
        "first_after_warmup": {k: first.get(k) for k in flat_keys},
        "last": {k: last.get(k) for k in flat_keys},
        "idle_checkpoints": {
            "tags": [s["tag"] for s in idle],
            "values": {
                k: [f.get(k) for f in idle_flat]
                for k in flat_keys + watched
                if not all(f.get(k) == idle_flat[0].get(k) for f in idle_flat)
            }
            if idle_flat
            else {},
        },
        "bounded_caches": {
            k: {"first": first.get(k), "last": last.get(k), "capacity": bound_of(k, last)}
            for k in watched
            if bound_of(k, last) is not None
        },
        "grown": [{"what": k, "first": a, "last": b, "how": how} for k, a, b, how in grown],
        "rising_at_idle_checkpoints": [{"what": k, "first": a, "last": b} for k, a, b, _ in rising],
        "baseline": {k: v for k, v in baseline.items() if "gc." not in k},
        "suspicious": [
            {"what": k, "first": a, "last": b, "how": how} for k, a, b, how in suspicious
        ],
        "store_after_each_jump": jumps,
        "logs": str(run_dir),
    }
    (run_dir / "samples.json").write_text(json.dumps(samples))
    (run_dir / "report.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(
        f"sessions {tally.sessions_started}, streams {result['streams_opened']}, "
        f"errors {sum(tally.errors.values())}, suspicious {len(suspicious)}: "
        + ", ".join(f"{k} {a:g}->{b:g} ({how})" for k, a, b, how in suspicious)
    )
    print(f"samples and report in {run_dir}")
    return 1 if suspicious or tally.errors else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--workers", type=int, default=10, help="conversations at once")
    parser.add_argument("--users-per-worker", type=int, default=4)
    parser.add_argument("--think", type=float, default=0.05)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=90.0, help="seconds before the first")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--queue-timeout", type=float, default=10.0)
    parser.add_argument("--idle-timeout", type=float, default=15.0)
    parser.add_argument("--provider-timeout", type=float, default=3.0)
    parser.add_argument("--stream-processes", type=int, default=3)
    parser.add_argument(
        "--half-open-hold",
        type=float,
        default=75.0,
        help="seconds a frozen relay is kept before it is checked",
    )
    parser.add_argument(
        "--jump-every", type=float, default=170.0, help="seconds between clock jumps (0: none)"
    )
    parser.add_argument("--max-growth", type=float, default=0.25)
    parser.add_argument("--min-growth", type=float, default=20.0)
    parser.add_argument("--replicas", type=int, default=1, help="service processes (postgres)")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "stream-client":
        asyncio.run(stream_client(sys.argv[2], int(sys.argv[3]), hash(sys.argv[4]), *sys.argv[5:6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "relay":
        asyncio.run(relay(sys.argv[2]))
    else:
        sys.exit(asyncio.run(main(parse_args())))
