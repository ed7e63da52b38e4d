"""Operator latency and throughput on a real control plane (the test bed's), in one invocation.

1. Latency: FineTuneJob created -> its Job exists, and -> its pod Running (test kubelet; the pod
   runs a stand-in for the job that sleeps), p50/p99, against `kubectl create` of the same Job
   directly (its pod Running), same run.
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
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import watch

ROOT = Path(__file__).parents[2]
sys.path[:0] = [str(ROOT)]

from kubetune_api.spec import parse_manifest  # noqa: E402
from kubetune_operator.manifests import Owner, children  # noqa: E402
from kubetune_operator.settings import OperatorSettings  # noqa: E402
from tests.kube import JOB_IMAGE, bare_finetunejob, install_crd, operator_process  # noqa: E402
from tests.testbed.cluster import ControlPlane  # noqa: E402
from tests.testbed.kubelet import NodeSpec, TestKubelet  # noqa: E402


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


def wait(what: str, done: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not done():
        raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


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


def latency(plane: ControlPlane, work: Path, samples: int) -> float:
    """Creation -> Job and -> pod Running through the operator, against the same Job created directly.

    One sample at a time, each after the previous one has settled (its status written, its pods
    Running), so every sample measures the same quiet system; one warm-up sample first (the
    operator's watches starting) is not counted. What the operator adds is creation -> Job, less
    the time the direct create call takes (paired per sample): from there on both paths are the same
    Job. The -> Running figures show the whole path, pod start included, for both."""
    api = plane.api_client()
    custom, batch = k8s.CustomObjectsApi(api), k8s.BatchV1Api(api)
    with operator_process(plane.kubeconfig, work / "operator", progress_interval_seconds="3600"):
        ns = namespace(api, "latency")
        seen = Watcher(api, ns)
        seen.start()

        def phase(name: str) -> str | None:
            body = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs", name)
            return (body.get("status") or {}).get("phase")

        to_job, to_running, direct, direct_call = [], [], [], []
        for i in range(samples + 1):
            name = f"ftj-{i}"
            t0 = time.monotonic()
            body = custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", bare_finetunejob(name)
            )
            wait(f"{name} Running", lambda n=name: n in seen.running and phase(n) == "Running", 120)
            # The same Job, created directly (as kubectl create does).
            owner = Owner(f"direct-{i}", ns, body["metadata"]["uid"])
            spec = parse_manifest(bare_finetunejob(owner.name)).spec
            job = children(owner, spec, OperatorSettings(job_image=JOB_IMAGE))[0]
            del job["metadata"]["ownerReferences"]
            d0 = time.monotonic()
            batch.create_namespaced_job(ns, job)
            called = time.monotonic() - d0
            wait(f"{owner.name}'s pod Running", lambda n=owner.name: n in seen.running, 120)
            if i == 0:
                continue  # warm-up
            to_job.append(seen.jobs[name] - t0)
            to_running.append(seen.running[name] - t0)
            direct.append(seen.running[owner.name] - d0)
            direct_call.append(called)
            time.sleep(0.5)
    added = [j - c for j, c in zip(to_job, direct_call, strict=True)]
    print(f"creation -> Job:          p50 {pct(to_job, 0.5):.3f} s  p99 {pct(to_job, 0.99):.3f} s")
    print(f"direct create call:       p50 {pct(direct_call, 0.5):.3f} s  p99 {pct(direct_call, 0.99):.3f} s")
    print(f"creation -> pod Running:  p50 {pct(to_running, 0.5):.3f} s  p99 {pct(to_running, 0.99):.3f} s")
    print(f"direct Job -> Running:    p50 {pct(direct, 0.5):.3f} s  p99 {pct(direct, 0.99):.3f} s")
    print(f"added by the operator:    p50 {pct(added, 0.5):.3f} s  p99 {pct(added, 0.99):.3f} s (target <= 0.5)")
    return pct(added, 0.99)


def burst(plane: ControlPlane, work: Path, count: int) -> tuple[float, float]:
    """`count` suspended FineTuneJobs waiting when the operator starts: until every Job exists, and
    until every status says Suspended; the operator's peak RSS over both."""
    api = plane.api_client()
    custom = k8s.CustomObjectsApi(api)
    ns = namespace(api, "burst")
    jobs = Watcher(api, ns)
    jobs.start()
    suspended = bare_finetunejob("x", suspend=True)["spec"]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: custom.create_namespaced_custom_object(
                    "kubetune.io", "v1alpha1", ns, "finetunejobs", {**bare_finetunejob(f"b-{i}"), "spec": suspended}
                ),
                range(count),
            )
        )

    def settled() -> bool:
        items = custom.list_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs")["items"]
        return sum((o.get("status") or {}).get("phase") == "Suspended" for o in items) >= count

    with operator_process(plane.kubeconfig, work / "operator", progress_interval_seconds="3600") as op:
        t0 = time.monotonic()
        wait(f"{count} Jobs", lambda: len(jobs.jobs) >= count, 1800)
        elapsed = max(jobs.jobs.values()) - t0
        deadline = time.monotonic() + 1800
        while not settled() and time.monotonic() < deadline:
            time.sleep(1)
        converged = time.monotonic() - t0
        rss = peak_rss_mb(op["process"].pid)
    print(
        f"burst of {count} waiting at start: every Job exists after {elapsed:.1f} s: "
        f"{count / elapsed:.1f} reconciles/s (target >= 50); every status Suspended after {converged:.1f} s"
    )
    print(f"operator peak RSS: {rss:.0f} MB (target <= 250)")
    return count / elapsed, rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20, help="latency samples (0: skip)")
    p.add_argument("--burst", type=int, default=1000, help="FineTuneJobs in the burst (0: skip)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    plane = ControlPlane.start(work / "cluster")
    # The pods only have to reach Running: their `python -m kubetune_job` finds a stand-in first on
    # PYTHONPATH that sleeps, not the job, which would load torch and compete with the operator and the
    # control plane for this machine's CPUs.
    stand_in = work / "stand-in" / "kubetune_job"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("")
    (stand_in / "__main__.py").write_text("import time\n\ntime.sleep(600)\n")
    env = {"PYTHONPATH": str(stand_in.parent)}
    kubelet = TestKubelet(plane.api_client(), workdir=work / "kubelet", extra_env=env).start()
    try:
        install_crd(plane)
        kubelet.add_node(NodeSpec("gpu-node-0", gpus=1000, pods=1000))
        out: dict[str, float] = {}
        if a.samples:
            out["p99_added"] = latency(plane, work, a.samples)
        if a.burst:
            out["reconciles_per_s"], out["rss_mb"] = burst(plane, work, a.burst)
        print(json.dumps(out))
    finally:
        kubelet.stop()
        plane.stop()


if __name__ == "__main__":
    main()
