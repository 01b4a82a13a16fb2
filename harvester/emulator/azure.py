"""Azure-blob-style containers on the storage host, for Bentley's reality data.

A container URL is ``<storage>/bentley/<container>?sv=..&sr=c&sp=rl&se=<expiry>&sig=<hmac>``:
a container-level SAS that lets its holder list the container
(``?restype=container&comp=list[&prefix][&delimiter][&marker][&maxresults]`` → the List Blobs
XML, paginated by ``NextMarker``) and read each blob (``<container>/<blob path>?<same SAS>``).
Only the shape of Azure's SAS is imitated: the signature is an HMAC over the container and the
signed fields under a per-process secret, which is all a client can observe.

Get Blob follows Azure's rules as Microsoft's ``azure-storage-blob`` client relies on them:
``x-ms-range`` wins over ``Range``; a ranged read answers 206 with ``Content-Range`` and the
whole blob's MD5 in ``x-ms-blob-content-md5`` (plus the range's own ``Content-MD5`` when
``x-ms-range-get-content-md5: true`` asks for it, up to 4 MiB); a whole read carries
``Content-MD5``; a range past the end (and any range of an empty blob) is 416 ``InvalidRange``
with ``Content-Range: bytes */<size>``. Every answer names the service version in
``x-ms-version``: the request's own, else the SAS's ``sv``. Listings carry each blob's
``Etag`` and ``Content-MD5`` (base64), as Azure's do.

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
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web

from harvester.emulator.storage import StorageHost, parse_range
from harvester.emulator.timefmt import http_date

SAS_VERSION = "2021-08-06"
_SE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_EXPIRED_MARGIN_S = 60  # a pre-expired SAS ran out this long ago: no clock skew revives it
MAX_RESULTS = 5000
#: Azure computes a range's own Content-MD5 only up to this size
MAX_RANGE_MD5 = 4 << 20
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


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
#: blob path on the storage host -> the bytes served for one read (a fault may alter them)
Corrupter = Callable[[str, bytes], bytes]


def azure_error(
    status: int,
    code: str,
    message: str,
    extra: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    request_id = str(uuid.uuid4())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime())
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in (extra or {}).items())
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        f"<Error><Code>{code}</Code><Message>{escape(message)}\n"
        f"RequestId:{request_id}\nTime:{stamp}</Message>{fields}</Error>"
    )
    sent = {"x-ms-request-id": request_id, "x-ms-version": SAS_VERSION, **(headers or {})}
    sent["x-ms-error-code"] = code
    return web.Response(text=body, status=status, content_type="application/xml", headers=sent)


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
        self,
        storage: StorageHost,
        prefix: str,
        signer: SasSigner,
        lister: Lister,
        corrupter: Corrupter | None = None,
    ) -> None:
        self._storage = storage
        self._prefix = prefix
        self._signer = signer
        self._lister = lister
        self._corrupter = corrupter
        self._md5s: dict[str, bytes] = {}
        self.page_size = MAX_RESULTS
        self.rejected_expired = 0
        self.listings = 0

    def container_url(self, container: str, *, expired: bool = False) -> str:
        query = self._signer.query(container, expired=expired)
        return f"{self._storage.private_url(self._prefix + container)}?{query}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        common = {
            "x-ms-request-id": str(uuid.uuid4()),
            "x-ms-version": request.query.get("sv") or SAS_VERSION,
        }
        if "x-ms-client-request-id" in request.headers:
            common["x-ms-client-request-id"] = request.headers["x-ms-client-request-id"][:1024]
        version = request.headers.get("x-ms-version")
        if version is not None and not _VERSION.match(version):
            return azure_error(
                400,
                "InvalidHeaderValue",
                "The value for one of the HTTP headers is not in the correct format.",
                {"HeaderName": "x-ms-version", "HeaderValue": version[:100]},
                common,
            )
        if version is not None:
            common["x-ms-version"] = version
        response = await self._handle(request, common)
        if not response.prepared:
            response.headers.update(common)
        return response

    async def _handle(self, request: web.Request, common: dict[str, str]) -> web.StreamResponse:
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
            return await self._read(request, blobs, common)
        if request.query.get("restype") != "container" or request.query.get("comp") != "list":
            return _bad_query(
                "comp", request.query.get("comp", ""), "only restype=container&comp=list"
            )
        if "l" not in check.permissions:
            return _permission_mismatch()
        return await self._list(request, container, blobs)

    async def _read(
        self, request: web.Request, blobs: list[BlobEntry], common: dict[str, str]
    ) -> web.StreamResponse:
        obj = await self._storage.objects.get(request.path)
        if obj is None:
            return azure_error(404, "BlobNotFound", "The specified blob does not exist.")
        self._md5s[request.path] = obj.md5
        name = request.path[len(self._prefix) :].partition("/")[2]
        entry = next((b for b in blobs if b.name == name), None)
        total = len(obj.body)
        # Azure: x-ms-range exists for clients that cannot send Range, and wins over it.
        asked = request.headers.get("x-ms-range") or request.headers.get("Range")
        want_range_md5 = request.headers.get("x-ms-range-get-content-md5", "").lower() == "true"
        span = None
        if asked is not None:
            span = parse_range(asked, total)
            if span is None:
                return _invalid_range(asked, total)
        if want_range_md5 and (span is None or span[1] - span[0] > MAX_RANGE_MD5):
            return azure_error(
                400,
                "InvalidHeaderValue" if span is None else "OutOfRangeInput",
                "x-ms-range-get-content-md5 needs a range of at most 4 MiB.",
                {"HeaderName": "x-ms-range-get-content-md5"},
            )
        etag = f'"{_etag(obj.md5)}"'
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match.strip() not in ("*", etag):
            return azure_error(
                412,
                "ConditionNotMet",
                "The condition specified using HTTP conditional header(s) is not met.",
            )
        headers = {
            **common,
            "ETag": etag,
            "x-ms-blob-type": "BlockBlob",
            "x-ms-lease-state": "available",
            "x-ms-lease-status": "unlocked",
            "x-ms-server-encrypted": "true",
            "Last-Modified": http_date(entry.modified if entry else time.time()),
        }
        digest = base64.b64encode(obj.md5).decode()
        if span is None:
            headers["Content-MD5"] = digest
        else:
            headers["x-ms-blob-content-md5"] = digest
            if want_range_md5:
                part = obj.body[span[0] : span[1]]
                md5 = hashlib.md5(part, usedforsecurity=False).digest()
                headers["Content-MD5"] = base64.b64encode(md5).decode()
        body = self._corrupter(request.path, obj.body) if self._corrupter else None
        return await self._storage.send_object(request, obj, headers, span=span, body=body)

    async def _md5(self, container: str, name: str) -> bytes:
        """A blob's MD5 for its listing: remembered, else produced (and cached) like a read."""
        path = f"{self._prefix}{container}/{name}"
        known = self._md5s.get(path)
        if known is None:
            obj = await self._storage.objects.get(path)
            if obj is None:
                return b""
            known = self._md5s[path] = obj.md5
        return known

    async def _list(
        self, request: web.Request, container: str, blobs: list[BlobEntry]
    ) -> web.StreamResponse:
        q = request.query
        try:
            page, next_marker = listing_page(blobs, q, self.page_size)
        except ListingError as exc:
            return _bad_query(exc.name, exc.value, exc.reason)
        self.listings += 1
        md5s = {name: await self._md5(container, name) for name, blob in page if blob}
        body = enumeration_xml(
            self._storage.private_url(self._prefix), container, q, page, md5s, next_marker
        )
        return web.Response(text=body, content_type="application/xml", charset="utf-8")


class ListingError(ValueError):
    """A listing query parameter Azure refuses (400 ``InvalidQueryParameterValue``)."""

    def __init__(self, name: str, value: str, reason: str) -> None:
        super().__init__(f"{name}={value!r}: {reason}")
        self.name, self.value, self.reason = name, value, reason


def listing_page(
    blobs: list[BlobEntry], q: Mapping[str, str], page_size: int = MAX_RESULTS
) -> tuple[list[tuple[str, BlobEntry | None]], str]:
    """The entries of one List Blobs page (``prefix``, ``delimiter``, ``marker``,
    ``maxresults`` from the query) and the marker of the next page ("" on the last)."""
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    limit = min(page_size, MAX_RESULTS)
    if "maxresults" in q:
        raw = q["maxresults"]
        if not raw.isdigit() or int(raw) < 1:
            raise ListingError("maxresults", raw, "must be a positive integer")
        limit = min(limit, int(raw))
    entries = _entries(blobs, prefix, delimiter)
    start = 0
    if q.get("marker"):
        after = _decode_marker(q["marker"])
        if after is None:
            raise ListingError("marker", q["marker"], "not a marker this service issued")
        start = bisect.bisect_left([name for name, _ in entries], after)
    more = start + limit < len(entries)
    return entries[start : start + limit], _encode_marker(entries[start + limit][0]) if more else ""


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


def enumeration_xml(
    endpoint: str,
    container: str,
    q: Mapping[str, str],
    page: list[tuple[str, BlobEntry | None]],
    md5s: Mapping[str, bytes],
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
        md5 = md5s.get(name, b"")
        etag = _etag(md5) if md5 else ""
        parts.append(
            f"<Blob><Name>{escape(name)}</Name><Properties>"
            f"<Creation-Time>{modified}</Creation-Time><Last-Modified>{modified}</Last-Modified>"
            f"<Etag>{etag}</Etag><Content-Length>{blob.size}</Content-Length>"
            f"<Content-Type>{content_type(name)}</Content-Type>"
            f"<Content-MD5>{base64.b64encode(md5).decode()}</Content-MD5>"
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


def _etag(md5: bytes) -> str:
    # Azure's ETags are opaque "0x" + hex; the content's digest makes one that changes with it.
    return f"0x{md5[:8].hex().upper()}"


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
        {"RangeRequested": header[:100], "ActualObjectSize": str(total)},
        {"Content-Range": f"bytes */{total}"},
    )
