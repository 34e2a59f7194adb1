"""The whole LiveChat flow through the real gRPC API (issue 4, "Done when").

The service runs in-process from its production factory; the fake LiveChat
is a real HTTP server and delivers webhooks to the service's real sidecar,
registered with ``hitl-service livechat register-webhooks``.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import uuid
from typing import Any

import grpc
import httpx
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from hitl_service.cli import _check
from hitl_service.config import Settings
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import (
    JANE,
    JOE,
    WEBHOOK_SECRET,
    LiveChatService,
    MakeService,
    kinds,
    media_bytes,
)
from tests.support import TIMEOUT, EventCollector, expect_error, rid, wait_for


def texts_at_fake(lc: LiveChatService, chat_id: str) -> list[str]:
    """Texts of the agent-visible message events of a chat, oldest first."""
    return [
        e["text"]
        for e in lc.fake.events(chat_id)
        if e["type"] == "message" and e.get("visibility") == "all"
    ]


def agent_texts(events: list[pb.Event]) -> list[str]:
    return [e.agent_message.message.text for e in events if e.WhichOneof("kind") == "agent_message"]


class TestStart:
    async def test_the_chat_opens_in_the_requested_group_with_title_description_and_transcript(
        self, lc: LiveChatService
    ) -> None:
        user = await lc.user(
            "Ada Lovelace", email="ada@example.com", picture_url="https://img.example/ada.png"
        )
        history = [
            pb.Message(text="I want a refund", author=pb.AUTHOR_USER),
            pb.Message(text="Which order is it about?", author=pb.AUTHOR_BOT),
            pb.Message(text="Order #123, the kettle arrived broken", author=pb.AUTHOR_USER),
        ]
        session = await lc.start(
            user.id,
            title="Refund for order #123",
            description="Kettle arrived broken; customer wants money back",
            history=history,
            group_id="19",
            metadata={"order": "123"},
        )
        assert session.state == pb.SESSION_STATE_QUEUED  # nobody accepting: LiveChat queues it
        assert session.group_id == "19"
        chat = lc.fake.chat(session.external_chat_id)
        assert chat.group_ids == [19]
        assert chat.active
        customer = lc.fake.state.customers[chat.customer_id]
        assert (customer.name, customer.email, customer.avatar) == (
            "Ada Lovelace",
            "ada@example.com",
            "https://img.example/ada.png",
        )
        shown = "\n".join(texts_at_fake(lc, session.external_chat_id))
        assert "Refund for order #123" in shown
        assert "Kettle arrived broken; customer wants money back" in shown
        assert "order: 123" in shown
        assert "User: I want a refund" in shown
        assert "Bot: Which order is it about?" in shown
        assert "User: Order #123, the kettle arrived broken" in shown

    async def test_without_a_group_the_chat_goes_to_the_default_group(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start(title="No group given")
        assert session.group_id == "0"
        assert lc.fake.chat(session.external_chat_id).group_ids == [0]


class TestUserToAgent:
    async def test_text_arrives_with_the_request_id_as_custom_id(self, lc: LiveChatService) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        customer_id = lc.fake.chat(chat_id).customer_id
        request_id = rid()
        sent = await lc.send(session.id, "Hello, is anyone there?", request_id)
        [event] = lc.with_custom_id(chat_id, request_id)
        assert event["type"] == "message"
        assert event["text"] == "Hello, is anyone there?"
        assert event["author_id"] == customer_id
        assert sent.external_message_id == event["id"]

    async def test_text_above_16_kb_is_split_into_parts_that_join_back(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        long_text = "".join(f"line {i}: ünïcödé words to fill the message\n" for i in range(1100))
        assert len(long_text.encode()) > 2 * 16 * 1024
        request_id = rid()
        await lc.send(session.id, long_text, request_id)
        parts = [
            e for e in lc.fake.events(chat_id) if e.get("custom_id", "").startswith(request_id)
        ]
        assert [p["custom_id"] for p in parts] == [
            request_id,
            *(f"{request_id}#{i}" for i in range(2, len(parts) + 1)),
        ]
        assert len(parts) >= 3
        assert all(len(p["text"].encode()) <= 16 * 1024 for p in parts)
        assert "".join(p["text"] for p in parts) == long_text

    async def test_split_parts_keep_flags_and_emoji_sequences_whole(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        family = "👩\u200d👩\u200d👧"  # one emoji: three people joined by ZWJ
        # A cut by bytes alone would land between the two letters of a flag.
        text = "Flags and family: " + ("🇺🇦🇩🇪" + family) * 1100
        request_id = rid()
        await lc.send(session.id, text, request_id)
        parts = [
            e["text"]
            for e in lc.fake.events(session.external_chat_id)
            if e.get("custom_id", "").startswith(request_id)
        ]
        assert len(parts) > 1
        assert "".join(parts) == text
        for part in parts[1:]:
            assert part.startswith(("🇺🇦", "🇩🇪", family)), repr(part[:3])

    async def test_media_of_every_kind_is_uploaded_so_the_agent_sees_the_file(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        cases = [
            (pb.MEDIA_KIND_IMAGE, "image/png", "photo.png", 2048),
            (pb.MEDIA_KIND_FILE, "application/pdf", "invoice.pdf", 5000),
            (pb.MEDIA_KIND_AUDIO, "audio/ogg", "voice.ogg", 3000),
            (pb.MEDIA_KIND_VIDEO, "video/mp4", "clip.mp4", 7000),
        ]
        async with httpx.AsyncClient() as http:
            for kind, mime, name, size in cases:
                request_id = rid()
                media = pb.Media(
                    kind=kind,
                    url=lc.media.url(name, mime, size),
                    name=name,
                    mime_type=mime,
                    size_bytes=size,
                )
                sent = await lc.send(session.id, pb.Message(media=media), request_id)
                [event] = lc.with_custom_id(chat_id, request_id)
                assert event["type"] == "file", name
                assert event["url"].startswith(f"{lc.fake.url}/cdn/")  # uploaded, not linked
                assert (event["name"], event["content_type"], event["size"]) == (name, mime, size)
                assert sent.external_message_id == event["id"]
                cdn = await http.get(event["url"])
                assert cdn.content == media_bytes(name, size)
        assert sorted(lc.media.requests) == sorted(name for _, _, name, _ in cases)

    async def test_a_location_arrives_as_readable_text_with_a_map_link(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        request_id = rid()
        location = pb.Location(
            latitude=52.52, longitude=13.405, name="Office", address="Alexanderplatz 1, Berlin"
        )
        await lc.send(session.id, pb.Message(location=location), request_id)
        [event] = lc.with_custom_id(session.external_chat_id, request_id)
        assert event["type"] == "message"
        assert "Office" in event["text"]
        assert "Alexanderplatz 1, Berlin" in event["text"]
        assert "https://maps.google.com/?q=52.520000,13.405000" in event["text"]

    async def test_a_card_arrives_as_a_rich_message(self, lc: LiveChatService) -> None:
        session = await lc.start()
        request_id = rid()
        card = pb.Card(
            title="Order #123",
            subtitle="Kettle, 39 EUR",
            image_url="https://img.example/kettle.png",
            buttons=[
                pb.CardButton(
                    text="Track", kind=pb.BUTTON_KIND_URL, value="https://track.example/123"
                ),
                pb.CardButton(text="Cancel it", kind=pb.BUTTON_KIND_MESSAGE, value="cancel"),
            ],
        )
        await lc.send(session.id, pb.Message(card=card), request_id)
        [event] = lc.with_custom_id(session.external_chat_id, request_id)
        assert event["type"] == "rich_message"
        assert event["template_id"] == "cards"
        [element] = event["elements"]
        assert element["title"] == "Order #123"
        assert element["subtitle"] == "Kettle, 39 EUR"
        assert element["image"]["url"] == "https://img.example/kettle.png"
        assert [(b["text"], b["type"], b["value"]) for b in element["buttons"]] == [
            ("Track", "url", "https://track.example/123"),
            ("Cancel it", "message", "cancel"),
        ]

    async def test_a_card_livechat_refuses_arrives_whole_as_text(self, lc: LiveChatService) -> None:
        session = await lc.start()
        buttons = [
            pb.CardButton(
                text=f"Option {i}", kind=pb.BUTTON_KIND_MESSAGE, value=f"{i} " + "é" * 990
            )
            for i in range(13)
        ]
        card = pb.Card(title="Choose", subtitle="ß" * 2000, buttons=buttons)
        lc.fake.add_fault("send_event", error_type="validation", message="Invalid rich message")
        request_id = rid()
        await lc.send(session.id, pb.Message(card=card), request_id)
        parts = lc.with_custom_id(session.external_chat_id, request_id) + [
            e
            for e in lc.fake.events(session.external_chat_id)
            if e.get("custom_id", "").startswith(request_id + "#")
        ]
        assert len(parts) > 1
        assert {p["type"] for p in parts} == {"message"}
        text = "".join(p["text"] for p in parts)
        assert text.startswith("Choose\n" + "ß" * 2000)
        for button in buttons:
            assert f"• {button.text}: {button.value}" in text


class TestAgentToUser:
    async def test_an_agents_script_links_never_reach_the_stream(self, lc: LiveChatService) -> None:
        # Callers render buttons and images as links: a `javascript:` one
        # would run in their page. The contract says http or https.
        session = await lc.start()
        chat_id = session.external_chat_id
        async with EventCollector(lc.stub, session_id=session.id, after="0") as stream:
            lc.fake.agent_join(chat_id, JANE[0])
            lc.fake.agent_message(
                chat_id,
                JANE[0],
                rich={
                    "template_id": "cards",
                    "elements": [
                        {
                            "title": "Pay",
                            "image": {"url": "data:image/svg+xml,<svg onload=alert(1)>"},
                            "buttons": [
                                {"text": "Pay now", "type": "url", "value": "javascript:pay()"},
                                {"text": "Terms", "type": "url", "value": "//acme.example/t"},
                            ],
                        }
                    ],
                },
            )
            await wait_for(lambda: "agent_message" in stream.kinds(), what="the card")
        card = next(
            e.agent_message.message.card
            for e in stream.events
            if e.WhichOneof("kind") == "agent_message"
        )
        assert card.title == "Pay"
        assert card.image_url == ""
        assert [(b.text, b.value) for b in card.buttons] == [("Terms", "https://acme.example/t")]

    async def test_every_agent_message_kind_reaches_the_stream_with_the_real_agent(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        async with EventCollector(lc.stub, session_id=session.id, after="0") as stream:
            lc.fake.agent_join(chat_id, JANE[0])
            lc.fake.agent_message(chat_id, JANE[0], text="Hi, I'm Jane from support")
            lc.fake.agent_message(
                chat_id,
                JANE[0],
                file={"name": "return-label.png", "content_type": "image/png", "size": 321},
            )
            lc.fake.agent_message(
                chat_id,
                JANE[0],
                file={"name": "terms.pdf", "content_type": "application/pdf", "size": 99},
            )
            lc.fake.agent_message(
                chat_id,
                JANE[0],
                rich={
                    "template_id": "cards",
                    "elements": [
                        {
                            "title": "Your return",
                            "subtitle": "Print the label",
                            "buttons": [
                                {
                                    "text": "Open label",
                                    "type": "url",
                                    "value": "https://acme.example/label",
                                    "postback_id": "open",
                                    "user_ids": [],
                                }
                            ],
                        }
                    ],
                },
            )
            await wait_for(
                lambda: stream.kinds().count("agent_message") == 4, what="4 agent messages"
            )
        assigned = [e for e in stream.events if e.WhichOneof("kind") == "agent_assigned"]
        assert len(assigned) == 1
        agent = assigned[0].agent_assigned.agent
        assert (agent.id, agent.name, agent.avatar_url) == JANE
        messages = [
            e.agent_message for e in stream.events if e.WhichOneof("kind") == "agent_message"
        ]
        for message in messages:
            assert (message.agent.id, message.agent.name, message.agent.avatar_url) == JANE
            assert message.message.author == pb.AUTHOR_AGENT
        text, image, pdf, card = (m.message for m in messages)
        assert text.text == "Hi, I'm Jane from support"
        assert image.media.kind == pb.MEDIA_KIND_IMAGE
        assert image.media.name == "return-label.png"
        assert image.media.mime_type == "image/png"
        assert image.media.size_bytes == 321
        assert image.media.url.startswith(f"{lc.fake.url}/cdn/")
        assert pdf.media.kind == pb.MEDIA_KIND_FILE
        assert card.card.title == "Your return"
        assert card.card.subtitle == "Print the label"
        assert [(b.text, b.kind, b.value) for b in card.card.buttons] == [
            ("Open label", pb.BUTTON_KIND_URL, "https://acme.example/label")
        ]
        current = await lc.session(session.id)
        assert current.state == pb.SESSION_STATE_ASSIGNED
        assert current.agent.name == "Jane Doe"

    async def test_internal_notes_and_our_own_echoes_never_reach_the_stream(
        self, make_service: MakeService
    ) -> None:
        lc = await make_service()
        fake = lc.fake
        # The bridge's own opening events come back as incoming_event, and an
        # extra registration without the author filter echoes the end user's
        # own messages too (as a hand-made console webhook would).
        fake.set_config(initial_events_webhook=True)
        fake.state.register_webhook(
            {
                "action": "incoming_event",
                "url": lc.webhook_url,
                "secret_key": WEBHOOK_SECRET,
                "owner_client_id": fake.state.seed.client_id,
                "type": "license",
                "description": "set up by hand: every author",
            }
        )
        session = await lc.start(history=[pb.Message(text="bot line", author=pb.AUTHOR_BOT)])
        chat_id = session.external_chat_id
        await lc.send(session.id, "the end user's own words")
        fake.agent_join(chat_id, JANE[0])
        fake.agent_message(chat_id, JANE[0], text="note: VIP customer", visibility="agents")
        fake.agent_message(
            chat_id, JANE[0], text="note (legacy)", visibility="agents", legacy_recipients=True
        )
        fake.agent_message(chat_id, JANE[0], text="Hello Ada, how can I help?")
        await lc.delivered()
        delivered = {
            d.envelope["payload"]["event"].get("text"): d.outcome
            for d in fake.delivery.deliveries
            if d.action == "incoming_event"
        }
        # Each of them reached the service and was answered 200 ...
        for text in ("note: VIP customer", "note (legacy)", "the end user's own words"):
            assert delivered[text] == "delivered", text
        assert any("Handoff from the bot" in (t or "") for t in delivered)
        # ... and only the agent's reply is in the log, once.
        events = await lc.log(session.id)
        assert agent_texts(events) == ["Hello Ada, how can I help?"]

    async def test_events_for_nobody_are_skipped_saying_why_and_later_messages_still_arrive(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        stored = await lc.app.store.get_session(session.id)
        assert stored is not None
        thread = stored.chat_state["thread_id"]
        lc.fake.agent_join(session.external_chat_id, JANE[0])
        skipped: list[dict[str, Any]] = [
            {"type": "system_message", "system_message_type": "rating.chat_rated", "text": "Good"},
            {"type": "form", "form_id": "f1", "fields": [{"type": "email", "label": "E-mail"}]},
            {"type": "custom", "content": {"widget": "map"}},
            {"type": "voice_note", "url": "https://cdn.example/v.ogg"},  # new at LiveChat
            {"type": "voice_note", "url": "https://cdn.example/w.ogg"},
            {"type": "message", "text": "after all that"},
        ]
        with capture_logs(processors=[merge_contextvars]) as logs:
            for number, event in enumerate(skipped, start=70):
                await post_webhook(
                    lc,
                    "incoming_event",
                    {
                        "chat_id": session.external_chat_id,
                        "thread_id": thread,
                        "event": {
                            "id": f"{thread}_{number}",
                            "author_id": JANE[0],
                            "created_at": "2026-03-02T10:15:07.123456Z",
                            "visibility": "all",
                            **event,
                        },
                    },
                )
        async with EventCollector(lc.stub, session_id=session.id, after="0") as stream:
            await wait_for(lambda: "agent_message" in stream.kinds(), what="the message")
        assert agent_texts(stream.events) == ["after all that"]
        done = [
            line
            for line in logs
            if line["event"] == "webhook.done" and line.get("action") == "incoming_event"
        ]
        assert [line.get("ignored") for line in done] == [
            "system_message event",
            "form event",
            "custom event",
            "voice_note event",
            "voice_note event",
            None,
        ]
        warned = [line for line in logs if line["event"] == "livechat.unknown_event_type"]
        assert [(w["log_level"], w["event_type"]) for w in warned] == [("warning", "voice_note")]


class TestRouting:
    async def test_queue_then_assignment_then_transfers(self, lc: LiveChatService) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        assert session.state == pb.SESSION_STATE_QUEUED
        async with EventCollector(lc.stub, session_id=session.id, after="0") as stream:
            await stream.wait_for_kind("queued")
            lc.fake.agent_join(chat_id, JANE[0])
            await stream.wait_for_kind("agent_assigned")
            current = await lc.session(session.id)
            assert current.state == pb.SESSION_STATE_ASSIGNED
            assert (current.agent.id, current.agent.name) == JANE[:2]

            lc.fake.transfer(chat_id, agent_ids=[JOE[0]], requester_id=JANE[0])
            await wait_for(
                lambda: stream.kinds().count("agent_assigned") == 2, what="Joe's assignment"
            )
            current = await lc.session(session.id)
            assert current.state == pb.SESSION_STATE_ASSIGNED
            assert (current.agent.id, current.agent.name) == JOE[:2]

            lc.fake.transfer(chat_id, group_ids=[19], queue=True, requester_id=JOE[0])
            await wait_for(lambda: stream.kinds().count("queued") == 2, what="queued again")
            current = await lc.session(session.id)
            assert current.state == pb.SESSION_STATE_QUEUED
        await lc.delivered()
        events = await lc.log(session.id)
        # LiveChat's chat_transferred names only the new agent's id; Joe's own
        # join right after it brings his name, reported as agent_assigned.
        assert kinds(events) == [
            "started",
            "queued",
            "agent_assigned",
            "transferred",
            "agent_assigned",
            "transferred",
            "queued",
        ]
        to_joe, to_group = (e.transferred for e in events if e.WhichOneof("kind") == "transferred")
        assert (to_joe.from_agent.name, to_joe.to_agent.id) == ("Jane Doe", JOE[0])
        joe = [e.agent_assigned.agent for e in events if e.WhichOneof("kind") == "agent_assigned"]
        assert [(a.id, a.name) for a in joe] == [JANE[:2], JOE[:2]]
        assert (to_group.from_agent.name, to_group.to_group_id) == ("Joe Roe", "19")
        queued = [e.queued for e in events if e.WhichOneof("kind") == "queued"]
        assert all(q.position >= 1 and q.wait_seconds > 0 for q in queued)


class TestEnds:
    @pytest.mark.parametrize("late", [True, False], ids=["webhook after", "webhook racing"])
    async def test_stop_deactivates_the_chat_and_logs_one_end_by_the_caller(
        self, lc: LiveChatService, late: bool
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.agent_join(chat_id, JANE[0])
        await lc.delivered()
        if late:
            lc.fake.delivery.hold()  # LiveChat's own chat_deactivated comes after StopHitl
        response = await lc.stub.StopHitl(
            pb.StopHitlRequest(session_id=session.id, reason="resolved"), timeout=TIMEOUT
        )
        assert response.session.state == pb.SESSION_STATE_ENDED
        assert response.session.ended_by == pb.ENDED_BY_CALLER
        assert not lc.fake.chat(chat_id).active
        assert len(lc.fake.calls("deactivate_chat")) == 1
        assert not lc.fake.calls("close_chat")
        ended = [e for e in await lc.log(session.id) if e.WhichOneof("kind") == "ended"]
        assert [(e.ended.by, e.ended.reason) for e in ended] == [(pb.ENDED_BY_CALLER, "resolved")]

        lc.fake.delivery.release()
        await lc.delivered()
        closes = [
            d
            for d in lc.fake.delivery.deliveries
            if d.action == "chat_deactivated" and d.envelope["payload"]["chat_id"] == chat_id
        ]
        assert [d.outcome for d in closes] == ["delivered"]
        ended = [e for e in await lc.log(session.id) if e.WhichOneof("kind") == "ended"]
        assert len(ended) == 1
        # Stopping again is a no-op, not an error.
        again = await lc.stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
        assert again.session.state == pb.SESSION_STATE_ENDED
        assert len(lc.fake.calls("deactivate_chat")) == 1

    async def test_an_agent_closing_the_chat_ends_the_session_by_the_agent(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.agent_join(chat_id, JANE[0])
        lc.fake.agent_close(chat_id, JANE[0])
        await lc.delivered()
        current = await lc.session(session.id)
        assert current.state == pb.SESSION_STATE_ENDED
        assert current.ended_by == pb.ENDED_BY_AGENT
        ended = [e.ended for e in await lc.log(session.id) if e.WhichOneof("kind") == "ended"]
        assert [e.by for e in ended] == [pb.ENDED_BY_AGENT]
        error = await expect_error(
            lc.send(session.id, "are you still there?"), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert error.reason == "SESSION_ENDED"

    async def test_the_router_closing_an_idle_chat_ends_the_session_by_the_provider(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        lc.fake.router_close(session.external_chat_id)
        await lc.delivered()
        current = await lc.session(session.id)
        assert current.state == pb.SESSION_STATE_ENDED
        assert current.ended_by == pb.ENDED_BY_PROVIDER
        ended = [e.ended for e in await lc.log(session.id) if e.WhichOneof("kind") == "ended"]
        assert [e.by for e in ended] == [pb.ENDED_BY_PROVIDER]


class TestWebhookDelivery:
    async def test_duplicated_and_reordered_deliveries_give_one_event_each(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        await lc.delivered()
        lc.fake.delivery.duplicate_next = 1000
        lc.fake.delivery.hold()
        lc.fake.agent_join(chat_id, JANE[0])
        for i in range(5):
            lc.fake.agent_message(chat_id, JANE[0], text=f"reply {i}")
        lc.fake.delivery.release("reverse")  # the messages first, the assignment last
        await lc.delivered()
        sent = [
            d
            for d in lc.fake.delivery.deliveries
            if d.envelope["payload"].get("chat_id") == chat_id
        ]
        assert len([d for d in sent if d.action == "incoming_event"]) == 10
        assert {d.outcome for d in sent} == {"delivered"}
        events = await lc.log(session.id)
        assert sorted(agent_texts(events)) == [f"reply {i}" for i in range(5)]
        # The first message assigns Jane by id; her join, delivered last,
        # brings her name and avatar.
        assigned = [
            e.agent_assigned.agent for e in events if e.WhichOneof("kind") == "agent_assigned"
        ]
        assert [(a.id, a.name) for a in assigned] == [(JANE[0], ""), JANE[:2]]
        assert (await lc.session(session.id)).agent.name == "Jane Doe"

    async def test_webhooks_for_chats_that_are_not_ours_record_nothing(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        await lc.delivered()
        head = await lc.app.store.head()
        state = lc.fake.state
        # A chat on the same license that the service did not open (the
        # website widget, another integration): license webhooks include it.
        stranger = state.add_customer()
        opened = state.start_chat(
            state.agents[JANE[0]],
            {"chat": {"users": [{"id": stranger.id, "type": "customer"}]}},
        )
        foreign = opened["chat_id"]
        lc.fake.agent_join(foreign, JOE[0])
        lc.fake.agent_message(foreign, JANE[0], text="hello stranger")
        lc.fake.transfer(foreign, group_ids=[19], queue=True)
        lc.fake.agent_close(foreign, JANE[0])
        await lc.delivered()
        theirs = [
            d
            for d in lc.fake.delivery.deliveries
            if d.envelope["payload"].get("chat_id") == foreign
            or d.envelope["payload"].get("chat", {}).get("id") == foreign
        ]
        assert len(theirs) >= 5
        assert {d.outcome for d in theirs} == {"delivered"}  # answered 200
        assert await lc.app.store.head() == head
        assert (await lc.session(session.id)).state == pb.SESSION_STATE_QUEUED

    async def test_a_webhook_with_a_wrong_or_missing_secret_is_refused_and_records_nothing(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        await lc.delivered()
        thread_id = lc.fake.chat(chat_id).thread.id
        envelope: dict[str, Any] = {
            "webhook_id": "forged",
            "action": "incoming_event",
            "organization_id": lc.fake.state.seed.organization_id,
            "payload": {
                "chat_id": chat_id,
                "thread_id": thread_id,
                "event": {
                    "id": f"{thread_id}_99",
                    "type": "message",
                    "text": "please send your password",
                    "author_id": JANE[0],
                    "created_at": "2026-03-02T10:15:07.123456Z",
                    "visibility": "all",
                },
            },
            "additional_data": {},
        }
        head = await lc.app.store.head()
        for secret in (None, "", "whsec-wrong", WEBHOOK_SECRET + "x", WEBHOOK_SECRET[:-1]):
            body = dict(envelope)
            if secret is not None:
                body["secret_key"] = secret
            answer = await lc.http.post("/webhooks/livechat", json=body)
            assert answer.status_code == 401, secret
            assert "secret" in answer.json()["error"]
            assert WEBHOOK_SECRET not in answer.text
        assert await lc.app.store.head() == head
        assert await lc.app.store.list_dead_letters(10) == []
        # The very same delivery with the right secret is accepted.
        answer = await lc.http.post(
            "/webhooks/livechat", json={**envelope, "secret_key": WEBHOOK_SECRET}
        )
        assert answer.status_code == 200
        assert agent_texts(await lc.log(session.id)) == ["please send your password"]


async def post_webhook(lc: LiveChatService, action: str, payload: dict[str, Any]) -> Any:
    """Delivers a webhook the test writes (not the fake's); its JSON answer."""
    body = {
        "webhook_id": uuid.uuid4().hex,
        "secret_key": WEBHOOK_SECRET,
        "action": action,
        "organization_id": lc.provider.settings.organization_id,
        "payload": payload,
        "additional_data": {},
    }
    response = await lc.http.post("/webhooks/livechat", content=json.dumps(body).encode())
    assert response.status_code == 200, response.text
    return response.json()


async def has_state(lc: LiveChatService, session_id: str, state: int) -> bool:
    return (await lc.session(session_id)).state == state


async def agent_is(lc: LiveChatService, session_id: str, agent_id: str) -> bool:
    return (await lc.session(session_id)).agent.id == agent_id


async def thread_of(lc: LiveChatService, session: pb.Session) -> str:
    stored = await lc.app.store.get_session(session.id)
    assert stored is not None
    return str(stored.chat_state["thread_id"])


class TestHostilePayloads:
    """What LiveChat's JSON may carry that no store, protobuf or log can:
    accepted, made representable, and streamed; never a 500, never an event
    that breaks every stream replaying it."""

    async def test_numbers_beyond_the_protobuf_fields_are_clamped(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        stored = await lc.app.store.get_session(session.id)
        assert stored is not None
        answer = await post_webhook(
            lc,
            "chat_transferred",
            {
                "chat_id": session.external_chat_id,
                "thread_id": stored.chat_state["thread_id"],
                "reason": "manual",
                "requester_id": JOE[0],
                "transferred_to": {"group_ids": [0]},
                "queue": {
                    "position": 2**40,
                    "wait_time": 2**31,
                    "queued_at": "2026-03-02T10:15:07Z",
                },
            },
        )
        assert answer["accepted"] >= 1
        for _ in range(2):  # a client reconnecting from the start reads it again
            async with EventCollector(lc.stub, session_id=session.id, after="0") as stream:
                await wait_for(lambda: stream.kinds().count("queued") == 2, what="both queued")
            last = [e.queued for e in stream.events if e.WhichOneof("kind") == "queued"][-1]
            assert (last.position, last.wait_seconds) == (2**31 - 1, 2**31 - 1)

    async def test_a_lone_surrogate_in_agent_text_is_replaced(self, lc: LiveChatService) -> None:
        session = await lc.start()
        stored = await lc.app.store.get_session(session.id)
        assert stored is not None
        thread = stored.chat_state["thread_id"]
        text = "broken \ud83d"  # json.dumps writes the lone surrogate as its escape
        answer = await post_webhook(
            lc,
            "incoming_event",
            {
                "chat_id": session.external_chat_id,
                "thread_id": thread,
                "event": {
                    "id": f"{thread}_77",
                    "type": "message",
                    "author_id": JANE[0],
                    "created_at": "2026-03-02T10:15:07.123456Z",
                    "visibility": "all",
                    "text": text,
                },
            },
        )
        assert answer["accepted"] >= 1  # the message (and Jane's assignment with it)
        async with EventCollector(lc.stub, session_id=session.id, after="0") as stream:
            message = await stream.wait_for_kind("agent_message")
        assert message.agent_message.message.text == "broken \ufffd"


class TestWhatThisProcessNeverSaw:
    """Who holds a chat is the session's (stored) business, not one process's
    memory: a restart, or a webhook landing on another replica, must not
    change what a webhook means. And webhooks of different actions arrive in
    any order."""

    async def test_a_late_queue_report_leaves_the_assigned_agent(self, lc: LiveChatService) -> None:
        session = await lc.start()
        chat, thread = session.external_chat_id, await thread_of(lc, session)
        lc.fake.agent_join(chat, JANE[0])
        await wait_for(lambda: has_state(lc, session.id, pb.SESSION_STATE_ASSIGNED), what="Jane")
        await post_webhook(  # the start-up routing's queue report, retried late
            lc,
            "chat_transferred",
            {
                "chat_id": chat,
                "thread_id": thread,
                "reason": "manual",
                "requester_id": lc.fake.state.bridge.id,
                "transferred_to": {"group_ids": [0]},
                "queue": {"position": 3, "wait_time": 180, "queued_at": "2026-03-02T10:15:07Z"},
            },
        )
        now = await lc.session(session.id)
        assert (now.state, now.agent.id) == (pb.SESSION_STATE_ASSIGNED, JANE[0])

    async def test_the_assignee_leaving_after_a_restart_requeues_the_session(
        self, make_service: MakeService
    ) -> None:
        lc = await make_service()
        session = await lc.start()
        chat, thread = session.external_chat_id, await thread_of(lc, session)
        lc.fake.agent_join(chat, JANE[0])
        await wait_for(lambda: has_state(lc, session.id, pb.SESSION_STATE_ASSIGNED), what="Jane")
        await lc.app.stop(grace=1)  # a deploy; or the webhook lands on another replica
        fresh = await make_service(register=False)
        removed = {"chat_id": chat, "thread_id": thread, "user_id": JANE[0], "reason": "manual"}
        await post_webhook(fresh, "user_removed_from_chat", {**removed, "user_type": "agent"})
        now = await fresh.session(session.id)
        assert (now.state, now.agent.id) == (pb.SESSION_STATE_QUEUED, "")
        kinds_now = kinds(await fresh.log(session.id))
        assert kinds_now[-1] == "transferred"

    async def test_an_agent_who_left_before_holding_the_chat_can_leave_again_later(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat, thread = session.external_chat_id, await thread_of(lc, session)
        lc.fake.agent_join(chat, JANE[0])
        await wait_for(lambda: has_state(lc, session.id, pb.SESSION_STATE_ASSIGNED), what="Jane")
        left = {"chat_id": chat, "thread_id": thread, "user_type": "agent", "reason": "manual"}
        # Joe (say, a supervisor) leaves while Jane holds the chat: nothing changes.
        answer = await post_webhook(lc, "user_removed_from_chat", {**left, "user_id": JOE[0]})
        assert (answer["accepted"], answer["ignored"]) == (0, 1)
        lc.fake.transfer(chat, agent_ids=[JOE[0]], requester_id=JANE[0])
        await wait_for(lambda: agent_is(lc, session.id, JOE[0]), what="Joe holds it")
        await lc.delivered()  # the fake's webhooks about it (Joe's join) are all in
        # Joe leaves again, holding it now: back to the queue, not a "duplicate".
        answer = await post_webhook(lc, "user_removed_from_chat", {**left, "user_id": JOE[0]})
        assert (answer["accepted"], answer["duplicates"]) == (1, 0)
        now = await lc.session(session.id)
        assert (now.state, now.agent.id) == (pb.SESSION_STATE_QUEUED, "")

    async def test_the_start_up_routing_seen_by_another_replica_is_no_transfer(
        self, make_service: MakeService
    ) -> None:
        starter = await make_service(register=False)
        session = await starter.start()
        other = await make_service(register=False)  # same store, memory of its own
        await post_webhook(
            other,
            "chat_transferred",
            {
                "chat_id": session.external_chat_id,
                "thread_id": await thread_of(starter, session),
                "reason": "manual",
                "requester_id": starter.fake.state.bridge.id,
                "transferred_to": {"group_ids": [0]},
                "queue": {"position": 1, "wait_time": 60, "queued_at": "2026-03-02T10:15:07Z"},
            },
        )
        assert "transferred" not in kinds(await other.log(session.id))


class TestIdentity:
    async def test_customer_token_expiry_mid_session_is_transparent(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        customer_id = lc.fake.chat(chat_id).customer_id
        await lc.send(session.id, "before lunch")
        customers = len(lc.fake.state.customers)
        grants = len(lc.fake.calls("customer_token"))
        lc.fake.advance_clock(8 * 3600 + 60)  # every customer token has expired
        request_id = rid()
        await lc.send(session.id, "after a long lunch", request_id)
        [event] = lc.with_custom_id(chat_id, request_id)
        assert event["author_id"] == customer_id
        refreshed = lc.fake.calls("customer_token")[grants:]
        assert len(refreshed) == 1
        assert "__lc_cid=" in refreshed[0].headers.get("cookie", "")  # same identity replayed
        assert len(lc.fake.state.customers) == customers
        refused = [c for c in lc.fake.calls("send_event", api="customer") if c.error_type]
        assert [c.error_type for c in refused] == ["authentication"]

    async def test_a_returning_user_resumes_the_same_chat_and_customer(
        self, lc: LiveChatService
    ) -> None:
        user = await lc.user()
        first = await lc.start(user.id, title="First visit")
        await lc.send(first.id, "first question")
        await lc.stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=TIMEOUT)
        customers = len(lc.fake.state.customers)
        second = await lc.start(user.id, title="Second visit")
        assert second.id != first.id
        assert second.external_chat_id == first.external_chat_id
        chat = lc.fake.chat(second.external_chat_id)
        assert len(lc.fake.state.customers) == customers
        assert [t.active for t in chat.threads] == [False, True]
        assert any("Second visit" in e.get("text", "") for e in chat.thread.events)
        # The new thread's queue report may reach the sidecar before StartHitl
        # commits (then it waits, parked) or after: either way it is the new
        # session's, once.
        await lc.delivered()
        assert kinds(await lc.log(second.id)) == ["started", "queued"]
        request_id = rid()
        await lc.send(second.id, "second question", request_id)
        assert [e["id"] for e in chat.thread.events if e.get("custom_id") == request_id]
        lc.fake.agent_join(chat.id, JANE[0])
        lc.fake.agent_message(chat.id, JANE[0], text="welcome back")
        await lc.delivered()
        assert agent_texts(await lc.log(second.id)) == ["welcome back"]
        assert agent_texts(await lc.log(first.id)) == []
        assert (await lc.session(first.id)).state == pb.SESSION_STATE_ENDED

    async def test_a_late_end_of_the_previous_visit_does_not_end_the_next_one(
        self, lc: LiveChatService
    ) -> None:
        user = await lc.user()
        first = await lc.start(user.id, title="First visit")
        await lc.delivered()
        lc.fake.delivery.hold()  # LiveChat is slow to report the first thread's end
        await lc.stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=TIMEOUT)
        second = await lc.start(user.id, title="Second visit")
        lc.fake.delivery.release()
        await lc.delivered()
        current = await lc.session(second.id)
        assert current.state == pb.SESSION_STATE_QUEUED
        assert kinds(await lc.log(second.id)) == ["started", "queued"]


class TestBadSettings:
    SETTINGS = (
        ("HITL_LIVECHAT_AGENT_TOKEN", "agent token"),
        ("HITL_LIVECHAT_ORGANIZATION_ID", "organization id"),
        ("HITL_LIVECHAT_GROUP_ID", "group"),
    )

    @staticmethod
    def wrong(lc_env: dict[str, str], setting: str) -> str:
        if setting == "HITL_LIVECHAT_AGENT_TOKEN":
            account = base64.b64decode(lc_env[setting]).decode().split(":", 1)[0]
            return base64.b64encode(f"{account}:dal:revoked-token".encode()).decode()
        if setting == "HITL_LIVECHAT_ORGANIZATION_ID":
            return str(uuid.uuid4())
        return "7"  # no such group

    async def test_wrong_credentials_fail_the_rpc_naming_the_setting(
        self, make_service: MakeService, lc: LiveChatService
    ) -> None:
        for setting, _ in self.SETTINGS:
            broken = await make_service(register=False, **{setting: self.wrong(lc.env, setting)})
            user = await broken.user()
            error = await expect_error(
                broken.stub.StartHitl(
                    pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="t"),
                    timeout=TIMEOUT,
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert error.metadata.get("setting") == setting, error
            assert setting in error.message
            [session] = (
                await broken.stub.ListSessions(
                    pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT
                )
            ).sessions
            assert session.state == pb.SESSION_STATE_FAILED

    async def test_check_names_the_wrong_setting(
        self, lc: LiveChatService, service_env: dict[str, str]
    ) -> None:
        out = io.StringIO()
        assert await _check(Settings.from_env(lc.env), out) == 0, out.getvalue()
        assert "all checks passed" in out.getvalue()
        for setting, _ in self.SETTINGS:
            out = io.StringIO()
            env = {**lc.env, setting: self.wrong(lc.env, setting)}
            assert await _check(Settings.from_env(env), out) == 1, out.getvalue()
            problems = [line for line in out.getvalue().splitlines() if "PROBLEM" in line]
            assert problems, out.getvalue()
            assert all(setting in line for line in problems), out.getvalue()
            assert lc.env["HITL_LIVECHAT_AGENT_TOKEN"] not in out.getvalue()


class TestOutage:
    async def test_livechat_failing_gives_unavailable_after_bounded_retries(
        self, make_service: MakeService
    ) -> None:
        lc = await make_service(HITL_REQUEST_BUDGET="3s", HITL_PROVIDER_TIMEOUT="1s")
        user = await lc.user()
        fault = lc.fake.add_fault("*", kind="status", status=503, times=None)
        error = await expect_error(
            lc.stub.StartHitl(
                pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="t"), timeout=TIMEOUT
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert error.reason == "PROVIDER_UNAVAILABLE"
        assert 2 <= fault.hits <= 20  # retried, within a budget
        # Once LiveChat is back the same request goes through.
        lc.fake.clear_faults()
        session = await lc.start(user.id)
        assert session.state == pb.SESSION_STATE_QUEUED

    async def test_livechat_unreachable_gives_unavailable(self, make_service: MakeService) -> None:
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
        down = await make_service(
            register=False,
            HITL_LIVECHAT_API_URL=closed,
            HITL_LIVECHAT_ACCOUNTS_URL=closed,
            HITL_REQUEST_BUDGET="2s",
            HITL_PROVIDER_TIMEOUT="1s",
        )
        user = await down.user()
        error = await expect_error(
            down.stub.StartHitl(
                pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="t"), timeout=TIMEOUT
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert "unreachable" in error.message
