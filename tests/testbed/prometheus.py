"""A real Pushgateway and a real Prometheus that scrapes it, on free loopback ports.

Prometheus scrapes the gateway every second with ``honor_labels: true``, so the grouping labels a
job pushes (namespace, finetunejob) are kept as they are instead of being renamed
``exported_*``. :meth:`Prometheus.query` polls the HTTP query API until a result appears.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.testbed import binaries, processes

SCRAPE_INTERVAL = "1s"


@dataclass
class Pushgateway:
    """A running Pushgateway; push to :attr:`url` (e.g. with ``prometheus_client.push_to_gateway``)."""

    url: str
    process: processes.Process

    @classmethod
    def start(cls, workdir: Path, *, timeout: float = 30.0) -> Pushgateway:
        port = processes.free_port()
        argv = [
            str(binaries.require("prometheus-pushgateway")),
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-admin-api",  # PUT /api/v1/admin/wipe lets a test start from an empty gateway
            # No persistence: Debian's default file is the system gateway's, under /var/lib.
            "--persistence.file=",
        ]
        proc = processes.start("pushgateway", argv, log_dir=workdir / "logs", cwd=workdir)
        gateway = cls(f"http://127.0.0.1:{port}", proc)
        try:
            processes.wait_for_http(f"{gateway.url}/-/ready", process=proc, timeout=timeout)
        except BaseException:
            proc.stop()
            raise
        return gateway

    @property
    def address(self) -> str:
        """host:port, the form Prometheus targets and ``push_to_gateway`` accept."""
        return self.url.removeprefix("http://")

    def metrics_text(self) -> str:
        """What the gateway exposes right now, in the text exposition format."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def wipe(self) -> None:
        """Delete every pushed group."""
        request = urllib.request.Request(f"{self.url}/api/v1/admin/wipe", method="PUT")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def stop(self) -> None:
        self.process.stop(grace=5.0)

    def log_files(self) -> dict[str, Path]:
        return {"pushgateway": self.process.log_path}


@dataclass
class Prometheus:
    """A running Prometheus scraping :attr:`targets` every second."""

    url: str
    process: processes.Process
    config_path: Path
    targets: tuple[str, ...]

    @classmethod
    def start(
        cls, workdir: Path, *, targets: Sequence[str], rule_files: Sequence[Path] = (), timeout: float = 60.0
    ) -> Prometheus:
        """Start Prometheus scraping each ``host:port`` in ``targets`` (honor_labels), with optional rule files."""
        port = processes.free_port()
        config_path = write_config(workdir / "prometheus.yml", targets=targets, rule_files=rule_files)
        argv = [
            str(binaries.require("prometheus")),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",  # POST /-/reload after rewriting the config
            "--web.enable-admin-api",  # delete series between tests when needed
            "--storage.tsdb.retention.time=1d",
        ]
        proc = processes.start("prometheus", argv, log_dir=workdir / "logs", cwd=workdir)
        prom = cls(f"http://127.0.0.1:{port}", proc, config_path, tuple(targets))
        try:
            processes.wait_for_http(f"{prom.url}/-/ready", process=proc, timeout=timeout)
            # Service discovery hands new targets to the scrapers at most every 5 s, so the first
            # scrape comes ~5 s after start; wait for it here, once, not in every test's query.
            prom.wait_for_targets_up(timeout=timeout)
        except BaseException:
            proc.stop()
            raise
        return prom

    def stop(self) -> None:
        self.process.stop(grace=10.0)

    def log_files(self) -> dict[str, Path]:
        return {"prometheus": self.process.log_path}

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raise with Prometheus' error otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as e:
            payload = json.load(e)
        if payload.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} failed: {payload.get('errorType')}: {payload.get('error')}")
        return payload["data"]

    def query_once(self, promql: str) -> list[dict[str, Any]]:
        """The instant-query result vector (or matrix) for ``promql`` now; may be empty."""
        return list(self.api("query", query=promql)["result"])

    def query(self, promql: str, *, timeout: float = 30.0, interval: float = 0.5) -> list[dict[str, Any]]:
        """Poll ``promql`` until it returns a non-empty result; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query_once(promql)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for {promql!r} after {timeout:.0f} s")
            time.sleep(interval)

    def wait_for_targets_up(self, *, timeout: float = 30.0) -> None:
        """Wait until every scrape target has been scraped successfully once."""
        processes.wait_until(
            lambda: len(self.query_once("up == 1")) >= len(self.targets),
            timeout=timeout,
            what="Prometheus targets up",
            check=self.process.check_alive,
        )


def write_config(path: Path, *, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> Path:
    """A Prometheus config scraping ``targets`` every second, keeping the targets' own labels."""
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": "pushgateway",
                # Keep the pushed job/instance/namespace labels instead of renaming them exported_*.
                "honor_labels": True,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
