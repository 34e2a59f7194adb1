"""send: every message kind, splitting, custom ids, exactly-once after doubt."""

from __future__ import annotations

from typing import Any

import pytest

from providers import fallback
from providers.errors import ChatInactive, ProviderRejected, ProviderUnavailable
from providers.livechat import LiveChatProvider
from providers.types import ButtonKind, Card, CardButton, Location, Media, MediaKind, Message
from tests.fake_livechat import FakeLiveChat
from tests.livechat.conftest import Session, start_session


@pytest.fixture
async def session(provider: LiveChatProvider) -> Session:
    return await start_session(provider)


def customer_events(fake: FakeLiveChat, session: Session) -> list[dict[str, Any]]:
    return [
        e
        for e in fake.events(session.chat_id)
        if e.get("author_id") == session.user.external_user_id
    ]


async def send(provider: LiveChatProvider, session: Session, body, request_id: str = "req-1", **kw):
    return await provider.send(
        session.chat,
        session.user,
        Message(body),
        request_id=request_id,
        uncertain=kw.pop("uncertain", False),
        timeout=5,
    )


async def test_text_uses_request_id_as_custom_id(provider, fake, session) -> None:
    result = await send(provider, session, "Where is my parcel?")
    [event] = customer_events(fake, session)
    assert event["text"] == "Where is my parcel?"
    assert event["custom_id"] == "req-1"
    assert result.external_message_id == event["id"]


async def test_long_multibyte_text_is_split(provider, fake, session) -> None:
    text = "日本語のテキスト🙂 " * 2500  # ~65 KB
    result = await send(provider, session, text)
    events = customer_events(fake, session)
    assert len(events) >= 4
    assert "".join(e["text"] for e in events) == text
    assert [e["custom_id"] for e in events] == ["req-1"] + [
        f"req-1#{i}" for i in range(2, len(events) + 1)
    ]
    assert result.external_message_id == events[0]["id"]


@pytest.mark.parametrize(
    ("kind", "name", "mime"),
    [
        (MediaKind.IMAGE, "cat.png", "image/png"),
        (MediaKind.FILE, "invoice.pdf", "application/pdf"),
        (MediaKind.AUDIO, "note.ogg", "audio/ogg"),
        (MediaKind.VIDEO, "clip.mp4", "video/mp4"),
    ],
)
async def test_media_is_uploaded_and_sent_as_file(
    provider, fake, session, kind, name, mime
) -> None:
    url = f"{fake.url}/_media/2048/{name}?type={mime}"
    await send(provider, session, Media(kind, url, name, mime, 2048))
    [event] = customer_events(fake, session)
    assert event["type"] == "file"
    assert event["url"].startswith(f"{fake.url}/cdn/")
    assert event["name"] == name
    assert event["content_type"] == mime
    assert event["size"] == 2048
    assert len(fake.calls("upload_file", api="customer")) == 1


async def test_media_without_a_name_is_named_as_its_url_reads(provider, fake, session) -> None:
    url = f"{fake.url}/_media/10/R%C3%A9sum%C3%A9%202026.pdf?type=application/pdf"
    await send(provider, session, Media(MediaKind.FILE, url))
    [event] = customer_events(fake, session)
    assert (event["type"], event["name"]) == ("file", "Résumé 2026.pdf")


async def test_media_caption_is_a_second_part(provider, fake, session) -> None:
    url = f"{fake.url}/_media/10/cat.png?type=image/png"
    await send(provider, session, Media(MediaKind.IMAGE, url, "cat.png", caption="my cat"))
    events = customer_events(fake, session)
    assert [e["type"] for e in events] == ["file", "message"]
    assert events[1]["text"] == "my cat"
    assert [e["custom_id"] for e in events] == ["req-1", "req-1#2"]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/_media/2048/setup.exe", "setup.exe"),  # LiveChat refuses executables
        ("/_media/20971520/big.bin", "big.bin"),  # over the 10 MB cap: not even fetched fully
        ("/_media/10/missing.png", "missing.png"),  # the URL does not work
    ],
)
async def test_refused_media_goes_as_a_readable_link(provider, fake, session, path, name) -> None:
    url = f"{fake.url}{path}"
    await send(provider, session, Media(MediaKind.FILE, url, name, "application/octet-stream", 123))
    [event] = customer_events(fake, session)
    assert event["type"] == "message"
    assert event["text"].startswith(f"📎 {name} (application/octet-stream, 123 bytes): ")
    assert url in event["text"]
    assert event["custom_id"] == "req-1"


async def test_upload_too_large_for_livechat_goes_as_a_link(provider, fake, session) -> None:
    fake.state.config.max_upload_bytes = 1000
    url = f"{fake.url}/_media/5000/photo.jpg?type=image/jpeg"
    await send(provider, session, Media(MediaKind.IMAGE, url, "photo.jpg"))
    [event] = customer_events(fake, session)
    assert event["type"] == "message"
    assert url in event["text"]
    assert fake.calls("upload_file")[0].error_type == "entity_too_large"


async def test_location_is_readable_text(provider, fake, session) -> None:
    await send(provider, session, Location(48.8584, 2.2945, "Eiffel Tower", "Champ de Mars"))
    [event] = customer_events(fake, session)
    assert "Eiffel Tower" in event["text"]
    assert "https://maps.google.com/?q=48.858400,2.294500" in event["text"]


async def test_card_is_a_rich_message(provider, fake, session) -> None:
    card = Card(
        "Pick a plan",
        "Monthly",
        "https://x/p.png",
        (CardButton("Pro", ButtonKind.URL, "https://x/pro"),),
    )
    await send(provider, session, card)
    [event] = customer_events(fake, session)
    assert event["type"] == "rich_message"
    assert event["template_id"] == "cards"
    assert event["elements"][0]["title"] == "Pick a plan"
    assert event["elements"][0]["buttons"][0]["type"] == "url"


async def test_card_refused_by_livechat_falls_back_to_text(provider, fake, session) -> None:
    fake.add_fault("send_event", error_type="validation", message="Invalid rich message")
    card = Card("Pick a plan", buttons=(CardButton("Pro", ButtonKind.MESSAGE, "pro"),))
    await send(provider, session, card)
    [event] = customer_events(fake, session)
    assert event["type"] == "message"
    assert "Pick a plan" in event["text"]
    assert "• Pro: pro" in event["text"]
    assert event["custom_id"] == "req-1"


def long_card(buttons: int = 13) -> Card:
    """A valid card whose text is well over one LiveChat message."""
    return Card(
        "Pick a plan",
        "ß" * 2000,
        "https://x/p.png",
        tuple(
            CardButton(f"Plan {i}", ButtonKind.MESSAGE, f"plan {i} " + "ü" * 990)
            for i in range(buttons)
        ),
    )


async def test_a_refused_card_too_long_for_one_text_reaches_the_agent_whole(
    provider, fake, session
) -> None:
    fake.add_fault("send_event", error_type="validation", message="Invalid rich message")
    card = long_card(buttons=15)
    await send(provider, session, card)
    events = customer_events(fake, session)
    assert {e["type"] for e in events} == {"message"}
    ids = [e["custom_id"] for e in events]
    assert ids == ["req-1", *(f"req-1#{i}" for i in range(2, len(ids) + 1))]
    text = "".join(e["text"] for e in events)
    for line in fallback.card_text(card).splitlines():  # every button, once
        assert text.count(line) == 1, line[:20]


async def test_an_accepted_card_sends_none_of_its_text(provider, fake, session, clock) -> None:
    fake.add_fault("send_event", kind="lost_response")
    with pytest.raises(ProviderUnavailable):
        await send(provider, session, long_card())
    clock.advance(provider.settings.server_timeout)
    await send(provider, session, long_card(), uncertain=True)  # found as it landed
    [event] = customer_events(fake, session)
    assert event["type"] == "rich_message"


async def test_an_uncertain_refused_card_completes_its_text(provider, fake, session, clock) -> None:
    from tests.fake_livechat import Fault

    fake.faults.add(Fault("send_event", error_type="validation"))  # the rich message
    fake.faults.add(Fault("send_event", kind="delay", delay=0))  # its text's first piece
    fake.faults.add(Fault("send_event", kind="drop"))  # the second piece never arrives
    with pytest.raises(ProviderUnavailable):
        await send(provider, session, long_card())
    clock.advance(provider.settings.server_timeout)
    await send(provider, session, long_card(), uncertain=True)
    events = customer_events(fake, session)
    assert {e["type"] for e in events} == {"message"}
    ids = [e["custom_id"] for e in events]
    assert ids == ["req-1", "req-1#2"]
    assert "".join(e["text"] for e in events) == fallback.card_text(long_card())


async def test_uncertain_send_after_lost_response_sends_once(
    provider, fake, session, clock
) -> None:
    fake.add_fault("send_event", kind="lost_response")
    with pytest.raises(ProviderUnavailable) as info:
        await send(provider, session, "exactly once")
    assert info.value.uncertain
    clock.advance(provider.settings.server_timeout)  # LiveChat is surely done with it
    result = await send(provider, session, "exactly once", uncertain=True)
    events = customer_events(fake, session)
    assert [e["text"] for e in events] == ["exactly once"]
    assert result.external_message_id == events[0]["id"]


async def test_uncertain_multi_part_send_completes_only_the_missing_parts(
    provider, fake, session, clock
) -> None:
    text = "a " * 12000  # two parts
    fake.add_fault("send_event", kind="lost_response")  # the first part landed, its answer did not
    with pytest.raises(ProviderUnavailable):
        await send(provider, session, text)
    clock.advance(provider.settings.server_timeout)
    await send(provider, session, text, uncertain=True)
    events = customer_events(fake, session)
    assert [e["custom_id"] for e in events] == ["req-1", "req-1#2"]
    assert "".join(e["text"] for e in events) == text


async def test_a_request_id_like_another_messages_part_is_still_sent_after_doubt(
    provider, fake, session, clock
) -> None:
    """``order-7#2`` is also the custom id of the second part of a long message
    ``order-7``: a retry must not take that part for its own message."""
    long_text = "a " * 12000  # two parts: order-7 and order-7#2
    await send(provider, session, long_text, request_id="order-7")
    fake.add_fault("send_event", kind="drop")  # never reaches LiveChat
    with pytest.raises(ProviderUnavailable):
        await send(provider, session, "a short one", request_id="order-7#2")
    clock.advance(provider.settings.server_timeout)
    await send(provider, session, "a short one", request_id="order-7#2", uncertain=True)
    texts = [e["text"] for e in customer_events(fake, session)]
    assert texts[-1] == "a short one"
    assert "".join(texts[:-1]) == long_text


async def test_a_long_messages_part_like_another_request_id_is_still_sent_after_doubt(
    provider, fake, session, clock
) -> None:
    await send(provider, session, "a short one", request_id="order-8#2")
    from tests.fake_livechat import Fault

    fake.faults.add(Fault("send_event", kind="delay", delay=0))  # the first part passes
    fake.faults.add(Fault("send_event", kind="drop"))  # the second never arrives
    long_text = "b " * 12000
    with pytest.raises(ProviderUnavailable):
        await send(provider, session, long_text, request_id="order-8")
    clock.advance(provider.settings.server_timeout)
    await send(provider, session, long_text, request_id="order-8", uncertain=True)
    texts = [e["text"] for e in customer_events(fake, session)]
    assert texts[0] == "a short one"
    assert "".join(texts[1:]) == long_text


async def test_an_earlier_handoffs_message_with_the_same_request_id_is_not_this_one(
    provider, fake, clock
) -> None:
    """Request ids are forgotten after 48 hours: one may come back, in a later
    handoff of the same user, whose chat still holds the earlier thread."""
    first = await start_session(provider)
    await send(provider, first, "hello", request_id="msg-1")
    await provider.stop(first.chat, first.user, "done", timeout=5)
    second = await start_session(
        provider, user=first.user, session_id="s-2", request_id="start-2", previous_chat=first.chat
    )
    fake.add_fault("send_event", kind="drop")
    with pytest.raises(ProviderUnavailable):
        await send(provider, second, "hello", request_id="msg-1")
    clock.advance(provider.settings.server_timeout)
    await send(provider, second, "hello", request_id="msg-1", uncertain=True)
    thread = fake.chat(second.chat_id).thread
    assert [e.get("text") for e in thread.events if e.get("custom_id") == "msg-1"] == ["hello"]


async def test_failure_after_a_first_part_is_uncertain(provider, fake, session) -> None:
    text = "b " * 12000
    fake.add_fault("send_event", error_type="too_many_requests")  # hits the first part
    with pytest.raises(ProviderUnavailable) as info:
        await send(provider, session, text)
    assert not info.value.uncertain
    fake.clear_faults()
    from tests.fake_livechat import Fault

    fault = Fault("send_event", error_type="too_many_requests")
    fake.faults.add(Fault("send_event", kind="delay", delay=0))  # first part passes
    fake.faults.add(fault)  # second part refused
    with pytest.raises(ProviderUnavailable) as info:
        await send(provider, session, text, request_id="req-2")
    assert info.value.uncertain  # part one is at LiveChat: a retry must check
    await send(provider, session, text, request_id="req-2", uncertain=True)
    ids = [e["custom_id"] for e in customer_events(fake, session)]
    assert ids == ["req-2", "req-2#2"]


async def test_a_refusal_after_a_first_part_says_what_the_agent_has(
    provider, fake, session
) -> None:
    """The first part is with the agent: the error must say so, or a caller
    that resends the whole message under a new id doubles that part."""
    from tests.fake_livechat import Fault

    fake.faults.add(Fault("send_event", kind="delay", delay=0))  # first part passes
    fake.faults.add(Fault("send_event", error_type="validation"))  # second part refused
    with pytest.raises(ProviderRejected) as info:
        await send(provider, session, "c " * 12000)
    assert "part 2 of 2" in str(info.value)
    assert "the agent has the first 1" in str(info.value)
    assert [e["custom_id"] for e in customer_events(fake, session)] == ["req-1"]


async def test_uncertain_send_that_never_arrived_is_sent(provider, fake, session, clock) -> None:
    fake.add_fault("send_event", kind="drop")
    with pytest.raises(ProviderUnavailable):
        await send(provider, session, "hello")
    assert customer_events(fake, session) == []
    clock.advance(provider.settings.server_timeout)
    await send(provider, session, "hello", uncertain=True)
    assert [e["text"] for e in customer_events(fake, session)] == ["hello"]


async def test_an_unanswered_send_is_not_looked_for_while_livechat_may_still_run_it(
    provider, fake, session, clock
) -> None:
    """A send we stopped waiting for may still store its event later; looking
    for it (and resending) before LiveChat's server timeout could double it."""
    fake.add_fault("send_event", kind="drop")
    with pytest.raises(ProviderUnavailable):
        await send(provider, session, "slow")
    clock.advance(provider.settings.server_timeout - 1)
    with pytest.raises(ProviderUnavailable) as info:
        await send(provider, session, "slow", uncertain=True)
    assert info.value.uncertain  # the next attempt must still check
    assert info.value.retry_after == pytest.approx(1, abs=0.01)
    assert not fake.calls("list_threads")
    clock.advance(1)
    await send(provider, session, "slow", uncertain=True)
    assert [e["text"] for e in customer_events(fake, session)] == ["slow"]


async def test_an_answered_failure_is_looked_for_at_once(provider, fake, session) -> None:
    fake.add_fault("send_event", error_type="internal")  # LiveChat answered: nothing is running
    with pytest.raises(ProviderUnavailable) as info:
        await send(provider, session, "hello")
    assert info.value.uncertain
    await send(provider, session, "hello", uncertain=True)
    assert len(fake.calls("list_threads")) == 1
    assert [e["text"] for e in customer_events(fake, session)] == ["hello"]


async def test_send_to_an_inactive_chat_raises_chat_inactive(provider, fake, session) -> None:
    fake.agent_join(session.chat_id)
    fake.agent_close(session.chat_id)
    with pytest.raises(ChatInactive):
        await send(provider, session, "anyone?")
