"""The operator at scale on a real control plane (the test bed's): 1,000 to 10,000 suspended FineTuneJobs.

For each size N (--sizes), on a fresh control plane (etcd, kube-apiserver, controller-manager,
scheduler; no kubelet: a suspended Job gets no pods) with the CRD installed and the operator
(`python -m kubetune_operator`, its settings at their defaults) running under the RBAC rules the
chart grants it:

1. N FineTuneJobs with `runPolicy.suspend: true`, spread over --namespaces namespaces (many users),
   created by a pool of --creators threads as fast as the API server takes them: the create rate.
   The operator is already running, so it reconciles while they arrive, as in a busy cluster.
2. Until every one has status.phase Suspended (a paginated LIST every few seconds): the time from
   the first create to the last status written (each status's Suspended condition says when the
   operator wrote it, to the second), statuses written per second over that window (the
   reconciles/s of the goal), and the operator's own reconcile counter (/metrics) over the window.
3. Peak RSS (VmHWM) and CPU seconds of the operator, kube-apiserver, etcd and the controller-manager
   (its Job controller handles the N Jobs), how busy the whole machine was, and which part was the
   limit.

Each size gets its own control plane and operator (nothing is deleted between sizes): one size's
objects, and every process's memory high-water mark, never carry into the next.
Goals at 10,000 on a 2-core machine: >= 100 reconciles/s, operator peak RSS <= 400 MB.

Observed in two runs on a 2-core machine shared with other test runs (load 3-7): 1,000 took 21-51 s
to every status (20-47/s, operator peak RSS 219-224 MB), 10,000 took 408-722 s (14-24.5/s, 1055-1176
MB). Per FineTuneJob the operator spent 16-29 ms of CPU and the API server with etcd 18-39 ms (more
on the busier run), so two idle cores cap the whole at about 28-57/s: the goal needs less CPU per
object from both. The operator's RSS grew by about 100 KB per FineTuneJob and stayed there once
every status was written.

    .venv/bin/python tests/bench/operator_scale.py [--sizes 1000,10000] [--namespaces 10] [--creators 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from calendar import timegm
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client as k8s
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).parents[2]
sys.path[:0] = [str(ROOT)]

from tests.bench.operator_latency import namespace, peak_rss_mb  # noqa: E402
from tests.kube import bare_finetunejob, install_crd, operator_account, operator_process  # noqa: E402
from tests.testbed.cluster import ControlPlane  # noqa: E402

FTJ = ("kubetune.io", "v1alpha1")
PLURAL = "finetunejobs"
#: Control-plane components whose CPU and memory the table shows (the scheduler has nothing to do here).
COMPONENTS = ("kube-apiserver", "etcd", "kube-controller-manager")
#: API answers worth another try while creating: the server is busy, not the request wrong.
RETRIABLE = {429, 500, 502, 503, 504}
RECONCILES = "kubetune_operator_reconciles"
RECONCILE_SECONDS = "kubetune_operator_reconcile_duration_seconds"


@dataclass
class Result:
    """What one size measured; seconds count from the first create."""

    size: int
    created_s: float = 0.0
    create_retries: int = 0
    statuses: int = 0
    all_statuses_s: float | None = None
    seen_by_poll_s: float | None = None
    reconcile_calls: dict[str, float] = field(default_factory=dict)
    reconcile_mean_ms: float = 0.0
    operator_rss_mb: float = 0.0
    operator_rss_end_mb: float = 0.0
    operator_cpu_s: float = 0.0
    rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    bench_cpu_s: float = 0.0
    polls: int = 0
    poll_cpu_s: float = 0.0
    machine_busy_cpu_s: float = 0.0
    window_s: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def create_rate(self) -> float:
        return self.size / self.created_s if self.created_s else 0.0

    def per_object_ms(self) -> dict[str, float]:
        """CPU milliseconds each part spent per FineTuneJob; the API server's without the benchmark's
        own LISTs (an estimate: polls times what one LIST cost)."""
        spent = {"operator": self.operator_cpu_s, **self.cpu_s}
        spent["kube-apiserver"] = max(0.0, spent["kube-apiserver"] - self.poll_cpu_s)
        return {name: 1000 * s / self.size for name, s in spent.items()}

    @property
    def status_rate(self) -> float:
        """FineTuneJobs whose status was written, per second, from the first create to the last status."""
        return self.statuses / self.all_statuses_s if self.all_statuses_s else 0.0


def names(size: int, namespaces: list[str]) -> list[tuple[str, str]]:
    """(namespace, name) of every FineTuneJob, dealt round-robin over the namespaces."""
    return [(namespaces[i % len(namespaces)], f"ftj-{i}") for i in range(size)]


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (whoever ran)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def stamp_seconds(stamp: str) -> float:
    """Epoch seconds of an RFC 3339 UTC stamp such as 2026-01-02T03:04:05Z."""
    return float(timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))


def suspended_since(ftj: dict[str, Any]) -> float | None:
    """When the operator wrote Suspended into this FineTuneJob's status (epoch seconds, to the second)."""
    status = ftj.get("status") or {}
    if status.get("phase") != "Suspended":
        return None
    for c in status.get("conditions") or ():
        if c.get("type") == "Suspended" and c.get("status") == "True" and c.get("lastTransitionTime"):
            return stamp_seconds(c["lastTransitionTime"])
    return None


def list_all(custom: k8s.CustomObjectsApi, *, page: int = 500) -> Iterator[dict[str, Any]]:
    """Every FineTuneJob in the cluster, read in pages as a client of a large cluster should."""
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": page}
        if token:
            kwargs["_continue"] = token
        body: dict[str, Any] = custom.list_cluster_custom_object(*FTJ, PLURAL, **kwargs)
        yield from body["items"]
        token = body["metadata"].get("continue")
        if not token:
            return


def reconcile_counters(port: int) -> tuple[dict[str, float], float, float]:
    """The operator's reconciles by result, and its reconcile durations' sum and count, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    results: dict[str, float] = {}
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == RECONCILES and sample.name == f"{RECONCILES}_total":
                results[sample.labels["result"]] = sample.value
            elif family.name == RECONCILE_SECONDS and sample.name.endswith("_sum"):
                total = sample.value
            elif family.name == RECONCILE_SECONDS and sample.name.endswith("_count"):
                count = sample.value
    return results, total, count


def create_all(plane: ControlPlane, targets: list[tuple[str, str]], *, creators: int) -> int:
    """Create every FineTuneJob from `creators` threads, each with its own client (and connection);
    returns how many creates were tried again after a busy server's answer."""
    local = threading.local()
    retries = [0]

    def create(target: tuple[str, str]) -> None:
        ns, name = target
        if not hasattr(local, "custom"):
            local.custom = k8s.CustomObjectsApi(plane.api_client())
        for attempt in range(20):
            try:
                local.custom.create_namespaced_custom_object(*FTJ, ns, PLURAL, bare_finetunejob(name, suspend=True))
                return
            except k8s.ApiException as e:
                if e.status == 409 and attempt:  # an earlier try went through after all
                    return
                if e.status not in RETRIABLE:
                    raise
                retries[0] += 1
                time.sleep(min(2.0, 0.05 * 2**attempt))
        raise SystemExit(f"the API server refused to create {ns}/{name} 20 times")

    with ThreadPoolExecutor(creators) as pool:
        list(pool.map(create, targets))
    return retries[0]


def wait_for_statuses(
    custom: k8s.CustomObjectsApi, *, size: int, operator: subprocess.Popen[bytes], deadline: float
) -> tuple[dict[tuple[str, str], float], float | None, int]:
    """Poll until `size` FineTuneJobs are Suspended (or the deadline, or the operator exits): each
    one's status time (epoch s), when the poll first saw them all (monotonic), if it did, and how
    many LISTs it took. Each poll prints the count and the operator's RSS, to show how memory grows.

    The poll waits twice as long as its LIST took, so that it takes at most a third of the API
    server's time from what is measured, and at least 2 s."""
    seen: dict[tuple[str, str], float] = {}
    polls = 0
    while time.monotonic() < deadline and operator.poll() is None:
        polls += 1
        began = time.monotonic()
        for ftj in list_all(custom):
            meta = ftj["metadata"]
            if (since := suspended_since(ftj)) is not None:
                seen[(meta["namespace"], meta["name"])] = since
        if len(seen) >= size:
            return seen, time.monotonic(), polls
        took = time.monotonic() - began
        rss = psutil.Process(operator.pid).memory_info().rss / 2**20
        print(f"  {len(seen)}/{size} Suspended (LIST took {took:.1f} s); operator RSS {rss:.0f} MB", flush=True)
        time.sleep(max(2.0, 2 * took))
    return seen, None, polls


@contextmanager
def cpu_window(pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """CPU seconds each process used, and the machine's busy CPU seconds, within the block."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy = machine_busy_seconds()
    used: dict[str, float] = {}
    yield used
    used.update({name: cpu_seconds(pid) - before[name] for name, pid in pids.items()})
    used["machine"] = machine_busy_seconds() - busy


def install(plane: ControlPlane) -> None:
    """The CRD, Established. On a busy machine `kubectl wait` sometimes fails at once (it looked the
    CRD up before the API server's discovery had it): that is worth another try, with its error shown."""
    for attempt in range(3):
        try:
            install_crd(plane)
            return
        except subprocess.CalledProcessError as e:
            print(f"  installing the CRD failed ({e.stderr.strip()}); {'again' if attempt < 2 else 'giving up'}")
            if attempt == 2:
                raise
            time.sleep(2)


def list_cost(custom: k8s.CustomObjectsApi, plane: ControlPlane) -> float:
    """API server and etcd CPU seconds that one paginated LIST of every FineTuneJob costs, once the
    operator is done: what the benchmark's own polls added to the API server's figure."""
    pids = [plane.components[name].pid for name in ("kube-apiserver", "etcd")]
    before = sum(cpu_seconds(pid) for pid in pids)
    for _ in list_all(custom):
        pass
    return sum(cpu_seconds(pid) for pid in pids) - before


def measure(
    size: int, *, work: Path, namespaces: int, creators: int, timeout: float, settings: dict[str, str]
) -> Result:
    """One size on its own control plane and operator; see the module's description."""
    plane = ControlPlane.start(work / "cluster")
    try:
        install(plane)
        api = plane.api_client()
        custom = k8s.CustomObjectsApi(api)
        spaces = [namespace(api, f"team-{i}") for i in range(namespaces)]
        targets = names(size, spaces)
        kubeconfig = operator_account(plane, work)
        with operator_process(kubeconfig, work / "operator", **settings) as op:
            proc, port = op["process"], op["metrics_port"]
            counted_before, sum_before, count_before = reconcile_counters(port)
            pids = {"operator": proc.pid, "bench": os.getpid()}
            pids |= {name: plane.components[name].pid for name in COMPONENTS}
            result = Result(size)
            with cpu_window(pids) as used:
                t0, wall0 = time.monotonic(), time.time()
                result.create_retries = create_all(plane, targets, creators=creators)
                result.created_s = time.monotonic() - t0
                print(f"  created {size} in {result.created_s:.1f} s ({result.create_rate:.0f}/s)", flush=True)
                seen, polled, result.polls = wait_for_statuses(custom, size=size, operator=proc, deadline=t0 + timeout)
                counted, total, count = reconcile_counters(port) if proc.poll() is None else ({}, 0.0, 0.0)
                result.window_s = time.monotonic() - t0
            result.statuses = len(seen)
            if polled is not None:
                # A stamp is the second the status was written in: its middle is the best estimate.
                result.all_statuses_s = min(max(seen.values()) + 0.5 - wall0, polled - t0)
                result.seen_by_poll_s = polled - t0
            result.reconcile_calls = {k: v - counted_before.get(k, 0.0) for k, v in counted.items()}
            calls = count - count_before
            result.reconcile_mean_ms = 1000 * (total - sum_before) / calls if calls else 0.0
            if proc.poll() is None:
                result.operator_rss_mb = peak_rss_mb(proc.pid)
                result.operator_rss_end_mb = psutil.Process(proc.pid).memory_info().rss / 2**20
            result.operator_cpu_s = used["operator"]
            result.bench_cpu_s = used["bench"]
            result.machine_busy_cpu_s = used["machine"]
            result.cpu_s = {name: used[name] for name in COMPONENTS}
            result.poll_cpu_s = result.polls * list_cost(custom, plane)
            result.rss_mb = {name: peak_rss_mb(plane.components[name].pid) for name in COMPONENTS}
            result.load = os.getloadavg()
            if proc.poll() is not None:
                print(f"  the operator exited with code {proc.returncode}; its log: {op['log']}", flush=True)
        return result
    finally:
        plane.stop()


def limit(r: Result, *, cores: int) -> str:
    """Which part bounds the rate at which statuses are written, from what was measured.

    On a shared machine the wall-clock rate depends on who else runs; CPU per FineTuneJob does not.
    The operator is one Python process: with the GIL it gets one core at most, so 1000 / its ms per
    FineTuneJob is its ceiling wherever it runs; the API server and etcd can use every core. The one
    that needs more CPU per FineTuneJob is the limit; the measured shares say how this run went."""
    if r.all_statuses_s is None:
        return "unfinished: no figure for the limit"
    per = r.per_object_ms()
    server = per["kube-apiserver"] + per["etcd"]
    operator_load = r.operator_cpu_s / r.window_s
    machine = r.machine_busy_cpu_s / (r.window_s * cores)
    lag = r.all_statuses_s - r.created_s
    who = "the operator" if per["operator"] > server else "the API server + etcd"
    return (
        f"{who} ({per['operator']:.1f} ms of operator CPU per FineTuneJob against {server:.1f} ms of "
        f"API server + etcd; the operator alone caps at {1000 / per['operator']:.0f}/s on one core, all "
        f"of them at {cores * 1000 / sum(per.values()):.0f}/s on {cores} idle cores). This run: operator "
        f"{operator_load:.0%} of a core{' (CPU-bound)' if operator_load >= 0.85 else ''}, API server + etcd "
        f"{(r.cpu_s['kube-apiserver'] + r.cpu_s['etcd']) / r.window_s:.0%}, machine {machine:.0%} busy; "
        f"last status {lag:.1f} s after the last create"
    )


def table(results: list[Result], *, cores: int) -> str:
    head = (
        f"{'N':>6} {'create/s':>8} {'all status s':>12} {'reconciles/s':>12} {'op calls/s':>10} "
        f"{'op RSS MB':>9} {'op CPU s':>8} {'apiserver CPU s':>15} {'etcd CPU s':>10} {'kcm CPU s':>9}"
    )
    rows = [head]
    for r in results:
        done = f"{r.all_statuses_s:.1f}" if r.all_statuses_s is not None else f"({r.statuses} in {r.window_s:.0f})"
        calls = sum(r.reconcile_calls.values()) / r.all_statuses_s if r.all_statuses_s else 0.0
        rows.append(
            f"{r.size:>6} {r.create_rate:>8.0f} {done:>12} {r.status_rate:>12.1f} {calls:>10.1f} "
            f"{r.operator_rss_mb:>9.0f} {r.operator_cpu_s:>8.1f} {r.cpu_s['kube-apiserver']:>15.1f} "
            f"{r.cpu_s['etcd']:>10.1f} {r.cpu_s['kube-controller-manager']:>9.1f}"
        )
    for r in results:
        rss = ", ".join(f"{name} {mb:.0f} MB" for name, mb in r.rss_mb.items())
        others = r.machine_busy_cpu_s - r.operator_cpu_s - r.bench_cpu_s - sum(r.cpu_s.values())
        rows.append(
            f"N={r.size}: reconciles by result {r.reconcile_calls}, mean {r.reconcile_mean_ms:.1f} ms; "
            f"operator RSS once done {r.operator_rss_end_mb:.0f} MB; "
            f"creates retried {r.create_retries}; peak RSS {rss}; this benchmark {r.bench_cpu_s:.1f} CPU s, "
            f"everything else on the machine {others:.1f} CPU s; load {' '.join(f'{x:.2f}' for x in r.load)}"
        )
        cost = ", ".join(f"{name} {ms:.1f}" for name, ms in r.per_object_ms().items())
        rows.append(
            f"N={r.size}: CPU ms per FineTuneJob: {cost} (the API server's less the benchmark's "
            f"{r.polls} LISTs, ~{r.poll_cpu_s:.1f} CPU s)"
        )
        rows.append(f"N={r.size}: limit: {limit(r, cores=cores)}")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000", help="comma-separated FineTuneJob counts, one run each")
    p.add_argument("--namespaces", type=int, default=10, help="namespaces the FineTuneJobs are spread over")
    p.add_argument("--creators", type=int, default=16, help="threads creating FineTuneJobs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per size before giving up")
    p.add_argument(
        "--operator-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an operator setting (KUBETUNE_OPERATOR_<KEY>), e.g. workers=32 or log_level=WARNING; repeatable",
    )
    a = p.parse_args()
    settings = dict(kv.split("=", 1) for kv in a.operator_setting if "=" in kv)
    if len(settings) != len(a.operator_setting):
        raise SystemExit(f"--operator-setting: expected KEY=VALUE, such as workers=32; got {a.operator_setting}")
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes: expected counts separated by commas, such as 1000,10000; got {a.sizes!r}") from None
    if any(s <= 0 for s in sizes) or a.namespaces <= 0 or a.creators <= 0:
        raise SystemExit("--sizes, --namespaces and --creators must be positive")
    work = Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    cores = psutil.cpu_count() or 1
    results = []
    for size in sizes:
        print(f"N={size}: {a.namespaces} namespaces, {a.creators} creators; work dir {work / str(size)}", flush=True)
        results.append(
            measure(
                size,
                work=work / str(size),
                namespaces=a.namespaces,
                creators=a.creators,
                timeout=a.timeout,
                settings=settings,
            )
        )
    print(f"operator settings: {settings or 'defaults'}; on {cores} cores")
    print("goals at 10,000: >= 100 reconciles/s, operator peak RSS <= 400 MB")
    print(table(results, cores=cores))
    print(json.dumps([asdict(r) | {"create_rate": r.create_rate, "reconciles_per_s": r.status_rate} for r in results]))


if __name__ == "__main__":
    main()
