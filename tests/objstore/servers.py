"""Real object-store servers on loopback for the ``output.dir = "s3://..." / "az://..." /
"gs://..."`` tests.

- ``az://``: Azurite, Microsoft's own Azure Storage emulator (``tests/azurite/server.py``).
- ``gs://``: fake-gcs-server (``gcs_server``; what of harvester's use it can serve is said
  there: reads, not publishing).
- ``s3://``: moto's threaded server (``moto[server]``), started in this process on a free
  loopback port. Chosen over MinIO because it is a pip package (CI installs it with the dev
  extra; MinIO is a prebuilt binary this project's machines cannot download) and because it
  implements the multipart-upload API harvester relies on (create / upload part / complete /
  abort).

Each backend also offers a client that is not harvester's (boto3, azure-storage-blob) to read
what was written, so the tests do not trust harvester's own reads (for GCS, its JSON API).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.azurite.server import ACCOUNT, ACCOUNT_KEY, shared_azurite

from .gcs_server import FAKE_KEY, Gcs, shared_fake_gcs

S3_KEY_ID = "it-s3-key-id"
S3_SECRET = "it-s3-secret-0123456789"  # moto accepts any; never printed by harvester
REGION = "us-east-1"


@dataclass
class Backend:
    name: str
    url: str  #: output.dir
    output: dict[str, Any]  #: the rest of [output]
    env: dict[str, str] = field(default_factory=dict)  #: secrets, by reference
    client: Any = None
    bucket: str = ""
    prefix: str = ""

    def objects(self) -> dict[str, bytes]:
        """Every object under the prefix, by key relative to it (read by the other client)."""
        out: dict[str, bytes] = {}
        if self.name == "s3":
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + "/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    body = self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"]
                    out[obj["Key"][len(self.prefix) + 1 :]] = body.read()
        elif self.name == "gs":
            for key in self.client.keys(self.bucket, self.prefix + "/"):
                out[key[len(self.prefix) + 1 :]] = self.client.get(self.bucket, key)
        else:
            for blob in self.client.list_blobs(name_starts_with=self.prefix + "/"):
                data = self.client.download_blob(blob.name).readall()
                out[blob.name[len(self.prefix) + 1 :]] = data
        return out

    def unfinished(self, rel: str) -> list[str]:
        """Keys under ``rel/`` with an upload begun and never committed, as the server itself
        lists them: S3's open multipart uploads, Azure's blobs holding uncommitted blocks."""
        key = f"{self.prefix}/{rel}/"
        if self.name == "s3":
            page = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
            assert not page.get("IsTruncated")
            return sorted(u["Key"] for u in page.get("Uploads", []))
        if self.name == "gs":
            raise NotImplementedError("fake-gcs-server has no XML multipart uploads to list")
        out = []
        for blob in self.client.list_blobs(name_starts_with=key, include=["uncommittedblobs"]):
            _, uncommitted = self.client.get_blob_client(blob.name).get_block_list("uncommitted")
            if uncommitted:
                out.append(blob.name)
        return sorted(out)

    def put(self, rel: str, data: bytes) -> None:
        key = f"{self.prefix}/{rel}"
        if self.name == "s3":
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        elif self.name == "gs":
            self.client.put(self.bucket, key, data)
        else:
            self.client.upload_blob(key, data, overwrite=True)


_MOTO: Any = None


def _moto_endpoint(config: pytest.Config) -> str:
    global _MOTO
    if _MOTO is None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        config.add_cleanup(server.stop)
        _MOTO = server
    host, port = _MOTO.get_host_and_port()
    return f"http://{host}:{port}"


def make_backend(name: str, config: pytest.Config) -> Iterator[Backend]:
    """A fresh bucket/container and prefix on the named backend's server."""
    tag = secrets.token_hex(4)
    if name == "s3":
        import boto3

        endpoint = _moto_endpoint(config)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
            region_name=REGION,
        )
        bucket = f"harvest-{tag}"
        client.create_bucket(Bucket=bucket)
        yield Backend(
            "s3",
            f"s3://{bucket}/runs/a",
            {
                "endpoint": endpoint,
                "region": REGION,
                "access_key_id_env": "IT_S3_KEY_ID",
                "secret_access_key_env": "IT_S3_SECRET",
            },
            {"IT_S3_KEY_ID": S3_KEY_ID, "IT_S3_SECRET": S3_SECRET},
            client,
            bucket,
            "runs/a",
        )
        return
    if name == "gs":
        fake = shared_fake_gcs(config)
        gcs = Gcs(fake.endpoint)
        bucket = f"harvest-{tag}"
        gcs.create_bucket(bucket)
        yield Backend(
            "gs",
            f"gs://{bucket}/runs/a",
            {"endpoint": fake.endpoint, "service_account_key_env": "IT_GCS_KEY"},
            {"IT_GCS_KEY": FAKE_KEY},
            gcs,
            bucket,
            "runs/a",
        )
        return
    from azure.storage.blob import BlobServiceClient

    server = shared_azurite(config)
    service = BlobServiceClient(server.account_url, credential=ACCOUNT_KEY)
    container = f"harvest-{tag}"
    client = service.create_container(container)
    try:
        yield Backend(
            "az",
            f"az://{container}/runs/a",
            {
                "endpoint": server.account_url,
                "account_name": ACCOUNT,
                "account_key_env": "IT_AZ_KEY",
            },
            {"IT_AZ_KEY": ACCOUNT_KEY},
            client,
            container,
            "runs/a",
        )
    finally:
        client.delete_container()
