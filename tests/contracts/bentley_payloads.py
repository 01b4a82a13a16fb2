"""Create payloads for every Bentley job type, as Bentley documents them.

Two are Bentley's own examples, copied verbatim: the v2 jobs-create example
(developer.bentley.com/apis/reality-analysis/operations/jobs-create) and the Segmentation2D job
of the seed's "Get job" page, turned back into the create body it answers. The others are
built from the seed's schemas by code, one per job type: its required inputs plus the inputs
that neither replace another (their description says "replaces") nor are bucket paths, every
output it has, and every option with a value of the option's type.
"""

from __future__ import annotations

import json
from typing import Any

from tests.contracts.bentley_seed import REF, components, job_types, seed_text

#: developer.bentley.com/apis/reality-analysis/operations/jobs-create, "Example" (verbatim)
JOBS_CREATE_EXAMPLE = json.loads(
    '{ "specifications": { "inputs": { "photos": "df091f39-377c-48fb-a9c9-9fd0998e151a",'
    ' "photoObjectDetector": "9a125f8a-da72-41d8-8482-2f7b179d732e" }, "outputs": [ "Objects2D" ],'
    ' "options": { "maxDist": 2, "useTiePoints": true } }, "name": "My first Objects2D job",'
    ' "type": "Objects2D", "iTwinId": "019b18b4-e4c1-4211-b8bb-1bd26b8e955e" }'
)
_SAMPLE = {"string": "EPSG:4326", "number": 1.5, "integer": 2, "boolean": True}


def seed_job_example() -> dict[str, Any]:
    """The job the seed's "Get job" page answers with (its 200 example)."""
    for line in seed_text().splitlines():
        if line.strip().startswith('{ "job"'):
            return dict(json.loads(line)["job"])
    raise ValueError("the Bentley seed has no job example")


def create_from_answer(job: dict[str, Any]) -> dict[str, Any]:
    specs = dict(job["specifications"])
    specs["outputs"] = list(specs["outputs"])  # the answer maps names to ids; a create lists
    return {"name": job["name"], "type": job["type"], "iTwinId": job["iTwinId"],
            "specifications": specs}  # fmt: skip


def _ref(node: dict[str, Any]) -> dict[str, Any]:
    return components()[node["$ref"][len(REF) :]]


def built_payload(job_type: str) -> dict[str, Any]:
    specs = components()[f"{job_type}Specifications"]["properties"]
    inputs = _ref(specs["inputs"])
    chosen = {
        name: f"rd-{job_type.lower()}-{name.lower()}"
        for name, prop in inputs["properties"].items()
        if name in inputs.get("required", ())
        or ("pattern" not in prop and "replaces" not in prop.get("description", ""))
    }
    payload: dict[str, Any] = {
        "type": job_type,
        "iTwinId": "contract-itwin",
        "specifications": {
            "inputs": chosen,
            "outputs": list(_ref(specs["outputs"])["properties"]),
        },
    }
    if "options" in specs:
        options = _ref(specs["options"])["properties"]
        payload["specifications"]["options"] = {
            name: _SAMPLE[prop["type"]] for name, prop in options.items()
        }
    return payload


def documented_payloads() -> dict[str, dict[str, Any]]:
    """Label -> payload: Bentley's two examples, then one per job type of the seed."""
    out = {
        "jobs-create-example": JOBS_CREATE_EXAMPLE,
        "get-job-example": create_from_answer(seed_job_example()),
    }
    out.update({f"seed-{t}": built_payload(t) for t in job_types()})
    return out
