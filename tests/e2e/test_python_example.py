"""The Python example (examples/python/handoff.py) against the real service."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import EXAMPLE_METHODS, ROOT, run_handoff_scenario, run_through_refusals

pytestmark = pytest.mark.e2e


async def test_python_example_follows_a_handoff_across_a_restart(tmp_path: Path) -> None:
    script = ROOT / "examples" / "python" / "handoff.py"
    output = await run_handoff_scenario(
        tmp_path, [sys.executable, str(script)], cwd=tmp_path, prints_reconnects=False
    )
    events = output.events()
    assert [cursor for cursor, _, _ in events] == [1, 2, 3, 4, 5, 6]
    assert [kind for _, kind, _ in events] == [
        "started",
        "queued",
        "agent_assigned",
        "agent_message",
        "agent_message",
        "ended",
    ]
    assert events[4][2] == "Jane Agent: Found it: it arrives tomorrow."
    assert output.lines[-1] == "handoff over (ended)"


async def test_python_example_retries_the_cancelled_a_stopping_replica_answers(
    tmp_path: Path,
) -> None:
    """See the Node example's test of the same name: the Python client
    retries a server's CANCELLED (the service never saw the call)."""
    script = ROOT / "examples" / "python" / "handoff.py"
    output = await run_handoff_scenario(
        tmp_path,
        [sys.executable, str(script)],
        cwd=tmp_path,
        prints_reconnects=False,
        cancel_first=EXAMPLE_METHODS,
    )
    assert [cursor for cursor, _, _ in output.events()] == [1, 2, 3, 4, 5, 6]
    assert output.lines[-1] == "handoff over (ended)"


async def test_python_example_rides_out_a_restart_of_several_seconds(tmp_path: Path) -> None:
    """See the Node example's test of the same name."""
    script = ROOT / "examples" / "python" / "handoff.py"
    proxy = await run_through_refusals(
        tmp_path, [sys.executable, str(script)], cwd=tmp_path, refusals=6
    )
    assert len(proxy.unavailable) == 6
    assert proxy.cancelled == ["/hitl.v1.HitlService/CreateUser"]
