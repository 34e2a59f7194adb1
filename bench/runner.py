"""Runs the scenarios in interleaved, repeated rounds and records every run.

A round runs each scenario group on every target (the floor, hitl-service
on SQLite, hitl-service on PostgreSQL when available); the order of the
targets rotates from round to round so slow drifts of a noisy machine do
not always favour the same one. Servers are fresh processes per group and
round, with a fresh database.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.httpclient import HttpConnection
from bench.payloads import BodyMaker, WebhookSpec
from bench.targets import (
    FakeLiveChatProc,
    Postgres,
    ServerProc,
    floor_webhook_spec,
    free_port,
    hitl_command,
    make_sessions,
    start_fake_livechat,
    start_floor,
    start_hitl,
    webhook_spec,
)

GROUPS = ("unary", "webhook", "xreplica", "startup", "memory")
UNARY_CASES = (("SendMessage", 1), ("SendMessage", 16), ("GetSession", 1), ("GetSession", 16))


@dataclass
class Options:
    """Everything a run can be told (``python -m bench --help``)."""

    rounds: int = 3
    duration: float = 2.5
    warmup: float = 0.5
    groups: tuple[str, ...] = GROUPS
    postgres: bool = True
    webhook_provider: str = "auto"
    server_cpus: tuple[int, ...] = (0,)
    generator_cpus: tuple[int, ...] = (1,)
    loop: str = "auto"
    ingest_concurrency: int = 16
    stream_rates: tuple[int, ...] = (100, 500)
    fanout_streams: int = 1000
    fanout_rate: int = 10
    memory_sessions: int = 10_000
    memory_streams: int = 1000
    startup_samples: int = 3
    out: Path = Path("bench/results")
    quick: bool = False


@dataclass
class Ctx:
    """State shared by the scenarios of one run."""

    opts: Options
    run_dir: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fake: FakeLiveChatProc | None = None
    pg: Postgres | None = None
    webhook_provider: str = "livechat"

    def record(
        self,
        rnd: int,
        scenario: str,
        target: str,
        figures: dict[str, float],
        raw: dict[str, Any],
        lat: dict[str, Any] | None = None,
    ) -> None:
        """Keeps one measurement (``lat``: its latency percentiles, for the plot)."""
        self.runs.append(
            {
                "round": rnd,
                "scenario": scenario,
                "target": target,
                "figures": figures,
                "lat": lat or {},
                "raw": raw,
            }
        )
        shown = ", ".join(f"{k}={v:.3f}" for k, v in figures.items())
        print(f"  [round {rnd}] {scenario:<34} {target:<9} {shown}", flush=True)


# --- generators ----------------------------------------------------------------------


class Gen:
    """One load-generator process (``bench.loadgen``)."""

    def __init__(self, ctx: Ctx, spec: dict[str, Any]) -> None:
        self._ctx = ctx
        self._spec = {**spec, "cpus": list(ctx.opts.generator_cpus)}
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, *, interactive: bool = False, timeout: float = 180.0) -> None:
        """Spawns it; an interactive one is awaited until it says ready."""
        log = (self._ctx.run_dir / "generators.log").open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.loadgen",
                json.dumps(self._spec),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        finally:
            log.close()
        if interactive:
            line = await self._line(timeout)
            if not line.get("ready"):
                raise RuntimeError(f"generator {self._spec['kind']} did not get ready: {line}")

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None
        assert self._proc.stdout is not None
        raw = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        if not raw:
            await self._proc.wait()
            raise RuntimeError(
                f"generator {self._spec['kind']} exited ({self._proc.returncode}); "
                f"see {self._ctx.run_dir / 'generators.log'}"
            )
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}

    async def tell(self, order: dict[str, Any]) -> None:
        """Writes one line to an interactive generator."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(order) + "\n").encode())
        await self._proc.stdin.drain()

    async def result(self, timeout: float = 300.0) -> dict[str, Any]:
        """The generator's result (waits for it to exit)."""
        line = await self._line(timeout)
        assert self._proc is not None
        await self._proc.wait()
        result = line.get("result")
        if not isinstance(result, dict):
            raise RuntimeError(f"generator {self._spec['kind']} answered {line}")
        return result

    async def kill(self) -> None:
        """Ends it if still running."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()


async def run_gen(ctx: Ctx, spec: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Runs a one-shot generator to completion."""
    gen = Gen(ctx, spec)
    await gen.start()
    try:
        return await gen.result(timeout)
    finally:
        await gen.kill()


def _lat(result: dict[str, Any], key: str = "lat") -> dict[str, float]:
    lat = result.get(key, {})
    return {
        "p50_ms": float(lat.get("p50_ms", float("nan"))),
        "p99_ms": float(lat.get("p99_ms", float("nan"))),
    }


def _rotate(items: Sequence[str], rnd: int) -> list[str]:
    shift = rnd % len(items) if items else 0
    return list(items[shift:]) + list(items[:shift])


def _targets(ctx: Ctx) -> list[str]:
    names = ["floor", "sqlite"]
    if ctx.pg is not None:
        names.append("postgres")
    return names


def _store_url(ctx: Ctx, target: str, tag: str) -> str:
    if target == "postgres":
        assert ctx.pg is not None
        return ctx.pg.new_database()
    path = ctx.run_dir / f"{tag}.db"
    return f"sqlite:///{path}"


# --- unary ---------------------------------------------------------------------------


async def unary_group(ctx: Ctx, rnd: int) -> None:
    """SendMessage and GetSession at concurrency 1 and 16, on every target."""
    opts = ctx.opts
    for target in _rotate(_targets(ctx), rnd):
        tag = f"unary-{target}-r{rnd}"
        if target == "floor":
            server = await start_floor(ctx.run_dir, opts.server_cpus, opts.loop)
            session_ids = [f"ses_{n:024d}" for n in range(16)]
        else:
            server = await start_hitl(
                tag,
                ctx.run_dir,
                opts.server_cpus,
                provider="local",
                store_url=_store_url(ctx, target, tag),
                loop=opts.loop,
            )
            session_ids = [s.id for s in await make_sessions(server.grpc_addr, 16, prefix=tag)]
        try:
            for method, concurrency in UNARY_CASES:
                if method == "SendMessage" and target != "floor":
                    # Fresh sessions per case: the local console keeps every
                    # message of a session and scans them for the request id.
                    made = await make_sessions(server.grpc_addr, 16, prefix=f"{tag}-{concurrency}")
                    session_ids = [s.id for s in made]
                result = await run_gen(
                    ctx,
                    {
                        "kind": "unary",
                        "target": server.grpc_addr,
                        "method": method,
                        "concurrency": concurrency,
                        "duration": opts.duration,
                        "warmup": opts.warmup,
                        "sessions": session_ids,
                        "run": f"{tag}-{method}-{concurrency}-{uuid.uuid4().hex[:6]}",
                    },
                )
                figures = {"rps": float(result["rps"]), **_lat(result)}
                if result["errors"]:
                    ctx.notes.append(f"{tag} {method} c={concurrency}: errors {result['errors']}")
                ctx.record(rnd, f"{method} c={concurrency}", target, figures, result, result["lat"])
        finally:
            await server.stop()
            _check_log(ctx, server)


def _check_log(ctx: Ctx, server: ServerProc) -> None:
    errors = server.errors_logged()
    if errors:
        ctx.notes.append(f"{server.name}: {errors} error lines in {server.log_path}")


# --- webhooks --------------------------------------------------------------------------


async def _webhook_server(ctx: Ctx, target: str, tag: str) -> tuple[ServerProc, WebhookSpec]:
    opts = ctx.opts
    if target == "floor":
        server = await start_floor(ctx.run_dir, opts.server_cpus, opts.loop)
        return server, floor_webhook_spec(16, ctx.webhook_provider)
    server = await start_hitl(
        tag,
        ctx.run_dir,
        opts.server_cpus,
        provider=ctx.webhook_provider,
        store_url=_store_url(ctx, target, tag),
        loop=opts.loop,
        extra=ctx.fake.env if ctx.fake is not None and ctx.webhook_provider == "livechat" else None,
    )
    sessions = await make_sessions(server.grpc_addr, 16, prefix=tag)
    spec = await webhook_spec(ctx.webhook_provider, sessions, fake=ctx.fake)
    await _warm_chats(server, spec, tag)
    return server, spec


async def _warm_chats(server: ServerProc, spec: WebhookSpec, tag: str) -> None:
    """One event per chat first: the first agent message also assigns the agent."""
    maker = BodyMaker(spec, f"{tag}warm")
    conn = HttpConnection("127.0.0.1", server.http_port)
    try:
        for n in range(len(spec.chats)):
            status, body = await conn.post(spec.path, maker.body(n, time.monotonic_ns()))
            if status != 200:
                raise RuntimeError(f"warm-up webhook answered {status}: {body[:200]!r}")
    finally:
        await conn.close()


async def _stream_run(
    ctx: Ctx,
    *,
    stream_target: str,
    http_addr: str,
    spec: WebhookSpec,
    rate: int,
    streams: int,
    channels: int,
    run: str,
) -> dict[str, Any]:
    """Open-loop webhooks to ``http_addr``; latency at ``streams`` stream clients."""
    receiver = Gen(
        ctx,
        {
            "kind": "recv",
            "target": stream_target,
            "streams": streams,
            "channels": channels,
            "run": run,
        },
    )
    await receiver.start(interactive=True)
    try:
        sent = await run_gen(
            ctx,
            {
                "kind": "send",
                "http": http_addr,
                "spec": spec.to_json(),
                "rate": rate,
                "duration": ctx.opts.duration,
                "run": run,
            },
        )
        await receiver.tell({"expect": int(sent["ok"]), "grace": 15.0})
        received = await receiver.result()
    finally:
        await receiver.kill()
    return {"send": sent, "recv": received}


async def webhook_group(ctx: Ctx, rnd: int) -> None:
    """Ingest throughput, webhook→stream latency, fan-out to many streams."""
    opts = ctx.opts
    for target in _rotate(_targets(ctx), rnd):
        tag = f"webhook-{target}-r{rnd}"
        server, spec = await _webhook_server(ctx, target, tag)
        try:
            # Ingest: closed loop, one stream following everything (fan-out).
            run = f"i{rnd}{target[:2]}{uuid.uuid4().hex[:6]}"
            receiver = Gen(
                ctx, {"kind": "recv", "target": server.grpc_addr, "streams": 1, "run": run}
            )
            await receiver.start(interactive=True)
            try:
                result = await run_gen(
                    ctx,
                    {
                        "kind": "ingest",
                        "http": server.http_addr,
                        "spec": spec.to_json(),
                        "concurrency": opts.ingest_concurrency,
                        "duration": opts.duration,
                        "warmup": opts.warmup,
                        "run": run,
                    },
                )
                await receiver.tell({"expect": int(result["ok"]), "grace": 30.0})
                received = await receiver.result()
            finally:
                await receiver.kill()
            if received["missing"]:
                ctx.notes.append(f"{tag} ingest: {received['missing']} events not streamed")
            bad = {k: v for k, v in result["statuses"].items() if k != "200"}
            if bad:
                ctx.notes.append(f"{tag} ingest: non-200 answers {bad}")
            ctx.record(
                rnd,
                f"webhook ingest c={opts.ingest_concurrency}",
                target,
                {
                    "rps": float(result["rps"]),
                    **_lat(result),
                    "missing": float(received["missing"]),
                },
                {"ingest": result, "recv": received},
                result["lat"],
            )
            for rate in opts.stream_rates:
                await _stream_case(
                    ctx,
                    rnd,
                    f"webhook→stream {rate}/s",
                    target,
                    f"{tag} {rate}/s",
                    stream_target=server.grpc_addr,
                    http_addr=server.http_addr,
                    spec=spec,
                    rate=rate,
                    streams=1,
                    channels=1,
                    run=f"s{rnd}{target[:2]}{rate}{uuid.uuid4().hex[:6]}",
                )
            await _stream_case(
                ctx,
                rnd,
                f"fan-out {opts.fanout_streams} streams {opts.fanout_rate}/s",
                target,
                f"{tag} fan-out",
                stream_target=server.grpc_addr,
                http_addr=server.http_addr,
                spec=spec,
                rate=opts.fanout_rate,
                streams=opts.fanout_streams,
                channels=max(1, opts.fanout_streams // 100),
                run=f"f{rnd}{target[:2]}{uuid.uuid4().hex[:6]}",
            )
        finally:
            await server.stop()
            _check_log(ctx, server)


async def _stream_case(
    ctx: Ctx, rnd: int, scenario: str, target: str, note: str, **run: Any
) -> None:
    """One webhook → stream run (``_stream_run`` arguments), noted and recorded."""
    out = await _stream_run(ctx, **run)
    _stream_notes(ctx, note, out)
    ctx.record(rnd, scenario, target, _lat(out["recv"]), out, out["recv"]["lat"])


def _stream_notes(ctx: Ctx, what: str, out: dict[str, Any]) -> None:
    sent, received = out["send"], out["recv"]
    if sent["ok"] != sent["sent"]:
        ctx.notes.append(
            f"{what}: {sent['sent'] - sent['ok']} webhooks not answered 200 ({sent['statuses']})"
        )
    if received["missing"]:
        ctx.notes.append(f"{what}: {received['missing']} deliveries missing")


# --- cross-replica (PostgreSQL) ----------------------------------------------------------


async def xreplica_group(ctx: Ctx, rnd: int) -> None:
    """Webhooks to replica A, streams on replica B, both on one PostgreSQL database."""
    if ctx.pg is None:
        return
    opts = ctx.opts
    tag = f"xrep-r{rnd}"
    url = ctx.pg.new_database()
    extra = ctx.fake.env if ctx.fake is not None and ctx.webhook_provider == "livechat" else None
    a = await start_hitl(
        f"{tag}-a",
        ctx.run_dir,
        opts.server_cpus,
        provider=ctx.webhook_provider,
        store_url=url,
        loop=opts.loop,
        extra=extra,
    )
    b = await start_hitl(
        f"{tag}-b",
        ctx.run_dir,
        opts.server_cpus,
        provider=ctx.webhook_provider,
        store_url=url,
        loop=opts.loop,
        extra=extra,
    )
    try:
        sessions = await make_sessions(a.grpc_addr, 16, prefix=tag)
        spec = await webhook_spec(ctx.webhook_provider, sessions, fake=ctx.fake)
        await _warm_chats(a, spec, tag)
        for rate in opts.stream_rates:
            await _stream_case(
                ctx,
                rnd,
                f"cross-replica {rate}/s",
                "postgres",
                f"{tag} {rate}/s",
                stream_target=b.grpc_addr,
                http_addr=a.http_addr,
                spec=spec,
                rate=rate,
                streams=1,
                channels=1,
                run=f"x{rnd}{rate}{uuid.uuid4().hex[:6]}",
            )
    finally:
        await a.stop()
        await b.stop()
        _check_log(ctx, a)
        _check_log(ctx, b)


# --- start-up ------------------------------------------------------------------------------


async def startup_group(ctx: Ctx, rnd: int) -> None:
    """Process start → gRPC health SERVING, with a fresh database each time."""
    opts = ctx.opts
    for target in _rotate(_targets(ctx), rnd):
        samples: list[float] = []
        for n in range(opts.startup_samples):
            tag = f"start-{target}-r{rnd}-{n}"
            grpc_addr = f"127.0.0.1:{free_port()}"
            prober = Gen(ctx, {"kind": "probe", "target": grpc_addr, "timeout": 30})
            await prober.start(interactive=True)
            started = time.monotonic_ns()
            server: ServerProc
            if target == "floor":
                from bench.targets import spawn

                http_addr = f"127.0.0.1:{free_port()}"
                await prober.tell({"go": True})
                server = await spawn(
                    tag,
                    [
                        sys.executable,
                        "-m",
                        "bench.floor",
                        "--grpc-addr",
                        grpc_addr,
                        "--http-addr",
                        http_addr,
                    ],
                    env={**os.environ, "HITL_EVENT_LOOP": opts.loop},
                    log_path=ctx.run_dir / f"{tag}.log",
                    cpus=opts.server_cpus,
                    grpc_addr=grpc_addr,
                    http_addr=http_addr,
                )
            else:
                store_url = _store_url(ctx, target, tag)
                await prober.tell({"go": True})
                server = await start_hitl(
                    tag,
                    ctx.run_dir,
                    opts.server_cpus,
                    provider="local",
                    store_url=store_url,
                    loop=opts.loop,
                    extra={"HITL_GRPC_ADDR": grpc_addr},
                    wait=False,
                )
            try:
                result = await prober.result(60)
            finally:
                await prober.kill()
                await server.stop()
            if result["serving_ns"] is None:
                ctx.notes.append(f"{tag}: never SERVING")
                continue
            samples.append((int(result["serving_ns"]) - started) / 1e6)
        if samples:
            samples.sort()
            ctx.record(
                rnd,
                "start-up to SERVING",
                target,
                {"ms": samples[len(samples) // 2]},
                {"samples_ms": samples},
            )


# --- memory ---------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB (10^6 bytes)."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 1e6


async def memory_group(ctx: Ctx, rnd: int) -> None:
    """RSS with many sessions and open streams (floor: the same streams)."""
    opts = ctx.opts
    for target in ["floor", "sqlite"]:
        tag = f"memory-{target}-r{rnd}"
        if target == "floor":
            server = await start_floor(ctx.run_dir, opts.server_cpus, opts.loop)
            sessions = 0
        else:
            server = await start_hitl(
                tag,
                ctx.run_dir,
                opts.server_cpus,
                provider="local",
                store_url=_store_url(ctx, target, tag),
                loop=opts.loop,
            )
            began = time.monotonic()
            made = await make_sessions(
                server.grpc_addr, opts.memory_sessions, prefix=tag, concurrency=32
            )
            sessions = len(made)
            ctx.notes.append(
                f"{tag}: {sessions} sessions created in {time.monotonic() - began:.1f}s"
            )
        try:
            idle = rss_mb(server.pid)
            run = f"m{rnd}{uuid.uuid4().hex[:6]}"
            receiver = Gen(
                ctx,
                {
                    "kind": "recv",
                    "target": server.grpc_addr,
                    "streams": opts.memory_streams,
                    "channels": max(1, opts.memory_streams // 100),
                    "run": run,
                },
            )
            await receiver.start(interactive=True)
            try:
                if target == "sqlite":
                    await _console_replies(server, made[0].external_chat_id, run, 20)
                with_streams = rss_mb(server.pid)
                await receiver.tell({"expect": 20 if target == "sqlite" else 0, "grace": 20.0})
                received = await receiver.result()
            finally:
                await receiver.kill()
            after = rss_mb(server.pid)
            ctx.record(
                rnd,
                f"RSS {opts.memory_sessions // 1000}k sessions + {opts.memory_streams} streams",
                target,
                {"rss_mb": max(with_streams, after)},
                {
                    "sessions": sessions,
                    "idle_mb": idle,
                    "with_streams_mb": with_streams,
                    "after_mb": after,
                    "recv": received,
                },
            )
        finally:
            await server.stop()
            _check_log(ctx, server)


async def _console_replies(server: ServerProc, chat_id: str, run: str, count: int) -> None:
    """An agent takes one conversation and replies ``count`` times (fan-out)."""
    async with httpx.AsyncClient(base_url=f"http://{server.http_addr}", timeout=30) as client:
        answer = await client.post(
            f"/console/api/conversations/{chat_id}/take", json={"agent": "Bench"}
        )
        answer.raise_for_status()
        for n in range(count):
            text = f"bench {run} {n} {time.monotonic_ns()}"
            answer = await client.post(
                f"/console/api/conversations/{chat_id}/reply", json={"agent": "Bench", "text": text}
            )
            answer.raise_for_status()


# --- the whole run -----------------------------------------------------------------------------


GROUP_FUNCS = {
    "unary": unary_group,
    "webhook": webhook_group,
    "xreplica": xreplica_group,
    "startup": startup_group,
}


async def _pick_webhook_provider(ctx: Ctx) -> None:
    wanted = ctx.opts.webhook_provider
    if wanted == "scripted":
        ctx.webhook_provider = "scripted"
        return
    try:
        ctx.fake = await start_fake_livechat(ctx.run_dir, ctx.opts.generator_cpus)
        # A smoke test: the LiveChat provider starts a chat on the fake.
        probe_dir = ctx.run_dir / "livechat-check"
        probe_dir.mkdir(exist_ok=True)
        server = await start_hitl(
            "livechat-check",
            probe_dir,
            ctx.opts.server_cpus,
            provider="livechat",
            store_url=f"sqlite:///{probe_dir / 'check.db'}",
            loop=ctx.opts.loop,
            extra=ctx.fake.env,
        )
        try:
            sessions = await make_sessions(server.grpc_addr, 1, prefix="check")
            spec = await webhook_spec("livechat", sessions, fake=ctx.fake)
            await _warm_chats(server, spec, "check")
        finally:
            await server.stop()
        ctx.webhook_provider = "livechat"
    except Exception as exc:
        if wanted == "livechat":
            raise
        if ctx.fake is not None:
            await ctx.fake.stop()
            ctx.fake = None
        ctx.webhook_provider = "scripted"
        ctx.notes.append(
            f"LiveChat provider or fake not usable ({exc!r}); webhooks measured through the "
            "scripted provider's JSON format instead"
        )


async def run(opts: Options) -> dict[str, Any]:
    """Runs every selected group for ``opts.rounds`` rounds; returns the raw results."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(tempfile.gettempdir()) / f"hitl-bench-{stamp}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    ctx = Ctx(opts, run_dir)
    if opts.generator_cpus:
        os.sched_setaffinity(0, set(opts.generator_cpus))
    began = time.monotonic()
    print(f"hitl-service bench: {opts.rounds} round(s), logs in {run_dir}", flush=True)
    if opts.postgres and {"unary", "webhook", "xreplica", "startup"} & set(opts.groups):
        try:
            ctx.pg = await asyncio.to_thread(Postgres.start)
        except Exception as exc:
            ctx.notes.append(f"PostgreSQL not measured: {exc!r}")
        if ctx.pg is None and not any("PostgreSQL" in n for n in ctx.notes):
            ctx.notes.append("PostgreSQL not measured: no server binaries (initdb, pg_ctl)")
    try:
        if {"webhook", "xreplica"} & set(opts.groups):
            await _pick_webhook_provider(ctx)
        for rnd in range(1, opts.rounds + 1):
            print(f"round {rnd}/{opts.rounds}", flush=True)
            for group in opts.groups:
                func = GROUP_FUNCS.get(group)
                if func is not None:
                    await func(ctx, rnd)
        if "memory" in opts.groups:
            print("memory", flush=True)
            await memory_group(ctx, 1)
    finally:
        if ctx.fake is not None:
            await ctx.fake.stop()
        if ctx.pg is not None:
            await asyncio.to_thread(ctx.pg.close, run_dir / "postgres.log")
    return {
        "meta": _meta(ctx, stamp, time.monotonic() - began),
        "runs": ctx.runs,
        "notes": ctx.notes,
    }


def _meta(ctx: Ctx, stamp: str, seconds: float) -> dict[str, Any]:
    import platform

    import grpc

    opts = ctx.opts
    loop = opts.loop
    if loop == "auto":
        try:
            import uvloop  # noqa: F401

            loop = "auto (uvloop)"
        except ImportError:
            loop = "auto (asyncio)"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    return {
        "stamp": stamp,
        "seconds": round(seconds, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_model()}",
        "server_cpus": list(opts.server_cpus),
        "generator_cpus": list(opts.generator_cpus),
        "event_loop": loop,
        "uvicorn_http": http,
        "rounds": opts.rounds,
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "webhook_provider": ctx.webhook_provider,
        "postgres": ctx.pg is not None,
        "fanout_rate": opts.fanout_rate,
        "fanout_streams": opts.fanout_streams,
        "ingest_concurrency": opts.ingest_concurrency,
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "hitl_command": " ".join(hitl_command()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
