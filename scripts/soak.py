"""Soak: hitl-service with the LiveChat provider under sustained mixed traffic.

Runs the service (``python -m hitl_service serve``, SQLite) and the fake
LiveChat as their own processes, then for ``--minutes`` keeps several
conversations going at once: a returning user starts a handoff, sends
messages of every kind (text, text over 16 KB, image/file/audio/video,
location, card), an agent joins and replies (text, files, rich messages,
sometimes a transfer) through the fake's control API, whose webhooks reach
the service, and the handoff ends (StopHitl, or the agent closes the chat).
One stream follows every event and checks the cursors only grow.

The service's RSS is sampled every ``--sample`` seconds. The first minute (20 %
of shorter soaks) is warm-up: caches, the SQLite page cache and the event
buffer fill (the soak runs with ``HITL_STREAM_BUFFER=1024`` so that the
fan-out's bounded buffers are full by then; with the default 4096 they take
a few minutes at this rate, which would look like growth). The report gives
requests, errors, RSS at the start (after warm-up), end, max and its slope;
the exit status is 1 when any request failed or RSS grew more than
``--max-growth`` (5 %).

    make soak-livechat                      # 5 minutes
    .venv/bin/python scripts/soak.py --minutes 3 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
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

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb  # noqa: E402
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc  # noqa: E402
from tests.processes import FakeLiveChatProcess, ServiceProcess  # noqa: E402

AGENTS = ("jane@acme.example", "joe@acme.example")
CALL_TIMEOUT = 15.0


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc") from None
    return int(psutil.Process(pid).memory_info().rss)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else 60 * sum((x - mx) * (y - my) for x, y in points) / den


@dataclass
class Tally:
    """What the soak did."""

    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    agent_actions: int = 0
    conversations: int = 0
    streamed: int = 0
    stream_reconnects: int = 0


class Soak:
    """The traffic: conversations, agents and a stream follower."""

    def __init__(
        self, stub: Any, fake: httpx.AsyncClient, fake_url: str, rng: random.Random
    ) -> None:
        self.stub = stub
        self.fake = fake
        self.fake_url = fake_url
        self.rng = rng
        self.tally = Tally()
        self.stop = asyncio.Event()
        self.numbers = 0  # conversations begun (request ids stay unique)

    async def rpc(self, method: str, request: Any) -> Any:
        """One RPC; any failure is an error of the soak."""
        self.tally.requests[method] += 1
        try:
            return await getattr(self.stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            self.tally.errors[f"{method}: {exc.code().name}: {exc.details()}"[:160]] += 1
            return None

    async def agent(self, action: str, **kwargs: Any) -> bool:
        """An agent's action at the fake (its webhooks go to the service)."""
        self.tally.agent_actions += 1
        answer = await self.fake.post(f"/_control/{action}", json=kwargs)
        if answer.status_code != 200:
            self.tally.errors[f"agent {action}: {answer.text}"[:160]] += 1
            return False
        return True

    def message(self, n: int) -> pb.Message:
        """The n-th message of a conversation: every kind in turn."""
        kind = n % 7
        if kind == 0:
            return pb.Message(text=f"plain text {n} " + "lorem ipsum " * self.rng.randint(1, 30))
        if kind == 1 and self.rng.random() < 0.3:
            return pb.Message(text=("a long message " * 1500)[:20_000])  # split in two
        if kind in (1, 2):
            media_kind, mime, name = self.rng.choice(
                [
                    (pb.MEDIA_KIND_IMAGE, "image/png", "photo.png"),
                    (pb.MEDIA_KIND_FILE, "application/pdf", "invoice.pdf"),
                    (pb.MEDIA_KIND_AUDIO, "audio/ogg", "voice.ogg"),
                    (pb.MEDIA_KIND_VIDEO, "video/mp4", "clip.mp4"),
                ]
            )
            size = self.rng.randint(1_000, 64_000)
            url = f"{self.fake_url}/_media/{size}/{name}?type={mime}"
            return pb.Message(media=pb.Media(kind=media_kind, url=url, name=name, mime_type=mime))
        if kind == 3:
            return pb.Message(
                location=pb.Location(
                    latitude=52.52 + self.rng.random(), longitude=13.4, name="Pick-up point"
                )
            )
        if kind == 4:
            return pb.Message(
                card=pb.Card(
                    title=f"Order {n}",
                    subtitle="Kettle, 39 EUR",
                    buttons=[
                        pb.CardButton(
                            text="Track", kind=pb.BUTTON_KIND_URL, value="https://t.example/1"
                        ),
                        pb.CardButton(text="Cancel", kind=pb.BUTTON_KIND_MESSAGE, value="cancel"),
                    ],
                )
            )
        return pb.Message(text=f"short {n}")

    async def conversation(self, user: pb.User, number: int) -> None:
        """One handoff from start to end."""
        started = await self.rpc(
            "StartHitl",
            pb.StartHitlRequest(
                user_id=user.id,
                title=f"soak conversation {number}",
                description="a sustained-traffic check",
                history=[pb.Message(text="hi bot", author=pb.AUTHOR_USER)],
                request_id=f"soak-start-{user.id}-{number}",
            ),
        )
        if started is None:
            return
        session = started.session
        chat_id = session.external_chat_id
        agent = self.rng.choice(AGENTS)
        joined = False
        sends = self.rng.randint(3, 8)
        for n in range(sends):
            await self.rpc(
                "SendMessage",
                pb.SendMessageRequest(
                    session_id=session.id,
                    message=self.message(n),
                    request_id=f"soak-msg-{session.id}-{n}",
                ),
            )
            if n == 1:
                joined = await self.agent("agent_join", chat_id=chat_id, agent_id=agent)
            if joined and self.rng.random() < 0.6:
                choice = self.rng.random()
                reply: dict[str, Any] = {"text": f"agent reply {n}"}
                if choice < 0.15:
                    reply = {
                        "file": {"name": "label.png", "content_type": "image/png", "size": 900}
                    }
                elif choice < 0.25:
                    reply = {
                        "rich": {
                            "template_id": "cards",
                            "elements": [{"title": "Your return", "buttons": []}],
                        }
                    }
                await self.agent("agent_message", chat_id=chat_id, agent_id=agent, **reply)
        if joined and self.rng.random() < 0.1:
            other = AGENTS[1] if agent == AGENTS[0] else AGENTS[0]
            await self.agent("transfer", chat_id=chat_id, agent_ids=[other], requester_id=agent)
        await self.rpc("GetSession", pb.GetSessionRequest(session_id=session.id))
        if joined and self.rng.random() < 0.2:
            closer = agent
            current = await self.rpc("GetSession", pb.GetSessionRequest(session_id=session.id))
            if current is not None and current.session.agent.id:
                closer = current.session.agent.id
            if await self.agent("agent_close", chat_id=chat_id, agent_id=closer):
                await self.ended(session.id)
        else:
            await self.rpc("StopHitl", pb.StopHitlRequest(session_id=session.id, reason="done"))
        self.tally.conversations += 1

    async def ended(self, session_id: str, timeout: float = 30.0) -> None:
        """Waits until the agent's close (a webhook) has ended the session.

        The user's next handoff may start only then (one open session each).
        """
        deadline = time.monotonic() + timeout
        delay = 0.01
        while time.monotonic() < deadline:
            current = await self.rpc("GetSession", pb.GetSessionRequest(session_id=session_id))
            if current is None or current.session.state == pb.SESSION_STATE_ENDED:
                return
            await asyncio.sleep(delay)  # polling a condition under a deadline
            delay = min(delay * 2, 0.2)
        self.tally.errors["the agent's close did not end the session in time"] += 1

    async def worker(self, users: list[pb.User], deadline: float, think: float) -> None:
        """Conversations of its own users (one open handoff per user) until the end."""
        while time.monotonic() < deadline:
            self.numbers += 1
            await self.conversation(self.rng.choice(users), self.numbers)
            if think:
                await asyncio.sleep(think)  # pacing, not synchronization

    async def follow(self) -> None:
        """Follows every event; reconnects with its last cursor when a stream ends."""
        cursor = ""
        while not self.stop.is_set():
            call = self.stub.StreamEvents(pb.StreamEventsRequest(after_cursor=cursor))
            try:
                async for event in call:
                    if cursor and int(event.cursor) <= int(cursor):
                        self.tally.errors["stream: a cursor went backwards or repeated"] += 1
                    cursor = event.cursor
                    self.tally.streamed += 1
            except grpc.aio.AioRpcError as exc:
                # A stream ends after HITL_STREAM_MAX_SECONDS (or is cancelled
                # at the end): reconnect. Anything else is an error.
                if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):
                    self.tally.errors[f"stream: {exc.code().name}"] += 1
            self.tally.stream_reconnects += 1

    async def sample(self, pid: int, every: float, into: list[tuple[float, int]]) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            into.append((time.monotonic() - started, rss_bytes(pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), every)


async def register_webhooks(env: dict[str, str], cwd: Path, url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hitl_service",
        "livechat",
        "register-webhooks",
        "--url",
        url,
        env={**os.environ, **env},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"register-webhooks failed:\n{out.decode()}")


async def main(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    run_dir = Path(tempfile.mkdtemp(prefix="hitl-soak-livechat-"))
    seconds = args.minutes * 60
    warmup = min(60.0, seconds * 0.2)
    print(
        f"soak: {args.minutes:g} min, {args.concurrency} conversations at once, logs in {run_dir}"
    )
    fake = await FakeLiveChatProcess().start()
    env = {
        **fake.env,
        "HITL_PROVIDER": "livechat",
        "HITL_GRPC_ADDR": "127.0.0.1:0",
        "HITL_HTTP_ADDR": "127.0.0.1:0",
        "HITL_STORE_URL": f"sqlite:///{run_dir}/soak.db",
        "HITL_DATA_DIR": str(run_dir / "data"),
        "HITL_STREAM_MAX_SECONDS": "60",  # the follower reconnects now and then
        # The fan-out keeps the newest events in memory (and twice as many
        # encoded ones); a smaller buffer fills within the warm-up, so what
        # grows after it is growth, not a cache filling up.
        "HITL_STREAM_BUFFER": str(args.stream_buffer),
    }
    service = ServiceProcess(env, cwd=run_dir, name="soak-service")
    samples: list[tuple[float, int]] = []
    soak: Soak | None = None
    try:
        await service.start()
        assert service.proc is not None
        await register_webhooks(env, run_dir, f"{service.http_base}/webhooks/livechat")
        async with (
            grpc.aio.insecure_channel(service.grpc_target) as channel,
            httpx.AsyncClient(base_url=fake.url, timeout=CALL_TIMEOUT) as control,
        ):
            soak = Soak(pb_grpc.HitlServiceStub(channel), control, fake.url, rng)
            pools: list[list[pb.User]] = []
            for w in range(args.concurrency):
                pool = []
                for u in range(args.users_per_worker):
                    made = await soak.rpc(
                        "CreateUser",
                        pb.CreateUserRequest(
                            name=f"Soak user {w}-{u}",
                            email=f"soak{w}.{u}@example.com",
                            external_id=f"soak-{w}-{u}",
                        ),
                    )
                    if made is not None:
                        pool.append(made.user)
                pools.append(pool)
            deadline = time.monotonic() + seconds
            background = [
                asyncio.create_task(soak.follow()),
                asyncio.create_task(soak.sample(service.proc.pid, args.sample, samples)),
            ]
            await asyncio.gather(
                *(soak.worker(pool, deadline, args.think) for pool in pools if pool)
            )
            samples.append((time.monotonic() - deadline + seconds, rss_bytes(service.proc.pid)))
            soak.stop.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
    finally:
        if service.proc is not None and service.proc.returncode is None:
            await service.terminate()
        await fake.stop()
    assert soak is not None
    return report(args, soak.tally, samples, warmup, run_dir)


def report(
    args: argparse.Namespace,
    tally: Tally,
    samples: list[tuple[float, int]],
    warmup: float,
    run_dir: Path,
) -> int:
    mb = [(t, rss / 2**20) for t, rss in samples]
    steady = [p for p in mb if p[0] >= warmup] or mb
    start = statistics.median(v for _, v in steady[:3])
    end = statistics.median(v for _, v in steady[-3:])
    peak = max(v for _, v in steady)
    growth = (end - start) / start if start else 0.0
    requests = sum(tally.requests.values())
    errors = sum(tally.errors.values())
    result = {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests": requests,
        "requests_by_rpc": dict(tally.requests),
        "agent_actions": tally.agent_actions,
        "conversations": tally.conversations,
        "events_streamed": tally.streamed,
        "stream_reconnects": tally.stream_reconnects,
        "errors": errors,
        "error_kinds": dict(tally.errors.most_common(10)),
        "rss_mb": {
            "first_sample": round(mb[0][1], 1),
            "start_after_warmup": round(start, 1),
            "end": round(end, 1),
            "max_after_warmup": round(peak, 1),
            "max_overall": round(max(v for _, v in mb), 1),
            "slope_mb_per_min": round(slope_per_minute(steady), 3),
            "growth_pct": round(100 * growth, 2),
        },
        "samples": len(samples),
        "rss_samples_mb": [[round(t, 1), round(v, 1)] for t, v in mb],
        "warmup_seconds": warmup,
        "logs": str(run_dir),
    }
    by_rpc = ", ".join(f"{k} {v}" for k, v in sorted(tally.requests.items()))
    print(
        f"requests: {requests} ({by_rpc}); "
        f"agent actions: {tally.agent_actions}; conversations: {tally.conversations}; "
        f"events streamed: {tally.streamed}"
    )
    print(f"errors: {errors}" + (f" {dict(tally.errors.most_common(5))}" if errors else ""))
    rss = result["rss_mb"]
    assert isinstance(rss, dict)
    print(
        f"RSS (MB): first {rss['first_sample']}, after warm-up {rss['start_after_warmup']}, "
        f"end {rss['end']}, max {rss['max_after_warmup']}, slope {rss['slope_mb_per_min']} MB/min, "
        f"growth {rss['growth_pct']} %"
    )
    print(json.dumps(result))
    failed = errors > 0 or growth > args.max_growth
    print("soak: FAILED" if failed else "soak: ok")
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="duration (default 5)")
    parser.add_argument("--concurrency", type=int, default=4, help="conversations at once")
    parser.add_argument("--users-per-worker", type=int, default=5, help="returning users each")
    parser.add_argument("--think", type=float, default=0.05, help="pause between conversations")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth")
    parser.add_argument(
        "--stream-buffer", type=int, default=1024, help="HITL_STREAM_BUFFER of the service"
    )
    parser.add_argument("--seed", type=int, default=1, help="traffic randomness")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
