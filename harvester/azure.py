"""Azure Blob Storage, as far as harvester reads it: container listings and blob URLs (pure).

Bentley hands out reality data as an Azure blob container URL carrying a SAS token in its
query. Listing it (``?restype=container&comp=list``) answers XML, 5000 blobs a page, with a
``NextMarker`` to continue from; each blob's ``Content-Length`` and (when the blob has one)
``Content-MD5``, base64, are what its download is checked against. Everything here is a
pure function on strings and bytes, so it is tested without storage; the requests go through
the caller's ``HarvestIO`` (``providers.azure_container``).

Blob names come from the provider and become file paths under a job's folder, so they are
treated as hostile: ``safe_blob_path`` turns a name into a relative path that cannot leave
that folder, or refuses it.
"""

from __future__ import annotations

import base64
import binascii
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

from harvester.errors import ProtocolError
from harvester.jobs import job_key

__all__ = [
    "MAX_LIST_BYTES",
    "BlobItem",
    "BlobPage",
    "blob_url",
    "check_no_clashes",
    "list_url",
    "parse_blob_list",
    "safe_blob_path",
]

#: a page holds at most 5000 names of at most 1024 characters plus properties
MAX_LIST_BYTES = 64 << 20
#: deeper or longer paths than this are refused rather than left to the file system
MAX_SEGMENTS = 64
MAX_PATH_CHARS = 1024


@dataclass(frozen=True, slots=True)
class BlobItem:
    name: str  #: the blob's name as the container knows it (decoded)
    size: int | None = None  #: Content-Length from the listing, when given
    md5: bytes | None = None  #: the 16-byte digest behind the listing's Content-MD5, if any


@dataclass(frozen=True, slots=True)
class BlobPage:
    blobs: tuple[BlobItem, ...]
    next_marker: str | None  #: pass as ``marker`` for the next page; None on the last


def list_url(container_url: str, marker: str | None = None, max_results: int | None = None) -> str:
    """The listing URL of a container URL, keeping its SAS query exactly as issued.

    The query is appended to, never re-encoded: a SAS signature covers the values, and a
    storage host is entitled to be strict about their spelling. ``max_results`` asks for
    smaller pages than the service's default (5000).
    """
    parts = urlsplit(container_url)
    extra = {"restype": "container", "comp": "list"}
    if max_results is not None:
        extra["maxresults"] = str(max_results)
    if marker:
        extra["marker"] = marker
    query = "&".join(q for q in (parts.query, urlencode(extra)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def blob_url(container_url: str, name: str) -> str:
    """The URL of blob ``name`` in the container, signed with the container's SAS query."""
    parts = urlsplit(container_url)
    path = f"{parts.path.rstrip('/')}/{quote(name, safe='/')}"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def parse_blob_list(body: bytes) -> BlobPage:
    """One page of an Azure "List Blobs" answer, or ``ProtocolError`` if it is not one."""
    if len(body) > MAX_LIST_BYTES:
        raise ProtocolError(f"container listing page is larger than {MAX_LIST_BYTES} bytes")
    # Azure never sends a DTD; refusing one rules out entity expansion of any kind.
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise ProtocolError("container listing carries a DTD; refusing to parse it")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        snippet = body[:80].decode("utf-8", "replace")
        raise ProtocolError(f"container listing is not XML ({exc}): {snippet!r}") from exc
    tag = _local(root.tag)
    if tag == "Error":
        code = _text(root, "Code") or "?"
        message = (_text(root, "Message") or "").strip().splitlines()
        raise ProtocolError(
            f"storage answered an error to the listing: {code}: {message[0] if message else ''}"
        )
    if tag != "EnumerationResults":
        raise ProtocolError(f"container listing has root <{tag[:40]}>, not <EnumerationResults>")
    blobs: list[BlobItem] = []
    container = _child(root, "Blobs")
    if container is not None:
        for element in container:
            if _local(element.tag) != "Blob":
                continue  # <BlobPrefix> appears only with a delimiter, which we never send
            blobs.append(_blob(element))
    marker = (_text(root, "NextMarker") or "").strip()
    return BlobPage(tuple(blobs), marker or None)


def safe_blob_path(name: str) -> str | None:
    """A relative path for blob ``name`` that stays inside the folder it is joined to.

    Every segment goes through ``job_key`` (safe names unchanged, others sanitised and made
    unique with a hash). Names with empty, ``.`` or ``..`` segments, or that are absolute,
    are refused: a container that serves them is not to be trusted with the file system.
    Returns None for a folder placeholder (a name ending in ``/``), which has no content.
    """
    if not name:
        raise ProtocolError("a blob has an empty name")
    if name.endswith("/"):
        return None
    if name.startswith("/"):
        raise ProtocolError(f"refusing blob with an absolute name: {name[:200]!r}")
    segments = name.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise ProtocolError(f"refusing blob name with an empty, '.' or '..' part: {name[:200]!r}")
    if len(segments) > MAX_SEGMENTS:
        raise ProtocolError(f"refusing blob name nested {len(segments)} folders deep")
    path = "/".join(job_key(s) for s in segments)
    if len(path) > MAX_PATH_CHARS:
        raise ProtocolError(f"refusing blob name longer than {MAX_PATH_CHARS} characters")
    return path


def check_no_clashes(paths: Iterable[str]) -> None:
    """Refuse a set of paths where one file would have to be another's folder.

    A flat blob namespace allows both ``a`` and ``a/b``; a file system does not.
    """
    files = set(paths)
    for path in files:
        head, sep, _ = path.rpartition("/")
        while sep:
            if head in files:
                raise ProtocolError(f"blob {head!r} is both a file and a folder of {path!r}")
            head, sep, _ = head.rpartition("/")


def _blob(element: ET.Element) -> BlobItem:
    name_el = _child(element, "Name")
    if name_el is None or not name_el.text:
        raise ProtocolError("a <Blob> in the container listing has no <Name>")
    name = name_el.text
    if name_el.get("Encoded", "").lower() == "true":
        # Names with characters XML cannot carry are sent percent-encoded and flagged.
        name = unquote(name)
    size: int | None = None
    md5: bytes | None = None
    props = _child(element, "Properties")
    if props is not None:
        length = _text(props, "Content-Length")
        if length is not None and length.strip().isdigit():
            size = int(length.strip())
        md5 = _md5(name, (_text(props, "Content-MD5") or "").strip())
    return BlobItem(name, size, md5)


def _md5(name: str, text: str) -> bytes | None:
    """The digest of a listing's ``Content-MD5`` (empty when the blob has none)."""
    if not text:
        return None
    try:
        digest = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise ProtocolError(
            f"blob {name[:200]!r} has a Content-MD5 that is not a base64 MD5: {text[:60]!r}"
        )
    return digest


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _child(element: ET.Element, name: str) -> ET.Element | None:
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def _text(element: ET.Element, name: str) -> str | None:
    child = _child(element, name)
    return None if child is None else (child.text or "")
