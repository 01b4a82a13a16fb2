"""configs/k8s/replicas: three replicas on PostgreSQL. Static checks (no cluster needed): the
config is a valid PostgreSQL config, the volume is shared, and the manifests differ from the
single-replica ones (../) only where scaling out needs it, so the two cannot drift apart
unnoticed. Schema validation, secrets as files and the NetworkPolicy are checked for both
variants in tests/daemon/test_daemon_manifests.py."""

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
DB_ENV = {"HARVESTER_DB_URL"}
#: only the replicas mount the database password
DB_SECRET_VOLUME = "db-secrets"


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


def test_the_config_uses_postgres_and_a_shared_output(config: Config) -> None:
    assert config.store.path is None and config.store.url.startswith("postgresql://")
    assert config.store.password is not None and config.store.password.file is not None
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


def test_only_what_scaling_out_needs_differs_from_the_single_replica_manifests(
    replicas: dict[str, list[dict[str, Any]]], base: dict[str, list[dict[str, Any]]]
) -> None:
    def comparable(deployment: dict[str, Any]) -> dict[str, Any]:
        d = copy.deepcopy(deployment)
        spec = d["spec"]
        for key in ("replicas", "strategy"):
            spec.pop(key)
        spec["template"]["spec"].pop("topologySpreadConstraints", None)
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        c["env"] = [e for e in c.get("env", []) if e["name"] not in DB_ENV]
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != DB_SECRET_VOLUME]
        pod["volumes"] = [v for v in pod["volumes"] if v["name"] != DB_SECRET_VOLUME]
        d.pop("_file")
        return d

    ours, theirs = only(replicas, "Deployment"), only(base, "Deployment")
    assert comparable(ours) == comparable(theirs)

    def without(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: v for k, v in doc.items() if k not in {"_file", *keys}}

    assert without(only(replicas, "Service")) == without(only(base, "Service"))
    assert without(only(replicas, "Namespace")) == without(only(base, "Namespace"))
    policy, single = only(replicas, "NetworkPolicy"), only(base, "NetworkPolicy")
    extra = [r for r in policy["spec"]["egress"] if r not in single["spec"]["egress"]]
    assert [p["port"] for r in extra for p in r["ports"]] == [5432], "only the database"
    assert without(only(replicas, "Kustomization"), "resources") == without(
        only(base, "Kustomization"), "resources"
    ), "the same image settings"
