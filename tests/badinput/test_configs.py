"""Malformed configs and unreadable secrets: one ``harvester: ...`` line naming the config
file and the key (exit 2), and the store and output directory unchanged."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import CONFIG, GOOD_LINE, SECRET_ENV, Workspace, cli


@dataclass(frozen=True)
class Case:
    id: str
    edit: Callable[[str], str]  #: turns the good config text into the bad one
    says: str  #: the error line must contain this
    command: str = "status"  #: secrets are only read by commands that need them


def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


def add(extra: str) -> Callable[[str], str]:
    return lambda text: text + "\n" + extra + "\n"


PLAY_KEY = 'api_key_env = "BI_PLAYMENT_KEY"'
LEAK = "bi-secret-LEAK-7f3a"  #: inside every bad secret: must never be printed
CASES = [
    Case("not-toml", add("[store"), "not valid TOML"),
    Case("not-utf8", lambda t: t, "not valid TOML"),  # bytes written by the test
    Case("unknown-section", sub("[store]", "[stroe]"), "unknown key stroe (did you mean store?)"),
    Case("unknown-provider", sub("[providers.modzy]", "[providers.modzi]"),
         "unknown key providers.modzi (did you mean providers.modzy?)"),
    Case("unknown-key", sub(PLAY_KEY, 'api_key_evn = "X"'),
         "unknown key providers.playment.api_key_evn (did you mean"),
    Case("unknown-store-key", sub('[store]\n', '[store]\npath = "x.db"\n'),
         "unknown key store.path"),
    Case("rate-not-number", sub(PLAY_KEY, PLAY_KEY + '\nrate_per_s = "fast"'),
         "providers.playment.rate_per_s must be a number, got 'fast'"),
    Case("burst-float", sub(PLAY_KEY, PLAY_KEY + "\nburst = 1.5"),
         "providers.playment.burst must be an integer, got 1.5"),
    Case("concurrency-bool", add("[harvest]\nconcurrency = true"),
         "harvest.concurrency must be an integer, got True"),
    Case("concurrency-zero", sub(PLAY_KEY, PLAY_KEY + "\nmax_concurrency = 0"),
         "providers.playment.max_concurrency must be > 0"),
    Case("harvest-concurrency-zero", add("[harvest]\nconcurrency = 0"),
         "harvest.concurrency must be > 0, got 0"),
    Case("harvest-attempts-negative", add("[harvest]\nmax_attempts = -2"),
         "harvest.max_attempts must be > 0, got -2"),
    Case("harvest-chunk-zero", add("[harvest]\nchunk_bytes = 0"),
         "harvest.chunk_bytes must be > 0, got 0"),
    Case("harvest-part-bytes-zero", add("[harvest]\npart_bytes = 0"),
         "harvest.part_bytes must be > 0, got 0"),
    Case("harvest-threads-negative", add("[harvest]\nthreads = -1"),
         "harvest.threads must be >= 0 (0 = one per core), got -1"),
    Case("results-wait-nan", add("[harvest]\nresults_wait_s = nan"),
         "harvest.results_wait_s must be > 0, got nan"),
    Case("drain-grace-negative", add("[server]\ndrain_grace_s = -1"),
         "server.drain_grace_s must be >= 0, got -1"),
    Case("max-connections-zero", add("[server]\nmax_connections = 0"),
         "server.max_connections must be > 0, got 0"),
    Case("header-timeout-negative", add("[server]\nheader_timeout_s = -1"),
         "server.header_timeout_s must be > 0, got -1.0"),
    Case("body-timeout-string", add('[server]\nbody_timeout_s = "1m"'),
         "server.body_timeout_s must be a number, got '1m'"),
    Case("idle-timeout-zero", add("[server]\nidle_timeout_s = 0"),
         "server.idle_timeout_s must be > 0, got 0.0"),
    Case("backoff-base-zero", sub(PLAY_KEY, PLAY_KEY + "\nbackoff_base_s = 0"),
         "providers.playment.backoff_base_s must be > 0"),
    Case("backoff-max-below-base",
         sub(PLAY_KEY, PLAY_KEY + "\nbackoff_base_s = 5\nbackoff_max_s = 1"),
         "providers.playment.backoff_max_s must be >= backoff_base_s"),
    Case("negative-rate", sub(PLAY_KEY, PLAY_KEY + "\nrate_per_s = -1"),
         "providers.playment.rate_per_s must be >= 0"),
    Case("job-timeout-negative", sub(PLAY_KEY, PLAY_KEY + "\njob_timeout_s = -60"),
         "providers.playment.job_timeout_s must be >= 0 (0 = no deadline)"),
    Case("job-timeout-string", sub(PLAY_KEY, PLAY_KEY + '\njob_timeout_s = "1h"'),
         "providers.playment.job_timeout_s must be a number, got '1h'"),
    Case("poll-bounds", sub(PLAY_KEY, PLAY_KEY + "\npoll_min_s = 10\npoll_max_s = 5"),
         "providers.playment.poll_max_s must be >= poll_min_s"),
    Case("poll-budget-share", sub(PLAY_KEY, PLAY_KEY + "\npoll_budget_share = 1.5"),
         "providers.playment.poll_budget_share must be > 0 and <= 1"),
    Case("base-url-scheme", sub('base_url = "http://127.0.0.1:9/playment"',
                                'base_url = "ftp://127.0.0.1/playment"'),
         "providers.playment.base_url must start with http:// or https://"),
    Case("label-dtype", sub("[output]\n", '[output]\nlabel_dtype = "int8"\n'),
         "output.label_dtype must be one of"),
    Case("log-level", sub('level = "warning"', 'level = "verbose"'), "log.level must be one of"),
    Case("store-url", sub('url = "sqlite://', 'url = "mysql://'),
         "store.url must start with sqlite:// or postgresql://"),
    Case("output-dir-type", lambda t: re.sub(r'(?m)^dir = ".*"$', "dir = 5", t),
         "output.dir must be a path string"),
    Case("provider-not-table", sub('[providers.modzy]\nbase_url = "http://127.0.0.1:9/modzy"\n'
                                   'api_key_env = "BI_MODZY_KEY"', '[providers]\nmodzy = 5'),
         "[providers.modzy] must be a table"),
    Case("scopes-not-list", sub('client_id = "bi"\nclient_secret_env = "BI_COGNITE_SECRET"',
                                'client_id = "bi"\nclient_secret_env = "BI_COGNITE_SECRET"\n'
                                'scopes = "all"'),
         "providers.cognite.scopes must be a list of strings"),
    Case("on-lost-create", sub(PLAY_KEY, PLAY_KEY + '\non_lost_create = "retry"'),
         "providers.playment.on_lost_create must be one of 'fail', 'resubmit'"),
    Case("listen", add('[server]\nlisten = "8080"'), "server.listen must be HOST:PORT"),
    Case("secret-env-and-file", sub(PLAY_KEY, PLAY_KEY + '\napi_key_file = "/x"'),
         "providers.playment: set only one of api_key_env and api_key_file"),
    Case("secret-empty-name", sub(PLAY_KEY, 'api_key_env = ""'),
         "providers.playment.api_key_env must be a non-empty string"),
    Case("required-missing", sub('project_id = "bi"\n', ""),
         "providers.playment.project_id is required"),
    Case("secret-missing", sub(PLAY_KEY + "\n", ""),
         "providers.playment.api_key is required (set api_key_env or api_key_file)"),
    Case("secret-env-unset", sub(PLAY_KEY, 'api_key_env = "BI_NOT_SET_ANYWHERE"'),
         "providers.playment.api_key: environment variable BI_NOT_SET_ANYWHERE is not set",
         "harvest"),
    Case("secret-file-missing", sub(PLAY_KEY, 'api_key_file = "no-such-secret"'),
         "providers.playment.api_key: cannot read secret file", "harvest"),
    Case("secret-file-is-directory", sub(PLAY_KEY, 'api_key_file = "."'),
         "secret file {inputs} is not a regular file (a directory)", "harvest"),
    Case("secret-file-empty", sub(PLAY_KEY, 'api_key_file = "empty-secret"'),
         "providers.playment.api_key: secret file", "harvest"),
    # A secret file must be a small regular file holding one line of UTF-8 text.
    Case("secret-file-fifo", sub(PLAY_KEY, 'api_key_file = "fifo-secret"'),
         "providers.playment.api_key: secret file {inputs}/fifo-secret is not a regular file"
         " (a FIFO)", "harvest"),
    Case("secret-file-dev-zero", sub(PLAY_KEY, 'api_key_file = "/dev/zero"'),
         "providers.playment.api_key: secret file /dev/zero is not a regular file"
         " (a character device)", "harvest"),
    Case("secret-file-huge", sub(PLAY_KEY, 'api_key_file = "huge-secret"'),
         "secret file {inputs}/huge-secret is 65537 bytes; a secret may have 64 KiB at most",
         "harvest"),
    Case("secret-file-two-lines", sub(PLAY_KEY, 'api_key_file = "two-line-secret"'),
         "providers.playment.api_key: secret file {inputs}/two-line-secret holds more than one"
         " line", "harvest"),
    Case("secret-file-two-newlines", sub(PLAY_KEY, 'api_key_file = "two-newline-secret"'),
         "secret file {inputs}/two-newline-secret holds more than one line", "harvest"),
    Case("secret-file-control-char", sub(PLAY_KEY, 'api_key_file = "control-secret"'),
         "secret file {inputs}/control-secret contains a control character (U+0000)", "harvest"),
    Case("secret-file-not-utf8", sub(PLAY_KEY, 'api_key_file = "binary-secret"'),
         "providers.playment.api_key: secret file {inputs}/binary-secret is not UTF-8 text",
         "harvest"),
    Case("secret-env-newline", sub(PLAY_KEY, 'api_key_env = "BI_NEWLINE_KEY"'),
         "providers.playment.api_key: environment variable BI_NEWLINE_KEY holds more than one"
         " line", "harvest"),
    Case("secret-env-control-char", sub(PLAY_KEY, 'api_key_env = "BI_CONTROL_KEY"'),
         "providers.playment.api_key: environment variable BI_CONTROL_KEY contains a control"
         " character (U+001B)", "harvest"),
    Case("base-url-env-unset", sub('base_url = "http://127.0.0.1:9/modzy"',
                                   'base_url_env = "BI_NO_SUCH_URL"'),
         "providers.modzy.base_url_env: environment variable BI_NO_SUCH_URL is not set",
         "harvest"),
]  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_config_is_one_clear_line_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("BI_NOT_SET_ANYWHERE", raising=False)
    monkeypatch.setenv("BI_NEWLINE_KEY", f"{LEAK}-1\n{LEAK}-2")
    monkeypatch.setenv("BI_CONTROL_KEY", f"{LEAK}\x1b[2J")
    ws = Workspace(tmp_path)
    ws.write("empty-secret", "  \n")
    ws.write("huge-secret", (LEAK.encode() * 4000)[: (64 << 10) + 1])
    assert ws.inputs.joinpath("huge-secret").stat().st_size == (64 << 10) + 1
    ws.write("two-line-secret", f"{LEAK}\nsecond line\n")
    ws.write("two-newline-secret", f"{LEAK}\n\n")
    ws.write("control-secret", f"{LEAK}\x00\n")
    ws.write("binary-secret", LEAK.encode() + b"\xff\xfe\n")
    os.mkfifo(ws.inputs / "fifo-secret")
    good = ws.config.read_text()
    bad = ws.write("bad.toml", "")
    if case.id == "not-utf8":
        bad.write_bytes(good.encode() + b"\n# \xff\xfe\n")
    else:
        bad.write_text(case.edit(good))
    jobs = ws.write("jobs.jsonl", ws.inputs.joinpath("good.jsonl").read_text())
    before = ws.snapshot()
    args = [case.command, "-c", str(bad)] + ([str(jobs)] if case.command == "harvest" else [])
    done = cli(*args)
    assert done.code == 2, (done.code, done.out, done.err)
    assert len(done.lines) == 1, done.lines
    (message,) = done.lines
    assert message.startswith("harvester: "), message
    assert case.says.format(inputs=ws.inputs) in message, message
    assert LEAK not in done.err + done.out  # the secret itself is never shown
    if not case.id.startswith("secret-file") and not case.id.startswith("secret-env"):
        assert str(bad) in message, message  # names the file
    assert ws.snapshot() == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(("status",), "no config file: pass -c CONFIG or set HARVESTER_CONFIG",
                     id="no-config"),
        pytest.param(("status", "-c", "{root}/absent.toml"), "cannot read config: No such file",
                     id="config-missing"),
        pytest.param(("status", "-c", "{root}"), "cannot read config: Is a directory",
                     id="config-is-directory"),
    ],
)  # fmt: skip
def test_unreadable_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], says: str
) -> None:
    monkeypatch.delenv("HARVESTER_CONFIG", raising=False)
    ws = Workspace(tmp_path)
    before = ws.snapshot()
    done = cli(*(a.format(root=ws.inputs) for a in args))
    assert done.code == 2 and len(done.lines) == 1, done.lines
    assert says in done.lines[0], done.lines
    assert ws.snapshot() == before


def test_config_text_is_the_good_one() -> None:
    """The cases above edit this text; it must itself be valid."""
    import tomllib

    from harvester.config import parse_config

    parse_config(tomllib.loads(CONFIG), source=Path("/tmp/x.toml"))


def test_offline_commands_need_no_provider_address_or_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status, submit, copy-store and bind-output send nothing to a provider: an unset secret
    or address variable does not stop them; harvest still refuses, with one line."""
    for name in [*SECRET_ENV, "BI_NO_SUCH_URL"]:  # no provider's secret, no address
        monkeypatch.delenv(name, raising=False)
    ws = Workspace(tmp_path)
    text = ws.config.read_text()
    for old in (
        'base_url = "http://127.0.0.1:9/playment"',
        'token_url = "http://127.0.0.1:9/oauth2/token"',
    ):
        assert old in text
        key = old.split(" = ")[0]
        text = text.replace(old, f'{key}_env = "BI_NO_SUCH_URL"')
    config = ws.write("offline.toml", text)
    jobs = ws.write("jobs.jsonl", json.dumps({**GOOD_LINE, "reference_id": "good-2"}) + "\n")

    done = cli("submit", "-c", str(config), str(jobs))
    assert (done.code, done.out) == (0, "added 1 jobs (0 already in the store)\n"), done.err
    done = cli("status", "-c", str(config), "--json")
    assert done.code == 0, done.err
    assert json.loads(done.out)["providers"] == {"playment": {"new": 2}}
    target = ws.write(
        "target.toml", text.replace(f"sqlite://{tmp_path}/state.db", f"sqlite://{tmp_path}/copy.db")
    )
    done = cli("copy-store", "-c", str(target), "--from-config", str(config))
    assert done.code == 0 and done.out.startswith("copied 2 jobs"), done.err
    done = cli("bind-output", "-c", str(target))
    assert done.code == 0 and "now belongs to job store" in done.out, done.err

    before = ws.snapshot()
    done = cli("harvest", "-c", str(config))
    assert done.code == 2 and len(done.lines) == 1, done.lines
    assert "BI_NO_SUCH_URL is not set" in done.lines[0] and str(config) in done.lines[0]
    assert ws.snapshot() == before
