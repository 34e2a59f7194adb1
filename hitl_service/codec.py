"""JSON forms of normalized values, as the store keeps them.

Explicit per type (no reflection), so a stored row keeps decoding after the
dataclasses grow; unknown keys in stored JSON are ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from providers.types import (
    Agent,
    AgentAssigned,
    AgentLeft,
    AgentMessage,
    Author,
    Body,
    ButtonKind,
    Card,
    CardButton,
    Ended,
    EndedBy,
    Failed,
    Location,
    LogKind,
    Media,
    MediaKind,
    Message,
    Queued,
    Started,
    Transferred,
)

JSON = dict[str, Any]


def agent_to_json(agent: Agent | None) -> JSON | None:
    """Agent → JSON (None stays None)."""
    if agent is None:
        return None
    return {"id": agent.id, "name": agent.name, "avatar_url": agent.avatar_url}


def agent_from_json(data: JSON | None) -> Agent | None:
    """JSON → Agent (None stays None)."""
    if not data:
        return None
    return Agent(id=data["id"], name=data.get("name", ""), avatar_url=data.get("avatar_url", ""))


def body_to_json(body: Body) -> JSON:
    """A message body → JSON with a ``type`` tag."""
    if isinstance(body, str):
        return {"type": "text", "text": body}
    if isinstance(body, Media):
        return {
            "type": "media",
            "kind": body.kind.value,
            "url": body.url,
            "name": body.name,
            "mime_type": body.mime_type,
            "size_bytes": body.size_bytes,
            "caption": body.caption,
        }
    if isinstance(body, Location):
        return {
            "type": "location",
            "latitude": body.latitude,
            "longitude": body.longitude,
            "name": body.name,
            "address": body.address,
        }
    return {
        "type": "card",
        "title": body.title,
        "subtitle": body.subtitle,
        "image_url": body.image_url,
        "buttons": [{"text": b.text, "kind": b.kind.value, "value": b.value} for b in body.buttons],
    }


def body_from_json(data: JSON) -> Body:
    """JSON → message body."""
    kind = data["type"]
    if kind == "text":
        return str(data["text"])
    if kind == "media":
        return Media(
            kind=MediaKind(data["kind"]),
            url=data["url"],
            name=data.get("name", ""),
            mime_type=data.get("mime_type", ""),
            size_bytes=int(data.get("size_bytes", 0)),
            caption=data.get("caption", ""),
        )
    if kind == "location":
        return Location(
            latitude=float(data["latitude"]),
            longitude=float(data["longitude"]),
            name=data.get("name", ""),
            address=data.get("address", ""),
        )
    if kind == "card":
        return Card(
            title=data.get("title", ""),
            subtitle=data.get("subtitle", ""),
            image_url=data.get("image_url", ""),
            buttons=tuple(
                CardButton(text=b["text"], kind=ButtonKind(b["kind"]), value=b.get("value", ""))
                for b in data.get("buttons", ())
            ),
        )
    raise ValueError(f"unknown body type {kind!r}")


def message_to_json(message: Message) -> JSON:
    """Message → JSON."""
    return {
        "id": message.id,
        "author": message.author.value,
        "created_at": message.created_at.isoformat() if message.created_at else None,
        "body": body_to_json(message.body),
    }


def message_from_json(data: JSON) -> Message:
    """JSON → Message."""
    created = data.get("created_at")
    return Message(
        id=data.get("id", ""),
        author=Author(data.get("author", Author.USER.value)),
        created_at=datetime.fromisoformat(created) if created else None,
        body=body_from_json(data["body"]),
    )


_TAGS: dict[type, str] = {
    Started: "started",
    Queued: "queued",
    AgentAssigned: "agent_assigned",
    AgentMessage: "agent_message",
    Transferred: "transferred",
    AgentLeft: "agent_left",  # parked events only: the log holds a Transferred
    Ended: "ended",
    Failed: "failed",
}


def kind_tag(kind: LogKind) -> str:
    """The log's name for an event kind (``agent_message``, ``ended`` …)."""
    return _TAGS[type(kind)]


def kind_to_json(kind: LogKind) -> tuple[str, JSON]:
    """A log event kind → (tag, JSON)."""
    if isinstance(kind, Started):
        return "started", {
            "provider": kind.provider,
            "external_chat_id": kind.external_chat_id,
            "group_id": kind.group_id,
        }
    if isinstance(kind, Queued):
        return "queued", {"position": kind.position, "wait_seconds": kind.wait_seconds}
    if isinstance(kind, AgentAssigned):
        return "agent_assigned", {"agent": agent_to_json(kind.agent)}
    if isinstance(kind, AgentMessage):
        return "agent_message", {
            "message": message_to_json(kind.message),
            "agent": agent_to_json(kind.agent),
        }
    if isinstance(kind, Transferred):
        return "transferred", {
            "from_agent": agent_to_json(kind.from_agent),
            "to_group_id": kind.to_group_id,
            "reason": kind.reason,
            "to_agent": agent_to_json(kind.to_agent),
        }
    if isinstance(kind, AgentLeft):
        return "agent_left", {"agent": agent_to_json(kind.agent), "reason": kind.reason}
    if isinstance(kind, Ended):
        return "ended", {"reason": kind.reason, "by": kind.by.value}
    if isinstance(kind, Failed):
        return "failed", {"code": kind.code, "detail": kind.detail}
    raise TypeError(f"not an event kind: {type(kind).__name__}")


def kind_from_json(tag: str, data: JSON) -> LogKind:
    """(tag, JSON) → log event kind."""
    if tag == "started":
        return Started(
            provider=data["provider"],
            external_chat_id=data["external_chat_id"],
            group_id=data.get("group_id", ""),
        )
    if tag == "queued":
        return Queued(position=int(data["position"]), wait_seconds=int(data["wait_seconds"]))
    if tag == "agent_assigned":
        agent = agent_from_json(data["agent"])
        assert agent is not None  # written by kind_to_json, always present
        return AgentAssigned(agent=agent)
    if tag == "agent_message":
        agent = agent_from_json(data["agent"])
        assert agent is not None
        return AgentMessage(message=message_from_json(data["message"]), agent=agent)
    if tag == "transferred":
        return Transferred(
            from_agent=agent_from_json(data.get("from_agent")),
            to_group_id=data.get("to_group_id", ""),
            reason=data.get("reason", ""),
            to_agent=agent_from_json(data.get("to_agent")),
        )
    if tag == "agent_left":
        agent = agent_from_json(data["agent"])
        assert agent is not None
        return AgentLeft(agent=agent, reason=data.get("reason", ""))
    if tag == "ended":
        return Ended(reason=data.get("reason", ""), by=EndedBy(data.get("by", "unspecified")))
    if tag == "failed":
        return Failed(code=data["code"], detail=data.get("detail", ""))
    raise ValueError(f"unknown event kind {tag!r}")
