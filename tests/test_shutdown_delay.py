"""HITL_SHUTDOWN_DELAY_SECONDS: on SIGTERM the process says it is not ready
(/readyz 503, gRPC health NOT_SERVING) but goes on serving calls and
webhooks for the delay, so a load balancer that still routes to it for a
moment gets answers, not refused connections; then the usual shutdown."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl_service.config import ConfigError, Settings
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.processes import FakeLiveChatProcess, ServiceProcess
from tests.support import wait_for


@pytest.fixture
async def fake() -> AsyncIterator[FakeLiveChatProcess]:
    process = await FakeLiveChatProcess().start()
    yield process
    await process.stop()


def livechat_env(fake: FakeLiveChatProcess, tmp_path: Path, delay: str) -> dict[str, str]:
    return {
        **fake.env,
        "HITL_PROVIDER": "livechat",
        "HITL_GRPC_ADDR": "127.0.0.1:0",
        "HITL_HTTP_ADDR": "127.0.0.1:0",
        "HITL_STORE_URL": f"sqlite:///{tmp_path}/hitl.db",
        "HITL_DATA_DIR": str(tmp_path / "data"),
        "HITL_PROVIDER_TIMEOUT": "2s",
        "HITL_GRACE_SECONDS": "1s",
        "HITL_RECONCILE_INTERVAL": "0",
        "HITL_SHUTDOWN_DELAY_SECONDS": delay,
    }


def webhook(secret: str) -> bytes:
    """A genuine webhook (right secret) of an action the service ignores:
    answered 200 once it went through verification and parsing."""
    body: dict[str, Any] = {
        "webhook_id": "8f2c0b6a1e5d4c3b9a7f6e5d4c3b2a10",
        "secret_key": secret,
        "action": "chat_teleported",
        "payload": {"whatever": 1},
        "additional_data": {},
    }
    return json.dumps(body).encode()


async def health_status(service: ServiceProcess) -> Any:
    async with service.channel() as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="hitl.v1.HitlService"))
        return reply.status


async def test_not_ready_but_serving_during_the_delay(
    fake: FakeLiveChatProcess, tmp_path: Path
) -> None:
    service = await ServiceProcess(livechat_env(fake, tmp_path, "120s"), cwd=tmp_path).start()
    assert service.proc is not None
    try:
        async with httpx.AsyncClient(base_url=service.http_base, timeout=10) as http:
            assert (await http.get("/readyz")).status_code == 200
            service.proc.send_signal(signal.SIGTERM)

            first_503: list[float] = []

            async def not_ready_for_a_second() -> bool:
                # Longer than the ~0.1 s the listener stayed open anyway
                # (uvicorn's exit tick), where this all went through too.
                if (await http.get("/readyz")).status_code != 503:
                    return False
                first_503[:] = first_503 or [time.monotonic()]
                return time.monotonic() - first_503[0] >= 1.0

            await wait_for(not_ready_for_a_second, what="/readyz to say 503 for a second")
            readyz = await http.get("/readyz")
            assert readyz.json() == {
                "status": "unavailable",
                "problems": {"service": "shutting down"},
            }
            assert await health_status(service) == health_pb2.HealthCheckResponse.NOT_SERVING
            # Still served: a webhook and a gRPC call (over a new connection each).
            async with httpx.AsyncClient(base_url=service.http_base, timeout=10) as fresh:
                hook = await fresh.post("/webhooks/livechat", content=webhook(fake.webhook_secret))
            assert hook.status_code == 200, hook.text
            async with service.channel() as channel:
                user = await service.stub(channel).CreateUser(
                    pb.CreateUserRequest(name="Ida", external_id="crm-ida"), timeout=10
                )
            assert user.user.id
            assert service.proc.returncode is None
        # A second signal (SIGINT, as Ctrl-C) skips the rest of the delay:
        # the process exits 0 long before 120 s (ServiceProcess SIGKILLs it
        # after 30 s, which would be -9).
        assert await service.interrupt(timeout=30.0) == 0
    finally:
        await service.kill()
    log = service.log()
    assert '"service.stopping"' in log
    assert '"service.shutdown_delay_skipped"' in log
    assert '"service.stopped"' in log


async def test_the_delay_ends_by_itself(fake: FakeLiveChatProcess, tmp_path: Path) -> None:
    service = await ServiceProcess(livechat_env(fake, tmp_path, "1s"), cwd=tmp_path).start()
    try:
        assert await service.terminate(timeout=30.0) == 0
    finally:
        await service.kill()
    log = service.log()
    assert '"delay_seconds":1.0' in log.replace(" ", "")
    assert '"service.shutdown_delay_skipped"' not in log
    assert '"service.stopped"' in log


@pytest.mark.parametrize(("value", "seconds"), [("", 0.0), ("0", 0.0), ("5", 5.0), ("2m", 120.0)])
def test_shutdown_delay_setting(value: str, seconds: float) -> None:
    settings = Settings.from_env({"HITL_SHUTDOWN_DELAY_SECONDS": value})
    assert settings.shutdown_delay == seconds
    assert Settings.from_env({}).shutdown_delay == 0.0


@pytest.mark.parametrize("bad", ["soon", "-1", "11m"])
def test_a_bad_shutdown_delay_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="HITL_SHUTDOWN_DELAY_SECONDS"):
        Settings.from_env({"HITL_SHUTDOWN_DELAY_SECONDS": bad})
