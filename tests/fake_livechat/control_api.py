"""Test-only HTTP control endpoints (``/_control/...``) for out-of-process use.

Each ``POST /_control/<action>`` takes a JSON object of keyword arguments for
the ``FakeLiveChat`` method of the same name (``agent_join``,
``agent_message``, ``transfer``, ``agent_leave``, ``agent_close``,
``customer_close``, ``router_close``, ``add_fault``, ``clear_faults``,
``set_config``, ``webhook_chaos``, ``advance_clock``). ``GET /_control/calls``,
``/_control/deliveries`` and ``/_control/chats/<id>`` inspect the state.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fake_livechat.errors import LcError

if TYPE_CHECKING:
    from tests.fake_livechat.server import FakeLiveChat

ACTIONS = frozenset(
    {
        "agent_join",
        "agent_message",
        "transfer",
        "agent_leave",
        "agent_close",
        "customer_close",
        "router_close",
        "add_fault",
        "clear_faults",
        "set_config",
        "webhook_chaos",
        "advance_clock",
    }
)


async def control(request: Request) -> Response:
    """Runs one control action."""
    fake: FakeLiveChat = request.app.state.fake
    action = request.path_params["action"]
    if action not in ACTIONS:
        return JSONResponse({"error": f"unknown control action {action}"}, status_code=404)
    kwargs: Any = await request.json() if await request.body() else {}
    if not isinstance(kwargs, dict):
        return JSONResponse({"error": "body must be an object"}, status_code=400)
    try:
        result = getattr(fake, action)(**kwargs)
    except LcError as error:
        return JSONResponse(error.body(), status_code=400)
    except TypeError as error:
        return JSONResponse({"error": str(error)}, status_code=400)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    return JSONResponse({"result": result})


async def calls(request: Request) -> Response:
    """Recorded API calls (optionally ``?method=``)."""
    fake: FakeLiveChat = request.app.state.fake
    method = request.query_params.get("method")
    return JSONResponse([dataclasses.asdict(c) for c in fake.calls(method)])


async def deliveries(request: Request) -> Response:
    """Webhook deliveries and their attempts."""
    fake: FakeLiveChat = request.app.state.fake
    return JSONResponse([dataclasses.asdict(d) for d in fake.delivery.deliveries])


async def chat(request: Request) -> Response:
    """A chat as ``get_chat`` would show it, plus all its threads."""
    fake: FakeLiveChat = request.app.state.fake
    found = fake.state.chats.get(request.path_params["chat_id"])
    if found is None:
        return JSONResponse({"error": "no such chat"}, status_code=404)
    data = fake.state.chat_json(found)
    data["threads"] = [t.json() for t in found.threads]
    return JSONResponse(data)


def control_routes() -> list[Route]:
    """The control routes."""
    return [
        Route("/_control/calls", calls, methods=["GET"]),
        Route("/_control/deliveries", deliveries, methods=["GET"]),
        Route("/_control/chats/{chat_id:str}", chat, methods=["GET"]),
        Route("/_control/{action:str}", control, methods=["POST"]),
    ]
