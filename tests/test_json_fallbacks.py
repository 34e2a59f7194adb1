"""JSON text: orjson where it can, the standard library for what it refuses,
so nothing that encoded before fails now."""

from __future__ import annotations

import io
import json
import logging
import math
import sys

import pytest
import structlog

from hitl_service.logs import SecretRedactor, configure_logging
from hitl_service.store.rows import dumps, loads


class TestColumns:
    def test_ordinary_values_are_compact_and_read_back(self) -> None:
        value = {"text": 'héllo \u2028 "q"\n', "n": [1, 2.5, None, True], "nested": {"a": {}}}
        text = dumps(value)
        assert text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        assert loads(text) == value

    def test_what_orjson_refuses_is_encoded_by_the_standard_library(self) -> None:
        huge = 2**70
        assert loads(dumps({"n": huge})) == {"n": huge}
        assert dumps({1: "one"}) == '{"1":"one"}'
        surrogate = "a\ud800b"  # a lone surrogate: not UTF-8, but valid in a str
        assert dumps([surrogate]) == json.dumps([surrogate], ensure_ascii=False)

    def test_what_only_the_standard_library_reads_is_still_read(self) -> None:
        assert math.isnan(loads('{"x": NaN}')["x"])
        assert loads('["\\ud800"]') == ["\ud800"]
        assert loads({"already": "decoded"}) == {"already": "decoded"}
        assert loads(None) is None


class TestLogLines:
    def test_lines_with_values_orjson_refuses_are_still_written(self) -> None:
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        out = io.StringIO()
        try:
            configure_logging(
                log_format="json", level="info", redactor=SecretRedactor(), cache=False
            )
            structlog.configure(logger_factory=structlog.PrintLoggerFactory(out))
            log = structlog.get_logger("t")
            log.info("plain", n=1, text="é")
            log.info("huge", n=2**70)
            log.info("object", thing=_Opaque())
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
            structlog.reset_defaults()
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [(line["event"], line.get("n")) for line in lines] == [
            ("plain", 1),
            ("huge", 2**70),
            ("object", None),
        ]
        assert lines[0]["text"] == "é"
        assert lines[2]["thing"] == "<opaque>"

    def test_each_line_is_written_whole_in_one_write(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # A line and its newline written apart: a kill -9 between them leaves
        # the process's last line unterminated (glued to whatever comes
        # next in the file), and a standard-library line written by another
        # thread in between ends up inside it.
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        err = _Writes()
        monkeypatch.setattr(sys, "stderr", err)
        try:
            configure_logging(
                log_format="json", level="info", redactor=SecretRedactor(), cache=False
            )
            structlog.get_logger("t").info("ours", n=1)
            logging.getLogger("uvicorn.error").warning("theirs")
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
            structlog.reset_defaults()
        assert all(w.endswith("\n") and w.count("\n") == 1 for w in err.writes), err.writes
        assert [json.loads(w)["event"] for w in err.writes] == ["ours", "theirs"]


class _Writes(io.StringIO):
    """A stream recording each ``write`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"
