"""Lenient views of LiveChat JSON.

LiveChat adds fields over time and some documented fields are optional in
practice, so nothing here rejects unknown keys or missing optional ones.
Parsers take ``object`` (anything ``json.loads`` can return) and never raise;
callers decide what a missing required field means.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_FRACTION_RE = re.compile(r"\.(\d+)")


_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")


def loads_json(data: bytes) -> Any:
    """``json.loads``, with lone UTF-16 surrogates (``"\\ud83d"`` without its
    pair) replaced by U+FFFD: no store, protobuf or log can encode them, so
    one would fail every write (and every stream) of the event carrying it.

    Raises:
        ValueError: Not JSON. RecursionError: nested too deep.
    """
    value = json.loads(data)
    if _SURROGATE_ESCAPE_RE.search(data):  # rare: only then walk the value
        value = _mended(value)
    return value


def _mended(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_mended(v) for v in value]
    if isinstance(value, dict):
        return {_mended(k): _mended(v) for k, v in value.items()}
    return value


def as_dict(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty dict."""
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list[Any]:
    """``value`` if it is a JSON array, else an empty list."""
    return value if isinstance(value, list) else []


def as_str(value: object) -> str:
    """A string or number as text; anything else as ``""``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def as_int(value: object, default: int = 0) -> int:
    """An integer from a number or a decimal string; ``default`` otherwise."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdecimal():
        try:
            return int(value.strip())
        except ValueError:
            return default
    return default


def str_list(value: object) -> list[str]:
    """The non-empty strings (or numbers, as text) of a JSON array."""
    return [s for s in (as_str(v) for v in as_list(value)) if s]


def parse_time(value: object) -> datetime | None:
    """Parses LiveChat's RFC 3339 timestamps (``...T10:15:07.123456Z``).

    Returns:
        An aware UTC datetime, or None when the value is absent or unreadable.
    """
    text = as_str(value).strip()
    if not text:
        return None
    text = text.replace("z", "Z")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # Python < 3.12 accepts only 3 or 6 fraction digits; normalize to 6.
    text = _FRACTION_RE.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00: before the first UTC instant
        return None


def is_customer_id(value: str) -> bool:
    """True for a customer id (a dashed UUID); agent ids are e-mails."""
    return bool(_UUID_RE.match(value))


@dataclass(frozen=True, slots=True)
class LcQueue:
    """A thread's place in the routing queue."""

    position: int
    wait_time: int
    queued_at: str


@dataclass(frozen=True, slots=True)
class LcEvent:
    """One chat event, with the fields the provider reads."""

    id: str
    type: str
    author_id: str
    custom_id: str
    created_at: datetime | None
    visibility: str
    raw: Mapping[str, Any]

    @property
    def text(self) -> str:
        """The text of a message event (or a system message)."""
        return as_str(self.raw.get("text"))

    @property
    def deleted(self) -> bool:
        """Its author deleted it (it stays listed, marked)."""
        return self.raw.get("deleted") is True


@dataclass(frozen=True, slots=True)
class LcUser:
    """A chat user: an agent (id = e-mail) or a customer (id = UUID)."""

    id: str
    type: str
    name: str
    email: str
    avatar: str
    present: bool = True
    visibility: str = "all"


@dataclass(frozen=True, slots=True)
class LcThread:
    """One thread of a chat."""

    id: str
    active: bool
    events: tuple[LcEvent, ...]
    queue: LcQueue | None
    created_at: datetime | None
    user_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LcChat:
    """A chat as ``get_chat`` or ``incoming_chat`` shows it."""

    id: str
    thread: LcThread | None
    users: tuple[LcUser, ...] = field(default=())


def parse_queue(value: object) -> LcQueue | None:
    """A ``queue`` object; None if absent."""
    if not isinstance(value, dict):
        return None
    queued_at = as_str(value.get("queued_at")) or as_str(value.get("queued_at_us"))
    return LcQueue(
        position=max(0, as_int(value.get("position"))),
        wait_time=max(0, as_int(value.get("wait_time"))),
        queued_at=queued_at,
    )


def parse_event(value: object) -> LcEvent | None:
    """An event object; None if it is not an object or has no id."""
    obj = as_dict(value)
    event_id = as_str(obj.get("id"))
    if not event_id:
        return None
    # Pre-v3.4 payloads say "recipients" where v3.6 says "visibility".
    visibility = as_str(obj.get("visibility")) or as_str(obj.get("recipients")) or "all"
    return LcEvent(
        id=event_id,
        type=as_str(obj.get("type")),
        author_id=as_str(obj.get("author_id")),
        custom_id=as_str(obj.get("custom_id")),
        created_at=parse_time(obj.get("created_at")),
        visibility=visibility,
        raw=obj,
    )


def parse_user(value: object) -> LcUser | None:
    """A user object; None without an id."""
    obj = as_dict(value)
    user_id = as_str(obj.get("id"))
    if not user_id:
        return None
    user_type = as_str(obj.get("type")) or ("customer" if is_customer_id(user_id) else "agent")
    return LcUser(
        id=user_id,
        type=user_type,
        name=as_str(obj.get("name")),
        email=as_str(obj.get("email")),
        avatar=as_str(obj.get("avatar")),
        present=obj.get("present") is not False,
        visibility=as_str(obj.get("visibility")) or "all",
    )


def parse_thread(value: object) -> LcThread | None:
    """A thread object; None without an id."""
    obj = as_dict(value)
    thread_id = as_str(obj.get("id"))
    if not thread_id:
        return None
    events = tuple(e for e in (parse_event(v) for v in as_list(obj.get("events"))) if e)
    return LcThread(
        id=thread_id,
        active=obj.get("active") is True,
        events=events,
        queue=parse_queue(obj.get("queue")),
        created_at=parse_time(obj.get("created_at")),
        user_ids=tuple(str_list(obj.get("user_ids"))),
    )


def parse_users(value: object) -> tuple[LcUser, ...]:
    """A ``users`` array."""
    return tuple(u for u in (parse_user(v) for v in as_list(value)) if u)


def parse_chat(value: object) -> LcChat | None:
    """A chat object (``get_chat`` answer or ``incoming_chat`` payload)."""
    obj = as_dict(value)
    chat_id = as_str(obj.get("id"))
    if not chat_id:
        return None
    return LcChat(
        id=chat_id, thread=parse_thread(obj.get("thread")), users=parse_users(obj.get("users"))
    )


def parse_threads(value: object) -> list[LcThread]:
    """The ``threads`` of a ``list_threads`` answer."""
    return [t for t in (parse_thread(v) for v in as_list(as_dict(value).get("threads"))) if t]


def first(values: Sequence[str]) -> str:
    """The first item, or ``""``."""
    return values[0] if values else ""
