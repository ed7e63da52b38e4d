"""AWS Signature Version 4 for the few S3 calls that obstore does not offer (listing and aborting
multipart uploads), and for the test bed's own requests. Pure: the clock is passed in or read once.

Header form with a signed payload, as https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
describes it. ``url`` must already be percent-encoded; its query string is canonicalized here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def sign(
    method: str, url: str, *, body: bytes, credentials: Credentials, region: str, now: dt.datetime | None = None
) -> dict[str, str]:
    """The headers (Authorization included) that sign one S3 request."""
    parts = urllib.parse.urlsplit(url)
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp}
    if credentials.session_token:
        headers["x-amz-security-token"] = credentials.session_token
    signed = ";".join(sorted(headers))
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="-_.~"),
            "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
            signed,
            payload_hash,
        ]
    )
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{credentials.secret_key}".encode(), stamp[:8]), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    # Header names as HTTP clients write them (the signature uses the lower-case form).
    titled = {"-".join(w.capitalize() for w in k.split("-")): v for k, v in headers.items() if k != "host"}
    return {**titled, "Authorization": authorization}
