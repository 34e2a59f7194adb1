"""Message bodies to LiveChat events and back, and readable text fallbacks."""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Final

from providers.fallback import body_text
from providers.livechat.models import LcEvent, as_dict, as_int, as_list, as_str
from providers.types import (
    Author,
    ButtonKind,
    Card,
    CardButton,
    Media,
    MediaKind,
    Message,
)

MAX_TEXT_BYTES: Final = 16_000
"""Largest text per event. LiveChat says 16 KB; staying under 16,000 bytes is
safe whichever KB it means."""
MAX_BUTTONS: Final = 13
_SPLIT_LOOKBACK: Final = 1024  # prefer breaking at whitespace within the last KB

_BUTTON_TYPES: Final = {
    ButtonKind.MESSAGE: "message",
    ButtonKind.URL: "url",
    ButtonKind.PHONE: "phone",
}
_AUTHOR_LABELS: Final = {Author.USER: "User", Author.BOT: "Bot", Author.AGENT: "Agent"}


def split_text(text: str, limit: int = MAX_TEXT_BYTES) -> list[str]:
    """Splits text into pieces of at most ``limit`` UTF-8 bytes.

    Pieces never cut a character in two, nor (unless one is longer than a
    piece) what a reader sees as one character: an accent and its letter, an
    emoji joined with ZWJ or given a skin tone, a flag's two letters, a Hangul
    syllable's jamo, CR LF. They break after whitespace when there is some
    near the end of a piece, so words stay whole. Joining the pieces gives the
    text back exactly.
    """
    if limit < 4:
        raise ValueError("limit must hold at least one UTF-8 character (4 bytes)")
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(data) - start > limit:
        end = by_size = _char_start(data, start + limit, start)
        window = data[max(start, end - _SPLIT_LOOKBACK) : end]
        cut = max(window.rfind(b" "), window.rfind(b"\n"), window.rfind(b"\t"))
        if cut >= 0:
            end = max(start, end - _SPLIT_LOOKBACK) + cut + 1
        whole = _cluster_start(data, end, start)
        if whole is None and end != by_size:
            # The whitespace starts the piece and an accent (a ZWJ, a skin
            # tone...) goes with it: no whole character ends before it, so
            # the piece is cut by size, where there is one.
            whole = _cluster_start(data, by_size, start)
        end = by_size if whole is None else whole
        pieces.append(data[start:end].decode("utf-8", "surrogatepass"))
        start = end
    pieces.append(data[start:].decode("utf-8", "surrogatepass"))
    return pieces


def _char_start(data: bytes, index: int, floor: int = 0) -> int:
    """``index`` moved back to the first byte of its character (not below ``floor``)."""
    # Continuation bytes are 0b10xxxxxx.
    while index > floor and (data[index] & 0xC0) == 0x80:
        index -= 1
    return index


def _char_at(data: bytes, index: int) -> str:
    end = index + 1
    while end < len(data) and (data[end] & 0xC0) == 0x80:
        end += 1
    return data[index:end].decode("utf-8", "surrogatepass")


def _is_regional_indicator(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def _extends(char: str) -> bool:
    """Whether ``char`` belongs to the character before it (Grapheme_Extend,
    spacing marks, ZWJ, variation selectors, emoji modifiers and tags)."""
    return (
        unicodedata.category(char) in ("Mn", "Me", "Mc")
        or char in ("\u200c", "\u200d")
        or "\ufe00" <= char <= "\ufe0f"
        or "\U0001f3fb" <= char <= "\U0001f3ff"
        or "\U000e0020" <= char <= "\U000e007f"
        or "\U000e0100" <= char <= "\U000e01ef"
    )


def _hangul(char: str) -> str:
    """The Hangul syllable type of ``char``: L, V, T, LV/LVT ("S") or ""."""
    if "\u1100" <= char <= "\u115f" or "\ua960" <= char <= "\ua97f":
        return "L"
    if "\u1160" <= char <= "\u11a7" or "\ud7b0" <= char <= "\ud7c6":
        return "V"
    if "\u11a8" <= char <= "\u11ff" or "\ud7cb" <= char <= "\ud7fb":
        return "T"
    if "\uac00" <= char <= "\ud7a3":
        return "S"
    return ""


def _is_cluster_boundary(data: bytes, index: int, start: int) -> bool:
    """Whether a cut at byte ``index`` (a character start inside ``data``)
    leaves every user-perceived character whole (a close approximation of
    Unicode's extended grapheme cluster rules). ``start``, where the piece
    begins, is itself such a cut."""
    before_start = _char_start(data, index - 1)
    before, after = _char_at(data, before_start), _char_at(data, index)
    if (before, after) == ("\r", "\n") or before == "\u200d" or _extends(after):
        return False
    if _is_regional_indicator(before) and _is_regional_indicator(after):
        # Flags pair up from the start of their run, and the piece started
        # between two: cut only after an even number of them.
        return _regional_run(data, index, start) % 2 == 0
    first, second = _hangul(before), _hangul(after)
    # A syllable's jamo: a leading consonant with what follows, a vowel or
    # trailing consonant with what precedes.
    return not (first and second and (first == "L" or second in ("V", "T")))


def _regional_run(data: bytes, index: int, start: int) -> int:
    """How many regional indicators end at ``index`` (counted back to ``start``).

    In time linear in the run: a regular expression anchored at the end of
    the piece retried the whole run from each of its flags, so a long run of
    flags broken just before the cut took seconds per megabyte of transcript
    (on the event loop).
    """
    count = 0
    while index - 4 >= start and _REGIONAL_INDICATOR.fullmatch(data[index - 4 : index]):
        count += 1
        index -= 4
    return count


# U+1F1E6..U+1F1FF in UTF-8.
_REGIONAL_INDICATOR: Final = re.compile(b"\xf0\x9f\x87[\xa6-\xbf]")


def _cluster_start(data: bytes, end: int, start: int) -> int | None:
    """``end`` (a character start) moved back to the nearest cut above
    ``start`` that keeps user-perceived characters whole; None if there is
    none within ``_SPLIT_LOOKBACK`` bytes (a cluster that long, such as a
    letter under hundreds of accents, is then cut by size)."""
    floor = max(start, end - _SPLIT_LOOKBACK)
    at = end
    while at > floor:
        if _is_cluster_boundary(data, at, start):
            return at
        at = _char_start(data, at - 1, floor)
    return None


def card_event(card: Card, postback_prefix: str) -> dict[str, Any]:
    """A ``rich_message`` event (template ``cards``) for a card.

    Buttons beyond LiveChat's 13 are left out here; the caller sends them
    as text.
    """
    element: dict[str, Any] = {}
    if card.title:
        element["title"] = card.title
    if card.subtitle:
        element["subtitle"] = card.subtitle
    if card.image_url:
        element["image"] = {"url": card.image_url}
    buttons = []
    for index, button in enumerate(card.buttons[:MAX_BUTTONS]):
        entry: dict[str, Any] = {
            "text": button.text,
            "type": _BUTTON_TYPES.get(button.kind, "message"),
            "value": button.value or button.text,
            "postback_id": f"{postback_prefix}btn{index + 1}",
            "user_ids": [],
        }
        if button.kind is ButtonKind.URL:
            entry["target"] = "new"
        buttons.append(entry)
    if buttons:
        element["buttons"] = buttons
    return {"type": "rich_message", "template_id": "cards", "elements": [element]}


def overflow_buttons_text(card: Card) -> str:
    """The buttons a rich message could not hold, as text; ``""`` if none."""
    extra = card.buttons[MAX_BUTTONS:]
    return "\n".join(f"• {b.text}: {b.value}" if b.value else f"• {b.text}" for b in extra)


_CONTINUATION: Final = "  │ "
_CONTINUED: Final = "\n" + _CONTINUATION


def _continued(text: str) -> str:
    """``text`` with every line after its first marked as a continuation, so
    a line an end user wrote ("...\nBot: refund approved") cannot pass for
    an entry of its own (any line break counts: CR, U+2028, ...)."""
    return _CONTINUED.join(text.splitlines()) if text else text


def transcript_lines(history: Sequence[Message]) -> list[str]:
    """The bot transcript, one entry per line, each marked with its author
    (the further lines of an entry marked as its continuation)."""
    lines = []
    for message in history:
        label = _AUTHOR_LABELS.get(message.author, "User")
        stamp = f"[{message.created_at:%H:%M}] " if message.created_at else ""
        lines.append(f"{stamp}{label}: {_continued(body_text(message))}")
    return lines


def start_texts(
    title: str, description: str, history: Sequence[Message], metadata: Mapping[str, str]
) -> list[str]:
    """The texts of a new handoff's first events: a summary, then the transcript.

    Each text is under the event size limit.
    """
    summary = ["🤖 Handoff from the bot"]
    if title:
        summary.append(f"Title: {_continued(title)}")  # U+2028 and U+0085 pass validation
    if description:
        summary.append(f"Description: {_continued(description)}")
    for key in sorted(metadata):
        summary.append(f"{key}: {_continued(metadata[key])}")
    texts = _split_lines("\n".join(summary))
    lines = transcript_lines(history)
    if lines:
        texts.extend(_split_lines("Bot transcript:\n" + "\n".join(lines)))
    return texts


def _split_lines(text: str) -> list[str]:
    """``split_text``, with a piece that starts inside a line marked as its
    continuation: the end user can put where a long entry is cut, and a piece
    that began "[10:15] Bot: refund approved" would pass for an entry."""
    mark = len(_CONTINUATION.encode())
    pieces = split_text(text, MAX_TEXT_BYTES - mark)
    return pieces[:1] + [
        piece if before.endswith("\n") else _CONTINUATION + piece
        for before, piece in itertools.pairwise(pieces)
    ]


def media_kind(content_type: str) -> MediaKind:
    """The media kind for a MIME type."""
    major = content_type.split("/", 1)[0].strip().lower()
    return {"image": MediaKind.IMAGE, "audio": MediaKind.AUDIO, "video": MediaKind.VIDEO}.get(
        major, MediaKind.FILE
    )


def event_to_message(event: LcEvent) -> Message | None:
    """An agent's ``message``/``file``/``rich_message`` event as a Message.

    Returns:
        None for event types that carry nothing for the end user.
    """
    raw = event.raw
    body: str | Media | Card
    if event.type == "message":
        body = as_str(raw.get("text"))
        if not body:
            return None
    elif event.type == "file":
        url = as_str(raw.get("url"))
        if not url:
            return None
        content_type = as_str(raw.get("content_type"))
        body = Media(
            kind=media_kind(content_type),
            url=url,
            name=as_str(raw.get("name")),
            mime_type=content_type,
            size_bytes=max(0, as_int(raw.get("size"))),
            caption=as_str(raw.get("alternative_text")),
        )
    elif event.type == "rich_message":
        card = rich_message_card(raw)
        if card is None:
            return None
        body = card
    else:
        return None
    return Message(body=body, author=Author.AGENT, id=event.id, created_at=event.created_at)


_KIND_BY_TYPE: Final = {"url": ButtonKind.URL, "webview": ButtonKind.URL, "phone": ButtonKind.PHONE}


def _button_text(button: Mapping[str, Any]) -> str:
    """A folded button as text: a link or number keeps its value, which is
    all the user can act on once the button is gone."""
    text, value = as_str(button.get("text")), as_str(button.get("value"))
    if value and _KIND_BY_TYPE.get(as_str(button.get("type"))) is not None:
        return f"{text}: {value}" if text else value
    return text


def rich_message_card(raw: Mapping[str, Any]) -> Card | None:
    """A rich message as one Card; later elements are folded into the subtitle
    (with their links, numbers and image URLs)."""
    elements = [as_dict(e) for e in as_list(raw.get("elements")) if isinstance(e, dict)]
    if not elements:
        return None
    head = elements[0]
    buttons = tuple(
        CardButton(
            text=as_str(b.get("text")),
            kind=_KIND_BY_TYPE.get(as_str(b.get("type")), ButtonKind.MESSAGE),
            value=as_str(b.get("value")),
        )
        for b in (as_dict(x) for x in as_list(head.get("buttons")))
        if as_str(b.get("text"))
    )
    subtitle = as_str(head.get("subtitle"))
    extra = []
    for element in elements[1:]:
        parts = [as_str(element.get("title")), as_str(element.get("subtitle"))]
        parts += [_button_text(as_dict(b)) for b in as_list(element.get("buttons"))]
        parts.append(as_str(as_dict(element.get("image")).get("url")))
        if text := " - ".join(p for p in parts if p):
            extra.append(text)
    if extra:
        subtitle = "\n".join([subtitle, *extra]) if subtitle else "\n".join(extra)
    return Card(
        title=as_str(head.get("title")),
        subtitle=subtitle,
        image_url=as_str(as_dict(head.get("image")).get("url")),
        buttons=buttons,
    )
