"""Storage decisions: where an s3:// URI points, and which failures are permanent."""

from __future__ import annotations

import datetime as dt

import pytest

from kubetune_job.sigv4 import Credentials, sign
from kubetune_job.storage import (
    MAX_PARTS,
    StorageOptions,
    classify,
    parse_uploads,
    part_size,
    resolve_s3,
    short_reason,
)

DENIED_XML = (
    "Generic S3 error: Error performing list request: Error performing GET http://127.0.0.1:9000/b?list-type=2 "
    'in 1ms - Server returned non-2xx status code: 403 Forbidden: <?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match"
    '</Message></Error>\n\nDebug source:\nGeneric { store: "S3" }'
)


def test_uri_splits_into_bucket_and_prefix() -> None:
    """s3://bucket/a/b/ is bucket `bucket` and key prefix `a/b`; a bare bucket has no prefix."""
    assert resolve_s3("s3://bucket/a/b/", StorageOptions(), {}).prefix == "a/b"
    bare = resolve_s3("s3://bucket", StorageOptions(), {})
    assert (bare.bucket, bare.prefix) == ("bucket", "")


def test_spec_storage_block_overrides_the_environment() -> None:
    """spec.storage.endpoint and region win over AWS_ENDPOINT_URL and AWS_REGION."""
    env = {"AWS_ENDPOINT_URL": "http://env:1", "AWS_REGION": "eu-west-1"}
    loc = resolve_s3("s3://b/p", StorageOptions(endpoint="http://spec:2/", region="us-west-2"), env)
    assert (loc.endpoint, loc.region) == ("http://spec:2", "us-west-2")


@pytest.mark.parametrize(
    ("env", "endpoint", "region"),
    [
        (
            {"AWS_ENDPOINT_URL_S3": "http://s3only:1", "AWS_ENDPOINT_URL": "http://all:1"},
            "http://s3only:1",
            "us-east-1",
        ),
        ({"AWS_ENDPOINT_URL": "http://all:1", "AWS_DEFAULT_REGION": "ap-south-1"}, "http://all:1", "ap-south-1"),
        (
            {"AWS_REGION": "eu-central-1", "AWS_DEFAULT_REGION": "x"},
            "https://s3.eu-central-1.amazonaws.com",
            "eu-central-1",
        ),
    ],
)
def test_environment_follows_the_aws_conventions(env: dict[str, str], endpoint: str, region: str) -> None:
    """The service-specific endpoint variable first, AWS_REGION before AWS_DEFAULT_REGION, AWS itself last."""
    loc = resolve_s3("s3://b/p", StorageOptions(), env)
    assert (loc.endpoint, loc.region) == (endpoint, region)


@pytest.mark.parametrize(
    ("kind", "text", "verdict"),
    [
        ("GenericError", DENIED_XML, "denied"),
        ("GenericError", "status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>", "denied"),
        ("GenericError", "status code: 403 Forbidden: <Error><Code>InvalidAccessKeyId</Code></Error>", "denied"),
        ("PermissionDeniedError", "The operation lacked the necessary privileges", "denied"),
        ("UnauthenticatedError", "The operation lacked valid authentication credentials", "denied"),
        ("GenericError", "Error getting credentials from the environment", "denied"),
        ("FileNotFoundError", "Object at location x not found", "not_found"),
        ("GenericError", "status code: 404 Not Found: <Error><Code>NoSuchKey</Code></Error>", "not_found"),
        ("GenericError", "after 10 retries, max_retries: 10 - HTTP error: error sending request", "unavailable"),
        ("GenericError", "status code: 503 Service Unavailable: <Error><Code>SlowDown</Code></Error>", "unavailable"),
        ("GenericError", "status code: 500 Internal Server Error", "unavailable"),
        ("GenericError", "operation timed out", "unavailable"),
    ],
)
def test_classify_separates_permanent_from_retryable_failures(kind: str, text: str, verdict: str) -> None:
    """Credentials, permissions and missing buckets are permanent; no answer, 5xx and throttling are not."""
    assert classify(kind, text) == verdict


def test_short_reason_keeps_the_s3_code_and_message() -> None:
    """An error message names the S3 error code, the HTTP status and the server's message, not the debug dump."""
    reason = short_reason(DENIED_XML)
    assert reason.startswith("SignatureDoesNotMatch (HTTP 403): The request signature")
    assert "Debug" not in reason
    assert (
        short_reason("Generic S3 error: HTTP error: error sending request\nmore") == "HTTP error: error sending request"
    )


def test_part_size_grows_so_no_upload_needs_more_than_the_s3_part_limit() -> None:
    mib = 1 << 20
    assert part_size(1, 16 * mib) == 16 * mib
    assert part_size(16 * mib * MAX_PARTS, 16 * mib) == 16 * mib
    big = 600 * 10**9  # one optimizer file of a large model
    size = part_size(big, 16 * mib)
    assert size % mib == 0 and -(-big // size) <= MAX_PARTS and size - mib < -(-big // MAX_PARTS)


def test_sigv4_matches_the_examples_aws_documents() -> None:
    """The two header-signed GET examples of AWS's Signature Version 4 documentation."""
    credentials = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    now = dt.datetime(2013, 5, 24, tzinfo=dt.UTC)
    expected = {
        "/?lifecycle": "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        "/?max-keys=2&prefix=J": "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    }
    for path, signature in expected.items():
        url = "https://examplebucket.s3.amazonaws.com" + path
        headers = sign("GET", url, body=b"", credentials=credentials, region="us-east-1", now=now)
        assert headers["Authorization"].endswith(f"Signature={signature}")
        assert headers["X-Amz-Date"] == "20130524T000000Z"


def test_unfinished_uploads_are_read_page_by_page() -> None:
    ns = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
    page = (
        f"<ListMultipartUploadsResult {ns}><Bucket>b</Bucket><IsTruncated>true</IsTruncated>"
        "<NextKeyMarker>run/checkpoint-2/b</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>"
        "<Upload><Key>run/checkpoint-2/a</Key><UploadId>u1</UploadId></Upload>"
        "<Upload><Key>run/checkpoint-2/b</Key><UploadId>u2</UploadId></Upload></ListMultipartUploadsResult>"
    ).encode()
    uploads, markers = parse_uploads(page)
    assert uploads == [("run/checkpoint-2/a", "u1"), ("run/checkpoint-2/b", "u2")]
    assert markers == {"key-marker": "run/checkpoint-2/b", "upload-id-marker": "u2"}
    last = f"<ListMultipartUploadsResult {ns}><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>"
    assert parse_uploads(last.encode()) == ([], {})
