"""The processes a run measures: the floor, hitl-service, and what they need
(a fake LiveChat, a throwaway PostgreSQL cluster).

Every server is its own process, pinned to the server CPUs; the runner and
the generators stay on the other ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.payloads import Chat, WebhookSpec
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
FAST_BACKOFF = (
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 5),
    ("grpc.max_reconnect_backoff_ms", 50),
)
LIVECHAT_SECRET = "whsec-test-0123456789"  # noqa: S105 - the fake's test secret
SCRIPTED_SECRET = "scripted-webhook-secret"  # noqa: S105 - tests/scripted.py's secret


def free_port() -> int:
    """A port nobody listens on right now (127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_all_threads(pid: int, cpus: Sequence[int]) -> None:
    """Pins every thread of ``pid`` (threads started later inherit it)."""
    if not cpus:
        return
    tasks = Path(f"/proc/{pid}/task")
    for tid in (int(p.name) for p in tasks.iterdir()) if tasks.is_dir() else (pid,):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, set(cpus))


def hitl_command() -> list[str]:
    """``hitl-service serve`` from this virtualenv."""
    script = Path(sys.executable).parent / "hitl-service"
    if script.exists():
        return [str(script), "serve"]
    return [
        sys.executable,
        "-c",
        "from hitl_service.cli import main; raise SystemExit(main())",
        "serve",
    ]


@dataclass
class ServerProc:
    """A server process the runner started."""

    name: str
    proc: asyncio.subprocess.Process
    grpc_addr: str
    http_addr: str
    log_path: Path
    cpus: Sequence[int]
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    @property
    def http_port(self) -> int:
        """The sidecar's port."""
        return int(self.http_addr.rpartition(":")[2])

    async def wait_serving(self, timeout: float = 30.0) -> None:
        """Returns once gRPC health says SERVING (raises if the process died)."""
        async with grpc.aio.insecure_channel(self.grpc_addr, options=FAST_BACKOFF) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs declare no methods
            check = health.Check
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode}): {self.tail()}"
                    )
                try:
                    answer = await check(
                        health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True
                    )
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"{self.name} not SERVING after {timeout}s: {self.tail()}")
                await asyncio.sleep(0.01)
        pin_all_threads(self.pid, self.cpus)

    def tail(self, lines: int = 15) -> str:
        """The end of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def errors_logged(self) -> int:
        """Log lines at level error (a run must not cause any)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if '"level": "error"' in line)

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cpus: Sequence[int],
    grpc_addr: str,
    http_addr: str,
) -> ServerProc:
    """Starts a server process with stdout/stderr into ``log_path``."""
    log = log_path.open("ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
    finally:
        log.close()
    pin_all_threads(proc.pid, cpus)
    return ServerProc(name, proc, grpc_addr, http_addr, log_path, cpus, env)


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a server: ours, without HITL_* leftovers, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HITL_")}
    env.update(extra)
    return env


async def start_floor(run_dir: Path, cpus: Sequence[int], loop: str) -> ServerProc:
    """The floor process (``bench.floor``)."""
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    server = await spawn(
        "floor",
        [sys.executable, "-m", "bench.floor", "--grpc-addr", grpc_addr, "--http-addr", http_addr],
        env=base_env({"HITL_EVENT_LOOP": loop}),
        log_path=run_dir / "floor.log",
        cpus=cpus,
        grpc_addr=grpc_addr,
        http_addr=http_addr,
    )
    await server.wait_serving()
    return server


async def start_hitl(
    name: str,
    run_dir: Path,
    cpus: Sequence[int],
    *,
    provider: str,
    store_url: str,
    loop: str,
    extra: Mapping[str, str] | None = None,
    wait: bool = True,
) -> ServerProc:
    """``hitl-service serve`` (or the scripted-provider wrapper)."""
    grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = base_env(
        {
            "HITL_PROVIDER": provider,
            "HITL_GRPC_ADDR": grpc_addr,
            "HITL_HTTP_ADDR": http_addr,
            "HITL_STORE_URL": store_url,
            "HITL_DATA_DIR": str(run_dir / f"data-{name}"),
            "HITL_LOG_FORMAT": "json",
            "HITL_LOCAL_STATE_FILE": "",
            "HITL_EVENT_LOOP": loop,
            "HITL_GRACE_SECONDS": "2",
            **(extra or {}),
        }
    )
    argv = (
        [sys.executable, "-m", "bench.scripted_server"]
        if provider == "scripted"
        else hitl_command()
    )
    server = await spawn(
        name,
        argv,
        env=env,
        log_path=run_dir / f"{name}.log",
        cpus=cpus,
        grpc_addr=grpc_addr,
        http_addr=http_addr,
    )
    if wait:
        await server.wait_serving()
    return server


# --- setup through the API ---------------------------------------------------------------


async def make_sessions(
    target: str, count: int, *, prefix: str, concurrency: int = 16
) -> list[pb.Session]:
    """Creates ``count`` users with one open session each, through the API."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.HitlServiceStub(channel)
        made: list[pb.Session] = []
        numbers = iter(range(count))

        async def worker() -> None:
            for n in numbers:
                user = await stub.CreateUser(
                    pb.CreateUserRequest(name=f"Bench User {n}", external_id=f"{prefix}-u{n}"),
                    timeout=30,
                )
                started = await stub.StartHitl(
                    pb.StartHitlRequest(
                        user_id=user.user.id,
                        title=f"Bench handoff {n}",
                        request_id=f"{prefix}-s{n}",
                    ),
                    timeout=30,
                )
                made.append(started.session)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return made


# --- the fake LiveChat ---------------------------------------------------------------------


@dataclass
class FakeLiveChatProc:
    """``python -m tests.fake_livechat`` in its own process."""

    proc: asyncio.subprocess.Process
    url: str
    env: dict[str, str]

    async def thread_of(self, chat_id: str) -> str:
        """The id of the chat's current thread (from the fake's control API)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            answer = await client.get(f"/_control/chats/{chat_id}")
            answer.raise_for_status()
            threads = answer.json().get("threads") or []
            return str(threads[-1]["id"]) if threads else ""

    async def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def start_fake_livechat(run_dir: Path, cpus: Sequence[int]) -> FakeLiveChatProc:
    """Starts the fake; raises RuntimeError if it is not usable (yet)."""
    log = (run_dir / "fake-livechat.log").open("ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fake_livechat",
            "--port",
            "0",
            "--webhook-secret",
            LIVECHAT_SECRET,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            env=base_env({}),
        )
    finally:
        log.close()
    pin_all_threads(proc.pid, cpus)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        info = json.loads(line)
        return FakeLiveChatProc(proc, str(info["url"]), dict(info["env"]))
    except (TimeoutError, ValueError, KeyError) as exc:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise RuntimeError(f"the fake LiveChat did not start: {exc!r}") from None


async def webhook_spec(
    provider: str,
    sessions: Sequence[pb.Session],
    *,
    fake: FakeLiveChatProc | None,
) -> WebhookSpec:
    """Bodies for the sessions' chats, in the provider's webhook format."""
    if provider == "livechat":
        assert fake is not None
        chats = [
            Chat(s.external_chat_id, await fake.thread_of(s.external_chat_id)) for s in sessions
        ]
        return WebhookSpec(
            "livechat",
            LIVECHAT_SECRET,
            fake.env["HITL_LIVECHAT_ORGANIZATION_ID"],
            tuple(chats),
            "/webhooks/livechat",
        )
    return WebhookSpec(
        "scripted",
        SCRIPTED_SECRET,
        "",
        tuple(Chat(s.external_chat_id) for s in sessions),
        f"/webhooks/{provider}",
    )


def floor_webhook_spec(chats: int, fmt: str) -> WebhookSpec:
    """Bodies for the floor (it accepts both formats and any chat)."""
    made = tuple(Chat(f"CHAT{n:04d}", f"THREAD{n:04d}") for n in range(chats))
    if fmt == "livechat":
        return WebhookSpec(
            "livechat",
            LIVECHAT_SECRET,
            "0b8e6f3e-2f0c-4a9e-b8a1-7d2c5e9f1a33",
            made,
            "/webhooks/livechat",
        )
    return WebhookSpec("scripted", SCRIPTED_SECRET, "", made, "/webhooks/scripted")


# --- PostgreSQL ---------------------------------------------------------------------------


class Postgres:
    """A throwaway cluster, started like ``tests/postgres_fixture.py`` does,
    but with production durability (fsync and synchronous_commit on)."""

    def __init__(self, base: Path, cluster: Any, server: Any) -> None:
        self._base = base
        self._cluster = cluster
        self._server = server

    @classmethod
    def start(cls) -> Postgres | None:
        """A running cluster, or None when PostgreSQL is not installed."""
        try:
            from tests import postgres_fixture as fx
            from tests.ports import free_port
        except ImportError:
            return None
        bin_dir = fx.find_bin_dir()
        if bin_dir is None:
            return None
        run_as = fx.RunAs.pick()
        base = Path(tempfile.mkdtemp(prefix="hitl-bench-pg-", dir=fx._traversable_tmp()))
        run_as.chown(base)
        install = fx.PgInstall(bin_dir, run_as, base)
        cluster = install.new_cluster()

        def durable_start() -> None:
            port = free_port()
            options = " ".join(
                [
                    f"-p {port}",
                    f"-k {cluster.root / 'sock'}",
                    "-c listen_addresses=127.0.0.1",
                    "-c max_connections=200",
                    "-c shared_buffers=128MB",
                    "-c log_autovacuum_min_duration=0",
                ]
            )
            install._run(
                bin_dir / "pg_ctl",
                "-D",
                cluster.data,
                "-l",
                cluster.log_path,
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
            )
            cluster.port = port
            cluster.running = True

        # PostgreSQL is a server of its own, not part of either side: it may
        # run on every CPU (this runs in a worker thread whose affinity the
        # postmaster would inherit).
        pinned = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
            durable_start()
            os.sched_setaffinity(0, pinned)
            cluster.create_app_role()
            server = fx.PostgresServer(
                cluster.url(), app_user=fx.APP_ROLE, app_password=fx.APP_PASSWORD, cluster=cluster
            )
        except Exception:
            cluster.destroy()
            shutil.rmtree(base, ignore_errors=True)
            raise
        return cls(base, cluster, server)

    def new_database(self) -> str:
        """A fresh empty database; returns its URL (application role)."""
        _, url = self._server.create_database()
        return str(url)

    def close(self, keep_log: Path | None = None) -> None:
        """Stops the cluster and removes its files (its log copied to ``keep_log``)."""
        with contextlib.suppress(Exception):
            self._server.close()
        if keep_log is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(self._cluster.log_path, keep_log)
        self._cluster.destroy()
        shutil.rmtree(self._base, ignore_errors=True)
