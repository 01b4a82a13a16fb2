"""Run every benchmark against the emulator on loopback; rewrite BENCHMARKS.md and results.json.

    .venv/bin/python bench/run.py                 # everything (what `make bench` runs)
    .venv/bin/python bench/run.py --only polls    # one benchmark (repeatable)
    .venv/bin/python bench/run.py --quick         # small sizes: a smoke run

Each benchmark is a script (``bench/bench_<name>.py --json OUT [--quick]``) run in its own
process, so one's memory and CPU never show up in another's figures; the scripts start the
emulator in yet another process. A full run rewrites ``BENCHMARKS.md`` and
``bench/results.json``; a partial or quick run only prints its table unless ``--write``.
Every figure is computed by the run; a benchmark that fails is reported as failed, with its
error, not left out.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from bench_common import child_env, fmt_value  # noqa: E402


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    title: str
    timeout_s: float
    #: what makes the script small for --quick
    quick_args: tuple[str, ...] = ("--quick",)


BENCHES = (
    Bench(
        "decode",
        "bench_decode.py",
        "Decoder throughput and streaming memory",
        900,
        ("--points", "200000", "--runs", "2", "--stream-mb", "20"),
    ),
    Bench("memory", "bench_memory.py", "Memory: 100,000 tracked jobs in one process", 600),
    Bench("polls", "bench_polls.py", "Sustained polls per second", 600),
    Bench("harvest", "bench_harvest.py", "Harvesting 1,000 jobs vs the SDK way", 600),
    Bench("store", "bench_store.py", "Store throughput", 300),
    Bench("limiter", "bench_limiter.py", "Limiter accuracy", 300),
    Bench("objstore", "bench_objstore.py", "Harvesting to object storage vs local disk", 900),
    Bench("offload", "bench_offload.py", "Harvests off the event loop and in parallel", 900),
    Bench("schedule", "sim_schedule.py", "Poll scheduling under a rate budget, simulated", 900),
    Bench("detect", "bench_detect.py", "Detection latency in real time, against the emulator", 900),
)
#: issue 8's target for the decoder's streaming memory, which bench_decode.py reports
#: without one: peak RSS growth below 64 MB (10**6 bytes)
STREAM_RSS_TARGET_MB = 64.0
_BY_NAME = {b.name: b for b in BENCHES}
_FIELDS = ("name", "value", "unit", "baseline", "baseline_value", "ratio", "target", "met")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only this benchmark (repeatable; comma lists too): {', '.join(_BY_NAME)}",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument(
        "--write",
        action="store_true",
        help="rewrite BENCHMARKS.md and bench/results.json even for a partial or quick run",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="never rewrite BENCHMARKS.md / results.json"
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args()
    if args.list:
        for b in BENCHES:
            print(f"{b.name:8} {b.title} (bench/{b.script})")
        return 0
    names = [n.strip() for group in args.only or [] for n in group.split(",") if n.strip()]
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; known: {', '.join(_BY_NAME)}")
    selected = [b for b in BENCHES if not names or b.name in names]
    write = (args.write or (not names and not args.quick)) and not args.no_write

    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    t_start = time.perf_counter()
    figures: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for bench in selected:
        got, info = run_bench(bench, quick=args.quick)
        figures.extend(got)
        runs.append(info)
    machine["load_average_at_end"] = _loadavg()
    total_s = time.perf_counter() - t_start

    command = shlex.join([_display_path(sys.executable), *sys.argv])
    doc = {
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "quick": args.quick,
        "duration_s": round(total_s, 1),
        "machine": machine,
        "benchmarks": runs,
        "figures": figures,
    }
    if write and names:
        # A partial run replaces its own benchmarks' figures and keeps the others' (each
        # benchmark keeps the date of the run that measured it).
        doc = merge_results(doc, BENCH / "results.json")
        selected = [b for b in BENCHES if any(r["name"] == b.name for r in doc["benchmarks"])]
    markdown = render_markdown(doc, selected)
    print(render_table(figures))
    if write:
        (BENCH / "results.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        (ROOT / "BENCHMARKS.md").write_text(markdown)
        print(f"wrote BENCHMARKS.md and bench/results.json ({total_s:.0f} s)", file=sys.stderr)
    else:
        print(f"done in {total_s:.0f} s (nothing rewritten: partial or quick run)", file=sys.stderr)
    return 0 if all(r["ok"] for r in runs) else 1


# -- running one benchmark -------------------------------------------------------------------


def run_bench(bench: Bench, *, quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    script = BENCH / bench.script
    info: dict[str, Any] = {
        "name": bench.name,
        "script": f"bench/{bench.script}",
        "ok": False,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": _loadavg(),
    }
    if not script.exists():
        info["error"] = f"bench/{bench.script} does not exist"
        return [_failed(bench, info["error"])], info
    with tempfile.TemporaryDirectory(prefix="harvester-bench-") as tmp:
        out = Path(tmp) / "figures.json"
        cmd = [sys.executable, str(script), "--json", str(out)]
        if quick:
            cmd += bench.quick_args
        info["command"] = shlex.join(
            [_display_path(sys.executable), f"bench/{bench.script}", "--json", "OUT", *cmd[4:]]
        )
        print(f"== {bench.name}: {bench.title}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        code, last = _stream(cmd, bench.timeout_s)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        if code != 0 or not out.exists():
            why = "timed out" if code is None else f"exited with {code}"
            info["error"] = f"{why}: " + " | ".join(last)[-1500:]
            return [_failed(bench, info["error"])], info
        raw = orjson.loads(out.read_bytes())
    info["ok"] = True
    return [_normalise(f, bench) for f in raw], info


def _stream(cmd: list[str], timeout_s: float) -> tuple[int | None, list[str]]:
    """Run ``cmd``, echoing its output; return its exit code (None: timed out) and last lines."""
    last: deque[str] = deque(maxlen=12)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env(),
        cwd=ROOT,
        text=True,
        errors="replace",
    )
    timed_out = threading.Event()

    def stop() -> None:  # SIGTERM lets the script's finally blocks stop its emulator
        timed_out.set()
        proc.terminate()

    watchdog = threading.Timer(timeout_s, stop)
    watchdog.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stderr.write("   " + line)
            sys.stderr.flush()
            if line.strip():
                last.append(line.rstrip())
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    return (None if timed_out.is_set() else proc.returncode), list(last)


def _failed(bench: Bench, error: str) -> dict[str, Any]:
    return {
        "name": f"{bench.name}: benchmark did not complete",
        "value": None,
        "unit": "",
        "baseline": None,
        "baseline_value": None,
        "ratio": None,
        "target": "completes",
        "met": False,
        "benchmark": bench.name,
        "note": error,
        "detail": {},
    }


def _normalise(raw: dict[str, Any], bench: Bench) -> dict[str, Any]:
    fig: dict[str, Any] = {k: raw.get(k) for k in _FIELDS}
    fig["benchmark"] = raw.get("benchmark") or bench.name
    fig["note"] = raw.get("note") or ""
    fig["detail"] = raw.get("detail") or {
        k: v for k, v in raw.items() if k not in (*_FIELDS, "benchmark", "note")
    }
    if (
        fig["unit"] == "x"
        and fig["ratio"] is not None
        and fig["baseline_value"]
        and fig["value"] == fig["ratio"]
    ):
        # bench_decode.py reports "decoder vs X" as value = ratio, baseline_value = X's MB/s.
        # Restate it as value = the decoder's MB/s (ratio x baseline), so that here, as for
        # every other figure, ratio = value / baseline_value and value/baseline share a unit.
        fig["detail"]["reported_value"] = fig["value"]
        fig["value"] = fig["ratio"] * fig["baseline_value"]
        fig["unit"] = "MB/s"
    target = fig["target"]
    if isinstance(target, int | float) and not isinstance(target, bool):
        # bench_decode.py's targets are minimum ratios: "at least N times the baseline".
        fig["detail"]["target_ratio"] = target
        fig["target"] = f">= {target:g}x {fig['baseline'] or 'baseline'}"
        if not fig["note"] and fig["ratio"] is not None and fig["baseline_value"]:
            fig["note"] = (
                f"{fig['value']:,.0f} {fig['unit']} against {fig['baseline']}'s"
                f" {fig['baseline_value']:,.1f} {fig['unit']} on the same bytes in the same run:"
                f" {fig['ratio']:.2f}x"
                + ("." if fig["met"] else f", short of the {target:g}x target.")
            )
    if (
        bench.name == "decode"
        and fig["target"] is None
        and "peak RSS" in str(fig["name"])
        and fig["unit"] in ("MiB", "MB")
        and fig["value"] is not None
    ):
        mb = fig["value"] * (1.048576 if fig["unit"] == "MiB" else 1.0)
        fig["target"] = f"< {STREAM_RSS_TARGET_MB:g} MB"
        fig["met"] = mb < STREAM_RSS_TARGET_MB
        fig["note"] = fig["note"] or (
            f"{mb:.1f} MB (10^6 bytes) of VmHWM growth; target from issue 8, applied by run.py."
        )
    return fig


def merge_results(doc: dict[str, Any], previous: Path) -> dict[str, Any]:
    """``doc`` (a partial run) over the results in ``previous``: the benchmarks it ran are
    replaced, the others kept with their figures, in ``BENCHES`` order."""
    try:
        old = orjson.loads(previous.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return doc
    ran = {r["name"] for r in doc["benchmarks"]}
    runs = {r["name"]: {"date": old.get("date"), **r} for r in old.get("benchmarks", [])}
    runs.update({r["name"]: r for r in doc["benchmarks"]})
    figures = [f for f in old.get("figures", []) if f.get("benchmark") not in ran]
    figures += doc["figures"]
    order = {b.name: i for i, b in enumerate(BENCHES)}
    figures.sort(key=lambda f: order.get(f.get("benchmark", ""), len(order)))
    merged = dict(doc)
    merged["benchmarks"] = sorted(runs.values(), key=lambda r: order.get(r["name"], len(order)))
    merged["figures"] = figures
    merged["partial_of"] = {
        "date": old.get("date"),
        "command": old.get("command"),
        "machine": old.get("machine", {}).get("cpu"),
        "ran": sorted(ran),
    }
    return merged


# -- the machine -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": version("numpy"),
        "aiohttp": version("aiohttp"),
        "orjson": version("orjson"),
        "anyio": version("anyio"),
        "sqlite": sqlite3.sqlite_version,
        "git": _git_revision(),
        "load_average_at_start": _loadavg(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()


def _git_revision() -> str:
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev} (with uncommitted changes)" if dirty else rev


def _display_path(path: str) -> str:
    p = Path(path)
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


# -- rendering -------------------------------------------------------------------------------


def _fmt_met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "**NO**")


def _fmt_ratio(fig: dict[str, Any]) -> str:
    r = fig.get("ratio")
    if r is None:
        return ""
    if abs(r) >= 100:
        return f"{r:,.0f}x"
    if abs(r) >= 0.01:
        return f"{r:.3f}x"
    return f"{r:.2g}x"


def _fmt_num(value: Any, unit: str) -> str:
    if value is None:
        return "not measured"
    return f"{fmt_value(float(value))} {unit}".strip()


def render_table(figures: list[dict[str, Any]]) -> str:
    lines = [
        "| # | Figure | Value | Baseline | Ratio | Target | Met |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, f in enumerate(figures, 1):
        baseline = ""
        if f.get("baseline"):
            baseline = f"{f['baseline']}: {_fmt_num(f.get('baseline_value'), f.get('unit') or '')}"
        lines.append(
            f"| {i} | {f['name']} | {_fmt_num(f.get('value'), f.get('unit') or '')} | {baseline}"
            f" | {_fmt_ratio(f)} | {f.get('target') or ''} | {_fmt_met(f.get('met'))} |"
        )
    return "\n".join(lines)


def _docstring(script: Path) -> str:
    try:
        return ast.get_docstring(ast.parse(script.read_text())) or ""
    except (OSError, SyntaxError):
        return ""


def render_markdown(doc: dict[str, Any], selected: list[Bench]) -> str:
    figures = doc["figures"]
    m = doc["machine"]
    with_target = [f for f in figures if f.get("met") is not None]
    missed = [f for f in with_target if not f["met"]]
    out = [
        "# Benchmarks",
        "",
        "Written by `bench/run.py`; do not edit by hand: every figure below is computed by the"
        " run and the whole file is rewritten each time. How each benchmark works and how to run"
        " one alone: [bench/README.md](bench/README.md). The same figures, machine-readable:"
        " [bench/results.json](bench/results.json).",
        "",
        f"- **Command:** `{doc['command']}`" + (" (quick sizes)" if doc.get("quick") else ""),
        f"- **Date:** {doc['date']} (took {doc['duration_s']:.0f} s)",
        f"- **Machine:** {m['cores']} cores ({m['cpu']}), {m['memory_gb']} GB RAM, {m['os']};"
        f" load average {'/'.join(map(str, m['load_average_at_start']))} at start,"
        f" {'/'.join(map(str, m.get('load_average_at_end', [])))} at end",
        f"- **Software:** Python {m['python']}, numpy {m['numpy']}, aiohttp {m['aiohttp']},"
        f" orjson {m['orjson']}, anyio {m['anyio']}, SQLite {m['sqlite']}",
        f"- **Code:** git {m['git']}",
        *(
            [
                f"- **Merged:** only {', '.join(doc['partial_of']['ran'])} ran with this command;"
                f" the other figures are from `{doc['partial_of']['command']}` of"
                f" {doc['partial_of']['date']} on {doc['partial_of'].get('machine') or 'unknown'}"
                " (each benchmark's date is under its heading)."
            ]
            if doc.get("partial_of")
            else []
        ),
        "",
        f"**Targets met: {len(with_target) - len(missed)} of {len(with_target)}.**",
        "",
        "## Figures",
        "",
        "`Ratio` is always value / baseline, both measured in the same run.",
        "",
        render_table(figures),
        "",
    ]
    if missed:
        out += ["## Targets missed", ""]
        for f in missed:
            out.append(f"- **{f['name']}** ({f.get('target')}): {f.get('note') or 'no detail'}")
        out.append("")
    out += ["## How each figure was measured", ""]
    for bench in selected:
        mine = [f for f in figures if f.get("benchmark") == bench.name]
        out += [f"### {bench.title} (`bench/{bench.script}`)", ""]
        run_of: dict[str, Any] = next((r for r in doc["benchmarks"] if r["name"] == bench.name), {})
        if doc.get("partial_of") and run_of.get("date"):
            out += [f"Measured {run_of['date']}.", ""]
        summary = _docstring(BENCH / bench.script)
        if summary:
            out += [summary, ""]
        for f in mine:
            if f.get("note"):
                out.append(f"- *{f['name']}*: {f['note']}")
        out.append("")
    out += [
        "## Reproduce",
        "",
        "```sh",
        "make bench                                   # everything; rewrites this file",
        ".venv/bin/python bench/run.py --only polls   # one benchmark, printed only",
        ".venv/bin/python bench/run.py --quick        # small sizes, a smoke run",
        "```",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
