"""Playment's result files on the storage host: their private URLs and their contents.

Layout under the storage host:
``/playment-private/<project>/<job_id>/result.json``, ``.../masks/<frame index>.txt`` (masks
variant; ``.../masks/<frame index>-<sensor index>.txt`` when a frame has a mask per lidar
sensor), ``.../<frame index>_data.pcd`` (PCD variant, single-frame point-cloud jobs) and
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
from dataclasses import dataclass
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
    r"(?P<name>result\.json|masks/(?P<mask>\d+)(?:-(?P<sensor>\d+))?\.txt|(?P<pcd>\d+)_data\.pcd"
    r"|image_masks/(?P<img>\d+)\.png)$"
)
_CLASS_NAMES = (
    "unlabelled", "car", "truck", "bus", "pedestrian", "cyclist", "motorcycle", "road",
    "sidewalk", "parking", "building", "fence", "vegetation", "trunk", "terrain", "pole",
    "traffic_sign", "traffic_light", "other_vehicle", "other_ground",
)  # fmt: skip


DEFAULT_SENSOR = "lidar"


@dataclass(frozen=True, slots=True)
class MaskSpec:
    """One mask of a point-cloud job: a frame, a lidar sensor, and where its file lives."""

    index: int  #: the frame's position in the job
    frame_id: str
    sensor_id: str
    name: str  #: ``<frame index>`` or ``<frame index>-<sensor index>``
    #: the frame's sensor when it has several masks (ground truth per sensor), else None
    truth_sensor: str | None


def lidar_masks(job: Job) -> list[MaskSpec]:
    """The masks a point-cloud job's result lists, in frame order then sensor order."""
    sensor_data = job.data.get("sensor_data")
    sensor_data = sensor_data if isinstance(sensor_data, dict) else {}
    meta = sensor_data.get("sensor_meta")
    lidars = [
        m["id"]
        for m in (meta if isinstance(meta, list) else [])
        if isinstance(m, dict) and m.get("modality") == "lidar" and isinstance(m.get("id"), str)
    ]
    frames = sensor_data.get("frames")
    frames = frames if isinstance(frames, list) else []
    out: list[MaskSpec] = []
    for i, frame_id in enumerate(job.frame_ids):
        frame = frames[i] if i < len(frames) and isinstance(frames[i], dict) else {}
        listed = frame.get("sensors")
        present = list(
            dict.fromkeys(
                s["sensor_id"]
                for s in (listed if isinstance(listed, list) else [])
                if isinstance(s, dict) and s.get("sensor_id") in lidars
            )
        )
        if len(present) <= 1:
            sensor = present[0] if present else (lidars[0] if lidars else DEFAULT_SENSOR)
            out.append(MaskSpec(i, frame_id, sensor, str(i), None))
        else:
            out.extend(
                MaskSpec(i, frame_id, sensor, f"{i}-{j}", sensor)
                for j, sensor in enumerate(present)
            )
    return out


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
        if job.kind != "point_cloud":
            return None
        if m["pcd"] is not None:
            index = int(m["pcd"])
            if not self.uses_pcd(job) or index >= len(job.frame_ids):
                return None
            return ObjectSource(lambda: self._pcd(job, index), "application/octet-stream")
        if self.uses_pcd(job):
            return None
        name = m["mask"] if m["sensor"] is None else f"{m['mask']}-{m['sensor']}"
        spec = next((ms for ms in lidar_masks(job) if ms.name == name), None)
        if spec is None:
            return None
        return ObjectSource(lambda: self._mask(job, spec), "text/plain")

    # -- contents -----------------------------------------------------------------------

    def labels(self, job: Job, index: int, sensor: str | None = None) -> truth.LabelArray:
        frame = truth.sensor_frame(job.frame_ids[index], sensor)
        n = truth.points_for_frame(self._seed, job.reference_id, frame, self._p.points_per_frame)
        return truth.frame_labels(self._seed, job.reference_id, frame, n, self._p.num_labels)

    def _mask(self, job: Job, spec: MaskSpec) -> bytes:
        labels = self.labels(job, spec.index, spec.truth_sensor)
        return truth.format_mask(labels, self._p.mask_line_width)

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
        """The seed's "Point Cloud Segmentation" result object, key for key."""
        specs = lidar_masks(job)
        annotations: list[dict[str, Any]] = []
        used: set[int] = set()
        for spec in specs:
            for k in np.unique(self.labels(job, spec.index, spec.truth_sensor)).tolist():
                used.add(k)
                annotations.append(
                    {
                        "_id": _uuid(f"{self._seed}\0ann\0{job.job_id}\0{spec.name}\0{k}"),
                        "_isStationary": False,
                        "attributes": {},
                        "class_id": self._class_id(k),
                        "color": class_color(k),
                        "frame_id": spec.frame_id,
                        "grouping_config": None,
                        "label": class_name(k),
                        "label_key": k,
                        "sensor_id": spec.sensor_id,
                        "text": class_name(k),
                        "track_id": self._track_id(job, k),
                        "type": "segmentation3d",
                    }
                )
        masks = [
            {
                "_id": _uuid(f"{self._seed}\0mask\0{job.job_id}\0{spec.name}"),
                "frame_id": spec.frame_id,
                "label_url": self.url(f"{self._job_dir(job)}masks/{spec.name}.txt"),
                "sensor_id": spec.sensor_id,
                "type": "segmentation3d",
                "url": "",
            }
            for spec in specs
        ]
        sensors = self._sensors(job, specs)
        tracks = [
            {
                "_id": self._track_id(job, k),
                "attributes": None,
                "color": class_color(k),
                "grouping_config": None,
                "label": class_name(k),
                "label_id": None,
                "state": "",
                "type": "segmentation3d",
            }
            for k in sorted(used)
        ]
        sensor_data = job.data.get("sensor_data", {})
        return {
            "annotation_data": {
                "annotations": annotations,
                "frames": [{"_id": f} for f in job.frame_ids],
                "groups": None,
                "masks": masks,
                "sensors": sensors,
                "tracks": tracks,
            },
            "sensor_data": {
                "frames": sensor_data.get("frames", []),
                "sensor_meta": sensor_data.get("sensor_meta", []),
            },
        }

    @staticmethod
    def _sensors(job: Job, specs: list[MaskSpec]) -> list[dict[str, Any]]:
        """Every declared sensor with its type (the seed's ``sensors``), or the mask sensors."""
        meta = job.data.get("sensor_data", {}).get("sensor_meta")
        out: dict[str, str] = {}
        for m in meta if isinstance(meta, list) else []:
            if isinstance(m, dict) and isinstance(m.get("id"), str):
                modality = m.get("modality")
                out.setdefault(m["id"], str(modality).upper() if modality else "UNKNOWN")
        for spec in specs:
            out.setdefault(spec.sensor_id, "LIDAR")
        return [{"sensor_id": k, "sensor_type": v} for k, v in out.items()]

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


def _uuid(text: str) -> str:
    h = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _hex_id(text: str, nbytes: int) -> str:
    return hashlib.blake2b(text.encode(), digest_size=nbytes).hexdigest()
