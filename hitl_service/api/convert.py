"""Records ↔ protobuf messages, at the edge of the service.

Inbound conversion assumes the request passed ``validation``; outbound
conversion covers every record the API returns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from hitl_service.domain import SessionState
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers.types import (
    Agent,
    AgentAssigned,
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
    Media,
    MediaKind,
    Message,
    Queued,
    Started,
    Transferred,
)

if TYPE_CHECKING:
    from google.protobuf.message import Message as ProtoMessage

    from hitl_service.domain import LogEvent, Session, User

STATE_TO_PB = {
    SessionState.STARTING: pb.SESSION_STATE_REQUESTED,  # internal; looks like REQUESTED
    SessionState.REQUESTED: pb.SESSION_STATE_REQUESTED,
    SessionState.QUEUED: pb.SESSION_STATE_QUEUED,
    SessionState.ASSIGNED: pb.SESSION_STATE_ASSIGNED,
    SessionState.ENDED: pb.SESSION_STATE_ENDED,
    SessionState.FAILED: pb.SESSION_STATE_FAILED,
}
STATE_FROM_PB = {
    pb.SESSION_STATE_REQUESTED: SessionState.REQUESTED,
    pb.SESSION_STATE_QUEUED: SessionState.QUEUED,
    pb.SESSION_STATE_ASSIGNED: SessionState.ASSIGNED,
    pb.SESSION_STATE_ENDED: SessionState.ENDED,
    pb.SESSION_STATE_FAILED: SessionState.FAILED,
}
ENDED_BY_TO_PB = {
    EndedBy.UNSPECIFIED: pb.ENDED_BY_UNSPECIFIED,
    EndedBy.AGENT: pb.ENDED_BY_AGENT,
    EndedBy.USER: pb.ENDED_BY_USER,
    EndedBy.CALLER: pb.ENDED_BY_CALLER,
    EndedBy.TIMEOUT: pb.ENDED_BY_TIMEOUT,
    EndedBy.PROVIDER: pb.ENDED_BY_PROVIDER,
}
AUTHOR_TO_PB = {
    Author.USER: pb.AUTHOR_USER,
    Author.BOT: pb.AUTHOR_BOT,
    Author.AGENT: pb.AUTHOR_AGENT,
}
AUTHOR_FROM_PB = {
    pb.AUTHOR_UNSPECIFIED: Author.USER,
    pb.AUTHOR_USER: Author.USER,
    pb.AUTHOR_BOT: Author.BOT,
    pb.AUTHOR_AGENT: Author.AGENT,
}
MEDIA_TO_PB = {
    MediaKind.IMAGE: pb.MEDIA_KIND_IMAGE,
    MediaKind.FILE: pb.MEDIA_KIND_FILE,
    MediaKind.AUDIO: pb.MEDIA_KIND_AUDIO,
    MediaKind.VIDEO: pb.MEDIA_KIND_VIDEO,
}
MEDIA_FROM_PB = {v: k for k, v in MEDIA_TO_PB.items()} | {pb.MEDIA_KIND_UNSPECIFIED: MediaKind.FILE}
BUTTON_TO_PB = {
    ButtonKind.MESSAGE: pb.BUTTON_KIND_MESSAGE,
    ButtonKind.URL: pb.BUTTON_KIND_URL,
    ButtonKind.PHONE: pb.BUTTON_KIND_PHONE,
}
BUTTON_FROM_PB = {v: k for k, v in BUTTON_TO_PB.items()} | {
    pb.BUTTON_KIND_UNSPECIFIED: ButtonKind.MESSAGE
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _clamp(value: int, bits: int) -> int:
    """``value`` within a signed protobuf integer of ``bits`` + 1 bits: a
    provider's out-of-range number must not make its event unsendable (every
    stream replaying the log would fail on it)."""
    limit = 1 << bits
    return max(-limit, min(value, limit - 1))


def timestamp(value: datetime | None) -> Timestamp | None:
    """datetime → Timestamp (None stays None)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.astimezone(UTC)  # naive means local time, as FromDatetime reads it
    # Plain arithmetic: Timestamp.FromDatetime goes through timetuple and
    # calendar.timegm, a cost every session and event of every answer pays.
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def from_timestamp(value: Timestamp) -> datetime:
    """Timestamp → aware UTC datetime."""
    return value.ToDatetime(tzinfo=UTC)


def user_to_pb(user: User) -> pb.User:
    """User → pb.User."""
    return pb.User(
        id=user.id,
        name=user.name,
        email=user.email,
        picture_url=user.picture_url,
        external_id=user.external_id,
        created_at=timestamp(user.created_at),
    )


def agent_to_pb(agent: Agent | None) -> pb.Agent | None:
    """Agent → pb.Agent (None stays None)."""
    if agent is None:
        return None
    return pb.Agent(id=agent.id, name=agent.name, avatar_url=agent.avatar_url)


def session_to_pb(session: Session) -> pb.Session:
    """Session → pb.Session."""
    return pb.Session(
        id=session.id,
        user_id=session.user_id,
        provider=session.provider,
        state=STATE_TO_PB[session.state],
        external_chat_id=session.external_chat_id,
        agent=agent_to_pb(session.agent),
        created_at=timestamp(session.created_at),
        updated_at=timestamp(session.updated_at),
        ended_at=timestamp(session.ended_at),
        end_reason=session.end_reason,
        group_id=session.group_id,
        metadata=session.metadata,
        ended_by=ENDED_BY_TO_PB[session.ended_by],
    )


def message_to_pb(message: Message) -> pb.Message:
    """Message → pb.Message."""
    out = pb.Message(
        id=message.id,
        author=AUTHOR_TO_PB[message.author],
        created_at=timestamp(message.created_at),
    )
    body = message.body
    if isinstance(body, str):
        out.text = body
    elif isinstance(body, Media):
        out.media.CopyFrom(
            pb.Media(
                kind=MEDIA_TO_PB[body.kind],
                url=body.url,
                name=body.name,
                mime_type=body.mime_type,
                size_bytes=_clamp(body.size_bytes, 63),
                caption=body.caption,
            )
        )
    elif isinstance(body, Location):
        out.location.CopyFrom(
            pb.Location(
                latitude=body.latitude,
                longitude=body.longitude,
                name=body.name,
                address=body.address,
            )
        )
    else:
        out.card.CopyFrom(
            pb.Card(
                title=body.title,
                subtitle=body.subtitle,
                image_url=body.image_url,
                buttons=[
                    pb.CardButton(text=b.text, kind=BUTTON_TO_PB[b.kind], value=b.value)
                    for b in body.buttons
                ],
            )
        )
    return out


def message_from_pb(message: pb.Message) -> Message:
    """pb.Message → Message (the request was validated: one body is set)."""
    which = message.WhichOneof("body")
    body: Body
    if which == "media":
        m = message.media
        body = Media(
            kind=MEDIA_FROM_PB[m.kind],
            url=m.url,
            name=m.name,
            mime_type=m.mime_type,
            size_bytes=m.size_bytes,
            caption=m.caption,
        )
    elif which == "location":
        loc = message.location
        body = Location(
            latitude=loc.latitude, longitude=loc.longitude, name=loc.name, address=loc.address
        )
    elif which == "card":
        c = message.card
        body = Card(
            title=c.title,
            subtitle=c.subtitle,
            image_url=c.image_url,
            buttons=tuple(
                CardButton(text=b.text, kind=BUTTON_FROM_PB[b.kind], value=b.value)
                for b in c.buttons
            ),
        )
    else:
        body = message.text
    return Message(
        body=body,
        author=AUTHOR_FROM_PB[message.author],
        created_at=from_timestamp(message.created_at) if message.HasField("created_at") else None,
    )


def event_to_pb(event: LogEvent) -> pb.Event:
    """LogEvent → pb.Event, with its cursor."""
    out = pb.Event(
        cursor=str(event.seq),
        session_id=event.session_id,
        user_id=event.user_id,
        occurred_at=timestamp(event.occurred_at),
    )
    kind = event.kind
    if isinstance(kind, Started):
        out.started.CopyFrom(
            pb.Started(
                provider=kind.provider,
                external_chat_id=kind.external_chat_id,
                group_id=kind.group_id,
            )
        )
    elif isinstance(kind, Queued):
        out.queued.CopyFrom(
            pb.Queued(
                position=_clamp(kind.position, 31), wait_seconds=_clamp(kind.wait_seconds, 31)
            )
        )
    elif isinstance(kind, AgentAssigned):
        out.agent_assigned.CopyFrom(pb.AgentAssigned(agent=agent_to_pb(kind.agent)))
    elif isinstance(kind, AgentMessage):
        out.agent_message.CopyFrom(
            pb.AgentMessage(message=message_to_pb(kind.message), agent=agent_to_pb(kind.agent))
        )
    elif isinstance(kind, Transferred):
        out.transferred.CopyFrom(
            pb.Transferred(
                from_agent=agent_to_pb(kind.from_agent),
                to_group_id=kind.to_group_id,
                reason=kind.reason,
                to_agent=agent_to_pb(kind.to_agent),
            )
        )
    elif isinstance(kind, Ended):
        out.ended.CopyFrom(pb.Ended(reason=kind.reason, by=ENDED_BY_TO_PB[kind.by]))
    elif isinstance(kind, Failed):
        out.failed.CopyFrom(pb.Failed(code=kind.code, detail=kind.detail))
    return out


_TRUNCATED = "… [truncated]"
_MARK = len(_TRUNCATED.encode())
_IDS = frozenset({"cursor", "session_id", "user_id", "id"})  # never cut: they identify


def _shorten(message: ProtoMessage, cap: int) -> None:
    """Cuts every text longer than ``cap`` UTF-8 bytes, recursively (ids
    stay whole, and a text is cut only where the mark makes it shorter)."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for item in value if field.is_repeated else (value,):
                _shorten(item, cap)
        elif field.type == field.TYPE_STRING and not field.is_repeated and field.name not in _IDS:
            data = value.encode()
            if len(data) > cap + _MARK:
                setattr(message, field.name, data[:cap].decode(errors="ignore") + _TRUNCATED)


def _drop_lists(message: ProtoMessage) -> None:
    """Clears every repeated field, recursively (the last resort)."""
    for field, value in message.ListFields():
        if field.is_repeated:
            message.ClearField(field.name)
        elif field.type == field.TYPE_MESSAGE:
            _drop_lists(value)


def fit_event(event: pb.Event, limit: int) -> pb.Event:
    """``event`` with its texts shortened until it encodes to at most
    ``limit`` bytes (an event too large for one gRPC message would fail
    every stream reaching it); shortened, not dropped, so cursors stay whole."""
    cap = 64 * 1024
    while event.ByteSize() > limit and cap > 0:
        _shorten(event, cap)
        cap //= 2
    if event.ByteSize() > limit:
        _drop_lists(event)  # its bulk is in lists of short entries
    return event
