"""Azurite, Microsoft's Azure Storage emulator (npm package ``azurite``), for the tests.

It is an implementation of Azure Blob written by Microsoft independently of ours: SAS
validation with the storage account key, List Blobs paging, Get Blob ranges and MD5s. The
blob service is started once per test session on a free loopback port (``--blobPort 0``;
the port it took is read from its start-up line), keeping blobs in memory, in a temporary
folder that is removed afterwards. Telemetry is switched off: the tests reach nothing but
loopback.

The binary comes from ``npm install -g azurite`` (``.ci/run`` does it). Where it cannot be
found the tests that need it are skipped with a message saying so, unless
``HARVESTER_REQUIRE_AZURITE`` is set (CI sets it): there, a missing Azurite is a failure.
"""

from __future__ import annotations

import re
import shutil
import time
from typing import NoReturn

import pytest

from tests.required import ChildServer, start_for_session, unavailable

REQUIRE_ENV = "HARVESTER_REQUIRE_AZURITE"
#: Azurite's well-known development account (public: it is printed in Microsoft's docs)
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
START_TIMEOUT_S = 60.0
_LISTENING = re.compile(r"Blob service successfully listens on (http://127\.0\.0\.1:\d+)")


class Azurite(ChildServer):
    """One ``azurite-blob`` process, running until ``stop()``."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        super().__init__("harvester-azurite-")
        self.endpoint = ""  #: http://127.0.0.1:PORT; the account's URL is endpoint/ACCOUNT

    @property
    def account_url(self) -> str:
        return f"{self.endpoint}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.account_url};"
        )

    def start(self) -> None:
        args = [
            self.binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--extentMemoryLimit",
            "512",
            "--disableTelemetry",
            # azure-storage-blob may speak a newer service version than this Azurite knows.
            "--skipApiVersionCheck",
            "--silent",
        ]
        proc = self.spawn(args)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = _LISTENING.search(self.log())
            if found:
                self.endpoint = found.group(1)
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)  # waiting for a child's start-up line; bounded by the deadline
        raise RuntimeError(f"Azurite did not start in {START_TIMEOUT_S:.0f} s:\n{self.log()}")


_SERVER: Azurite | None = None


def shared_azurite(config: pytest.Config) -> Azurite:
    """The session's Azurite, started on first use and stopped when the session ends."""
    global _SERVER
    if _SERVER is not None:
        return _SERVER
    binary = shutil.which("azurite-blob")
    if binary is None:
        _missing(
            "no azurite-blob on PATH; install it with `npm install -g azurite`"
            " (Node.js and npm: apt-get install nodejs npm)"
        )
    try:
        import azure.storage.blob  # noqa: F401
    except ImportError:
        _missing("azure-storage-blob is not installed (pip install -e '.[dev]')")
    assert binary is not None
    _SERVER = start_for_session(Azurite(binary), config)
    return _SERVER


def _missing(why: str) -> NoReturn:
    unavailable("Azurite", REQUIRE_ENV, why)
