"""Shared by the bad-input tests: a work folder with a store and an output directory that
must come out of every bad input byte for byte unchanged, and the CLI run in this process."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harvester.cli import main as cli_main
from harvester.logs import configure
from tests.integration.helpers import config_toml, payload

SECRET_ENV = {
    "BI_PLAYMENT_KEY": "bi-playment-key",
    "BI_MODZY_KEY": "biaccess.bi-modzy-secret",
    "BI_COGNITE_SECRET": "bi-cognite-secret",
    "BI_BENTLEY_SECRET": "bi-bentley-secret",
}
#: a config for all four providers (no network is used by the bad-input cases)
CONFIG = config_toml(
    log={"level": "warning", "format": "json"},
    providers={
        "playment": {
            "base_url": "http://127.0.0.1:9/playment",
            "api_key_env": "BI_PLAYMENT_KEY",
            "project_id": "bi",
        },
        "cognite": {
            "base_url": "http://127.0.0.1:9/cognite",
            "project": "bi",
            "token_url": "http://127.0.0.1:9/oauth2/token",
            "client_id": "bi",
            "client_secret_env": "BI_COGNITE_SECRET",
        },
        "bentley": {
            "base_url": "http://127.0.0.1:9/bentley",
            "token_url": "http://127.0.0.1:9/oauth2/token",
            "client_id": "bi",
            "client_secret_env": "BI_BENTLEY_SECRET",
        },
        "modzy": {"base_url": "http://127.0.0.1:9/modzy", "api_key_env": "BI_MODZY_KEY"},
    },
)


@contextlib.contextmanager
def secret_env() -> Iterator[None]:
    """The bad-input secrets in the environment and logging as JSON at warning, for a
    module-scoped fixture (which cannot take ``monkeypatch``) while the block lasts."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SECRET_ENV.items():
            mp.setenv(name, value)
        configure("warning", "json")
        yield


GOOD_LINE = {"provider": "playment", "reference_id": "good-1", "payload": payload(1)}


@dataclass
class Cli:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def cli(*args: str) -> Cli:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(list(args))
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return Cli(code, out.getvalue(), err.getvalue())


def tree_digest(root: Path, *, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` but not under ``skip`` (relative path -> digest);
    folders are listed too, so an empty one appearing is a change."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and path.is_relative_to(skip):
            continue
        rel = str(path.relative_to(root))
        if path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            out[rel + "/"] = "dir"
    return out


class Workspace:
    """``root/``: the store (holding one job) and the output directory (holding one folder),
    which no bad input may change; ``root/inputs/``: the config and the inputs under test."""

    def __init__(self, root: Path, config_text: str = CONFIG) -> None:
        self.root = root
        self.inputs = root / "inputs"
        self.inputs.mkdir()
        self.config = self.write("harvester.toml", config_text)
        # The store and output live beside the config (relative paths in it): move them out.
        self.config.write_text(
            config_text.replace('"sqlite://state.db"', f'"sqlite://{root}/state.db"').replace(
                'dir = "out"', f'dir = "{root}/out"'
            )
        )
        good = self.write("good.jsonl", json.dumps(GOOD_LINE) + "\n")
        done = cli("submit", "-c", str(self.config), str(good))
        assert done.code == 0, done.err
        (root / "out" / "playment" / "earlier").mkdir(parents=True)
        (root / "out" / "playment" / "earlier" / "MANIFEST.json").write_text("{}")

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.inputs / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        return path

    def snapshot(self) -> dict[str, str]:
        """Everything but the inputs: the store (with any -wal/-shm) and the output."""
        return tree_digest(self.root, skip=self.inputs)


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"
