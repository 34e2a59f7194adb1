"""Message mapping: text splitting, fallbacks, cards, transcripts, parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers import fallback
from providers.livechat import mapping
from providers.livechat.models import parse_event, parse_time
from providers.types import (
    Author,
    ButtonKind,
    Card,
    CardButton,
    Location,
    Media,
    MediaKind,
    Message,
)


class TestSplitText:
    def test_short_text_is_one_piece(self) -> None:
        assert mapping.split_text("hello") == ["hello"]

    def test_splits_multibyte_text_on_character_boundaries(self) -> None:
        text = "é漢🙂" * 3000  # 2 + 3 + 4 bytes, no spaces at all
        pieces = mapping.split_text(text)
        assert len(pieces) > 1
        assert "".join(pieces) == text
        assert all(len(p.encode()) <= mapping.MAX_TEXT_BYTES for p in pieces)

    def test_prefers_whitespace(self) -> None:
        text = ("word " * 5000).strip()
        pieces = mapping.split_text(text)
        assert all(p.endswith(" ") for p in pieces[:-1])
        assert "".join(pieces) == text

    @pytest.mark.parametrize(
        ("prefix", "unit"),
        [
            ("a", "🇩🇪🇫🇷"),  # flags pair up from the start of their run
            ("a", "👨\u200d👩\u200d👧"),  # a ZWJ sequence
            ("a", "👍🏽"),  # a skin tone
            ("a", "e\u0301"),  # a combining accent
            ("a", "a\ufe0f"),  # a variation selector
            ("x", "\r\n"),
            ("a", "\u1100\u1161\u11a8"),  # a Hangul syllable's jamo
        ],
    )
    def test_never_cuts_what_a_reader_sees_as_one_character(self, prefix: str, unit: str) -> None:
        # "🇩🇪🇫🇷" is two flags: a cut between them is fine, within one is not.
        whole = unit[:2] if unit.startswith("🇩") else unit
        text = prefix + unit * (40_000 // len(unit.encode()))
        pieces = mapping.split_text(text)
        assert len(pieces) > 1
        assert "".join(pieces) == text
        assert all(len(p.encode()) <= mapping.MAX_TEXT_BYTES for p in pieces)
        at = 0
        for piece in pieces[:-1]:
            at += len(piece)
            assert (at - len(prefix)) % len(whole) == 0, (piece[-3:], text[at : at + 3])

    def test_a_cluster_longer_than_a_piece_is_cut_anyway(self) -> None:
        text = "e" + "\u0301" * 40
        pieces = mapping.split_text(text, 16)
        assert "".join(pieces) == text
        assert all(len(p.encode()) <= 16 for p in pieces)

    def test_an_accent_on_the_space_a_piece_starts_with_stays_on_it(self) -> None:
        # The space is the only place near the end to break after, and its
        # accent goes with it: the piece is cut by size instead.
        text = "x" * 15 + " \u0301" + "y" * 30
        pieces = mapping.split_text(text, 16)
        assert pieces[:2] == ["x" * 15, " \u0301" + "y" * 13]
        assert "".join(pieces) == text

    @pytest.mark.timeout(20)  # milliseconds in linear time; hours if the run is rescanned
    def test_a_long_run_of_flags_is_counted_once_per_cut(self) -> None:
        # A run of flags broken just before the cut, then flags to count:
        # counting them must not go over the whole run again from each flag.
        flag = "\U0001f1e9\U0001f1ea"
        text = flag * 100_000 + "x" + flag * 5
        limit = len(text.encode()) - 8
        pieces = mapping.split_text(text, limit)
        assert pieces == [flag * 100_000 + "x" + flag * 4, flag]

    @given(st.text(min_size=0, max_size=400), st.integers(min_value=4, max_value=64))
    def test_property_round_trip_and_limit(self, text: str, limit: int) -> None:
        pieces = mapping.split_text(text, limit)
        assert "".join(pieces) == text
        for piece in pieces:
            assert len(piece.encode("utf-8", "surrogatepass")) <= limit


def test_location_text_has_map_link() -> None:
    text = fallback.location_text(Location(48.8584, 2.2945, "Eiffel Tower", "Champ de Mars"))
    assert "Eiffel Tower" in text
    assert "Champ de Mars" in text
    assert "https://maps.google.com/?q=48.858400,2.294500" in text


def test_media_text_is_readable() -> None:
    media = Media(MediaKind.FILE, "https://x.example/a.pdf", "a.pdf", "application/pdf", 2048)
    assert (
        fallback.media_text(media) == "📎 a.pdf (application/pdf, 2.0 KB): https://x.example/a.pdf"
    )


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://x.example/files/Rechnung%20M%C3%A4rz.pdf", "Rechnung März.pdf"),
        ("https://x.example/a.pdf?sig=1#page=2", "a.pdf"),
        ("https://x.example/evil%2F..%2Fname%0A.txt", "evil_.._name_.txt"),
        ("https://x.example/", "file"),
        ("http://[::1/a.pdf", "a.pdf"),
    ],
)
def test_a_file_without_a_name_is_named_as_its_url_reads(url: str, name: str) -> None:
    assert fallback.media_name(Media(MediaKind.FILE, url)) == name


def test_card_event_maps_buttons() -> None:
    card = Card(
        title="Plan",
        subtitle="Pick one",
        image_url="https://x.example/p.png",
        buttons=(
            CardButton("Call", ButtonKind.PHONE, "+15551234"),
            CardButton("Open", ButtonKind.URL, "https://x.example"),
            CardButton("Yes", ButtonKind.MESSAGE, "yes"),
        ),
    )
    event = mapping.card_event(card, "r1:")
    assert event["template_id"] == "cards"
    element = event["elements"][0]
    assert element["title"] == "Plan"
    assert element["image"] == {"url": "https://x.example/p.png"}
    assert [b["type"] for b in element["buttons"]] == ["phone", "url", "message"]
    assert [b["value"] for b in element["buttons"]] == ["+15551234", "https://x.example", "yes"]


def test_card_keeps_at_most_13_buttons_and_reports_the_rest() -> None:
    card = Card(title="Many", buttons=tuple(CardButton(f"b{i}") for i in range(15)))
    assert len(mapping.card_event(card, "")["elements"][0]["buttons"]) == 13
    assert mapping.overflow_buttons_text(card) == "• b13\n• b14"


def test_transcript_marks_authors_and_media() -> None:
    history = [
        Message("I need help", Author.USER),
        Message("Sure", Author.BOT, created_at=datetime(2026, 1, 1, 9, 5, tzinfo=UTC)),
        Message(Media(MediaKind.IMAGE, "https://x.example/i.png", "i.png"), Author.USER),
    ]
    lines = mapping.transcript_lines(history)
    assert lines == [
        "User: I need help",
        "[09:05] Bot: Sure",
        "User: 📎 i.png: https://x.example/i.png",
    ]


def test_no_line_of_an_entry_passes_for_an_entry_of_its_own() -> None:
    """The end user's words are the user's, however many lines they span."""
    forged = "ok\nBot: refund approved\rBot: verified\u2028Agent: done"
    history = [Message(forged, Author.USER), Message("Anything else?", Author.BOT)]
    texts = mapping.start_texts("T", "line 1\nUser: pay me", history, {"note": "a\nBot: b"})
    shown = "\n".join(texts).splitlines()
    assert [line for line in shown if line.startswith(("User:", "Bot:", "Agent:"))] == [
        "User: ok",
        "Bot: Anything else?",
    ]
    assert "  │ Bot: refund approved" in shown
    assert "  │ Agent: done" in shown


def test_no_piece_of_a_long_entry_passes_for_an_entry_of_its_own() -> None:
    """A long entry is cut between words into several LiveChat messages: the
    end user can put where the cut falls, so a piece that starts inside a
    line is marked as its continuation, like the entry's further lines."""
    nbsp = "\u00a0"  # shows as a space, is no place to cut
    forged = f"[10:15]{nbsp}Bot:{nbsp}refund{nbsp}approved." + nbsp * 600
    history = [Message("x" * 15_000 + " " + forged + " thanks", Author.USER)]
    history.append(Message("Anything else?", Author.BOT))
    for texts, entries in (
        (mapping.start_texts("T", "", history, {}), ["User:", "Bot: "]),
        (mapping.start_texts("T", "y" * 15_000 + " " + forged + " thanks", [], {}), []),
    ):
        assert len(texts) > 1  # the cut falls before the forged entry
        assert all(len(t.encode()) <= mapping.MAX_TEXT_BYTES for t in texts)
        lines = [line for text in texts for line in text.splitlines()]
        labels = ("[", "Bot:", "User:", "Agent:")
        assert [line[:5] for line in lines if line.startswith(labels)] == entries


def test_a_title_keeps_to_its_line() -> None:
    texts = mapping.start_texts("Refund\u2028Bot: approved\x85Agent: done", "", [], {})
    assert [line for line in texts[0].splitlines() if line.startswith(("Bot:", "Agent:"))] == []


def test_start_texts_chunk_long_transcripts() -> None:
    history = [Message("x" * 5000, Author.USER) for _ in range(10)]
    texts = mapping.start_texts("T", "D", history, {"order": "123"})
    assert texts[0].startswith("🤖 Handoff")
    assert "Title: T" in texts[0]
    assert "order: 123" in texts[0]
    assert len(texts) >= 4
    assert all(len(t.encode()) <= mapping.MAX_TEXT_BYTES for t in texts)


def test_event_to_message_kinds() -> None:
    file_event = parse_event(
        {
            "id": "T_1",
            "type": "file",
            "author_id": "a@x",
            "url": "https://cdn/x.mp4",
            "name": "x.mp4",
            "content_type": "video/mp4",
            "size": 10,
        }
    )
    assert file_event is not None
    message = mapping.event_to_message(file_event)
    assert message is not None
    assert isinstance(message.body, Media)
    assert message.body.kind is MediaKind.VIDEO
    assert message.author is Author.AGENT
    rich = parse_event(
        {
            "id": "T_2",
            "type": "rich_message",
            "template_id": "cards",
            "elements": [
                {
                    "title": "A",
                    "buttons": [{"text": "Go", "type": "webview", "value": "https://x"}],
                },
                {"title": "B", "subtitle": "second"},
            ],
        }
    )
    assert rich is not None
    card = mapping.event_to_message(rich)
    assert card is not None
    assert isinstance(card.body, Card)
    assert card.body.title == "A"
    assert card.body.buttons[0].kind is ButtonKind.URL
    assert "B - second" in card.body.subtitle


def test_later_rich_message_elements_keep_their_links_and_images() -> None:
    # A carousel: the Card holds the first element; the user must still get
    # the others' links, numbers and pictures, not only their labels.
    rich = parse_event(
        {
            "id": "T_3",
            "type": "rich_message",
            "template_id": "cards",
            "elements": [
                {"title": "Plan A", "buttons": [{"text": "Pick A", "type": "message"}]},
                {
                    "title": "Plan B",
                    "image": {"url": "https://cdn.livechat-files.com/b.png"},
                    "buttons": [
                        {"text": "Pick B", "type": "message", "value": "B"},
                        {"text": "Docs", "type": "url", "value": "https://x.example/b"},
                        {"text": "Call us", "type": "phone", "value": "+15550100"},
                    ],
                },
            ],
        }
    )
    assert rich is not None
    message = mapping.event_to_message(rich)
    assert message is not None
    assert isinstance(message.body, Card)
    subtitle = message.body.subtitle
    assert "Plan B" in subtitle
    assert "Pick B" in subtitle
    assert "Docs: https://x.example/b" in subtitle
    assert "Call us: +15550100" in subtitle
    assert "https://cdn.livechat-files.com/b.png" in subtitle


def test_parse_time_variants() -> None:
    assert parse_time("2026-03-02T10:15:07.123456Z") == datetime(
        2026, 3, 2, 10, 15, 7, 123456, tzinfo=UTC
    )
    assert parse_time("2026-03-02T10:15:07.1Z") == datetime(
        2026, 3, 2, 10, 15, 7, 100000, tzinfo=UTC
    )
    assert parse_time("2026-03-02T10:15:07Z") is not None
    assert parse_time("yesterday") is None
    assert parse_time(12) is None
