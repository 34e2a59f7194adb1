"""``python -m bench soak``: RSS of hitl-service under steady mixed load.

For ``--minutes`` (default 5): webhooks at 200 events/s (open loop) fanned
out to 100 open streams, and SendMessage at concurrency 1, on SQLite with
the LiveChat provider on the fake LiveChat (the local provider keeps every
message in memory for its console, which would be the console's growth,
not the service's). RSS is sampled every 5 s; the first minute (20 % of
shorter soaks) is warm-up: the event buffer, caches and SQLite's page
cache fill. The soak passes when every later sample is within ±5 % of
their median and the last is within ±5 % of the first.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.runner import Ctx, Gen, Options, _pick_webhook_provider, _warm_chats, rss_mb
from bench.targets import make_sessions, start_hitl, webhook_spec

SAMPLE_SECONDS = 5.0


async def soak(opts: Options, *, minutes: float) -> dict[str, Any]:
    """Runs the soak; returns samples and the verdict figures."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(tempfile.gettempdir()) / f"hitl-soak-{stamp}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    if opts.generator_cpus:
        os.sched_setaffinity(0, set(opts.generator_cpus))
    ctx = Ctx(opts, run_dir)
    seconds = minutes * 60
    warmup = min(60.0, seconds * 0.2)
    print(f"soak: {minutes:g} min, logs in {run_dir}", flush=True)
    await _pick_webhook_provider(ctx)
    provider = ctx.webhook_provider
    extra = ctx.fake.env if ctx.fake is not None and provider == "livechat" else None
    server = await start_hitl(
        "soak",
        run_dir,
        opts.server_cpus,
        provider=provider,
        store_url=f"sqlite:///{run_dir / 'soak.db'}",
        loop=opts.loop,
        extra=extra,
    )
    gens: list[Gen] = []
    samples: list[tuple[float, float]] = []
    try:
        sessions = await make_sessions(server.grpc_addr, 50, prefix="soak")
        spec = await webhook_spec(provider, sessions, fake=ctx.fake)
        await _warm_chats(server, spec, "soak")
        run = f"soak{uuid.uuid4().hex[:6]}"
        receiver = Gen(
            ctx,
            {
                "kind": "recv",
                "target": server.grpc_addr,
                "streams": 100,
                "channels": 4,
                "run": run,
                "keep": False,
            },
        )
        gens.append(receiver)
        await receiver.start(interactive=True)
        sender = Gen(
            ctx,
            {
                "kind": "send",
                "http": server.http_addr,
                "spec": spec.to_json(),
                "rate": 200,
                "duration": seconds,
                "run": run,
            },
        )
        unary = Gen(
            ctx,
            {
                "kind": "unary",
                "target": server.grpc_addr,
                "method": "SendMessage",
                "concurrency": 1,
                "duration": seconds,
                "warmup": 0,
                "sessions": [s.id for s in sessions],
                "run": run,
                "keep": False,
            },
        )
        gens += [sender, unary]
        began = time.monotonic()
        await sender.start()
        await unary.start()
        while time.monotonic() - began < seconds:
            samples.append((round(time.monotonic() - began, 1), rss_mb(server.pid)))
            print(f"  t={samples[-1][0]:6.1f}s rss={samples[-1][1]:.1f} MB", flush=True)
            await asyncio.sleep(SAMPLE_SECONDS)
        sent = await sender.result(120)
        unary_result = await unary.result(120)
        await receiver.tell({"expect": int(sent["ok"]), "grace": 30.0})
        received = await receiver.result(120)
    finally:
        for gen in gens:
            await gen.kill()
        await server.stop()
        if ctx.fake is not None:
            await ctx.fake.stop()
    steady = [rss for t, rss in samples if t >= warmup]
    median = statistics.median(steady) if steady else float("nan")
    worst = max((abs(v - median) / median * 100 for v in steady), default=float("nan"))
    drift = (steady[-1] - steady[0]) / steady[0] * 100 if len(steady) > 1 else float("nan")
    return {
        "stamp": stamp,
        "minutes": minutes,
        "warmup_s": warmup,
        "provider": provider,
        "samples": samples,
        "steady_median_mb": median,
        "steady_min_mb": min(steady, default=float("nan")),
        "steady_max_mb": max(steady, default=float("nan")),
        "drift_pct": drift,
        "max_deviation_pct": worst,
        "webhooks": {"sent": sent["sent"], "ok": sent["ok"]},
        "stream_deliveries": received["deliveries"],
        "stream_missing": received["missing"],
        "send_message": {"count": unary_result["count"], "errors": unary_result["errors"]},
        "notes": ctx.notes,
    }
