"""What every provider adapter is made of: request descriptions in, typed results out.

Adapters are sans-I/O: ``build_*`` functions return a frozen ``RequestSpec`` and ``parse_*``
functions turn a ``Response`` into a typed result or raise a ``HarvesterError``. The
transport sends specs; the engine decides what to do with results. The only async part of an
adapter is ``harvest``, which talks to the outside world exclusively through the
``HarvestIO`` it is handed, so it too runs against an in-memory fake in unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol, TypeVar

from harvester.errors import HarvesterError, ProtocolError
from harvester.jobs import Job
from harvester.wire import RequestSpec, Resolver, Response


class RemoteState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Accepted:
    remote_id: str


@dataclass(frozen=True, slots=True)
class AlreadyExists:
    """The provider says this reference id is taken: the job exists, go and find it."""

    message: str


@dataclass(frozen=True, slots=True)
class Found:
    remote_id: str


@dataclass(frozen=True, slots=True)
class NotFound:
    pass


@dataclass(frozen=True, slots=True)
class NextPage:
    cursor: str


@dataclass(frozen=True, slots=True)
class Unsearchable:
    """The provider refused the lookup itself (no listing here, filter not accepted): the
    job can be neither found nor proven absent, so ``on_lost_create`` decides."""

    reason: str


@dataclass(frozen=True, slots=True)
class Status:
    state: RemoteState
    raw: str  #: the provider's own status string, verbatim
    progress: float | None = None
    reason: str | None = None
    document: Any = None
    #: False when ``raw`` is not in the provider's documented status set: the job is kept
    #: polling as running, and the engine tells the user (log once per job, metric, status)
    known: bool = True
    #: the provider's own times (Unix seconds), when it gives them: when the job began
    #: running (after any queue) and, once it has ended, when it did. The poll scheduler
    #: learns durations from them rather than from when polls happened to look.
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True, slots=True)
class NotReady:
    """Asked too early (e.g. Modzy's results 404 right after submission): poll again."""

    reason: str


CreateResult = Accepted | AlreadyExists
FindResult = Found | NotFound | NextPage | Unsearchable
PollResult = Status | NotReady

LabelFormat = Literal["mask", "pcd"]


@dataclass(frozen=True, slots=True)
class LabelFrame:
    """One label file to harvest (``HarvestIO.label_frames``)."""

    name: str  #: the file name stem under ``labels/`` (already made safe)
    resolve: Resolver
    fmt: LabelFormat
    source: str | None = None  #: see ``HarvestIO.labels``
    frame_id: str | None = None  #: the provider's frame id, for the manifest
    sensor_id: str | None = None  #: the provider's sensor id, when a frame has several


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file to download as is (``HarvestIO.download_files``)."""

    relpath: str  #: where it goes under the job's folder
    resolve: Resolver
    size: int | None = None  #: what its listing announced (Content-Length), held to it
    md5: bytes | None = None  #: what its listing announced (Content-MD5), held to it


T = TypeVar("T")


class Client(Protocol):
    """Sends a spec through the provider's transport and parses the answer (engine side)."""

    async def call(self, spec: RequestSpec, parse: Callable[[Response], T]) -> T: ...


class HarvestIO(Protocol):
    """The outside world as an adapter's ``harvest`` sees it (implemented in harvest.py)."""

    #: the URLs in the job's own create payload: its inputs, which results may echo
    input_urls: frozenset[str]

    async def request(self, spec: RequestSpec) -> Response:
        """Send a spec through the provider's transport (limiter, auth, retries)."""

    async def fetch(self, resolve: Resolver, *, what: str) -> bytes:
        """A whole (small) signed-URL body; re-resolves on expiry; size-capped."""

    async def labels(
        self,
        name: str,
        resolve: Resolver,
        fmt: LabelFormat,
        *,
        source: str | None = None,
        frame: str | None = None,
        sensor_id: str | None = None,
    ) -> None:
        """Stream a label file through the decoder into ``labels/<name>.npy``; ``frame`` and
        ``sensor_id`` (the provider's ids) go into its manifest entry when given.

        ``source`` names the remote file (not a signed URL): a file already on disk from an
        interrupted attempt, from the same source, is verified and kept, not fetched again.
        """

    async def label_frames(self, frames: Sequence[LabelFrame]) -> None:
        """``labels`` for every frame, ``harvest.frame_concurrency`` of them at a time."""

    async def download(
        self, relpath: str, resolve: Resolver, *, size: int | None = None, md5: bytes | None = None
    ) -> None:
        """Stream a signed-URL body to ``relpath`` under the job's output folder; when the
        listing gave its ``size`` or ``md5`` (digest), anything else is ``CorruptDownload``.
        A file whose size is known and large is fetched as ranged parts in parallel."""

    async def download_files(self, files: Sequence[RemoteFile]) -> None:
        """``download`` for every file, ``harvest.frame_concurrency`` of them at a time."""

    async def write_bytes(self, relpath: str, data: bytes) -> None: ...

    async def write_json(self, relpath: str, obj: Any) -> None: ...


class NoSetup:
    """For providers with no one-off setup step (everyone but Playment)."""

    name: str

    @property
    def setup_key(self) -> str:
        return f"{self.name}.setup"

    def setup_spec(self) -> RequestSpec | None:
        return None

    def parse_setup(self, resp: Response) -> str:
        raise ProtocolError(f"{self.name} has no setup step", provider=self.name)

    def restore_setup(self, value: str) -> None:
        return None


class NoLookup:
    """For providers whose API cannot look a job up by anything of ours: a lost create
    answer is left to the engine's ``on_lost_create`` policy."""

    def build_find(self, job: Job, cursor: str | None) -> RequestSpec | None:
        return None

    def parse_find(self, resp: Response, job: Job) -> FindResult:
        return NotFound()


def protocol_error(
    provider: str, resp: Response, message: str, job: Job | None = None
) -> ProtocolError:
    """An answer we cannot understand, with the status and request id that identify it."""
    return ProtocolError(
        message,
        provider=provider,
        job=job.key if job else None,
        status=resp.status,
        request_id=resp.request_id,
    )


#: the longest failure reason an adapter builds from a provider's messages
MAX_REASON = 1000


def clip_reason(reason: str) -> str:
    """``reason`` cut to ``MAX_REASON`` characters, "…" marking the cut."""
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"


def ok_object(
    provider: str,
    resp: Response,
    job: Job | None,
    endpoint: str,
    error_from: Callable[[Response, Job | None, str], HarvesterError],
) -> dict[str, Any]:
    """The JSON object of a 2xx answer; for any other status, the adapter's typed error
    (``error_from``); a 2xx body that is no JSON object is a ``ProtocolError``."""
    if not 200 <= resp.status < 300:
        raise error_from(resp, job, endpoint)
    body = resp.json(provider=provider, job=job.key if job else None)
    if not isinstance(body, dict):
        raise protocol_error(provider, resp, f"{endpoint} answer is not a JSON object", job)
    return body


class Provider(Protocol):
    """One provider's API, as the engine drives it."""

    name: str

    def validate_payload(self, payload: Any) -> None:
        """Raise ``InvalidPayload`` (one clear sentence) if this payload can never work."""

    # One-off per-store setup (e.g. a Playment batch for our jobs); ``None`` = nothing to do.
    def setup_spec(self) -> RequestSpec | None: ...

    def parse_setup(self, resp: Response) -> str:
        """The value to remember (``Store.set_meta``) from the setup answer."""

    def restore_setup(self, value: str) -> None: ...

    @property
    def setup_key(self) -> str: ...

    def build_create(self, job: Job, payload: Mapping[str, Any]) -> RequestSpec: ...

    def parse_create(self, resp: Response, job: Job) -> CreateResult: ...

    def build_find(self, job: Job, cursor: str | None) -> RequestSpec | None:
        """How to look for a job whose create answer was lost; None: the provider can't."""

    def parse_find(self, resp: Response, job: Job) -> FindResult: ...

    def build_cancel(self, job: Job) -> RequestSpec | None:
        """How to cancel a running job at the provider; None: its API has no cancel."""

    def parse_cancel(self, resp: Response, job: Job) -> None:
        """Raise unless the provider accepted the cancel (a refusal is a ``JobError``)."""

    async def poll(self, job: Job, client: Client) -> PollResult:
        """The job's current status: one request for most providers, a few for some
        (Bentley: state, progress, and the messages of a failed job). Built only from the
        adapter's pure build/parse functions; ``client`` does the sending."""

    def ladder(self) -> tuple[float, ...] | None:
        """The provider's own poll cadence, if it prescribes one."""

    def job_class(self, status: Status) -> str | None:
        """The type of job a poll's answer shows (Bentley's job type, Modzy's model and
        version...): jobs of one type take alike long, so the poll scheduler learns their
        durations apart from the provider's others. None: not told, or no types."""

    async def harvest(self, job: Job, status: Status, io: HarvestIO) -> None:
        """Write the job's outputs through ``io`` (the manifest is the caller's)."""
