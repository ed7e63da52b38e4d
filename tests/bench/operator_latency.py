"""Operator latency and throughput on a real control plane (the test bed's), in one invocation.

1. Latency: FineTuneJob created -> its Job exists, and -> its pod Running (test kubelet), p50/p99,
   against `kubectl create` of the same Job directly (its pod Running), same run.
2. Burst: N FineTuneJobs (suspended: no pods, nothing trained) waiting when the operator starts:
   reconciles per second until every Job exists, and the operator's peak RSS. Creating them first
   measures the operator, not how fast one client can create objects.
Targets: p99 added latency <= 0.5 s, >= 50 reconciles/s, RSS <= 250 MB.

    .venv/bin/python tests/bench/operator_latency.py [--samples 20] [--burst 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch

from kubetune_job.spec import parse_manifest
from kubetune_operator.manifests import Owner, children
from kubetune_operator.settings import OperatorSettings
from tests.kube import JOB_IMAGE, install_crd, operator_process
from tests.testbed.bed import pod_env
from tests.testbed.cluster import ControlPlane
from tests.testbed.kubelet import NodeSpec, TestKubelet


def manifest(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "/nonexistent/model"},
            "dataset": {"uri": "/nonexistent/data"},
            "resources": {"gpus": 1},
        },
    }


class Watcher(threading.Thread):
    """Records the first time each Job appears and each pod is Running, per namespace."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api, self.namespace = api, namespace
        self.jobs: dict[str, float] = {}
        self.running: dict[str, float] = {}

    def run(self) -> None:
        threading.Thread(target=self._pods, daemon=True).start()
        with contextlib.suppress(Exception):  # the stream ends when the control plane stops
            for event in watch.Watch().stream(k8s.BatchV1Api(self.api).list_namespaced_job, self.namespace):
                self.jobs.setdefault(event["object"].metadata.name, time.monotonic())

    def _pods(self) -> None:
        with contextlib.suppress(Exception):
            for event in watch.Watch().stream(k8s.CoreV1Api(self.api).list_namespaced_pod, self.namespace):
                pod = event["object"]
                if pod.status.phase == "Running":
                    self.running.setdefault(pod.metadata.labels.get("job-name", ""), time.monotonic())


def wait(done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not done():
        raise SystemExit("timed out")


def namespace(api: k8s.ApiClient, name: str) -> str:
    core = k8s.CoreV1Api(api)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            return name
        except k8s.ApiException:
            time.sleep(0.1)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--burst", type=int, default=1000)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    plane = ControlPlane.start(work / "cluster")
    kubelet = TestKubelet(plane.api_client(), workdir=work / "kubelet", extra_env=pod_env()).start()
    try:
        api = plane.api_client()
        install_crd(plane)
        custom, batch = k8s.CustomObjectsApi(api), k8s.BatchV1Api(api)
        kubelet.add_node(NodeSpec("gpu-node-0", gpus=64, pods=500))
        with operator_process(plane.kubeconfig, work / "operator", progress_interval_seconds="3600") as op:
            ns = namespace(api, "latency")
            seen = Watcher(api, ns)
            seen.start()
            to_job, to_running, direct = [], [], []
            for i in range(a.samples):
                name = f"ftj-{i}"
                t0 = time.monotonic()
                body = custom.create_namespaced_custom_object(
                    "kubetune.io", "v1alpha1", ns, "finetunejobs", manifest(name)
                )
                wait(lambda n=name: n in seen.running, 120)
                to_job.append(seen.jobs[name] - t0)
                to_running.append(seen.running[name] - t0)
                # The same Job, created directly (as kubectl create does).
                owner = Owner(f"direct-{i}", ns, body["metadata"]["uid"])
                job = children(owner, parse_manifest(manifest(owner.name)).spec, OperatorSettings(job_image=JOB_IMAGE))[
                    0
                ]
                del job["metadata"]["ownerReferences"]
                t0 = time.monotonic()
                batch.create_namespaced_job(ns, job)
                wait(lambda n=owner.name: n in seen.running, 120)
                direct.append(seen.running[owner.name] - t0)
            added = [r - d for r, d in zip(sorted(to_running), sorted(direct), strict=True)]
            print(f"creation -> Job:          p50 {pct(to_job, 0.5):.3f} s  p99 {pct(to_job, 0.99):.3f} s")
            print(f"creation -> pod Running:  p50 {pct(to_running, 0.5):.3f} s  p99 {pct(to_running, 0.99):.3f} s")
            print(f"direct Job -> Running:    p50 {pct(direct, 0.5):.3f} s  p99 {pct(direct, 0.99):.3f} s")
            print(
                f"added by the operator:    p50 {pct(added, 0.5):.3f} s  p99 {pct(added, 0.99):.3f} s (target <= 0.5)"
            )

        burst = namespace(api, "burst")
        jobs = Watcher(api, burst)
        jobs.start()
        suspended = {**manifest("x")["spec"], "runPolicy": {"suspend": True}}
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: custom.create_namespaced_custom_object(
                        "kubetune.io", "v1alpha1", burst, "finetunejobs", {**manifest(f"b-{i}"), "spec": suspended}
                    ),
                    range(a.burst),
                )
            )
        with operator_process(plane.kubeconfig, work / "operator", progress_interval_seconds="3600") as op:
            t0 = time.monotonic()
            wait(lambda: len(jobs.jobs) >= a.burst, 1800)
            elapsed = max(jobs.jobs.values()) - t0
            rss = peak_rss_mb(op["process"].pid)
        print(
            f"burst of {a.burst} waiting at start: every Job exists after {elapsed:.1f} s: "
            f"{a.burst / elapsed:.1f} reconciles/s (target >= 50)"
        )
        print(f"operator peak RSS: {rss:.0f} MB (target <= 250)")
        print(json.dumps({"p99_added": pct(added, 0.99), "reconciles_per_s": a.burst / elapsed, "rss_mb": rss}))
    finally:
        kubelet.stop()
        plane.stop()


if __name__ == "__main__":
    main()
