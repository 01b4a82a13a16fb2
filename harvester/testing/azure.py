"""Azure blob containers in memory, reached by SAS URLs (Bentley's output reality data).

The SAS is the emulator's (``SasSigner``, on the engine's wall clock) and the listing XML is
the emulator's (``listing_page``, ``enumeration_xml``), so harvester's container walk meets
the same answers it meets over HTTP: paged ``List Blobs`` with ``NextMarker``, each blob's
``Content-Length`` and ``Content-MD5``, and blob reads (whole or ranged) checked against them.
What the containers hold comes from the caller (``lister``, ``reader``).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from urllib.parse import unquote
from xml.sax.saxutils import escape

from harvester.clock import Clock
from harvester.emulator.azure import (
    BlobEntry,
    ListingError,
    SasSigner,
    SasVerdict,
    content_type,
    enumeration_xml,
    listing_page,
)
from harvester.testing.network import MemoryAnswer, MemoryRequest, serve_bytes

__all__ = ["MemoryContainers"]

#: container -> its blobs, or None when it does not exist (yet)
Lister = Callable[[str], list[BlobEntry] | None]
#: (container, blob name) -> the blob's bytes, or None
Reader = Callable[[str, str], bytes | None]


class MemoryContainers:
    """Containers at ``<origin><prefix><container>``, each blob at ``.../<container>/<name>``."""

    def __init__(
        self,
        clock: Clock,
        origin: str,
        lister: Lister,
        reader: Reader,
        *,
        prefix: str = "/",
        sas_ttl_s: float = 3600.0,
        page_size: int = 5000,
    ) -> None:
        self.origin = origin.rstrip("/")
        self.prefix = prefix
        self.signer = SasSigner(ttl_s=sas_ttl_s, wall_clock=clock.wall)
        self.lister = lister
        self.reader = reader
        self.page_size = page_size
        self.listings = 0
        self.reads = 0

    def container_url(self, container: str, *, expired: bool = False) -> str:
        return (
            f"{self.origin}{self.prefix}{container}?{self.signer.query(container, expired=expired)}"
        )

    async def handle(self, req: MemoryRequest) -> MemoryAnswer:
        if req.method != "GET" or not req.path.startswith(self.prefix):
            return _error(400, "UnsupportedHttpVerb", f"{req.method} {req.path}")
        container, _, quoted = req.path[len(self.prefix) :].partition("/")
        check = self.signer.check(container, req.query)
        if check.verdict is SasVerdict.UNSIGNED:
            return _error(404, "ResourceNotFound", "The specified resource does not exist.")
        if check.verdict is not SasVerdict.VALID:
            return _error(403, "AuthenticationFailed", f"SAS {check.verdict.value}")
        blobs = self.lister(container)
        if blobs is None:
            return _error(404, "ContainerNotFound", "The specified container does not exist.")
        if quoted:
            return self._read(req, container, unquote(quoted), blobs)
        if req.query.get("restype") != "container" or req.query.get("comp") != "list":
            return _error(400, "InvalidQueryParameterValue", "only restype=container&comp=list")
        try:
            page, next_marker = listing_page(blobs, req.query, self.page_size)
        except ListingError as exc:
            return _error(400, "InvalidQueryParameterValue", str(exc))
        md5s = {name: self._md5(container, name) for name, blob in page if blob is not None}
        self.listings += 1
        body = enumeration_xml(
            self.origin + self.prefix, container, req.query, page, md5s, next_marker
        )
        return MemoryAnswer(200, body.encode(), {"Content-Type": "application/xml"})

    def _read(
        self, req: MemoryRequest, container: str, name: str, blobs: list[BlobEntry]
    ) -> MemoryAnswer:
        body = self.reader(container, name) if any(b.name == name for b in blobs) else None
        if body is None:
            return _error(404, "BlobNotFound", "The specified blob does not exist.")
        self.reads += 1
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        # Azure: x-ms-range exists for clients that cannot send Range, and wins over it; a
        # whole read carries the blob's MD5 as Content-MD5, a ranged one as x-ms-blob-content-md5.
        asked = req.headers.get("x-ms-range") or req.headers.get("range")
        md5_header = "x-ms-blob-content-md5" if asked else "Content-MD5"
        return serve_bytes(body, asked, {"Content-Type": content_type(name), md5_header: md5})

    def _md5(self, container: str, name: str) -> bytes:
        body = self.reader(container, name)
        return hashlib.md5(body or b"", usedforsecurity=False).digest()


def _error(status: int, code: str, message: str) -> MemoryAnswer:
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
    )
    return MemoryAnswer(
        status, body.encode(), {"Content-Type": "application/xml", "x-ms-error-code": code}
    )
