"""The LiveChat provider (``HITL_PROVIDER=livechat``).

``create(deps)`` reads the ``HITL_LIVECHAT_*`` settings and builds the
provider; see ``docs/livechat.md`` for connecting an account.
"""

from __future__ import annotations

from providers.base import ProviderDeps
from providers.livechat.provider import LiveChatProvider
from providers.livechat.settings import LiveChatSettings, parse_settings


def create(deps: ProviderDeps) -> LiveChatProvider:
    """Builds the LiveChat provider from ``deps.env``.

    Raises:
        ProviderConfigError: A setting is missing or malformed.
    """
    return LiveChatProvider(parse_settings(deps.env), deps)


__all__ = ["LiveChatProvider", "LiveChatSettings", "create", "parse_settings"]
