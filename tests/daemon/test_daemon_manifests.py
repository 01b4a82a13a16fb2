"""The container and the Kubernetes manifests agree with the daemon: probe paths are its
routes, ports are its listen port, secrets named by the config are provided, and the pod runs
as the image's non-root user with a read-only root filesystem. Static: nothing is built or
deployed (no Docker engine or cluster is needed)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from harvester.api import HEALTHZ_PATH, METRICS_PATH, READYZ_PATH, Api
from harvester.config import Config, parse_config
from harvester.daemon import parse_listen
from harvester.engine import Engine
from harvester.store import make_store

from .helpers import REPO

K8S = REPO / "configs" / "k8s"
CONFIG_PATH = "/etc/harvester/config.toml"
DATA_DIR = "/var/lib/harvester"
UID = 10001


def load_manifests() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    files = sorted(K8S.glob("*.yaml"))
    assert files, f"no manifests under {K8S}"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path
            by_kind.setdefault(doc["kind"], []).append(doc | {"_file": path.name})
    return by_kind


def only(by_kind: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (doc,) = by_kind[kind]
    return doc


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    return load_manifests()


@pytest.fixture(scope="module")
def container(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (c,) = only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(c)


@pytest.fixture(scope="module")
def config(manifests: dict[str, list[dict[str, Any]]]) -> Config:
    text = only(manifests, "ConfigMap")["data"]["config.toml"]
    # Parsing reads no secret, so the config loads here exactly as it will in the pod.
    return parse_config(tomllib.loads(text), source=Path(CONFIG_PATH))


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p for p in container["ports"] if p.get("name") == port]
    return int(match["containerPort"])


def test_kustomization_lists_every_manifest_but_the_secret_example(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    resources = only(manifests, "Kustomization")["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == on_disk - {"secret.example.yaml"}
    secret = only(manifests, "Secret")
    assert secret["_file"] == "secret.example.yaml"
    assert all("REPLACE-ME" in v for v in secret["stringData"].values())


def test_the_configmap_is_a_valid_container_config(config: Config) -> None:
    host, port = parse_listen(config.server.listen)
    assert host == "0.0.0.0", "inside a pod the daemon must listen on every interface"
    assert port == 8080
    assert config.store.path is not None and config.store.path.is_relative_to(DATA_DIR)
    assert config.output.dir.is_relative_to(DATA_DIR)
    assert config.server.token is not None
    assert config.providers


@pytest.mark.anyio
async def test_probes_and_ports_match_the_daemons_routes(
    manifests: dict[str, list[dict[str, Any]]], container: dict[str, Any], config: Config
) -> None:
    # The routes as the daemon registers them, from the ConfigMap's own config.
    engine = Engine(config, make_store(config.store), burst=False)
    api = Api(
        config=config,
        store=engine.store,
        engine=engine,
        stopping=lambda: False,
        jobs_added=lambda: None,
        token=None,
    )
    routes = {
        (r.method, r.resource.canonical)
        for r in api.build_app().router.routes()
        if r.resource is not None
    }
    _, listen_port = parse_listen(config.server.listen)

    probes = {
        name: container[name]["httpGet"]
        for name in ("livenessProbe", "readinessProbe", "startupProbe")
        if name in container
    }
    assert probes["livenessProbe"]["path"] == HEALTHZ_PATH
    assert probes["readinessProbe"]["path"] == READYZ_PATH
    for name, probe in probes.items():
        assert ("GET", probe["path"]) in routes, name
        assert port_number(container, probe["port"]) == listen_port, name

    service = only(manifests, "Service")
    (sport,) = service["spec"]["ports"]
    assert port_number(container, sport["targetPort"]) == listen_port
    notes = service["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == METRICS_PATH and ("GET", METRICS_PATH) in routes
    assert int(notes["prometheus.io/port"]) == listen_port
    labels = only(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_pod_runs_non_root_read_only_and_outlives_its_drain(
    manifests: dict[str, list[dict[str, Any]]], container: dict[str, Any], config: Config
) -> None:
    deployment = only(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1  # the sqlite store has one writer
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.server.drain_grace_s

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_mount = mounts[CONFIG_PATH]
    assert config_mount["readOnly"] is True
    assert volumes[config_mount["name"]]["configMap"]["name"] == "harvester-config"
    data = volumes[mounts[DATA_DIR]["name"]]
    assert (
        data["persistentVolumeClaim"]["claimName"]
        == only(manifests, "PersistentVolumeClaim")["metadata"]["name"]
    )
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert container.get("args", dockerfile_cmd()) == dockerfile_cmd()


def test_every_secret_the_config_names_comes_from_the_secret(
    manifests: dict[str, list[dict[str, Any]]], container: dict[str, Any], config: Config
) -> None:
    refs = [ref for p in config.providers.values() for ref in p.secrets()]
    refs += [r for r in (config.server.token, config.store.password) if r is not None]
    wanted = {ref.env for ref in refs}
    assert None not in wanted, "in the pod, secrets come from env vars (secretKeyRef)"
    env = {e["name"]: e for e in container["env"]}
    secret = only(manifests, "Secret")
    for name in wanted:
        ref = env[name]["valueFrom"]["secretKeyRef"]  # never a literal value
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"], name


# -- Dockerfile ---------------------------------------------------------------------------
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages


def dockerfile_cmd() -> list[str]:
    final = dockerfile_stages()[-1]
    (cmd,) = [json.loads(rest) for word, rest in final if word == "CMD"]
    return list(cmd)


def test_the_dockerfile_builds_a_small_non_root_image() -> None:
    preamble, *stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    args = dict(rest.split("=", 1) for word, rest in preamble if word == "ARG")
    for stage in stages:
        base = stage[0][1].split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        assert base == "python:3.11-slim"
    final = stages[-1]
    words = {word: rest for word, rest in final}

    user = words["USER"].split(":")
    assert int(user[0]) == UID and user[0] != "0"
    assert json.loads(words["ENTRYPOINT"]) == ["harvester"]
    assert json.loads(words["CMD"]) == ["run", "-c", CONFIG_PATH]
    assert DATA_DIR in words["VOLUME"]
    assert words["EXPOSE"].split()[0] == "8080"
    health = words["HEALTHCHECK"]
    assert HEALTHZ_PATH in health and "urllib" in health and "curl" not in health

    runs = " ".join(rest for word, rest in final if word == "RUN")
    assert "--no-index" in runs, "the runtime installs the built wheels, nothing fetched"
    installed = re.findall(r"pip install ([^&;]+)", runs)
    assert installed and all("[dev" not in i and "-e " not in i for i in installed)
    tokens = set(shlex.split(runs.replace("&&", " ")))
    for tool in ("pytest", "mypy", "ruff", "hypothesis", "gcc", "build-essential", "curl"):
        assert tool not in tokens, tool
    assert not any(word in ("COPY", "ADD") for word, _ in final), "no source in the runtime"


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # an allow-list: stores, outputs and .env files stay out
    assert {"!pyproject.toml", "!harvester/"} <= set(rules)
