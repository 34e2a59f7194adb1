"""The service (and the fake LiveChat) as real OS processes, for tests that
kill, restart or run several replicas.

``ServiceProcess`` runs ``python -m hitl_service serve`` with an environment,
learns its ports from its ``service.ready`` log line, waits until gRPC health says SERVING, and
can stop it with SIGTERM or kill it with SIGKILL. ``FakeLiveChatProcess``
runs ``python -m tests.fake_livechat`` and exposes the settings pointing at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0


async def run_cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    """``python -m hitl_service ARGS`` in a subprocess; returns its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hitl_service",
        *args,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


class ServiceProcess:
    """One ``hitl-service serve`` process."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        cwd: Path,
        name: str = "service",
        command: tuple[str, ...] = ("-m", "hitl_service", "serve"),
    ) -> None:
        self.env = dict(env)
        self.command = command  # the interpreter's arguments
        self.cwd = cwd
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.grpc_port = 0
        self.http_port = 0
        self.log_path = cwd / f"{name}.log"
        self._log: Any = None
        self._pump: asyncio.Task[None] | None = None
        self.banner = asyncio.Event()

    @property
    def grpc_target(self) -> str:
        """``127.0.0.1:<port>`` of the gRPC server."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        """``http://127.0.0.1:<port>`` of the sidecar."""
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> ServiceProcess:
        """Starts the process and waits until it is SERVING."""
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "HITL_LOG_FORMAT": "json"}
        # The code of this checkout, not what an editable install (of another
        # worktree sharing the virtualenv) points at: the process runs in cwd.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.command,
            env=env,
            cwd=self.cwd,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.banner.clear()
        self._pump = asyncio.create_task(self._read_stderr())
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self.banner.wait()
                await self.wait_serving()
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"{self.name} did not start; log:\n{self.log_path.read_text(errors='replace')}"
            ) from None
        return self

    async def _read_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self._log.write(line)
            self._log.flush()
            text = line.decode(errors="replace")
            if '"service.ready"' in text:  # JSON logs carry the ports there
                ready = json.loads(text)
                self.grpc_port, self.http_port = int(ready["grpc_port"]), int(ready["http_port"])
                self.banner.set()

    async def wait_serving(self) -> None:
        """Polls gRPC health until SERVING."""
        async with grpc.aio.insecure_channel(self.grpc_target) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service="hitl.v1.HitlService"), timeout=2
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)

    def channel(self) -> grpc.aio.Channel:
        """A new insecure channel to this process (close it when done)."""
        return grpc.aio.insecure_channel(self.grpc_target)

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.HitlServiceAsyncStub:
        """A stub on ``channel``."""
        return pb_grpc.HitlServiceStub(channel)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then waits for the exit status."""
        return await self._signal(signal.SIGTERM, timeout)

    async def interrupt(self, timeout: float = 30.0) -> int:
        """SIGINT (Ctrl-C), then waits for the exit status."""
        return await self._signal(signal.SIGINT, timeout)

    async def kill(self) -> int:
        """SIGKILL: no shutdown code runs."""
        return await self._signal(signal.SIGKILL, 30.0)

    async def _signal(self, signum: int, timeout: float) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signum)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class FakeLiveChatProcess:
    """The fake LiveChat as its own process (survives service kills)."""

    def __init__(
        self, *, webhook_secret: str = "whsec-test-0123456789", live_clock: bool = False
    ) -> None:
        self.webhook_secret = webhook_secret
        self.live_clock = live_clock  # LiveChat's time moves (else it stands still)
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.env: dict[str, str] = {}

    async def start(self) -> FakeLiveChatProcess:
        """Starts the fake; returns once it printed its settings."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fake_livechat",
            "--webhook-secret",
            self.webhook_secret,
            *(["--live-clock"] if self.live_clock else []),
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT)
        info = json.loads(line)
        self.url, self.env = info["url"], dict(info["env"])
        return self

    async def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)
