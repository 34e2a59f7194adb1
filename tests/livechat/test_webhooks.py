"""parse_webhook: verification, every action, filters and stable dedupe keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from providers.errors import WebhookRejected
from providers.livechat import LiveChatProvider
from providers.types import (
    AgentAssigned,
    AgentLeft,
    AgentMessage,
    Card,
    Ended,
    EndedBy,
    Media,
    MediaKind,
    Queued,
    Transferred,
)
from tests.livechat.conftest import WEBHOOK_SECRET, MakeProvider, kind_of, offline_provider

ORG = "0b8e6f3e-2f0c-4a9e-b8a1-7d2c5e9f1a33"
BRIDGE_ACCOUNT = "5b3c2a1d-8e7f-4a6b-9c0d-1e2f3a4b5c6d"
CUSTOMER = "5f1c2a8e-9b7d-4e2a-8c11-0c3f7d2b6a90"
CHAT, THREAD = "PX1QZ8RK2M", "RT5M2K9QAA"
JANE = {
    "id": "jane@acme.com",
    "type": "agent",
    "name": "Jane Doe",
    "email": "jane@acme.com",
    "avatar": "https://a/j.png",
}


@pytest.fixture
def provider(tmp_path) -> LiveChatProvider:
    """parse_webhook needs no network: a provider that is never opened."""
    return offline_provider(tmp_path)


def envelope(action: str, payload: Any, *, secret: Any = WEBHOOK_SECRET, **extra: Any) -> bytes:
    body = {
        "webhook_id": "8f2c0b6a1e5d4c3b9a7f6e5d4c3b2a10",
        "secret_key": secret,
        "action": action,
        "organization_id": ORG,
        "payload": payload,
        "additional_data": {},
    }
    body.update(extra)
    return json.dumps(body).encode()


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": f"{THREAD}_4",
        "type": "message",
        "author_id": "jane@acme.com",
        "created_at": "2026-03-02T10:15:07.123456Z",
        "visibility": "all",
        "text": "Hi, I'm Jane from support.",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}  # None removes a field


def incoming(provider: LiveChatProvider, **fields: Any):
    body = envelope(
        "incoming_event", {"chat_id": CHAT, "thread_id": THREAD, "event": event(**fields)}
    )
    return provider.parse_webhook({}, body)


class TestVerification:
    @pytest.mark.parametrize("secret", [None, "", "wrong", 12345, ["x"], WEBHOOK_SECRET + "x"])
    def test_missing_or_wrong_secret_is_401(self, provider: LiveChatProvider, secret: Any) -> None:
        body = envelope("incoming_event", {"chat_id": CHAT, "event": event()}, secret=secret)
        with pytest.raises(WebhookRejected) as info:
            provider.parse_webhook({}, body)
        assert info.value.status == 401
        assert WEBHOOK_SECRET not in info.value.reason

    def test_secret_is_checked_before_the_shape(self, provider: LiveChatProvider) -> None:
        with pytest.raises(WebhookRejected) as info:
            provider.parse_webhook({}, envelope("incoming_event", "not an object", secret="wrong"))
        assert info.value.status == 401

    async def test_previous_secret_is_accepted_during_rotation(
        self, make_provider: MakeProvider
    ) -> None:
        provider = await make_provider(
            HITL_LIVECHAT_WEBHOOK_SECRET="new-secret",
            HITL_LIVECHAT_WEBHOOK_SECRET_PREVIOUS=WEBHOOK_SECRET,
        )
        batch = provider.parse_webhook(
            {}, envelope("incoming_event", {"chat_id": CHAT, "event": event()})
        )
        assert len(batch.events) == 1
        batch = provider.parse_webhook(
            {}, envelope("incoming_event", {"chat_id": CHAT, "event": event()}, secret="new-secret")
        )
        assert len(batch.events) == 1

    def test_other_organization_is_401(self, provider: LiveChatProvider) -> None:
        body = envelope(
            "incoming_event",
            {"chat_id": CHAT, "event": event()},
            organization_id="11111111-2222-4333-8444-555555555555",
        )
        with pytest.raises(WebhookRejected) as info:
            provider.parse_webhook({}, body)
        assert info.value.status == 401

    def test_organization_id_may_be_absent_or_upper_case(self, provider: LiveChatProvider) -> None:
        for extra in ({"organization_id": ORG.upper()}, {"organization_id": None}):
            body = json.loads(envelope("incoming_event", {"chat_id": CHAT, "event": event()}))
            if extra["organization_id"] is None:
                del body["organization_id"]
            else:
                body.update(extra)
            assert len(provider.parse_webhook({}, json.dumps(body).encode()).events) == 1

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b"not json", "not JSON"),
            (b"\xff\xfe\x00", "not JSON"),
            (b"[1, 2]", "not a JSON object"),
            (b"", "not JSON"),
            (b"[" * 100_000, "not JSON"),  # nesting deeper than the parser allows
        ],
    )
    def test_malformed_body_is_400(
        self, provider: LiveChatProvider, body: bytes, reason: str
    ) -> None:
        with pytest.raises(WebhookRejected) as info:
            provider.parse_webhook({}, body)
        assert info.value.status == 400
        assert reason in info.value.reason

    @pytest.mark.parametrize(
        ("action", "payload"),
        [
            ("incoming_event", "text"),
            ("incoming_event", {"event": event()}),
            ("incoming_event", {"chat_id": CHAT}),
            ("incoming_event", {"chat_id": CHAT, "event": {"type": "message"}}),
            ("incoming_event", {"chat_id": 17, "event": event()}),
            ("user_added_to_chat", {"chat_id": CHAT, "user": "jane"}),
            ("user_added_to_chat", {"chat_id": CHAT, "user": {"name": "no id"}}),
            ("user_removed_from_chat", {"chat_id": CHAT}),
            ("chat_transferred", {"chat_id": CHAT, "transferred_to": [19]}),
            ("chat_deactivated", {"thread_id": THREAD}),
            ("incoming_chat", {"chat": []}),
            ("incoming_chat", {"chat": {"thread": {}}}),
        ],
    )
    def test_wrong_shape_for_a_known_action_is_400(
        self, provider: LiveChatProvider, action: str, payload: Any
    ) -> None:
        with pytest.raises(WebhookRejected) as info:
            provider.parse_webhook({}, envelope(action, payload))
        assert info.value.status == 400
        assert info.value.reason

    def test_missing_action_is_400(self, provider: LiveChatProvider) -> None:
        body = json.loads(envelope("x", {}))
        del body["action"]
        with pytest.raises(WebhookRejected) as info:
            provider.parse_webhook({}, json.dumps(body).encode())
        assert info.value.status == 400

    def test_unknown_action_is_ignored(self, provider: LiveChatProvider) -> None:
        batch = provider.parse_webhook({}, envelope("chat_teleported", {"whatever": 1}))
        assert batch.events == ()
        assert batch.ignored == "unknown action chat_teleported"

    def test_known_unused_action_is_ignored(self, provider: LiveChatProvider) -> None:
        batch = provider.parse_webhook({}, envelope("event_updated", {"chat_id": CHAT}))
        assert batch.events == ()
        assert "event_updated" in batch.ignored


class TestIncomingEvent:
    def test_agent_message(self, provider: LiveChatProvider) -> None:
        batch = incoming(provider)
        [inbound] = batch.events
        assert inbound.external_chat_id == CHAT
        assert inbound.dedupe_key == f"ev:{THREAD}_4"
        assert inbound.occurred_at == datetime(2026, 3, 2, 10, 15, 7, 123456, tzinfo=UTC)
        assert inbound.author_id == "jane@acme.com"
        assert isinstance(inbound.kind, AgentMessage)
        assert inbound.kind.message.body == "Hi, I'm Jane from support."
        assert inbound.kind.agent.id == "jane@acme.com"

    def test_redelivery_has_the_same_key(self, provider: LiveChatProvider) -> None:
        first = incoming(provider)
        body = json.loads(
            envelope("incoming_event", {"chat_id": CHAT, "thread_id": THREAD, "event": event()})
        )
        body["webhook_id"] = "another-registration"
        second = provider.parse_webhook({}, json.dumps(body).encode())
        assert first.events[0].dedupe_key == second.events[0].dedupe_key

    @pytest.mark.parametrize(
        ("content_type", "kind"),
        [
            ("image/png", MediaKind.IMAGE),
            ("audio/mpeg", MediaKind.AUDIO),
            ("video/mp4", MediaKind.VIDEO),
            ("application/pdf", MediaKind.FILE),
            (None, MediaKind.FILE),
        ],
    )
    def test_file_event(
        self, provider: LiveChatProvider, content_type: str | None, kind: MediaKind
    ) -> None:
        batch = incoming(
            provider,
            type="file",
            text=None,
            url="https://cdn.livechat-files.com/api/file/x/a",
            name="a",
            content_type=content_type,
            size=1234,
            width=10,
        )
        body = batch.events[0].kind.message.body
        assert isinstance(body, Media)
        assert body.kind is kind
        assert body.size_bytes == 1234

    def test_rich_message(self, provider: LiveChatProvider) -> None:
        batch = incoming(
            provider,
            type="rich_message",
            text=None,
            template_id="cards",
            elements=[
                {
                    "title": "Offer",
                    "subtitle": "10% off",
                    "buttons": [{"text": "Buy", "type": "url", "value": "https://s"}],
                }
            ],
        )
        card = batch.events[0].kind.message.body
        assert isinstance(card, Card)
        assert card.title == "Offer"
        assert card.buttons[0].value == "https://s"

    def test_internal_note_is_dropped(self, provider: LiveChatProvider) -> None:
        batch = incoming(provider, visibility="agents")
        assert batch.events == ()
        assert "internal note" in batch.ignored

    def test_legacy_recipients_agents_is_an_internal_note(self, provider: LiveChatProvider) -> None:
        assert incoming(provider, visibility=None, recipients="agents").events == ()
        assert len(incoming(provider, visibility=None, recipients="all").events) == 1

    def test_own_account_echo_is_dropped(self, provider: LiveChatProvider) -> None:
        batch = incoming(provider, author_id=BRIDGE_ACCOUNT)
        assert batch.events == ()
        assert "echo" in batch.ignored

    async def test_configured_agent_id_echo_is_dropped(self, make_provider: MakeProvider) -> None:
        provider = await make_provider(HITL_LIVECHAT_AGENT_ID="bridge@acme.com")
        assert incoming(provider, author_id="bridge@acme.com").events == ()

    def test_own_summary_is_dropped_and_teaches_the_bridge_id(
        self, provider: LiveChatProvider
    ) -> None:
        batch = incoming(provider, author_id="bridge@acme.com", custom_id="hitl:start-1:0")
        assert batch.events == ()
        later = incoming(provider, id=f"{THREAD}_9", author_id="bridge@acme.com", custom_id=None)
        assert later.events == ()

    def test_customer_echo_is_dropped(self, provider: LiveChatProvider) -> None:
        batch = incoming(provider, author_id=CUSTOMER, custom_id="req-1")
        assert batch.events == ()
        assert "end user" in batch.ignored

    def test_system_messages_are_dropped(self, provider: LiveChatProvider) -> None:
        batch = incoming(
            provider,
            type="system_message",
            author_id=None,
            text="Chat closed",
            system_message_type="manual_archived_agent",
        )
        assert batch.events == ()

    def test_unknown_fields_are_tolerated(self, provider: LiveChatProvider) -> None:
        body = json.loads(
            envelope(
                "incoming_event",
                {"chat_id": CHAT, "event": event(flavour="mint", properties={"a": {"b": 1}})},
            )
        )
        body["brand_new_field"] = {"nested": [1, 2]}
        body["payload"]["also_new"] = True
        del body["additional_data"]
        batch = provider.parse_webhook({}, json.dumps(body).encode())
        assert len(batch.events) == 1

    @pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
    def test_a_time_no_utc_datetime_holds_is_no_time(
        self, provider: LiveChatProvider, stamp: str
    ) -> None:
        [inbound] = incoming(provider, created_at=stamp).events
        assert inbound.occurred_at is None  # the core uses the time it received it

    def test_lone_surrogates_become_replacement_characters(
        self, provider: LiveChatProvider
    ) -> None:
        # No store, protobuf or log encodes "\ud83d" alone; a pair is one character.
        [inbound] = incoming(provider, text="broken \ud83d, whole \ud83d\ude00").events
        assert isinstance(inbound.kind, AgentMessage)
        assert inbound.kind.message.body == "broken \ufffd, whole \U0001f600"


class TestMembership:
    def added(self, provider: LiveChatProvider, user: dict[str, Any], **extra: Any):
        payload = {"chat_id": CHAT, "thread_id": THREAD, "user": user, "reason": "manual", **extra}
        return provider.parse_webhook({}, envelope("user_added_to_chat", payload))

    def test_agent_added_is_assigned_with_name_and_avatar(self, provider: LiveChatProvider) -> None:
        [inbound] = self.added(
            provider, JANE, user_type="agent", requester_id="jane@acme.com"
        ).events
        assert isinstance(inbound.kind, AgentAssigned)
        assert inbound.kind.agent.name == "Jane Doe"
        assert inbound.kind.agent.avatar_url == "https://a/j.png"
        assert inbound.dedupe_key == f"user_added_to_chat:{CHAT}:{THREAD}:jane@acme.com"
        # Later messages carry the cached name.
        message = incoming(provider).events[0].kind
        assert message.agent.name == "Jane Doe"

    def test_without_optional_fields(self, provider: LiveChatProvider) -> None:
        [inbound] = provider.parse_webhook(
            {}, envelope("user_added_to_chat", {"chat_id": CHAT, "user": {"id": "joe@acme.com"}})
        ).events
        assert kind_of(inbound, AgentAssigned).agent.id == "joe@acme.com"

    def test_customer_added_is_ignored(self, provider: LiveChatProvider) -> None:
        batch = self.added(
            provider, {"id": CUSTOMER, "type": "customer", "name": "Ada"}, user_type="customer"
        )
        assert batch.events == ()

    def test_supervisor_is_not_an_assignment(self, provider: LiveChatProvider) -> None:
        assert self.added(provider, {**JANE, "visibility": "agents"}).events == ()

    def test_the_bridge_itself_is_not_an_assignment(self, provider: LiveChatProvider) -> None:
        batch = self.added(provider, {"id": BRIDGE_ACCOUNT, "type": "agent", "name": "Bridge"})
        assert batch.events == ()

    def test_an_agent_leaving_is_reported_for_the_core_to_judge(
        self, provider: LiveChatProvider
    ) -> None:
        self.added(provider, JANE)
        removed = {
            "chat_id": CHAT,
            "thread_id": THREAD,
            "user_id": "jane@acme.com",
            "user_type": "agent",
            "reason": "manual",
        }
        [inbound] = provider.parse_webhook({}, envelope("user_removed_from_chat", removed)).events
        left = kind_of(inbound, AgentLeft)
        assert (left.agent.name, left.reason) == ("Jane Doe", "manual")
        # Whether the agent held the session is the core's to say (from the
        # store): this process's memory may never have seen the assignment.
        other = {**removed, "user_id": "joe@acme.com"}
        [inbound] = provider.parse_webhook({}, envelope("user_removed_from_chat", other)).events
        assert kind_of(inbound, AgentLeft).agent.id == "joe@acme.com"


class TestTransfers:
    def transferred(self, provider: LiveChatProvider, **payload: Any):
        body = {"chat_id": CHAT, "thread_id": THREAD, **payload}
        return provider.parse_webhook({}, envelope("chat_transferred", body))

    def test_to_an_agent(self, provider: LiveChatProvider) -> None:
        [inbound] = self.transferred(
            provider,
            requester_id="joe@acme.com",
            reason="manual",
            transferred_to={"agent_ids": ["jane@acme.com"], "group_ids": [19]},
        ).events
        assert inbound.kind == Transferred(
            to_group_id="19", reason="manual", to_agent=inbound.kind.to_agent
        )
        to_agent = kind_of(inbound, Transferred).to_agent
        assert to_agent is not None
        assert to_agent.id == "jane@acme.com"

    def test_to_a_group(self, provider: LiveChatProvider) -> None:
        [inbound] = self.transferred(
            provider,
            requester_id="joe@acme.com",
            reason="other",
            transferred_to={"group_ids": [19]},
        ).events
        assert inbound.kind == Transferred(to_group_id="19", reason="other")

    def test_to_a_group_with_a_queue(self, provider: LiveChatProvider) -> None:
        events = self.transferred(
            provider,
            requester_id="joe@acme.com",
            reason="manual",
            transferred_to={"group_ids": [19]},
            queue={"position": 2, "wait_time": 60, "queued_at": "2026-03-02T10:15:00.000000Z"},
        ).events
        assert [type(e.kind) for e in events] == [Transferred, Queued]
        assert events[1].kind == Queued(position=2, wait_seconds=60)

    def test_router_transfer_without_requester_or_thread(self, provider: LiveChatProvider) -> None:
        body = {
            "chat_id": CHAT,
            "reason": "assigned",
            "transferred_to": {"agent_ids": ["jane@acme.com"]},
        }
        [inbound] = provider.parse_webhook({}, envelope("chat_transferred", body)).events
        to_agent = kind_of(inbound, Transferred).to_agent
        assert to_agent is not None
        assert to_agent.id == "jane@acme.com"

    def test_null_optional_fields_are_absent_ones(self, provider: LiveChatProvider) -> None:
        # A 400 here is no small thing: LiveChat retries a few times, then
        # the transfer is lost for good.
        [inbound] = self.transferred(
            provider,
            requester_id=None,
            reason="unassigned",
            transferred_to=None,
            queue=None,
        ).events
        assert inbound.kind == Transferred(to_group_id="", reason="unassigned")

    def test_own_start_transfer_is_only_a_queue_position(self, provider: LiveChatProvider) -> None:
        events = self.transferred(
            provider,
            requester_id=BRIDGE_ACCOUNT,
            reason="manual",
            transferred_to={"group_ids": [0]},
            queue={"position": 1, "wait_time": 30, "queued_at": "2026-03-02T10:15:00.000000Z"},
        ).events
        assert [e.kind for e in events] == [Queued(position=1, wait_seconds=30)]
        assert (
            self.transferred(
                provider, requester_id=BRIDGE_ACCOUNT, transferred_to={"group_ids": [0]}
            ).events
            == ()
        )

    def test_legacy_queued_at_us(self, provider: LiveChatProvider) -> None:
        events = self.transferred(
            provider,
            requester_id=BRIDGE_ACCOUNT,
            transferred_to={"group_ids": [0]},
            queue={"position": 3, "queued_at_us": 1},
        ).events
        assert events[0].kind == Queued(position=3)


class TestEnds:
    @pytest.mark.parametrize(
        ("user_id", "by"),
        [
            (BRIDGE_ACCOUNT, EndedBy.CALLER),
            ("jane@acme.com", EndedBy.AGENT),
            (CUSTOMER, EndedBy.USER),
            (None, EndedBy.PROVIDER),
        ],
    )
    def test_chat_deactivated(
        self, provider: LiveChatProvider, user_id: str | None, by: EndedBy
    ) -> None:
        payload = {"chat_id": CHAT, "thread_id": THREAD}
        if user_id:
            payload["user_id"] = user_id
        [inbound] = provider.parse_webhook({}, envelope("chat_deactivated", payload)).events
        assert isinstance(inbound.kind, Ended)
        assert inbound.kind.by is by
        assert inbound.kind.reason
        assert inbound.dedupe_key == f"chat_deactivated:{CHAT}:{THREAD}"

    def test_incoming_chat_with_queue(self, provider: LiveChatProvider) -> None:
        chat = {
            "id": CHAT,
            "users": [JANE, {"id": CUSTOMER, "type": "customer"}],
            "thread": {
                "id": THREAD,
                "active": True,
                "events": [event()],
                "queue": {"position": 4, "wait_time": 120},
            },
        }
        [inbound] = provider.parse_webhook({}, envelope("incoming_chat", {"chat": chat})).events
        assert inbound.kind == Queued(position=4, wait_seconds=120)
        assert (
            provider.parse_webhook({}, envelope("incoming_chat", {"chat": {"id": CHAT}})).events
            == ()
        )
