"""``harvester cancel``, ``retry`` and ``jobs``: the command-line side of harvester.control.

Every bad input (an unknown provider, state or key; a retry the job's state does not allow)
is found before anything is changed, reported as one line per problem, exit 2. A cancel the
provider refuses leaves that job as it was and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import orjson

from harvester.api import job_document
from harvester.clock import SystemClock
from harvester.config import Config
from harvester.errors import ControlError
from harvester.jobs import Job, JobState
from harvester.lifecycle import Exit
from harvester.store.base import SharedStore, Store

#: jobs read per page by ``jobs`` and by ``--state`` selections
PAGE = 1000
_MAX_PROBLEMS = 20


def add_parsers(sub: Any, add_config: Any) -> None:
    for name, helptext in (
        ("cancel", "cancel jobs: at the provider where its API can, in the store always"),
        ("retry", "put jobs that ended error (or, with --resubmit, failed/cancelled) back to work"),
    ):
        p = sub.add_parser(name, help=helptext)
        add_config(p)
        p.add_argument("keys", nargs="*", metavar="KEY", help="job keys (or PROVIDER/KEY)")
        p.add_argument("--provider", help="the provider of the KEYs / of the --state selection")
        p.add_argument("--state", action="append", help="every job in this state (repeatable)")
        p.add_argument("--json", action="store_true", help="print the outcome as JSON")
        if name == "retry":
            p.add_argument(
                "--resubmit",
                action="store_true",
                help="submit failed/cancelled remote jobs again, as a new remote attempt",
            )
    p = sub.add_parser("jobs", help="list jobs: key, remote id, state, reason, times, output")
    add_config(p)
    p.add_argument("--provider", help="only this provider's jobs")
    p.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    p.add_argument("--since", help="only jobs changed since (ISO-8601 or unix seconds)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (JSON Lines)")


def _states(config: Config, args: argparse.Namespace) -> list[JobState] | None:
    if args.provider is not None and args.provider not in config.providers:
        known = ", ".join(sorted(config.providers)) or "none"
        raise ControlError(f"--provider {args.provider!r} is not configured (configured: {known})")
    if not args.state:
        return None
    states = []
    for s in args.state:
        try:
            states.append(JobState(s))
        except ValueError as exc:
            known = ", ".join(x.value for x in JobState)
            raise ControlError(f"--state {s!r} is not a job state ({known})") from exc
    return states


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise ControlError(
            f"--since {text!r} is neither ISO-8601 (2025-01-31T12:00:00Z) nor unix seconds"
        ) from exc


async def walk(
    store: Store,
    *,
    provider: str | None,
    states: Sequence[JobState] | None,
    since: float | None = None,
) -> AsyncIterator[Job]:
    """Every matching job, a page at a time (never the whole table in memory)."""
    after = 0
    while True:
        page = await store.page(
            provider=provider, states=states, since=since, after=after, limit=PAGE
        )
        for job in page.jobs:
            yield job
        if page.next_after is None:
            return
        after = page.next_after


async def select(config: Config, store: Store, args: argparse.Namespace) -> list[Job]:
    """The jobs named by KEYs and/or --state; ControlError listing every unknown key."""
    states = _states(config, args)
    if not args.keys and states is None:
        raise ControlError("name the jobs: KEY ... and/or --state STATE")
    jobs: dict[tuple[str, str], Job] = {}
    problems: list[str] = []
    providers = [args.provider] if args.provider else sorted(config.providers)
    for key in args.keys:
        provider, sep, rest = key.partition("/")
        candidates = [provider] if sep and provider in config.providers else providers
        name = rest if sep and provider in config.providers else key
        found = [j for p in candidates if (j := await store.get(p, name)) is not None]
        if len(found) == 1:
            jobs[found[0].provider, found[0].key] = found[0]
        elif not found:
            problems.append(
                f"{key}: no such job" + (f" of {args.provider}" if args.provider else "")
            )
        else:
            where = ", ".join(f"{j.provider}/{j.key}" for j in found)
            problems.append(f"{key}: more than one provider has it ({where}); use --provider")
    if problems:
        raise ControlError("; ".join(problems[:_MAX_PROBLEMS]))
    if states is not None:
        async for job in walk(store, provider=args.provider, states=states):
            jobs.setdefault((job.provider, job.key), job)
    return list(jobs.values())


def _print_outcome(
    config: Config,
    args: argparse.Namespace,
    done: list[Job],
    refused: list[str],
    requested: Sequence[Job] = (),
) -> int:
    if args.json:
        doc = {
            "done": [job_document(j, config) for j in done],
            "refused": refused,
        }
        if requested:
            doc["requested"] = [job_document(j, config) for j in requested]
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        verb = "cancelled" if args.command == "cancel" else "back to work"
        for job in done:
            print(
                f"{job.label}: {verb} ({job.state.value}){': ' + job.reason if job.reason else ''}"
            )
        for job in requested:
            print(f"{job.label}: cancel requested (the replica holding it carries it out)")
        for line in refused:
            print(f"harvester: {line}", file=sys.stderr)
    return Exit.FAILED if refused else Exit.OK


async def cancel(config: Config, store: Store, args: argparse.Namespace) -> int:
    from harvester.control import take_or_request
    from harvester.engine import Engine, offline
    from harvester.engine.cancel import cancel_now

    jobs = await select(config, store, args)
    names = sorted({j.provider for j in jobs})
    engine = Engine(config, store, providers=names, burst=True)
    engine.replica = None  # no work loop here: the jobs it takes are served below
    submitting = sorted({j.provider for j in jobs if j.state == JobState.SUBMITTING})
    done: list[Job] = []
    requested: list[Job] = []
    refused: list[str] = []
    async with _taking(config, store) as shared, offline(engine, submitting):
        for job in jobs:
            # With replicas: a job another one holds is asked of it, one nobody holds is
            # taken under the claim's lease rules and cancelled here.
            answer = None if shared is None else await take_or_request(engine, shared, job)
            req = answer or await cancel_now(engine, job)
            if req.requested and req.job is not None:
                requested.append(req.job)
            elif req.job is not None:
                done.append(req.job)
            else:
                refused.append(req.error or f"{job.label}: not cancelled")
    return _print_outcome(config, args, done, refused, requested)


@asynccontextmanager
async def _taking(config: Config, store: Store) -> AsyncIterator[SharedStore | None]:
    """A shared store joined as a short-lived replica, so the jobs a cancel takes are leased
    (no replica claims them meanwhile) and given back on the way out."""
    if not isinstance(store, SharedStore):
        yield None
        return
    from harvester.replica import replica_id

    await store.join(f"cancel-{replica_id()}", lease_s=config.store.lease_s)
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.leave()


async def retry(
    config: Config, store: Store, args: argparse.Namespace, *, check_only: bool = False
) -> int:
    from harvester.control import retry_job, retry_problem

    jobs = await select(config, store, args)
    problems = [p for j in jobs if (p := await retry_problem(store, j, resubmit=args.resubmit))]
    if problems:
        raise ControlError("; ".join(problems[:_MAX_PROBLEMS]) + "; nothing was changed")
    if check_only:
        return Exit.OK
    now = SystemClock().wall()
    done = [await retry_job(store, j, resubmit=args.resubmit, now=now) for j in jobs]
    return _print_outcome(config, args, done, [])


async def list_jobs(config: Config, store: Store, args: argparse.Namespace) -> int:
    states = _states(config, args)
    since = _since(args.since)
    out = sys.stdout
    if not args.json:
        out.write("PROVIDER\tKEY\tREMOTE ID\tSTATE\tREASON\tCREATED\tUPDATED\tOUTPUT\n")
    async for job in walk(store, provider=args.provider, states=states, since=since):
        doc = job_document(job, config)
        if args.json:
            out.write(orjson.dumps(doc).decode() + "\n")
        else:
            cells = (
                job.provider,
                job.key,
                job.remote_id or "-",
                job.state.value,
                job.reason or "-",
                doc["created_at"],
                doc["updated_at"],
                doc["output"] or "-",
            )
            out.write("\t".join(str(c).replace("\t", " ") for c in cells) + "\n")
    return Exit.OK


async def _precheck(config: Config, store: Store, args: argparse.Namespace) -> None:
    if args.command == "retry":
        await retry(config, store, args, check_only=True)
    else:
        await select(config, store, args)


async def run(config: Config, args: argparse.Namespace) -> int:
    """One of the three commands; ControlError is bad input (exit 2, nothing changed)."""
    from harvester.lifecycle import opened
    from harvester.store.lock import engine_lock

    try:
        if args.command == "jobs":
            _states(config, args)
            _since(args.since)
        async with opened(config, read_only=args.command == "jobs") as store:
            if args.command == "jobs":
                return await list_jobs(config, store, args)
            # Bad input is found before the lock, whose file records its holder: an unknown
            # key changes nothing, not even that file. Under the lock it is checked again.
            await _precheck(config, store, args)
            # A running engine works these jobs: it alone may cancel them (the daemon's
            # DELETE /jobs/...) and it would not see a retried job before its restart.
            with engine_lock(config.store, " ".join(["harvester", *sys.argv[1:]])):
                if args.command == "cancel":
                    return await cancel(config, store, args)
                return await retry(config, store, args)
    except ControlError as exc:
        print(f"harvester: {exc}", file=sys.stderr)
        return Exit.USAGE
