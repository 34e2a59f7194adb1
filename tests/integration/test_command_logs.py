"""``check`` and the provider's commands log as ``serve`` does: to stderr, in
``HITL_LOG_FORMAT``, filtered by ``HITL_LOG_LEVEL`` and through the secret
redactor. They used structlog's defaults before: debug lines (every LiveChat
call) in console format, mixed into the report on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fake_livechat import FakeLiveChat
from tests.integration.test_secrets_in_logs import run

HOOK_URL = "https://hitl.example/webhooks/livechat"
COMMANDS = (("check",), ("livechat", "register-webhooks", "--url", HOOK_URL))


def _env(fake: FakeLiveChat, tmp_path: Path, level: str) -> dict[str, str]:
    return {
        **fake.env(webhook_secret="s" * 32),
        "HITL_PROVIDER": "livechat",
        "HITL_STORE_URL": f"sqlite:///{tmp_path}/hitl.db",
        "HITL_DATA_DIR": str(tmp_path / "data"),
        "HITL_LOG_FORMAT": "json",
        "HITL_LOG_LEVEL": level,
    }


async def test_commands_log_to_stderr_in_the_configured_format(
    tmp_path: Path, fake: FakeLiveChat
) -> None:
    env = _env(fake, tmp_path, "debug")
    for command in COMMANDS:
        done = await run(*command, env=env, cwd=tmp_path)
        assert await done.wait() == 0, done.output
        assert done.stdout, command
        assert not [line for line in done.stdout if "livechat.call" in line], command
        logged = [json.loads(line) for line in done.stderr]  # one JSON object per line
        assert "livechat.call" in {entry["event"] for entry in logged}, command


async def test_commands_keep_to_the_configured_level(tmp_path: Path, fake: FakeLiveChat) -> None:
    env = _env(fake, tmp_path, "warning")
    for command in COMMANDS:
        done = await run(*command, env=env, cwd=tmp_path)
        assert await done.wait() == 0, done.output
        assert done.stderr == [], command
        assert not [line for line in done.stdout if "livechat.call" in line], command
