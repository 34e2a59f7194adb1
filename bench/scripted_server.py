"""hitl-service on the scripted test provider (``tests/scripted.py``).

The fallback webhook target when the LiveChat provider or its fake cannot
run: the same ``build_app`` and ``App.start`` as ``hitl-service serve``, with
the scripted provider's tiny JSON webhook format.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from hitl_service.app import build_app
from hitl_service.cli import freeze_startup_heap, run_with_loop
from hitl_service.config import Settings
from hitl_service.logs import SecretRedactor, configure_logging
from tests import scripted


async def serve() -> int:
    """Serves until SIGTERM/SIGINT."""
    settings = Settings.from_env()
    configure_logging(
        log_format=settings.log_format, level=settings.log_level, redactor=SecretRedactor()
    )
    app = build_app(settings, provider_factory=scripted.create)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await app.start()
    print("scripted hitl-service serving", file=sys.stderr, flush=True)
    freeze_startup_heap()
    await stop.wait()
    await app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(run_with_loop(serve(), os.environ.get("HITL_EVENT_LOOP", "auto")))
