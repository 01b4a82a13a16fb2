"""Bentley's Reality Analysis v2 schemas, read from the provider's own page (the seed).

The seed is the text of Bentley's "Get job" reference page: every JSON Schema it shows is on
one line, under the schema's title. This module parses those lines and gives each schema the
component name its ``$ref``s use (``#/components/schemas/<name>``), so ``jsonschema`` can
resolve them. Nothing of a schema's content is typed here; only the names of four schemas
whose titles are not their component names (the page shows titles, the refs use names).

What the page does not carry is derived here from the published rules, each said where it is
built: the create body (``jobs-create``: ``outputs`` is the list of output *names* of the
type's Outputs schema) and the job listing envelope (``jobs-get-all``: ``{jobs, _links}``).

Run as a script to print the schemas harvester vendors (``harvester/specs``).
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

SEED = Path(__file__).resolve().parents[2] / ".." / "shared" / "seeds" / "002_c2105e202b9fec0d.txt"
#: titles whose component names are not the title without its spaces (naming only)
_ALIASES = {"Job type": "JobTypes", "Error Response": "ErrorResponse", None: "Error"}
REF = "#/components/schemas/"


def seed_text() -> str:
    if not SEED.is_file():
        raise FileNotFoundError(f"the Bentley seed is missing: {SEED} (../shared beside the repo)")
    return SEED.read_text(encoding="utf-8")


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        out = {node["$ref"][len(REF) :]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            out |= _refs(value)
        return out
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node)) if node else set()
    return set()


@cache
def components() -> dict[str, dict[str, Any]]:
    """Every schema on the page, by component name; every ``$ref`` among them resolves."""
    blocks: list[dict[str, Any]] = []
    examples = 0
    for line in seed_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        doc = json.loads(line)
        if "type" in doc or "enum" in doc:
            blocks.append(doc)
        else:
            examples += 1  # an example answer, e.g. {"job": ...} or {"error": ...}
    by_title = {b.get("title"): b for b in blocks}
    if len(by_title) != len(blocks):
        raise ValueError("two schemas on the Bentley page share a title")
    names: dict[str, dict[str, Any]] = {}
    for title, block in by_title.items():
        if title in _ALIASES:
            names[_ALIASES[title]] = block
        elif title.endswith(" Specifications"):
            # "Eval Objects 2D Specifications" is EvalO2DSpecifications: its inputs' $ref
            # names the family, and the family's Inputs/Outputs/Options share its title.
            family = block["properties"]["inputs"]["$ref"][len(REF) : -len("Inputs")]
            stem = title[: -len(" Specifications")]
            names[f"{family}Specifications"] = block
            for part in ("Inputs", "Outputs", "Options"):
                if f"{stem} {part}" in by_title:
                    names[f"{family}{part}"] = by_title[f"{stem} {part}"]
    for title, block in by_title.items():
        if block not in names.values():
            names[str(title).replace(" ", "")] = block
    missing = set().union(*(_refs(b) for b in names.values())) - set(names)
    if missing or examples < 1:
        raise ValueError(f"unresolved $refs in the Bentley page: {sorted(missing)}")
    return names


def answer_examples() -> dict[int, dict[str, Any]]:
    """The page's example answers by HTTP status (``Response 404 Not Found`` then its body)."""
    out: dict[int, dict[str, Any]] = {}
    status: int | None = None
    for line in seed_text().splitlines():
        m = re.match(r"Response (\d{3}) ", line)
        if m:
            status = int(m.group(1))
        elif line.startswith("{") and status is not None and status not in out:
            out[status] = json.loads(line)
    return out


def media_type() -> str:
    """The Accept value the page recommends."""
    m = re.search(r"application/vnd\.bentley\.itwin-platform\.v\d+\+json", seed_text())
    if m is None:
        raise ValueError("the Bentley seed names no media type")
    return m.group(0)


def schema(name: str) -> dict[str, Any]:
    """A standalone JSON Schema for one component (its refs resolve within)."""
    return {**components()[name], "components": {"schemas": components()}}


def job_types() -> list[str]:
    return list(components()["JobTypes"]["enum"])


def family(job_type: str) -> str:
    """The component prefix of a job type's specifications (``EvalO2D`` ...)."""
    anyof = components()["Job"]["properties"]["specifications"]["anyOf"]
    found = [r["$ref"][len(REF) : -len("Specifications")] for r in anyof]
    if job_type not in found:
        raise KeyError(f"{job_type} has no Specifications schema on the Bentley page")
    return job_type


def create_schema() -> dict[str, Any]:
    """``POST /reality-analysis/jobs``: the Job schema's client-set properties, with each
    type's specifications as documented for a create (outputs a list of output names)."""
    comps = components()
    job = comps["Job"]
    variants = []
    for job_type in job_types():
        specs = comps[f"{family(job_type)}Specifications"]
        outputs = comps[specs["properties"]["outputs"]["$ref"][len(REF) :]]
        create_specs = json.loads(json.dumps(specs))
        create_specs["properties"]["outputs"] = {
            "type": "array",
            "items": {"enum": sorted(outputs["properties"])},
            "uniqueItems": True,
            **({"allOf": [{"contains": {"const": r}} for r in outputs["required"]]}
               if outputs.get("required") else {}),
        }  # fmt: skip
        variants.append(
            {
                "type": "object",
                "properties": {"type": {"const": job_type}, "specifications": create_specs},
                "required": ["type"],
            }
        )
    client_set = ("name", "type", "iTwinId", "specifications")
    properties = {k: job["properties"][k] for k in client_set}
    # The answer's specifications (outputs an object); a create's are the variants above.
    properties["specifications"] = {"type": "object"}
    return {
        "type": "object",
        "properties": properties,
        "required": [k for k in job["required"] if k in client_set],
        "additionalProperties": False,
        "oneOf": variants,
        "components": {"schemas": comps},
    }


def list_schema() -> dict[str, Any]:
    """``GET /reality-analysis/jobs``: ``{"jobs": [Job], "_links"?: {"next"?: {"href"}}}``."""
    href = {"type": "object", "properties": {"href": {"type": "string"}}, "required": ["href"]}
    return {
        "type": "object",
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": f"{REF}Job"}},
            "_links": {"type": "object", "properties": {"next": href}},
        },
        "required": ["jobs"],
        "additionalProperties": False,
        "components": {"schemas": components()},
    }


if __name__ == "__main__":
    json.dump({"components": {"schemas": components()}}, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
