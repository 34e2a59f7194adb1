"""``python -m tests.fake_livechat --port N``: the fake as its own process.

Prints one JSON line with the base URL and the ``HITL_LIVECHAT_*`` settings
that point at it, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from tests.fake_livechat.clock import LiveClock
from tests.fake_livechat.config import FakeConfig
from tests.fake_livechat.server import FakeLiveChat


async def _main(host: str, port: int, secret: str, fast_retries: bool, live_clock: bool) -> None:
    config = FakeConfig()
    if not fast_retries:
        config.webhook_retry_delays = (10.0, 20.0, 30.0)
    fake = FakeLiveChat(config=config, clock=LiveClock() if live_clock else None)
    await fake.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"url": fake.url, "env": fake.env(webhook_secret=secret)}) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main() -> None:
    """Parses the arguments and serves."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_livechat", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--webhook-secret", default="whsec-test-0123456789")
    parser.add_argument("--real-retry-delays", action="store_true", help="10/20/30 s retries")
    parser.add_argument(
        "--live-clock", action="store_true", help="LiveChat's time moves with real time"
    )
    args = parser.parse_args()
    asyncio.run(
        _main(
            args.host, args.port, args.webhook_secret, not args.real_retry_delays, args.live_clock
        )
    )


if __name__ == "__main__":
    main()
