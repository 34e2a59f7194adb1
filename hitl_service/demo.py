"""``hitl-service demo``: a terminal chat through the gRPC API.

Creates a user, starts a handoff, sends lines typed (or given with
``--message``) and prints the agent's side as it arrives, resuming the event
stream from its last cursor if the connection drops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import threading
import uuid
from typing import TYPE_CHECKING, Any, TextIO

import grpc

from hitl_service.client import decode_error
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from hitl_service.config import Settings

_TIMEOUT = 30.0


# Control characters but tab and line feed: what the other side writes must
# not drive the terminal (escape sequences set its title, write the
# clipboard, move the cursor over earlier lines).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def describe(event: pb.Event) -> str:
    """One human line for an event, its control characters shown as escapes."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", _describe(event))


def _describe(event: pb.Event) -> str:
    kind = event.WhichOneof("kind")
    if kind == "started":
        return (
            f"handoff accepted by {event.started.provider} (chat {event.started.external_chat_id})"
        )
    if kind == "queued":
        q = event.queued
        where = f" at position {q.position}" if q.position else ""
        wait = f", about {q.wait_seconds}s" if q.wait_seconds else ""
        return f"waiting for an agent{where}{wait}"
    if kind == "agent_assigned":
        agent = event.agent_assigned.agent
        return f"{agent.name or agent.id} joined"
    if kind == "agent_message":
        m = event.agent_message
        return f"{m.agent.name or m.agent.id}: {describe_message(m.message)}"
    if kind == "transferred":
        t = event.transferred
        to = t.to_agent.name if t.HasField("to_agent") else f"group {t.to_group_id}"
        return f"transferred to {to} ({t.reason or 'no reason given'})"
    if kind == "ended":
        return f"handoff ended: {event.ended.reason} ({pb.EndedBy.Name(event.ended.by)})"
    if kind == "failed":
        return f"handoff failed: {event.failed.code} {event.failed.detail}"
    return "unknown event"


def describe_message(message: pb.Message) -> str:
    """A message body as one line."""
    body = message.WhichOneof("body")
    if body == "media":
        return f"[{pb.MediaKind.Name(message.media.kind)}] {message.media.name} {message.media.url}"
    if body == "location":
        loc = message.location
        return f"[location] {loc.name} ({loc.latitude}, {loc.longitude})"
    if body == "card":
        return f"[card] {message.card.title} {message.card.subtitle}"
    return message.text


async def run_demo(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Runs the demo against ``--target`` (default: the configured address)."""
    target = args.target or settings.grpc_addr
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.HitlServiceStub(channel)
        try:
            user = (
                await stub.CreateUser(
                    pb.CreateUserRequest(name=args.name, external_id=args.user),
                    timeout=_TIMEOUT,
                    metadata=metadata,
                )
            ).user
            session = await _start(stub, user, args, metadata)
        except grpc.aio.AioRpcError as exc:
            out.write(f"demo: {exc.code().name}: {_explained(exc)}\n")
            return 1
        out.write(f"session {session.id} started; type a line and press Enter to send it\n")
        out.flush()
        ended = asyncio.Event()
        follower = asyncio.create_task(_follow(stub, session.id, metadata, out, ended))
        try:
            for line in args.message:
                await _send(stub, session.id, line, metadata, out)
            if args.exit_after_send:
                return 0
            if args.message and not sys.stdin.isatty():
                await ended.wait()
            else:
                return await _read_lines(stub, session.id, metadata, out, ended)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    return 0


async def _start(
    stub: pb_grpc.HitlServiceAsyncStub,
    user: pb.User,
    args: argparse.Namespace,
    metadata: tuple[tuple[str, str], ...],
) -> pb.Session:
    request = pb.StartHitlRequest(
        user_id=user.id,
        title=args.title,
        description="Started from the hitl-service terminal demo.",
        history=[
            pb.Message(text="Hi, I need help with my order.", author=pb.AUTHOR_USER),
            pb.Message(text="Let me get a human for you.", author=pb.AUTHOR_BOT),
        ],
        group_id=args.group,
        request_id=str(uuid.uuid4()),
    )
    try:
        return (await stub.StartHitl(request, timeout=_TIMEOUT, metadata=metadata)).session
    except grpc.aio.AioRpcError as exc:
        if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION or "open session" not in (
            exc.details() or ""
        ):
            raise
        # The demo user still has a handoff open from an earlier run: end it.
        listed = await stub.ListSessions(
            pb.ListSessionsRequest(user_id=user.id), timeout=_TIMEOUT, metadata=metadata
        )
        for old in listed.sessions:
            if old.state not in (pb.SESSION_STATE_ENDED, pb.SESSION_STATE_FAILED):
                await stub.StopHitl(
                    pb.StopHitlRequest(session_id=old.id, reason="demo restarted"),
                    timeout=_TIMEOUT,
                    metadata=metadata,
                )
        request.request_id = str(uuid.uuid4())
        return (await stub.StartHitl(request, timeout=_TIMEOUT, metadata=metadata)).session


def _explained(exc: grpc.aio.AioRpcError) -> str:
    """The error's message, with why each field was refused (the message
    names the fields only; the reasons are in its ``BadRequest`` detail)."""
    violations = decode_error(exc).violations
    reasons = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return f"{exc.details()} ({reasons})" if reasons else str(exc.details())


async def _send(
    stub: pb_grpc.HitlServiceAsyncStub,
    session_id: str,
    text: str,
    metadata: tuple[tuple[str, str], ...],
    out: TextIO,
) -> None:
    request = pb.SendMessageRequest(
        session_id=session_id, message=pb.Message(text=text), request_id=str(uuid.uuid4())
    )
    for _ in range(3):  # same request_id on retry: never sent twice
        try:
            await stub.SendMessage(request, timeout=_TIMEOUT, metadata=metadata)
            out.write(f"you: {text}\n")
            out.flush()
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                out.write(f"not sent: {_explained(exc)}\n")
                return
    out.write("not confirmed yet; it stays queued and will be delivered\n")


def _read_line() -> asyncio.Future[str]:
    """The next line of stdin ("" at its end), read in a daemon thread.

    Not the loop's default executor: ``asyncio.run`` waits for that one's
    threads before it returns, and a thread blocked reading the terminal
    held a Ctrl-C until the next Enter. A daemon thread is let go.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def settle(line: str) -> None:
        if not future.done():
            future.set_result(line)

    def read() -> None:
        line = sys.stdin.readline()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, line)

    threading.Thread(target=read, name="demo-stdin", daemon=True).start()
    return future


async def _read_lines(
    stub: pb_grpc.HitlServiceAsyncStub,
    session_id: str,
    metadata: tuple[tuple[str, str], ...],
    out: TextIO,
    ended: asyncio.Event,
) -> int:
    """Sends typed lines until the handoff ends or input does; the exit status."""
    while not ended.is_set():
        reader = _read_line()
        end = asyncio.ensure_future(ended.wait())
        waiting: set[asyncio.Future[Any]] = {reader, end}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        end.cancel()  # one waiter per line otherwise, all left pending
        if ended.is_set():
            return 0
        line = reader.result()
        if line == "":  # end of input: stop the handoff
            try:
                await stub.StopHitl(
                    pb.StopHitlRequest(session_id=session_id, reason="the user left"),
                    timeout=_TIMEOUT,
                    metadata=metadata,
                )
            except grpc.aio.AioRpcError as exc:  # e.g. the server went away meanwhile
                out.write(f"demo: could not end the handoff: {exc.code().name}: {exc.details()}\n")
                out.flush()
                return 1
            await ended.wait()
            return 0
        if line.strip():
            await _send(stub, session_id, line.rstrip("\n"), metadata, out)
    return 0


async def _follow(
    stub: pb_grpc.HitlServiceAsyncStub,
    session_id: str,
    metadata: tuple[tuple[str, str], ...],
    out: TextIO,
    ended: asyncio.Event,
) -> None:
    cursor = "0"
    while True:
        try:
            stream = stub.StreamEvents(
                pb.StreamEventsRequest(session_id=session_id, after_cursor=cursor),
                metadata=metadata,
            )
            async for event in stream:
                cursor = event.cursor
                out.write(f"  {describe(event)}\n")
                out.flush()
                if event.WhichOneof("kind") in ("ended", "failed"):
                    ended.set()
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                out.write(f"stream: {exc.code().name}: {exc.details()}\n")
                ended.set()
                return
        await asyncio.sleep(0.5)  # reconnect backoff after the server ended the stream
