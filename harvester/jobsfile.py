"""Jobs files (JSON Lines): one job per line, validated before anything is stored.

A line either submits a new job (``provider``, ``reference_id``, ``payload``) or tracks an
existing one (``provider``, ``job_id``, optionally ``reference_id``). Every problem is
reported as ``file:line: reason``; a file with any bad line adds nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from harvester.config import Config
from harvester.errors import InvalidPayload, JobsFileError, JobsLineError
from harvester.jobs import job_key
from harvester.providers import make_provider
from harvester.providers.base import Provider
from harvester.store.base import NewJob

MAX_LINE_BYTES = 4 << 20
MAX_ID_CHARS = 512
MAX_ERRORS_SHOWN = 20
_KEYS = {"provider", "reference_id", "job_id", "payload"}


#: what the store's serialiser (orjson) can nest; Python's parser stops at about 1,000
MAX_DEPTH = 254
TOO_DEEP = f"nested too deeply (a line may nest at most {MAX_DEPTH} arrays and objects)"


def _shown(text: str, limit: int = 40) -> str:
    """``text`` for an error message: a 20,000-character key is not echoed back whole."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JobsLineError(f"key {_shown(key)!r} appears twice")
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise JobsLineError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: json would make it inf, storing it null
        raise JobsLineError(f"number {_shown(text)} is out of range for a JSON number")
    return value


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**64:  # what the store (orjson) can keep
        raise JobsLineError(f"integer {_shown(text)} is beyond the 64-bit range")
    return value


def parse_jobs_text(
    text: bytes, *, source: str, config: Config, validators: Mapping[str, Provider] | None = None
) -> list[NewJob]:
    validators = dict(validators or {})
    jobs: dict[tuple[str, str], NewJob] = {}
    errors: list[str] = []
    for number, raw in enumerate(text.split(b"\n"), start=1):
        where = f"{source}:{number}"
        line = raw.strip()
        if not line:
            continue
        try:
            job = _parse_line(line, where, config, validators)
        except JobsLineError as exc:
            errors.append(f"{where}: {exc}")
            continue
        known = jobs.get((job.provider, job.key))
        if known is not None and not same_job(known, job):
            errors.append(
                f"{where}: job key {job.provider}/{job.key} was already used by {known.source}"
                " with different content"
            )
            continue
        jobs.setdefault((job.provider, job.key), job)
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = len(errors) - len(shown)
        tail = f"\n... and {more} more bad lines" if more else ""
        raise JobsFileError("\n".join(shown) + tail + f"\nnothing from {source} was added")
    return list(jobs.values())


def same_job(a: NewJob, b: NewJob) -> bool:
    """Two lines describe the same job (wherever they came from)."""
    return (a.reference_id, a.remote_id, a.payload) == (b.reference_id, b.remote_id, b.payload)


def _parse_line(line: bytes, where: str, config: Config, validators: dict[str, Provider]) -> NewJob:
    if len(line) > MAX_LINE_BYTES:
        raise JobsLineError(f"line is {len(line)} bytes, more than the {MAX_LINE_BYTES} allowed")
    try:
        obj = json.loads(
            line,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_float=_finite_float,
            parse_int=_int64,
        )
    except JobsLineError:
        raise
    except RecursionError:
        # no cause: a RecursionError's traceback is a thousand frames of the parser
        raise JobsLineError(f"not valid JSON here: {TOO_DEEP}") from None
    except ValueError as exc:
        raise JobsLineError(f"not valid JSON: {exc}") from exc
    try:
        orjson.dumps(obj)  # what the store will do: refuse now what it could not keep
    except TypeError as exc:  # orjson.JSONEncodeError
        raise JobsLineError(_unstorable(str(exc))) from exc
    if not isinstance(obj, dict):
        raise JobsLineError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise JobsLineError(
            f"unknown key {_shown(unknown[0])!r} (a line takes {', '.join(sorted(_KEYS))})"
        )
    provider = obj.get("provider")
    if not isinstance(provider, str) or not provider:
        raise JobsLineError("'provider' is missing or not a string")
    cfg = config.providers.get(provider)
    if cfg is None:
        configured = ", ".join(sorted(config.providers)) or "none"
        raise JobsLineError(
            f"provider {provider!r} is not configured in {config.source} (configured: {configured})"
        )
    reference_id = _identifier(obj, "reference_id")
    job_id = obj.get("job_id")
    if isinstance(job_id, int) and not isinstance(job_id, bool) and job_id >= 0:
        job_id = str(job_id)
    if job_id is not None:
        job_id = _identifier({"job_id": job_id}, "job_id")
    payload = obj.get("payload")
    if isinstance(payload, dict) and "reference_id" in payload and job_id is None:
        # A create body copied whole from the provider's docs carries its reference_id.
        inner = _identifier(payload, "reference_id", where="payload.reference_id")
        if reference_id is None:
            reference_id = inner
        elif inner != reference_id:
            raise JobsLineError(
                f"payload.reference_id {inner!r} differs from the line's reference_id"
                f" {reference_id!r}; give one, or the same in both"
            )
    if job_id is not None:
        if payload is not None:
            raise JobsLineError("a line with job_id tracks an existing job and takes no payload")
    else:
        if reference_id is None:
            raise JobsLineError(
                "a new job needs 'reference_id' (the idempotency key) and 'payload'"
            )
        if payload is None:
            raise JobsLineError("a new job needs a 'payload' (or a 'job_id' to track one)")
        validator = validators.get(provider)
        if validator is None:
            validator = validators[provider] = make_provider(cfg)
        try:
            validator.validate_payload(payload)
        except InvalidPayload as exc:
            raise JobsLineError(exc.message) from exc
    key = job_key(reference_id if reference_id is not None else str(job_id))
    return NewJob(
        provider=provider,
        key=key,
        reference_id=reference_id,
        remote_id=job_id,
        payload=payload,
        source=where,
    )


def _unstorable(reason: str) -> str:
    if "Recursion" in reason:
        return TOO_DEEP
    if "surrogates" in reason:
        return "a string holds a lone surrogate (an unpaired \\ud800-\\udfff escape)"
    return f"cannot be stored as JSON: {reason}"


def _identifier(obj: Mapping[str, Any], name: str, *, where: str | None = None) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    what = repr(name) if where is None else where
    if not isinstance(value, str) or not value.strip():
        raise JobsLineError(f"{what} must be a non-empty string")
    if value != value.strip():
        raise JobsLineError(f"{what} has leading or trailing whitespace")
    if len(value) > MAX_ID_CHARS:
        raise JobsLineError(f"{what} is longer than {MAX_ID_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise JobsLineError(f"{what} contains control characters")
    return value


def read_jobs_files(paths: list[Path], config: Config) -> list[NewJob]:
    """Parse every file before anything is stored: one bad file stops them all."""
    validators: dict[str, Provider] = {}
    jobs: list[NewJob] = []
    seen: dict[tuple[str, str], NewJob] = {}
    for path in paths:
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise JobsFileError(f"{path}: cannot read jobs file: {exc.strerror}") from exc
        for job in parse_jobs_text(text, source=str(path), config=config, validators=validators):
            known = seen.get((job.provider, job.key))
            if known is not None:
                if not same_job(known, job):
                    raise JobsFileError(
                        f"{job.source}: job key {job.provider}/{job.key} was already used by"
                        f" {known.source} with different content\nnothing was added"
                    )
                continue
            seen[(job.provider, job.key)] = job
            jobs.append(job)
    return jobs
