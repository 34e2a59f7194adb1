"""The local provider's agent console in headless Chromium (Selenium).

A handoff started through gRPC shows up in the console with its transcript;
the agent takes it, replies and ends it in the page, and a gRPC StreamEvents
client sees agent_assigned, agent_message and ended (by AGENT). Screenshots
go to test-artifacts/console/. With HITL_UPDATE_DOCS_SCREENSHOT=1 the
screenshot of the replied state also replaces docs/console.png.

Needs Debian's chromium and chromium-driver; skips loudly without them,
fails instead when HITL_REQUIRE_E2E=1 (CI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from hitl_service.app import App
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.e2e.helpers import ARTIFACTS, ROOT, need
from tests.support import EventCollector, make_user, start_session

try:
    from selenium import webdriver
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extra pins selenium
    webdriver = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("HITL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HITL_CHROMEDRIVER", "/usr/bin/chromedriver")
SHOTS = ARTIFACTS / "console"
WAIT = 15.0
T = TypeVar("T")


class Page:
    """Blocking Selenium calls on the console page (run them in a thread).

    The console re-renders the whole chat whenever the state changes, so
    every lookup is repeated until it works on the current DOM.
    """

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    def until(self, check: Callable[[WebDriver], T | None], what: str) -> T:
        wait = WebDriverWait(
            self.driver,
            WAIT,
            poll_frequency=0.05,
            ignored_exceptions=(StaleElementReferenceException, ElementClickInterceptedException),
        )
        result: T = wait.until(lambda d: check(d) or False, message=f"waiting for {what}")
        return result

    def find(self, css: str) -> WebElement:
        return self.until(lambda d: d.find_element(By.CSS_SELECTOR, css), css)

    def click(self, css: str) -> None:
        def do(d: WebDriver) -> bool:
            element = d.find_element(By.CSS_SELECTOR, css)
            if not element.is_enabled():
                return False
            element.click()
            return True

        self.until(do, f"{css} to be clickable")

    def texts(self, css: str) -> list[str]:
        def read(d: WebDriver) -> list[str] | None:
            return [e.text for e in d.find_elements(By.CSS_SELECTOR, css)] or None

        return self.until(read, f"text of {css}")

    def type_into(self, css: str, text: str) -> None:
        def do(d: WebDriver) -> bool:
            element = d.find_element(By.CSS_SELECTOR, css)
            element.clear()
            element.send_keys(text)
            return element.get_attribute("value") == text

        self.until(do, f"{css} to hold the text")

    def wait_text(self, css: str, text: str) -> None:
        self.until(
            lambda d: any(text in e.text for e in d.find_elements(By.CSS_SELECTOR, css)),
            f"{text!r} in {css}",
        )

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        assert self.driver.save_screenshot(str(path))
        return path


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[WebDriver]:
    need(webdriver is not None, "selenium is not installed (pip install -e '.[dev]')")
    need(Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing (apt-get install chromium)")
    need(
        Path(CHROMEDRIVER).is_file(), f"{CHROMEDRIVER} is missing (apt-get install chromium-driver)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager downloads nothing.
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    # --window-size counts the window frame: pin the page itself to 1280x800.
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield browser
    finally:
        browser.quit()  # before the service stops: the page holds an event stream open


async def run(call: Callable[[], T]) -> T:
    """Runs a blocking Selenium call without blocking the service's event loop."""
    return await asyncio.to_thread(call)


async def test_agent_console_in_a_real_browser(
    app: App, stub: HitlServiceAsyncStub, driver: WebDriver
) -> None:
    # Two other people wait too, so the list looks like a real queue.
    for name, title in (
        ("Grace Hopper", "Change my delivery address"),
        ("Alan Turing", "Invoice copy"),
    ):
        await start_session(stub, (await make_user(stub, name)).id, title=title)
    user = await make_user(stub, "Ada Lovelace")
    session = await start_session(
        stub,
        user.id,
        title="Parcel never arrived",
        description="Order #4711, shipped 3 days ago. The bot could not find a tracking update.",
        history=[
            pb.Message(text="Hi, my parcel never arrived.", author=pb.AUTHOR_USER),
            pb.Message(text="Sorry to hear that! What is your order number?", author=pb.AUTHOR_BOT),
            pb.Message(text="It's #4711.", author=pb.AUTHOR_USER),
            pb.Message(text="Thanks. Let me get a human for you.", author=pb.AUTHOR_BOT),
        ],
        metadata={"order": "4711", "channel": "web"},
    )
    await stub.SendMessage(
        pb.SendMessageRequest(
            session_id=session.id, message=pb.Message(text="Is anyone there?"), request_id="rid-1"
        ),
        timeout=10,
    )
    card = pb.Card(title="Order #4711", subtitle="Shipped 3 days ago")
    await stub.SendMessage(
        pb.SendMessageRequest(
            session_id=session.id, message=pb.Message(card=card), request_id="rid-2"
        ),
        timeout=10,
    )
    chat = session.external_chat_id
    page = Page(driver)

    async with EventCollector(stub, session_id=session.id, after="0") as events:
        await run(lambda: driver.get(f"http://127.0.0.1:{app.http_port}/console"))
        await run(lambda: page.find(f'.item[data-id="{chat}"]'))
        await run(lambda: page.type_into("#agent", "Jane Agent"))
        await run(lambda: page.click(f'.item[data-id="{chat}"]'))
        await run(lambda: page.wait_text(".chat-head h2", "Parcel never arrived"))
        await run(lambda: page.screenshot("01-waiting"))

        # The transcript: the bot conversation, then what the user sent since.
        assert await run(lambda: page.texts("#log .msg.user .text")) == [
            "Hi, my parcel never arrived.",
            "It's #4711.",
            "Is anyone there?",
        ]
        # A card shows its title once, in the card (its text is that title).
        assert await run(lambda: page.texts("#log .msg.user .card strong")) == ["Order #4711"]
        assert await run(lambda: page.texts("#log .msg.bot .text")) == [
            "Sorry to hear that! What is your order number?",
            "Thanks. Let me get a human for you.",
        ]

        await run(lambda: page.click("#take"))
        assigned = await events.wait_for_kind("agent_assigned")
        assert assigned.agent_assigned.agent.name == "Jane Agent"
        await run(lambda: page.wait_text(f'.item[data-id="{chat}"] .badge', "active"))
        await run(lambda: page.screenshot("02-taken"))

        reply = "Hi Ada, I'm Jane. I can see #4711 stuck at the depot; it goes out today."
        await run(lambda: page.type_into("#reply", reply))
        await run(lambda: page.click("#send"))
        message = await events.wait_for_kind("agent_message")
        assert message.agent_message.message.text == reply
        assert message.agent_message.agent.name == "Jane Agent"
        await run(lambda: page.wait_text("#log .msg.agent .text", reply))
        replied = await run(lambda: page.screenshot("03-replied"))
        if os.environ.get("HITL_UPDATE_DOCS_SCREENSHOT") == "1":
            shutil.copyfile(replied, ROOT / "docs" / "console.png")

        await run(lambda: page.click("#end"))
        ended = await events.wait_for_kind("ended")
        assert ended.ended.by == pb.ENDED_BY_AGENT
        await run(lambda: page.wait_text(f'.item[data-id="{chat}"] .badge', "ended"))
        assert await run(lambda: not driver.find_element(By.ID, "reply").is_enabled())
        await run(lambda: page.screenshot("04-ended"))

    assert events.kinds() == ["started", "queued", "agent_assigned", "agent_message", "ended"]
    final = await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=10)
    assert final.session.state == pb.SESSION_STATE_ENDED
    assert final.session.ended_by == pb.ENDED_BY_AGENT
