"""Command line: argument parsing and the commands; the work itself lives elsewhere.

Exit codes and signals: ``harvester.lifecycle`` (one table for every command). Each command
opens its store once (``lifecycle.opened``), whatever it does with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio
import orjson

from harvester import __version__, tracing
from harvester.config import Config, config_path, load_config
from harvester.errors import FatalError, HarvesterError, OutputError
from harvester.jobs import UNSUCCESSFUL, JobState
from harvester.lifecycle import Exit, Shutdown, opened
from harvester.logs import configure, get_logger
from harvester.store.base import NewJob
from harvester.store.lock import engine_lock

log = get_logger("harvester.cli")


#: commands that send nothing to a provider: they need neither its address nor its secrets
OFFLINE = frozenset({"status", "submit", "copy-store", "bind-output"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harvester",
        description="Submit, track and harvest jobs from annotation/ML providers.",
    )
    parser.add_argument("--version", action="version", version=f"harvester {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="config file (default: $HARVESTER_CONFIG)")

    p = sub.add_parser("harvest", help="add jobs, then run until every job is terminal")
    add_config(p)
    p.add_argument("jobs", nargs="*", type=Path, help="jobs files (JSON Lines)")
    p.add_argument("--provider", action="append", help="only work on this provider (repeatable)")
    p.add_argument("--timeout", type=float, help="stop after this many seconds (exit 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")

    p = sub.add_parser("submit", help="add jobs to the store only (no network)")
    add_config(p)
    p.add_argument("jobs", nargs="+", type=Path, help="jobs files (JSON Lines)")

    p = sub.add_parser("status", help="jobs by provider and state, and failures")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument(
        "--check",
        action="store_true",
        help=(
            "also check the store's integrity and every harvested job's files against its"
            " MANIFEST.json (exit 1 if a problem is found)"
        ),
    )

    p = sub.add_parser("run", help="the long-running daemon")
    add_config(p)

    p = sub.add_parser(
        "copy-store",
        help="copy every job of another config's store into this config's (empty) store",
        description=(
            "Copy the job store of --from-config (e.g. the sqlite store of a single process)"
            " into the store of -c (e.g. PostgreSQL for several replicas), exactly: states,"
            " remote ids, attempts and payloads. Stop every harvester using the old store"
            " first; afterwards the old store refuses to be opened again."
        ),
    )
    add_config(p)
    p.add_argument(
        "--from-config", required=True, type=Path, help="the config whose store is copied"
    )

    p = sub.add_parser(
        "bind-output",
        help="make output.dir belong to this config's store (after replacing the store on purpose)",
        description=(
            "harvest and run refuse a job store that is not the one output.dir was harvested"
            " with (a deleted, emptied or replaced store would submit every job again). After"
            " replacing the store on purpose, this records the configured store as the owner"
            " of output.dir. Jobs the new store does not know will be submitted again."
        ),
    )
    add_config(p)

    from harvester.cli_control import add_parsers

    add_parsers(sub, add_config)

    p = sub.add_parser("emulator", help="serve the built-in emulator of the provider APIs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--storage-port", type=int, default=0, help="storage host port (0: free)")
    p.add_argument("--scenario", help="scenario file (TOML); see configs/scenarios/")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "emulator":
        from harvester.emulator.server import main as emulator_main

        code: int = emulator_main(args.host, args.port, args.scenario, args.storage_port)
        return code
    try:
        config = load_config(config_path(args.config), offline=args.command in OFFLINE)
    except HarvesterError as exc:
        print(f"harvester: {exc}", file=sys.stderr)
        return Exit.USAGE
    tracing_warning = tracing.setup_from_env()  # first: log lines then carry trace ids
    configure(config.log.level, config.log.format)
    if tracing_warning is not None:
        log.warning(tracing_warning)
    try:
        if args.command == "harvest":
            return anyio.run(_harvest, config, args)
        if args.command == "submit":
            return anyio.run(_submit, config, args)
        if args.command == "status":
            return anyio.run(_status, config, args)
        if args.command == "copy-store":
            return anyio.run(_copy_store, config, args)
        if args.command == "bind-output":
            return anyio.run(_bind_output, config, args)
        if args.command in ("cancel", "retry", "jobs"):
            from harvester.cli_control import run as control_run

            return anyio.run(control_run, config, args)
        if args.command == "run":
            from harvester.daemon import serve

            return anyio.run(serve, config)
    except (FatalError, OutputError) as exc:
        print(f"harvester: {exc}", file=sys.stderr)
        return Exit.USAGE
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    finally:
        tracing.shutdown()  # flushes the spans still batched
    parser.error(f"unknown command {args.command}")


async def _submit(config: Config, args: argparse.Namespace) -> int:
    from harvester.clock import SystemClock
    from harvester.jobsfile import read_jobs_files

    jobs = read_jobs_files(args.jobs, config)
    async with opened(config) as store:
        result = await store.add_jobs(jobs, now=SystemClock().wall())
    print(f"added {len(result.added)} jobs ({len(result.duplicates)} already in the store)")
    return Exit.OK


async def _copy_store(config: Config, args: argparse.Namespace) -> int:
    from harvester.store.copy import copy_store

    old = load_config(args.from_config, offline=True)
    same = (
        old.store.path == config.store.path
        if old.store.path is not None
        else old.store.url == config.store.url
    )
    if same:
        print(
            f"harvester: {args.from_config} and {config.source} name the same store",
            file=sys.stderr,
        )
        return Exit.USAGE
    # Nobody may harvest from the old store while it is copied (nor into a sqlite target).
    with engine_lock(old.store), engine_lock(config.store):
        async with opened(old) as source, opened(config) as target:
            result = await copy_store(source, target, target_name=config.store.url)
    states = ", ".join(
        f"{provider} {state.value}: {n}" for (provider, state), n in sorted(result.by_state.items())
    )
    print(
        f"copied {result.jobs} jobs ({states or 'none'}) and {result.meta} meta values"
        f" from {old.store.url} to {config.store.url}; the old store is marked as moved"
    )
    return Exit.OK


async def _bind_output(config: Config, args: argparse.Namespace) -> int:
    from harvester.objstore import output_place
    from harvester.store.binding import rebind_output, store_name

    place = output_place(config.output)
    with engine_lock(config.store):
        async with opened(config) as store:
            before, now = await rebind_output(store, place, store_name(config.store))
    was = f"job store {before}" if before else "no store"
    print(f"{place} now belongs to job store {now} (it belonged to {was})")
    return Exit.OK


async def _status(config: Config, args: argparse.Namespace) -> int:
    from harvester.objstore import output_place
    from harvester.verify import Report, verify_outputs

    report = Report()
    async with opened(config, read_only=True) as store:
        counts = await store.counts()
        failures = await store.jobs(states=sorted(UNSUCCESSFUL))
        unknown = await store.unknown_statuses()
        if args.check:
            from harvester.store.binding import binding_problem, store_name

            place = output_place(config.output)
            bound = await binding_problem(store, place, store_name(config.store))
            problems = ([bound] if bound else []) + await store.check()
            everything = await store.jobs()
            report = await anyio.to_thread.run_sync(verify_outputs, place, everything)
            problems += report.problems
        else:
            problems = []
    from harvester.summary import render_status, status_json

    if args.json:
        doc = status_json(counts, failures, unknown=unknown)
        if args.check:
            doc["check"] = problems
            doc["checked"] = report.as_json()
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_status(counts, failures, unknown=unknown)
        if args.check:
            for p in problems:
                print(f"problem: {p}")
            checked = (
                f"the store and {report.jobs} harvested jobs ({report.files} files,"
                f" {report.bytes} bytes checked against their manifests)"
            )
            print(
                f"check: {len(problems)} problems in {checked}"
                if problems
                else f"check: no problems found in {checked}"
            )
    return Exit.FAILED if problems else Exit.OK


async def _harvest(config: Config, args: argparse.Namespace) -> int:
    providers = args.provider or None
    if providers:
        unknown = [p for p in providers if p not in config.providers]
        if unknown:
            print(
                f"harvester: --provider {unknown[0]} is not configured in {config.source}",
                file=sys.stderr,
            )
            return Exit.USAGE
    config.check_secrets()
    from harvester.jobsfile import read_jobs_files
    from harvester.objstore import prove_output

    # Read first: a bad jobs file changes nothing, not even the lock file.
    jobs = read_jobs_files(args.jobs, config) if args.jobs else []
    # Before the jobs are added or anything is sent: an unwritable output is found now, not
    # after creates went out.
    await anyio.to_thread.run_sync(prove_output, config.output)
    with engine_lock(config.store):
        return await _harvest_locked(config, args, providers, jobs)


async def _harvest_locked(
    config: Config, args: argparse.Namespace, providers: list[str] | None, jobs: list[NewJob]
) -> int:
    from harvester.clock import SystemClock
    from harvester.engine import Engine
    from harvester.objstore import output_place
    from harvester.store.binding import bind_output, store_name
    from harvester.summary import Progress, render_run, render_status, status_json

    async with opened(config) as store:
        # Before anything is added or sent: a store that is not the output's is refused.
        await bind_output(store, output_place(config.output), store_name(config.store))
        if jobs:
            added = await store.add_jobs(jobs, now=SystemClock().wall())
            log.info("jobs added", added=len(added.added), already_present=len(added.duplicates))
        selected = providers or sorted(config.providers)
        counts = await store.counts()
        stray = sorted(
            {
                p
                for (p, s), n in counts.items()
                if n
                and s not in UNSUCCESSFUL
                and s != JobState.HARVESTED
                and p not in config.providers
            }
        )
        if stray:
            raise FatalError(
                f"the store has unfinished {', '.join(stray)} jobs but {config.source} does not"
                " configure that provider"
            )
        show = not args.no_progress and not args.json and sys.stderr.isatty()
        progress = Progress(counts, selected, enabled=show)
        shutdown = Shutdown()
        stop = shutdown.stop
        fatal: list[FatalError | OutputError] = []
        started = anyio.current_time()
        engine = Engine(config, store, providers=selected, burst=True, on_change=progress.update)
        with progress:
            async with anyio.create_task_group() as tg:
                tg.start_soon(shutdown.watch, tg.cancel_scope, name="signals")

                async def work() -> None:
                    try:
                        await engine.run(stop=stop)
                    except (FatalError, OutputError) as exc:
                        # Out of the task group it would be an ExceptionGroup (a traceback
                        # and exit 1); re-raised below, it is one line and exit 2.
                        fatal.append(exc)
                    tg.cancel_scope.cancel()

                tg.start_soon(work, name="engine")
                if args.timeout is not None:
                    with engine.clock.move_on_after(args.timeout):
                        await engine.done.wait()
                    stop.set()
        if fatal:
            raise fatal[0]
        interrupted = stop.is_set() and bool(engine.remaining)
        run = {"elapsed_s": anyio.current_time() - started, **engine.metrics.totals()}
        counts = await store.counts()
        failures = [
            j for j in await store.jobs(states=sorted(UNSUCCESSFUL)) if j.provider in selected
        ]
    if args.json:
        doc = status_json(counts, failures, providers=selected)
        doc["interrupted"] = interrupted
        doc["run"] = run
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_status(counts, failures, providers=selected)
        render_run(run)
    return _exit_code(counts, selected, interrupted)


def _exit_code(
    counts: dict[tuple[str, JobState], int], providers: Sequence[str], interrupted: bool
) -> int:
    left = sum(
        n
        for (p, s), n in counts.items()
        if p in providers and s not in UNSUCCESSFUL and s != JobState.HARVESTED
    )
    if interrupted or left:
        return Exit.INTERRUPTED
    bad = sum(n for (p, s), n in counts.items() if p in providers and s in UNSUCCESSFUL)
    return Exit.FAILED if bad else Exit.OK


if __name__ == "__main__":
    sys.exit(main())
