"""Multipart uploads a killed attempt left open, aborted when its job is published again.

obstore aborts a multipart upload that fails in the process, but a SIGKILL (the OOM killer, a
lost node) in the middle of one leaves it open: its parts stay stored, and billed, invisible to
object listings, until someone aborts the upload or a lifecycle rule expires it. obstore
(0.12.1, the newest) never hands out an upload's id and has no call to list or abort
multipart uploads (the Rust crate's ``MultipartStore`` is not exposed), so there is no id to
record before the parts go out. S3's own API lists them instead: before a job's folder is
published, every multipart upload still open under that folder's prefix is aborted (boto3,
the optional ``s3`` extra, through the same endpoint, region and keys as the output).

Only the holder of a job publishes it (the store's claim), so an upload open under its
folder at that moment belongs to an attempt that is over. The cleanup is best effort: a
store that refuses to list or abort (no ``s3:ListBucketMultipartUploads`` /
``s3:AbortMultipartUpload`` permission) is logged and the publish goes on; the bucket's
``AbortIncompleteMultipartUpload`` lifecycle rule remains the backstop, also for jobs never
published again.

Azure needs nothing: committing a blob's block list discards that blob's uncommitted blocks,
and Azure deletes any others after 7 days. GCS (XML API multipart uploads) is left to its
lifecycle rule (see README).
"""

from __future__ import annotations

from typing import Any

from harvester.config import Location, OutputConfig
from harvester.logs import get_logger

log = get_logger("harvester.objorphans")

PAGE = 1000  #: uploads per listing page (S3's own maximum)
MAX_PAGES = 100  #: listing bound: a folder with more open uploads than this is left to lifecycle


class S3Orphans:
    """Lists and aborts the open multipart uploads under a key prefix of one S3 bucket."""

    def __init__(self, loc: Location, cfg: OutputConfig, client: Any) -> None:
        self.loc = loc
        self.cfg = cfg
        self.client = client

    @classmethod
    def for_output(cls, loc: Location, cfg: OutputConfig) -> S3Orphans | None:
        """The cleaner of an ``s3://`` output, or None (logged) when boto3 is not installed."""
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            log.warning(
                "orphaned multipart uploads will not be aborted: boto3 is not installed"
                " (pip install 'harvester[s3]'); the bucket's lifecycle rule must remove them",
                output=loc.url(),
            )
            return None
        kwargs: dict[str, Any] = {}
        if cfg.endpoint:
            kwargs["endpoint_url"] = cfg.endpoint
        if cfg.region:
            kwargs["region_name"] = cfg.region
        if cfg.access_key_id is not None and cfg.secret_access_key is not None:
            kwargs["aws_access_key_id"] = cfg.access_key_id.reveal()
            kwargs["aws_secret_access_key"] = cfg.secret_access_key.reveal()
        config = Config(
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            # obstore addresses an endpoint's buckets by path; the same here (MinIO, Ceph)
            s3={"addressing_style": "path"} if cfg.endpoint else {},
        )
        return cls(loc, cfg, boto3.client("s3", config=config, **kwargs))

    def key_prefix(self, rel: str) -> str:
        return "/".join(p for p in (self.loc.prefix, rel) if p) + "/"

    def open_uploads(self, rel: str) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload open under ``rel/``."""
        prefix = self.key_prefix(rel)
        found: list[tuple[str, str]] = []
        args: dict[str, Any] = {"Bucket": self.loc.bucket, "Prefix": prefix, "MaxUploads": PAGE}
        for _ in range(MAX_PAGES):
            page = self.client.list_multipart_uploads(**args)
            found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                break
            args["KeyMarker"] = page["NextKeyMarker"]
            args["UploadIdMarker"] = page["NextUploadIdMarker"]
        return found

    def abort_under(self, rel: str) -> int:
        """Abort every multipart upload open under ``rel/``; how many were aborted. Never
        raises: a failure is logged and left to the lifecycle rule."""
        from botocore.exceptions import BotoCoreError, ClientError

        aborted = 0
        try:
            for key, upload_id in self.open_uploads(rel):
                try:
                    self.client.abort_multipart_upload(
                        Bucket=self.loc.bucket, Key=key, UploadId=upload_id
                    )
                except ClientError as exc:
                    if _code(exc) != "NoSuchUpload":  # gone meanwhile: nothing to do
                        raise
                else:
                    aborted += 1
        except (BotoCoreError, ClientError) as exc:
            log.warning(
                "cannot abort orphaned multipart uploads; the bucket's lifecycle rule must"
                " remove them",
                output=self.loc.url(rel),
                error=_one_line(exc),
            )
        if aborted:
            log.info(
                "aborted multipart uploads an interrupted attempt left",
                output=self.loc.url(rel),
                uploads=aborted,
            )
        return aborted


def _code(exc: Any) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
