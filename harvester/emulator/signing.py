"""S3-style presigned URLs: issue them, and judge the ones that come back.

Only the shape of AWS SigV4 query signing is imitated (the parameter names, the date format, a
hex HMAC-SHA256); the signature covers path, date and lifetime under a per-process secret,
which is all a client can observe.
"""

from __future__ import annotations

import calendar
import enum
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode

ALGORITHM = "AWS4-HMAC-SHA256"
_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
# Pre-expired URLs look as if signed this long before they ran out, so no clock skew
# between test and emulator can make them valid again.
_EXPIRED_MARGIN_S = 60


class Verdict(enum.Enum):
    VALID = "valid"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Check:
    verdict: Verdict
    expires_at: float | None = None  # epoch seconds, for the "Request has expired" body


class Signer:
    def __init__(self, *, ttl_s: float, wall_clock: Callable[[], float] = time.time) -> None:
        self._secret = secrets.token_bytes(32)
        self._expires = max(1, math.ceil(ttl_s))  # S3 takes whole seconds
        self._clock = wall_clock

    def query(self, path: str, *, expired: bool = False, ttl_s: float | None = None) -> str:
        """The presigned query for ``path``; ``ttl_s`` overrides the default lifetime (a
        provider whose links live a documented time, like Cognite's 30 s)."""
        lifetime = self._expires if ttl_s is None else max(1, math.ceil(ttl_s))
        now = int(self._clock())
        signed_at = now - lifetime - _EXPIRED_MARGIN_S if expired else now
        date = time.strftime(_DATE_FORMAT, time.gmtime(signed_at))
        expires = str(lifetime)
        return urlencode(
            {
                "X-Amz-Algorithm": ALGORITHM,
                "X-Amz-Date": date,
                "X-Amz-Expires": expires,
                "X-Amz-Signature": self._signature(path, date, expires),
            }
        )

    def check(self, path: str, params: Mapping[str, str]) -> Check:
        if "X-Amz-Signature" not in params:
            return Check(Verdict.UNSIGNED)
        date = params.get("X-Amz-Date", "")
        expires = params.get("X-Amz-Expires", "")
        expected = self._signature(path, date, expires)
        if params.get("X-Amz-Algorithm") != ALGORITHM or not hmac.compare_digest(
            expected, params["X-Amz-Signature"]
        ):
            return Check(Verdict.BAD_SIGNATURE)
        try:
            signed_at = calendar.timegm(time.strptime(date, _DATE_FORMAT))
            expires_at = float(signed_at + int(expires))
        except ValueError:
            return Check(Verdict.BAD_SIGNATURE)
        if self._clock() >= expires_at:
            return Check(Verdict.EXPIRED, expires_at)
        return Check(Verdict.VALID, expires_at)

    def _signature(self, path: str, date: str, expires: str) -> str:
        msg = "\n".join((ALGORITHM, quote(path), date, expires)).encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()
