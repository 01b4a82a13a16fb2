"""Bentley Reality Analysis v2: what harvester sends and what the emulator answers, checked
with ``jsonschema`` against the schemas of Bentley's own page (the seed), which
``bentley_seed`` reads from the seed text. A drift on either side from Bentley's documents
fails here.

Where the seed is silent, the rule is Bentley's other published reference, named at its use:
the create body (jobs-create: ``outputs`` lists output names) and the job listing
(jobs-get-all: ``$filter`` properties, ``$top``, ``continuationToken``, ``{jobs, _links}``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import jsonschema
import pytest

import harvester.specs
from harvester.config import BentleyConfig, SecretRef
from harvester.emulator.scenario import parse_scenario
from harvester.emulator.server import Emulator
from harvester.errors import InvalidPayload
from harvester.jobs import Job, JobState
from harvester.providers.base import RemoteState
from harvester.providers.bentley import BentleyProvider, job_name
from harvester.specs import bentley_v2
from harvester.wire import Response
from tests.contracts.bentley_payloads import documented_payloads
from tests.contracts.bentley_seed import (
    answer_examples,
    components,
    create_schema,
    job_types,
    list_schema,
    media_type,
    schema,
)

pytestmark = pytest.mark.anyio
PAYLOADS = documented_payloads()
CFG = BentleyConfig(
    name="bentley",
    base_url="https://api.bentley.com",
    token_url="https://ims.example/connect/token",
    client_id="c",
    client_secret=SecretRef("s", env="X"),
)
#: jobs-get-all (Reality Analysis; the same list on Reality Conversion's v2 page):
#: "Properties supported for filtering"
FILTER_PROPERTIES = frozenset(
    {"id", "iTwinId", "name", "email", "type", "state", "createdDateTime", "inputId", "outputId"}
)
LIST_PARAMS = frozenset({"$filter", "$top", "continuationToken"})


def check(instance: Any, schema_: dict[str, Any]) -> None:
    jsonschema.validate(instance, schema_, cls=jsonschema.Draft202012Validator)


def valid(instance: Any, schema_: dict[str, Any]) -> bool:
    return jsonschema.Draft202012Validator(schema_).is_valid(instance)


def job(reference: str = "contract-1", remote: str | None = None) -> Job:
    state = JobState.RUNNING if remote else JobState.NEW
    return Job("bentley", reference, reference, remote, state, 0.0, 0.0)


def canonical(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its output names in the seed's spelling (matched ignoring case)."""
    out = copy.deepcopy(payload)
    names = components()[f"{out['type']}Outputs"]["properties"]
    folded = {n.casefold(): n for n in names}
    out["specifications"]["outputs"] = [
        folded[o.casefold()] for o in payload["specifications"]["outputs"]
    ]
    return out


# -- the vendored schemas ----------------------------------------------------------------
def test_vendored_schemas_are_the_seeds() -> None:
    vendored = Path(harvester.specs.__file__).parent / bentley_v2.FILE
    assert json.loads(vendored.read_text()) == {"components": {"schemas": components()}}, (
        "harvester/specs is stale: python -m tests.contracts.bentley_seed > " + str(vendored)
    )


@pytest.mark.parametrize(
    "make",
    [create_schema, list_schema, lambda: schema("JobResponse"), lambda: schema("ErrorResponse")],
)
def test_the_schemas_are_well_formed(make: Callable[[], dict[str, Any]]) -> None:
    jsonschema.Draft202012Validator.check_schema(make())


def test_every_job_type_and_state_of_the_seed_is_known() -> None:
    assert set(bentley_v2.JOB_TYPES) == set(job_types()) == {p["type"] for p in PAYLOADS.values()}
    p = BentleyProvider(CFG)
    for raw in components()["JobState"]["enum"]:
        body = {"job": {**answer_examples()[200]["job"], "state": raw}}
        status = p.parse_get(Response(200, {}, json.dumps(body).encode(), "u"), job(remote="j"))
        assert status.known and status.raw == raw
        assert status.state in set(RemoteState)


# -- what harvester sends ----------------------------------------------------------------
@pytest.mark.parametrize("label", list(PAYLOADS))
def test_documented_payloads_are_accepted_and_sent_as_the_schema_says(label: str) -> None:
    payload = PAYLOADS[label]
    p = BentleyProvider(CFG)
    p.validate_payload(payload)
    body = p.build_create(job(), payload).json
    check(body, create_schema())
    assert body["name"] == "contract-1" and body["type"] == payload["type"]
    assert body["specifications"] == canonical(payload)["specifications"]


def test_bentleys_own_create_example_breaks_its_schema_so_harvester_normalises_it() -> None:
    example = PAYLOADS["jobs-create-example"]
    assert not valid(example, create_schema())  # "Objects2D" is not an output name
    body = BentleyProvider(CFG).build_create(job(), example).json
    assert body["specifications"]["outputs"] == ["objects2D"] and valid(body, create_schema())


@pytest.mark.parametrize(
    "reference", ["scan-1", "a/b", 'x"<>|:*?\\/y', "ab", "tab\tin", "é" * 300, "'quoted'"]
)
def test_every_reference_id_gives_a_valid_job_name(reference: str) -> None:
    body = BentleyProvider(CFG).build_create(job(reference), PAYLOADS["seed-Segmentation3D"]).json
    check(body, create_schema())


def _first(d: dict[str, Any]) -> str:
    return next(iter(d))


#: breaks of the documented create body; each returns None where it does not apply
MUTATIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "v1-inputs-list": lambda s: s["specifications"].update(
        inputs=[{"name": k, "realityDataId": v} for k, v in s["specifications"]["inputs"].items()]
    ),
    "unknown-input": lambda s: s["specifications"]["inputs"].update(pointClouds="rd"),
    "input-not-a-string": lambda s: s["specifications"]["inputs"].update(
        {_first(s["specifications"]["inputs"]): 5}
    ),
    "unknown-output": lambda s: s["specifications"]["outputs"].append("notAnOutput"),
    "output-twice": lambda s: s["specifications"]["outputs"].append(
        s["specifications"]["outputs"][0]
    ),
    "outputs-as-answer": lambda s: s["specifications"].update(
        outputs={o: "rd" for o in s["specifications"]["outputs"]}
    ),
    "extra-key": lambda s: s.update(costEstimationParameters={"gigaPixels": 2}),
    "extra-specifications-key": lambda s: s["specifications"].update(extra=1),
    "unknown-option": lambda s: s["specifications"].update(
        options={**s["specifications"].get("options", {}), "notAnOption": 1}
    ),
    "option-of-wrong-type": lambda s: (
        s["specifications"]["options"].update(
            {k: 5 if isinstance(v, str) else "x" for k, v in s["specifications"]["options"].items()}
        )
        if s["specifications"].get("options")
        else "skip"
    ),
    "name-with-colon": lambda s: s.update(name="site:1"),
    "name-too-short": lambda s: s.update(name="ab"),
    "unknown-type": lambda s: s.update(type="Objects3D"),
    "required-input-missing": lambda s: (
        s["specifications"]["inputs"].pop(req[0])
        if (req := components()[f"{s['type']}Inputs"].get("required"))
        else "skip"
    ),
}


def _broken() -> list[tuple[str, str, dict[str, Any]]]:
    """(payload label, mutation, broken body) for every mutation that applies."""
    out = []
    for label in (k for k in PAYLOADS if k.startswith("seed-")):
        for mutation, breaks in MUTATIONS.items():
            body = copy.deepcopy(PAYLOADS[label])
            if breaks(body) != "skip":
                out.append((label, mutation, body))
    return out


def test_every_mutation_breaks_most_job_types() -> None:
    counts = {m: sum(b[1] == m for b in _broken()) for m in MUTATIONS}
    assert min(counts.values()) >= len(job_types()) // 2, counts


@pytest.mark.parametrize(
    ("label", "mutation", "body"), [pytest.param(*b, id=f"{b[1]}-{b[0]}") for b in _broken()]
)
def test_broken_bodies_are_refused_by_harvester_as_by_the_schema(
    label: str, mutation: str, body: dict[str, Any]
) -> None:
    assert valid(PAYLOADS[label], create_schema())
    assert not valid(body, create_schema()), mutation
    with pytest.raises(InvalidPayload, match=r"^payload[.:]"):
        BentleyProvider(CFG).validate_payload(body)


def test_lookup_and_poll_requests_follow_the_reference() -> None:
    p = BentleyProvider(CFG)
    jobs_url = "https://api.bentley.com/reality-analysis/jobs"
    for reference in ("scan-1", "it's/here", "x" * 400):
        for cursor in (None, "tok"):
            spec = p.build_find(job(reference), cursor)
            assert spec is not None and (spec.method, spec.url, spec.json) == (
                "GET",
                jobs_url,
                None,
            )
            assert set(spec.params) <= LIST_PARAMS and 1 <= int(spec.params["$top"]) <= 1000
            assert spec.params.get("continuationToken") == cursor
            m = re.fullmatch(r"(\w+) eq '((?:[^']|'')*)'", spec.params["$filter"])
            assert m is not None and m.group(1) in FILTER_PROPERTIES
            assert m.group(2).replace("''", "'") == job_name(reference)
            assert spec.headers["Accept"] == media_type()
    get = p.build_get(job(remote="8ee1aeca"))
    assert (get.method, get.url, get.json) == ("GET", f"{jobs_url}/8ee1aeca", None)
    assert (
        get.headers["Accept"]
        == p.build_create(job(), PAYLOADS["seed-EvalS2D"]).headers["Accept"]
        == media_type()
    )


# -- what the emulator answers -----------------------------------------------------------
def emulator(**bentley: Any) -> Emulator:
    doc = {"seed": 5, "bentley": {"job_duration_s": 0.4, "terminating_s": 0.1, **bentley}}
    return Emulator(parse_scenario(doc))


class Api:
    def __init__(self, emu: Emulator, session: aiohttp.ClientSession) -> None:
        self.emu, self.session = emu, session
        self.base = emu.urls["bentley"] + "/reality-analysis/jobs"
        self.headers: dict[str, str] = {"Accept": media_type()}

    async def login(self) -> None:
        form = {"grant_type": "client_credentials", "client_id": "ct", "client_secret": "s",
                "scope": "itwin-platform"}  # fmt: skip
        async with self.session.post(self.emu.urls["token"], data=form) as r:
            assert r.status == 200
            self.headers["Authorization"] = f"Bearer {(await r.json())['access_token']}"

    async def call(
        self, method: str, url: str, *, auth: bool = True, **kw: Any
    ) -> tuple[int, dict[str, str], Any]:
        headers = self.headers if auth else {"Accept": media_type()}
        async with self.session.request(method, url, headers=headers, **kw) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


@pytest.mark.parametrize("failure_rate", [0.0, 1.0])
async def test_emulator_answers_match_bentleys_schemas(failure_rate: float) -> None:
    job_response, error_response = schema("JobResponse"), schema("ErrorResponse")
    async with emulator(failure_rate=failure_rate) as emu, aiohttp.ClientSession() as session:
        api = Api(emu, session)
        await api.login()
        made: list[str] = []
        for label, payload in PAYLOADS.items():
            status, _, doc = await api.call("POST", api.base, json=canonical(payload))
            assert status == 201, (label, doc)
            check(doc, job_response)
            made.append(doc["job"]["id"])
        status, _, doc = await api.call("DELETE", f"{api.base}/{made[0]}")
        assert status == 200 and doc["job"]["state"] == "Terminating"
        check(doc, job_response)
        seen = {"Terminating"}
        pending = set(made)
        for _ in range(400):
            for job_id in sorted(pending):
                status, _, doc = await api.call("GET", f"{api.base}/{job_id}")
                assert status == 200
                check(doc, job_response)
                seen.add(doc["job"]["state"])
                if doc["job"]["state"] in ("Success", "Failed", "Cancelled"):
                    pending.discard(job_id)
            if not pending:
                break
        assert not pending
        ends = {"Cancelled", "Failed"} if failure_rate else {"Cancelled", "Success"}
        assert {"Queued"} | ends <= seen <= set(components()["JobState"]["enum"])

        listed: list[str] = []
        params: dict[str, str] = {"$filter": "createdDateTime gt 2000-01-01T00:00:00Z", "$top": "3"}
        for _ in range(20):
            status, _, doc = await api.call("GET", api.base, params=params)
            assert status == 200, doc
            check(doc, list_schema())
            listed += [j["id"] for j in doc["jobs"]]
            if "_links" not in doc:
                break
            params = dict(parse_qsl(urlsplit(doc["_links"]["next"]["href"]).query))
        assert listed == made

        v1 = canonical(PAYLOADS["seed-Segmentation3D"])
        v1["specifications"]["inputs"] = [{"name": "model3D", "realityDataId": "rd"}]
        for method, url, kw in (
            ("POST", api.base, {"json": v1}),
            ("GET", api.base, {}),
            ("GET", api.base, {"params": {"$filter": "colour eq 'red'"}}),
        ):
            status, _, doc = await api.call(method, url, **kw)
            assert status == 400, doc
            check(doc, error_response)
        examples = answer_examples()
        status, _, doc = await api.call("GET", f"{api.base}/no-such-job")
        assert status == 404 and doc == examples[404]
        status, _, doc = await api.call("GET", f"{api.base}/{made[0]}", auth=False)
        assert status == 401 and doc == examples[401]


async def test_emulator_429_matches_bentleys_schema() -> None:
    async with (
        emulator(rate_limit={"rate_per_s": 0.2, "burst": 1}) as emu,
        aiohttp.ClientSession() as session,
    ):
        api = Api(emu, session)
        await api.login()
        answers = [await api.call("GET", f"{api.base}/x") for _ in range(2)]
        status, headers, doc = answers[-1]
        assert status == 429 and headers["Retry-After"].isdigit()
        check(doc, schema("ErrorResponse"))
        assert doc["error"]["code"] == answer_examples()[429]["error"]["code"]


def test_a_jobs_class_is_its_type_as_the_seeds_answer_gives_it() -> None:
    # the poll scheduler learns durations per job type (issue 18)
    p = BentleyProvider(CFG)
    example = answer_examples()[200]
    status = p.parse_get(Response(200, {}, json.dumps(example).encode(), "u"), job(remote="j"))
    assert p.job_class(status) == example["job"]["type"] == "Segmentation2D"
    assert example["job"]["type"] in job_types()
