"""The container and the Kubernetes manifests agree with the daemon and with Kubernetes.

Each variant (``configs/k8s``: one replica on sqlite; ``configs/k8s/replicas``: three on
PostgreSQL) is built with ``kubectl kustomize`` exactly as ``kubectl apply -k`` would, every
resource is validated strictly against the Kubernetes API schemas of a current release
(``kubernetes-validate``, offline), and then checked against the daemon itself: probe paths
are its routes, ports its listen port, every secret the config names is a file mounted from a
Secret, and the pod runs as the image's non-root user on a read-only root filesystem.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from ipaddress import ip_address, ip_network
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from harvester.api import HEALTHZ_PATH, METRICS_PATH, READYZ_PATH, Api
from harvester.config import Config, parse_config
from harvester.daemon import parse_listen
from harvester.engine import Engine
from harvester.store import make_store

from .helpers import REPO

K8S = REPO / "configs" / "k8s"
VARIANTS = {
    "single": K8S,
    "replicas": K8S / "replicas",
    "replicas-objstore": K8S / "replicas-objstore",
}
#: where each variant's own manifest files are (an overlay's are its base's)
SOURCES = {**VARIANTS, "replicas-objstore": K8S / "replicas"}
#: the Kubernetes release the manifests are validated against (strict: unknown fields fail)
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "harvester"
CONFIG_PATH = "/etc/harvester/config.toml"
DATA_DIR = "/var/lib/harvester"
UID = 10001
#: cloud metadata services: a pod that follows a redirect there could leak node credentials
METADATA = ("169.254.169.254", "fd00:ec2::254")

Manifests = dict[str, list[dict[str, Any]]]


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the kustomizations (kubectl kustomize)"
    out = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


def by_kind(docs: list[dict[str, Any]]) -> Manifests:
    kinds: Manifests = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def only(manifests: Manifests, kind: str) -> dict[str, Any]:
    (doc,) = manifests[kind]
    return doc


def example_secrets(folder: Path) -> dict[str, dict[str, Any]]:
    """The Secrets the variant expects to exist (examples, deliberately not applied)."""
    paths = sorted({K8S / "secret.example.yaml", folder / "secret.example.yaml"})
    docs = [yaml.safe_load(p.read_text()) for p in paths if p.exists()]
    return {d["metadata"]["name"]: d for d in docs}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def manifests(variant: str) -> Manifests:
    return by_kind(kustomize(VARIANTS[variant]))


@pytest.fixture(scope="module")
def container(manifests: Manifests) -> dict[str, Any]:
    (c,) = only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(c)


@pytest.fixture(scope="module")
def config(manifests: Manifests, variant: str) -> Config:
    text = only(manifests, "ConfigMap")["data"]["config.toml"]
    # Parsing reads no secret, so the config loads here exactly as it will in the pod, with
    # the environment the Deployment gives it (the example Secrets' placeholder values).
    secrets = example_secrets(SOURCES[variant])
    env = {
        e["name"]: secrets[e["valueFrom"]["secretKeyRef"]["name"]]["stringData"][
            e["valueFrom"]["secretKeyRef"]["key"]
        ]
        for e in only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0].get(
            "env", []
        )
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return parse_config(tomllib.loads(text), source=Path(CONFIG_PATH))


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p for p in container["ports"] if p.get("name") == port]
    return int(match["containerPort"])


def test_every_resource_is_valid_for_a_current_kubernetes(manifests: Manifests) -> None:
    for docs in manifests.values():
        for doc in docs:
            # raises ValidationError naming the field; strict: unknown fields are errors too
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_applies_every_manifest_but_the_examples(variant: str) -> None:
    if SOURCES[variant] != VARIANTS[variant]:  # an overlay: its base applies the files
        overlay = yaml.safe_load((VARIANTS[variant] / "kustomization.yaml").read_text())
        assert overlay["resources"] == [f"../{SOURCES[variant].name}"]
    folder = SOURCES[variant]
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    # servicemonitor.yaml needs the Prometheus Operator's CRD: applied by hand where present
    optional = {"secret.example.yaml", "servicemonitor.yaml"}
    assert set(kustomization["resources"]) == on_disk - optional
    for name, secret in example_secrets(folder).items():
        assert all("REPLACE-ME" in v for v in secret["stringData"].values()), name


def test_nothing_lands_in_the_default_namespace(manifests: Manifests) -> None:
    namespace = only(manifests, "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for kind, docs in manifests.items():
        if kind != "Namespace":
            assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs), kind


def test_the_configmap_is_a_valid_container_config(config: Config, variant: str) -> None:
    host, port = parse_listen(config.server.listen)
    assert host == "0.0.0.0", "inside a pod the daemon must listen on every interface"
    assert port == 8080
    if variant == "single":
        assert config.store.path is not None and config.store.path.is_relative_to(DATA_DIR)
    else:
        assert config.store.path is None and config.store.password is not None
    assert config.output.dir.is_relative_to(DATA_DIR)
    assert config.server.token is not None
    assert config.providers


@pytest.mark.anyio
async def test_probes_and_ports_match_the_daemons_routes(
    manifests: Manifests, container: dict[str, Any], config: Config
) -> None:
    # The routes as the daemon registers them, from the ConfigMap's own config (a sqlite
    # store stands in for PostgreSQL: the routes do not depend on the store).
    store = (
        config.store
        if config.store.path is not None
        else parse_config({"store": {"url": "sqlite://unused.db"}}, source=Path(CONFIG_PATH)).store
    )
    engine = Engine(config, make_store(store), burst=False)
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
    manifests: Manifests, container: dict[str, Any], config: Config, variant: str
) -> None:
    deployment = only(manifests, "Deployment")
    if variant == "single":
        assert deployment["spec"]["replicas"] == 1  # the sqlite store has one writer
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
    elif config.output.url is None:
        assert deployment["spec"]["replicas"] > 1
        assert only(manifests, "PersistentVolumeClaim")["spec"]["accessModes"] == [
            "ReadWriteMany"  # any replica may finish any job
        ]
    else:
        # Output in object storage: any replica may finish any job with no shared volume;
        # each pod stages on its own emptyDir.
        assert deployment["spec"]["replicas"] > 1
        assert "PersistentVolumeClaim" not in manifests
        assert config.output.dir.is_relative_to(DATA_DIR)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.server.drain_grace_s
    assert pod["automountServiceAccountToken"] is False

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
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
    if "PersistentVolumeClaim" in manifests:
        claim = only(manifests, "PersistentVolumeClaim")["metadata"]["name"]
        assert data["persistentVolumeClaim"]["claimName"] == claim
    else:
        assert set(data) == {"name", "emptyDir"}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert container.get("args", dockerfile_cmd()) == dockerfile_cmd()


def test_every_secret_the_config_names_is_a_file_mounted_from_a_secret(
    manifests: Manifests, container: dict[str, Any], config: Config, variant: str
) -> None:
    refs = [ref for p in config.providers.values() for ref in p.secrets()]
    refs += [r for r in (config.server.token, config.store.password) if r is not None]
    assert refs
    pod = only(manifests, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secrets = example_secrets(SOURCES[variant])
    for ref in refs:
        # Files, not environment variables: they stay out of `kubectl describe`, of crash
        # reports and of every child process's environment (scanners flag env secrets).
        assert ref.env is None and ref.file is not None, ref.key
        path = PurePosixPath(ref.file)
        (mount,) = [
            m for m in container["volumeMounts"] if path.parent == PurePosixPath(m["mountPath"])
        ]
        assert mount["readOnly"] is True, ref.key
        secret = volumes[mount["name"]]["secret"]
        # owner root, group fsGroup: readable by the pod's user, by nobody else
        assert secret["defaultMode"] == 0o440, ref.key
        keys = {i["path"]: i["key"] for i in secret.get("items", [])} or {
            k: k for k in secrets[secret["secretName"]]["stringData"]
        }
        assert keys[path.name] in secrets[secret["secretName"]]["stringData"], ref.key
    for env in container.get("env", []):
        assert "value" not in env or not env["name"].endswith(("KEY", "TOKEN", "PASSWORD"))


def test_the_network_policy_admits_the_api_and_keeps_metadata_out(
    manifests: Manifests, container: dict[str, Any], variant: str
) -> None:
    policy = only(manifests, "NetworkPolicy")["spec"]
    labels = only(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert [port_number(container, p["port"]) for p in ingress["ports"]] == [8080]

    def allowed(address: str, port: int) -> bool:
        for rule in policy["egress"]:
            if port not in [p["port"] for p in rule.get("ports", [])]:
                continue
            if "to" not in rule:
                return True
            for peer in rule["to"]:
                block = peer["ipBlock"]
                net = ip_network(block["cidr"])
                ip = ip_address(address)
                if (
                    ip.version == net.version
                    and ip in net
                    and not any(ip in ip_network(e) for e in block["except"])
                ):
                    return True
        return False

    assert allowed("203.0.113.7", 443) and allowed("2001:db8::7", 443)  # providers
    assert allowed("10.96.0.10", 53)  # DNS
    for address in METADATA:
        assert not allowed(address, 443) and not allowed(address, 80), address
    assert not allowed("203.0.113.7", 22)
    assert allowed("10.0.0.5", 5432) == (variant != "single")


def test_the_service_monitor_scrapes_the_daemons_metrics(
    manifests: Manifests, variant: str
) -> None:
    monitor = yaml.safe_load((SOURCES[variant] / "servicemonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    service = only(manifests, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == METRICS_PATH


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


def test_the_image_installs_only_pinned_versions_of_every_runtime_dependency() -> None:
    """constraints.txt (`make lock`) pins harvester[postgres,s3]'s whole runtime closure, each pin
    within pyproject's bounds, and the builder stage builds with it (hadolint DL3013)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    def name(text: str) -> str:
        return re.sub(r"[-_.]+", "-", text).lower()

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pkg, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name(pkg)] = version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in ("postgres", "s3"):  # the extras the image installs
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    seen: set[str] = set()
    while wanted:
        req = wanted.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name(req.name) in seen:
            continue
        seen.add(name(req.name))
        assert name(req.name) in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name(req.name)], prereleases=True), (req, pins)
        wanted += [Requirement(r) for r in distribution(req.name).requires or []]
    builder_runs = " ".join(rest for word, rest in dockerfile_stages()[1] if word == "RUN")
    assert "--constraint constraints.txt" in builder_runs


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # an allow-list: stores, outputs and .env files stay out
    assert {"!pyproject.toml", "!harvester/", "!constraints.txt"} <= set(rules)
