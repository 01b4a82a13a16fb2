"""Secrets never leak: a whole harvest of all four providers whose every secret is a unique
marker string, run as a user runs it (``harvester harvest`` in a subprocess, debug level, JSON
logs), then ``status`` and ``status --check``; and the 401 paths (a refused API key, a refused
client secret), whose error messages are the likeliest place for a key to be echoed.

Everything is searched: every log line and message on stdout and stderr, and every file
written (the store with its WAL, the outputs, the manifests). No marker may appear, nor any
signed-URL query string; the emulator's storage host records any credential it receives and
must have none.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import (
    SECRETS,
    EmulatorThread,
    Run,
    case,
    child_env,
    harvester,
    job_lines,
    record,
    scenario,
)

#: what must never be seen: every secret (for Modzy, the part after the public access key)
MARKERS = [value.split(".", 1)[-1] if "MODZY" in name else value for name, value in
           SECRETS.items()]  # fmt: skip
WRONG = {
    "playment": ("CHAOS_PLAYMENT_KEY", "wrong-playment-key-LEAK-0a1b"),
    "modzy": ("CHAOS_MODZY_KEY", "wrongaccess.wrong-modzy-secret-LEAK-2c3d"),
    "cognite": ("CHAOS_COGNITE_SECRET", "wrong-cognite-secret-LEAK-4e5f"),
}
SIGNED_QUERY = re.compile(r"X-Amz-Signature|X-Amz-Credential|[?&]sig=|[?&]se=\d|sv=\d{4}")


@pytest.fixture(scope="module")
def emu() -> Iterator[EmulatorThread]:
    """The emulator accepts only the markers, so a wrong key is a 401."""
    sc = scenario(
        {
            "playment": {"valid_api_keys": [SECRETS["CHAOS_PLAYMENT_KEY"]]},
            "modzy": {"valid_api_keys": [SECRETS["CHAOS_MODZY_KEY"]]},
            "oauth": {
                "clients": {
                    "chaos-cognite": SECRETS["CHAOS_COGNITE_SECRET"],
                    "chaos-bentley": SECRETS["CHAOS_BENTLEY_SECRET"],
                }
            },
            "storage": {"expire_first_n": 3},  # re-signing is logged: exercise it
        }
    )
    with EmulatorThread(sc) as e:
        yield e


def leaks(text: str | bytes, markers: list[str]) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode()
    found = [m for m in markers if m.encode() in data]
    found += [m.group(0) for m in SIGNED_QUERY.finditer(data.decode("utf-8", "replace"))]
    return found


def written_files(root: Path, *, inputs: set[Path]) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p not in inputs]


def test_no_secret_or_signature_anywhere(emu: EmulatorThread, tmp_path: Path) -> None:
    secret_file = tmp_path / "bentley.secret"
    secret_file.write_text(SECRETS["CHAOS_BENTLEY_SECRET"] + "\n")
    c = case(
        tmp_path,
        emu.urls,
        "secrets",
        playment=4,
        others=2,
        log_level="debug",
        per_provider={"bentley": {"client_secret_file": str(secret_file)}},
    )
    config, jobs, lines = c.config, c.jobs, c.lines
    # the config names the file: drop the _env reference the template puts there
    config.write_text(
        config.read_text().replace('client_secret_env = "CHAOS_BENTLEY_SECRET"\n', "")
    )
    env = child_env()
    env.pop("CHAOS_BENTLEY_SECRET")
    runs: list[Run] = [
        c.harvest(env=env),
        harvester("status", "-c", str(config), env=env),
        harvester("status", "-c", str(config), "--json", "--check", env=env),
    ]
    assert runs[0].returncode == 0, runs[0].tail()
    assert all(r.returncode == 0 for r in runs), [r.tail() for r in runs]
    log_lines = runs[0].log.splitlines()
    # Every state change of every job was logged (at level debug: everything there is).
    assert sum('"job state"' in ln for ln in log_lines) >= 5 * len(lines)
    for run in runs:
        assert leaks(run.stdout + run.log, MARKERS) == [], run.tail()
    files = written_files(tmp_path, inputs={config, jobs, secret_file})
    assert any(p.name == "MANIFEST.json" for p in files)
    assert any(p.name.startswith("state.db") for p in files)
    for path in files:
        assert leaks(path.read_bytes(), MARKERS) == [], path
    stats = emu.stats()
    assert stats["credential_hits"] == [] and stats["storage"]["credential_hits"] == []
    assert stats["storage"]["requests_by_status"].get("403", 0) >= 1  # URLs were re-signed
    record(
        "secrets",
        "full-harvest",
        log_lines=len(log_lines),
        files_searched=len(files),
        bytes_searched=sum(p.stat().st_size for p in files),
        credential_hits=len(stats["credential_hits"]),
    )


@pytest.mark.parametrize("provider", sorted(WRONG))
def test_refused_credentials_are_not_echoed(
    emu: EmulatorThread, tmp_path: Path, provider: str
) -> None:
    env_name, wrong = WRONG[provider]
    project = f"wrong-{provider}"
    lines = [ln for ln in job_lines(project, playment=1, others=1) if ln["provider"] == provider]
    c = case(tmp_path, emu.urls, project, lines=lines, log_level="debug", providers=(provider,))
    config, jobs = c.config, c.jobs
    run = c.harvest(env=child_env(**{env_name: wrong}))
    assert run.returncode == 2, run.tail()
    message = run.log.strip().splitlines()[-1]
    assert message.startswith(f"harvester: {provider}"), message
    assert "401" in message or "refused" in message or "invalid" in message, message
    secret = wrong.split(".", 1)[-1]
    assert leaks(run.stdout + run.log, [secret, *MARKERS]) == [], run.tail()
    for path in written_files(tmp_path, inputs={config, jobs}):
        assert leaks(path.read_bytes(), [secret, *MARKERS]) == [], path
    assert emu.stats()["credential_hits"] == []
