"""Slow and half-sent requests against ``harvester run`` (issue 13, item 9).

The report: 1,100 half-sent requests against a daemon with 1,024 open files made ``/healthz``
time out for 30 s (the kubelet would have restarted the pod) and wrote 46 MB of plain-text
tracebacks to stderr. Here the same attack runs against the daemon subprocess under that
limit; the probe must still answer within the kubelet's default probe timeout, every
half-open connection must be closed by the server within the header timeout, and stderr must
stay a few JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import socket
import time
from pathlib import Path

import aiohttp
import anyio
import anyio.to_thread
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harvester.httpserver import LINGER_S
from tests.emulated import StartEmulator

from .helpers import (
    DaemonProcess,
    StartDaemon,
    free_port,
    job_line,
    jsonl,
    write_config,
)

pytestmark = pytest.mark.anyio

ATTACKERS = 1_100
NOFILE = 1_024
PROBE_TIMEOUT_S = 1.0  #: a kubelet's default timeoutSeconds
#: a request that never finishes its headers (the blank line that ends them is never sent)
HALF_SENT = b"POST /jobs HTTP/1.1\r\nHost: harvester\r\nContent-Type: application/json\r\n"


def closed_counts(metrics_text: str) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
        if s.name == "harvester_http_connections_closed_total"
    }


def open_half_sent(port: int, n: int) -> list[socket.socket]:
    """``n`` connections, each with half a request sent (blocking sockets, run in a thread).
    A connection the server has already closed again is kept: it counts as closed."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        with contextlib.suppress(OSError):  # reset already: the connection cap at work
            s.sendall(HALF_SENT)
        socks.append(s)
    return socks


def wait_all_closed(socks: list[socket.socket], within: float) -> tuple[int, float]:
    """Wait until the server has closed every socket (EOF or reset); returns how many it
    closed and the seconds it took."""
    start = time.monotonic()
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed = 0
    try:
        while closed < len(socks):
            left = within - (time.monotonic() - start)
            if left <= 0:
                break
            for key, _ in sel.select(timeout=left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                # The server closes without an answer: a half-sent request gets none.
                assert data == b"", data[:200]
                sel.unregister(sock)
                closed += 1
    finally:
        sel.close()
        for s in socks:
            s.close()
    return closed, time.monotonic() - start


def ensure_own_fd_room(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, (
            f"this test opens {needed} sockets; the open-files limit is {hard}"
        )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def start_guarded(
    tmp_path: Path, start_emulator: StartEmulator, start_daemon: StartDaemon, extra: str, **kw: int
) -> DaemonProcess:
    emu = await start_emulator()
    port = free_port()
    daemon = await start_daemon(write_config(tmp_path, emu, port, server_extra=extra), port, **kw)
    # A connection per request: no pooled connection of ours sits in the daemon's table.
    daemon.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=10)
    )
    await daemon.wait_ready()
    return daemon


async def test_half_sent_requests_cannot_starve_the_probes(
    tmp_path: Path, start_emulator: StartEmulator, start_daemon: StartDaemon
) -> None:
    header_timeout_s = 2.0
    ensure_own_fd_room(ATTACKERS + 200)
    daemon = await start_guarded(
        tmp_path,
        start_emulator,
        start_daemon,
        f"header_timeout_s = {header_timeout_s}\n",
        nofile=NOFILE,
    )
    try:
        port = int(daemon.base.rsplit(":", 1)[1])
        log_before = daemon.log_path.stat().st_size
        t0 = anyio.current_time()
        socks = await anyio.to_thread.run_sync(open_half_sent, port, ATTACKERS)
        attack_opened = anyio.current_time()
        print(f"{ATTACKERS} half-sent requests opened in {attack_opened - t0:.2f} s")

        # Under the attack, on a new connection, as a kubelet probes.
        for path in ("/healthz", "/readyz"):
            t0 = anyio.current_time()
            try:
                with anyio.fail_after(PROBE_TIMEOUT_S):
                    status, doc = await daemon.get(path)
            except TimeoutError:
                raise AssertionError(
                    f"{path} did not answer within {PROBE_TIMEOUT_S} s under"
                    f" {ATTACKERS} half-sent requests:\n{daemon.log()[-3000:]}"
                ) from None
            assert status == 200, (path, status, doc)
            print(f"{path} under attack: {anyio.current_time() - t0:.3f} s")

        # Every half-open connection is closed by the server within the header timeout
        # (counted from the last one opened), none left for the attacker to hold.
        within = header_timeout_s + 3.0 - (anyio.current_time() - attack_opened)
        closed, took = await anyio.to_thread.run_sync(wait_all_closed, socks, within)
        assert closed == ATTACKERS, f"{ATTACKERS - closed} connections still open"
        print(f"all {ATTACKERS} closed {took:.2f} s after the probes")

        # Every one of them was closed by the guard: evicted over the cap, or timed out.
        status, text = await daemon.get("/metrics")
        assert status == 200
        counts = closed_counts(text)
        assert counts.get("evicted", 0) + counts.get("header_timeout", 0) == ATTACKERS, counts
        assert counts.get("header_timeout", 0) > 0 and counts.get("evicted", 0) > 0, counts
        assert counts.get("refused", 0) == 0, counts

        # The daemon works as before.
        status, doc = await daemon.post("/jobs", jsonl([job_line("after-attack")]))
        assert status == 201, doc
        await daemon.wait_job("after-attack", "harvested")

        # stderr: JSON lines only, a handful about the attack, no tracebacks.
        with daemon.log_path.open("rb") as f:
            f.seek(log_before)
            written = f.read()
        lines = written.decode().splitlines()
        events = [json.loads(line) for line in lines]  # every line is JSON
        about_http = [e for e in events if e["event"].startswith("http: ")]
        assert 0 < len(about_http) <= 6, about_http  # throttled: 3 a minute per reason
        assert len(written) < 16_384, f"{len(written)} bytes of log for one attack"
        assert "Traceback" not in written.decode()
        print(f"log during the attack: {len(lines)} lines, {len(written)} bytes")
    finally:
        await daemon.session.close()


async def test_slow_headers_bodies_and_idle_connections_are_closed_in_time(
    tmp_path: Path, start_emulator: StartEmulator, start_daemon: StartDaemon
) -> None:
    limits = "header_timeout_s = 1\nbody_timeout_s = 1\nidle_timeout_s = 1\n"
    daemon = await start_guarded(tmp_path, start_emulator, start_daemon, limits)
    host, port = "127.0.0.1", int(daemon.base.rsplit(":", 1)[1])
    slack = 2.0
    try:
        # Headers trickled in a byte every 0.2 s: data keeps coming, the deadline holds.
        async with await anyio.connect_tcp(host, port) as s:
            t0 = anyio.current_time()
            with anyio.fail_after(1 + slack):
                try:
                    for byte in HALF_SENT * 10:
                        await s.send(bytes([byte]))
                        await anyio.sleep(0.2)
                except (anyio.BrokenResourceError, OSError):
                    pass
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, OSError)):
                    await s.receive()
            print(f"trickled headers closed after {anyio.current_time() - t0:.2f} s")

        # A body that never arrives: 408 with a JSON error, then the connection closes.
        async with await anyio.connect_tcp(host, port) as s:
            await s.send(
                b"POST /jobs HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n" + b"[" * 10
            )
            data = b""
            with anyio.fail_after(1 + slack):
                while not data.endswith(b"}"):
                    data += await s.receive()
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), data[:300]
            assert json.loads(body)["error"] == "request body not received within 1 s"
            with anyio.fail_after(LINGER_S + slack), pytest.raises(anyio.EndOfStream):
                await s.receive()

        # An idle keep-alive connection is closed after idle_timeout_s.
        async with await anyio.connect_tcp(host, port) as s:
            await s.send(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
            data = b""
            with anyio.fail_after(1 + slack):
                while True:
                    try:
                        data += await s.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b'{"status":"ok"}'), data

        status, text = await daemon.get("/metrics")
        assert status == 200
        counts = closed_counts(text)
        assert counts.get("header_timeout") == 1 and counts.get("body_timeout") == 1, counts
    finally:
        await daemon.session.close()
