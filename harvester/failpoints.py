"""Failpoints: named places where a test can kill harvester with a real SIGKILL.

``failpoint("download.chunk")`` is a no-op that costs one dict lookup unless the environment
variable ``HARVESTER_FAILPOINTS`` is set when this module is first imported (it is parsed
once). The variable holds comma-separated ``NAME=ACTION`` items::

    HARVESTER_FAILPOINTS="download.chunk=kill@17,harvest.before_manifest=kill@3"

``kill@N`` sends ``SIGKILL`` to the process itself on the Nth hit of that point (``kill`` is
``kill@1``): no ``finally``, no ``atexit``, no flush, exactly like the OOM killer or a power
cut as far as the files and the store can tell. Before dying it writes one line to stderr
(``failpoint NAME hit N: SIGKILL``), so a harness can tell its kill from another death.

``HARVESTER_FAILPOINTS_COUNTS=FILE`` makes every point count its hits and, at a normal exit,
write them to ``FILE`` as a JSON object (``{"download.chunk": 143, ...}``): a clean run with
it tells a harness how often each point is reached, so it can choose a hit to kill at.

The points (``POINTS``), in the order a job meets them:

``submit.before_post``
    engine ``_start``: the ``submitting`` intent is committed, the create POST not yet sent.
``submit.after_post``
    engine ``_start``: the create answer is in hand (parsed), the remote id not yet stored.
``poll.after_answer``
    engine ``_poll``: a status answer is in hand, nothing done with it yet.
``store.before_commit`` / ``store.after_commit``
    engine ``_transition``: around every state change's commit to the store.
``download.chunk``
    download ``stream_into``: a chunk of a signed-URL body was fed to its sink (decoder or
    file), after the sink consumed it.
``decode.finish``
    harvest ``LabelSink.finish``: a frame's labels are decoded into the staging file, its
    ``.npy`` not yet written.
``rename.before_replace`` / ``rename.after_replace``
    fsutil ``AtomicFile.__exit__``: the temporary file is written and fsynced, not yet renamed
    over its final name / renamed and its folder fsynced. Every output file passes here,
    ``MANIFEST.json`` included.
``harvest.before_manifest`` / ``harvest.after_manifest``
    harvest ``JobOutput.write_manifest``: every other file is in place, ``MANIFEST.json`` not
    yet written / written and renamed, the job not yet marked ``harvested``.
``upload.part``
    objstore ``_Verified``: an object-store ``output.dir`` only: a part of a file being
    published with a multipart upload was handed to it (the upload begun on the store), the
    upload not yet committed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
from dataclasses import dataclass

from harvester.errors import FailpointSpecError

__all__ = [
    "COUNTS_ENV",
    "ENV",
    "OBJECT_STORE_POINTS",
    "POINTS",
    "FailpointSpecError",
    "failpoint",
    "parse",
]

ENV = "HARVESTER_FAILPOINTS"
COUNTS_ENV = "HARVESTER_FAILPOINTS_COUNTS"

POINTS: tuple[str, ...] = (
    "submit.before_post",
    "submit.after_post",
    "poll.after_answer",
    "store.before_commit",
    "store.after_commit",
    "download.chunk",
    "decode.finish",
    "rename.before_replace",
    "rename.after_replace",
    "harvest.before_manifest",
    "harvest.after_manifest",
)
#: points only an object-store ``output.dir`` reaches (kept out of ``POINTS``, which the
#: crash tests of a local output calibrate and draw from)
OBJECT_STORE_POINTS: tuple[str, ...] = ("upload.part",)


@dataclass(slots=True)
class _Point:
    kill_at: int | None = None  #: SIGKILL on this hit (1-based); None: only count
    hits: int = 0


def parse(spec: str) -> dict[str, int]:
    """``"a=kill@3,b=kill"`` -> ``{"a": 3, "b": 1}``; raises ``FailpointSpecError``."""
    out: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, action = item.partition("=")
        name, action = name.strip(), action.strip()
        if name not in POINTS + OBJECT_STORE_POINTS:
            raise FailpointSpecError(
                f"{ENV}: unknown failpoint {name!r} (known:"
                f" {', '.join(POINTS + OBJECT_STORE_POINTS)})"
            )
        verb, _, count = action.partition("@")
        if not sep or verb != "kill":
            raise FailpointSpecError(f"{ENV}: {item!r}: the action must be kill or kill@N")
        if not count:
            out[name] = 1
            continue
        if not count.isdigit() or int(count) < 1:
            raise FailpointSpecError(f"{ENV}: {item!r}: N in kill@N must be an integer >= 1")
        out[name] = int(count)
    return out


def _arm() -> dict[str, _Point]:
    armed = {name: _Point(kill_at=n) for name, n in parse(os.environ.get(ENV, "")).items()}
    counts_file = os.environ.get(COUNTS_ENV)
    if counts_file:
        for name in POINTS + OBJECT_STORE_POINTS:
            armed.setdefault(name, _Point())
        atexit.register(_write_counts, counts_file, armed)
    return armed


def _write_counts(path: str, armed: dict[str, _Point]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({name: p.hits for name, p in armed.items()}, fh, sort_keys=True)


_ARMED: dict[str, _Point] = _arm()


def failpoint(name: str) -> None:
    """Count a hit of ``name``; SIGKILL this process if that is the armed hit."""
    point = _ARMED.get(name)
    if point is None:
        return
    point.hits += 1
    if point.hits == point.kill_at:
        with contextlib.suppress(OSError):
            os.write(2, f"failpoint {name} hit {point.hits}: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
