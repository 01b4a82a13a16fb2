"""A real headless browser for the status page tests: Debian's ``chromium``, driven over
the Chrome DevTools Protocol (a WebSocket on loopback, spoken with aiohttp).

The protocol rather than ``--dump-dom`` because the test logs in through the page's own
form (a command line cannot type a token), reads the cookie jar (HttpOnly, SameSite), sees
every request the page makes, and waits for the page's own script to have updated it.

Missing chromium skips the tests, unless ``HARVESTER_REQUIRE_BROWSER`` is set (CI sets it):
there it fails them.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import anyio
from anyio.abc import Process

from tests.required import unavailable

REQUIRE_ENV = "HARVESTER_REQUIRE_BROWSER"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
START_S = 30.0
COMMAND_S = 20.0
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


def chromium_or_skip() -> str:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    unavailable(
        "a headless browser",
        REQUIRE_ENV,
        "none is installed: install Debian's chromium (apt-get install -y chromium); .ci/run does",
    )


class Page:
    """One tab: ``send`` a command, read the events it produced so far."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, anyio.abc.ObjectSendStream[dict[str, Any]]] = {}

    async def reader(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            doc = json.loads(message.data)
            if "id" in doc:
                send = self._waiting.pop(doc["id"], None)
                if send is not None:
                    await send.send(doc)
                    await send.aclose()
            else:
                self.events.append(doc)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        send, recv = anyio.create_memory_object_stream[dict[str, Any]](1)
        self._waiting[n] = send
        await self.ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        with anyio.fail_after(COMMAND_S):
            async with recv:
                answer = await recv.receive()
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def wait_for(self, expression: str, within: float = 15.0) -> None:
        with anyio.fail_after(within):
            while True:
                if await self.evaluate(f"!!({expression})"):
                    return
                await anyio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await anyio.Path(path).write_bytes(base64.b64decode(shot["data"]))

    def requested_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]


@asynccontextmanager
async def open_browser(
    profile: Path, session: aiohttp.ClientSession, *, width: int = 1400, height: int = 1000
) -> AsyncIterator[Page]:
    binary = chromium_or_skip()
    log_path = profile.parent / "chromium.log"
    args = [
        binary,
        "--headless=new",
        "--no-sandbox",  # tests run as root, where chromium's sandbox refuses to start
        "--disable-gpu",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        # The browser's own calls home; the page's requests are what the test watches.
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "about:blank",
    ]
    with _open_log(log_path) as log_file:
        proc: Process = await anyio.open_process(args, stdout=log_file, stderr=log_file)
        try:
            browser_ws = await _devtools_url(proc, log_path)
            port = int(re.search(r":(\d+)/", browser_ws).group(1))  # type: ignore[union-attr]
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with (
                session.ws_connect(page_ws, max_msg_size=64 << 20) as ws,
                anyio.create_task_group() as tg,
            ):
                page = Page(ws)
                tg.start_soon(page.reader)
                await page.send("Network.enable")
                await page.send("Page.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=width,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                try:
                    yield page
                finally:
                    await ws.close()
                    tg.cancel_scope.cancel()
        finally:
            if proc.returncode is None:
                proc.kill()
            with anyio.move_on_after(10, shield=True):
                await proc.wait()
            await proc.aclose()


def _open_log(path: Path) -> BinaryIO:
    return open(path, "wb")


async def _devtools_url(proc: Process, log_path: Path) -> str:
    with anyio.fail_after(START_S):
        while True:
            text = await anyio.Path(log_path).read_bytes()
            m = _LISTENING.search(text)
            if m:
                return m.group(1).decode()
            if proc.returncode is not None:
                raise AssertionError(f"chromium exited {proc.returncode}:\n{text.decode()}")
            await anyio.sleep(0.05)
