"""A full handoff through hitl.v1.HitlService with ``hitl_service.client``.

Creates a user, starts a handoff with the bot transcript, sends a message,
then follows the session's events until the handoff ends. The event
iterator reconnects and resumes from its last cursor by itself, so a service
restart in the middle loses nothing.

    .venv/bin/python examples/python/handoff.py --target 127.0.0.1:50051

Then take, answer and end the handoff in the agent console
(http://127.0.0.1:8080/console with the local provider).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from hitl_service.client import FailedPreconditionError, HitlClient, HitlRpcError
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb


def describe(event: pb.Event) -> str:
    """One line for an event."""
    kind = event.WhichOneof("kind")
    if kind == "started":
        s = event.started
        return f"provider {s.provider}, chat {s.external_chat_id}, group {s.group_id}"
    if kind == "queued":
        q = event.queued
        return f"position {q.position or '?'}" + (
            f", about {q.wait_seconds}s" if q.wait_seconds else ""
        )
    if kind == "agent_assigned":
        return event.agent_assigned.agent.name or event.agent_assigned.agent.id
    if kind == "agent_message":
        m = event.agent_message
        body = m.message.text if m.message.WhichOneof("body") == "text" else "[rich message]"
        return f"{m.agent.name or m.agent.id}: {body}"
    if kind == "transferred":
        t = event.transferred
        to = t.to_agent.name if t.HasField("to_agent") else f"group {t.to_group_id}"
        return f"to {to} ({t.reason})"
    if kind == "ended":
        by = pb.EndedBy.Name(event.ended.by).removeprefix("ENDED_BY_")
        return f"by {by} ({event.ended.reason})"
    if kind == "failed":
        return f"{event.failed.code}: {event.failed.detail}"
    return ""


async def handoff(args: argparse.Namespace) -> int:
    async with HitlClient(args.target, token=args.token or None) as hitl:
        user = await hitl.create_user(args.name, external_id=args.user)
        print(f"user {user.id} ({user.name})")

        async def start() -> pb.Session:
            # The client makes up a request_id and repeats it on every retry.
            return await hitl.start_hitl(
                user.id,
                title=args.title,
                description="Started from examples/python/handoff.py",
                history=[
                    pb.Message(text="Hi, I need help with my order.", author=pb.AUTHOR_USER),
                    pb.Message(text="Let me get a human for you.", author=pb.AUTHOR_BOT),
                ],
                metadata={"source": "python-example"},
            )

        try:
            session = await start()
        except FailedPreconditionError as exc:
            if exc.reason != "SESSION_ALREADY_OPEN":
                raise
            # A handoff from an earlier run is still open: end it, start again.
            old = exc.metadata["session_id"]
            print(f"ending the handoff left open by an earlier run ({old})")
            await hitl.stop_hitl(old, "example restarted")
            session = await start()
        print(f"session {session.id} started; chat {session.external_chat_id} waits for an agent")

        for text in args.message or ["Hello, I need help with my order."]:
            sent = await hitl.send_message(session.id, text)
            print(f"sent {sent.message_id}: {text}")

        async with hitl.events(session_id=session.id, after="0") as events:
            async for event in events:
                kind = event.WhichOneof("kind")
                # No kind: one newer than this client's proto; skip it.
                print(f"[{event.cursor}] {kind or 'unknown'}: {describe(event)}", flush=True)
                if kind in ("ended", "failed"):
                    print(f"handoff over ({kind})")
                    return 0
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("HITL_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("HITL_TOKEN", ""))
    parser.add_argument("--name", default="Python Example User")
    parser.add_argument("--user", default="python-example-user", help="external id (upsert)")
    parser.add_argument("--title", default="Handoff from the Python example")
    parser.add_argument("--message", action="append", help="a message to send (repeatable)")
    parser.add_argument("--max-seconds", type=float, default=0, help="give up after this long")
    args = parser.parse_args()
    try:
        return asyncio.run(asyncio.wait_for(handoff(args), args.max_seconds or None))
    except TimeoutError:
        print(f"gave up after {args.max_seconds:g}s", file=sys.stderr)
        return 3
    except HitlRpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for violation in exc.violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
