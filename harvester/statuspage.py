"""The daemon's status page: what it is doing, for a person with a browser.

``snapshot()`` gathers one document (also served as ``/status.json``): jobs by provider and
state, throughput over the last minute, each provider's rate-limit gate, the most recent
failures with their reasons, and the replicas sharing a PostgreSQL store. ``render_page``
turns it into HTML on the server; every value that came from outside (job keys, reasons,
provider text, host names) goes through ``html.escape`` there and nowhere else.

The page updates itself without anything from another origin: ``/static/status.js`` (served
by the daemon; the Content-Security-Policy allows scripts from ``'self'`` only) fetches the
page again every few seconds and swaps its ``<main>`` for the new one, parsed by
``DOMParser`` (which runs no script). One renderer, on the server, means one place where
escaping happens; without JavaScript a ``<noscript>`` meta refresh reloads the page instead.

The work per request is bounded: the snapshot is cached for ``STATUS_CACHE_S`` behind a lock
(like the ``/metrics`` counts), the store is asked for counts, at most ``MAX_FAILURES``
failures and the replica rows, and rates come from counter samples the daemon takes every
``SAMPLE_S`` (``Throughput.run``), not from the store.
"""

from __future__ import annotations

import html
import math
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from harvester import __version__
from harvester.clock import Clock
from harvester.jobs import ACTIVE, UNSUCCESSFUL, Job, JobState
from harvester.ratelimit import GateState

if TYPE_CHECKING:
    from harvester.engine import Engine
    from harvester.metrics import Metrics
    from harvester.store.base import ReplicaInfo

STATUS_CACHE_S = 2.0
#: failures listed on the page, newest first
MAX_FAILURES = 20
#: characters of a failure reason shown (the job route has all of it)
MAX_REASON_CHARS = 600
#: without JavaScript the page reloads this often (status.js fetches it every 5 s)
NOSCRIPT_REFRESH_S = 10
#: throughput is measured over this window from samples taken this often
WINDOW_S = 60.0
SAMPLE_S = 5.0

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: headers of every HTML answer and static file
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # not "no-referrer": with it browsers send "Origin: null" on the page's own form POSTs
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
STATIC_TYPES = {"status.css": "text/css", "status.js": "text/javascript"}

_STATE_ORDER = list(JobState)


def static_file(name: str) -> bytes | None:
    """One of the page's own files (``harvester/static``), or None for any other name."""
    if name not in STATIC_TYPES:
        return None
    return (resources.files("harvester") / "static" / name).read_bytes()


# -- throughput -----------------------------------------------------------------------------
def _by_provider(counter: Counter, *, state: str | None = None) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in counter.collect():
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue
            if state is not None and s.labels.get("state") != state:
                continue
            provider = s.labels["provider"]
            totals[provider] = totals.get(provider, 0.0) + s.value
    return totals


class Throughput:
    """Requests per second and jobs harvested per minute, per provider, over the last minute.

    Samples of two counters every ``SAMPLE_S`` (a task of the daemon); a rate is the change
    from the oldest sample in the window to now. Reading two counters is microseconds, and
    nobody viewing the page costs nothing.
    """

    def __init__(self, metrics: Metrics, clock: Clock) -> None:
        self.metrics = metrics
        self.clock = clock
        self._samples: deque[tuple[float, dict[str, float], dict[str, float]]] = deque()
        self.sample()

    def _read(self) -> tuple[float, dict[str, float], dict[str, float]]:
        return (
            self.clock.monotonic(),
            _by_provider(self.metrics.requests),
            _by_provider(self.metrics.transitions, state=JobState.HARVESTED.value),
        )

    def sample(self) -> None:
        now, requests, harvested = self._read()
        self._samples.append((now, requests, harvested))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW_S:
            self._samples.popleft()

    async def run(self) -> None:
        while True:
            await self.clock.sleep(SAMPLE_S)
            self.sample()

    def rates(self) -> tuple[float, dict[str, tuple[float, float]]]:
        """(window seconds, provider -> (requests/s, harvested/min)); window 0: no rate yet."""
        now, requests, harvested = self._read()
        then, requests0, harvested0 = self._samples[0]
        span = now - then
        if span < 1.0:
            return 0.0, {}
        out = {}
        for provider in set(requests) | set(harvested):
            dr = requests.get(provider, 0.0) - requests0.get(provider, 0.0)
            dh = harvested.get(provider, 0.0) - harvested0.get(provider, 0.0)
            out[provider] = (dr / span, dh * 60.0 / span)
        return span, out


# -- the document -------------------------------------------------------------------------
def iso(t: float | None) -> str | None:
    if t is None or not math.isfinite(t):
        return None
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def gate_document(gate: GateState, now_wall: float) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "open": gate.open,
        "until": None if gate.open else iso(now_wall + gate.seconds_left),
        "seconds_left": round(gate.seconds_left, 1),
        "probing": gate.probing,
        "status": gate.last_status,
        "retry_after_s": gate.last_retry_after_s,
        "rate_limited": gate.rate_limited,
        "why": None,
    }
    if gate.last_status is not None or gate.last_closed_for_s is not None:
        what = str(gate.last_status) if gate.last_status is not None else "throttled"
        if gate.last_retry_after_s is not None:
            why = f"{what} with Retry-After {gate.last_retry_after_s:g} s"
        else:
            why = f"{what} without Retry-After: backoff {gate.last_closed_for_s or 0:.1f} s"
        doc["why"] = why
    return doc


def replica_document(r: ReplicaInfo, *, me: str | None) -> dict[str, Any]:
    return {
        "id": r.id,
        "host": r.host,
        "this": r.id == me,
        "live": r.lease_left_s >= 0,
        "started_at": iso(r.started_at),
        "heartbeat_s_ago": round(max(0.0, r.heartbeat_ago_s), 1),
        "lease_s_left": round(r.lease_left_s, 1),
        "held_jobs": r.held,
    }


def snapshot(
    *,
    engine: Engine,
    counts: Mapping[tuple[str, JobState], int] | None,
    failures: Iterable[Mapping[str, Any]],
    replicas: Iterable[ReplicaInfo] | None,
    throughput: Throughput,
    not_ready: str | None,
    started_wall: float,
) -> dict[str, Any]:
    now_wall = engine.clock.wall()
    window, rates = throughput.rates()
    names = sorted(set(engine.config.providers) | {p for p, _ in (counts or {})})
    providers: list[dict[str, Any]] = []
    for name in names:
        row = {s.value: (counts or {}).get((name, s), 0) for s in _STATE_ORDER}
        lane = engine.lanes.get(name)
        req_s, harvested_min = rates.get(name, (0.0, 0.0))
        providers.append(
            {
                "name": name,
                "configured": name in engine.config.providers,
                "counts": row,
                "total": sum(row.values()),
                "active": sum(row[s.value] for s in ACTIVE),
                "requests_per_s": round(req_s, 2) if window else None,
                "harvested_per_min": round(harvested_min, 2) if window else None,
                "gate": (
                    gate_document(lane.transport.limiter.gate_state(), now_wall)
                    if lane is not None
                    else None
                ),
                "in_flight": len(lane.in_flight) if lane is not None else 0,
                "queued": lane.scheduled if lane is not None else 0,
            }
        )
    totals = {s.value: sum(p["counts"][s.value] for p in providers) for s in _STATE_ORDER}
    me = engine.replica.owner if engine.replica is not None else None
    return {
        "generated_at": iso(now_wall),
        "version": __version__,
        "ready": not_ready is None,
        "not_ready_reason": not_ready,
        "uptime_s": round(max(0.0, now_wall - started_wall), 1),
        "counts_available": counts is not None,
        "window_s": round(window, 1),
        "providers": providers,
        "totals": totals,
        "requests_per_s": (
            round(sum(p["requests_per_s"] or 0 for p in providers), 2) if window else None
        ),
        "harvested_per_min": (
            round(sum(p["harvested_per_min"] or 0 for p in providers), 2) if window else None
        ),
        "failures": list(failures),
        "replica": me,
        "replicas": (
            [replica_document(r, me=me) for r in replicas] if replicas is not None else None
        ),
    }


async def recent_failures(engine: Engine) -> list[Job]:
    return await engine.store.recent(sorted(UNSUCCESSFUL), limit=MAX_FAILURES)


# -- HTML -----------------------------------------------------------------------------------
def e(value: object) -> str:
    """Escaped for HTML text and double-quoted attributes: the one way values enter a page."""
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str, *, refresh: bool) -> str:
    noscript = (
        f'<noscript><meta http-equiv="refresh" content="{NOSCRIPT_REFRESH_S}"></noscript>'
        if refresh
        else ""
    )
    script = '<script src="/static/status.js" defer></script>' if refresh else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title>"
        '<link rel="stylesheet" href="/static/status.css">'
        f"{noscript}{script}</head>\n<body>{body}</body></html>\n"
    )


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = abs(seconds)
    text = f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"
    return text


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _gate_cell(gate: Mapping[str, Any] | None, *, configured: bool) -> str:
    if gate is None:
        text = "not started yet" if configured else "not configured"
        return f'<td class="gate"><span class="badge muted">{text}</span></td>'
    if gate["open"]:
        label = "half-open (probing)" if gate["probing"] else "open"
        cls = "warn" if gate["probing"] else "ok"
        last = (
            f'<div class="sub">last closed: {e(gate["why"])}</div>'
            if gate["why"] is not None
            else ""
        )
        return f'<td class="gate"><span class="badge {cls}">{e(label)}</span>{last}</td>'
    return (
        '<td class="gate"><span class="badge bad">closed</span>'
        f' <span class="until">until <time datetime="{e(gate["until"])}">{e(gate["until"])}'
        f"</time> (in {e(_ago(gate['seconds_left']))})</span>"
        f'<div class="sub why">{e(gate["why"] or "")}</div></td>'
    )


def render_page(doc: Mapping[str, Any], *, logout: bool) -> str:
    states = [s.value for s in _STATE_ORDER]
    ready = (
        '<span class="badge ok">ready</span>'
        if doc["ready"]
        else f'<span class="badge bad" title="{e(doc["not_ready_reason"])}">not ready</span>'
        f' <span class="sub">{e(doc["not_ready_reason"])}</span>'
    )
    logout_form = (
        '<form method="post" action="/logout" class="logout"><button>Log out</button></form>'
        if logout
        else ""
    )
    replica = f" · replica <code>{e(doc['replica'])}</code>" if doc["replica"] else ""
    header = (
        '<header><div class="title"><h1>harvester</h1>'
        f'<span class="sub">v{e(doc["version"])}{replica}</span></div>'
        f'<div class="right">{ready}'
        f'<span id="live" class="live" data-updates="0">auto-refresh every'
        f" {NOSCRIPT_REFRESH_S} s</span>{logout_form}</div></header>"
    )
    totals = doc["totals"]
    active = sum(totals[s.value] for s in ACTIVE)
    unsuccessful = sum(totals[s.value] for s in UNSUCCESSFUL)
    cards = "".join(
        f'<div class="card{" " + cls if cls else ""}" data-metric="{e(key)}">'
        f'<div class="n">{e(value)}</div><div class="label">{e(label)}</div></div>'
        for key, value, label, cls in (
            ("total", sum(totals.values()), "jobs", ""),
            ("active", active, "active", ""),
            ("harvested", totals["harvested"], "harvested", "good"),
            ("unsuccessful", unsuccessful, "failed, cancelled, error", "bad" * bool(unsuccessful)),
            ("requests_per_s", _rate(doc["requests_per_s"]), "requests / s", ""),
            ("harvested_per_min", _rate(doc["harvested_per_min"]), "harvested / min", ""),
        )
    )
    window = f"over the last {doc['window_s']:.0f} s" if doc["window_s"] else "no rate measured yet"
    gate_rows = "".join(
        f'<tr data-provider="{e(p["name"])}"><th scope="row">{e(p["name"])}</th>'
        f"{_gate_cell(p['gate'], configured=p['configured'])}"
        f'<td class="num">{e(_rate(p["requests_per_s"]))}</td>'
        f'<td class="num">{e(_rate(p["harvested_per_min"]))}</td>'
        f'<td class="num">{e(p["in_flight"])}</td><td class="num">{e(p["queued"])}</td></tr>'
        for p in doc["providers"]
    )
    providers = (
        f'<section><h2>Providers <span class="sub">rates {e(window)}</span></h2>'
        '<div class="scroll"><table id="providers"><thead><tr><th>provider</th>'
        '<th>rate-limit gate</th><th class="num">requests/s</th>'
        '<th class="num">harvested/min</th><th class="num">in flight</th>'
        '<th class="num">scheduled</th></tr></thead>'
        f"<tbody>{gate_rows or _empty(6, 'no providers')}</tbody></table></div></section>"
    )
    count_rows = "".join(
        f'<tr data-provider="{e(p["name"])}"><th scope="row">{e(p["name"])}</th>'
        + "".join(
            f'<td class="num{"" if p["counts"][s] else " zero"}" data-state="{e(s)}">'
            f"{e(p['counts'][s])}</td>"
            for s in states
        )
        + f'<td class="num total" data-state="total">{e(p["total"])}</td></tr>'
        for p in doc["providers"]
    )
    state_heads = "".join(f'<th class="num">{e(s)}</th>' for s in states)
    jobs = (
        '<section><h2>Jobs <span class="sub">by provider and state, from the store</span></h2>'
        '<div class="scroll"><table id="jobs"><thead><tr><th>provider</th>'
        f'{state_heads}<th class="num">total</th></tr></thead>'
        f"<tbody>{count_rows or _empty(len(states) + 2, 'no jobs')}</tbody></table></div>"
        + (
            ""
            if doc["counts_available"]
            else '<p class="warn-text">The store did not answer: counts are unavailable.</p>'
        )
        + "</section>"
    )
    failure_rows = "".join(
        f'<tr><td class="when"><time datetime="{e(f["updated_at"])}">{e(f["updated_at"])}'
        f'</time></td><td>{e(f["provider"])}</td><td class="key"><code>{e(f["key"])}</code>'
        f'</td><td><span class="badge bad">{e(f["state"])}</span></td>'
        f'<td class="reason">{e(_clip(f["reason"]))}</td></tr>'
        for f in doc["failures"]
    )
    failures = (
        f'<section><h2>Recent failures <span class="sub">newest first, at most {MAX_FAILURES};'
        " all of them: <code>harvester status</code></span></h2>"
        '<div class="scroll"><table id="failures"><thead><tr><th>when (UTC)</th>'
        "<th>provider</th><th>job</th><th>state</th><th>reason</th></tr></thead>"
        f"<tbody>{failure_rows or _empty(5, 'no failures')}</tbody></table></div></section>"
    )
    replicas = ""
    if doc["replicas"] is not None:
        replica_rows = "".join(
            f"<tr><td><code>{e(r['id'])}</code>{' (this one)' if r['this'] else ''}</td>"
            f"<td>{e(r['host'])}</td>"
            f'<td><span class="badge {"ok" if r["live"] else "bad"}">'
            f"{'live' if r['live'] else 'expired'}</span></td>"
            f'<td class="num">{e(r["held_jobs"])}</td>'
            f'<td class="num">{e(_ago(r["heartbeat_s_ago"]))} ago</td>'
            f'<td class="num">{e(r["lease_s_left"])} s</td>'
            f"<td>{e(r['started_at'])}</td></tr>"
            for r in doc["replicas"]
        )
        replicas = (
            '<section><h2>Replicas <span class="sub">sharing the PostgreSQL store</span></h2>'
            '<div class="scroll"><table id="replicas"><thead><tr><th>replica</th><th>host</th>'
            '<th>lease</th><th class="num">jobs held</th><th class="num">last renewal</th>'
            '<th class="num">lease left</th><th>started (UTC)</th></tr></thead>'
            f"<tbody>{replica_rows or _empty(7, 'no replica rows')}</tbody></table></div>"
            "</section>"
        )
    main = (
        f'<main data-generated="{e(doc["generated_at"])}">'
        f'<div class="cards">{cards}</div>{jobs}{providers}{failures}{replicas}'
        f'<footer>Generated <time datetime="{e(doc["generated_at"])}">'
        f"{e(doc['generated_at'])}</time> · up {e(_ago(doc['uptime_s']))} · "
        '<a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></footer>'
        "</main>"
    )
    return _page("harvester status", header + main, refresh=True)


def render_login(*, error: str | None = None) -> str:
    message = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    body = (
        '<main class="login"><h1>harvester</h1><p>This daemon needs its API token to show'
        " its status.</p>"
        f"{message}"
        '<form method="post" action="/login"><label for="token">API token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password"'
        ' required autofocus><button type="submit">Log in</button></form>'
        '<p class="sub">The token is sent once, in this form\'s body; the browser then keeps'
        " a session cookie derived from it (HttpOnly, SameSite=Strict, 12 h).</p></main>"
    )
    return _page("harvester: log in", body, refresh=False)


def _clip(text: str | None) -> str:
    if text is None:
        return ""
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "…"


def _empty(columns: int, text: str) -> str:
    return f'<tr class="empty"><td colspan="{columns}">{e(text)}</td></tr>'
