"""Webhook bodies the generators send, and the marker receivers read back.

Every body carries a unique event key (so the service records each one) and
a text ``bench <run> <n> <monotonic ns>``: the stream client that receives
the event computes its delivery latency from it. ``time.monotonic_ns`` is
CLOCK_MONOTONIC, shared by every process on the machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["livechat", "scripted"]
MARK = "bench"


@dataclass(frozen=True)
class Chat:
    """Where webhook events go: a provider chat (and its LiveChat thread)."""

    chat_id: str
    thread_id: str = ""


@dataclass(frozen=True)
class WebhookSpec:
    """What a sender needs to build bodies; JSON-serializable via ``to_json``."""

    format: Format
    secret: str
    organization_id: str
    chats: tuple[Chat, ...]
    path: str

    def to_json(self) -> dict[str, Any]:
        """A dict for the generator's command line."""
        return {
            "format": self.format,
            "secret": self.secret,
            "organization_id": self.organization_id,
            "chats": [[c.chat_id, c.thread_id] for c in self.chats],
            "path": self.path,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WebhookSpec:
        """The inverse of ``to_json``."""
        return cls(
            format=data["format"],
            secret=data["secret"],
            organization_id=data["organization_id"],
            chats=tuple(Chat(c[0], c[1]) for c in data["chats"]),
            path=data["path"],
        )


class BodyMaker:
    """Builds unique bodies quickly: one template per chat, two substitutions."""

    def __init__(self, spec: WebhookSpec, run: str) -> None:
        self._run = run
        self._templates: list[str] = []
        for chat in spec.chats:
            if spec.format == "livechat":
                body: dict[str, Any] = {
                    "webhook_id": "bench-webhook",
                    "secret_key": spec.secret,
                    "organization_id": spec.organization_id,
                    "action": "incoming_event",
                    "payload": {
                        "chat_id": chat.chat_id,
                        "thread_id": chat.thread_id,
                        "event": {
                            "id": f"{chat.thread_id}_@ID@",
                            "type": "message",
                            "text": "@TEXT@",
                            "author_id": "agent@bench.example",
                            "created_at": "2026-11-27T10:00:00.000000Z",
                            "visibility": "all",
                        },
                    },
                }
            else:
                body = {
                    "secret": spec.secret,
                    "chat_id": chat.chat_id,
                    "key": "@ID@",
                    "type": "message",
                    "text": "@TEXT@",
                }
            self._templates.append(json.dumps(body, separators=(",", ":")))

    def body(self, n: int, sent_ns: int) -> bytes:
        """The ``n``-th body of this run (chats in turn), stamped ``sent_ns``."""
        template = self._templates[n % len(self._templates)]
        text = f"{MARK} {self._run} {n} {sent_ns}"
        return template.replace("@ID@", f"b{self._run}n{n}").replace("@TEXT@", text).encode()


def parse_mark(text: str) -> tuple[str, int, int] | None:
    """(run, n, sent_ns) from an event's text, or None if it is not ours."""
    if not text.startswith(MARK + " "):
        return None
    parts = text.split(" ")
    if len(parts) != 4:
        return None
    return parts[1], int(parts[2]), int(parts[3])
