"""Where harvester will not connect: link-local and cloud-metadata addresses, non-HTTP schemes.

Signed URLs and redirects come from the providers' answers, so a hostile or compromised
answer chooses where harvester connects next. The one place that must never be reachable that
way is the machine's own metadata service (``169.254.169.254``, ``fd00:ec2::254``, ...): it
hands out the instance's cloud credentials to whoever asks from inside. Link-local addresses
are refused as a whole (the metadata services live there, and no provider serves files from
one); loopback and private networks stay allowed, since private deployments and the tests
use them. ``providers.<name>.allow_link_local = true`` lifts the address rule for the rare
deployment that needs it; the scheme rule always holds.

Checked twice, both before any connection: the URL's host when it is an IP literal (aiohttp
does not resolve those), and every address a host name resolves to (``GuardedResolver``), so
``metadata.google.internal`` or a decimal ``http://2852039166/`` is refused as well.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from harvester.errors import RefusedAddress

__all__ = ["GuardedResolver", "RefusedAddress", "address_reason", "host_reason", "url_reason"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: metadata services outside the link-local ranges (those inside are refused anyway)
_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle...
        "169.254.170.2",  # AWS ECS task credentials
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS time sync / IPv6 DNS
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer
        "192.0.0.192",  # Oracle Cloud (classic)
    )
)
#: names that resolve to a metadata service only from inside a cloud
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})


def address_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused ("a link-local address", ...), or None if it is not."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _METADATA_ADDRESSES:
        return f"a cloud metadata address ({ip})"
    if ip.is_link_local:
        return f"a link-local address ({ip})"
    return None


def host_reason(url: str) -> str | None:
    """Why the host of ``url`` is refused, judged without resolving it; None if it is not."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None  # a malformed URL fails on its own, with aiohttp's message
    if not host:
        return None
    host = host.rstrip(".")
    if host in _METADATA_NAMES:
        return f"a cloud metadata host ({host})"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: judged by GuardedResolver on what it resolves to
    return address_reason(ip)


def url_reason(url: str, *, allow_link_local: bool) -> str | None:
    """Why harvester will not fetch ``url``: a non-HTTP scheme, or (unless allowed) a
    link-local or metadata host. None if it may."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return f"not an http(s) URL (scheme {scheme or 'missing'!r})"
    return None if allow_link_local else host_reason(url)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver with the refused addresses taken out of every answer."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        reason: str | None = None
        for answer in answers:
            why = _answer_reason(answer)
            if why is None:
                kept.append(answer)
            else:
                reason = why
        if not kept and reason is not None:
            raise RefusedAddress(host, reason)
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _answer_reason(answer: ResolveResult | dict[str, Any]) -> str | None:
    try:
        ip = ipaddress.ip_address(str(answer["host"]).split("%", 1)[0])
    except ValueError:
        return None
    return address_reason(ip)
