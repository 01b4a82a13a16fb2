"""Azure container listings, blob URLs and blob-name sanitising: pure functions, no storage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harvester.azure import (
    BlobItem,
    BlobPage,
    blob_url,
    check_no_clashes,
    list_url,
    parse_blob_list,
    safe_blob_path,
)
from harvester.errors import ProtocolError

CONTAINER = "https://acct.blob.core.windows.net/rd-123?sv=2021-08-06&se=2030-01-01T00%3A00%3A00Z&sr=c&sp=rl&sig=AbC%2Bd%3D"


def listing(*names: str, marker: str = "", extra: str = "") -> bytes:
    blobs = "".join(
        f"<Blob><Name>{n}</Name><Properties><Content-Length>{i * 10}</Content-Length>"
        f"<Content-Type>application/octet-stream</Content-Type></Properties></Blob>"
        for i, n in enumerate(names)
    )
    return (
        '\ufeff<?xml version="1.0" encoding="utf-8"?>'
        '<EnumerationResults ServiceEndpoint="https://acct.blob.core.windows.net/"'
        ' ContainerName="rd-123"><MaxResults>5000</MaxResults>'
        f"<Blobs>{blobs}{extra}</Blobs><NextMarker>{marker}</NextMarker></EnumerationResults>"
    ).encode()


# -- listing pages ----------------------------------------------------------------------
def test_page_with_blobs_and_a_marker() -> None:
    page = parse_blob_list(listing("a.las", "sub/b.json", marker="2!72!MDAw"))
    assert page == BlobPage((BlobItem("a.las", 0), BlobItem("sub/b.json", 10)), "2!72!MDAw")


def test_last_page_and_empty_container() -> None:
    assert parse_blob_list(listing("x")).next_marker is None
    assert parse_blob_list(listing()) == BlobPage((), None)
    bare = b"<EnumerationResults><Blobs /><NextMarker /></EnumerationResults>"
    assert parse_blob_list(bare) == BlobPage((), None)
    no_blobs = b"<EnumerationResults ContainerName='c'></EnumerationResults>"
    assert parse_blob_list(no_blobs) == BlobPage((), None)


def test_escaped_encoded_and_namespaced_names() -> None:
    body = listing("a &amp; b.txt", extra="<BlobPrefix><Name>dir/</Name></BlobPrefix>")
    assert [b.name for b in parse_blob_list(body).blobs] == ["a & b.txt"]
    encoded = (
        b"<EnumerationResults><Blobs><Blob><Name Encoded='true'>x%01y%2Fz</Name></Blob>"
        b"</Blobs></EnumerationResults>"
    )
    assert parse_blob_list(encoded).blobs[0].name == "x\x01y/z"
    namespaced = (
        b"<r:EnumerationResults xmlns:r='urn:x'><r:Blobs><r:Blob><r:Name>n</r:Name></r:Blob>"
        b"</r:Blobs><r:NextMarker>m</r:NextMarker></r:EnumerationResults>"
    )
    assert parse_blob_list(namespaced) == BlobPage((BlobItem("n"),), "m")


def test_content_md5_is_decoded_and_an_empty_one_is_none() -> None:
    # MD5 of b"Hello World", as Azure writes it: sQqNsWTgdUEFt6mb5y4/5Q==
    body = (
        b"<EnumerationResults><Blobs>"
        b"<Blob><Name>h.txt</Name><Properties><Content-Length>11</Content-Length>"
        b"<Content-MD5>sQqNsWTgdUEFt6mb5y4/5Q==</Content-MD5></Properties></Blob>"
        b"<Blob><Name>none</Name><Properties><Content-MD5 /></Properties></Blob>"
        b"</Blobs></EnumerationResults>"
    )
    hello, none = parse_blob_list(body).blobs
    assert hello == BlobItem("h.txt", 11, hashlib.md5(b"Hello World").digest())
    assert none == BlobItem("none", None, None)


@pytest.mark.parametrize("value", ["not base64!", "AAAA", "sQqNsWTgdUEFt6mb5y4/5Q"])
def test_a_content_md5_that_is_no_md5_is_refused(value: str) -> None:
    body = (
        "<EnumerationResults><Blobs><Blob><Name>x</Name><Properties>"
        f"<Content-MD5>{value}</Content-MD5></Properties></Blob></Blobs></EnumerationResults>"
    ).encode()
    with pytest.raises(ProtocolError, match="'x' has a Content-MD5 that is not a base64 MD5"):
        parse_blob_list(body)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "not XML"),
        (b"<EnumerationResults><Blobs><Blob>", "not XML"),
        (b'{"json": true}', "not XML"),
        (b"\xff\xfe garbage", "not XML"),
        (b"<html><body>proxy</body></html>", "<html>"),
        (
            b"<?xml version='1.0'?><Error><Code>AuthenticationFailed</Code>"
            b"<Message>Signature did not match.\nRequestId:1</Message></Error>",
            "AuthenticationFailed",
        ),
        (
            b"<EnumerationResults><Blobs><Blob><Properties/></Blob></Blobs></EnumerationResults>",
            "no <Name>",
        ),
        (
            b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]>'
            b"<EnumerationResults><Blobs><Blob><Name>&lol;</Name></Blob></Blobs>"
            b"</EnumerationResults>",
            "DTD",
        ),
    ],
)
def test_malformed_listings_are_protocol_errors(body: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        parse_blob_list(body)


def test_huge_listing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("harvester.azure.MAX_LIST_BYTES", 100)
    with pytest.raises(ProtocolError, match="larger than"):
        parse_blob_list(listing("a" * 200))


# -- URLs ---------------------------------------------------------------------------------
def test_list_url_keeps_the_sas_verbatim() -> None:
    sas = CONTAINER.split("?", 1)[1]
    assert list_url(CONTAINER) == f"{CONTAINER.split('?')[0]}?{sas}&restype=container&comp=list"
    url = list_url(CONTAINER, "2!72!MDAw/x")
    assert url.startswith(f"https://acct.blob.core.windows.net/rd-123?{sas}&")
    assert url.endswith("&restype=container&comp=list&marker=2%2172%21MDAw%2Fx")
    assert list_url("http://h/c") == "http://h/c?restype=container&comp=list"
    paged = list_url("http://h/c", "m", max_results=2)
    assert paged == "http://h/c?restype=container&comp=list&maxresults=2&marker=m"


def test_blob_url_encodes_the_name_and_keeps_the_sas() -> None:
    sas = CONTAINER.split("?", 1)[1]
    assert blob_url(CONTAINER, "sub dir/a#1?.las") == (
        f"https://acct.blob.core.windows.net/rd-123/sub%20dir/a%231%3F.las?{sas}"
    )
    assert blob_url("http://h/c/", "x") == "http://h/c/x"


# -- hostile names -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a.las", "sub/dir/b.json", "tiles/0/1/2.b3dm", "A_b-c.1"])
def test_ordinary_names_are_kept(name: str) -> None:
    assert safe_blob_path(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        ".",
        "../escape",
        "a/../../etc/passwd",
        "/etc/passwd",
        "a//b",
        "./a",
        "a/./b",
        "/".join(["d"] * 100),
        "/".join(["x" * 100] * 20),
    ],
)
def test_hostile_names_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError):
        safe_blob_path(name)


@pytest.mark.parametrize(
    "name", ["a\\..\\..\\b", ".hidden", "x\x00y", "é/ü.txt", "..a", "a..", "C:\\windows", "~/x"]
)
def test_odd_names_are_sanitised_per_segment(name: str) -> None:
    path = safe_blob_path(name)
    assert path is not None
    assert path.count("/") == name.count("/")
    for part in path.split("/"):
        assert part not in ("", ".", "..") and not part.startswith(".")
        assert "\\" not in part and "\x00" not in part


def test_folder_placeholders_are_skipped() -> None:
    assert safe_blob_path("dir/") is None
    assert safe_blob_path("../") is None  # no content: nothing is written anywhere


@given(st.text(min_size=1, max_size=300))
def test_no_name_ever_leaves_the_folder(name: str) -> None:
    root = Path("/jail/job")
    try:
        path = safe_blob_path(name)
    except ProtocolError:
        return
    if path is None:
        return
    assert not path.startswith("/")
    target = (root / path).resolve()
    assert target.is_relative_to(root) and target != root


def test_distinct_names_stay_distinct() -> None:
    names = ["a b", "a_b", "a?b", ".a", "a"]
    paths = [safe_blob_path(n) for n in names]
    assert len(set(paths)) == len(names)


def test_file_and_folder_clash_is_refused() -> None:
    check_no_clashes(["a/b", "a/c", "ab"])
    with pytest.raises(ProtocolError, match="both a file and a folder"):
        check_no_clashes(["a", "a/b/c"])
