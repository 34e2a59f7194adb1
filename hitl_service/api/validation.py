"""Request validation: every field checked, every problem reported at once.

Each ``parse_*`` function turns a request into a core command or raises
``InvalidArgument`` with one ``FieldViolation`` per bad field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING

from hitl_service.api.convert import STATE_FROM_PB, message_from_pb
from hitl_service.core.commands import CreateUser, SendUserMessage, StartHandoff, StopHandoff
from hitl_service.errors import FieldViolation, InvalidArgument
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers.types import GROUP_ID_PATTERN, GROUP_ID_RULE, StartFields

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hitl_service.domain import SessionState

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII, no spaces
METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
EMAIL_RE = re.compile(r"[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+")
MIME_RE = re.compile(r"[\w.+-]+/[\w.+-]+")
PHONE_RE = re.compile(r"\+?[0-9 ()-]{3,32}")
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

MAX_TEXT_BYTES = 64 * 1024
MAX_HISTORY = 200
MAX_METADATA = 32
MAX_BUTTONS = 13
MAX_MIME_TYPE = 255  # RFC 6838: a type and a subtype of at most 127 each
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# What a google.protobuf.Timestamp may hold (years 1 to 9999, UTC).
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
# Known enum numbers, built once: ``EnumTypeWrapper.values()`` builds a list per call.
_MEDIA_KINDS = frozenset(pb.MediaKind.values())
_AUTHORS = frozenset(pb.Author.values())
_BUTTON_KINDS = frozenset(pb.ButtonKind.values())


class _Checker:
    """Collects violations; raises them all together."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def done(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)

    def id(self, field: str, value: str, *, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
        elif not ID_RE.fullmatch(value):
            self.add(field, "must be 1-64 characters of letters, digits, '_' or '-'")

    def request_id(self, field: str, value: str) -> None:
        if not value:
            self.add(field, "is required (an idempotency key, e.g. a UUID)")
        elif not REQUEST_ID_RE.fullmatch(value):
            self.add(field, "must be 1-128 visible ASCII characters without spaces")

    def text(
        self,
        field: str,
        value: str,
        *,
        limit: int,
        required: bool = False,
        single_line: bool = True,
    ) -> None:
        if not value.strip():
            if required:
                self.add(field, "is required")
                return
            if not value.strip(" "):  # only spaces; line breaks and control characters are not
                return
        if len(value) > limit:
            self.add(field, f"must be at most {limit} characters")
        if single_line and ("\n" in value or "\r" in value):
            self.add(field, "must be a single line")
        elif CONTROL_RE.search(value):  # tabs and line breaks are not in it
            self.add(field, "must not contain control characters")

    def url(self, field: str, value: str, *, required: bool = False) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if len(value) > 2048 or not re.fullmatch(r"https?://[^\s\x00-\x1f\x7f]+", value):
            self.add(field, "must be an http or https URL of at most 2048 characters")

    def message(self, field: str, message: pb.Message) -> None:
        which = message.WhichOneof("body")
        if which is None:
            self.add(field, "needs a body: one of text, media, location or card")
        elif which == "text":
            if not message.text.strip():
                self.add(f"{field}.text", "must not be empty")
            elif len(message.text.encode("utf-8")) > MAX_TEXT_BYTES:
                self.add(f"{field}.text", f"must be at most {MAX_TEXT_BYTES} bytes of UTF-8")
            elif "\x00" in message.text:
                self.add(f"{field}.text", "must not contain NUL characters")
        elif which == "media":
            media = message.media
            self.url(f"{field}.media.url", media.url, required=True)
            self.text(f"{field}.media.name", media.name, limit=255)
            if media.mime_type and (
                len(media.mime_type) > MAX_MIME_TYPE or not MIME_RE.fullmatch(media.mime_type)
            ):
                self.add(
                    f"{field}.media.mime_type",
                    f"must look like type/subtype, at most {MAX_MIME_TYPE} characters",
                )
            if media.size_bytes < 0:
                self.add(f"{field}.media.size_bytes", "must not be negative")
            if media.kind not in _MEDIA_KINDS:
                self.add(f"{field}.media.kind", "is not a known media kind")
            self.text(f"{field}.media.caption", media.caption, limit=4000, single_line=False)
        elif which == "location":
            loc = message.location
            if not (math.isfinite(loc.latitude) and -90 <= loc.latitude <= 90):
                self.add(f"{field}.location.latitude", "must be between -90 and 90")
            if not (math.isfinite(loc.longitude) and -180 <= loc.longitude <= 180):
                self.add(f"{field}.location.longitude", "must be between -180 and 180")
            self.text(f"{field}.location.name", loc.name, limit=200)
            self.text(f"{field}.location.address", loc.address, limit=500)
        else:
            self.card(f"{field}.card", message.card)
        if message.author not in _AUTHORS:
            self.add(f"{field}.author", "is not a known author")
        if message.HasField("created_at"):
            stamp = message.created_at
            if not (_MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS and 0 <= stamp.nanos < 10**9):
                self.add(f"{field}.created_at", "must be a valid time in the years 1 to 9999")

    def card(self, field: str, card: pb.Card) -> None:
        if not card.title.strip() and not card.subtitle.strip():
            self.add(f"{field}.title", "a card needs a title or a subtitle")
        self.text(f"{field}.title", card.title, limit=200)
        self.text(f"{field}.subtitle", card.subtitle, limit=2000, single_line=False)
        self.url(f"{field}.image_url", card.image_url)
        if len(card.buttons) > MAX_BUTTONS:
            self.add(f"{field}.buttons", f"at most {MAX_BUTTONS} buttons")
        for i, button in enumerate(card.buttons[:MAX_BUTTONS]):
            where = f"{field}.buttons[{i}]"
            self.text(f"{where}.text", button.text, limit=128, required=True)
            if button.kind == pb.BUTTON_KIND_URL:
                self.url(f"{where}.value", button.value, required=True)
            elif button.kind == pb.BUTTON_KIND_PHONE:
                if not PHONE_RE.fullmatch(button.value):
                    self.add(f"{where}.value", "must be a phone number")
            elif button.kind not in _BUTTON_KINDS:
                self.add(f"{where}.kind", "is not a known button kind")
            else:
                self.text(f"{where}.value", button.value, limit=1000)


def parse_create_user(request: pb.CreateUserRequest) -> CreateUser:
    """CreateUserRequest → CreateUser."""
    check = _Checker()
    check.text("name", request.name, limit=200, required=True)
    if request.email and (len(request.email) > 254 or not EMAIL_RE.fullmatch(request.email)):
        check.add("email", "must be an e-mail address")
    check.url("picture_url", request.picture_url)
    check.text("external_id", request.external_id, limit=200)
    check.done()
    return CreateUser(
        name=request.name.strip(),
        email=request.email,
        picture_url=request.picture_url,
        external_id=request.external_id,
    )


def parse_start(
    request: pb.StartHitlRequest,
    provider_check: Callable[[StartFields], Sequence[FieldViolation]] | None = None,
) -> StartHandoff:
    """StartHitlRequest → StartHandoff.

    ``provider_check`` adds the provider's own violations (``HitlCore.check_start``)
    to the service's, in one ``InvalidArgument``: a field the provider alone
    refuses must not first open a session the provider then fails.
    """
    check = _Checker()
    check.id("user_id", request.user_id)
    check.request_id("request_id", request.request_id)
    check.text("title", request.title, limit=200)
    check.text("description", request.description, limit=4000, single_line=False)
    if len(request.history) > MAX_HISTORY:
        check.add("history", f"at most {MAX_HISTORY} messages")
    for i, message in enumerate(request.history[:MAX_HISTORY]):
        check.message(f"history[{i}]", message)
    if request.group_id and not GROUP_ID_PATTERN.fullmatch(request.group_id):
        check.add("group_id", GROUP_ID_RULE)
    if len(request.metadata) > MAX_METADATA:
        check.add("metadata", f"at most {MAX_METADATA} entries")
    for key, value in request.metadata.items():
        if not METADATA_KEY_RE.fullmatch(key):
            check.add(f"metadata[{key[:64]!r}]", "keys are 1-64 of letters, digits, '_.:-'")
        if len(value) > 512:
            check.add(f"metadata[{key[:64]!r}]", "values are at most 512 characters")
        elif "\x00" in value:
            check.add(f"metadata[{key[:64]!r}]", "values must not contain NUL characters")
    # The provider sees a field we refused empty (a bad history message may
    # not even convert), and its violations of that field add nothing.
    refused = {_root(v.field) for v in check.violations}
    metadata = {} if "metadata" in refused else dict(request.metadata)
    fields = StartFields(
        title="" if "title" in refused else request.title,
        description="" if "description" in refused else request.description,
        history=() if "history" in refused else tuple(message_from_pb(m) for m in request.history),
        group_id="" if "group_id" in refused else request.group_id,
        metadata=MappingProxyType(metadata),  # the hook must not change the request
    )
    if provider_check is not None:
        check.violations.extend(v for v in provider_check(fields) if _root(v.field) not in refused)
    check.done()
    return StartHandoff(
        user_id=request.user_id,
        request_id=request.request_id,
        title=fields.title,
        description=fields.description,
        history=fields.history,
        group_id=fields.group_id,
        metadata=metadata,
    )


def _root(field: str) -> str:
    """The request field a violation's path starts with: ``metadata['k']`` → ``metadata``."""
    return re.split(r"[.\[]", field, maxsplit=1)[0]


def parse_send(request: pb.SendMessageRequest) -> SendUserMessage:
    """SendMessageRequest → SendUserMessage."""
    check = _Checker()
    check.id("session_id", request.session_id)
    check.request_id("request_id", request.request_id)
    if not request.HasField("message"):
        check.add("message", "is required")
    else:
        check.message("message", request.message)
    check.done()
    return SendUserMessage(
        session_id=request.session_id,
        message=message_from_pb(request.message),
        request_id=request.request_id,
    )


def parse_stop(request: pb.StopHitlRequest) -> StopHandoff:
    """StopHitlRequest → StopHandoff."""
    check = _Checker()
    check.id("session_id", request.session_id)
    check.text("reason", request.reason, limit=500, single_line=False)
    check.done()
    return StopHandoff(session_id=request.session_id, reason=request.reason.strip())


def parse_session_id(request: pb.GetSessionRequest) -> str:
    """GetSessionRequest → session id."""
    check = _Checker()
    check.id("session_id", request.session_id)
    check.done()
    return request.session_id


def parse_list(
    request: pb.ListSessionsRequest,
) -> tuple[SessionState | None, int, tuple[datetime, str] | None]:
    """ListSessionsRequest → (state filter, page size, keyset position)."""
    check = _Checker()
    check.id("user_id", request.user_id, required=False)
    state: SessionState | None = None
    if request.state != pb.SESSION_STATE_UNSPECIFIED:
        state = STATE_FROM_PB.get(request.state)
        if state is None:
            check.add("state", "is not a known session state")
    if request.page_size < 0:
        check.add("page_size", "must not be negative")
    before = None
    if request.page_token:
        try:
            before = decode_page_token(request.page_token, _filters(request))
        except ValueError as exc:
            check.add("page_token", str(exc))
    check.done()
    size = request.page_size or DEFAULT_PAGE_SIZE
    return state, min(size, MAX_PAGE_SIZE), before


def parse_after_cursor(value: str) -> int | None:
    """StreamEventsRequest.after_cursor → int (None: from now)."""
    if value == "":
        return None
    if not re.fullmatch(r"[0-9]{1,18}", value):
        raise InvalidArgument(
            [FieldViolation("after_cursor", 'must be empty, "0" or a cursor received before')]
        )
    return int(value)


def _filters(request: pb.ListSessionsRequest) -> str:
    raw = f"{request.user_id}\x00{request.state}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def encode_page_token(request: pb.ListSessionsRequest, before: tuple[datetime, str]) -> str:
    """An opaque token for the page after ``before`` with these filters."""
    payload = {"v": 1, "c": before[0].isoformat(), "i": before[1], "f": _filters(request)}
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, filters: str) -> tuple[datetime, str]:
    """Reverses ``encode_page_token``.

    Raises:
        ValueError: Malformed, or issued for other filters.
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if not isinstance(payload, dict) or payload.get("v") != 1:
            raise ValueError
        # What the service issues: a UTC time and a session id. Anything
        # else (another offset near year 1 or 9999, NUL in the id) would
        # fail deeper, in the store, as an internal error.
        created = datetime.fromisoformat(payload["c"])
        ident = payload["i"]
        issued_for = payload["f"]
        if (
            not isinstance(ident, str)
            or not ID_RE.fullmatch(ident)
            or not isinstance(issued_for, str)
            or created.utcoffset() != timedelta(0)
        ):
            raise ValueError
    except (
        ValueError,
        KeyError,
        TypeError,
        binascii.Error,
        UnicodeDecodeError,
        RecursionError,
        OverflowError,
    ):
        raise ValueError("is not a page token this service issued") from None
    if issued_for != filters:
        raise ValueError("was issued for other filters (user_id, state); start from page one")
    return created, ident
