"""The container image, built with `make image` and run as Kubernetes would run it.

The daemon runs inside the image as uid 10001 on a read-only root filesystem, with its store
and output on a mounted volume and its config mounted read-only, against the emulator on the
host (host network). Jobs posted to it are harvested into the volume, every MANIFEST.json
verifies from the host, and SIGTERM drains it to exit 0.

Needs a Docker engine, or buildah + podman (Debian packages; `.ci/run` installs them). Where
neither is present the tests are skipped with that reason, unless HARVESTER_REQUIRE_IMAGE is
set (CI sets it): there a missing tool fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from tests.emulated import StartEmulator
from tests.required import unavailable

from .helpers import (
    API_KEY,
    REPO,
    DaemonProcess,
    child_env,
    emulator_stats,
    free_port,
    job_line,
    jsonl,
)

REQUIRE_ENV = "HARVESTER_REQUIRE_IMAGE"
IMAGE = os.environ.get("HARVESTER_TEST_IMAGE", "localhost/harvester:test")
UID = 10001
BUILD_S = 900  # a cold build assembles a Debian base and fetches every wheel
IN_IMAGE_CONFIG = "/etc/harvester/config.toml"
VOLUME = "/var/lib/harvester"


def runner() -> list[str] | None:
    """The command that runs containers here, or None."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0:
        return [docker]
    podman = shutil.which("podman")
    if podman and shutil.which("buildah"):
        # runc with cgroupfs: crun refuses hybrid cgroup hierarchies (CI VMs have them), and
        # the systemd cgroup manager needs a systemd that sandboxes lack.
        return [podman, "--runtime", shutil.which("runc") or "runc", "--cgroup-manager", "cgroupfs"]
    return None


@pytest.fixture(scope="module")
def engine_cmd() -> list[str]:
    cmd = runner()
    if cmd is None:
        unavailable(
            "a container engine", REQUIRE_ENV, "there is no Docker engine and no buildah + podman"
        )
    return cmd


@pytest.fixture(scope="module")
def image(engine_cmd: list[str]) -> Iterator[str]:
    """`make image` builds it (the same script a user runs)."""
    build = subprocess.run(
        ["bash", str(REPO / "configs" / "image.sh")],
        env={**os.environ, "IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=BUILD_S,
        cwd=REPO,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    yield IMAGE


def inspect(engine_cmd: list[str], image: str) -> dict[str, Any]:
    out = subprocess.run(
        [*engine_cmd, "image", "inspect", image], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    (doc,) = json.loads(out.stdout)
    return dict(doc)


def run_flags(engine_cmd: list[str]) -> list[str]:
    flags = ["--rm", "--read-only", "--user", f"{UID}:{UID}", "--network", "host"]
    if "podman" in Path(engine_cmd[0]).name:
        # below this machine's own limits: raising a limit needs a privilege CI lacks
        flags += ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
    return flags


def test_the_image_carries_its_labels_user_and_entrypoint(
    engine_cmd: list[str], image: str
) -> None:
    doc = inspect(engine_cmd, image)
    config = doc.get("Config") or doc["config"]
    labels = config.get("Labels") or {}
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["harvester"]

    out = subprocess.run(
        [*engine_cmd, "run", *run_flags(engine_cmd), image, "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["harvester", version]


class ContainerDaemon(DaemonProcess):
    """`harvester run` inside the image: the same API client, another process underneath."""

    def __init__(
        self, engine_cmd: list[str], image: str, data: Path, port: int, session: Any
    ) -> None:
        super().__init__(data.parent / "config.toml", port, session, env={})
        self.engine_cmd = engine_cmd
        self.image = image
        self.data = data
        self.name = f"harvester-test-{port}"

    async def start(self) -> None:
        self._log_file = self._open_log()
        self.proc = await anyio.open_process(
            [
                *self.engine_cmd,
                "run",
                "--name",
                self.name,
                *run_flags(self.engine_cmd),
                "-v",
                f"{self.data}:{VOLUME}",
                "-v",
                f"{self.config}:{IN_IMAGE_CONFIG}:ro",
                "-e",
                f"PLAYMENT_API_KEY={API_KEY}",
                self.image,
            ],
            stdin=None,
            stdout=self._log_file,
            stderr=self._log_file,
        )

    def signal(self, sig: signal.Signals) -> None:
        # to the process inside, as `docker stop` / the kubelet deliver it
        subprocess.run(
            [*self.engine_cmd, "kill", "--signal", sig.name, self.name],
            capture_output=True,
            timeout=30,
        )

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await anyio.run_process([*self.engine_cmd, "rm", "-f", self.name], check=False)
        await super().kill()


@pytest.mark.anyio
async def test_the_daemon_in_the_image_harvests_into_its_volume_and_drains(
    engine_cmd: list[str],
    image: str,
    tmp_path: Path,
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
) -> None:
    emu = await start_emulator()
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, UID, UID)  # what fsGroup does for the pod's volume
    settings = f"""
[store]
url = "sqlite://{VOLUME}/state.db"

[output]
dir = "{VOLUME}/output"

[server]
listen = "127.0.0.1:{port}"
drain_grace_s = 10

[log]
format = "json"

[providers.playment]
base_url = "{emu.urls["playment"]}"
api_key_env = "PLAYMENT_API_KEY"
project_id = "proj-image"
rate_per_s = 0
poll_min_s = 0.2
poll_max_s = 1
"""
    (tmp_path / "config.toml").write_text(settings)
    daemon = ContainerDaemon(engine_cmd, image, data, port, session)
    try:
        await daemon.start()
        await daemon.wait_ready(within=60)
        status, _ = await daemon.get("/healthz")
        assert status == 200

        keys = [f"img-{i}" for i in range(4)]
        status, answer = await daemon.post("/jobs", jsonl(job_line(k, frames=2) for k in keys))
        assert status == 201, answer
        for key in keys:
            await daemon.wait_job(key, "harvested", within=60)

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(within=30) == 0, daemon.log()
    finally:
        await daemon.kill()

    # From the host, as an operator would: every job folder is complete and verifies.
    host_config = tmp_path / "host.toml"
    host_config.write_text(
        settings.replace(f"sqlite://{VOLUME}", f"sqlite://{data}").replace(
            f'"{VOLUME}/output"', f'"{data}/output"'
        )
    )
    manifests = sorted((data / "output" / "playment").glob("*/MANIFEST.json"))
    assert [m.parent.name for m in manifests] == sorted(keys)
    for manifest in manifests:
        assert manifest.stat().st_uid == UID  # written by the image's user, not root
    check = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "harvester.cli",
            "status",
            "-c",
            str(host_config),
            "--check",
            "--json",
        ],
        check=False,
        env=child_env(),
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    doc = json.loads(check.stdout)
    assert doc["check"] == [] and doc["checked"]["harvested_jobs"] == len(keys), doc
    stats = await emulator_stats(emu, session)
    assert stats["playment"]["creates"] == len(keys), stats
    assert stats["playment"]["duplicate_creates"] == 0
