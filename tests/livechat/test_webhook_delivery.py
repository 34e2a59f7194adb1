"""Webhooks as the fake delivers them (retries, duplicates, reordering) to a
sidecar stand-in that calls ``parse_webhook``."""

from __future__ import annotations

from providers.types import (
    AgentAssigned,
    AgentMessage,
    Card,
    Ended,
    EndedBy,
    Media,
    Message,
    Queued,
    Transferred,
)
from tests.fake_livechat import FakeLiveChat
from tests.livechat.conftest import start_session, wait_for


class TestDeliveredByTheFake:
    """Webhooks as the fake delivers them to a sidecar stand-in."""

    async def test_a_whole_handoff(self, provider, fake: FakeLiveChat, receiver) -> None:
        session = await start_session(provider, title="Refund", history=[])
        await provider.send(
            session.chat,
            session.user,
            Message("hello"),
            request_id="m1",
            uncertain=False,
            timeout=5,
        )
        fake.agent_join(session.chat_id)
        fake.agent_message(session.chat_id, text="Hi, I'm Jane")
        fake.agent_message(session.chat_id, text="internal: refund approved", visibility="agents")
        fake.agent_message(
            session.chat_id,
            file={"name": "label.pdf", "content_type": "application/pdf", "size": 99},
        )
        fake.agent_message(
            session.chat_id, rich={"template_id": "cards", "elements": [{"title": "Rate us"}]}
        )
        fake.agent_close(session.chat_id)
        await fake.delivery.idle()
        kinds = [type(e.kind).__name__ for e in receiver.events]
        assert kinds == [
            "Queued",
            "AgentAssigned",
            "AgentMessage",
            "AgentMessage",
            "AgentMessage",
            "Ended",
        ]
        messages = receiver.kinds(AgentMessage)
        assert messages[0].message.body == "Hi, I'm Jane"
        assert messages[0].agent.name == "Jane Doe"
        assert isinstance(messages[1].message.body, Media)
        assert isinstance(messages[2].message.body, Card)
        assert receiver.kinds(Ended)[0].by is EndedBy.AGENT
        assert receiver.rejected == []
        await wait_for(lambda: all(d.outcome == "delivered" for d in fake.delivery.deliveries))

    async def test_retries_and_duplicates_collapse_by_key(
        self, provider, fake: FakeLiveChat, receiver
    ) -> None:
        session = await start_session(provider)
        fake.agent_join(session.chat_id)
        await fake.delivery.idle()
        receiver.fail_next = 1  # the next delivery gets a 503 and is retried
        fake.delivery.duplicate_next = 1
        fake.agent_message(session.chat_id, text="once")
        await fake.delivery.idle()
        assert [m.message.body for m in receiver.kinds(AgentMessage)] == ["once"]
        assert receiver.duplicates == 1
        retried = [d for d in fake.delivery.deliveries if d.attempts[:1] == ["503"]]
        assert retried
        assert retried[0].outcome == "delivered"

    async def test_reordered_deliveries_keep_their_keys(
        self, provider, fake: FakeLiveChat, receiver
    ) -> None:
        session = await start_session(provider)
        fake.agent_join(session.chat_id)
        await fake.delivery.idle()
        fake.delivery.hold()
        fake.agent_message(session.chat_id, text="first")
        fake.agent_message(session.chat_id, text="second")
        fake.delivery.release("reverse")
        await fake.delivery.idle()
        messages = [e for e in receiver.events if isinstance(e.kind, AgentMessage)]
        assert [m.kind.message.body for m in messages] == ["second", "first"]
        # Order is recoverable from the event timestamps and ids.
        ordered = sorted(messages, key=lambda e: (e.occurred_at, e.dedupe_key))
        assert [m.kind.message.body for m in ordered] == ["first", "second"]

    async def test_router_close_and_legacy_recipients(
        self, provider, fake: FakeLiveChat, receiver
    ) -> None:
        session = await start_session(provider)
        fake.agent_join(session.chat_id)
        fake.agent_message(
            session.chat_id, text="legacy note", visibility="agents", legacy_recipients=True
        )
        fake.agent_message(session.chat_id, text="legacy reply", legacy_recipients=True)
        fake.router_close(session.chat_id)
        await fake.delivery.idle()
        assert [m.message.body for m in receiver.kinds(AgentMessage)] == ["legacy reply"]
        assert receiver.kinds(Ended)[0].by is EndedBy.PROVIDER

    async def test_caller_stop_reports_caller(self, provider, fake: FakeLiveChat, receiver) -> None:
        session = await start_session(provider)
        await provider.stop(session.chat, session.user, "done", timeout=5)
        await fake.delivery.idle()
        assert receiver.kinds(Ended)[0].by is EndedBy.CALLER

    async def test_transfers_delivered(self, provider, fake: FakeLiveChat, receiver) -> None:
        session = await start_session(provider)
        fake.agent_join(session.chat_id)
        fake.transfer(session.chat_id, agent_ids=["joe@acme.example"], reason="manual")
        fake.transfer(
            session.chat_id, group_ids=[19], queue=True, reason="unassigned", requester_id=None
        )
        await fake.delivery.idle()
        transfers = receiver.kinds(Transferred)
        assert transfers[0].to_agent.id == "joe@acme.example"
        # The transfer may arrive before Joe's user_added_to_chat; that one names him.
        assert receiver.kinds(AgentAssigned)[-1].agent.name == "Joe Roe"
        assert transfers[1].to_group_id == "19"
        assert transfers[1].to_agent is None
        assert transfers[1].from_agent.id == "joe@acme.example"
        assert receiver.kinds(Queued)[-1].position == 1
