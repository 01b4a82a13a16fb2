"""The status page in a real headless browser (chromium) against a daemon harvesting from the
emulator: logging in through the form, what the page shows against ``/metrics`` and the
store, a provider's gate closed by a 429 with Retry-After, hostile provider text shown as
text, the page's self-update, and no request leaving 127.0.0.1."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from tests.emulated import StartEmulator

from .browser import open_browser
from .helpers import (
    REPO,
    DaemonProcess,
    ReadyDaemon,
    cli_process,
    job_line,
    jsonl,
)
from .test_daemon_run import metric_samples

pytestmark = pytest.mark.anyio

#: provider text that would run if the page put it into HTML unescaped
EVIL = '<script>document.title="owned"</script><img src=x onerror="document.title=1">'
RETRY_AFTER_S = 120


async def wait_state(daemon: DaemonProcess, key: str, state: str, auth: dict[str, str]) -> None:
    last: Any = None
    try:
        with anyio.fail_after(20):
            while True:
                status, last = await daemon.get(f"/jobs/playment/{key}", headers=auth)
                if status == 200 and last["state"] == state:
                    return
                await anyio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"{key} never reached {state}: {last}\n{daemon.log()}") from None


async def status_doc(daemon: DaemonProcess, auth: dict[str, str]) -> dict[str, Any]:
    status, doc = await daemon.get("/status.json", headers=auth)
    assert status == 200, doc
    return dict(doc)


async def store_counts(config: Path) -> dict[str, int]:
    """``harvester status --json``: the store, read by another process."""
    result = await cli_process("status", "--json", "-c", str(config), cwd=config.parent)
    assert result.returncode in (0, 1), result.stderr.decode()
    return dict(json.loads(result.stdout)["providers"]["playment"])


async def test_the_status_page_in_a_real_browser(
    tmp_path: Path,
    start_emulator: StartEmulator,
    ready_daemon: ReadyDaemon,
    session: aiohttp.ClientSession,
) -> None:
    emu = await start_emulator()
    token = secrets.token_hex(16)
    daemon = await ready_daemon(
        emu, token_env="HARVESTER_API_TOKEN", env={"HARVESTER_API_TOKEN": token}
    )
    config = daemon.config
    auth = {"Authorization": f"Bearer {token}"}

    # Four good jobs and one the provider refuses, echoing our (hostile) batch id back.
    bad = job_line("refused")
    bad["payload"]["batch_id"] = EVIL
    status, _ = await daemon.post(
        "/jobs", jsonl([*(job_line(f"ok-{i}") for i in range(4)), bad]), headers=auth
    )
    assert status == 201
    for i in range(4):
        await wait_state(daemon, f"ok-{i}", "harvested", auth)
    await wait_state(daemon, "refused", "error", auth)

    # Now the provider throttles: the next create closes the gate for Retry-After.
    origin = emu.urls["playment"].removesuffix("/playment")
    fault = {"kind": "429", "provider": "playment", "retry_after_s": RETRY_AFTER_S}
    async with session.post(f"{origin}/_emulator/faults", json=fault) as r:
        assert r.status == 200, await r.text()
    status, _ = await daemon.post("/jobs", jsonl([job_line("throttled")]), headers=auth)
    assert status == 201
    with anyio.fail_after(10):
        while True:
            if not (await status_doc(daemon, auth))["providers"][0]["gate"]["open"]:
                break
            await anyio.sleep(0.2)

    # Without a session the page sends the browser to the login form; nothing else shows.
    async with session.get(daemon.base + "/", allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/login"
    async with session.get(daemon.base + "/status.json") as r:
        assert r.status == 401
    async with session.get(daemon.base + "/", headers=auth) as r:
        assert r.status == 200
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp

    async with open_browser(tmp_path / "profile", session) as page:
        await page.navigate(daemon.base + "/")
        assert await page.evaluate("location.pathname") == "/login"
        # The token goes in the form's body, once; the URL never holds it.
        await page.evaluate(
            f"document.getElementById('token').value = {json.dumps(token)};"
            " document.querySelector('form button').click()"
        )
        await page.wait_for("location.pathname === '/' && document.getElementById('providers')")
        cookies = (await page.send("Network.getCookies"))["cookies"]
        (cookie,) = [c for c in cookies if c["name"] == "harvester_session"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert token not in cookie["value"]
        assert await page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it

        # The page's own script fetches it again and swaps the content in.
        first = await page.evaluate("document.querySelector('main').dataset.generated")
        await page.wait_for("Number(document.getElementById('live').dataset.updates) >= 2", 20)
        assert await page.evaluate("document.querySelector('main').dataset.generated") != first

        shown = await page.evaluate(
            "Object.fromEntries([...document.querySelectorAll("
            "'#jobs tr[data-provider=\"playment\"] td[data-state]')]"
            ".map(td => [td.dataset.state, Number(td.textContent)]))"
        )
        gate = await page.evaluate(
            "document.querySelector('#providers tr[data-provider=\"playment\"] td.gate')"
            ".textContent"
        )
        reasons = await page.evaluate(
            "[...document.querySelectorAll('#failures td.reason')].map(td => td.textContent)"
        )
        injected = await page.evaluate(
            "document.querySelectorAll('main script, main img, [onerror]').length"
        )
        title = await page.evaluate("document.title")
        links = await page.evaluate(
            "[...document.querySelectorAll('[src], [href], [action]')]"
            ".map(e => e.src || e.href || e.action)"
        )
        shot = tmp_path / "status-page.png"
        await page.screenshot(shot)
        requested = page.requested_urls()

    # What the page shows is what /metrics and the store say.
    async with session.get(daemon.base + "/metrics") as r:
        metrics = await r.text()
    gauge = {
        labels["state"]: int(value)
        for labels, value in metric_samples(metrics, "harvester_jobs")
        if labels["provider"] == "playment"
    }
    in_store = await store_counts(config)
    assert shown["total"] == sum(gauge.values()) == 6
    shown.pop("total")
    assert shown == gauge
    assert {s: n for s, n in shown.items() if n} == in_store
    assert shown["harvested"] == 4 and shown["error"] == 1 and shown["new"] == 1

    # The refused job's reason, with the provider's echo of our batch id, as text.
    assert any(EVIL in reason for reason in reasons), reasons
    assert injected == 0 and title == "harvester status"

    # The closed gate: until when and why.
    assert "closed" in gate and "until" in gate, gate
    assert f"429 with Retry-After {RETRY_AFTER_S} s" in gate, gate

    # Nothing came from, or went to, anywhere but this daemon.
    assert requested and all(u.startswith(daemon.base + "/") for u in requested), requested
    assert all(u.startswith(daemon.base + "/") for u in links), links
    assert shot.stat().st_size > 10_000
    assert (REPO / "harvester" / "static" / "status.js").exists()
