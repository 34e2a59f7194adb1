"""Load generators: each runs in its own process, pinned to the generator CPUs.

``python -m bench.loadgen '<json spec>'`` runs one generator and prints one
JSON line with its result. Generators that must start before the load does
(stream receivers, the start-up prober) print ``{"ready": true}`` first and
wait for one line on stdin (a JSON object) before they go on.

Kinds (``spec["kind"]``):

- ``unary``: closed loop, ``concurrency`` workers on one channel calling
  SendMessage (each worker on its own session) or GetSession.
- ``ingest``: closed loop, ``concurrency`` keep-alive HTTP connections
  posting unique webhook bodies as fast as answers come.
- ``send``: open loop, webhook bodies at ``rate`` per second on a schedule
  that does not wait for answers; each body is stamped with its scheduled
  send time.
- ``recv``: ``streams`` StreamEvents calls over ``channels`` channels; the
  latency of every delivery of a stamped event (receipt − scheduled send).
- ``probe``: after "go", polls gRPC health until SERVING; prints when.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.httpclient import HttpConnection, HttpError, HttpPool
from bench.payloads import MARK, BodyMaker, WebhookSpec
from bench.stats import latency_summary
from hitl_service.cli import loop_factory
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb

SERVICE = "/hitl.v1.HitlService/"
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    # Streams on one channel share one HTTP/2 connection: allow many.
    ("grpc.http2.max_pings_without_data", 0),
)


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def _read_line() -> dict[str, Any]:
    line = await asyncio.to_thread(sys.stdin.readline)
    data = json.loads(line) if line.strip() else {}
    return data if isinstance(data, dict) else {}


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


# --- unary -----------------------------------------------------------------------


async def unary(spec: dict[str, Any]) -> dict[str, Any]:
    method: str = spec["method"]
    concurrency = int(spec["concurrency"])
    warmup, duration = float(spec["warmup"]), float(spec["duration"])
    sessions: list[str] = spec["sessions"]
    run: str = spec["run"]
    request_type: Any
    response_type: Any
    if method == "SendMessage":
        request_type, response_type = pb.SendMessageRequest, pb.SendMessageResponse
    else:
        request_type, response_type = pb.GetSessionRequest, pb.GetSessionResponse
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    keep = bool(spec.get("keep", True))  # False: count calls only (long soaks)
    done = [0]
    async with grpc.aio.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(
            SERVICE + method,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        await asyncio.wait_for(channel.channel_ready(), 10)
        start = time.monotonic_ns()
        measure_from = start + int(warmup * 1e9)
        measure_to = measure_from + int(duration * 1e9)

        async def worker(index: int) -> None:
            n = 0
            while True:
                # Worker i takes sessions i, i+c, i+2c ... in turn: no two
                # workers ever share a session (its sends are delivered in order).
                session_id = sessions[(index + n * concurrency) % len(sessions)]
                n += 1
                if method == "SendMessage":
                    request: Any = pb.SendMessageRequest(
                        session_id=session_id,
                        message=pb.Message(text=f"hello from worker {index}, message {n}"),
                        request_id=f"{run}-{index}-{n}",
                    )
                else:
                    request = pb.GetSessionRequest(session_id=session_id)
                before = time.monotonic_ns()
                if before >= measure_to:
                    return
                try:
                    await call(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    if before >= measure_from:
                        errors[exc.code().name] += 1
                    continue
                if before >= measure_from:
                    done[0] += 1
                    if keep:
                        latencies.append(time.monotonic_ns() - before)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {
        "count": done[0],
        "seconds": duration,
        "rps": done[0] / duration,
        "lat": latency_summary(latencies),
        "errors": dict(errors),
    }


# --- webhooks ------------------------------------------------------------------------


async def ingest(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = _split(spec["http"])
    hook = WebhookSpec.from_json(spec["spec"])
    maker = BodyMaker(hook, spec["run"])
    concurrency = int(spec["concurrency"])
    warmup, duration = float(spec["warmup"]), float(spec["duration"])
    statuses: Counter[int] = Counter()
    latencies: list[int] = []
    sent = ok = 0
    counter = iter(range(10**12))
    start = time.monotonic_ns()
    measure_from = start + int(warmup * 1e9)
    measure_to = measure_from + int(duration * 1e9)

    async def worker() -> None:
        nonlocal sent, ok
        conn = HttpConnection(host, port)
        try:
            while True:
                before = time.monotonic_ns()
                if before >= measure_to:
                    return
                body = maker.body(next(counter), before)
                try:
                    status, _ = await conn.post(hook.path, body)
                except HttpError:
                    status = 599
                sent += 1
                ok += status == 200
                if before >= measure_from:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(time.monotonic_ns() - before)
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "sent": sent,
        "ok": ok,
        "count": len(latencies),
        "seconds": duration,
        "rps": len(latencies) / duration,
        "lat": latency_summary(latencies),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


async def send(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = _split(spec["http"])
    hook = WebhookSpec.from_json(spec["spec"])
    maker = BodyMaker(hook, spec["run"])
    rate, duration = float(spec["rate"]), float(spec["duration"])
    total = int(rate * duration)
    pool = HttpPool(host, port)
    statuses: Counter[int] = Counter()
    answers: list[int] = []
    lags: list[int] = []
    tasks: set[asyncio.Task[None]] = set()
    period_ns = int(1e9 / rate)

    async def one(n: int, scheduled: int) -> None:
        try:
            status, _ = await pool.post(hook.path, maker.body(n, scheduled))
        except HttpError:
            status = 599
        statuses[status] += 1
        answers.append(time.monotonic_ns() - scheduled)

    start = time.monotonic_ns() + 20_000_000
    for n in range(total):
        scheduled = start + n * period_ns
        delay = scheduled - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        lags.append(max(0, time.monotonic_ns() - scheduled))
        task = asyncio.create_task(one(n, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    await pool.close()
    return {
        "sent": total,
        "ok": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in statuses.items()},
        "answer": latency_summary(answers),
        "send_lag": latency_summary(lags),
        "connections": pool.opened,
    }


async def recv(spec: dict[str, Any]) -> dict[str, Any]:
    streams, channels = int(spec["streams"]), max(1, int(spec.get("channels", 1)))
    run: str = spec["run"]
    session_id: str = spec.get("session_id", "")
    latencies: list[int] = []
    per_stream = [0] * streams
    opened = [
        grpc.aio.insecure_channel(spec["target"], options=CHANNEL_OPTIONS) for _ in range(channels)
    ]
    calls = []
    for i in range(streams):
        # No deserializer: events arrive as bytes and only the marker is
        # parsed out of them (a receiver with 1000 streams must stay cheap:
        # its own cost per message is part of what it measures).
        call: Any = opened[i % channels].unary_stream(
            SERVICE + "StreamEvents",
            request_serializer=pb.StreamEventsRequest.SerializeToString,
        )(pb.StreamEventsRequest(session_id=session_id, after_cursor=""))
        calls.append(call)
    # Initial metadata means the subscription is registered: nothing later is missed.
    await asyncio.wait_for(asyncio.gather(*(c.initial_metadata() for c in calls)), 120)
    done = asyncio.Event()
    expect = [-1]
    prefix = f"{MARK} {run} ".encode()
    keep = bool(spec.get("keep", True))  # False: count deliveries only (long soaks)
    delivered = [0]

    def complete() -> bool:
        return expect[0] >= 0 and all(n >= expect[0] for n in per_stream)

    async def follow(index: int, call: Any) -> None:
        try:
            async for raw in call:
                now = time.monotonic_ns()
                sent_ns = mark_ns(raw, prefix)
                if sent_ns is None:
                    continue
                if keep:
                    latencies.append(now - sent_ns)
                delivered[0] += 1
                per_stream[index] += 1
                if expect[0] >= 0 and per_stream[index] >= expect[0] and complete():
                    done.set()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise

    tasks = [asyncio.create_task(follow(i, c)) for i, c in enumerate(calls)]
    _emit({"ready": True})
    order = await _read_line()
    expect[0] = int(order.get("expect", 0))
    if complete():
        done.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), float(order.get("grace", 10.0)))
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in opened:
        await channel.close()
    expected_total = expect[0] * streams
    return {
        "streams": streams,
        "deliveries": delivered[0],
        "expected": expected_total,
        "missing": max(0, expected_total - sum(min(n, expect[0]) for n in per_stream)),
        "lat": latency_summary(latencies),
    }


def mark_ns(raw: bytes, prefix: bytes) -> int | None:
    """The send stamp of a serialized ``pb.Event`` whose text starts with ``prefix``.

    Cheaper than decoding the event: the text is a length-delimited field,
    so its length is the byte just before it (texts here are < 128 bytes).
    """
    at = raw.find(prefix)
    if at <= 0 or raw[at - 1] >= 0x80:
        return None
    text = raw[at : at + raw[at - 1]]
    return int(text.rsplit(b" ", 1)[1])


async def probe(spec: dict[str, Any]) -> dict[str, Any]:
    options = (
        ("grpc.initial_reconnect_backoff_ms", 2),
        ("grpc.min_reconnect_backoff_ms", 2),
        ("grpc.max_reconnect_backoff_ms", 2),
    )
    async with grpc.aio.insecure_channel(spec["target"], options=options) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs declare no methods
        check = health.Check
        _emit({"ready": True})
        await _read_line()
        deadline = time.monotonic() + float(spec.get("timeout", 30))
        while time.monotonic() < deadline:
            try:
                answer = await check(
                    health_pb2.HealthCheckRequest(service=spec.get("service", "")),
                    timeout=1.0,
                    wait_for_ready=True,
                )
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.001)
                continue
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return {"serving_ns": time.monotonic_ns()}
            await asyncio.sleep(0.001)
    return {"serving_ns": None}


KINDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unary": unary,
    "ingest": ingest,
    "send": send,
    "recv": recv,
    "probe": probe,
}


def main() -> None:
    """Entry point: ``python -m bench.loadgen '<json spec>'``."""
    spec = json.loads(sys.argv[1])
    cpus = spec.get("cpus")
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    # The generators' own cost is part of what they measure: uvloop if installed.
    factory = loop_factory("auto")
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(KINDS[spec["kind"]](spec))
    _emit({"result": result})


if __name__ == "__main__":
    main()
