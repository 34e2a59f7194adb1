"""The LiveChat provider: handoffs as LiveChat chats.

The bridge acts as an agent (the personal access token) to open, route and
close chats, and as one LiveChat customer per end user (customer tokens) to
send the end user's messages. Agents' replies come back through webhooks
(:mod:`providers.livechat.webhooks`) or :meth:`LiveChatProvider.catch_up`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, TextIO

import structlog

from providers import fallback
from providers.errors import (
    ChatInactive,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)
from providers.livechat import mapping, normalize
from providers.livechat.budget import Budget, bounded
from providers.livechat.client import AnsweredUnavailable, ApiError, FetchFailed, LiveChatClient
from providers.livechat.customers import Customers
from providers.livechat.failures import (
    group_error,
    is_group_error,
    is_no_agent,
    map_api_error,
)
from providers.livechat.memory import OWN_CUSTOM_ID_PREFIX, ChatMemory
from providers.livechat.models import (
    LcChat,
    LcEvent,
    as_dict,
    as_str,
    parse_chat,
    parse_threads,
    str_list,
)
from providers.livechat.settings import LiveChatSettings, is_group_number
from providers.livechat.webhooks import WebhookParser
from providers.types import (
    THREAD_STATE_KEY,
    Capabilities,
    CatchUp,
    InboundEvent,
    InvalidField,
    Location,
    Media,
    Message,
    ProviderChat,
    ProviderUser,
    SendResult,
    StartFields,
    StartRequest,
    StartResult,
    UserProfile,
    WebhookBatch,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from starlette.routing import BaseRoute

    from providers.base import ProviderDeps

log = structlog.get_logger(__name__)

# Refusals meaning the chat is in a group the bridge agent cannot access.
_NO_ACCESS: Final = ("authorization", "missing_access")
_GONE: Final = ("not_found", "chat_not_found")  # LiveChat has no such chat
# The part of a send's remaining time a media download may use.
_MEDIA_FETCH_SHARE: Final = 0.5
_GROUP_ID_RULE: Final = (
    'LiveChat group ids are decimal numbers up to 2147483647, e.g. "0" (General) or "19"'
)


@dataclass(frozen=True, slots=True)
class _Part:
    """One event of a (possibly multi-part) end-user message.

    ``build`` makes the event (uploading a file if needed) and returns None
    when it cannot, in which case ``fallback`` is sent instead. A part
    ``after_fallback`` is the rest of the text fallback of the part before
    it: sent only if that one went as its fallback.
    """

    custom_id: str
    build: Callable[[], Awaitable[dict[str, Any] | None]]
    fallback: dict[str, Any] | None = None
    after_fallback: bool = False
    event: dict[str, Any] | None = None  # what ``build`` makes, when known (not a file)

    def is_shown_by(self, found: LcEvent) -> bool:
        """Whether ``found``, an event of the chat with this part's custom id,
        is this part.

        A custom id ending in ``#<n>`` is also the n-th part of the message
        whose request id is what precedes it (``x#2``: a message ``x#2``, or
        the second part of a long message ``x``): such an event counts only
        if it shows what this part sends, or its retry would take the other
        message's part for its own and never send.
        """
        if not _PART_SUFFIX.search(self.custom_id):
            return True
        if self.event is None and found.type == "file":
            return True  # an uploaded file: nothing to compare
        return any(
            sent["type"] == found.type
            and (found.type != "message" or _same_text(sent["text"], found.text))
            for sent in (self.event, self.fallback)
            if sent is not None
        )


_PART_SUFFIX: Final = re.compile(r"#[0-9]+\Z")


def _same_text(sent: str, shown: str) -> bool:
    """Texts equal but for whitespace (in case LiveChat trims or folds it)."""
    return sent.split() == shown.split()


def _text_event(text: str) -> dict[str, Any]:
    return {"type": "message", "text": text, "visibility": "all"}


class LiveChatProvider:
    """Serves handoffs through LiveChat. See the package docstring."""

    name = "livechat"
    capabilities = Capabilities(
        media=True,
        location=False,
        card=True,
        transfers=True,
        queue_info=True,
        catch_up=True,
        settle_seconds=15.0,
    )

    def __init__(self, settings: LiveChatSettings, deps: ProviderDeps) -> None:
        self.settings = settings
        # LiveChat may work on a call for up to its server timeout.
        self.capabilities = replace(
            LiveChatProvider.capabilities, settle_seconds=settings.server_timeout
        )
        self.data_dir = deps.data_dir
        self.clock = deps.clock
        self.client = LiveChatClient(settings, deps.http_transport, deps.registry)
        self.memory = ChatMemory({settings.account_id, settings.agent_id})
        self.customers = Customers(self.client, deps.clock, settings.organization_id)
        self._webhooks = WebhookParser(
            settings.webhook_secrets, settings.organization_id, self.memory
        )

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """See base class."""
        await self.client.open()

    async def close(self) -> None:
        """See base class."""
        await self.client.aclose()

    def routes(self) -> Sequence[BaseRoute]:
        """See base class. The sidecar serves ``/webhooks/livechat`` itself."""
        return ()

    # -- probe ---------------------------------------------------------------------

    async def probe(self, *, timeout: float) -> Sequence[str]:
        """See base class."""
        from providers.livechat.probe import run_probe

        async with bounded("probe", timeout) as budget:
            return await run_probe(self, budget)

    # -- users ---------------------------------------------------------------------

    async def upsert_user(
        self, profile: UserProfile, user: ProviderUser | None, *, timeout: float
    ) -> ProviderUser:
        """See base class."""
        async with bounded("upsert_user", timeout) as budget:
            if user is None or not as_dict(user.state.get("cookies")):
                if user is not None:
                    log.warning(
                        "livechat.customer_without_cookies", customer_id=user.external_user_id
                    )
                user = await self.customers.create(budget)
            else:
                # A new handoff checks the identity is still LiveChat's (one grant):
                # a customer LiveChat forgot is replaced here, not found lost by
                # every message of the handoff (the token may still look fresh).
                try:
                    await self.customers.refresh(user, budget, adopt=True)
                except ProviderUnavailable:
                    # The check is a precaution: with a token still fresh, an
                    # accounts outage must not fail a start that needs none.
                    if self.customers.needs_refresh(user):
                        raise
                    log.warning(
                        "livechat.customer_check_skipped", customer_id=user.external_user_id
                    )
            await self.customers.update_profile(user, profile, budget)
            return user

    # -- start ---------------------------------------------------------------------

    def validate_start(self, fields: StartFields) -> Sequence[InvalidField]:
        """See ``SupportsValidation``: a group id must be a LiveChat group number."""
        if fields.group_id and not is_group_number(fields.group_id):
            return [InvalidField("group_id", _GROUP_ID_RULE)]
        return ()

    def _group(self, group_id: str) -> int:
        if not group_id:
            return self.settings.group_id
        if not is_group_number(group_id):
            # The core refuses it before the start (``validate_start``).
            raise ProviderRejected("INVALID_GROUP_ID", f"{_GROUP_ID_RULE}; got {group_id[:40]!r}")
        return int(group_id)

    def _group_failure(self, err: ApiError, group: int) -> Exception:
        if is_group_error(err):
            return group_error(err, group, self.settings.group_id)
        return map_api_error(err)

    async def start(
        self, request: StartRequest, user: ProviderUser, *, timeout: float
    ) -> StartResult:
        """See base class."""
        group = self._group(request.group_id)
        async with bounded("start", timeout) as budget:
            key = request.request_id or request.session_id
            events = [
                {**_text_event(text), "custom_id": f"{OWN_CUSTOM_ID_PREFIX}{key}:{index}"}
                for index, text in enumerate(
                    mapping.start_texts(
                        request.title, request.description, request.history, request.metadata
                    )
                )
            ]
            customer_id = user.external_user_id
            previous = request.previous_chat
            if (
                previous is not None
                and (as_str(previous.state.get("customer_id")) or customer_id) != customer_id
            ):
                # The identity was replaced since: that chat is another customer's.
                previous = None
            chat_id = (previous.external_chat_id if previous else "") or as_str(
                user.state.get("chat_id")
            )
            if not chat_id:
                chat_id = await self._existing_chat(customer_id, budget)
            thread_id = ""
            if chat_id:
                try:
                    thread_id = await self._resume(chat_id, group, events, budget)
                except ApiError as err:
                    if err.type not in _NO_ACCESS or await self._within_reach(chat_id, budget):
                        # Not the chat's group: a token without the scope to
                        # resume chats (LiveChat's word is the same) is the
                        # setting to fix, not a reason to drop the customer.
                        raise
                    # An agent moved the customer's one chat to a group the
                    # bridge agent cannot access: it can neither resume nor
                    # read it, so every handoff of this user would fail. A
                    # new customer gets a chat of its own.
                    customer_id = await self._replace_customer(user, request.user, budget)
                    log.warning(
                        "livechat.customer_replaced",
                        reason="chat out of the bridge agent's reach",
                        chat_id=chat_id,
                        customer_id=customer_id,
                    )
            if not thread_id:
                chat_id, thread_id = await self._start_chat(customer_id, group, events, budget)
            user.state["chat_id"] = chat_id
            facts = self.memory.facts(chat_id)
            facts.customers.add(customer_id)
            facts.start_group = str(group)
            facts.stopped_by_us = False
            await self._transfer(chat_id, group, budget)
            known = await self._initial_events(chat_id, thread_id, budget)
            log.info("livechat.started", chat_id=chat_id, thread_id=thread_id, group_id=group)
            return StartResult(
                chat=ProviderChat(
                    external_chat_id=chat_id,
                    state={
                        "thread_id": thread_id,
                        "group_id": str(group),
                        "customer_id": customer_id,
                    },
                ),
                group_id=str(group),
                events=known,
            )

    async def _existing_chat(self, customer_id: str, budget: Budget) -> str:
        """The customer's chat, if LiveChat already has one (one per customer)."""
        try:
            found = await self.client.agent(
                "get_customer", {"id": customer_id}, timeout=budget.left(), idempotent=True
            )
        except ApiError as err:
            if err.type in ("not_found", "customer_not_found"):
                return ""
            raise
        chat_ids = str_list(as_dict(found).get("chat_ids"))
        return chat_ids[0] if chat_ids else ""

    async def _start_chat(
        self, customer_id: str, group: int, events: list[dict[str, Any]], budget: Budget
    ) -> tuple[str, str]:
        body = {
            "chat": {
                "access": {"group_ids": [group]},
                "users": [{"id": customer_id, "type": "customer"}],
                "thread": {"events": events},
            },
            "continuous": True,
        }
        try:
            answer = as_dict(await self.client.agent("start_chat", body, timeout=budget.sending()))
        except ApiError as err:
            if is_group_error(err) or err.type in ("authentication", "authorization"):
                raise self._group_failure(err, group) from None
            # The customer may already have a chat (one per customer): resume it.
            chat_id = await self._existing_chat(customer_id, budget)
            if not chat_id:
                raise self._group_failure(err, group) from None
            thread_id = await self._resume(chat_id, group, events, budget)
            if not thread_id:
                raise self._group_failure(err, group) from None
            return chat_id, thread_id
        chat_id, thread_id = as_str(answer.get("chat_id")), as_str(answer.get("thread_id"))
        if not chat_id:
            raise ProviderUnavailable(
                "LiveChat start_chat answered without a chat id", uncertain=True
            )
        self.memory.created_events(str_list(answer.get("event_ids")))
        return chat_id, thread_id

    async def _resume(
        self, chat_id: str, group: int, events: list[dict[str, Any]], budget: Budget
    ) -> str:
        """Resumes the chat (or reuses it if still active); "" if it is gone."""
        body = {
            "chat": {"id": chat_id, "access": {"group_ids": [group]}, "thread": {"events": events}},
            "continuous": True,
        }
        try:
            answer = as_dict(await self.client.agent("resume_chat", body, timeout=budget.sending()))
        except ApiError as err:
            if err.type in _NO_ACCESS:
                raise  # ``start`` decides; from ``_start_chat`` it is mapped
            if is_group_error(err) or err.type == "authentication":
                raise self._group_failure(err, group) from None
            if err.type in _GONE:
                return ""
            chat = await self._get_chat(chat_id, "", budget)
            if chat is None or chat.thread is None or not chat.thread.active:
                raise
            # Still active (an earlier start whose answer was lost, or a chat
            # nobody closed): reuse it, adding the transcript if it is missing.
            log.info("livechat.chat_reused", chat_id=chat_id, thread_id=chat.thread.id)
            present = {e.custom_id for e in chat.thread.events}
            for event in events:
                if event["custom_id"] not in present:
                    await self._post_note(chat_id, event, budget)
            return chat.thread.id
        self.memory.created_events(str_list(answer.get("event_ids")))
        thread_id = as_str(answer.get("thread_id"))
        if not thread_id:
            raise ProviderUnavailable(
                "LiveChat resume_chat answered without a thread id", uncertain=True
            )
        return thread_id

    async def _within_reach(self, chat_id: str, budget: Budget) -> bool:
        """Whether the bridge agent can read the chat (so a refusal to
        resume it is not about the chat's group)."""
        try:
            await self._get_chat(chat_id, "", budget)
        except ApiError as err:
            if err.type in _NO_ACCESS:
                return False
            raise
        return True

    async def _replace_customer(
        self, user: ProviderUser, profile: UserProfile, budget: Budget
    ) -> str:
        """Gives ``user`` a new LiveChat customer (state and profile); returns its id."""
        fresh = await self.customers.create(budget)
        user.external_user_id = fresh.external_user_id
        user.state.clear()
        user.state.update(fresh.state)
        await self.customers.update_profile(user, profile, budget)
        return user.external_user_id

    async def _post_note(self, chat_id: str, event: dict[str, Any], budget: Budget) -> None:
        """Adds a transcript event to a reused chat; failures only cost context."""
        try:
            await self.client.agent(
                "send_event", {"chat_id": chat_id, "event": event}, timeout=budget.sending()
            )
        except ApiError as err:
            log.warning("livechat.transcript_not_added", chat_id=chat_id, error_type=err.type)

    async def _transfer(self, chat_id: str, group: int, budget: Budget) -> None:
        body = {
            "id": chat_id,
            "target": {"type": "group", "ids": [group]},
            "ignore_agents_availability": True,
            "ignore_requester_presence": True,
        }
        try:
            await self.client.agent("transfer_chat", body, timeout=budget.left(), idempotent=True)
        except ApiError as err:
            # Close what we opened so no half-started chat lingers: only then
            # is the refusal an answer (``Provider.start``).
            await self._deactivate_quietly(chat_id, budget)
            if is_no_agent(err):
                raise ProviderRejected(
                    "NO_AGENT_AVAILABLE",
                    f"no agent of LiveChat group {group} can take the chat, and LiveChat "
                    "would not queue it",
                ) from None
            raise self._group_failure(err, group) from None

    async def _deactivate_as_agent(self, chat_id: str, budget: Budget) -> None:
        """Agent ``deactivate_chat``: closes the chat's active thread, whatever
        it is (LiveChat takes no thread id)."""
        await self.client.agent(
            "deactivate_chat",
            {"id": chat_id, "ignore_requester_presence": True},
            timeout=budget.left(),
            idempotent=True,
        )

    async def _deactivate_quietly(self, chat_id: str, budget: Budget) -> None:
        """Closes a chat the start opened and is refusing.

        Raises:
            ProviderUnavailable: LiveChat could not be reached to close it:
                the start is unfinished, not refused, so that the core
                retries it (reusing the chat) or, given up, closes the chat
                later (``abandon``) instead of leaving it open unheard.
        """
        try:
            await self._deactivate_as_agent(chat_id, budget)
        except ApiError as err:
            log.warning("livechat.cleanup_failed", chat_id=chat_id, error=type(err).__name__)
        except ProviderUnavailable as err:
            log.warning("livechat.cleanup_failed", chat_id=chat_id, error=type(err).__name__)
            raise ProviderUnavailable(
                f"LiveChat refused the start, and the chat it opened could not be closed: {err}",
                retry_after=err.retry_after,
                uncertain=True,
            ) from None

    async def _initial_events(
        self, chat_id: str, thread_id: str, budget: Budget
    ) -> list[InboundEvent]:
        """Queue position and agents already known right after the start."""
        try:
            chat = await self._get_chat(chat_id, thread_id, budget)
        except (ApiError, ProviderUnavailable) as err:
            log.info("livechat.start_snapshot_skipped", chat_id=chat_id, error=type(err).__name__)
            return []
        if chat is None or chat.thread is None:
            return []
        return normalize.thread_events(self.memory, chat_id, chat.thread, chat.users, "")

    async def _get_chat(self, chat_id: str, thread_id: str, budget: Budget) -> LcChat | None:
        body = {"chat_id": chat_id, **({"thread_id": thread_id} if thread_id else {})}
        answer = await self.client.agent("get_chat", body, timeout=budget.left(), idempotent=True)
        return parse_chat(answer)

    # -- send ----------------------------------------------------------------------

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
        """See base class."""
        custom_ids: set[str] = set()
        try:
            return await self._send(chat, user, message, request_id, uncertain, timeout, custom_ids)
        except ProviderUnavailable as exc:
            # A send LiveChat may still be carrying out: the retry must not
            # look for it before then, whichever process makes it (this
            # process's memory of the send dies with it).
            wait = self._unanswered_wait(custom_ids)
            if wait > (exc.retry_after or 0.0):
                exc.retry_after = wait
            raise

    async def _send(
        self,
        chat: ProviderChat,
        user: ProviderUser,
        message: Message,
        request_id: str,
        uncertain: bool,
        timeout: float,
        custom_ids: set[str],
    ) -> SendResult:
        async with bounded("send", timeout) as budget:
            parts = self._parts(user, message, request_id, budget)
            custom_ids.update(p.custom_id for p in parts)
            found: dict[str, LcEvent] = {}
            if uncertain:
                self._wait_for_unanswered({p.custom_id for p in parts})
                found = await self._sent_custom_ids(chat, user, parts, budget)
            event_ids: list[str] = []
            fell_back = False  # the last part went as its text fallback
            skipped = 0
            for part in parts:
                if part.after_fallback and not fell_back:
                    skipped += 1
                    continue
                if part.custom_id in found:
                    event = found[part.custom_id]
                    event_ids.append(event.id)
                    if not part.after_fallback:
                        fell_back = part.fallback is not None and (
                            event.type == part.fallback["type"]
                        )
                    continue
                try:
                    event_id, as_fallback = await self._send_part(chat, user, part, budget)
                except ApiError as err:
                    error = _after_parts(map_api_error(err), len(event_ids), len(parts) - skipped)
                    raise error from None
                except ProviderError as exc:
                    raise _after_parts(exc, len(event_ids), len(parts) - skipped) from None
                event_ids.append(event_id)
                if not part.after_fallback:
                    fell_back = as_fallback
            log.info(
                "livechat.sent",
                chat_id=chat.external_chat_id,
                parts=len(parts),
                skipped=len(found),
                kind=type(message.body).__name__,
            )
            return SendResult(external_message_id=event_ids[0] if event_ids else "")

    def _wait_for_unanswered(self, custom_ids: set[str]) -> None:
        """Refuses to look for events whose send may still take effect.

        A ``send_event`` we stopped waiting for (timeout, lost connection) may
        still be running at LiveChat and store its event after a listing has
        shown it missing; sending again then would show the agent the message
        twice. LiveChat works on a call for at most ``server_timeout``, so the
        check waits until then.

        Raises:
            ProviderUnavailable: Too early; ``retry_after`` says how long to wait.
        """
        wait = self._unanswered_wait(custom_ids)
        if wait > 0:
            log.info("livechat.send_may_be_running", wait=round(wait, 3))
            raise ProviderUnavailable(
                "LiveChat may still be working on the earlier attempt",
                retry_after=wait,
                uncertain=True,
            )

    def _unanswered_wait(self, custom_ids: set[str]) -> float:
        """Seconds LiveChat may still be working on an unanswered send of one
        of ``custom_ids`` (0 if none)."""
        now = self.clock.monotonic()
        sent = [at for c in custom_ids if (at := self.memory.unanswered_since(c)) is not None]
        return max((at + self.settings.server_timeout - now for at in sent), default=0.0)

    def _parts(
        self, user: ProviderUser, message: Message, request_id: str, budget: Budget
    ) -> list[_Part]:
        """The events a message becomes, with their custom ids."""
        specs: list[
            tuple[
                Callable[[], Awaitable[dict[str, Any] | None]],
                dict[str, Any] | None,
                bool,
                dict[str, Any] | None,
            ]
        ] = []

        def text_parts(text: str, *, after_fallback: bool = False) -> None:
            for piece in mapping.split_text(text or " "):
                event = _text_event(piece)
                specs.append((_constant(event), None, after_fallback, event))

        body = message.body
        if isinstance(body, str):
            text_parts(body)
        elif isinstance(body, Media):
            media = body

            async def build_file() -> dict[str, Any] | None:
                return await self._upload(user, media, budget)

            plain = Media(media.kind, media.url, media.name, media.mime_type, media.size_bytes)
            specs.append((build_file, _text_event(fallback.media_text(plain)), False, None))
            if media.caption:
                text_parts(media.caption)
        elif isinstance(body, Location):
            text_parts(fallback.location_text(body))
        else:
            rich = mapping.card_event(body, f"{request_id[:40]}:")
            # The card as text if LiveChat refuses the rich message: every
            # piece of it (the buttons past 13 follow anyway, as text).
            shown = replace(body, buttons=body.buttons[: mapping.MAX_BUTTONS])
            first, *rest = mapping.split_text(fallback.card_text(shown))
            specs.append((_constant(rich), _text_event(first), False, rich))
            for piece in rest:
                text_parts(piece, after_fallback=True)
            if overflow := mapping.overflow_buttons_text(body):
                text_parts(overflow)
        return [
            _Part(request_id if i == 0 else f"{request_id}#{i + 1}", build, as_text, after, event)
            for i, (build, as_text, after, event) in enumerate(specs)
        ]

    async def _send_part(
        self, chat: ProviderChat, user: ProviderUser, part: _Part, budget: Budget
    ) -> tuple[str, bool]:
        """Sends one part; returns its event id and whether it went as its fallback."""
        event = await part.build() or part.fallback
        if event is None:
            raise ValueError("a message part without an event or a fallback")
        try:
            event_id = await self._send_event(
                chat, user, {**event, "custom_id": part.custom_id}, budget
            )
        except ApiError as err:
            # A rich message LiveChat refuses still reaches the agent as text.
            if part.fallback is None or err.type != "validation" or event is part.fallback:
                raise
            log.info("livechat.fallback_to_text", chat_id=chat.external_chat_id, kind=event["type"])
            event_id = await self._send_event(
                chat, user, {**part.fallback, "custom_id": part.custom_id}, budget
            )
            return event_id, True
        return event_id, event is part.fallback

    async def _send_event(
        self, chat: ProviderChat, user: ProviderUser, event: dict[str, Any], budget: Budget
    ) -> str:
        custom_id = event["custom_id"]
        # Unanswered until LiveChat says something (see _wait_for_unanswered).
        self.memory.sent_custom_id(custom_id, self.clock.monotonic())
        try:
            answer = await self.customers.call(
                user, "send_event", {"chat_id": chat.external_chat_id, "event": event}, budget
            )
        except ApiError as err:
            self.memory.answered(custom_id)
            if err.type == "chat_inactive":
                raise ChatInactive() from None
            raise
        except AnsweredUnavailable:
            self.memory.answered(custom_id)
            raise
        self.memory.answered(custom_id)
        return as_str(as_dict(answer).get("event_id"))

    async def _upload(
        self, user: ProviderUser, media: Media, budget: Budget
    ) -> dict[str, Any] | None:
        """Fetches and uploads a media file; None when it must go as a link."""
        try:
            # A share only: a slow media host must leave time for the fallback
            # (the media as a readable link), or every retry would run out too.
            fetched = await self.client.fetch(
                media.url,
                max_bytes=self.settings.max_upload_bytes,
                timeout=budget.left() * _MEDIA_FETCH_SHARE,
            )
        except FetchFailed as exc:
            log.info("livechat.media_as_link", reason=str(exc), size=media.size_bytes)
            return None
        content_type = media.mime_type or fetched.content_type or "application/octet-stream"
        try:
            url = await self.customers.upload(
                user, fallback.media_name(media), fetched.content, content_type, budget
            )
        except ApiError as err:
            log.info("livechat.media_as_link", reason=err.type, size=len(fetched.content))
            return None
        return {"type": "file", "url": url}

    async def _sent_custom_ids(
        self, chat: ProviderChat, user: ProviderUser, parts: list[_Part], budget: Budget
    ) -> dict[str, LcEvent]:
        """The parts the session's thread already shows, by custom id.

        Only that thread: a request id may come back after the service forgot
        it (48 hours), and the chat's earlier threads (the user's earlier
        handoffs) may hold an event with it that is not this message.
        """
        wanted = {part.custom_id: part for part in parts}
        own_thread = as_str(chat.state.get(THREAD_STATE_KEY))
        answer = await self.customers.call(
            user,
            "list_threads",
            {"chat_id": chat.external_chat_id, "sort_order": "desc", "limit": 3},
            budget,
            idempotent=True,
        )
        found: dict[str, LcEvent] = {}
        for thread in parse_threads(answer):
            if own_thread and thread.id != own_thread:
                continue
            for event in thread.events:
                part = wanted.get(event.custom_id)
                if part is not None and part.is_shown_by(event):
                    found.setdefault(event.custom_id, event)
        if found:
            log.info("livechat.already_sent", chat_id=chat.external_chat_id, parts=len(found))
        return found

    # -- stop ----------------------------------------------------------------------

    async def stop(
        self, chat: ProviderChat, user: ProviderUser, reason: str, *, timeout: float
    ) -> None:
        """See base class. Uses ``deactivate_chat``; LiveChat has no ``close_chat``.

        ``deactivate_chat`` closes whatever thread is active in the chat, and
        a customer has one chat: once the session's thread is closed (its
        webhook lost or not yet processed), the active one may be a later
        handoff of the same end user. So when the session's thread is known,
        the chat is read first and only that thread is closed.
        """
        chat_id = chat.external_chat_id
        own_thread = as_str(chat.state.get(THREAD_STATE_KEY))
        facts = self.memory.facts(chat_id)
        was_stopped = facts.stopped_by_us
        try:
            async with bounded("stop", timeout) as budget:
                if own_thread and not await self._still_active(chat_id, own_thread, user, budget):
                    return
                facts.stopped_by_us = True  # its webhook may come before the answer
                await self._deactivate(chat_id, user, budget)
        except BaseException:
            facts.stopped_by_us = was_stopped
            raise

    async def _still_active(
        self, chat_id: str, thread_id: str, user: ProviderUser, budget: Budget
    ) -> bool:
        """Whether the chat's active thread is ``thread_id`` (True also when
        LiveChat does not have the chat: ``deactivate_chat`` answers that)."""
        current = await self._chat_as_it_is(chat_id, user, budget)
        if current is None:
            return True
        if current.thread is None or not current.thread.active:
            log.info("livechat.already_inactive", chat_id=chat_id, thread_id=thread_id)
            return False
        if current.thread.id != thread_id:
            log.info(
                "livechat.stop_left_newer_thread",
                chat_id=chat_id,
                thread_id=thread_id,
                active_thread_id=current.thread.id,
            )
            return False
        return True

    async def _deactivate(self, chat_id: str, user: ProviderUser, budget: Budget) -> None:
        """Closes the chat's active thread; an inactive chat is left as it is."""
        try:
            await self._deactivate_as_agent(chat_id, budget)
        except ApiError as err:
            if err.type == "chat_inactive":
                log.info("livechat.already_inactive", chat_id=chat_id)
                return
            if err.type in _NO_ACCESS:
                # Moved to a group the bridge agent is not in (like catch_up).
                await self._deactivate_as_customer(chat_id, user, err, budget)
                log.info("livechat.stopped_as_customer", chat_id=chat_id)
                return
            if err.type == "authentication":
                raise
            try:
                current = await self._chat_as_it_is(chat_id, user, budget)
            except ApiError:
                raise err from None  # the refusal to report is the close's, not the read's
            if current is None and err.type in _GONE:
                # Deleted or anonymised at LiveChat (get_chat agrees): nothing
                # left to close. Raised, it failed every stop for good, and
                # the session stayed open, refusing the user's next handoffs.
                log.warning("livechat.chat_gone", chat_id=chat_id)
                return
            if current is not None and (current.thread is None or not current.thread.active):
                log.info("livechat.already_inactive", chat_id=chat_id)
                return
            raise
        log.info("livechat.stopped", chat_id=chat_id)

    async def abandon(
        self, user: ProviderUser, *, session_id: str, request_id: str, timeout: float
    ) -> bool:
        """See ``SupportsAbandon``: deactivates the customer's chat if its
        current thread holds this start's transcript (the events ``start``
        posts with custom ids made of the request id); an inactive chat, or
        a thread another start opened, is left alone."""
        async with bounded("abandon", timeout) as budget:
            stored = as_str(user.state.get("chat_id"))
            chat_id = stored or await self._existing_chat(user.external_user_id, budget)
            chat = await self._chat_as_it_is(chat_id, user, budget) if chat_id else None
            if chat is None and stored:
                # LiveChat no longer has the chat the state names: the start
                # opened a new one (as ``start`` does then), and may have died
                # before the state recorded it.
                chat_id = await self._existing_chat(user.external_user_id, budget)
                if chat_id and chat_id != stored:
                    chat = await self._chat_as_it_is(chat_id, user, budget)
            if chat is None or chat.thread is None or not chat.thread.active:
                return False
            mark = f"{OWN_CUSTOM_ID_PREFIX}{request_id or session_id}:"
            if not any(event.custom_id.startswith(mark) for event in chat.thread.events):
                return False
            await self.stop(
                ProviderChat(chat_id, {THREAD_STATE_KEY: chat.thread.id}),
                user,
                "the handoff failed to start",
                timeout=budget.left(),
            )
        log.info("livechat.abandoned_chat_closed", chat_id=chat_id, thread_id=chat.thread.id)
        return True

    async def _chat_as_it_is(
        self, chat_id: str, user: ProviderUser, budget: Budget
    ) -> LcChat | None:
        """The chat with its latest thread; None if LiveChat does not have it.

        Moved to a group the bridge agent cannot access (an agent took the
        waiting chat and passed it on), it is read as the customer, like
        ``catch_up`` does; ``stop`` closes it as the customer then.
        """
        try:
            return await self._get_chat(chat_id, "", budget)
        except ApiError as err:
            if err.type in _GONE:
                return None
            if err.type not in ("authorization", "missing_access"):
                raise
        return parse_chat(
            await self.customers.call(
                user, "get_chat", {"chat_id": chat_id}, budget, idempotent=True
            )
        )

    async def _deactivate_as_customer(
        self, chat_id: str, user: ProviderUser, agent_err: ApiError, budget: Budget
    ) -> None:
        """Closes the chat as its customer after the agent was refused.

        Raises:
            ApiError: ``agent_err`` when the customer is refused too, so a
                token without access is reported naming its setting.
        """
        try:
            await self.customers.call(
                user, "deactivate_chat", {"id": chat_id}, budget, idempotent=True
            )
        except ApiError as err:
            if err.type == "chat_inactive":
                return
            log.warning("livechat.customer_stop_refused", chat_id=chat_id, error_type=err.type)
            raise agent_err from None

    # -- inbound -------------------------------------------------------------------

    def parse_webhook(self, headers: Mapping[str, str], body: bytes) -> WebhookBatch:
        """See base class and :mod:`providers.livechat.webhooks`."""
        return self._webhooks.parse(headers, body)

    async def catch_up(
        self, chat: ProviderChat, user: ProviderUser, checkpoint: str, *, timeout: float
    ) -> CatchUp:
        """See base class.

        A session is one LiveChat thread (the one ``start`` opened), so this
        reads that thread with ``get_chat`` and reports what a webhook would
        have: agent messages after ``checkpoint`` (an event id), agents
        present, the queue position, and the end once the thread is closed.
        If the bridge agent lost access to the chat (moved to another group),
        it reads the chat as the customer instead.
        """
        async with bounded("catch_up", timeout) as budget:
            chat_id = chat.external_chat_id
            thread_id = as_str(chat.state.get("thread_id"))
            try:
                found = await self._get_chat(chat_id, thread_id, budget)
            except ApiError as err:
                if err.type not in ("authorization", "missing_access"):
                    raise
                body = {"chat_id": chat_id, **({"thread_id": thread_id} if thread_id else {})}
                found = parse_chat(
                    await self.customers.call(user, "get_chat", body, budget, idempotent=True)
                )
            if found is None or found.thread is None:
                return CatchUp((), checkpoint)
            thread = found.thread
            events = normalize.thread_events(self.memory, chat_id, thread, found.users, checkpoint)
            last = thread.events[-1].id if thread.events else checkpoint
            return CatchUp(tuple(events), last)

    # -- commands ------------------------------------------------------------------

    async def run_command(self, argv: Sequence[str], out: TextIO) -> int:
        """See ``SupportsCommands``: ``register-webhooks``, ``unregister-webhooks``."""
        from providers.livechat.commands import run

        return await run(self, argv, out)


def _constant(event: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any] | None]]:
    async def build() -> dict[str, Any] | None:
        return event

    return build


def _after_parts(exc: ProviderError, sent: int, total: int) -> ProviderError:
    """A failure of part ``sent + 1`` of a message whose first parts are sent."""
    if sent == 0:
        return exc
    if isinstance(exc, ProviderUnavailable):
        # Part one is at LiveChat: the retry must look for what arrived.
        if exc.uncertain:
            return exc
        return ProviderUnavailable(str(exc), retry_after=exc.retry_after, uncertain=True)
    if isinstance(exc, ProviderRejected) and not isinstance(exc, ChatInactive | ProviderAuthError):
        # Say what the agent has, so the caller does not send it all again.
        return ProviderRejected(
            exc.code,
            f"LiveChat refused part {sent + 1} of {total} (the agent has the first {sent}): {exc}",
        )
    return exc
