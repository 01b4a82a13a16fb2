"""Summarise a chaos run: ``python tests/chaos/summary.py .chaos/report.jsonl [SECONDS]``.

Reads the JSON lines the chaos tests append to ``$CHAOS_REPORT`` and prints the figures the
README's chaos section quotes (markdown).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def main(path: str, seconds: str | None = None) -> None:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    crash = [r for r in records if r["kind"] == "crash"]
    storms = [r for r in records if r["kind"] == "storm"]
    calib = [r for r in records if r["kind"] == "calibration"]
    secrets = [r for r in records if r["kind"] == "secrets"]
    base = [r for r in records if r["kind"] == "storm-baseline"]
    out: list[str] = []
    if seconds:
        out.append(f"Whole run: {float(seconds) / 60:.1f} min.\n")
    if crash:
        fired = sum(r["fired"] for r in crash)
        points = Counter(k.split("=")[0] for r in crash for k in r["kills"])
        modes = Counter(r["mode"] for r in crash)
        secs = [r["seconds"] for r in crash]
        jobs = sum(r["jobs"] for r in crash)
        out += [
            "### Crashes",
            f"- {len(crash)} cases ({modes.get('harvest', 0)} `harvest`, "
            f"{modes.get('daemon', 0)} daemon), {sum(len(r['kills']) for r in crash)} planned "
            f"SIGKILLs, {fired} delivered, {sum(r['runs'] for r in crash)} harvester runs",
            f"- failpoints hit: {', '.join(f'{p} {n}' for p, n in sorted(points.items()))}",
            f"- {jobs} jobs: {sum(r['harvested'] for r in crash)} harvested exactly once, "
            f"{sum(r['lost_creates'] for r in crash)} in error because the kill cut their "
            "create answer (Cognite/Bentley/Modzy: no lookup); 0 duplicate creates, 0 partial "
            f"files, {sum(r['files_checked'] for r in crash)} files checked against their "
            "manifests and the ground truth",
            f"- per case: {statistics.mean(secs):.1f} s mean, {max(secs):.1f} s max",
        ]
        if calib:
            c = calib[0]
            hits = {k: v for k, v in c.items() if "." in k}
            out.append(
                f"- a clean run of the case's {c['jobs']} jobs takes {c['seconds']} s and passes "
                f"{sum(hits.values())} failpoints"
            )
        out.append("")
    if storms:
        b = base[0] if base else {}
        out += [
            "### Fault storms",
            f"14 jobs each; without faults: {b.get('seconds', 0):.1f} s, at most "
            f"{b.get('max_per_job', '?')} requests naming one job.\n",
            "| storm | seconds | requests | faults | max requests per job (budget) "
            "| per job by provider | lost creates |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in storms:
            faults = ", ".join(f"{k} {v}" for k, v in sorted(r["faults"].items())) or "-"
            statuses = r.get("statuses", {})
            extra = [f"{s}: {statuses[s]}" for s in ("401", "403", "429", "503") if s in statuses]
            if extra:
                faults += f" ({', '.join(extra)})"
            per = ", ".join(
                f"{k} {v}" for k, v in sorted(r["requests_per_job_by_provider"].items())
            )
            out.append(
                f"| {r['name']} | {r['seconds']} | {r['requests']} | {faults} | "
                f"{r['max_requests_per_job']} ({r['job_budget']}) | {per} | {r['lost_creates']} |"
            )
        out.append("")
    if secrets:
        s = secrets[0]
        out += [
            "### Secrets",
            f"- {s['log_lines']} log lines and {s['files_searched']} files "
            f"({s['bytes_searched']} bytes) searched: 0 secrets, 0 signed-URL query strings; "
            f"{s['credential_hits']} credential headers seen by the storage host",
            "",
        ]
    out += _bad_input()
    print("\n".join(out))


def _bad_input() -> list[str]:
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root))
    sys.path.insert(0, str(root / "tests"))
    try:
        from own_package import bind

        bind()  # modzy-sdk installs a 'tests' package of its own
        from tests.badinput import test_configs, test_jobs_files, test_provider_bodies
    except Exception as exc:  # pragma: no cover - a summary is best effort
        return [f"(bad-input counts unavailable: {exc})"]
    counts: dict[str, Any] = {
        "jobs-file lines": len(test_jobs_files.CASES) + 3,
        "configs": len(test_configs.CASES) + 3,
        "provider answers (parse)": len(test_provider_bodies.CASES),
        "provider answers (end to end)": len(test_provider_bodies.E2E),
    }
    total = sum(counts.values())
    detail = ", ".join(f"{n} {k}" for k, n in counts.items())
    return ["### Bad input", f"- {total} malformed inputs: {detail}", ""]


if __name__ == "__main__":
    main(*sys.argv[1:])
