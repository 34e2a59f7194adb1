"""URLs in what providers report, as the contract promises them: http or https.

Callers render an agent's card buttons, images, files and avatars as links;
a provider passes on what its agents (or their bots) wrote, and a
``javascript:`` or ``data:`` link there would run in the caller's page.
Schemeless links (``//cdn/x``, ``cdn.example.com/x``, as some backends give
avatars) are taken as https; anything else is dropped.
"""

from __future__ import annotations

from dataclasses import replace
from typing import overload

from providers.types import (
    Agent,
    AgentAssigned,
    AgentLeft,
    AgentMessage,
    ButtonKind,
    Card,
    EventKind,
    Media,
    Message,
    Transferred,
)


def web_url(url: str) -> str:
    """``url`` as an http(s) URL, or "" when it is none."""
    if url.startswith(("https://", "http://")):
        return url  # the usual case, before any copy
    text = url.strip()
    scheme, colon, rest = text.partition(":")
    if colon and scheme.lower() in ("http", "https") and rest.startswith("//"):
        return text
    if text.startswith("//") and len(text) > 2:
        return "https:" + text
    host = text.split("/", 1)[0]
    if "." in host and ":" not in host and text.isprintable() and " " not in text:
        return "https://" + text
    return ""


def with_web_urls(kind: EventKind) -> EventKind:
    """``kind`` with every link made an http(s) URL or dropped."""
    if isinstance(kind, AgentMessage):
        message = _message(kind.message)
        agent = _agent(kind.agent)
        if message is kind.message and agent is kind.agent:
            return kind
        return replace(kind, message=message, agent=agent)
    if isinstance(kind, AgentAssigned | AgentLeft):
        agent = _agent(kind.agent)
        return kind if agent is kind.agent else replace(kind, agent=agent)
    if isinstance(kind, Transferred):
        from_agent, to_agent = _agent(kind.from_agent), _agent(kind.to_agent)
        if from_agent is kind.from_agent and to_agent is kind.to_agent:
            return kind
        return replace(kind, from_agent=from_agent, to_agent=to_agent)
    return kind


@overload
def _agent(agent: Agent) -> Agent: ...
@overload
def _agent(agent: None) -> None: ...
def _agent(agent: Agent | None) -> Agent | None:
    if agent is None or not agent.avatar_url:
        return agent
    avatar = web_url(agent.avatar_url)
    return agent if avatar == agent.avatar_url else replace(agent, avatar_url=avatar)


def _message(message: Message) -> Message:
    body = message.body
    if isinstance(body, Media):
        url = web_url(body.url)
        if url == body.url:
            return message
        if url:
            return replace(message, body=replace(body, url=url))
        # A file nobody can fetch: what the agent said about it stays.
        text = body.caption or body.name or "(a file without a web link)"
        return replace(message, body=text)
    if isinstance(body, Card):
        card = _card(body)
        return message if card is body else replace(message, body=card)
    return message


def _card(card: Card) -> Card:
    image = web_url(card.image_url) if card.image_url else ""
    buttons = tuple(
        button
        if button.kind is not ButtonKind.URL
        else replace(button, value=web_url(button.value))
        for button in card.buttons
    )
    # A link button without a link left is no button: its text alone would
    # pass for a reply to send.
    kept = tuple(b for b in buttons if b.kind is not ButtonKind.URL or b.value)
    if image == card.image_url and kept == card.buttons:
        return card
    return replace(card, image_url=image, buttons=kept)
