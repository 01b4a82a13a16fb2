"""Harvesting an Azure blob container reached by a SAS URL: list it page by page, then
download every blob, each checked against the size and MD5 its listing announced.

Only the container URL is provider-specific (Bentley resolves one per output through
``readaccess``), so it comes from a ``ContainerSource``; everything else goes through the
``HarvestIO`` the engine hands an adapter, like any other signed-URL download: no bearer
token or API key is ever sent, and a refused SAS is resolved again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

from harvester.azure import (
    BlobItem,
    blob_url,
    check_no_clashes,
    list_url,
    parse_blob_list,
    safe_blob_path,
)
from harvester.errors import ProtocolError
from harvester.providers.base import HarvestIO, RemoteFile
from harvester.wire import Resolver

#: a listing that has not ended after this many pages (5000 blobs each) is looping
MAX_LIST_PAGES = 10_000


class ContainerSource(Protocol):
    def resolver(self, build: Callable[[str], str]) -> Resolver:
        """A resolver for ``build(container URL)``: the current container URL on its first
        call, a freshly issued one after storage refused it."""


async def list_container(
    io: HarvestIO, source: ContainerSource, folder: str, *, page_size: int | None = None
) -> list[BlobItem]:
    """Every blob of the container, following ``NextMarker`` page after page (of
    ``page_size`` blobs, or the service's default)."""
    blobs: list[BlobItem] = []
    marker: str | None = None
    seen: set[str] = set()
    for page_no in range(1, MAX_LIST_PAGES + 1):
        body = await io.fetch(
            source.resolver(functools.partial(list_url, marker=marker, max_results=page_size)),
            what=f"{folder} listing page {page_no}",
        )
        page = parse_blob_list(body)
        blobs.extend(page.blobs)
        if page.next_marker is None:
            return blobs
        if page.next_marker in seen:
            raise ProtocolError(f"{folder}: the container listing repeats a page marker")
        seen.add(page.next_marker)
        marker = page.next_marker
    raise ProtocolError(f"{folder}: the container listing did not end in {MAX_LIST_PAGES} pages")


async def harvest_container(
    io: HarvestIO, source: ContainerSource, folder: str, *, page_size: int | None = None
) -> None:
    """Download every blob to ``<folder>/<its sanitised path>``, checked against its listing,
    several at once (``HarvestIO.download_files``)."""
    blobs = await list_container(io, source, folder, page_size=page_size)
    paths: dict[str, BlobItem] = {}
    for blob in blobs:
        rel = safe_blob_path(blob.name)
        if rel is None:
            continue
        if rel in paths:
            raise ProtocolError(f"blobs {paths[rel].name!r} and {blob.name!r} map to one file")
        paths[rel] = blob
    check_no_clashes(paths)
    await io.download_files(
        [
            RemoteFile(
                f"{folder}/{rel}",
                source.resolver(functools.partial(_blob_url, name=blob.name)),
                size=blob.size,
                md5=blob.md5,
            )
            for rel, blob in sorted(paths.items())
        ]
    )


def _blob_url(container_url: str, *, name: str) -> str:
    return blob_url(container_url, name)
