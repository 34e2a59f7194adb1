"""Replicas report their database: ``/readyz`` and ``hitl-service check``."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.store.migrations import migrations
from tests.postgres_fixture import PgCluster
from tests.processes import ServiceProcess
from tests.replicas.helpers import until
from tests.support import TIMEOUT, EventCollector, make_user, start_session

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def local_env(dsn: str, cwd: Path) -> dict[str, str]:
    """A replica on the local provider (nothing upstream to probe)."""
    return {
        "HITL_PROVIDER": "local",
        "HITL_GRPC_ADDR": "127.0.0.1:0",
        "HITL_HTTP_ADDR": "127.0.0.1:0",
        "HITL_STORE_URL": dsn,
        "HITL_STORE_POOL_MIN": "1",
        "HITL_STORE_POOL_MAX": "4",
        "HITL_DATA_DIR": str(cwd / "data"),
        "HITL_PROVIDER_TIMEOUT": "2s",
        "HITL_GRACE_SECONDS": "1s",
    }


@asynccontextmanager
async def local_replicas(dsn: str, tmp_path: Path) -> AsyncIterator[list[ServiceProcess]]:
    processes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        env = local_env(dsn, tmp_path / name)
        processes.append(ServiceProcess(env, cwd=tmp_path / name, name=name))
    try:
        await asyncio.gather(*(p.start() for p in processes))
        yield processes
    finally:
        for process in processes:
            if process.proc is not None:
                await process.terminate(timeout=15)


async def readyz(client: httpx.AsyncClient, replica: ServiceProcess) -> httpx.Response:
    return await client.get(f"{replica.http_base}/readyz")


class TestReadiness:
    async def test_readyz_reports_the_database_down_and_back(
        self, postgres_cluster_factory: Callable[[], PgCluster], tmp_path: Path
    ) -> None:
        cluster = postgres_cluster_factory()
        dsn = cluster.url()
        password = urlsplit(dsn).password or ""
        async with (
            local_replicas(dsn, tmp_path) as (a, b),
            httpx.AsyncClient(timeout=TIMEOUT) as http,
        ):
            for replica in (a, b):
                answer = await readyz(http, replica)
                assert answer.status_code == 200
                assert answer.json()["store"] == "ok"

            await asyncio.to_thread(cluster.stop)
            for replica in (a, b):
                answer = await readyz(http, replica)
                assert answer.status_code == 503
                # The detail names the database: the log has it, the answer not.
                assert answer.json()["problems"]["store"] == "unavailable"
                assert f"127.0.0.1:{cluster.port}" not in answer.text

                def logged(replica: ServiceProcess = replica) -> bool:
                    return f"127.0.0.1:{cluster.port}/postgres" in replica.log()

                await until(logged, what=f"{replica.name} logs the store's error")
                assert "readyz.store_unavailable" in replica.log()
                assert password not in replica.log()
                # Alive, only not ready: an orchestrator keeps it running.
                assert (await http.get(f"{replica.http_base}/healthz")).status_code == 200

            await asyncio.to_thread(cluster.start)
            for replica in (a, b):

                async def ready(replica: ServiceProcess = replica) -> bool:
                    return (await readyz(http, replica)).status_code == 200

                await until(ready, what=f"{replica.name} ready again")
            assert a.proc is not None
            assert a.proc.returncode is None
            # Both work again, together: B's stream hears of A's new session
            # (B's listener reconnected; polling would deliver it too).
            async with a.channel() as ca, b.channel() as cb:
                stub_a, stub_b = a.stub(ca), b.stub(cb)
                async with EventCollector(stub_b, after="") as on_b:
                    session = await start_session(stub_a, (await make_user(stub_a)).id)
                    await on_b.wait_for_kind("started", session.id)
                got = await stub_b.GetSession(
                    pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
                )
                assert got.session.id == session.id


async def run_check(env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """``hitl-service check`` as a process; returns (exit status, output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hitl_service",
        "check",
        cwd=cwd,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode()


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestCheck:
    async def test_check_prints_the_redacted_url_and_schema_version(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        parts = urlsplit(postgres_dsn)
        assert parts.password
        code, out = await run_check(local_env(postgres_dsn, tmp_path), tmp_path)
        assert code == 0, out
        where = f"postgresql://{parts.username}:***@{parts.hostname}:{parts.port}{parts.path}"
        newest = max(version for version, _ in migrations("postgres"))
        assert f"store: ok ({where}, schema version {newest})" in out
        assert parts.password not in out

    async def test_check_names_the_setting_when_the_database_is_unreachable(
        self, tmp_path: Path
    ) -> None:
        dsn = f"postgresql://app:pw-not-shown@127.0.0.1:{_unused_port()}/hitl"
        code, out = await run_check(local_env(dsn, tmp_path), tmp_path)
        assert code == 1, out
        assert "store: PROBLEM (HITL_STORE_URL)" in out
        assert "pw-not-shown" not in out
        assert "Traceback" not in out
