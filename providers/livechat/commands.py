"""``hitl-service livechat ...``: webhook registration commands.

``register-webhooks --url URL`` makes LiveChat's webhook registrations match
what the service needs, idempotently: it lists the app's webhooks, keeps the
ones that already match, re-registers ours that differ (a webhook cannot be
edited) and registers the missing ones. ``unregister-webhooks`` removes ours.
"Ours" are the app's webhooks whose description starts with ``hitl-service``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import urlsplit

from providers.errors import ProviderError
from providers.livechat.budget import bounded
from providers.livechat.client import ApiError
from providers.livechat.models import as_dict, as_list, as_str

if TYPE_CHECKING:
    from providers.livechat.provider import LiveChatProvider

MARKER: Final = "hitl-service"
WEBHOOKS: Final[tuple[tuple[str, Mapping[str, Any]], ...]] = (
    ("incoming_event", {"author_type": "agent"}),
    ("incoming_chat", {}),
    ("user_added_to_chat", {}),
    ("user_removed_from_chat", {}),
    ("chat_transferred", {}),
    ("chat_deactivated", {}),
)
COMMAND_TIMEOUT: Final = 60.0


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that writes to ``out`` and never exits the process."""

    def __init__(self, out: IO[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._out = out

    def _print_message(self, message: str, file: object = None) -> None:
        if message:
            self._out.write(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._out.write(message)
        raise _Exit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage()
        self.exit(2, f"error: {message}\n")


def _parser(out: IO[str]) -> _Parser:
    parser = _Parser(
        out,
        prog="hitl-service livechat",
        description="LiveChat commands. They use the HITL_LIVECHAT_* settings.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    register = commands.add_parser(
        "register-webhooks",
        out=out,
        help="register the webhooks the service needs (safe to run again)",
        description="Registers the LiveChat webhooks hitl-service needs, pointing at URL "
        "(the sidecar's POST /webhooks/livechat as LiveChat can reach it, over https), with "
        "HITL_LIVECHAT_WEBHOOK_SECRET as the secret. Matching registrations are kept, "
        "differing ones replaced, missing ones added.",
    )
    register.add_argument("--url", required=True, help="public URL of /webhooks/livechat")
    unregister = commands.add_parser(
        "unregister-webhooks",
        out=out,
        help="remove the webhooks this service registered",
        description="Removes the app's webhooks whose description starts with 'hitl-service'.",
    )
    unregister.add_argument("--url", help="only those pointing at this URL")
    return parser


async def run(provider: LiveChatProvider, argv: Sequence[str], out: IO[str]) -> int:
    """Runs one command; returns the exit status (0 ok, 1 failed, 2 usage)."""
    parser = _parser(out)
    try:
        args = parser.parse_args(list(argv))
    except _Exit as done:
        return done.status
    if args.command is None:
        parser.print_help()
        return 2
    try:
        async with bounded(args.command, COMMAND_TIMEOUT):
            if args.command == "register-webhooks":
                return await _register(provider, args.url, out)
            return await _unregister(provider, args.url, out)
    except ProviderError as err:
        out.write(f"failed: {err}\n")
        return 1


def _desired(
    provider: LiveChatProvider, url: str, action: str, filters: Mapping[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "url": url,
        "description": f"{MARKER}: {action}",
        "action": action,
        "secret_key": provider.settings.webhook_secrets[0].reveal(),
        "owner_client_id": provider.settings.client_id,
        "type": "license",
    }
    if filters:
        body["filters"] = dict(filters)
    return body


def _differences(
    provider: LiveChatProvider, existing: Mapping[str, Any], wanted: Mapping[str, Any]
) -> list[str]:
    why = []
    if as_str(existing.get("url")) != wanted["url"]:
        why.append("URL")
    if as_str(existing.get("type")) not in ("", wanted["type"]):
        why.append("type")
    if as_dict(existing.get("filters")) != as_dict(wanted.get("filters")):
        why.append("filters")
    secret = existing.get("secret_key")
    if not isinstance(secret, str):
        why.append("secret (LiveChat does not show it)")  # cannot tell: replace
    elif not provider.settings.webhook_secrets[0].matches(secret):
        why.append("secret")
    return why


async def _list_ours(provider: LiveChatProvider) -> list[dict[str, Any]]:
    answer = await provider.client.configuration(
        "list_webhooks",
        {"owner_client_id": provider.settings.client_id},
        timeout=COMMAND_TIMEOUT,
        idempotent=True,
    )
    hooks = [
        as_dict(h)
        for h in as_list(answer if isinstance(answer, list) else as_dict(answer).get("webhooks"))
    ]
    return [
        h for h in hooks if as_str(h.get("description")).startswith(MARKER) and as_str(h.get("id"))
    ]


async def _unregister_one(provider: LiveChatProvider, hook_id: str) -> None:
    await provider.client.configuration(
        "unregister_webhook",
        {"id": hook_id, "owner_client_id": provider.settings.client_id},
        timeout=COMMAND_TIMEOUT,
        idempotent=True,
    )


async def _remove(
    provider: LiveChatProvider, action: str, hook: Mapping[str, Any], reason: str, out: IO[str]
) -> None:
    await _unregister_one(provider, as_str(hook.get("id")))
    out.write(f"removed: {action} webhook {as_str(hook.get('id'))} ({reason})\n")


async def _register(provider: LiveChatProvider, url: str, out: IO[str]) -> int:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(url) > 500:
        out.write("error: --url must be an http(s) URL of at most 500 characters\n")
        return 2
    if parts.scheme != "https":
        out.write("note: LiveChat expects an https URL; http works only for local tests\n")
    ours = await _list_ours(provider)
    changed = 0
    for action, filters in WEBHOOKS:
        wanted = _desired(provider, url, action, filters)
        stale: list[tuple[dict[str, Any], str]] = []
        kept = False
        for hook in [h for h in ours if as_str(h.get("action")) == action]:
            why = _differences(provider, hook, wanted)
            if not why and not kept:
                kept = True
                out.write(f"ok: {action} is already registered (id {as_str(hook.get('id'))})\n")
            else:
                stale.append((hook, "differs in " + ", ".join(why) if why else "is a duplicate"))
        # The replacement is registered before the old one goes, so that no
        # event falls between them (one delivered by both is deduplicated).
        # LiveChat takes 3 per action (webhooks made by hand count too), and
        # may refuse a second one for the same URL: then an old one goes first.
        while not kept:
            try:
                answer = await provider.client.configuration(
                    "register_webhook", wanted, timeout=COMMAND_TIMEOUT
                )
            except ApiError as err:
                if err.type not in ("limit_reached", "already_exists") or not stale:
                    raise
                await _remove(provider, action, *stale.pop(), out)
                changed += 1
                continue
            kept = True
            changed += 1
            out.write(f"registered: {action} -> {url} (id {as_str(as_dict(answer).get('id'))})\n")
        for hook, reason in stale:
            await _remove(provider, action, hook, reason, out)
            changed += 1
    out.write(
        f"done: {changed} change(s); LiveChat delivers them once the app is installed "
        "on the account\n"
    )
    return 0


async def _unregister(provider: LiveChatProvider, url: str | None, out: IO[str]) -> int:
    removed = 0
    for hook in await _list_ours(provider):
        if url is not None and as_str(hook.get("url")) != url:
            continue
        await _unregister_one(provider, as_str(hook.get("id")))
        removed += 1
        out.write(f"removed: {as_str(hook.get('action'))} webhook {as_str(hook.get('id'))}\n")
    out.write(f"done: removed {removed} webhook(s)\n")
    return 0
