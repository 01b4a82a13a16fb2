"""configs/k8s/replicas: three replicas on PostgreSQL. Static checks (no cluster needed): the
config is a valid PostgreSQL config whose every secret comes from a Secret, the volume is
shared, and the manifests differ from the single-replica ones (../) only where scaling out
needs it, so the two cannot drift apart unnoticed."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from harvester.config import Config, parse_config

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "configs" / "k8s"
REPLICAS = BASE / "replicas"
DB_ENV = {"HARVESTER_DB_URL", "HARVESTER_DB_PASSWORD"}


def load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                by_kind.setdefault(doc["kind"], []).append(doc | {"_file": path.name})
    return by_kind


def only(by_kind: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (doc,) = by_kind[kind]
    return doc


@pytest.fixture(scope="module")
def replicas() -> dict[str, list[dict[str, Any]]]:
    return load(REPLICAS)


@pytest.fixture(scope="module")
def base() -> dict[str, list[dict[str, Any]]]:
    return load(BASE)


@pytest.fixture
def config(replicas: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("HARVESTER_DB_URL", "postgresql://harvester@db:5432/harvester")
    text = only(replicas, "ConfigMap")["data"]["config.toml"]
    return parse_config(tomllib.loads(text), source=Path("/etc/harvester/config.toml"))


def container(by_kind: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (c,) = only(by_kind, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(c)


def test_kustomization_lists_every_manifest_but_the_secret_example(
    replicas: dict[str, list[dict[str, Any]]],
) -> None:
    resources = only(replicas, "Kustomization")["resources"]
    on_disk = {p.name for p in REPLICAS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == on_disk - {"secret.example.yaml"}
    secret = only(replicas, "Secret")
    assert secret["_file"] == "secret.example.yaml"
    assert all("REPLACE-ME" in v for v in secret["stringData"].values())
    assert ":" not in secret["stringData"]["url"].split("//")[1].split("@")[0], "no password"


def test_the_config_uses_postgres_and_a_shared_output(config: Config) -> None:
    assert config.store.path is None and config.store.url.startswith("postgresql://")
    assert config.store.password is not None and config.store.password.env in DB_ENV
    assert config.output.dir.is_relative_to("/var/lib/harvester")


def test_three_replicas_roll_and_share_one_volume(
    replicas: dict[str, list[dict[str, Any]]], config: Config
) -> None:
    deployment = only(replicas, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert only(replicas, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.server.drain_grace_s
    pdb = only(replicas, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_every_secret_the_config_names_comes_from_a_secret(
    replicas: dict[str, list[dict[str, Any]]], base: dict[str, list[dict[str, Any]]], config: Config
) -> None:
    refs = [ref for p in config.providers.values() for ref in p.secrets()]
    refs += [r for r in (config.server.token, config.store.password) if r is not None]
    wanted = {ref.env for ref in refs} | {"HARVESTER_DB_URL"}
    env = {e["name"]: e for e in container(replicas)["env"]}
    secrets = {
        s["metadata"]["name"]: s["stringData"]
        for s in (only(replicas, "Secret"), only(base, "Secret"))
    }
    for name in wanted:
        ref = env[name]["valueFrom"]["secretKeyRef"]  # never a literal value
        assert ref["key"] in secrets[ref["name"]], name


def test_only_what_scaling_out_needs_differs_from_the_single_replica_manifests(
    replicas: dict[str, list[dict[str, Any]]], base: dict[str, list[dict[str, Any]]]
) -> None:
    def comparable(deployment: dict[str, Any]) -> dict[str, Any]:
        d = copy.deepcopy(deployment)
        spec = d["spec"]
        for key in ("replicas", "strategy"):
            spec.pop(key)
        spec["template"]["spec"].pop("topologySpreadConstraints", None)
        (c,) = spec["template"]["spec"]["containers"]
        c["env"] = [e for e in c["env"] if e["name"] not in DB_ENV]
        d.pop("_file")
        return d

    ours, theirs = only(replicas, "Deployment"), only(base, "Deployment")
    assert comparable(ours) == comparable(theirs)

    def without(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k not in {"_file", *keys}}

    assert without(only(replicas, "Service")) == without(only(base, "Service"))
    assert without(only(replicas, "Kustomization"), "resources") == without(
        only(base, "Kustomization"), "resources"
    ), "the same image settings"
