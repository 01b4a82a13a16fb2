"""Azure-blob-style containers on the storage host, for Bentley's reality data.

A container URL is ``<storage>/bentley/<container>?sv=..&sr=c&sp=rl&se=<expiry>&sig=<hmac>``:
a container-level SAS that lets its holder list the container
(``?restype=container&comp=list[&prefix][&delimiter][&marker][&maxresults]`` → the List Blobs
XML, paginated by ``NextMarker``) and read each blob (``<container>/<blob path>?<same SAS>``).
Only the shape of Azure's SAS is imitated: the signature is an HMAC over the container and the
signed fields under a per-process secret, which is all a client can observe.

Errors are Azure's XML (``<Error><Code>..</Code><Message>..</Message></Error>`` plus an
``x-ms-error-code`` header): 403 ``AuthenticationFailed`` for a forged or expired SAS, 404
``ResourceNotFound`` without one (a private container does not admit it exists), 404
``ContainerNotFound`` / ``BlobNotFound``, 400 for bad query parameters.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import calendar
import enum
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web

from harvester.emulator.storage import StorageHost
from harvester.emulator.timefmt import http_date

SAS_VERSION = "2021-08-06"
_SE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_EXPIRED_MARGIN_S = 60  # a pre-expired SAS ran out this long ago: no clock skew revives it
MAX_RESULTS = 5000


class SasVerdict(enum.Enum):
    VALID = "valid"
    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class SasCheck:
    verdict: SasVerdict
    permissions: str = ""
    expiry: str = ""


class SasSigner:
    def __init__(self, *, ttl_s: float, wall_clock: Callable[[], float] = time.time) -> None:
        self._secret = secrets.token_bytes(32)
        self._ttl = ttl_s
        self._clock = wall_clock

    def query(self, container: str, *, expired: bool = False) -> str:
        now = self._clock()
        expiry = now - _EXPIRED_MARGIN_S if expired else now + self._ttl
        se = time.strftime(_SE_FORMAT, time.gmtime(expiry))
        fields = {"sv": SAS_VERSION, "sr": "c", "sp": "rl", "se": se}
        return urlencode({**fields, "sig": self._signature(container, fields)})

    def check(self, container: str, params: Mapping[str, str]) -> SasCheck:
        if "sig" not in params:
            return SasCheck(SasVerdict.UNSIGNED)
        fields = {k: params.get(k, "") for k in ("sv", "sr", "sp", "se")}
        try:
            expiry = calendar.timegm(time.strptime(fields["se"], _SE_FORMAT))
        except ValueError:
            return SasCheck(SasVerdict.MALFORMED)
        if not hmac.compare_digest(self._signature(container, fields), params["sig"]):
            return SasCheck(SasVerdict.BAD_SIGNATURE)
        verdict = SasVerdict.EXPIRED if self._clock() >= expiry else SasVerdict.VALID
        return SasCheck(verdict, fields["sp"], fields["se"])

    def _signature(self, container: str, fields: Mapping[str, str]) -> str:
        msg = "\n".join(
            (fields["sp"], fields["se"], f"/blob/emulator/{container}", fields["sv"], fields["sr"])
        )
        return base64.b64encode(
            hmac.new(self._secret, msg.encode(), hashlib.sha256).digest()
        ).decode()


@dataclass(frozen=True, slots=True)
class BlobEntry:
    name: str
    size: int
    modified: float  # epoch seconds


# container -> its blobs (sorted by name), or None when no such container exists now.
Lister = Callable[[str], list[BlobEntry] | None]


def azure_error(
    status: int, code: str, message: str, extra: dict[str, str] | None = None
) -> web.Response:
    request_id = str(uuid.uuid4())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime())
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (extra or {}).items())
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{code}</Code><Message>{escape(message)}\n"
        f"RequestId:{request_id}\nTime:{stamp}</Message>{fields}</Error>"
    )
    headers = {"x-ms-error-code": code, "x-ms-request-id": request_id, "x-ms-version": SAS_VERSION}
    return web.Response(text=body, status=status, content_type="application/xml", headers=headers)


def _auth_failed(detail: str) -> web.Response:
    return azure_error(
        403,
        "AuthenticationFailed",
        "Server failed to authenticate the request. Make sure the value of Authorization "
        "header is formed correctly including the signature.",
        {"AuthenticationErrorDetail": detail},
    )


def _bad_query(name: str, value: str, reason: str) -> web.Response:
    return azure_error(
        400,
        "InvalidQueryParameterValue",
        "Value for one of the query parameters specified in the request URI is invalid.",
        {"QueryParameterName": name, "QueryParameterValue": value, "Reason": reason},
    )


class AzureContainers:
    """Serves ``<prefix><container>[/<blob>]`` on the storage host."""

    def __init__(
        self, storage: StorageHost, prefix: str, signer: SasSigner, lister: Lister
    ) -> None:
        self._storage = storage
        self._prefix = prefix
        self._signer = signer
        self._lister = lister
        self.page_size = MAX_RESULTS
        self.rejected_expired = 0
        self.listings = 0

    def container_url(self, container: str, *, expired: bool = False) -> str:
        query = self._signer.query(container, expired=expired)
        return f"{self._storage.private_url(self._prefix + container)}?{query}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._storage.leaked_credential(request) is not None:
            return azure_error(
                400,
                "InvalidAuthenticationInfo",
                "Authentication information is not given in the correct format. A SAS and "
                "an Authorization header cannot be combined.",
            )
        container, _, blob = request.path[len(self._prefix) :].partition("/")
        check = self._signer.check(container, request.query)
        if check.verdict is SasVerdict.UNSIGNED:
            return azure_error(404, "ResourceNotFound", "The specified resource does not exist.")
        if check.verdict is SasVerdict.MALFORMED:
            return _auth_failed("Signature fields not well formed.")
        if check.verdict is SasVerdict.BAD_SIGNATURE:
            return _auth_failed("Signature did not match.")
        if check.verdict is SasVerdict.EXPIRED:
            self.rejected_expired += 1
            return _auth_failed(
                f"Signed expiry time [{check.expiry}] must be after signed start time "
                f"[{time.strftime(_SE_FORMAT, time.gmtime())}]"
            )
        blobs = self._lister(container)
        if blobs is None:
            return azure_error(404, "ContainerNotFound", "The specified container does not exist.")
        if blob:
            if "r" not in check.permissions:
                return _permission_mismatch()
            return await self._read(request, blobs)
        if request.query.get("restype") != "container" or request.query.get("comp") != "list":
            return _bad_query(
                "comp", request.query.get("comp", ""), "only restype=container&comp=list"
            )
        if "l" not in check.permissions:
            return _permission_mismatch()
        return self._list(request, container, blobs)

    async def _read(self, request: web.Request, blobs: list[BlobEntry]) -> web.StreamResponse:
        obj = await self._storage.objects.get(request.path)
        if obj is None:
            return azure_error(404, "BlobNotFound", "The specified blob does not exist.")
        name = request.path[len(self._prefix) :].partition("/")[2]
        entry = next((b for b in blobs if b.name == name), None)
        headers = {
            "x-ms-blob-type": "BlockBlob",
            "x-ms-version": SAS_VERSION,
            "x-ms-request-id": str(uuid.uuid4()),
            "Last-Modified": http_date(entry.modified if entry else time.time()),
        }
        return await self._storage.send_object(request, obj, headers, _invalid_range)

    def _list(
        self, request: web.Request, container: str, blobs: list[BlobEntry]
    ) -> web.StreamResponse:
        q = request.query
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        limit = min(self.page_size, MAX_RESULTS)
        if "maxresults" in q:
            raw = q["maxresults"]
            if not raw.isdigit() or int(raw) < 1:
                return _bad_query("maxresults", raw, "must be a positive integer")
            limit = min(limit, int(raw))
        entries = _entries(blobs, prefix, delimiter)
        start = 0
        if q.get("marker"):
            after = _decode_marker(q["marker"])
            if after is None:
                return _bad_query("marker", q["marker"], "not a marker this service issued")
            start = bisect.bisect_left([name for name, _ in entries], after)
        page = entries[start : start + limit]
        more = start + limit < len(entries)
        self.listings += 1
        body = _enumeration_xml(
            self._storage.private_url(self._prefix),
            container,
            q,
            page,
            _encode_marker(entries[start + limit][0]) if more else "",
        )
        headers = {"x-ms-version": SAS_VERSION, "x-ms-request-id": str(uuid.uuid4())}
        return web.Response(
            text=body, content_type="application/xml", charset="utf-8", headers=headers
        )


def _entries(
    blobs: list[BlobEntry], prefix: str, delimiter: str
) -> list[tuple[str, BlobEntry | None]]:
    """Sorted listing entries: (name, blob) for blobs, (name, None) for virtual directories
    when a delimiter groups deeper names (``BlobPrefix`` in the XML)."""
    out: dict[str, BlobEntry | None] = {}
    for blob in blobs:
        if not blob.name.startswith(prefix):
            continue
        rest = blob.name[len(prefix) :]
        cut = rest.find(delimiter) if delimiter else -1
        if cut >= 0:
            out.setdefault(prefix + rest[: cut + len(delimiter)], None)
        else:
            out[blob.name] = blob
    return sorted(out.items())


def _enumeration_xml(
    endpoint: str,
    container: str,
    q: Mapping[str, str],
    page: list[tuple[str, BlobEntry | None]],
    next_marker: str,
) -> str:
    parts = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f"<EnumerationResults ServiceEndpoint={quoteattr(endpoint)} "
        f"ContainerName={quoteattr(container)}>",
    ]
    for key, tag in (
        ("prefix", "Prefix"),
        ("marker", "Marker"),
        ("maxresults", "MaxResults"),
        ("delimiter", "Delimiter"),
    ):
        if key in q:
            parts.append(f"<{tag}>{escape(q[key])}</{tag}>")
    parts.append("<Blobs>")
    for name, blob in page:
        if blob is None:
            parts.append(f"<BlobPrefix><Name>{escape(name)}</Name></BlobPrefix>")
            continue
        modified = http_date(blob.modified)
        parts.append(
            f"<Blob><Name>{escape(name)}</Name><Properties>"
            f"<Creation-Time>{modified}</Creation-Time><Last-Modified>{modified}</Last-Modified>"
            f"<Content-Length>{blob.size}</Content-Length>"
            f"<Content-Type>{content_type(name)}</Content-Type>"
            "<BlobType>BlockBlob</BlobType><LeaseStatus>unlocked</LeaseStatus>"
            "<LeaseState>available</LeaseState><ServerEncrypted>true</ServerEncrypted>"
            "</Properties><OrMetadata /></Blob>"
        )
    parts.append("</Blobs>")
    parts.append(f"<NextMarker>{next_marker}</NextMarker>" if next_marker else "<NextMarker />")
    parts.append("</EnumerationResults>")
    return "".join(parts)


def content_type(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"


def _encode_marker(name: str) -> str:
    # Opaque to clients, as Azure's markers are; it names the first entry of the next page.
    return "2!" + base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_marker(marker: str) -> str | None:
    if not marker.startswith("2!"):
        return None
    raw = marker[2:]
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _permission_mismatch() -> web.Response:
    return azure_error(
        403,
        "AuthorizationPermissionMismatch",
        "This request is not authorized to perform this operation using this permission.",
    )


def _invalid_range(header: str, total: int) -> web.StreamResponse:
    return azure_error(
        416,
        "InvalidRange",
        "The range specified is invalid for the current size of the resource.",
        {"RangeRequested": header, "ActualObjectSize": str(total)},
    )
