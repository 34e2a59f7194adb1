"""The local provider: a built-in human side with an agent console.

Handoffs wait in an in-process queue that the console page (served by the
sidecar under ``/console``) shows live; a person takes one, reads the
transcript, replies, transfers and ends it. What the agent does is pushed
to the core through the ``EventSink`` and committed before the console's
request is answered. Conversations are kept in a JSON file under the data
directory, so the console survives restarts: a start, send or stop answers
once the file holds it (concurrent calls share a write), so what the service
acknowledged is there after a ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import errno
import hashlib
import json
import os
import tempfile
import threading
import unicodedata
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import orjson
import structlog

from providers.errors import (
    ChatInactive,
    ProviderConfigError,
    ProviderRejected,
    ProviderUnavailable,
    WebhookRejected,
)
from providers.types import (
    GROUP_ID_PATTERN,
    GROUP_ID_RULE,
    Agent,
    AgentAssigned,
    AgentMessage,
    Author,
    Capabilities,
    Card,
    CatchUp,
    Ended,
    EndedBy,
    InboundEvent,
    Location,
    Media,
    Message,
    ProviderChat,
    ProviderUser,
    Queued,
    SendResult,
    StartRequest,
    StartResult,
    Transferred,
    UserProfile,
    WebhookBatch,
)

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from hitl_service.clock import Clock
    from providers.base import EventSink, ProviderDeps
    from providers.types import EventKind

log = structlog.get_logger(__name__)

WAITING, ACTIVE, ENDED = "waiting", "active", "ended"
_MAX_ENDED = 200  # ended conversations kept for the console's history
# Messages kept per conversation: every change re-sends every conversation to
# every open console tab (and to the state file), so a long chat must not
# grow that without end. Older ones leave the console only: the service's
# event log keeps the whole conversation.
_MAX_MESSAGES = 200
STATE_SETTING = "HITL_LOCAL_STATE_FILE"
GROUP_SETTING = "HITL_LOCAL_GROUP_ID"
_ACTION_PERSIST_TIMEOUT = 5.0  # seconds a console action waits for the state file
# After a failed write (a full disk), the writer tries again this long after,
# doubling to _RETRY_MAX, also when nothing changes meanwhile.
_RETRY_FIRST = 1.0
_RETRY_MAX = 30.0
_FAILURE_LOG_EVERY = 60.0  # seconds between local.state_write_failed lines of one outage


def render_body(message: Message) -> dict[str, Any]:
    """A message as the console shows it: text plus optional rich parts."""
    body = message.body
    if isinstance(body, str):
        return {"text": body}
    if isinstance(body, Media):
        label = body.name or body.url.rsplit("/", 1)[-1]
        return {
            "text": body.caption or f"{body.kind.value}: {label}",
            "media": {
                "kind": body.kind.value,
                "url": body.url,
                "name": label,
                "mime_type": body.mime_type,
                "size_bytes": body.size_bytes,
            },
        }
    if isinstance(body, Location):
        name = body.name or "a location"
        return {
            "text": f"{name} {body.address}".strip(),
            "location": {
                "latitude": body.latitude,
                "longitude": body.longitude,
                "url": f"https://maps.google.com/?q={body.latitude},{body.longitude}",
            },
        }
    assert isinstance(body, Card)
    return {
        "text": body.title or body.subtitle,
        "card": {
            "title": body.title,
            "subtitle": body.subtitle,
            "image_url": body.image_url,
            "buttons": [
                {"text": b.text, "kind": b.kind.value, "value": b.value} for b in body.buttons
            ],
        },
    }


@dataclass
class Conversation:
    """One handoff as the console sees it."""

    id: str
    session_id: str
    user: dict[str, str]
    title: str
    description: str
    group_id: str
    created_at: str
    status: str = WAITING
    agent: dict[str, str] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    end_reason: str = ""
    seq: int = 0  # counts the events this conversation reported (not their dedupe keys)
    request_id: str = ""  # the start's, which a retry as a new session carries too
    trimmed: int = 0  # earlier messages dropped beyond _MAX_MESSAGES

    def add_message(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """Appends ``entry``; returns the oldest messages it pushed out."""
        self.messages.append(entry)
        extra = len(self.messages) - _MAX_MESSAGES
        if extra <= 0:
            return []
        dropped = self.messages[:extra]
        del self.messages[:extra]
        self.trimmed += extra
        return dropped

    def next_message_id(self) -> str:
        """Unique within the conversation, also after trimming."""
        return f"{self.id}_{self.trimmed + len(self.messages) + 1}"

    def snapshot(self) -> dict[str, Any]:
        """JSON for the console and the state file."""
        return {k: v for k, v in self.__dict__.items()}


def _sync_directory(folder: Path) -> None:
    """fsync a folder (POSIX; skipped where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_writable_directory(folder: Path) -> None:
    """Raises OSError unless ``folder`` exists (it is created) and takes a new file."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is not a directory")
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".hitl-write-check.", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)


class LocalProvider:
    """``Provider`` backed by the in-process console."""

    name = "local"
    webhooks = False  # the console acts in-process
    capabilities = Capabilities(
        media=True, location=True, card=True, transfers=True, queue_info=True, catch_up=False
    )

    def __init__(
        self,
        *,
        sink: EventSink,
        clock: Clock,
        state_file: Path | None,
        default_group: str,
        http_host: str = "",
        state_setting: str = STATE_SETTING,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._state_file = state_file
        # The setting an error about the file names: HITL_DATA_DIR when the
        # file is its default, inside that directory.
        self._state_setting = state_setting
        self._default_group = default_group
        self.http_host = http_host  # the sidecar's bind host, which the console accepts
        self._chats: dict[str, Conversation] = {}
        # (conversation, request id) → message id: a repeated send is found
        # without scanning the conversation.
        self._sent: dict[tuple[str, str], str] = {}
        self._lock = asyncio.Lock()
        self._version = 0
        self._changed = asyncio.Event()
        self._dirty = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        # Set after each write attempt (replaced by a fresh one); ``_urgent``
        # cuts the writer's coalescing pause short while a call waits on it.
        self._written = asyncio.Event()
        self._urgent = asyncio.Event()
        # The version last written: a process that changed nothing (``local
        # list``, ``check``) never writes, so it cannot overwrite a newer file
        # the running server wrote meanwhile.
        self._saved_version = 0
        # Writes run in threads; a cancelled one may still be running when the
        # next starts, so the file takes a snapshot only if it is not older.
        self._file_lock = threading.Lock()
        self._file_version = -1
        self._console_json: tuple[int, str] = (-1, "")  # see ``console_json``
        self._failed_writes = 0  # in a row, since the last write that succeeded
        self._next_failure_log = 0.0  # monotonic time from which another failure is logged

    # --- lifecycle ----------------------------------------------------------------
    async def open(self) -> None:
        """Loads saved conversations and starts the state-file writer.

        Raises:
            ProviderConfigError: The state file cannot be read or is not a
                console state file. Starting empty would orphan the open
                conversations and overwrite the file on the first change.
        """
        path = self._state_file
        if path is None:
            return
        try:
            if path.exists():
                if not path.is_file():
                    raise ValueError("it is not a regular file")
                data = await asyncio.to_thread(path.read_text, encoding="utf-8")
                self._chats, self._sent = _load_state(data)
            # Found now, not at the first handoff (which could only fail):
            # the file's directory takes new files. The file itself is not
            # written: ``local list`` and ``check`` open it beside a server.
            await asyncio.to_thread(_check_writable_directory, path.parent)
        except (OSError, ValueError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ProviderConfigError(
                self._state_setting, f"cannot use {path} as the console state file: {detail}"
            ) from None
        self._flusher = asyncio.create_task(self._flush_loop(), name="local-console-state")

    async def close(self) -> None:
        """Writes the state file one last time, if anything changed.

        A failed write is logged, not raised: the process is stopping anyway.
        """
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
            if self._version != self._saved_version:
                await self._try_write_state(always_log=True)
        self._changed.set()

    async def _flush_loop(self) -> None:
        retry = _RETRY_FIRST
        while True:
            if self._saved_version == self._version:
                await self._dirty.wait()
            else:
                # The last write failed (a full disk): try again on the next
                # change, or after a pause without one. Console actions are
                # answered OK before the file holds them; waiting for another
                # change would leave the file behind the service's log for
                # good once the disk has room again, and a restart would
                # bring back a console that disagrees with it (a conversation
                # the agent ended, open again, taking replies nobody gets).
                await self._wait(self._dirty.wait(), retry)
                retry = min(retry * 2, _RETRY_MAX)
            self._dirty.clear()
            self._urgent.clear()
            if await self._try_write_state():
                retry = _RETRY_FIRST
            written, self._written = self._written, asyncio.Event()
            written.set()
            # Coalesce bursts of the console's changes into one write; a
            # provider call waiting for its change (``_persisted``) does not
            # wait out the pause.
            await self._wait(self._urgent.wait(), 0.2)

    async def _wait(self, until: Coroutine[Any, Any, Any], seconds: float) -> None:
        """Waits for ``until`` or ``seconds`` on the provider's clock, whichever is first."""
        pause = asyncio.ensure_future(self._clock.sleep(seconds))
        event = asyncio.ensure_future(until)
        try:
            await asyncio.wait((pause, event), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pause.cancel()
            event.cancel()

    async def _persisted(self, timeout: float) -> None:
        """Returns once the state file holds every change made so far.

        ``start``, ``send``, ``stop`` and ``abandon`` answer only then: what
        the service acknowledges must be in the console after a ``kill -9``
        (a conversation missing there would leave its session waiting on a
        chat that does not exist). Concurrent calls share one write.

        Raises:
            ProviderUnavailable: The file was not written (the error is
                logged); the change is kept in memory and a retry waits for
                the next write.
        """
        if self._state_file is None or self._flusher is None:
            return  # memory only, or not open (``close`` writes what is left)
        version = self._version
        try:
            async with asyncio.timeout(timeout):
                while self._saved_version < version:
                    written = self._written
                    self._dirty.set()
                    self._urgent.set()
                    await written.wait()
                    if self._saved_version < version and not self._dirty.is_set():
                        break  # that write failed and nothing newer is queued
        except TimeoutError:
            pass
        if self._saved_version < version:
            raise ProviderUnavailable(
                f"the console state file could not be written ({self._state_setting})",
                uncertain=True,
            )

    async def _try_write_state(self, *, always_log: bool = False) -> bool:
        version = self._version
        try:
            await self._write_state(version)
        except OSError as exc:
            # One line when writes start failing, then at most one a minute:
            # on a full disk every change and every waiting call tries again
            # (some 30 lines a second under load, seen in a drill).
            self._failed_writes += 1
            now = self._clock.monotonic()
            if always_log or self._failed_writes == 1 or now >= self._next_failure_log:
                self._next_failure_log = now + _FAILURE_LOG_EVERY
                log.error(
                    "local.state_write_failed",
                    setting=self._state_setting,
                    path=str(self._state_file),
                    error=str(exc),
                    failed_writes=self._failed_writes,
                )
            return False
        self._failed_writes = 0
        self._saved_version = version
        return True

    async def _write_state(self, version: int) -> None:
        if self._state_file is None:
            return
        # On the loop (a snapshot): orjson takes a tenth of json's time, which
        # a full console (~16 MB) made a ~50 ms stall of every call and webhook.
        payload = dumps({"conversations": [c.snapshot() for c in self._chats.values()]})
        path = self._state_file

        def write() -> None:
            with self._file_lock:
                if version < self._file_version:
                    return
                path.parent.mkdir(parents=True, exist_ok=True)
                # A name of its own: another process (the server, ``local
                # list``) may be writing next to it at the same moment.
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(payload)
                        f.flush()
                        os.fsync(f.fileno())  # on disk before the name points to it
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                _sync_directory(path.parent)  # the rename itself survives a crash
                self._file_version = version

        await asyncio.to_thread(write)

    def _prune(self) -> None:
        """Forgets the oldest ended conversations beyond ``_MAX_ENDED``."""
        ended = [c for c in self._chats.values() if c.status == ENDED]
        for old in ended[:-_MAX_ENDED]:
            del self._chats[old.id]
            self._forget_sent(old.id, old.messages)

    def _forget_sent(self, chat_id: str, dropped: list[dict[str, Any]]) -> None:
        """Forgets the request ids of messages the conversation no longer keeps
        (as a restart would: ``_load_state`` finds only the kept ones)."""
        for m in dropped:
            self._sent.pop((chat_id, m.get("request_id", "")), None)

    def _touch(self) -> None:
        self._prune()  # here, not in the writer: memory-only mode needs it too
        self._version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        self._dirty.set()

    # --- Provider -----------------------------------------------------------------
    async def probe(self, *, timeout: float) -> Sequence[str]:
        """See base class: nothing external to reach."""
        return []

    async def upsert_user(
        self, profile: UserProfile, user: ProviderUser | None, *, timeout: float
    ) -> ProviderUser:
        """See base class: the local side knows users by our id."""
        return ProviderUser(external_user_id=f"local:{profile.id}")

    async def start(
        self, request: StartRequest, user: ProviderUser, *, timeout: float
    ) -> StartResult:
        """See base class: a new waiting conversation.

        A retried start reuses its conversation, also one the service gave
        up on (START_INTERRUPTED) and retried, with the same request id, as
        a new session. The user's other open conversations are closed: the
        service keeps one open session per user, so nobody hears them.
        """
        async with self._lock:
            mine = [
                c
                for c in self._chats.values()
                if c.status != ENDED and c.user.get("id") == request.user.id
            ]
            retried = [
                c
                for c in mine
                if c.session_id == request.session_id
                or (request.request_id and c.request_id == request.request_id)
            ]
            for conv in mine:
                if conv not in retried:
                    conv.status = ENDED
                    conv.end_reason = "given up by the service: the user started a new handoff"
                    self._touch()
            if retried:
                result = self._resume(retried[0], request.session_id)
            else:
                result = self._open_conversation(request)
        await self._persisted(timeout)
        return result

    def _open_conversation(self, request: StartRequest) -> StartResult:
        """A new waiting conversation for ``request`` (under ``_lock``)."""
        conv = Conversation(
            id=f"lc_{uuid.uuid4().hex[:12]}",
            session_id=request.session_id,
            request_id=request.request_id,
            user={
                "id": request.user.id,
                "name": request.user.name,
                "email": request.user.email,
                "picture_url": request.user.picture_url,
            },
            title=request.title or "Handoff",
            description=request.description,
            group_id=request.group_id or self._default_group,
            created_at=self._clock.now().isoformat(),
            history=[
                {
                    "author": m.author.value,
                    **render_body(m),
                    "at": m.created_at.isoformat() if m.created_at else None,
                }
                for m in request.history
            ],
            metadata=dict(request.metadata),
        )
        self._chats[conv.id] = conv
        position = sum(1 for c in self._chats.values() if c.status == WAITING)
        queued = self._event(conv, Queued(position=position))
        self._touch()
        return StartResult(ProviderChat(conv.id), conv.group_id, (queued,))

    def _resume(self, conv: Conversation, session_id: str) -> StartResult:
        """``conv`` for a retried start, with an event for where it stands:
        the events of the attempt given up on may never have been stored."""
        conv.session_id = session_id
        kind: EventKind
        if conv.status == ACTIVE and conv.agent is not None:
            kind = AgentAssigned(Agent(id=conv.agent["id"], name=conv.agent["name"]))
        else:
            kind = Queued(position=sum(1 for c in self._chats.values() if c.status == WAITING))
        event = self._event(conv, kind)
        self._touch()
        return StartResult(ProviderChat(conv.id), conv.group_id, (event,))

    async def send(
        self,
        chat: ProviderChat,
        user: ProviderUser,
        message: Message,
        *,
        request_id: str,
        uncertain: bool,
        timeout: float,
    ) -> SendResult:
        """See base class: appends to the conversation, once per request id."""
        async with self._lock:
            conv = self._get(chat.external_chat_id)
            # A retry of a send the conversation has gets its answer, even
            # once ended (the outbox asks about it, uncertain, after a crash).
            known = self._sent.get((conv.id, request_id))
            if known is None:
                known = self._append(conv, request_id, message)
        # Also for a retry: the first attempt's write may have failed.
        await self._persisted(timeout)
        return SendResult(known)

    def _append(self, conv: Conversation, request_id: str, message: Message) -> str:
        """Adds the user's message to ``conv`` (under ``_lock``); returns its id."""
        if conv.status == ENDED:
            raise ChatInactive()
        entry = {
            "id": conv.next_message_id(),
            "author": Author.USER.value,
            "request_id": request_id,
            "at": self._clock.now().isoformat(),
            **render_body(message),
        }
        self._forget_sent(conv.id, conv.add_message(entry))
        self._sent[(conv.id, request_id)] = entry["id"]
        self._touch()
        return str(entry["id"])

    async def stop(
        self, chat: ProviderChat, user: ProviderUser, reason: str, *, timeout: float
    ) -> None:
        """See base class: closes the conversation (a no-op when closed)."""
        async with self._lock:
            conv = self._chats.get(chat.external_chat_id)
            if conv is not None and conv.status != ENDED:
                conv.status = ENDED
                conv.end_reason = reason or "stopped by the caller"
                self._touch()
        await self._persisted(timeout)

    async def abandon(
        self, user: ProviderUser, *, session_id: str, request_id: str, timeout: float
    ) -> bool:
        """See ``SupportsAbandon``: closes the conversation the session's
        start opened, unless a retry took it over (``_resume`` moves it to
        the retry's session)."""
        async with self._lock:
            conv = next(
                (
                    c
                    for c in self._chats.values()
                    if c.session_id == session_id and c.status != ENDED
                ),
                None,
            )
            if conv is None:
                return False
            conv.status = ENDED
            conv.end_reason = "given up by the service: the handoff failed to start"
            self._touch()
        await self._persisted(timeout)
        return True

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookBatch:
        """See base class: the console pushes through the sink instead."""
        raise WebhookRejected(404, "the local provider takes no webhooks; use /console")

    async def catch_up(
        self, chat: ProviderChat, user: ProviderUser, checkpoint: str, *, timeout: float
    ) -> CatchUp:
        """See base class: every event went through the sink already."""
        return CatchUp()

    def routes(self) -> Sequence[BaseRoute]:
        """See base class: the console page and its API."""
        from providers.local.console import console_routes

        return console_routes(self)

    async def run_command(self, argv: Sequence[str], out: TextIO) -> int:
        """``hitl-service local list``: prints the conversations."""
        if list(argv) != ["list"]:
            out.write("usage: hitl-service local list   (prints the console's conversations)\n")
            return 0 if list(argv) in (["-h"], ["--help"]) else 2
        for conv in self._chats.values():
            out.write(f"{conv.id}  {conv.status:8}  {conv.user.get('name', '')}  {conv.title}\n")
        return 0

    # --- console actions ------------------------------------------------------------
    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """(version, conversations newest first) for the console."""
        convs = sorted(self._chats.values(), key=lambda c: c.created_at, reverse=True)
        return self._version, [c.snapshot() for c in convs]

    def console_json(self) -> tuple[int, str]:
        """(version, ``{"version", "conversations"}`` as JSON) for the
        console's pages: encoded once per version, however many are open."""
        if self._console_json[0] != self._version:
            version, conversations = self.snapshot()
            self._console_json = (
                version,
                dumps({"version": version, "conversations": conversations}),
            )
        return self._console_json

    async def wait_for_change(
        self, version: int, timeout: float, *, unless: asyncio.Event | None = None
    ) -> None:
        """Returns when the state moved past ``version``, ``unless`` is set,
        or after ``timeout``."""
        if self._version != version or (unless is not None and unless.is_set()):
            return
        waits = [asyncio.ensure_future(self._changed.wait())]
        if unless is not None:
            waits.append(asyncio.ensure_future(unless.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def take(self, chat_id: str, agent: Agent) -> None:
        """An agent takes a waiting conversation.

        Taking one the same agent holds is a no-op (a double click); taking
        one another agent holds is refused.
        """

        def event(conv: Conversation) -> EventKind | None:
            if conv.status == WAITING:
                return AgentAssigned(agent)
            _refuse_if_held_by_another(conv, agent)
            return None

        await self._act(chat_id, agent, event, status=ACTIVE)

    async def reply(self, chat_id: str, agent: Agent, text: str) -> None:
        """An agent writes to the user."""

        def event(conv: Conversation) -> EventKind:
            _refuse_if_held_by_another(conv, agent)
            conv.add_message(
                {
                    "id": conv.next_message_id(),
                    "author": Author.AGENT.value,
                    "agent": agent.name,
                    "at": self._clock.now().isoformat(),
                    "text": text,
                }
            )
            return AgentMessage(Message(body=text, author=Author.AGENT), agent)

        await self._act(chat_id, agent, event, status=ACTIVE)

    async def transfer(self, chat_id: str, agent: Agent, group_id: str, reason: str) -> None:
        """An agent hands the conversation back to the queue of a group."""

        def event(conv: Conversation) -> EventKind:
            _refuse_if_held_by_another(conv, agent)
            conv.group_id = group_id or conv.group_id
            # From the agent holding it; a waiting conversation nobody held
            # is moved "from nobody" (Transferred.from_agent unset).
            holder = agent if conv.agent is not None else None
            return Transferred(from_agent=holder, to_group_id=conv.group_id, reason=reason)

        await self._act(chat_id, agent, event, status=WAITING)

    async def end(self, chat_id: str, agent: Agent, reason: str) -> None:
        """An agent closes the conversation."""

        def event(conv: Conversation) -> EventKind:
            _refuse_if_held_by_another(conv, agent)
            conv.end_reason = reason or "the agent closed the chat"
            return Ended(reason=conv.end_reason, by=EndedBy.AGENT)

        await self._act(chat_id, agent, event, status=ENDED)

    async def _act(
        self,
        chat_id: str,
        agent: Agent,
        make: Callable[[Conversation], EventKind | None],
        *,
        status: str,
    ) -> None:
        async with self._lock:
            current = self._get(chat_id)
            if current.status == ENDED:
                raise ProviderRejected("CHAT_ENDED", "this conversation has ended")
            # Change a copy, commit the event, then keep the copy: a failed
            # commit leaves the console as it was.
            conv = copy.deepcopy(current)
            kind = make(conv)
            if kind is None:  # nothing to do
                return
            conv.status = status
            conv.agent = None if status == WAITING else {"id": agent.id, "name": agent.name}
            inbound = self._event(conv, kind)
            await self._sink.deliver(WebhookBatch(action="console", events=(inbound,)))
            self._chats[chat_id] = conv
            self._forget_sent(chat_id, current.messages[: conv.trimmed - current.trimmed])
            self._touch()
        # The event is in the service's log: the agent is answered OK even if
        # the file was not written (logged), or a retry would repeat the event.
        with contextlib.suppress(ProviderUnavailable):
            await self._persisted(_ACTION_PERSIST_TIMEOUT)

    def _event(self, conv: Conversation, kind: EventKind) -> InboundEvent:
        # A key that never repeats: a counter would be reused after a crash,
        # since the state file lags the store, and the store would drop the
        # new event as a duplicate. Nothing redelivers console events
        # (``catch_up`` returns none), so keys need not be reproducible.
        conv.seq += 1
        return InboundEvent(
            external_chat_id=conv.id,
            kind=kind,
            dedupe_key=f"{conv.id}:{uuid.uuid4().hex}",
            occurred_at=self._clock.now(),
        )

    def _get(self, chat_id: str) -> Conversation:
        conv = self._chats.get(chat_id)
        if conv is None:
            raise ProviderRejected("CHAT_NOT_FOUND", f"no conversation {chat_id}")
        return conv


def _refuse_if_held_by_another(conv: Conversation, agent: Agent) -> None:
    """Only the agent holding a conversation acts on it (a waiting one has
    no holder: whoever replies first takes it)."""
    if conv.agent is not None and conv.agent.get("id") != agent.id:
        holder = conv.agent.get("name") or "another agent"
        raise ProviderRejected("CHAT_TAKEN", f"this conversation is held by {holder}")


def agent_from_name(name: str) -> Agent:
    """The console's agent identity: a stable id from the typed name.

    Letters and digits of any script are kept (case-folded), the rest become
    dashes; a name with none gets a short hash, so different names stay apart.
    """
    clean = " ".join(unicodedata.normalize("NFKC", name).split())[:80] or "Agent"
    folded = "".join(ch if ch.isalnum() else " " for ch in clean.casefold())
    slug = "-".join(folded.split())
    if not slug:
        slug = "agent-" + hashlib.sha256(clean.encode()).hexdigest()[:10]
    return Agent(id=f"console:{slug}", name=clean)


def dumps(value: Any) -> str:
    """JSON text of ``value``; what orjson refuses (a lone surrogate, say
    from a hand-edited state file) goes through the standard library."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value)


def _load_state(data: str) -> tuple[dict[str, Conversation], dict[tuple[str, str], str]]:
    """Conversations and sent request ids from a state file's text.

    Raises:
        ValueError: The text is not a console state file.
    """
    try:
        doc = json.loads(data)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except ValueError:
        raise ValueError("it is not JSON") from None
    # The key is required: a JSON file of another program has none, and
    # would be overwritten.
    raws = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(raws, list):
        raise ValueError('expected a JSON object with a "conversations" list')
    known = {f.name for f in dataclasses.fields(Conversation)}
    chats: dict[str, Conversation] = {}
    sent: dict[tuple[str, str], str] = {}
    try:
        for raw in raws:
            if not isinstance(raw.get("id"), str) or not isinstance(raw.get("messages", []), list):
                raise TypeError("bad conversation")
            conv = Conversation(**{k: v for k, v in raw.items() if k in known})
            chats[conv.id] = conv
            for m in conv.messages:
                if m.get("request_id"):
                    sent[(conv.id, m["request_id"])] = m["id"]
    except (AttributeError, KeyError, TypeError):
        raise ValueError("a conversation in it is malformed") from None
    return chats, sent


def create(deps: ProviderDeps) -> LocalProvider:
    """Builds the local provider (``HITL_LOCAL_STATE_FILE`` may move its file;
    ``HITL_LOCAL_STATE_FILE=`` with no value keeps everything in memory)."""
    default = str(deps.data_dir / "local-console.json")
    raw = deps.env.get(STATE_SETTING, default)
    # The console accepts requests for the host the sidecar listens on (and
    # loopback names); unset means the default, a loopback address.
    http_host = deps.env.get("HITL_HTTP_ADDR", "").strip().rpartition(":")[0].strip("[]")
    return LocalProvider(
        sink=deps.sink,
        clock=deps.clock,
        state_file=Path(raw) if raw else None,
        state_setting=STATE_SETTING if STATE_SETTING in deps.env else "HITL_DATA_DIR",
        default_group=_default_group(deps.env.get(GROUP_SETTING, "").strip() or "general"),
        http_host=http_host,
    )


def _default_group(group: str) -> str:
    """The default group, one StartHitl accepts (as is a console transfer's)."""
    if not GROUP_ID_PATTERN.fullmatch(group):
        raise ProviderConfigError(GROUP_SETTING, GROUP_ID_RULE)
    return group
