"""cognite-sdk, unmodified, against ``harvester emulator``; and harvester's own requests and
parsing held against what that SDK sends and receives.

cognite-sdk has no segmentation call (its ``vision`` API is the feature-extraction one, which
the emulator does not serve): a user reaches segmentation through the SDK's generic
``client.post``/``client.get``, with its OAuth client credentials, gzip bodies and retries.
Its files API (download links, by id, external id and instance id) and token inspection are
called as they are. Jobs finish at once here (``job_duration_s = 0``): nothing waits on a clock.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from cognite.client import ClientConfig, CogniteClient, global_config
from cognite.client.credentials import OAuthClientCredentials
from cognite.client.data_classes.contextualization import FileReference
from cognite.client.data_classes.data_modeling.ids import NodeId
from multidict import CIMultiDict

from harvester.providers.base import Accepted, RemoteState, Status
from harvester.providers.cognite import CogniteProvider
from harvester.wire import Response

from .common import WAIT_S, cognite, emulator, introspect, new_job
from .seeds import cognite_job_example

PROJECT = "sdk-project"
CLIENT_ID, SECRET = "sdk-client", "sdk-secret"
SCENARIO = (
    "seed = 6\n[cognite]\njob_duration_s = 0\nrequired_cdf_version = 'beta'\n"
    "file_bytes = 2048\nauto_retryable_statuses = [500]\n"
)
BETA = {"cdf-version": "beta"}
#: the generic client.post/get take the path from the cluster's root
SEGMENT = f"/api/v1/projects/{PROJECT}/context/vision/segment"
REFERENCES = [
    FileReference(file_id=1234),
    FileReference(file_external_id="site-a/photo-1.jpg"),
    FileReference(file_instance_id=NodeId("site-a", "photo-1")),
]


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with emulator(tmp_path_factory.mktemp("cognite"), SCENARIO) as found:
        yield found


@pytest.fixture(scope="module")
def client(urls: dict[str, str]) -> CogniteClient:
    global_config.disable_pypi_version_check = True  # no registry look-up from a test
    # Bounded: the SDK's default is 10 retries with backoff up to 60 s.
    global_config.max_retries = 3
    global_config.max_retry_backoff = 1
    credentials = OAuthClientCredentials(
        token_url=urls["token"],
        client_id=CLIENT_ID,
        client_secret=SECRET,
        scopes=[f"{urls['cognite']}/.default"],
    )
    config = ClientConfig(
        client_name="harvester-contract-tests",
        project=PROJECT,
        credentials=credentials,
        base_url=urls["cognite"],
        timeout=int(WAIT_S),
    )
    return CogniteClient(config)


def provider(urls: dict[str, str]) -> CogniteProvider:
    return cognite(urls["cognite"], PROJECT)


def as_response(doc: Any) -> Response:
    return Response(200, CIMultiDict(), orjson.dumps(doc), "sdk", None)


@pytest.mark.parametrize("ref", REFERENCES, ids=["fileId", "fileExternalId", "fileInstanceId"])
def test_the_sdk_segments_an_image(
    client: CogniteClient, urls: dict[str, str], ref: FileReference
) -> None:
    body = {"items": [ref.to_api_item()], **cognite_job_example()["prompt"]}
    created = client.post(SEGMENT, json=body, headers=BETA).json()
    assert created["status"] == "Queued"
    job_id = created["jobId"]
    done = client.get(f"{SEGMENT}/{job_id}", headers=BETA).json()
    assert done["status"] == "Completed" and done["items"][0]["segments"]
    truth = introspect(urls, f"/truth/cognite/{job_id}")
    assert done["items"] == truth["items"]

    # harvester accepts the same body, and reads what the SDK was served the same way.
    ours = provider(urls)
    ours.validate_payload(body)
    assert ours.build_create(new_job("cognite"), body).json == body
    assert ours.parse_create(as_response(created), new_job("cognite")) == Accepted(str(job_id))
    status = ours.parse_poll(as_response(done), new_job("cognite"))
    assert isinstance(status, Status) and status.state == RemoteState.SUCCEEDED and status.known


def test_the_sdk_fetches_download_links_and_inspects_its_token(
    client: CogniteClient, urls: dict[str, str]
) -> None:
    by_id = client.files.retrieve_download_urls(id=[1234, 5678])
    by_xid = client.files.retrieve_download_urls(external_id="site-a/photo-1.jpg")
    by_node = client.files.retrieve_download_urls(instance_id=NodeId("site-a", "photo-1"))
    links = [*by_id.values(), *by_xid.values(), *by_node.values()]
    assert set(by_id) == {1234, 5678} and len(links) == 4
    for link in links:  # signed: fetched without credentials, as the SDK does
        with urllib.request.urlopen(link, timeout=WAIT_S) as answer:
            assert len(answer.read()) == 2048
    inspection = client.iam.token.inspect()
    assert inspection.subject == CLIENT_ID


def test_the_sdk_resends_what_cognite_marks_auto_retryable(
    client: CogniteClient, urls: dict[str, str]
) -> None:
    before = introspect(urls, "/stats")["cognite"]
    fault = {"kind": "5xx", "provider": "cognite", "status": 500, "match": "/segment", "count": 1}
    introspect(urls, "/faults", fault)
    body = {"items": [{"fileId": 99}], **cognite_job_example()["prompt"]}
    created = client.post(SEGMENT, json=body, headers=BETA).json()
    assert created["status"] == "Queued"
    after = introspect(urls, "/stats")["cognite"]
    # one 500 marked auto-retryable, then the create: made once, as harvester does (its
    # integration test, test_a_create_cognite_marks_auto_retryable_is_sent_again)
    assert after["creates"] == before["creates"] + 1
    assert after["faults"].get("5xx", 0) == before["faults"].get("5xx", 0) + 1


def test_the_scenario_file_is_the_one_in_use(urls: dict[str, str]) -> None:
    scenario = introspect(urls, "/scenario")
    assert scenario["cognite"]["auto_retryable_statuses"] == [500]
