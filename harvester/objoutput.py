"""A job's output published to object storage (see ``harvester.objstore`` for the design)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import anyio.to_thread

from harvester.fsutil import Tree, disk_errors
from harvester.harvest import JOURNAL, MANIFEST, JobOutput
from harvester.objstore import Bucket, remove_staged

_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class ObjectJobOutput(JobOutput):
    """``JobOutput`` over a local staging folder, uploaded to ``bucket`` by ``publish``."""

    def __init__(self, bucket: Bucket, root: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(root, *args, **kwargs)
        self.bucket = bucket

    async def publish(self, *, harvested_at: float) -> Path:
        await self._ready()
        # Not in ``offload``'s threads: an upload waits on the network, not on a core.
        return await anyio.to_thread.run_sync(self._publish, harvested_at)

    def _publish(self, harvested_at: float) -> Path:
        prefix = self.relative.as_posix()
        bucket = self.bucket
        # Parts of an upload a killed attempt left open (never an object under a final name).
        bucket.abort_orphans(prefix)
        # A MANIFEST.json of an earlier attempt (cut off before the store's commit) must not
        # vouch for objects about to be replaced.
        bucket.delete(f"{prefix}/{MANIFEST}")
        tree = Tree(self.root)
        for rel, entry in sorted(self.entries.items()):
            parts = PurePosixPath(rel).parts
            # Through folder descriptors, never a symlink: only what harvester wrote is sent.
            with tree.folder(self.parts + parts[:-1]) as dir_fd, disk_errors(f"{self.dir}/{rel}"):
                fd = os.open(parts[-1], _READ, dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as fh:
                    bucket.upload(fh, f"{prefix}/{rel}", size=entry.bytes, sha256=entry.sha256)
        # Objects an earlier attempt left that this one did not write (another file set).
        for rel in bucket.listing(prefix):
            if rel not in self.entries and rel not in (MANIFEST, JOURNAL):
                bucket.delete(f"{prefix}/{rel}")
        bucket.put_bytes(f"{prefix}/{MANIFEST}", self.manifest_bytes(harvested_at=harvested_at))
        remove_staged(self.dir)
        return self.relative
