"""The SQLite file taken away from a running service (deleted, or replaced
by another file under its name): the service writes on into the file it has
open, which the next start no longer sees, so nothing more is acknowledged
and the service is not ready."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import grpc
import httpx
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests.support import TIMEOUT, expect_error, make_user


def _delete(path: Path) -> None:
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        name.unlink(missing_ok=True)


def _replace(path: Path) -> None:
    # As a restore by `mv backup.db hitl.db` does.
    other = path.with_name("restored.db")
    sqlite3.connect(other).close()
    os.replace(other, path)


@pytest.mark.parametrize("take_away", [_delete, _replace])
async def test_writes_fail_and_readiness_fails_once_the_database_file_is_gone(
    service_env: dict[str, str],
    stub: pb_grpc.HitlServiceAsyncStub,
    http: httpx.AsyncClient,
    take_away: object,
) -> None:
    await make_user(stub)
    assert (await http.get("/readyz")).status_code == 200
    assert callable(take_away)
    take_away(Path(service_env["HITL_STORE_URL"].removeprefix("sqlite:///")))

    error = await expect_error(
        stub.CreateUser(pb.CreateUserRequest(name="Ada"), timeout=TIMEOUT),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert error.reason == "STORE_UNAVAILABLE"
    ready = await http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["problems"]["store"] == "unavailable"
