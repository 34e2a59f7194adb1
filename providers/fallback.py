"""Readable text for message bodies a provider cannot carry natively.

The core sends a provider only the body kinds its ``Capabilities`` say it
carries; anything else arrives as text rendered here. Providers may use
these renderers too (LiveChat does, when a rich message is refused).
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import unquote, urlsplit

from providers.types import Capabilities, Card, Location, Media, Message


def human_size(size: int) -> str:
    """``1536`` -> ``1.5 KB``."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover - the loop always returns


def media_name(media: Media) -> str:
    """The file name to show: the given name, else the URL's last segment
    as a reader knows it (``Rechnung%20M%C3%A4rz.pdf``: ``Rechnung März.pdf``)."""
    if media.name:
        return media.name
    try:
        path = urlsplit(media.url).path
    except ValueError:  # a malformed host ("http://[::1/a.pdf"): the path is still there
        path = media.url.split("?", 1)[0].split("#", 1)[0]
    tail = unquote(path.rstrip("/").rsplit("/", 1)[-1])
    # What decoding may bring in (%2F, %0A, ...) has no place in a file name.
    tail = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in tail)
    return tail.strip()[:255] or "file"


def media_text(media: Media) -> str:
    """A readable link for a file that could not be attached."""
    details = [
        d for d in (media.mime_type, human_size(media.size_bytes) if media.size_bytes else "") if d
    ]
    suffix = f" ({', '.join(details)})" if details else ""
    text = f"📎 {media_name(media)}{suffix}: {media.url}"
    return f"{text}\n{media.caption}" if media.caption else text


def location_text(location: Location) -> str:
    """A location as readable text with a map link."""
    lines = [f"📍 {location.name}" if location.name else "📍 Location"]
    if location.address:
        lines.append(location.address)
    lines.append(f"https://maps.google.com/?q={location.latitude:.6f},{location.longitude:.6f}")
    return "\n".join(lines)


def card_text(card: Card) -> str:
    """A card as readable text (the fallback when rich messages are refused)."""
    lines = [line for line in (card.title, card.subtitle) if line]
    if card.image_url:
        lines.append(card.image_url)
    for button in card.buttons:
        lines.append(f"• {button.text}: {button.value}" if button.value else f"• {button.text}")
    return "\n".join(lines) or "(empty card)"


def body_text(message: Message) -> str:
    """Any message body as one readable text."""
    body = message.body
    if isinstance(body, str):
        return body
    if isinstance(body, Media):
        return media_text(body)
    if isinstance(body, Location):
        return location_text(body)
    return card_text(body)


def fit_to(message: Message, capabilities: Capabilities) -> Message:
    """``message`` with its body as text unless the provider carries its kind."""
    body = message.body
    native = (
        isinstance(body, str)
        or (isinstance(body, Media) and capabilities.media)
        or (isinstance(body, Location) and capabilities.location)
        or (isinstance(body, Card) and capabilities.card)
    )
    return message if native else replace(message, body=body_text(message))


__all__ = [
    "body_text",
    "card_text",
    "fit_to",
    "human_size",
    "location_text",
    "media_name",
    "media_text",
]
