"""The defaults the configuration tables state are the ones the code uses.

Each documented default is parsed the way the service parses the variable
and compared with what an unset variable gives, so ``10s`` matches 10.0
and a changed default in the code (or a typo in a table) fails here.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import sys
from pathlib import Path

import pytest

from hitl_service.config import Settings
from providers.livechat import parse_settings
from providers.livechat.settings import LiveChatSettings

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"`(HITL_[A-Z0-9_]*[A-Z0-9])`")
_CODE = re.compile(r"`([^`]*)`")

# README rows whose default is not a core setting's: checked elsewhere, or
# read outside ``Settings`` (the CLI, the local provider).
_NOT_CORE = {
    "HITL_EVENT_LOOP",  # the CLI picks the loop (tests/test_cli.py)
    "HITL_LOCAL_GROUP_ID",  # the local provider
    "HITL_LOCAL_STATE_FILE",  # the local provider, under HITL_DATA_DIR
    "HITL_LOG_FORMAT",  # depends on the terminal: test_log_format_default
}


def _rows(page: Path) -> list[list[str]]:
    """The cells of every table row of ``page`` that starts with a setting."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in page.read_text().splitlines()
        if line.startswith("| `HITL_")
    ]


def readme_defaults() -> list[tuple[str, str]]:
    """``(variable, documented default)`` for every README row that states one.

    A row may name several variables with as many defaults (``2``, ``10``).
    """
    found: list[tuple[str, str]] = []
    for cells in _rows(ROOT / "README.md"):
        names = _NAME.findall(cells[0])
        values = _CODE.findall(cells[1])
        if not names or not values:
            continue  # no default (required, or off when empty)
        if names[0] == "HITL_LOG_FORMAT":
            continue
        assert len(names) == len(values), f"cannot pair names and defaults in {cells[:2]}"
        found.extend(zip(names, values, strict=True))
    return found


def _core(settings: Settings) -> Settings:
    return dataclasses.replace(settings, env={})


def test_the_readme_tables_are_read() -> None:
    documented = dict(readme_defaults())
    # Spot checks that the parsing finds the tables at all.
    assert {"HITL_GRPC_ADDR", "HITL_HTTP_MAX_BODY", "HITL_STORE_POOL_MAX"} <= set(documented)
    assert len(documented) >= 30, sorted(documented)


@pytest.mark.parametrize(
    ("variable", "default"),
    [pair for pair in readme_defaults() if pair[0] not in _NOT_CORE],
    ids=lambda value: str(value),
)
def test_readme_default_is_the_code_default(variable: str, default: str) -> None:
    """Setting the variable to its documented default changes nothing."""
    unset = _core(Settings.from_env({}))
    documented = _core(Settings.from_env({variable: default}))
    changed = {
        f.name: (getattr(documented, f.name), getattr(unset, f.name))
        for f in dataclasses.fields(Settings)
        if getattr(documented, f.name) != getattr(unset, f.name)
    }
    assert not changed, f"README says {variable} defaults to {default!r}; code: {changed}"


def test_log_format_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: ``console`` on a TTY, else ``json``."""
    row = next(c for c in _rows(ROOT / "README.md") if c[0] == "`HITL_LOG_FORMAT`")
    assert row[1] == "`console` on a TTY, else `json`", row
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert Settings.from_env({}).log_format == "console"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert Settings.from_env({}).log_format == "json"


_LIVECHAT_REQUIRED = {
    "HITL_LIVECHAT_CLIENT_ID": "client-1",
    "HITL_LIVECHAT_ORGANIZATION_ID": "0b8e6f3e-2f0c-4a9e-b8a1-7d2c5e9f1a33",
    "HITL_LIVECHAT_AGENT_TOKEN": base64.b64encode(b"account-1:pat-value").decode(),
    "HITL_LIVECHAT_WEBHOOK_SECRET": "hook-secret-value",
    "HITL_LIVECHAT_REDIRECT_URI": "https://bridge.example.com/cb",
}
_LIVECHAT_DEFAULT = re.compile(r"\bdefaults?(?: and maximum)? `([^`]*)`(?: and `([^`]*)`)?")


def livechat_defaults() -> list[tuple[str, str]]:
    """``(variable, default)`` from docs/livechat.md rows saying ``default `X```
    (or ``defaults `X` and `Y``` for a row of two variables)."""
    found: list[tuple[str, str]] = []
    for cells in _rows(ROOT / "docs" / "livechat.md"):
        names = _NAME.findall(cells[0])
        match = _LIVECHAT_DEFAULT.search(cells[1])
        if match is None:
            continue
        values = [v for v in match.groups() if v is not None]
        assert len(names) == len(values), f"cannot pair names and defaults in {cells[:2]}"
        found.extend(zip(names, values, strict=True))
    return found


def test_the_livechat_tables_are_read() -> None:
    assert {
        "HITL_LIVECHAT_GROUP_ID",
        "HITL_LIVECHAT_API_URL",
        "HITL_LIVECHAT_ACCOUNTS_URL",
        "HITL_LIVECHAT_REQUEST_TIMEOUT",
        "HITL_LIVECHAT_SERVER_TIMEOUT",
        "HITL_LIVECHAT_MAX_UPLOAD_BYTES",
    } <= dict(livechat_defaults()).keys()


@pytest.mark.parametrize(("variable", "default"), livechat_defaults(), ids=lambda v: str(v))
def test_livechat_default_is_the_code_default(variable: str, default: str) -> None:
    unset = parse_settings(_LIVECHAT_REQUIRED)
    documented = parse_settings({**_LIVECHAT_REQUIRED, variable: default})
    changed = {
        f.name: (getattr(documented, f.name), getattr(unset, f.name))
        for f in dataclasses.fields(LiveChatSettings)
        if getattr(documented, f.name) != getattr(unset, f.name)
    }
    assert not changed, f"docs/livechat.md says {variable} defaults to {default!r}; code: {changed}"


def test_settings_defaults_agree_with_parsing_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Settings()`` (what tests and embedders build) and ``from_env({})``
    (what ``serve`` runs with) are the same defaults the tables document."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # log_format: json
    assert _core(Settings()) == _core(Settings.from_env({}))


def test_livechat_dataclass_defaults_agree_with_parsing() -> None:
    parsed = parse_settings(_LIVECHAT_REQUIRED)
    for f in dataclasses.fields(LiveChatSettings):
        if f.default is not dataclasses.MISSING:
            assert getattr(parsed, f.name) == f.default, f.name
