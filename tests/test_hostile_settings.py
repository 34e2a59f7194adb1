"""Every setting, given a value no one meant, stops the start with a one-line
error naming it: never a traceback, and never the whole value quoted back
(a pasted file is no one-line error)."""

from __future__ import annotations

import pytest

from hitl_service.config import ConfigError, Settings, parse_store_url
from providers.errors import ProviderConfigError
from providers.livechat.settings import parse_settings
from tests.livechat.test_settings import env as livechat_env
from tests.support import settings_read_by_source

# Digits int() takes but no one types (superscript two, Arabic-Indic,
# fullwidth), more digits than int() parses, a name too long for the file
# system, numbers float() takes, a lone surrogate.
HOSTILE = (
    "\u00b2",
    "\u0661\u0662",
    "\uff10",
    "1" * 5000,
    "9" * 30,
    "-1",
    "nan",
    "inf",
    "1e309",
    "0x10",
    "a\x00b",
    "\ud800",
)


def _apply(name: str, value: str) -> None:
    if name.startswith("HITL_LIVECHAT_"):
        parse_settings(livechat_env(**{name: value}))
    else:
        Settings.from_env({name: value})


@pytest.mark.parametrize("name", sorted(settings_read_by_source()))
def test_a_hostile_value_is_refused_by_name_or_taken(name: str) -> None:
    for value in HOSTILE:
        try:
            _apply(name, value)
        except (ConfigError, ProviderConfigError) as exc:
            message = str(exc)
            assert name in message or getattr(exc, "setting", "") == name, (value[:20], message)
            assert len(message) < 400, (value[:20], message[:100])


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@db:\u00b2/hitl",
        "postgresql://u:pw@db:\u0661\u0662/hitl",
        "postgresql://u:pw@db:" + "1" * 5000 + "/hitl",
        "postgresql://u:pw@db1:5432,db2:99999/hitl",
    ],
)
def test_a_store_url_with_a_port_no_one_meant_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_store_url(url)
    assert "malformed port" in str(info.value)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize("addr", ["127.0.0.1:\u0661\u0662", "127.0.0.1:\uff18\uff10"])
def test_a_listen_port_in_other_digits_is_refused(addr: str) -> None:
    with pytest.raises(ConfigError, match="HITL_GRPC_ADDR"):
        Settings.from_env({"HITL_GRPC_ADDR": addr})
