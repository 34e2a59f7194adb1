"""Validated inputs of the core's operations, and their request hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from hitl_service.codec import message_to_json
from hitl_service.store.rows import stable_dumps
from providers.types import Author, Message


@dataclass(frozen=True, slots=True)
class CreateUser:
    """Register or update an end user."""

    name: str
    email: str = ""
    picture_url: str = ""
    external_id: str = ""


@dataclass(frozen=True, slots=True)
class StartHandoff:
    """Open a handoff."""

    user_id: str
    request_id: str
    title: str = ""
    description: str = ""
    history: Sequence[Message] = ()
    group_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def request_hash(self) -> str:
        """Fingerprint of everything but the request id."""
        return _hash(
            {
                "user_id": self.user_id,
                "title": self.title,
                "description": self.description,
                "history": [message_to_json(m) for m in self.history],
                "group_id": self.group_id,
                "metadata": dict(sorted(self.metadata.items())),
            }
        )


@dataclass(frozen=True, slots=True)
class SendUserMessage:
    """Send an end-user message to the agent."""

    session_id: str
    message: Message
    request_id: str

    def request_hash(self) -> str:
        """Fingerprint of everything but the request id, and of the message
        as it is stored: its id, author and time are the service's own."""
        stored = replace(self.message, id="", author=Author.USER, created_at=None)
        return _hash({"session_id": self.session_id, "message": message_to_json(stored)})


@dataclass(frozen=True, slots=True)
class StopHandoff:
    """End a handoff."""

    session_id: str
    reason: str = ""


def _hash(value: object) -> str:
    # Hashes are stored and compared across versions: stable text, not
    # whatever the store encodes its columns with.
    return hashlib.sha256(stable_dumps(value).encode()).hexdigest()
