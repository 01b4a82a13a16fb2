"""Bentley Reality Analysis v2 job creations, checked against Bentley's published schemas.

``bentley_reality_analysis_v2.json`` holds the JSON Schemas of Bentley's v2 "Get job"
reference verbatim (``tests/contracts`` proves it equals the seed page). A create body
(``POST /reality-analysis/jobs``) is that Job schema's client-set properties — ``name``,
``type``, ``iTwinId``, ``specifications`` — where ``specifications`` is the type's own:
``inputs`` an object of the type's input names -> reality-data ids, ``options`` the type's
options (only for types that have any), and ``outputs`` the *list* of output names to produce
(the jobs-create reference); the answer then maps each name to a reality-data id. Every object
is ``additionalProperties: false``.

Everything below is read from the schemas, so a new job type, input or option in Bentley's
page is one refreshed file, not an edit here. Stricter than the schema on purpose: a job needs
at least one input and one output, and an input id is a non-empty string.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from harvester.errors import CreateProblem

FILE = "bentley_reality_analysis_v2.json"
_REF = "#/components/schemas/"
SCHEMAS: dict[str, Any] = json.loads(resources.files(__package__).joinpath(FILE).read_bytes())[
    "components"
]["schemas"]
JOB_TYPES: tuple[str, ...] = tuple(SCHEMAS["JobTypes"]["enum"])
JOB_STATES: tuple[str, ...] = tuple(SCHEMAS["JobState"]["enum"])
#: the Job schema's properties a client sets; the others (id, state, ...) are the service's
CREATE_KEYS: tuple[str, ...] = ("name", "type", "iTwinId", "specifications")
_NAME = SCHEMAS["Job"]["properties"]["name"]
NAME_MIN: int = _NAME["minLength"]
NAME_MAX: int = _NAME["maxLength"]
NAME_PATTERN = re.compile(_NAME["pattern"])
_SCALARS = ("string", "number", "integer", "boolean")


def _resolve(node: Mapping[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return dict(SCHEMAS[ref[len(_REF) :]]) if isinstance(ref, str) else dict(node)


def _properties(schema: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    props = {name: dict(p) for name, p in schema.get("properties", {}).items()}
    for name, prop in props.items():
        if prop.get("type") not in _SCALARS:
            # The checker below knows scalars only: a new kind of property must be taught here.
            raise NotImplementedError(f"Bentley schema property {name!r} is not a scalar")
    return props


@dataclass(frozen=True, slots=True)
class TypeSpec:
    """What one job type's create ``specifications`` may hold."""

    name: str
    keys: tuple[str, ...]  #: allowed keys of ``specifications``
    required: tuple[str, ...]
    inputs: Mapping[str, Mapping[str, Any]]  #: input name -> its property schema
    required_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    required_outputs: tuple[str, ...]
    #: outputs answered with a path in the job's bucket (``bkt:...``), not a reality data id
    bucket_outputs: tuple[str, ...]
    options: Mapping[str, Mapping[str, Any]] | None  #: None: the type takes no options

    def output(self, name: str) -> str | None:
        """The schema's spelling of an output name. Bentley's own jobs-create example writes
        ``"Objects2D"`` for the ``objects2D`` output, so case alone does not make it wrong."""
        folded = {o.casefold(): o for o in self.outputs}
        return folded.get(name.casefold())


def _type_spec(job_type: str) -> TypeSpec:
    specs = SCHEMAS[f"{job_type}Specifications"]
    props = specs["properties"]
    inputs = _resolve(props["inputs"])
    outputs = _resolve(props["outputs"])
    names = tuple(outputs.get("properties", {}))
    if len({n.casefold() for n in names}) != len(names):
        raise ValueError(f"{job_type} has outputs that differ only in case")
    return TypeSpec(
        name=job_type,
        keys=tuple(props),
        required=tuple(specs.get("required", ())),
        inputs=_properties(inputs),
        required_inputs=tuple(inputs.get("required", ())),
        outputs=names,
        required_outputs=tuple(outputs.get("required", ())),
        bucket_outputs=tuple(
            n for n, p in outputs.get("properties", {}).items() if "bkt:" in p.get("pattern", "")
        ),
        options=_properties(_resolve(props["options"])) if "options" in props else None,
    )


TYPES: dict[str, TypeSpec] = {t: _type_spec(t) for t in JOB_TYPES}


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid job name, or None."""
    if not isinstance(name, str):
        return "must be a string"
    if not NAME_MIN <= len(name) <= NAME_MAX:
        return f"must be {NAME_MIN} to {NAME_MAX} characters long, not {len(name)}"
    if not NAME_PATTERN.match(name):
        return 'must not contain control characters or any of " < > | : * ? \\ /'
    return None


def _listing(names: tuple[str, ...] | list[str]) -> str:
    return ", ".join(names) if names else "none"


def _value_problem(schema: Mapping[str, Any], value: object) -> str | None:
    kind = schema.get("type")
    if kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "integer":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    elif kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)  # type: ignore[arg-type]
    else:
        ok = isinstance(value, str)
        pattern = schema.get("pattern")
        if ok and pattern and not re.search(pattern, str(value)):
            return f"must be a string matching {pattern}, got {str(value)[:60]!r}"
    article = "an" if str(kind)[:1] in "aeiou" else "a"
    return None if ok else f"must be {article} {kind}, got {json.dumps(value)[:60]}"


def check_create(body: object) -> dict[str, Any]:
    """The body as it is to be sent (output names in the schema's spelling).

    Raises ``CreateProblem`` naming the first property that breaks Bentley's schema."""
    if not isinstance(body, Mapping):
        raise CreateProblem("", "the job must be a JSON object {type, iTwinId, specifications}")
    for key in body:
        if key not in CREATE_KEYS:
            raise CreateProblem(
                str(key), f"is not a property of a v2 job creation ({_listing(CREATE_KEYS)})"
            )
    job_type = body.get("type")
    if job_type not in TYPES:
        raise CreateProblem(
            "type", f"must be one of {_listing(JOB_TYPES)}, got {json.dumps(job_type)[:60]}"
        )
    twin = body.get("iTwinId")
    if not isinstance(twin, str) or not twin:
        raise CreateProblem("iTwinId", "must be a non-empty string (the iTwin of the job)")
    if "name" in body and (problem := name_problem(body["name"])) is not None:
        raise CreateProblem("name", problem)
    spec = TYPES[str(job_type)]
    specs = body.get("specifications")
    if not isinstance(specs, Mapping):
        raise CreateProblem("specifications", f"must be an object {{{_listing(spec.keys)}}}")
    for key in specs:
        if key not in spec.keys:
            extra = f"; {spec.name} takes no options" if key == "options" else ""
            raise CreateProblem(
                f"specifications.{key}",
                f"is not a property of {spec.name} specifications ({_listing(spec.keys)}){extra}",
            )
    for key in spec.required:
        if key not in specs:
            raise CreateProblem(f"specifications.{key}", f"is required for {spec.name}")
    out = dict(body)
    out["specifications"] = dict(specs)
    _check_inputs(spec, specs["inputs"])
    out["specifications"]["outputs"] = _check_outputs(spec, specs["outputs"])
    if "options" in specs:
        _check_options(spec, specs["options"])
    return out


def _check_inputs(spec: TypeSpec, inputs: object) -> None:
    where = "specifications.inputs"
    names = tuple(spec.inputs)
    plain = [n for n in names if "pattern" not in spec.inputs[n]]
    example = (list(spec.required_inputs) or plain or list(names))[0]
    shape = (
        f"must be an object mapping {spec.name} input names to reality-data ids"
        f' ({_listing(names)}), e.g. {{"{example}": "<reality data id>"}}'
    )
    if isinstance(inputs, list):
        raise CreateProblem(where, f"{shape}; a list of inputs is the v1 API's form")
    if not isinstance(inputs, Mapping):
        raise CreateProblem(where, shape)
    if not inputs:
        raise CreateProblem(where, f"names no input: {shape}")
    for name, value in inputs.items():
        if name not in spec.inputs:
            raise CreateProblem(
                f"{where}.{name}", f"is not an input of {spec.name} (valid: {_listing(names)})"
            )
        if value == "":
            raise CreateProblem(f"{where}.{name}", "must be a non-empty reality data id")
        if (problem := _value_problem(spec.inputs[name], value)) is not None:
            raise CreateProblem(f"{where}.{name}", problem)
    missing = [n for n in spec.required_inputs if n not in inputs]
    if missing:
        raise CreateProblem(where, f"needs {spec.name}'s required input(s) {_listing(missing)}")


def _check_outputs(spec: TypeSpec, outputs: object) -> list[str]:
    where = "specifications.outputs"
    shape = f"must be a list of {spec.name} output names ({_listing(spec.outputs)})"
    if isinstance(outputs, Mapping):
        raise CreateProblem(where, f"{shape}; an object of name -> id is the answer's form")
    if not isinstance(outputs, list) or not outputs:
        raise CreateProblem(where, shape)
    canonical: list[str] = []
    for i, name in enumerate(outputs):
        found = spec.output(name) if isinstance(name, str) else None
        if found is None:
            raise CreateProblem(
                f"{where}[{i}]",
                f"{json.dumps(name)[:60]} is not an output of {spec.name}"
                f" (valid: {_listing(spec.outputs)})",
            )
        if found in canonical:
            raise CreateProblem(f"{where}[{i}]", f"{found!r} is listed twice")
        canonical.append(found)
    missing = [n for n in spec.required_outputs if n not in canonical]
    if missing:
        raise CreateProblem(where, f"must include {_listing(missing)} (required for {spec.name})")
    return canonical


def _check_options(spec: TypeSpec, options: object) -> None:
    where = "specifications.options"
    allowed = spec.options or {}
    if not isinstance(options, Mapping):
        raise CreateProblem(where, f"must be an object ({_listing(tuple(allowed))})")
    for name, value in options.items():
        if name not in allowed:
            raise CreateProblem(
                f"{where}.{name}",
                f"is not an option of {spec.name} (valid: {_listing(tuple(allowed))})",
            )
        if (problem := _value_problem(allowed[name], value)) is not None:
            raise CreateProblem(f"{where}.{name}", problem)
