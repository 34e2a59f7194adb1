"""Standard error that takes no more lines (the log collector gone, or a file
on a full disk) costs the log lines, not the calls that log them."""

from __future__ import annotations

import errno
import io
import logging
import os
import sys

import grpc
import pytest
import structlog

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from hitl_service.logs import SecretRedactor, configure_logging
from tests.conftest import start_app
from tests.support import make_user, rid


class _Gone(io.StringIO):
    """A standard error whose every write fails with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code
        self.tries = 0

    def write(self, text: str) -> int:
        self.tries += 1
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize("code", [errno.EPIPE, errno.ENOSPC])
async def test_calls_succeed_when_log_lines_cannot_be_written(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    gone = _Gone(code)
    monkeypatch.setattr(sys, "stderr", gone)
    try:
        configure_logging(log_format="json", level="info", redactor=SecretRedactor(), cache=False)
        app = await start_app(service_env)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                stub = pb_grpc.HitlServiceStub(channel)
                user = await make_user(stub)
                # Its session.started line raised: UNKNOWN, the handoff open.
                started = await stub.StartHitl(
                    pb.StartHitlRequest(user_id=user.id, title="t", request_id=rid()), timeout=10
                )
                await stub.SendMessage(
                    pb.SendMessageRequest(
                        session_id=started.session.id,
                        message=pb.Message(text="hi"),
                        request_id=rid(),
                    ),
                    timeout=10,
                )
                logging.getLogger("uvicorn.error").warning("a standard-library line")
        finally:
            await app.stop(grace=1)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.reset_defaults()
    assert gone.tries > 0  # lines were tried, and dropped
