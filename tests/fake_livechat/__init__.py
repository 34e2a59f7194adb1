"""A high-fidelity fake of the LiveChat platform for tests.

It serves the accounts (customer tokens), Agent, Customer and Configuration
Chat APIs (v3.6, and v3.5 with a ``Legacy`` header), delivers webhooks to
registered URLs, and lets tests script agents and failures. See
``/work/shared/livechat-api.md`` §14 for the behaviour it follows; every
unconfirmed (❓) behaviour is a knob in :class:`FakeConfig`.

In-process::

    async with FakeLiveChat(clock=clock) as fake:
        provider = create(ProviderDeps(env=fake.env(), ...))

Standalone: ``python -m tests.fake_livechat --port 8099``.
"""

from tests.fake_livechat.clock import FakeClock, rfc3339
from tests.fake_livechat.config import DEFAULT_STATUS, FakeConfig
from tests.fake_livechat.errors import LcError, OAuthError
from tests.fake_livechat.faults import Fault
from tests.fake_livechat.server import FakeLiveChat, ServedApp
from tests.fake_livechat.state import FakeState, Seed

__all__ = [
    "DEFAULT_STATUS",
    "FakeClock",
    "FakeConfig",
    "FakeLiveChat",
    "FakeState",
    "Fault",
    "LcError",
    "OAuthError",
    "Seed",
    "ServedApp",
    "rfc3339",
]
