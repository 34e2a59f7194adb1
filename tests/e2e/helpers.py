"""End-to-end helpers: tool checks that skip loudly (or fail in CI), the
service as a real ``hitl-service serve`` process, the agent console's HTTP
API, and line-by-line reading of a client process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cancelling_proxy import CancellingProxy
from tests.ports import free_port
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
TIMEOUT = 30.0
EVENT_LINE = re.compile(r"^\[(\d+)\] (\w+): (.*)$")
# What the examples call on a first run: a replica's gRPC core can answer
# any of them CANCELLED (docs/errors.md), which the examples must ride out.
EXAMPLE_METHODS = frozenset(
    f"/hitl.v1.HitlService/{name}"
    for name in ("CreateUser", "StartHitl", "SendMessage", "StreamEvents")
)


def required() -> bool:
    """CI sets HITL_REQUIRE_E2E=1: a missing tool is then a failure, not a skip."""
    return os.environ.get("HITL_REQUIRE_E2E", "") == "1"


def need(condition: bool, reason: str) -> None:
    """Skips (loudly) or fails the test when ``condition`` is false."""
    if condition:
        return
    message = f"END-TO-END TEST NOT RUN: {reason}"
    if required():
        pytest.fail(f"{message} (HITL_REQUIRE_E2E=1)")
    pytest.skip(message)


def _serve_command() -> list[str]:
    script = shutil.which("hitl-service", path=str(Path(sys.executable).parent))
    if script is not None:
        return [script, "serve"]
    return [
        sys.executable,
        "-c",
        "import sys; from hitl_service.cli import main; sys.exit(main())",
        "serve",
    ]


@dataclass
class ServiceProcess:
    """``hitl-service serve`` on fixed free ports and its own data directory.

    ``start()`` again after ``stop()`` restarts it on the same ports and the
    same SQLite file, as an operator's restart would.
    """

    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    _process: asyncio.subprocess.Process | None = None
    _runs: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "service.log"

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("HITL_")}
        return {
            **base,
            "HITL_PROVIDER": "local",
            "HITL_GRPC_ADDR": self.target,
            "HITL_HTTP_ADDR": f"127.0.0.1:{self.http_port}",
            "HITL_STORE_URL": f"sqlite:///{self.workdir / 'hitl.db'}",
            "HITL_DATA_DIR": str(self.workdir / "data"),
            "HITL_LOG_FORMAT": "json",
            "HITL_GRACE_SECONDS": "2s",
            **self.extra_env,
        }

    async def start(self) -> None:
        """Starts the process and waits until ``/readyz`` says ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._runs += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- run {self._runs} ---\n".encode())
            self._process = await asyncio.create_subprocess_exec(
                *_serve_command(),
                cwd=self.workdir,  # no stray .env from the checkout
                env=self.env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        process = self._process
        async with httpx.AsyncClient(base_url=self.http_url, timeout=2) as http:

            async def ready() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"the service exited early:\n{self.log_tail()}")
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout=TIMEOUT, what="the service to be ready")

    async def stop(self) -> None:
        """SIGTERM (graceful shutdown), then waits for the exit."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(
                f"the service did not stop on SIGTERM:\n{self.log_tail()}"
            ) from None
        assert process.returncode == 0, self.log_tail()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Console:
    """The local provider's agent console API (what the page calls)."""

    def __init__(self, http: httpx.AsyncClient, agent: str = "Jane Agent") -> None:
        self.http = http
        self.agent = agent

    async def act(self, chat_id: str, action: str, **body: str) -> None:
        response = await self.http.post(
            f"/console/api/conversations/{chat_id}/{action}", json={"agent": self.agent, **body}
        )
        assert response.status_code == 200, f"{action}: {response.status_code} {response.text}"

    async def conversation(self, chat_id: str) -> dict[str, Any]:
        state = (await self.http.get("/console/api/state")).json()
        found = [c for c in state["conversations"] if c["id"] == chat_id]
        assert found, f"no conversation {chat_id} in the console"
        return dict(found[0])


class ProcessOutput:
    """Collects a child process's output lines as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        self.process = process
        self.lines: list[str] = []
        self._task = asyncio.create_task(self._read(process.stdout))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    async def line(self, pattern: str, *, after: int = 0) -> re.Match[str]:
        """The first line (from index ``after``) matching ``pattern``; waits for it."""
        regex = re.compile(pattern)

        def find() -> re.Match[str] | None:
            exited = self.process.returncode is not None and self._task.done()
            for text in self.lines[after:]:
                if match := regex.search(text):
                    return match
            if exited:
                raise AssertionError(f"the client exited without printing {pattern!r}")
            return None

        try:
            found: re.Match[str] = await wait_for(
                find, timeout=TIMEOUT, what=f"a line matching {pattern!r}"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- client output ---\n{self.text()}") from None
        return found

    async def exit_code(self) -> int:
        await asyncio.wait_for(self.process.wait(), TIMEOUT)
        await asyncio.wait_for(self._task, TIMEOUT)
        return int(self.process.returncode or 0)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await asyncio.gather(self._task, return_exceptions=True)

    def text(self) -> str:
        return "\n".join(self.lines)

    def events(self) -> list[tuple[int, str, str]]:
        """(cursor, kind, description) of every event line printed."""
        out = []
        for text in self.lines:
            if match := EVENT_LINE.match(text):
                out.append((int(match.group(1)), match.group(2), match.group(3)))
        return out


async def run_handoff_scenario(
    tmp_path: Path,
    command: list[str],
    *,
    cwd: Path,
    prints_reconnects: bool,
    cancel_first: frozenset[str] = frozenset(),
) -> ProcessOutput:
    """A client example against the real service, through a restart.

    The client creates a user, starts a handoff, sends a message and follows
    the events; the agent (console API) takes it and replies; the service
    ends every stream after a second and is then restarted; the agent
    replies again and ends the handoff; the client must print every event
    once, in cursor order, and exit 0. With ``cancel_first`` (full method
    names), the client goes through a proxy that answers the first call of
    each with CANCELLED, and each must have come.
    """
    service = ServiceProcess(tmp_path / "service", {"HITL_STREAM_MAX_SECONDS": "1s"})
    await service.start()
    async with contextlib.AsyncExitStack() as stack:
        target = service.target
        if cancel_first:
            proxy = await stack.enter_async_context(CancellingProxy(target, set(cancel_first)))
            target = proxy.target
        output = await _run_client(service, command, cwd, target, prints_reconnects)
        if cancel_first:
            assert set(proxy.cancelled) == cancel_first, proxy.cancelled
    return output


async def start_client(command: list[str], cwd: Path, *args: str) -> ProcessOutput:
    """An example client started with ``args``, its output collected."""
    process = await asyncio.create_subprocess_exec(
        *command,
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    return ProcessOutput(process)


async def run_through_refusals(
    tmp_path: Path, command: list[str], *, cwd: Path, refusals: int
) -> CancellingProxy:
    """The client's first call (CreateUser) answered ``UNAVAILABLE``
    ``refusals`` times and then ``CANCELLED``, as by a service restarting
    behind a load balancer: the client must get through and start its
    handoff. Returns the proxy, to check what it refused."""
    create_user = "/hitl.v1.HitlService/CreateUser"
    service = ServiceProcess(tmp_path / "service", {})
    await service.start()
    try:
        async with CancellingProxy(
            service.target, {create_user}, unavailable_first=refusals
        ) as proxy:
            output = await start_client(command, cwd, "--target", proxy.target)
            try:
                await output.line(r"session ses_\w+ started")
            finally:
                await output.kill()
    finally:
        await service.stop()
    return proxy


async def _run_client(
    service: ServiceProcess, command: list[str], cwd: Path, target: str, prints_reconnects: bool
) -> ProcessOutput:
    output = await start_client(
        command,
        cwd,
        "--target",
        target,
        "--message",
        "Hello, my parcel never arrived.",
        "--max-seconds",
        "90",
    )
    try:
        async with httpx.AsyncClient(base_url=service.http_url, timeout=10) as http:
            console = Console(http)
            chat = (await output.line(r"session ses_\w+ started; chat (lc_\w+)")).group(1)
            await output.line(r"^\[2\] queued:")
            conversation = await console.conversation(chat)
            assert [m["text"] for m in conversation["messages"]] == [
                "Hello, my parcel never arrived."
            ]
            await console.act(chat, "take")
            await console.act(chat, "reply", text="Hi, Jane here. Let me check.")
            await output.line(r"^\[4\] agent_message: Jane Agent: Hi, Jane here")
            if prints_reconnects:
                await output.line(r"reconnecting after cursor 4 \(the server ended the stream\)")
            mark = len(output.lines)
            await service.stop()
            if prints_reconnects:
                await output.line(r"reconnecting after cursor 4 \(UNAVAILABLE", after=mark)
            await service.start()
            await console.act(chat, "reply", text="Found it: it arrives tomorrow.")
            await console.act(chat, "end", reason="resolved")
            assert await output.exit_code() == 0, output.text()
    except BaseException:
        print(f"--- client output ---\n{output.text()}\n--- service log ---\n{service.log_tail()}")
        raise
    finally:
        await output.kill()
        await service.stop()
    return output
