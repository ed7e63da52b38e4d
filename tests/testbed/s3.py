"""A real S3 server for tests: SeaweedFS (``weed server -s3``) on free loopback ports.

One process runs the master, a volume server, the filer and the S3 gateway. Every port is chosen
here, gRPC ports included (SeaweedFS would otherwise use HTTP port + 10000, which can fall outside
the port range), and the filer's and gateway's local sockets live in the temp dir. The gateway
authenticates with AWS Signature V4 against one admin identity from an S3 config file, so clients
use the same credentials path as against any S3 service.

:meth:`SeaweedS3.request` signs with the job's own SigV4 signer (the test bed uses no AWS SDK:
botocore pins python-dateutil below what the kubernetes client needs).
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_job.sigv4 import Credentials, sign
from tests.testbed import binaries, processes

REGION = "us-east-1"


@dataclass
class SeaweedS3:
    """A running SeaweedFS with its S3 gateway at :attr:`endpoint`."""

    workdir: Path
    endpoint: str
    access_key: str
    secret_key: str
    process: processes.Process
    grpc_ports: dict[str, int] = field(default_factory=dict)
    region: str = REGION
    startup_seconds: float = 0.0

    @classmethod
    def start(cls, workdir: Path, *, timeout: float = 90.0) -> SeaweedS3:
        began = time.monotonic()
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        access_key, secret_key = "testbed" + secrets.token_hex(6), secrets.token_hex(20)
        config = _write_identities(workdir / "s3.json", access_key=access_key, secret_key=secret_key)
        _write_master_toml(workdir / "master.toml")  # read from the working directory
        ports = {name: processes.free_port() for name in ("master", "volume", "filer", "s3")}
        grpc = {name: processes.free_port() for name in ports}
        argv = [
            str(binaries.require("weed")),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={grpc['master']}",
            "-master.telemetry=false",
            # Small volumes, many allowed: each bucket is a collection that grows several volumes at once.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=100",
            # Nothing to drain in tests: stop at once instead of after the default 10 s.
            "-volume.preStopSeconds=0",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={grpc['volume']}",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={grpc['filer']}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={grpc['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-s3.config={config}",
            "-s3.allowDeleteBucketNotEmpty=true",
        ]
        proc = processes.start("seaweedfs", argv, log_dir=workdir / "logs", cwd=workdir)
        s3 = cls(workdir, f"http://127.0.0.1:{ports['s3']}", access_key, secret_key, proc, grpc_ports=grpc)
        try:
            processes.wait_for_http(f"{s3.endpoint}/healthz", process=proc, timeout=timeout)
            # /healthz answers long before writes work: the filer joins the master's lock ring only
            # after a fixed ~8 s membership wait, and object writes need that lock. A real write
            # proves the whole chain, so no test pays for it.
            processes.wait_until(
                s3._write_round_trip, timeout=timeout, what="SeaweedFS S3 to accept a write", check=proc.check_alive
            )
        except BaseException:
            proc.stop()
            raise
        s3.startup_seconds = time.monotonic() - began
        return s3

    def stop(self) -> None:
        # Its shutdown keeps retrying peers it has already stopped; test data need no clean close.
        self.process.stop(grace=3.0)
        # `weed server` always puts its gRPC unix sockets in /tmp, named by kind and port.
        for kind, port in self.grpc_ports.items():
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)

    def log_files(self) -> dict[str, Path]:
        return {"seaweedfs": self.process.log_path}

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point an S3 client here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def store(self, bucket: str, **kwargs: Any) -> Any:
        """An obstore S3Store for ``bucket`` on this server (path-style, plain HTTP allowed)."""
        from obstore.store import S3Store

        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            region=self.region,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
            **kwargs,
        )

    def create_bucket(self, name: str) -> None:
        """Create ``name``; an existing bucket of ours is fine (BucketAlreadyOwnedByYou)."""
        status, body = self.request("PUT", f"/{name}")
        if status != 200 and b"BucketAlreadyOwnedByYou" not in body:
            raise RuntimeError(f"creating bucket {name}: HTTP {status}: {body.decode(errors='replace')}")

    def delete_bucket(self, name: str) -> None:
        """Delete ``name`` with its objects (the server allows deleting non-empty buckets)."""
        status, body = self.request("DELETE", f"/{name}")
        if status not in (204, 404):
            raise RuntimeError(f"deleting bucket {name}: HTTP {status}: {body.decode(errors='replace')}")

    def request(self, method: str, path: str, *, query: str = "", body: bytes = b"") -> tuple[int, bytes]:
        """One signed request to the gateway; returns the status and body, whatever the status."""
        url = self.endpoint + urllib.parse.quote(path) + (f"?{query}" if query else "")
        credentials = Credentials(self.access_key, self.secret_key)
        headers = sign(method, url, body=body, credentials=credentials, region=self.region)
        request = urllib.request.Request(url, data=body if body else None, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read()

    def _write_round_trip(self) -> bool:
        """Create a bucket, write an object, delete both: True once the whole write path works."""
        name = "testbed-ready-" + secrets.token_hex(4)
        try:
            if self.request("PUT", f"/{name}")[0] != 200:
                return False
            written = self.request("PUT", f"/{name}/probe", body=b"ready")[0] == 200
            self.delete_bucket(name)
            return written
        except (OSError, RuntimeError):
            return False


def _write_master_toml(path: Path) -> None:
    """Master settings for a throwaway server (defaults are kept for every key not named here).

    allocation_deferral: a fresh master otherwise holds the first volume allocation ~5 s, waiting
    for veteran volume servers that a test never has. copy_1: grow 2 volumes per bucket, not 7.
    """
    path.write_text('[master.volume_growth]\nallocation_deferral = "0s"\ncopy_1 = 2\n')


def _write_identities(path: Path, *, access_key: str, secret_key: str) -> Path:
    """The S3 config: one identity that may do everything, and no anonymous access."""
    config = {
        "identities": [
            {
                "name": "testbed-admin",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path
