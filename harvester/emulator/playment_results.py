"""Playment's result files on the storage host: their private URLs and their contents.

Layout under the storage host:
``/playment-private/<project>/<job_id>/result.json``, ``.../masks/<frame index>.txt`` (masks
variant), ``.../<frame index>_data.pcd`` (PCD variant, single-frame point-cloud jobs) and
``.../image_masks/<frame index>.png`` (image and video jobs: one segmentation mask per image
or video frame). A path resolves only while its job exists and is completed, like a real
result. Image/video result documents are not documented by Playment: the shape here (an
annotation list, a legend, and a private ``mask_url`` per image or frame next to the job's own
input URL) is this emulator's, and clients should treat it as one plausible variant.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from harvester.emulator import truth
from harvester.emulator.objects import ObjectSource
from harvester.emulator.playment_model import Job, PlaymentModel
from harvester.emulator.scenario import Scenario

PREFIX = "/playment-private/"
_PATH = re.compile(
    r"^/playment-private/(?P<project>[^/]+)/(?P<job>[^/]+)/"
    r"(?P<name>result\.json|masks/(?P<mask>\d+)\.txt|(?P<pcd>\d+)_data\.pcd"
    r"|image_masks/(?P<img>\d+)\.png)$"
)
_CLASS_NAMES = (
    "unlabelled", "car", "truck", "bus", "pedestrian", "cyclist", "motorcycle", "road",
    "sidewalk", "parking", "building", "fence", "vegetation", "trunk", "terrain", "pole",
    "traffic_sign", "traffic_light", "other_vehicle", "other_ground",
)  # fmt: skip


class PlaymentResults:
    def __init__(
        self, model: PlaymentModel, scenario: Scenario, private_url: Callable[[str], str]
    ) -> None:
        self._model = model
        self._seed = scenario.seed
        self._p = scenario.playment
        self.url = private_url  # storage path -> unsigned URL on the storage host

    # -- URLs ---------------------------------------------------------------------------

    def uses_pcd(self, job: Job) -> bool:
        return (
            self._p.result_variant == "pcd"
            and job.kind == "point_cloud"
            and len(job.frame_ids) == 1
        )

    def result_path(self, job: Job) -> str:
        return f"{self._job_dir(job)}result.json"

    def _job_dir(self, job: Job) -> str:
        return f"{PREFIX}{job.project_id}/{job.job_id}/"

    # -- storage resolver ---------------------------------------------------------------

    def resolve(self, path: str) -> ObjectSource | None:
        m = _PATH.match(path)
        if m is None:
            return None
        job = self._model.jobs.get(m["job"])
        if job is None or job.project_id != m["project"] or not self._model.is_completed(job):
            return None
        if m["name"] == "result.json":
            return ObjectSource(lambda: self._result_json(job), "application/json")
        if m["img"] is not None:
            img = int(m["img"])
            count = 1 if job.kind == "image" else len(job.frame_ids)
            if job.kind == "point_cloud" or img >= count:
                return None
            return ObjectSource(
                lambda: truth.image_mask_bytes(self._seed, job.reference_id, img), "image/png"
            )
        index = int(m["mask"] or m["pcd"])
        if job.kind != "point_cloud" or index >= len(job.frame_ids):
            return None
        if m["pcd"] is not None:
            if not self.uses_pcd(job):
                return None
            return ObjectSource(lambda: self._pcd(job, index), "application/octet-stream")
        if self.uses_pcd(job):
            return None
        return ObjectSource(lambda: self._mask(job, index), "text/plain")

    # -- contents -----------------------------------------------------------------------

    def labels(self, job: Job, index: int) -> truth.LabelArray:
        frame = job.frame_ids[index]
        n = truth.points_for_frame(self._seed, job.reference_id, frame, self._p.points_per_frame)
        return truth.frame_labels(self._seed, job.reference_id, frame, n, self._p.num_labels)

    def _mask(self, job: Job, index: int) -> bytes:
        return truth.format_mask(self.labels(job, index), self._p.mask_line_width)

    def _pcd(self, job: Job, index: int) -> bytes:
        labels = self.labels(job, index)
        frame = job.frame_ids[index]
        points = truth.frame_points(self._seed, job.reference_id, frame, labels.shape[0])
        return truth.format_pcd(labels, points)

    def _result_json(self, job: Job) -> bytes:
        legend = [
            {
                "id": f"cls-{k}",
                "text": _CLASS_NAMES[k % len(_CLASS_NAMES)],
                "color": class_color(k),
                "label_key": k,
                "value": k,
            }
            for k in range(min(self._p.num_labels, 8))
        ]
        mask = self.url  # storage path -> private URL
        if job.kind == "image":
            doc: dict[str, Any] = {
                "annotation_data": {
                    "annotations": [
                        {"label": e["text"], "label_key": e["label_key"]} for e in legend[:3]
                    ],
                    "image_url": job.data["image_url"],
                    "mask_url": mask(f"{self._job_dir(job)}image_masks/0.png"),
                },
                "legend": legend,
            }
        elif job.kind == "video":
            srcs = {f["frame_id"]: f.get("src") for f in job.data["video_data"]["frames"]}
            doc = {
                "annotation_data": {
                    "annotations": [
                        {"label": e["text"], "label_key": e["label_key"]} for e in legend[:3]
                    ],
                    "frames": [
                        {
                            "frame_id": f,
                            "src": srcs.get(f),
                            "mask_url": mask(f"{self._job_dir(job)}image_masks/{i}.png"),
                        }
                        for i, f in enumerate(job.frame_ids)
                    ],
                },
                "legend": legend,
            }
        elif self.uses_pcd(job):
            doc = self._pcd_result(job)
        else:
            doc = self._masks_result(job)
        return orjson.dumps(doc)

    def _present_keys(self, job: Job) -> list[int]:
        seen = np.zeros(self._p.num_labels, dtype=np.bool_)
        for i in range(len(job.frame_ids)):
            seen[np.unique(self.labels(job, i))] = True
        return [int(k) for k in np.flatnonzero(seen)]

    def _masks_result(self, job: Job) -> dict[str, Any]:
        keys = self._present_keys(job)
        annotations = [
            {
                "label": class_name(k),
                "label_key": k,
                "class_id": self._class_id(k),
                "track_id": self._track_id(job, k),
                "color": class_color(k),
            }
            for k in keys
        ]
        masks = [
            {
                "frame_id": frame,
                "label_url": self.url(f"{self._job_dir(job)}masks/{i}.txt"),
                "sensor_id": "lidar",
                "type": "point_cloud_segmentation",
            }
            for i, frame in enumerate(job.frame_ids)
        ]
        sensor_data = job.data.get("sensor_data", {})
        return {
            "annotation_data": {
                "annotations": annotations,
                "frames": [{"_id": f} for f in job.frame_ids],
                "masks": masks,
                "sensors": [{"_id": "lidar", "name": "lidar", "modality": "lidar"}],
                "tracks": [
                    {"_id": a["track_id"], "label": a["label"], "label_key": a["label_key"]}
                    for a in annotations
                ],
            },
            "sensor_data": {
                "frames": sensor_data.get("frames", []),
                "sensor_meta": sensor_data.get("sensor_meta", []),
            },
        }

    def _pcd_result(self, job: Job) -> dict[str, Any]:
        legend = [
            {
                "id": self._class_id(k),
                "text": class_name(k),
                "color": class_color(k),
                "label_key": k,
                "value": k,
            }
            for k in self._present_keys(job)
        ]
        return {"legend": legend, "url": self.url(f"{self._job_dir(job)}0_data.pcd")}

    def _class_id(self, key: int) -> str:
        return _hex_id(f"{self._seed}\0class\0{key}", 12)

    def _track_id(self, job: Job, key: int) -> str:
        return _hex_id(f"{self._seed}\0track\0{job.reference_id}\0{key}", 16)


def class_name(key: int) -> str:
    base = _CLASS_NAMES[key % len(_CLASS_NAMES)]
    return base if key < len(_CLASS_NAMES) else f"{base}_{key // len(_CLASS_NAMES)}"


def class_color(key: int) -> str:
    digest = hashlib.blake2b(f"color\0{key}".encode(), digest_size=3).hexdigest()
    return f"#{digest}"


def _hex_id(text: str, nbytes: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=nbytes).hexdigest()
