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


async def test_a_command_s_output_masks_a_secret_the_backend_quoted(
    tmp_path: Path, fake: FakeLiveChat
) -> None:
    """The command prints LiveChat's refusal on stdout; LiveChat's message
    may quote what it was sent. stdout passed the provider's text on as it
    was, while the logs beside it were masked."""
    secret = "whsec-quoted-back-6c1f09e2d7ab"
    env = {**_env(fake, tmp_path, "warning"), "HITL_LIVECHAT_WEBHOOK_SECRET": secret}
    fake.add_fault(
        "register_webhook",
        api="configuration",
        error_type="validation",
        message=f"secret_key {secret} is not valid",
        status=400,
    )
    done = await run(*COMMANDS[1], env=env, cwd=tmp_path)
    assert await done.wait() == 1, done.output
    assert "failed: LiveChat refused register_webhook: validation: secret_key" in done.output
    assert secret not in done.output
