from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
URL_KEYS = {"playment", "cognite", "bentley", "modzy", "token", "storage"}


def _spawn(scenario: str | None) -> subprocess.Popen[str]:
    code = (
        "import sys; from harvester.emulator.server import main; "
        f"sys.exit(main('127.0.0.1', 0, {scenario!r}))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_main_prints_exactly_one_json_line_and_stops_on_sigterm() -> None:
    proc = _spawn(str(REPO / "configs" / "scenarios" / "demo.toml"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the pytest timeout; main prints when ready
        urls = json.loads(line)
        assert set(urls) == URL_KEYS
        assert urls["playment"].endswith("/playment")
        assert urls["token"].endswith("/oauth2/token")
        assert urls["storage"] != urls["playment"].removesuffix("/playment")
        stats_url = urls["playment"].removesuffix("/playment") + "/_emulator/stats"
        with urllib.request.urlopen(stats_url, timeout=5) as r:
            assert "playment" in json.loads(r.read())
        models = urllib.request.Request(
            urls["modzy"] + "/api/models", headers={"Authorization": "ApiKey k"}
        )
        with urllib.request.urlopen(models, timeout=5) as r:  # a real provider, not a stub
            assert isinstance(json.loads(r.read()), list)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == ""  # nothing after the one line


def test_main_rejects_a_bad_scenario_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage]\nttl = 3\n")
    proc = _spawn(str(bad))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert out == "" and "storage.ttl" in err


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_main_stops_cleanly_on_sigint(sig: signal.Signals) -> None:
    proc = _spawn(None)
    try:
        assert proc.stdout is not None
        assert set(json.loads(proc.stdout.readline())) == URL_KEYS
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and out == ""
