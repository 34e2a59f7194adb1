"""Normalized values shared by the core and every provider.

These are plain frozen dataclasses: providers never see generated protobuf
code, and the core converts them to and from the wire format at its edge.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias


class MediaKind(enum.Enum):
    """What a media attachment is."""

    IMAGE = "image"
    FILE = "file"
    AUDIO = "audio"
    VIDEO = "video"


class ButtonKind(enum.Enum):
    """What a card button does."""

    MESSAGE = "message"
    URL = "url"
    PHONE = "phone"


class Author(enum.Enum):
    """Who wrote a message."""

    USER = "user"
    BOT = "bot"
    AGENT = "agent"


class EndedBy(enum.Enum):
    """Who ended a handoff."""

    UNSPECIFIED = "unspecified"
    AGENT = "agent"
    USER = "user"
    CALLER = "caller"
    TIMEOUT = "timeout"
    PROVIDER = "provider"


@dataclass(frozen=True, slots=True)
class Media:
    """A file carried by URL."""

    kind: MediaKind
    url: str
    name: str = ""
    mime_type: str = ""
    size_bytes: int = 0
    caption: str = ""


@dataclass(frozen=True, slots=True)
class Location:
    """A place on the map."""

    latitude: float
    longitude: float
    name: str = ""
    address: str = ""


@dataclass(frozen=True, slots=True)
class CardButton:
    """A button on a card."""

    text: str
    kind: ButtonKind = ButtonKind.MESSAGE
    value: str = ""


@dataclass(frozen=True, slots=True)
class Card:
    """A rich card."""

    title: str = ""
    subtitle: str = ""
    image_url: str = ""
    buttons: tuple[CardButton, ...] = ()


Body: TypeAlias = str | Media | Location | Card
"""A message body: plain text (``str``) or one of the rich kinds."""


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. ``body`` is text or a rich kind."""

    body: Body
    author: Author = Author.USER
    id: str = ""
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Agent:
    """A human agent."""

    id: str
    name: str = ""
    avatar_url: str = ""


@dataclass(frozen=True, slots=True)
class Queued:
    """The handoff waits in a queue.

    Ignored while an agent holds the handoff (backends like LiveChat do not
    order their reports, so a late queue position must not unassign it): a
    handoff going back to the queue is reported as ``AgentLeft`` or
    ``Transferred`` first, then its position as ``Queued``."""

    position: int = 0
    wait_seconds: int = 0


@dataclass(frozen=True, slots=True)
class AgentAssigned:
    """An agent took the handoff."""

    agent: Agent


@dataclass(frozen=True, slots=True)
class AgentMessage:
    """An agent wrote to the end user."""

    message: Message
    agent: Agent


@dataclass(frozen=True, slots=True)
class Transferred:
    """The handoff moved. ``to_agent`` is None when it waits in a queue."""

    from_agent: Agent | None = None
    to_group_id: str = ""
    reason: str = ""
    to_agent: Agent | None = None


@dataclass(frozen=True, slots=True)
class AgentLeft:
    """An agent left the chat. If that agent held the handoff, it goes back to
    the queue (logged as ``Transferred``); otherwise nothing changes. The core
    decides, from the session it stored: a provider's own memory of who holds
    a chat does not survive a restart and is not shared by replicas."""

    agent: Agent
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ended:
    """The handoff is over."""

    reason: str = ""
    by: EndedBy = EndedBy.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class Failed:
    """The handoff failed.

    ``code`` is UPPER_SNAKE, at most 63 characters, as a refusal's (see
    ``ProviderRejected``): callers get it in the ``failed`` event. Any
    other becomes ``PROVIDER_FAILED`` (its words go to ``detail`` if that
    is empty)."""

    code: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Started:
    """The provider accepted the handoff (emitted by the core, not providers)."""

    provider: str
    external_chat_id: str
    group_id: str = ""


EventKind: TypeAlias = (
    Queued | AgentAssigned | AgentMessage | Transferred | AgentLeft | Ended | Failed
)
"""What a provider can report about a chat."""

LogKind: TypeAlias = Started | EventKind
"""What the event log holds."""


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """One normalized event reported by a provider about one of its chats.

    Attributes:
        external_chat_id: The provider's chat id; the core maps it to a session
            and drops events of chats that are not ours.
        kind: What happened.
        dedupe_key: Stable id of this happening, the same on every redelivery
            and in catch-up listings (LiveChat: derived from event, chat and
            thread ids). The core records each key once per provider, for
            7 days: it must be unique across all the provider's chats
            (include the chat id if the backend numbers events per chat), and
            never empty (a batch with an empty key is refused whole), unless
            it is a ``repeatable`` ``AgentLeft``.
        occurred_at: When it happened, as the provider says; None means now,
            and a naive datetime is taken as UTC.
        author_id: The provider's id of whoever caused it, if known. The core
            drops agent messages authored by the session's own end user.
        thread_id: The conversation of the chat it belongs to, for providers
            whose chats host one conversation after another (LiveChat: the
            thread); "" when unknown. See ``THREAD_STATE_KEY``.
        repeatable: The same happening may genuinely occur again under the
            same key, because the backend gives it no id (LiveChat: an agent
            leaving a thread, rejoining and leaving again). The core does not
            record the key, and applies the event whenever the session's
            state says it applies: only ``AgentLeft`` (applied only while
            that agent holds the session, so a redelivery is a no-op unless
            the agent took the session back meanwhile: LiveChat redelivers
            within about a minute).
    """

    external_chat_id: str
    kind: EventKind
    dedupe_key: str
    occurred_at: datetime | None = None
    author_id: str = ""
    thread_id: str = ""
    repeatable: bool = False


@dataclass(frozen=True, slots=True)
class WebhookBatch:
    """What one inbound webhook delivery carried, verified and normalized.

    Attributes:
        action: The provider's name for the delivery (for logs and metrics).
        events: Normalized events, in the order they should be applied.
        ignored: Why the delivery produced no events, if it produced none on
            purpose (an action we ignore, an internal note, an echo).
    """

    action: str
    events: Sequence[InboundEvent] = ()
    ignored: str = ""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider carries natively. The core hands ``send`` and
    ``start`` (history) any other body already as readable text
    (``providers.fallback``), so a text-only provider needs no renderer.

    ``catch_up`` says whether ``Provider.catch_up`` reads a history: without
    it, the core never calls it. ``transfers`` and ``queue_info`` only
    describe the backend: the core applies the ``Transferred`` and
    ``Queued`` events a provider reports whatever they say, and a handoff
    no queue report comes for stays REQUESTED until an agent takes it."""

    media: bool = False
    location: bool = False
    card: bool = False
    transfers: bool = False
    queue_info: bool = False
    catch_up: bool = False
    settle_seconds: float = 0.0
    """How long the backend may still act on a request after we stopped
    waiting for its answer (LiveChat: its 15 s server timeout). The core's
    claim on an attempt lasts at least this long, and a send the core's own
    timeout cut off is retried no sooner, so no other process retries (and
    checks for) a request the backend may still be carrying out. A provider
    whose own uncertain ``ProviderUnavailable`` leaves a request running
    says for how long in its ``retry_after``."""


@dataclass(frozen=True, slots=True)
class UserProfile:
    """The end user as the caller registered them."""

    id: str
    name: str
    email: str = ""
    picture_url: str = ""
    external_id: str = ""


@dataclass(slots=True)
class ProviderUser:
    """A provider's identity for one end user, persisted by the core.

    ``state`` is a JSON-serializable dict the provider owns (LiveChat: the
    customer id, token, expiry and cookies). Providers may update it in place
    during any call that receives it; the core saves it after the call.
    """

    external_user_id: str
    # Not in the repr: it holds credentials (LiveChat: the customer's token).
    state: dict[str, Any] = field(default_factory=dict, repr=False)


THREAD_STATE_KEY = "thread_id"
"""The key of ``ProviderChat.state`` naming the conversation of the chat a
session lives in, for providers whose chats host one conversation after
another (a returning LiveChat customer gets a new thread in the same chat).
When a session's chat state has it, the core applies to that session only
inbound events whose ``thread_id`` is empty or equal: a late report about an
earlier conversation (say, its end) must not act on the current one."""


@dataclass(slots=True)
class ProviderChat:
    """A provider's chat for one session, persisted by the core.

    ``state`` is JSON-serializable provider data (LiveChat: thread id, group),
    saved by the core after each call like ``ProviderUser.state``; see
    ``THREAD_STATE_KEY``.
    """

    external_chat_id: str
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StartRequest:
    """Everything a provider needs to open a handoff.

    Attributes:
        session_id: Our session id (for correlation at the provider).
        user: The end user.
        title: Short title for the agent.
        description: Longer description for the agent.
        history: The bot transcript, oldest first.
        group_id: The group to route to; empty means the provider's default.
        metadata: The caller's key/values.
        request_id: The caller's idempotency key for this start.
        previous_chat: The user's chat from their last session with this
            provider, if any, so the provider can resume it.
    """

    session_id: str
    user: UserProfile
    title: str = ""
    description: str = ""
    history: Sequence[Message] = ()
    group_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    previous_chat: ProviderChat | None = None


GROUP_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""The group ids StartHitl accepts (hitl.v1). A session's group comes back to
callers, who may pass it to a later StartHitl: a provider that names groups
itself should keep to it."""
GROUP_ID_RULE = "must be 1-64 characters of letters, digits, '_', '.' or '-'"
"""What ``GROUP_ID_PATTERN`` asks, as a refusal says it."""


@dataclass(frozen=True, slots=True)
class StartFields:
    """A StartHitl request's fields a provider interprets, as the caller sent
    them, before anything is stored: what ``SupportsValidation`` checks.

    A field the service's own checks refused arrives empty (its violation
    is the service's), so the provider sees only values in the service's
    bounds; ``history`` holds the messages as sent, not yet turned into
    text the provider's ``Capabilities`` carry, so ``history[i]`` is the
    caller's i-th message.
    """

    title: str = ""
    description: str = ""
    history: Sequence[Message] = ()
    group_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InvalidField:
    """A request field the provider cannot take, reported to the caller as a
    ``google.rpc.BadRequest`` field violation.

    Attributes:
        field: The request's field path, rooted at one of ``StartFields``'
            names: ``group_id``, ``metadata['plan']``, ``history[3].text``.
        description: What is wrong, in plain words for the caller (no
            secrets, no end-user text).
    """

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class StartResult:
    """What a provider returns when it accepted a handoff.

    Attributes:
        chat: The chat it created or resumed.
        group_id: The group it actually routed to.
        events: Anything it already knows (for example a queue position),
            applied right after the started event.
    """

    chat: ProviderChat
    group_id: str = ""
    events: Sequence[InboundEvent] = ()


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a provider returns when it delivered a message."""

    external_message_id: str = ""


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Events a provider listed for a chat since a checkpoint.

    Attributes:
        events: Events in order, with the same dedupe keys webhooks use.
        checkpoint: Opaque position to pass next time; the core stores it.
    """

    events: Sequence[InboundEvent] = ()
    checkpoint: str = ""
