"""The Bentley adapter on recorded bodies (written from PROVIDERS.md): no network."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
import pytest

from harvester.config import BentleyConfig, SecretRef
from harvester.errors import (
    CredentialsError,
    HarvesterError,
    InvalidPayload,
    ProtocolError,
    ProviderJobFailed,
    ProviderUnavailable,
    RateLimited,
)
from harvester.jobs import Job
from harvester.providers.base import (
    Accepted,
    Found,
    NextPage,
    NotFound,
    RemoteFile,
    RemoteState,
    Status,
    Unsearchable,
)
from harvester.providers.bentley import ACCEPT, ACCEPT_REALITY_DATA, BentleyProvider, job_name
from harvester.schedule import BENTLEY_LADDER, PollPolicy
from harvester.specs import bentley_v2
from harvester.wire import RequestSpec, Resolver, Response
from tests.unit.adapters import FakeClient, RecordingIO, answer, make_job

T = TypeVar("T")
BASE = "https://api.bentley.com"
JOBS = f"{BASE}/reality-analysis/jobs"
CFG = BentleyConfig(
    name="bentley",
    base_url=BASE + "/",
    token_url="https://ims.example/connect/token",
    client_id="c",
    client_secret=SecretRef("s", env="X"),
    itwin_id="twin-1",
)
PAYLOAD: dict[str, Any] = {
    "type": "Objects2D",
    "specifications": {
        "inputs": {"photos": "rd-in", "photoObjectDetector": "rd-detector"},
        "outputs": ["objects2D", "objects3D"],
        "options": {"minPhotos": 3},
    },
}


def job_doc(state: str, **extra: Any) -> dict[str, Any]:
    return {
        "job": {
            "id": "j-1",
            "state": state,
            "userId": "u",
            "executionInfo": {"createdDateTime": "2024-01-01T00:00:00Z"},
            "specifications": {
                "inputs": PAYLOAD["specifications"]["inputs"],
                "outputs": {"objects2D": "rd-out-1", "objects3D": "rd-out-2"},
                "options": {"minPhotos": 3},
            },
            "name": "scan-1",
            "type": "Objects2D",
            "iTwinId": "twin-1",
            **extra,
        }
    }


def job(**kw: Any) -> Job:
    return make_job("bentley", "scan-1", "j-1", **kw)


def resp(
    status: int, body: Any, headers: dict[str, str] | None = None, url: str = JOBS
) -> Response:
    return answer(status, body, url=url, request_id="rid-b", headers=headers)


def err(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


@pytest.fixture
def p() -> BentleyProvider:
    return BentleyProvider(CFG)


# -- requests ---------------------------------------------------------------------------
def test_create_request_names_the_job_after_its_reference(p: BentleyProvider) -> None:
    spec = p.build_create(job(remote_id=None), PAYLOAD)
    assert (spec.method, spec.url, spec.endpoint) == ("POST", JOBS, "create")
    assert spec.headers == {"Accept": ACCEPT}
    assert spec.idempotent is False
    assert spec.json == {
        "name": "scan-1",
        "type": "Objects2D",
        "iTwinId": "twin-1",
        "specifications": PAYLOAD["specifications"],
    }
    # A payload's own name is replaced: the name is how a lost create answer is found again.
    named = p.build_create(job(), {**PAYLOAD, "name": "mine", "iTwinId": "t2"})
    assert named.json["name"] == "scan-1" and named.json["iTwinId"] == "t2"


def test_output_names_are_sent_in_the_schemas_spelling(p: BentleyProvider) -> None:
    # Bentley's own jobs-create example asks for "Objects2D"; the schema's name is objects2D.
    docs = {**PAYLOAD, "specifications": {**PAYLOAD["specifications"], "outputs": ["Objects2D"]}}
    assert p.build_create(job(), docs).json["specifications"]["outputs"] == ["objects2D"]


@pytest.mark.parametrize(
    ("reference", "name"),
    [
        ("scan-1", "scan-1"),
        ("survey 2024/site:A", None),
        ("ab", None),
        ('a"b<c>d|e*f?g\\h', None),
        ("x" * 256, "x" * 256),
        ("x" * 257, None),
        ("tab\there", None),
    ],
)
def test_job_names_are_valid_v2_names(reference: str, name: str | None) -> None:
    got = job_name(reference)
    assert bentley_v2.name_problem(got) is None
    if name is not None:
        assert got == name  # already valid: unchanged
    else:
        assert got != reference and len(got) <= 256
        assert got.endswith(hashlib.sha256(reference.encode()).hexdigest()[:12])
    assert job_name(reference) == got  # stable: a restart looks for the same name


def test_sanitised_names_of_different_references_differ() -> None:
    assert job_name("a/b") != job_name("a:b") != job_name("a_b")
    assert job_name("x" * 300) != job_name("x" * 299 + "y")


def test_lookup_lists_jobs_by_name(p: BentleyProvider) -> None:
    spec = p.build_find(job(reference_id="it's/1"), None)
    assert spec is not None and (spec.method, spec.url, spec.endpoint) == ("GET", JOBS, "find")
    quoted = job_name("it's/1").replace("'", "''")
    assert "it''s" in quoted
    assert spec.params == {"$filter": f"name eq '{quoted}'", "$top": "100"}
    nxt = p.build_find(job(), "tok-2")
    assert nxt is not None and nxt.params["continuationToken"] == "tok-2"


def test_lookup_answers(p: BentleyProvider) -> None:
    mine = job_doc("Active")["job"]
    other = {**mine, "id": "j-2", "name": "scan-10"}
    page = {"jobs": [other, mine]}
    assert p.parse_find(resp(200, page), job(remote_id=None)) == Found("j-1")
    assert p.parse_find(resp(200, {"jobs": [other]}), job()) == NotFound()
    href = f"{JOBS}?$filter=name%20eq%20%27scan-1%27&continuationToken=abc%3D"
    more = {"jobs": [other], "_links": {"next": {"href": href}}}
    assert p.parse_find(resp(200, more), job()) == NextPage("abc=")
    with pytest.raises(ProviderJobFailed, match="2 Bentley jobs are named 'scan-1'"):
        p.parse_find(resp(200, {"jobs": [mine, {**mine, "id": "j-9"}]}), job())
    with pytest.raises(ProtocolError):
        p.parse_find(resp(200, {"items": []}), job())


@pytest.mark.parametrize("status", [400, 404, 405, 501])
def test_a_refused_lookup_is_unsearchable_not_absent(p: BentleyProvider, status: int) -> None:
    body = err("InvalidRealityAnalysisRequest", "Property 'name' cannot be filtered.")
    found = p.parse_find(resp(status, body), job())
    assert isinstance(found, Unsearchable) and "cannot be filtered" in found.reason


def test_the_ladder(p: BentleyProvider) -> None:
    assert p.ladder() == BENTLEY_LADDER == (15.0, 30.0, 60.0, 120.0)
    # The engine clamps it into the configured poll bounds.
    policy = PollPolicy(min_s=20, max_s=90, ladder=p.ladder(), jitter=0)
    assert policy.ladder == (20.0, 30.0, 60.0, 90.0)


def test_poll_requests(p: BentleyProvider) -> None:
    assert p.build_get(job()).url == f"{JOBS}/j-1"
    assert p.build_progress(job()).url == f"{JOBS}/j-1/progress"
    assert p.build_messages(job()).url == f"{JOBS}/j-1/messages"
    for spec in (p.build_get(job()), p.build_progress(job()), p.build_messages(job())):
        assert spec.method == "GET" and spec.headers["Accept"] == ACCEPT
    odd = p.build_get(job(remote_id="a/../b"))
    assert odd.url == f"{JOBS}/a%2F..%2Fb"
    ra = p.build_readaccess("rd/1")
    assert ra.url == f"{BASE}/reality-management/reality-data/rd%2F1/readaccess"
    assert ra.headers["Accept"] == ACCEPT_REALITY_DATA and ra.send_credentials is True


# -- create answers ---------------------------------------------------------------------
def test_create_answer(p: BentleyProvider) -> None:
    assert p.parse_create(resp(201, job_doc("Queued")), job()) == Accepted("j-1")


@pytest.mark.parametrize(
    "body", [{"job": {}}, {"job": {"id": 5}}, {"id": "j-1"}, {"job": "j-1"}, b"<html/>", [1]]
)
def test_malformed_create_answers(p: BentleyProvider, body: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        p.parse_create(resp(201, body), job())
    assert "bentley" in str(info.value) and "rid-b" in str(info.value)


# -- error envelopes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "body", "exc"),
    [
        (
            401,
            err("HeaderNotFound", "Header Authorization was not found in the request."),
            CredentialsError,
        ),
        (403, err("InsufficientPermissions", "Not allowed."), CredentialsError),
        (404, err("JobNotFound", "Requested job is not available."), ProviderJobFailed),
        (422, err("InvalidChange", "Cannot submit", target="state"), InvalidPayload),
        (
            400,
            err(
                "InvalidRealityAnalysisRequest",
                "Bad",
                details=[{"code": "InvalidValue", "message": "type is wrong", "target": "type"}],
            ),
            InvalidPayload,
        ),
        (429, err("RateLimitExceeded", "Too many."), RateLimited),
        (500, err("InternalServerError", "Oops"), ProviderUnavailable),
        (405, err("MethodNotAllowed", "No"), ProtocolError),
    ],
)
def test_error_envelopes_are_typed(p: BentleyProvider, status: int, body: Any, exc: type) -> None:
    code = body["error"]["code"]
    for parse in (p.parse_create, p.parse_get, p.parse_progress, p.parse_messages):
        with pytest.raises(exc) as info:
            parse(resp(status, body, {"Retry-After": "12"}), job())
        error = info.value
        assert isinstance(error, HarvesterError)
        assert error.code == code and error.request_id == "rid-b"
        text = str(error)
        assert f"code {code}" in text and "request id rid-b" in text and "bentley" in text
        assert body["error"]["message"] in text
    if exc is RateLimited:
        assert isinstance(error, RateLimited) and error.retry_after == 12.0


def test_error_details_and_target_reach_the_message(p: BentleyProvider) -> None:
    body = err(
        "InvalidRealityAnalysisRequest",
        "Invalid request.",
        target="specifications",
        details=[{"code": "MissingRequiredProperty", "message": "inputs is required"}],
    )
    with pytest.raises(InvalidPayload) as info:
        p.parse_create(resp(400, body), job())
    text = str(info.value)
    assert "target specifications" in text and "MissingRequiredProperty: inputs is required" in text


@pytest.mark.parametrize("body", [b"", b"<html>", {"error": "x"}, {"message": "m"}])
def test_odd_error_bodies_still_typed_by_status(p: BentleyProvider, body: Any) -> None:
    with pytest.raises(CredentialsError):
        p.parse_get(resp(401, body), job())
    with pytest.raises(ProviderJobFailed):
        p.parse_get(resp(404, body), job())


# -- status mapping ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "state", "known"),
    [
        ("Queued", RemoteState.RUNNING, True),
        ("Active", RemoteState.RUNNING, True),
        ("Terminating", RemoteState.RUNNING, True),
        ("Success", RemoteState.SUCCEEDED, True),
        ("Failed", RemoteState.FAILED, True),
        ("Cancelled", RemoteState.CANCELLED, True),
        # v1 / SDK names, not in the v2 schema: polled on as running, flagged unknown
        ("TerminatingOnCancel", RemoteState.RUNNING, False),
        ("TerminatingOnFailure", RemoteState.RUNNING, False),
        ("Paused", RemoteState.RUNNING, False),
    ],
)
def test_state_mapping(p: BentleyProvider, raw: str, state: RemoteState, known: bool) -> None:
    status = p.parse_get(resp(200, job_doc(raw)), job())
    assert (status.state, status.raw, status.known) == (state, raw, known)
    assert status.document == job_doc(raw)


def test_every_documented_state_is_mapped() -> None:
    for raw in bentley_v2.JOB_STATES:
        status = BentleyProvider(CFG).parse_get(resp(200, job_doc(raw)), job())
        assert status.known and status.raw == raw


@pytest.mark.parametrize(
    "body", [{"job": {"id": "j-1"}}, {"job": {"state": 1}}, {"state": "Active"}, b"{", b"null"]
)
def test_malformed_job_answers(p: BentleyProvider, body: Any) -> None:
    with pytest.raises(ProtocolError):
        p.parse_get(resp(200, body), job())


@pytest.mark.parametrize(
    ("body", "value"),
    [
        ({"progress": {"percentage": 42, "state": "Active"}}, 42.0),
        ({"progress": {"percentage": 12.5}}, 12.5),
        ({"progress": {"percentage": 250}}, 100.0),
        ({"progress": {"percentage": -1}}, 0.0),
    ],
)
def test_progress(p: BentleyProvider, body: Any, value: float) -> None:
    assert p.parse_progress(resp(200, body), job()) == value


@pytest.mark.parametrize(
    "body",
    [
        {"progress": {}},
        {"progress": {"percentage": "42"}},
        {"progress": {"percentage": True}},
        {"percentage": 4},
        b"1e999",
        b'{"progress": {"percentage": 1e999}}',
    ],
)
def test_malformed_progress(p: BentleyProvider, body: Any) -> None:
    with pytest.raises(ProtocolError):
        p.parse_progress(resp(200, body), job())


def test_messages_become_texts(p: BentleyProvider) -> None:
    body = {
        "messages": {
            "errors": [
                {
                    "code": "InputNotFound",
                    "title": "Input missing",
                    "message": "Input %1 was not found in %2.",
                    "params": ["rd-in", "twin-1"],
                },
                "plain text error",
                "plain text error",
                {"code": "E2"},
                42,
            ],
            "warnings": [{"code": "W", "message": "ignored"}],
        }
    }
    assert p.parse_messages(resp(200, body), job()) == [
        "InputNotFound: Input rd-in was not found in twin-1.",
        "plain text error",
        "E2",
    ]
    with pytest.raises(ProtocolError):
        p.parse_messages(resp(200, {"messages": {}}), job())


# -- the multi-request poll ------------------------------------------------------------
def api(state: str, progress: Any = None, messages: Any = None) -> FakeClient:
    def handle(spec: RequestSpec) -> Response:
        if spec.url.endswith("/progress"):
            return resp(200, progress if progress is not None else {"progress": {"percentage": 40}})
        if spec.url.endswith("/messages"):
            return resp(200, messages if messages is not None else {"messages": {"errors": []}})
        return resp(200, job_doc(state))

    return FakeClient(handle)


def endpoints(client: FakeClient) -> list[str]:
    return [s.endpoint for s in client.specs]


@pytest.mark.anyio
async def test_active_job_asks_for_its_progress(p: BentleyProvider) -> None:
    client = api("Active")
    status = await p.poll(job(), client)
    assert isinstance(status, Status)
    assert (status.state, status.raw, status.progress) == (RemoteState.RUNNING, "Active", 40.0)
    assert endpoints(client) == ["poll", "progress"]


@pytest.mark.anyio
async def test_queued_and_finished_jobs_cost_one_request(p: BentleyProvider) -> None:
    for state in ("Queued", "Success", "Cancelled"):
        client = api(state)
        status = await p.poll(job(), client)
        assert isinstance(status, Status) and status.raw == state
        assert endpoints(client) == ["poll"]
    done = await p.poll(job(), api("Success"))
    assert isinstance(done, Status) and done.progress == 100.0


@pytest.mark.anyio
async def test_odd_progress_answer_does_not_end_a_running_job(p: BentleyProvider) -> None:
    client = api("Active", progress={"progress": "soon"})
    status = await p.poll(job(), client)
    assert isinstance(status, Status)
    assert status.state == RemoteState.RUNNING and status.progress is None


@pytest.mark.anyio
async def test_failed_job_reason_comes_from_its_messages(p: BentleyProvider) -> None:
    msgs = {"messages": {"errors": [{"code": "E1", "message": "Not enough photos."}, "GPU lost"]}}
    client = api("Failed", messages=msgs)
    status = await p.poll(job(), client)
    assert isinstance(status, Status) and status.state == RemoteState.FAILED
    assert status.reason == "E1: Not enough photos.; GPU lost"
    assert endpoints(client) == ["poll", "messages"]
    silent = await p.poll(job(), api("Failed"))
    assert (
        isinstance(silent, Status) and silent.reason and "without error messages" in silent.reason
    )
    broken = await p.poll(job(), api("Failed", messages=[1]))
    assert isinstance(broken, Status) and broken.reason and "unreadable" in broken.reason


@pytest.mark.anyio
async def test_gone_job_fails_the_poll(p: BentleyProvider) -> None:
    client = FakeClient(
        lambda spec: resp(404, err("JobNotFound", "Requested job is not available."))
    )
    with pytest.raises(ProviderJobFailed):
        await p.poll(job(), client)


# -- payload validation --------------------------------------------------------------------
def test_valid_payloads(p: BentleyProvider) -> None:
    p.validate_payload(PAYLOAD)
    p.validate_payload({**PAYLOAD, "name": "a name", "iTwinId": "t"})
    spec = dict(PAYLOAD["specifications"])
    del spec["options"]
    p.validate_payload({**PAYLOAD, "specifications": spec})


def specs(**kw: Any) -> dict[str, Any]:
    return {**PAYLOAD, "specifications": {**PAYLOAD["specifications"], **kw}}


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ([], "JSON object"),
        ({**PAYLOAD, "type": "Objects3D"}, "payload.type must be one of Objects2D, "),
        ({**PAYLOAD, "type": None}, "payload.type"),
        ({**PAYLOAD, "name": "ab"}, "payload.name must be 3 to 256 characters"),
        ({**PAYLOAD, "name": "a/b"}, "payload.name must not contain"),
        ({**PAYLOAD, "iTwinId": 5}, "iTwinId"),
        ({**PAYLOAD, "costEstimationParameters": {}}, "costEstimationParameters is not a"),
        ({**PAYLOAD, "specifications": None}, "specifications must be an object"),
        ({**PAYLOAD, "specifications": {"outputs": ["objects2D"]}}, "inputs is required"),
        (
            specs(inputs=[{"name": "photos", "realityDataId": "rd"}]),
            re.escape(
                "payload.specifications.inputs must be an object mapping Objects2D input names"
                " to reality-data ids (model3D, objects2D, photoObjectDetector, photos)"
            )
            + ".* the v1 API",
        ),
        (specs(inputs={}), "names no input"),
        (specs(inputs={"pointClouds": "rd"}), "inputs.pointClouds is not an input of Objects2D"),
        (specs(inputs={"photoObjectDetector": "rd"}), "required input.*photos"),
        (specs(inputs={"photos": 7}), "inputs.photos must be a string"),
        (specs(inputs={"photos": ""}), "inputs.photos must be a non-empty"),
        (specs(outputs=[]), "outputs must be a list of Objects2D output names"),
        (specs(outputs={"objects2D": "rd"}), "the answer's form"),
        (specs(outputs=["objects2D", "objects2D"]), "listed twice"),
        (specs(outputs=["segmentation2D"]), r"outputs\[0\] \"segmentation2D\" is not an output"),
        (specs(options=[]), "options must be an object"),
        (specs(options={"minQuality": 0.5}), "options.minQuality is not an option of Objects2D"),
        (specs(options={"minPhotos": "3"}), "options.minPhotos must be an integer"),
        (specs(options={"useTiePoints": 1}), "options.useTiePoints must be a boolean"),
        (specs(extra=1), "specifications.extra is not a property of Objects2D specifications"),
    ],
)
def test_invalid_payloads(p: BentleyProvider, payload: Any, words: str) -> None:
    with pytest.raises(InvalidPayload, match=words):
        p.validate_payload(payload)


def test_a_type_without_options_refuses_them(p: BentleyProvider) -> None:
    ortho = {
        "type": "SegmentationOrthophoto",
        "specifications": {
            "inputs": {"orthophoto": "rd", "orthophotoSegmentationDetector": "det"},
            "outputs": ["segmentation2D"],
        },
    }
    p.validate_payload(ortho)
    ortho["specifications"]["options"] = {}
    with pytest.raises(InvalidPayload, match="SegmentationOrthophoto takes no options"):
        p.validate_payload(ortho)


def test_a_stored_v1_payload_is_refused_at_create_not_sent(p: BentleyProvider) -> None:
    old = specs(inputs=[{"name": "photos", "realityDataId": "rd"}])
    with pytest.raises(InvalidPayload, match="the v1 API"):
        p.build_create(job(remote_id=None), old)


def test_itwin_id_is_required_without_config() -> None:
    p = BentleyProvider(BentleyConfig(name="bentley", base_url=BASE))
    with pytest.raises(InvalidPayload, match="itwin_id"):
        p.validate_payload(PAYLOAD)
    p.validate_payload({**PAYLOAD, "iTwinId": "t"})


# -- harvest -------------------------------------------------------------------------------
STORAGE = "https://acct.blob.core.windows.net"


def listing(
    names: list[str], marker: str | None = None, bodies: dict[str, Any] | None = None
) -> bytes:
    """A List Blobs page; a blob whose body is known gets its Content-Length and -MD5."""
    bodies = bodies or {}

    def props(name: str) -> str:
        body = bodies.get(name)
        if not isinstance(body, bytes):
            return "<Properties/>"
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        return (
            f"<Properties><Content-Length>{len(body)}</Content-Length>"
            f"<Content-MD5>{md5}</Content-MD5></Properties>"
        )

    blobs = "".join(f"<Blob><Name>{n}</Name>{props(n)}</Blob>" for n in names)
    nxt = f"<NextMarker>{marker}</NextMarker>" if marker else "<NextMarker/>"
    return (
        f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ContainerName="c">'
        f"<Blobs>{blobs}</Blobs>{nxt}</EnumerationResults>"
    ).encode()


class World:
    """Bentley's API and an Azure storage host, in memory.

    Each readaccess issues a new SAS (``sig=N``); signatures up to ``expired_below`` are
    refused by storage (403), as an expired SAS would be.
    """

    def __init__(self, containers: dict[str, dict[str, Any]]) -> None:
        # reality data id -> {"pages": {marker: (names, next)}, blob name: bytes}
        self.containers = containers
        self.sas = 0
        self.expired_below = 0
        self.readaccess: list[str] = []
        self.storage_gets: list[str] = []

    def api(self, spec: RequestSpec) -> Response:
        assert spec.headers.get("Accept") == ACCEPT_REALITY_DATA
        rid = unquote(spec.url.split("/reality-data/")[1].removesuffix("/readaccess"))
        self.readaccess.append(rid)
        if rid not in self.containers:
            return resp(404, err("RealityDataNotFound", f"{rid} not found"))
        self.sas += 1
        href = f"{STORAGE}/{rid}?sv=2021&sp=rl&sig={self.sas}"
        return resp(200, {"_links": {"containerUrl": {"href": href}}})

    def storage(self, url: str) -> bytes | None:
        """The body at a signed URL, or None for a 403."""
        self.storage_gets.append(url)
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if int(query["sig"][0]) <= self.expired_below:
            return None
        rid, _, blob = parts.path.lstrip("/").partition("/")
        container = self.containers[rid]
        if query.get("comp") == ["list"]:
            marker = query.get("marker", [""])[0]
            names, nxt = container["pages"][marker]
            return listing(names, nxt, container)
        body: bytes = container[unquote(blob)]
        return body


class FakeIO(RecordingIO):
    """Records what a harvest writes; downloads re-resolve on 403 like ``stream_into``."""

    provider = "Bentley"

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.listed: dict[str, tuple[int | None, bytes | None]] = {}

    async def request(self, spec: RequestSpec) -> Response:
        assert spec.send_credentials
        return self.world.api(spec)

    async def _get(self, resolve: Resolver) -> bytes:
        for _ in range(3):
            body = self.world.storage(await resolve())
            if body is not None:
                return body
        raise ProtocolError("storage refused 3 times")

    async def fetch(self, resolve: Resolver, *, what: str) -> bytes:
        return await self._get(resolve)

    async def download(
        self, relpath: str, resolve: Resolver, *, size: int | None = None, md5: bytes | None = None
    ) -> None:
        assert not relpath.startswith("/") and ".." not in relpath.split("/")
        self.files[relpath] = await self._get(resolve)
        self.listed[relpath] = (size, md5)

    async def download_files(self, files: Sequence[RemoteFile]) -> None:
        for f in files:
            await self.download(f.relpath, f.resolve, size=f.size, md5=f.md5)


def success() -> Status:
    return Status(RemoteState.SUCCEEDED, "Success", progress=100.0, document=job_doc("Success"))


@pytest.mark.anyio
async def test_harvest_lists_pages_and_downloads_every_blob(p: BentleyProvider) -> None:
    world = World(
        {
            "rd-out-1": {
                "pages": {
                    "": (["a.json", "tiles/0/t.b3dm"], "m2"),
                    "m2": (["z dir/b.txt", "d/"], None),
                },
                "a.json": b"{}",
                "tiles/0/t.b3dm": b"B3DM",
                "z dir/b.txt": b"text",
            },
            "rd-out-2": {"pages": {"": ([], None)}},
        }
    )
    io = FakeIO(world)
    await p.harvest(job(), success(), io)
    assert orjson.loads(io.files.pop("job.json")) == job_doc("Success")
    assert io.files == {
        "outputs/objects2D/a.json": b"{}",
        "outputs/objects2D/tiles/0/t.b3dm": b"B3DM",
        f"outputs/objects2D/{_key('z dir')}/b.txt": b"text",
    }
    # Each download is held to what the listing said of its blob.
    assert io.listed == {k: (len(v), hashlib.md5(v).digest()) for k, v in io.files.items()}
    # One readaccess per output: the SAS is reused until storage refuses it.
    assert world.readaccess == ["rd-out-1", "rd-out-2"]
    lists = [u for u in world.storage_gets if "comp=list" in u]
    assert len(lists) == 3 and "marker=m2" in lists[1]


@pytest.mark.anyio
async def test_expired_sas_is_re_resolved(p: BentleyProvider) -> None:
    world = World(
        {
            "rd-out-1": {"pages": {"": (["a", "b"], None)}, "a": b"A", "b": b"B"},
            "rd-out-2": {"pages": {"": (["c"], None)}, "c": b"C"},
        }
    )
    io = FakeIO(world)

    original = world.storage

    def expire_after_listing(url: str) -> bytes | None:
        # The first SAS dies as soon as the first output's listing is read.
        if "comp=list" not in url and world.sas == 1:
            world.expired_below = 1
        return original(url)

    world.storage = expire_after_listing  # type: ignore[method-assign]
    await p.harvest(job(), success(), io)
    assert io.files["outputs/objects2D/a"] == b"A" and io.files["outputs/objects2D/b"] == b"B"
    assert io.files["outputs/objects3D/c"] == b"C"
    assert world.readaccess == ["rd-out-1", "rd-out-1", "rd-out-2"]


@pytest.mark.parametrize(
    "hostile", ["../../../etc/passwd", "/etc/passwd", "a/../../x", "a//b", "./x"]
)
@pytest.mark.anyio
async def test_hostile_blob_names_never_touch_the_disk(p: BentleyProvider, hostile: str) -> None:
    world = World({"rd-out-1": {"pages": {"": (["ok.txt", hostile], None)}, "ok.txt": b"fine"}})
    io = FakeIO(world)
    status = Status(
        RemoteState.SUCCEEDED,
        "Success",
        document={"job": {"specifications": {"outputs": {"o": "rd-out-1"}}}},
    )
    with pytest.raises(ProtocolError) as info:
        await p.harvest(job(), status, io)
    assert "bentley" in str(info.value) and "scan-1" in str(info.value)
    assert set(io.files) == {"job.json"}  # refused before anything was downloaded


@pytest.mark.anyio
async def test_odd_but_harmless_names_are_sanitised(p: BentleyProvider) -> None:
    names = ["..a", ".hidden", "a\\..\\b", "é.txt"]
    world = World({"rd-out-1": {"pages": {"": (names, None)}, **{n: n.encode() for n in names}}})
    io = FakeIO(world)
    doc = {"job": {"specifications": {"outputs": {"../evil": "rd-out-1"}}}}
    await p.harvest(job(), Status(RemoteState.SUCCEEDED, "Success", document=doc), io)
    written = sorted(k for k in io.files if k != "job.json")
    assert len(written) == 4
    for rel in written:
        parts = rel.split("/")
        assert parts[0] == "outputs" and parts[1] == _key("../evil")
        assert not any(x in ("", ".", "..") or x.startswith(".") for x in parts)


@pytest.mark.anyio
async def test_looping_listing_is_refused(p: BentleyProvider) -> None:
    world = World({"rd-out-1": {"pages": {"": (["a"], "m"), "m": (["b"], "m")}}})
    status = Status(
        RemoteState.SUCCEEDED,
        "Success",
        document={"job": {"specifications": {"outputs": {"o": "rd-out-1"}}}},
    )
    with pytest.raises(ProtocolError, match="repeats a page marker"):
        await p.harvest(job(), status, FakeIO(world))


@pytest.mark.parametrize(
    ("document", "exc"),
    [
        (None, ProtocolError),
        ({"job": {}}, ProtocolError),
        ({"job": {"specifications": {"outputs": ["objects2D"]}}}, ProtocolError),
        ({"job": {"specifications": {"outputs": {"o": None}}}}, ProtocolError),
        ({"job": {"specifications": {"outputs": {"o": "missing"}}}}, ProviderJobFailed),
    ],
)
@pytest.mark.anyio
async def test_harvest_of_odd_documents(p: BentleyProvider, document: Any, exc: type) -> None:
    with pytest.raises(exc):
        await p.harvest(
            job(), Status(RemoteState.SUCCEEDED, "Success", document=document), FakeIO(World({}))
        )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"_links": {}},
        {"_links": {"containerUrl": {"href": 5}}},
        {"_links": {"containerUrl": {"href": "file:///etc/passwd"}}},
        b"<html/>",
    ],
)
def test_malformed_readaccess(p: BentleyProvider, body: Any) -> None:
    with pytest.raises(ProtocolError):
        p.parse_readaccess(resp(200, body), job())


def _key(name: str) -> str:
    from harvester.jobs import job_key

    return job_key(name)
