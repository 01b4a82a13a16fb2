"""Config loading: types, unknown keys, secrets by reference only."""

from __future__ import annotations

import io
import os
from pathlib import Path

import orjson
import pytest

from harvester.config import PlaymentConfig, config_path, load_config
from harvester.errors import ConfigError
from harvester.logs import configure

GOOD = """
[store]
url = "sqlite://state/harvester.db"
[output]
dir = "out"
label_dtype = "uint16"
[providers.playment]
api_key_env = "TEST_PLAYMENT_KEY"
project_id = "p1"
rate_per_s = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "h.toml"
    path.write_text(text)
    return path


def test_good_config_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.store.path == tmp_path / "state/harvester.db"
    assert cfg.output.dir == tmp_path / "out"
    assert cfg.output.label_dtype == "uint16"
    p = cfg.providers["playment"]
    assert isinstance(p, PlaymentConfig)
    assert p.rate_per_s == 5.0 and p.burst == 20 and p.base_url == "https://api.playment.io"


def test_absolute_sqlite_url(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD.replace("sqlite://state", "sqlite:///var/x")))
    assert cfg.store.path == Path("/var/x/harvester.db")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (GOOD + "typo = 1\n", "unknown key providers.playment.typo"),
        (GOOD.replace("rate_per_s", "rate_per_sec"), "did you mean providers.playment.rate_per_s"),
        (GOOD.replace("rate_per_s = 5", 'rate_per_s = "fast"'), "must be a number"),
        (GOOD.replace('"uint16"', '"int7"'), "output.label_dtype must be one of"),
        (GOOD.replace('project_id = "p1"', ""), "providers.playment.project_id is required"),
        (GOOD.replace('api_key_env = "TEST_PLAYMENT_KEY"', ""), "set api_key_env or api_key_file"),
        (GOOD.replace("api_key_env", "api_key"), "unknown key providers.playment.api_key"),
        (GOOD + "[providers.nope]\n", "unknown key providers.nope"),
        (GOOD + "[bogus]\n", "unknown key bogus"),
        (GOOD.replace("sqlite://state/harvester.db", "mysql://x"), "store.url must start"),
        (GOOD.replace("rate_per_s = 5", "rate_per_s = -1"), "rate_per_s must be >= 0"),
        (GOOD.replace("rate_per_s = 5", "poll_min_s = 10\npoll_max_s = 1"), "poll_max_s"),
        (GOOD + 'base_url = "ftp://x"\n', "base_url must start with http"),
        ("[store\n", "not valid TOML"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert needle in str(info.value)
    assert str(tmp_path / "h.toml") in str(info.value)


def test_secrets_are_read_only_on_demand_and_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    monkeypatch.delenv("TEST_PLAYMENT_KEY", raising=False)
    with pytest.raises(ConfigError, match="TEST_PLAYMENT_KEY is not set"):
        cfg.check_secrets()
    monkeypatch.setenv("TEST_PLAYMENT_KEY", "s3cr3t-marker")
    cfg.check_secrets()
    p = cfg.providers["playment"]
    assert isinstance(p, PlaymentConfig) and p.api_key is not None
    assert p.api_key.reveal() == "s3cr3t-marker"
    assert "s3cr3t-marker" not in repr(cfg)
    assert "s3cr3t-marker" not in str(p.api_key)


def test_secret_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("from-file\n")
    cfg = load_config(
        write(tmp_path, GOOD.replace('api_key_env = "TEST_PLAYMENT_KEY"', 'api_key_file = "key"'))
    )
    p = cfg.providers["playment"]
    assert isinstance(p, PlaymentConfig) and p.api_key is not None
    assert p.api_key.reveal() == "from-file"
    (tmp_path / "key").unlink()
    with pytest.raises(ConfigError, match="cannot read secret file"):
        p.api_key.reveal()


def test_a_secret_file_others_can_read_works_with_one_warning(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("shared-secret-marker\r\n")
    cfg = load_config(
        write(tmp_path, GOOD.replace('api_key_env = "TEST_PLAYMENT_KEY"', 'api_key_file = "key"'))
    )
    buf = io.StringIO()
    configure("info", "json", stream=buf)
    own, other = os.getegid(), os.getegid() + 4242
    for mode, group, warned in (
        (0o600, own, False),
        (0o640, own, False),  # Kubernetes' Secret volume for a non-root pod: 0440, fsGroup
        (0o640, other, True),
        (0o604, own, True),
    ):
        key.chmod(mode)
        os.chown(key, -1, group)
        cfg.check_secrets()
        cfg.check_secrets()  # read again (a token refresh): no second warning for the same mode
        events = [orjson.loads(line) for line in buf.getvalue().splitlines()]
        buf.seek(0), buf.truncate()
        assert [e["event"].startswith("secret file is readable") for e in events] == (
            [True] if warned else []
        ), (mode, group, events)
        if warned:
            assert events[0]["config_key"] == "providers.playment.api_key"
            assert events[0]["file"] == str(key) and events[0]["mode"] == f"{mode:04o}"
            assert events[0]["level"] == "warning"
    p = cfg.providers["playment"]
    assert isinstance(p, PlaymentConfig) and p.api_key is not None
    assert p.api_key.reveal() == "shared-secret-marker"  # one CRLF dropped


def test_base_url_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = GOOD + 'base_url_env = "EMU_URL"\n'
    monkeypatch.setenv("EMU_URL", "http://127.0.0.1:9/playment")
    assert load_config(write(tmp_path, text)).providers["playment"].base_url.endswith("/playment")
    monkeypatch.delenv("EMU_URL")
    with pytest.raises(ConfigError, match="EMU_URL is not set"):
        load_config(write(tmp_path, text))


def test_config_path_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARVESTER_CONFIG", "/etc/h.toml")
    assert config_path(None) == Path("/etc/h.toml")
    assert config_path("x.toml") == Path("x.toml")
    monkeypatch.delenv("HARVESTER_CONFIG")
    with pytest.raises(ConfigError, match="HARVESTER_CONFIG"):
        config_path(None)


def test_token_url_env_for_oauth_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = """
[providers.cognite]
base_url_env = "EMU_COGNITE"
token_url_env = "EMU_TOKEN"
project = "p"
client_id = "c"
client_secret_env = "CS"
"""
    monkeypatch.setenv("EMU_COGNITE", "http://127.0.0.1:9/cognite")
    monkeypatch.setenv("EMU_TOKEN", "http://127.0.0.1:9/oauth2/token")
    cfg = load_config(write(tmp_path, text))
    assert cfg.providers["cognite"].token_url == "http://127.0.0.1:9/oauth2/token"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="token_url_env must be a string and excludes token_url"):
        load_config(write(tmp_path, text + 'token_url = "http://x"\n'))
    with pytest.raises(ConfigError, match=r"unknown key providers\.playment\.token_url_env"):
        load_config(write(tmp_path, GOOD + 'token_url_env = "EMU_TOKEN"\n'))


def test_a_secret_file_mounted_the_kubernetes_way_is_read_without_warning(
    tmp_path: Path,
) -> None:
    """A Secret volume holds each key as a symlink into a timestamped folder (``key ->
    ..data/key``, ``..data -> ..2026_12_04...``), mode 0440, group = the pod's group."""
    real = tmp_path / "..2026_12_04_19_00_00.1" / "key"
    real.parent.mkdir()
    real.write_text("mounted-secret-marker\n")
    real.chmod(0o440)
    os.chown(real, -1, os.getegid())
    (tmp_path / "..data").symlink_to(real.parent.name)
    (tmp_path / "key").symlink_to("..data/key")
    cfg = load_config(
        write(tmp_path, GOOD.replace('api_key_env = "TEST_PLAYMENT_KEY"', 'api_key_file = "key"'))
    )
    buf = io.StringIO()
    configure("info", "json", stream=buf)
    try:
        p = cfg.providers["playment"]
        assert isinstance(p, PlaymentConfig) and p.api_key is not None
        assert p.api_key.reveal() == "mounted-secret-marker"
        assert buf.getvalue() == ""
    finally:
        configure("info", "json")  # later tests must not log into this test's buffer
