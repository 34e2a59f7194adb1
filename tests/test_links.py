"""Links in what providers report reach callers as http(s) URLs or not at all."""

from __future__ import annotations

import pytest

from hitl_service.core.links import web_url, with_web_urls
from providers.types import (
    Agent,
    AgentAssigned,
    AgentMessage,
    ButtonKind,
    Card,
    CardButton,
    Media,
    MediaKind,
    Message,
    Queued,
    Transferred,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://cdn.example.com/a.png", "https://cdn.example.com/a.png"),
        ("http://example.com", "http://example.com"),
        ("HTTPS://Example.com/x", "HTTPS://Example.com/x"),
        ("  https://example.com/x ", "https://example.com/x"),
        ("//cdn.livechat-files.com/avatar.png", "https://cdn.livechat-files.com/avatar.png"),
        (
            "livechat.s3.amazonaws.com/avatars/jane.png",
            "https://livechat.s3.amazonaws.com/avatars/jane.png",
        ),
        ("javascript:alert(document.cookie)", ""),
        ("JavaScript://example.com/%0Aalert(1)", ""),
        ("data:text/html;base64,PHNjcmlwdD4=", ""),
        ("vbscript:msgbox(1)", ""),
        ("file:///etc/passwd", ""),
        ("mailto:jane@acme.example", ""),
        ("not a link", ""),
        ("localhost/x", ""),
        ("//", ""),
        ("", ""),
    ],
)
def test_web_url(url: str, expected: str) -> None:
    assert web_url(url) == expected


JANE = Agent("jane@acme.example", "Jane", "javascript:alert(1)")
SAFE_JANE = Agent("jane@acme.example", "Jane", "")


def test_a_card_keeps_its_web_links_and_loses_the_others() -> None:
    card = Card(
        title="Pay",
        image_url="data:image/svg+xml,<svg onload=alert(1)>",
        buttons=(
            CardButton("Pay now", ButtonKind.URL, "javascript:pay()"),
            CardButton("Terms", ButtonKind.URL, "//acme.example/terms"),
            CardButton("Call us", ButtonKind.PHONE, "+15550100"),
            CardButton("Yes", ButtonKind.MESSAGE, "javascript:is-a-postback-here"),
        ),
    )
    kind = with_web_urls(AgentMessage(Message(card), JANE))
    assert isinstance(kind, AgentMessage)
    assert kind.agent == SAFE_JANE
    assert kind.message.body == Card(
        title="Pay",
        image_url="",
        buttons=(
            CardButton("Terms", ButtonKind.URL, "https://acme.example/terms"),
            CardButton("Call us", ButtonKind.PHONE, "+15550100"),
            CardButton("Yes", ButtonKind.MESSAGE, "javascript:is-a-postback-here"),
        ),
    )


def test_a_file_without_a_web_link_becomes_what_the_agent_said_of_it() -> None:
    media = Media(MediaKind.FILE, "javascript:x()", name="invoice.pdf", caption="Your invoice")
    kind = with_web_urls(AgentMessage(Message(media), SAFE_JANE))
    assert isinstance(kind, AgentMessage)
    assert kind.message.body == "Your invoice"
    named = with_web_urls(
        AgentMessage(Message(Media(MediaKind.FILE, "x:y", name="a.pdf")), SAFE_JANE)
    )
    assert isinstance(named, AgentMessage)
    assert named.message.body == "a.pdf"


def test_agents_everywhere_lose_a_script_avatar() -> None:
    assigned = with_web_urls(AgentAssigned(JANE))
    assert assigned == AgentAssigned(SAFE_JANE)
    moved = with_web_urls(Transferred(from_agent=JANE, to_group_id="2", to_agent=None))
    assert moved == Transferred(from_agent=SAFE_JANE, to_group_id="2", to_agent=None)


def test_what_needs_no_change_is_returned_as_is() -> None:
    fine = AgentMessage(
        Message(Card(title="t", image_url="https://x.example/i.png")),
        Agent("a", "A", "https://x.example/a.png"),
    )
    assert with_web_urls(fine) is fine
    queued = Queued(position=1, wait_seconds=3)
    assert with_web_urls(queued) is queued
