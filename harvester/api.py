"""The daemon's HTTP surface: the jobs API, health, readiness and Prometheus metrics.

Routes (every answer is JSON except ``/metrics``):

    POST /jobs                   add jobs (JSON Lines, or a JSON array of job objects)
    GET  /jobs/{provider}/{key}  one job's state, timestamps, failure reason, output path
    GET  /healthz                200 while the event loop answers (liveness)
    GET  /readyz                 200 when ready for work, else 503 with the reason
    GET  /metrics                Prometheus text format
    GET  /                       the status page, HTML (``harvester.statuspage``)
    GET  /status.json            the status page's document
    GET  /login, POST /login     the status page's login form; POST /logout ends a session
    GET  /static/{name}          the status page's stylesheet and script

When ``server.token`` is configured the two job routes need ``Authorization: Bearer
<token>``; the status page and ``/status.json`` take that header or a session cookie from
the login form (``harvester.websession``). The probes and metrics stay open because kubelets
and scrapers carry no token, so they never show a payload, a job key or a secret.

Probes are cheap by construction: the store check behind ``/readyz`` and the job counts behind
``/metrics`` are cached for a second or two behind a lock, so a burst of probes or several
scrapers cost one query, not one each (kopf's probing does the same).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode, urlsplit

import anyio
import anyio.to_thread
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from harvester.clock import Clock
from harvester.config import Config
from harvester.control import retry_resume
from harvester.engine import Engine
from harvester.errors import BadBody, ControlError, HarvesterError, JobsFileError
from harvester.httpserver import reading_body
from harvester.jobs import Job, JobState, job_key
from harvester.jobsfile import TOO_DEEP, parse_jobs_text
from harvester.logs import get_logger, redact_text
from harvester.providers.base import Provider
from harvester.statuspage import (
    SECURITY_HEADERS,
    STATIC_TYPES,
    STATUS_CACHE_S,
    Throughput,
    recent_failures,
    render_login,
    render_page,
    snapshot,
    static_file,
)
from harvester.store.base import NewJob, ReplicaInfo, SharedStore, Store
from harvester.websession import (
    COOKIE,
    MAX_LOGIN_BODY,
    Sessions,
    clear_cookie_header,
    set_cookie_header,
    token_from_form,
)

log = get_logger("harvester.api")
_T = TypeVar("_T")

#: the largest request body accepted (a point-cloud job lists every frame with its poses)
MAX_BODY_BYTES = 64 << 20
#: how long a store check or the job counts are reused before asking the store again
READY_CACHE_S = 1.5
METRICS_CACHE_S = 2.0
#: a store that takes longer than this to answer a point lookup is not ready
STORE_PROBE_TIMEOUT_S = 2.0
#: ``source`` of jobs added over HTTP; errors read ``request:3: ...`` like ``jobs.jsonl:3: ...``
SOURCE = "request"
#: jobs per page of ``GET /jobs`` unless ``limit`` says otherwise, and the most it may say
LIST_PAGE = 100
LIST_PAGE_MAX = 1000
#: how long ``DELETE /jobs/...`` waits for the provider's answer before a 202
CANCEL_WAIT_S = 20.0
_ERROR_LINE = re.compile(rf"^{SOURCE}:(\d+): (.*)$")
_PROBE_META = "daemon.readiness-probe"

JOBS_PATH = "/jobs"
JOB_PATH = "/jobs/{provider}/{key}"
HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
METRICS_PATH = "/metrics"
STATUS_PATH = "/"
STATUS_JSON_PATH = "/status.json"
LOGIN_PATH = "/login"
LOGOUT_PATH = "/logout"
STATIC_PATH = "/static/{name}"


def json_response(
    doc: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, content_type="application/json", headers=headers
    )


def iso(t: float | None) -> str | None:
    """Unix seconds as ISO-8601 UTC with milliseconds (``2025-01-31T12:00:00.123Z``)."""
    if t is None:
        return None
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def job_document(job: Job, config: Config) -> dict[str, Any]:
    return {
        "provider": job.provider,
        "key": job.key,
        "reference_id": job.reference_id,
        "remote_id": job.remote_id,
        "state": job.state.value,
        "terminal": job.terminal,
        "remote_status": job.remote_status,
        "progress": job.progress,
        "attempts": job.attempts,
        "reason": job.reason,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "due_at": iso(job.due_at),
        "output": output_url(config, job.output) if job.output else None,
        "cancelled_by": job.cancelled_by,
        "remote_attempt": job.remote_attempt,
        "past_remote_ids": list(job.past_remote_ids),
        "started_at": iso(job.started_at),
        "cancel_requested_at": iso(job.cancel_requested_at),
    }


def output_url(config: Config, relative: str) -> str:
    """A harvested job's output: its folder, or its URL in object storage."""
    if config.output.url is not None:
        return f"{config.output.url.rstrip('/')}/{relative}"
    return str(config.output.dir / relative)


# -- request bodies -----------------------------------------------------------------------
def body_as_json_lines(body: bytes) -> bytes:
    """The body as JSON Lines: a JSON array becomes one line per item, in order.

    Items are cut out of the original text rather than parsed and re-serialised, so
    ``parse_jobs_text`` sees exactly what the client sent (duplicate keys, ``1`` vs ``1.0``)
    and applies the jobs file's rules unchanged; line N is then item N.
    """
    start = len(body) - len(body.lstrip())
    if body[start : start + 1] != b"[":
        return body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(f"the body is not UTF-8 (byte {exc.start})") from exc
    decoder = json.JSONDecoder()
    items: list[str] = []
    i = _skip_ws(text, start + 1)
    if text[i : i + 1] == "]":
        i += 1
    else:
        while True:
            try:
                _, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise BadBody(f"item {len(items) + 1} is not valid JSON: {exc.msg}") from exc
            except RecursionError:
                # no cause: a RecursionError's traceback is a thousand frames of the parser
                raise BadBody(f"item {len(items) + 1} is {TOO_DEEP}") from None
            # Outside strings JSON whitespace may include newlines; inside them it cannot.
            items.append(text[i:end].replace("\r", " ").replace("\n", " "))
            i = _skip_ws(text, end)
            sep = text[i : i + 1]
            i = _skip_ws(text, i + 1)
            if sep == "]":
                break
            if sep != ",":
                raise BadBody(f"expected ',' or ']' after item {len(items)} (character {i})")
    if text[i:].strip():
        raise BadBody("unexpected data after the JSON array")
    return "\n".join(items).encode("utf-8")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


@dataclass(frozen=True, slots=True)
class ParsedLine:
    line: int
    job: NewJob
    first_line: int  #: the line that first named this job in the same request


def parse_body(body: bytes, config: Config) -> list[ParsedLine]:
    """Every job line of ``body``, validated like a jobs file (raises ``JobsFileError``)."""
    text = body_as_json_lines(body)
    validators: dict[str, Provider] = {}
    jobs = parse_jobs_text(text, source=SOURCE, config=config, validators=validators)
    first = {(j.provider, j.key): _line_of(j) for j in jobs}
    parsed = [ParsedLine(_line_of(j), j, _line_of(j)) for j in jobs]
    # parse_jobs_text folds identical repeats into their first line; answer for those too.
    named = {p.line for p in parsed}
    for number, raw in enumerate(text.split(b"\n"), start=1):
        if number in named or not raw.strip():
            continue
        (job,) = parse_jobs_text(raw, source=SOURCE, config=config, validators=validators)
        parsed.append(ParsedLine(number, job, first[(job.provider, job.key)]))
    parsed.sort(key=lambda p: p.line)
    return parsed


def _line_of(job: NewJob) -> int:
    return int(job.source.rpartition(":")[2])


def line_errors(exc: JobsFileError) -> list[dict[str, Any]]:
    """A jobs-file error message as ``[{"line": 3, "error": "..."}]``."""
    errors: list[dict[str, Any]] = []
    for text in str(exc).splitlines():
        m = _ERROR_LINE.match(text)
        if m is not None:
            errors.append({"line": int(m[1]), "error": m[2]})
        elif text and not text.startswith(f"nothing from {SOURCE}"):
            errors.append({"line": None, "error": text})
    return errors


# -- cached probes ------------------------------------------------------------------------
class Cached(Generic[_T]):
    """One value computed at most every ``ttl`` seconds, whoever asks and however often.

    Double-checked behind a lock: concurrent callers wait for the one computation in flight
    instead of each starting their own.
    """

    def __init__(self, ttl: float, compute: Callable[[], Awaitable[_T]], clock: Clock) -> None:
        self.ttl = ttl
        self.compute = compute
        self.clock = clock
        self._lock = anyio.Lock()
        self._value: tuple[_T] | None = None  # boxed: a cached None is still a value
        self._at: float | None = None

    def _fresh(self) -> bool:
        return self._at is not None and self.clock.monotonic() - self._at < self.ttl

    async def get(self) -> _T:
        if not self._fresh():
            async with self._lock:
                if not self._fresh():
                    self._value = (await self.compute(),)
                    self._at = self.clock.monotonic()
        assert self._value is not None
        return self._value[0]


# -- the app ------------------------------------------------------------------------------
class Api:
    """The handlers, bound to the daemon's config, store and engine."""

    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        engine: Engine,
        stopping: Callable[[], bool],
        jobs_added: Callable[[], None],
        token: str | None,
        on_body_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.on_body_timeout = on_body_timeout
        self.store = store
        self.engine = engine
        self.stopping = stopping
        self.jobs_added = jobs_added
        # Hashing both sides makes the comparison constant-time whatever their lengths.
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None
        self._sessions = Sessions(token) if token else None
        self._store_ok = Cached(READY_CACHE_S, self._probe_store, engine.clock)
        self._counts = Cached(METRICS_CACHE_S, self._read_counts, engine.clock)
        self._status = Cached(STATUS_CACHE_S, self._status_document, engine.clock)
        #: request and harvest rates for the status page; the daemon runs its sampler
        self.throughput = Throughput(engine.metrics, engine.clock)
        self._started_wall = engine.clock.wall()

    def build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            middlewares=[self._timed, _json_errors, self._auth],
        )
        r = app.router
        r.add_post(JOBS_PATH, self.post_jobs)
        r.add_get(JOB_PATH, self.get_job)
        r.add_get(JOBS_PATH, self.list_jobs)
        r.add_delete(JOB_PATH, self.cancel_job)
        r.add_post(JOB_PATH + "/retry", self.retry_job)
        r.add_get(HEALTHZ_PATH, self.healthz)
        r.add_get(READYZ_PATH, self.readyz)
        r.add_get(METRICS_PATH, self.metrics)
        r.add_get(STATUS_PATH, self.status_page)
        r.add_get(STATUS_JSON_PATH, self.status_json)
        r.add_get(LOGIN_PATH, self.login_form)
        r.add_post(LOGIN_PATH, self.login)
        r.add_post(LOGOUT_PATH, self.logout)
        r.add_get(STATIC_PATH, self.static)
        return app

    # -- metrics of the API itself -------------------------------------------------------
    @web.middleware
    async def _timed(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            # By route template, not path: a job key in a label would grow without bound.
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            self.engine.metrics.http_duration.labels(route, request.method, str(status)).observe(
                time.perf_counter() - start
            )

    # -- auth ---------------------------------------------------------------------------
    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # Checked before the handler reads the body: a stranger cannot make us read 64 MB.
        if self._token_digest is not None and _needs_token(request.path):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            digest = hashlib.sha256(given.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self._token_digest):
                return json_response(
                    {"error": "a valid 'Authorization: Bearer <token>' header is required"},
                    401,
                    headers={"WWW-Authenticate": 'Bearer realm="harvester"'},
                )
        elif (
            self._sessions is not None
            and request.path in (STATUS_PATH, STATUS_JSON_PATH)
            and not self._status_allowed(request)
        ):
            if request.path == STATUS_PATH:
                return _redirect(LOGIN_PATH)
            return json_response(
                {"error": "log in at /login, or send 'Authorization: Bearer <token>'"},
                401,
                headers={"WWW-Authenticate": 'Bearer realm="harvester"'},
            )
        return await handler(request)

    def _status_allowed(self, request: web.Request) -> bool:
        """The status page takes the bearer header, or a session cookie from /login."""
        assert self._sessions is not None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._sessions.token_ok(given.strip()):
            return True
        return self._sessions.valid(request.cookies.get(COOKIE), self.engine.clock.wall())

    # -- jobs ---------------------------------------------------------------------------
    async def post_jobs(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY_BYTES, actual_size=request.content_length
            )
        refused = _refused_content_type(request)
        if refused is not None:
            return json_response({"error": refused, "errors": []}, 415)
        timeout = self.config.server.body_timeout_s
        try:
            # Real time: a bound on reading a socket, which no virtual clock moves.
            with reading_body(request), anyio.fail_after(timeout):
                body = await request.read()
        except TimeoutError:
            self.on_body_timeout()
            answer = json_response(
                {"error": f"request body not received within {timeout:g} s", "errors": []}, 408
            )
            answer.force_close()
            return answer
        except web.RequestPayloadError as exc:  # a malformed chunk, a cut connection
            return json_response({"error": f"bad request body: {exc}", "errors": []}, 400)
        # Parsing and validating a large body is CPU work; the probes must keep answering.
        try:
            parsed = await anyio.to_thread.run_sync(
                functools.partial(parse_body, body, self.config)
            )
        except BadBody as exc:
            return json_response({"error": str(exc), "errors": []}, 400)
        except JobsFileError as exc:
            errors = line_errors(exc)
            log.info("jobs refused", source="http", bad_lines=len(errors))
            return json_response(
                {"error": "invalid jobs; nothing was added", "errors": errors}, 400
            )
        if not parsed:
            return json_response({"error": "the body holds no jobs", "errors": []}, 400)
        unique = [p.job for p in parsed if p.line == p.first_line]
        try:
            result = await self.store.add_jobs(unique, now=self.engine.clock.wall())
        except JobsFileError as exc:
            # The store has a different job under one of these keys: a conflict, not a typo.
            return json_response(
                {
                    "error": "a job conflicts with the store; nothing was added",
                    "errors": line_errors(exc),
                },
                409,
            )
        except HarvesterError as exc:
            log.error("jobs not added: store error", error=str(exc))
            return json_response({"error": f"store unavailable: {exc}"}, 503)
        added = set(result.added)
        jobs = []
        for p in parsed:
            label = f"{p.job.provider}/{p.job.key}"
            doc: dict[str, Any] = {
                "line": p.line,
                "provider": p.job.provider,
                "key": p.job.key,
                "href": f"/jobs/{label}",
            }
            if p.line != p.first_line:
                doc["result"] = "repeated"
                doc["same_as_line"] = p.first_line
            else:
                doc["result"] = "added" if label in added else "already_present"
            jobs.append(doc)
        log.info(
            "jobs added", source="http", added=len(added), already_present=len(result.duplicates)
        )
        if added:
            self.jobs_added()
        return json_response(
            {"added": len(added), "already_present": len(result.duplicates), "jobs": jobs},
            201 if added else 200,
        )

    async def list_jobs(self, request: web.Request) -> web.Response:
        """``GET /jobs?provider=&state=&after=&limit=``: one page, and the next page's href."""
        q = request.query
        provider = q.get("provider") or None
        try:
            states = [JobState(s) for s in q.getall("state", [])] or None
            after = int(q.get("after", "0"))
            limit = int(q.get("limit", str(LIST_PAGE)))
            if after < 0 or not 1 <= limit <= LIST_PAGE_MAX:
                raise ValueError
        except ValueError:
            return json_response(
                {
                    "error": "state must be a job state"
                    f" ({', '.join(s.value for s in JobState)}), after a cursor from"
                    f" next, limit 1..{LIST_PAGE_MAX}"
                },
                400,
            )
        if provider is not None and provider not in self.config.providers:
            return json_response({"error": f"provider {provider!r} is not configured"}, 400)
        page = await self.store.page(provider=provider, states=states, after=after, limit=limit)
        nxt = None
        if page.next_after is not None:
            params = [("after", str(page.next_after)), ("limit", str(limit))]
            params += [("provider", provider)] if provider else []
            params += [("state", s.value) for s in states or []]
            nxt = f"{JOBS_PATH}?{urlencode(params)}"
        return json_response(
            {"jobs": [job_document(j, self.config) for j in page.jobs], "next": nxt}
        )

    async def cancel_job(self, request: web.Request) -> web.Response:
        """``DELETE /jobs/{provider}/{key}``: 200 cancelled; 409 refused (ended, finished,
        or the provider said no), nothing changed; 202 still waiting for the provider, or
        ``requested`` of the replica that holds the job."""
        job = await self._find(request)
        if job is None:
            return _no_job(request)
        try:
            req = await self.engine.cancel(job.provider, job.key, wait_s=CANCEL_WAIT_S)
        except ControlError as exc:
            return json_response({"error": str(exc)}, 409)
        if req.requested and req.job is not None:
            # Another replica holds it: that one cancels it at its next lease renewal.
            return json_response(
                {"requested": True, "job": job_document(req.job, self.config)}, 202
            )
        if req.job is not None:
            return json_response(job_document(req.job, self.config))
        if req.error is not None:
            return json_response({"error": req.error}, 409)
        return json_response(
            {"pending": True, "href": f"{JOBS_PATH}/{job.provider}/{job.key}"}, 202
        )

    async def retry_job(self, request: web.Request) -> web.Response:
        """``POST /jobs/{provider}/{key}/retry[?resubmit=1]``: 200 back to work, 409 not
        retryable (nothing changed)."""
        job = await self._find(request)
        if job is None:
            return _no_job(request)
        resubmit = request.query.get("resubmit", "") in ("1", "true")
        try:
            job = await retry_resume(self.engine, job, resubmit=resubmit)
        except ControlError as exc:
            return json_response({"error": str(exc)}, 409)
        return json_response(job_document(job, self.config))

    async def _find(self, request: web.Request) -> Job | None:
        provider = request.match_info["provider"]
        key = request.match_info["key"]
        job = await self.store.get(provider, key)
        if job is None:
            # Also accept the reference id a key was derived from, for ids that needed it.
            derived = job_key(key)
            if derived != key:
                job = await self.store.get(provider, derived)
        return job

    async def get_job(self, request: web.Request) -> web.Response:
        job = await self._find(request)
        if job is None:
            m = request.match_info
            return json_response({"error": f"no job {m['provider']}/{m['key']}"}, 404)
        return json_response(job_document(job, self.config))

    # -- probes -------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the loop runs; anything deeper belongs to /readyz, since a
        # failing liveness probe restarts the pod and a restart fixes no unreachable store.
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        reason = await self.not_ready_reason()
        if reason is None:
            return json_response({"ready": True})
        return json_response({"ready": False, "reason": reason}, 503)

    async def not_ready_reason(self) -> str | None:
        # The cheap, live checks first: draining must turn 503 the moment a signal lands.
        if self.stopping() or self.engine.draining:
            return "draining: finishing in-flight work before exit"
        if self.engine.fatal is not None:
            return "stopping after a fatal error (see the logs)"
        if self.engine.output_problem is not None:
            return f"output directory not writable: {self.engine.output_problem}"
        if not self.config.providers:
            return f"no providers are configured in {self.config.source.name}"
        if not self.engine.ready.is_set():
            return "starting: setting up providers and loading jobs"
        return await self._store_ok.get()

    async def _probe_store(self) -> str | None:
        try:
            # Real time here and below: a bound on the store's I/O (a database that hangs).
            with anyio.fail_after(STORE_PROBE_TIMEOUT_S):
                await self.store.get_meta(_PROBE_META)
        except TimeoutError:
            return f"store did not answer within {STORE_PROBE_TIMEOUT_S:g} s"
        except Exception as exc:  # whatever the store raises, the answer is "not ready"
            log.warning("readiness: store check failed", error=str(exc))
            return f"store unreachable: {redact_text(str(exc))}"
        return None

    async def metrics(self, request: web.Request) -> web.Response:
        counts = await self._counts.get()
        if counts is not None:  # else the gauge keeps its last values
            self._set_job_gauge(counts)
        return web.Response(
            body=self.engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _read_counts(self) -> dict[tuple[str, JobState], int] | None:
        """Jobs by (provider, state), shared by /metrics and the status page; None if the
        store did not answer."""
        try:
            with anyio.fail_after(STORE_PROBE_TIMEOUT_S):
                return await self.store.counts()
        except Exception as exc:  # keep serving the other metrics
            log.warning("metrics: job counts unavailable", error=str(exc))
            return None

    def _set_job_gauge(self, counts: dict[tuple[str, JobState], int]) -> None:
        gauge = self.engine.metrics.jobs
        providers = set(self.config.providers) | {p for p, _ in counts}
        # Every (provider, state) pair, zeros included: a state that empties must read 0,
        # not keep its last value, and rate()/alerts need series that do not come and go.
        gauge.clear()
        for provider in sorted(providers):
            for state in JobState:
                gauge.labels(provider, state.value).set(counts.get((provider, state), 0))

    # -- the status page ----------------------------------------------------------------
    async def _status_document(self) -> dict[str, Any]:
        failures: list[dict[str, Any]] = []
        replicas: list[ReplicaInfo] | None = None
        try:
            with anyio.fail_after(STORE_PROBE_TIMEOUT_S):
                failures = [
                    job_document(job, self.config) for job in await recent_failures(self.engine)
                ]
                if isinstance(self.store, SharedStore):
                    replicas = await self.store.replicas()
        except Exception as exc:  # the page still shows what this process knows
            log.warning("status page: store unavailable", error=str(exc))
        return snapshot(
            engine=self.engine,
            counts=await self._counts.get(),
            failures=failures,
            replicas=replicas,
            throughput=self.throughput,
            not_ready=await self.not_ready_reason(),
            started_wall=self._started_wall,
        )

    async def status_json(self, request: web.Request) -> web.Response:
        return json_response(
            await self._status.get(), headers={"Cache-Control": "no-store", **SECURITY_HEADERS}
        )

    async def status_page(self, request: web.Request) -> web.Response:
        page = render_page(await self._status.get(), logout=self._sessions is not None)
        return _html(page)

    async def login_form(self, request: web.Request) -> web.Response:
        if self._sessions is None:
            return _redirect(STATUS_PATH)  # nothing to log in to
        return _html(render_login())

    async def login(self, request: web.Request) -> web.Response:
        if self._sessions is None:
            return _redirect(STATUS_PATH)
        if not _same_origin(request):
            return _html(render_login(error="This form must be sent from this page."), 403)
        if request.content_length is not None and request.content_length > MAX_LOGIN_BODY:
            return _html(render_login(error="That is not a token."), 413)
        body = b""
        while len(body) <= MAX_LOGIN_BODY:  # a chunked body has no length to check first
            chunk = await request.content.read(MAX_LOGIN_BODY + 1 - len(body))
            if not chunk:
                break
            body += chunk
        given = token_from_form(body) if len(body) <= MAX_LOGIN_BODY else None
        if given is None or not self._sessions.token_ok(given):
            log.warning("status page: login refused", remote=request.remote)
            return _html(render_login(error="Wrong token."), 401)
        log.info("status page: logged in", remote=request.remote)
        session = self._sessions.issue(self.engine.clock.wall())
        return _redirect(STATUS_PATH, cookie=set_cookie_header(session, secure=_https(request)))

    async def logout(self, request: web.Request) -> web.Response:
        if not _same_origin(request):
            return _html(render_login(error="This form must be sent from this page."), 403)
        return _redirect(
            LOGIN_PATH if self._sessions is not None else STATUS_PATH,
            cookie=clear_cookie_header(secure=_https(request)),
        )

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = static_file(name)
        if body is None:
            return json_response({"error": "no such route"}, 404)
        return web.Response(
            body=body,
            content_type=STATIC_TYPES[name],
            charset="utf-8",
            headers={"Cache-Control": "max-age=300", **SECURITY_HEADERS},
        )


def _html(page: str, status: int = 200) -> web.Response:
    return web.Response(
        text=page,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store", **SECURITY_HEADERS},
    )


def _redirect(location: str, *, cookie: str | None = None) -> web.Response:
    headers = {"Location": location, "Cache-Control": "no-store"}
    if cookie is not None:
        headers["Set-Cookie"] = cookie
    return web.Response(status=303, headers=headers)


def _same_origin(request: web.Request) -> bool:
    """A form POST from another site's page carries that site's Origin: refused. (The
    cookie's SameSite=Strict keeps it off such a request anyway; this also stops a page
    elsewhere from logging a browser in, and a POST with no Origin is not a browser's.)
    Only the host is compared: behind a proxy that ends TLS the browser's scheme is https
    and ours is http."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc.lower() == request.host.lower()


def _https(request: web.Request) -> bool:
    """Did the browser use HTTPS (to us, or to the proxy in front)? Then the cookie is
    ``Secure``. Trusting the header can only add the flag, never take it away."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


#: what a jobs body may be labelled: JSON, JSON Lines, or what curl and clients send by
#: default for raw bytes (``--data-binary`` says form-urlencoded)
_BODY_TYPES = {
    "application/json",
    "application/x-ndjson",
    "application/jsonl",
    "application/jsonlines",
    "application/x-jsonlines",
    "text/plain",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
}


def _no_job(request: web.Request) -> web.Response:
    label = f"{request.match_info['provider']}/{request.match_info['key']}"
    return json_response({"error": f"no job {label}"}, 404)


def _refused_content_type(request: web.Request) -> str | None:
    if "Content-Type" not in request.headers:
        return None
    if request.content_type not in _BODY_TYPES:
        return (
            f"Content-Type {request.content_type} is not accepted; send JSON Lines or a JSON"
            " array (application/json, application/x-ndjson)"
        )
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8", "us-ascii"):
        return f"charset {charset} is not accepted; send UTF-8"
    return None


def _needs_token(path: str) -> bool:
    return path == JOBS_PATH or path.startswith(JOBS_PATH + "/")


_REASONS: dict[int, str] = {
    404: "no such route",
    405: "method not allowed on this route",
    413: f"request body larger than {MAX_BODY_BYTES >> 20} MiB",
}


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413, ...) as JSON, and a bug as a logged JSON 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        message = _REASONS.get(exc.status, exc.reason)
        return json_response({"error": message}, exc.status, headers=headers)
    except Exception:
        log.exception("http handler failed", method=request.method, path=request.path)
        return json_response({"error": "internal error (see the daemon's log)"}, 500)
