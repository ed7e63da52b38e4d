"""The operator on the real control plane: FineTuneJob -> Job -> pods run by the test kubelet with
the real trainer job on a tiny model -> status. The operator runs as `python -m kubetune_operator`
under a ServiceAccount bound only to the chart's RBAC rules (fixtures in conftest.py)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.spec import parse_manifest
from kubetune_operator.manifests import Owner, children
from kubetune_operator.settings import OperatorSettings
from tests.integration.conftest import Operator, committed, ftj, pod_summary, pods, status, wait_phase
from tests.kube import JOB_IMAGE, apply, get, kubectl, wait_for
from tests.models import build_tiny_llama, write_chats, write_preferences

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chat_assets() -> Iterator[Path]:
    """A tiny causal LM (ChatML template) and chat data, under /var/tmp as the `assets` fixture explains."""
    base = Path(tempfile.mkdtemp(prefix="kubetune-operator-chat-", dir="/var/tmp"))
    build_tiny_llama(base / "model")
    write_chats(base / "data", train=200, validation=20)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def preference_assets() -> Iterator[Path]:
    """The tiny causal LM and preference pairs (prompt, chosen, rejected as chat turns), under /var/tmp."""
    base = Path(tempfile.mkdtemp(prefix="kubetune-operator-prefs-", dir="/var/tmp"))
    build_tiny_llama(base / "model")
    write_preferences(base / "data", train=80, validation=16)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_finetunejob_runs_to_succeeded(control_plane: Any, run: Any, namespace: str) -> None:
    """apply -> Job -> pod run by the kubelet -> Succeeded, with metrics, output, times, progress, columns."""
    doc = run("tiny")
    st = wait_phase(control_plane, namespace, "tiny", "Succeeded")
    assert st["jobName"] == "tiny" and st["outputUri"] == doc["spec"]["output"]["uri"]
    assert {"trainLoss", "evalAccuracy", "evalF1"} <= set(st["metrics"]) and st["eval"].startswith("accuracy=")
    assert st["progress"]["percent"] == 100 and st["progress"]["step"] == st["progress"]["totalSteps"] == 100
    assert st["startTime"] and st["completionTime"] and st["restarts"] == 0
    assert {c["type"]: c["status"] for c in st["conditions"]}["Succeeded"] == "True"
    assert (Path(doc["spec"]["output"]["uri"]) / "model.safetensors").is_file()
    row = kubectl(control_plane, "get", "ftj", "tiny", "-n", namespace, "--no-headers").stdout.split()
    assert row[:2] == ["tiny", "Succeeded"] and row[2] == "100" and float(row[3]) > 0 and row[4].startswith("accuracy=")
    events = json.loads(kubectl(control_plane, "get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    meta = (get(control_plane, "ftj", "tiny", namespace) or {})["metadata"]
    mine = [e for e in events if e["involvedObject"].get("uid") == meta["uid"]]
    assert "Succeeded" in {e["reason"] for e in mine}
    assert {e["source"]["component"] for e in mine} == {"kubetune-operator"}
    # The operator writes only status: no finalizer, no bookkeeping annotations (deleting never needs it).
    assert not meta.get("finalizers") and not any("kubetune.io" in k for k in meta.get("annotations") or {})


def test_text_generation_finetunejob_runs_to_succeeded(
    control_plane: Any, operator: Operator, namespace: str, chat_assets: Path
) -> None:
    """A text-generation FineTuneJob (a LoRA adapter on a tiny causal LM, merged at the end) runs through the
    operator to Succeeded: without spec.metrics the Eval column shows the task's default, perplexity, status
    has the run's tokens/s, the checkpoints hold the adapter and the output the adapter and the merged model."""
    doc = ftj(
        "chat",
        chat_assets,
        task="text-generation",
        adapter={"rank": 8},
        hyperparameters={"learningRate": 1e-2},
        checkpoints={"every": 10},
        output={"merge": True},
    )
    done = apply(control_plane, doc, namespace=namespace)
    assert done.returncode == 0, done.stderr
    st = wait_phase(control_plane, namespace, "chat", "Succeeded", timeout=300)
    # 200 conversations, 8 a step, one epoch.
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 25 and st["progress"]["percent"] == 100
    assert {"trainLoss", "evalLoss", "evalPerplexity"} <= set(st["metrics"]) and st["metrics"]["evalPerplexity"] >= 1
    assert st["eval"] == f"perplexity={st['metrics']['evalPerplexity']:.4f}"
    assert st["progress"]["tokensPerSecond"] > st["progress"]["samplesPerSecond"] > 0
    row = kubectl(control_plane, "get", "ftj", "chat", "-n", namespace, "--no-headers").stdout.split()
    assert row[:3] == ["chat", "Succeeded", "100"] and row[4] == st["eval"]
    checkpoint = Path(doc["spec"]["checkpoints"]["uri"]) / f"checkpoint-{committed(doc)[-1]}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    output = Path(st["outputUri"])
    assert output == Path(doc["spec"]["output"]["uri"])
    assert {"adapter_config.json", "adapter_model.safetensors", "generation_config.json"} <= {
        p.name for p in output.iterdir()
    }
    assert (output / "merged" / "model.safetensors").is_file() and (output / "merged" / "config.json").is_file()


def test_preference_finetunejob_runs_to_succeeded(
    control_plane: Any, operator: Operator, namespace: str, preference_assets: Path
) -> None:
    """A preference FineTuneJob (DPO with a new LoRA adapter on the tiny causal LM) runs through the operator to
    Succeeded: without spec.metrics status has the task's four rewards and the Eval column its first,
    reward_accuracy; the checkpoints and the output hold the adapter alone."""
    doc = ftj(
        "prefs",
        preference_assets,
        task="preference",
        adapter={"rank": 8},
        preference={"beta": 0.1},
        hyperparameters={"learningRate": 1e-2},
        checkpoints={"every": 5},
    )
    done = apply(control_plane, doc, namespace=namespace)
    assert done.returncode == 0, done.stderr
    st = wait_phase(control_plane, namespace, "prefs", "Succeeded", timeout=300)
    # 80 pairs, 8 a step, one epoch.
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 10 and st["progress"]["percent"] == 100
    rewards = {"evalRewardAccuracy", "evalRewardMargin", "evalChosenReward", "evalRejectedReward"}
    assert {"trainLoss", "evalLoss", *rewards} <= set(st["metrics"]), st["metrics"]
    assert 0 <= st["metrics"]["evalRewardAccuracy"] <= 1
    assert st["eval"] == f"reward_accuracy={st['metrics']['evalRewardAccuracy']:.4f}"
    row = kubectl(control_plane, "get", "ftj", "prefs", "-n", namespace, "--no-headers").stdout.split()
    assert row[:3] == ["prefs", "Succeeded", "100"] and row[4] == st["eval"]
    checkpoint = Path(doc["spec"]["checkpoints"]["uri"]) / f"checkpoint-{committed(doc)[-1]}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    output = Path(st["outputUri"])
    assert output == Path(doc["spec"]["output"]["uri"])
    written = {p.name for p in output.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= written and "model.safetensors" not in written


def test_image_outside_the_allowed_prefixes_is_invalid(control_plane: Any, run: Any, namespace: str) -> None:
    """A FineTuneJob the operator refuses is marked InvalidSpec, names the field, and gets no Job."""
    run("elsewhere", image="docker.io/someone/trainer:latest")
    st = wait_phase(control_plane, namespace, "elsewhere", "Failed", timeout=60)
    failed = {c["type"]: c for c in st["conditions"]}["Failed"]
    assert failed["reason"] == "InvalidSpec" and "spec.image" in failed["message"]
    assert get(control_plane, "job", "elsewhere", namespace) is None


def test_preempted_pod_resumes_without_using_a_retry(
    control_plane: Any, kubelet: Any, run: Any, namespace: str
) -> None:
    """A preempted pod is replaced; the new one resumes from the committed checkpoint; no retry is used."""
    # 1000 steps: long enough that the run is still going once the ETA shows (3 epochs took 9 s in all).
    doc = run("preempted", hyperparameters={"epochs": 10}, runPolicy={"maxRetries": 0})
    wait_for("a committed checkpoint", lambda: committed(doc), timeout=180, every=0.1)
    # The job pushes the step at once and the ETA once it has a rate over a few seconds' window.
    live = wait_for(
        "progress with an ETA from the Pushgateway",
        lambda: "etaSeconds" in (p := status(control_plane, namespace, "preempted").get("progress") or {}) and p,
    )
    assert 0 < live["step"] < live["totalSteps"] == 1000 and live["etaSeconds"] >= 0
    first = pods(control_plane, namespace, "preempted")[0]["metadata"]["name"]
    kubelet.preempt(namespace, first, grace=5)
    st = wait_phase(control_plane, namespace, "preempted", "Succeeded", timeout=300)
    assert st["restarts"] == 1 and st["lastRestartReason"] == "Preempted"
    assert st["progress"]["step"] == 1000
    last = pods(control_plane, namespace, "preempted")[-1]
    summary = pod_summary(last)
    assert summary["resumedFromStep"] >= 20 and summary["stepsThisRun"] == 1000 - summary["resumedFromStep"]


def test_oom_killed_pod_counts_as_a_retry(control_plane: Any, kubelet: Any, run: Any, namespace: str) -> None:
    """An OOMKilled pod is retried and counted, with reason OOMKilled."""
    run("oom", hyperparameters={"epochs": 2}, runPolicy={"maxRetries": 2})
    name = wait_for(
        "a running pod",
        lambda: [
            p["metadata"]["name"]
            for p in pods(control_plane, namespace, "oom")
            if p["status"].get("phase") == "Running"
        ],
    )[0]
    kubelet.oom_kill(namespace, name)
    st = wait_phase(control_plane, namespace, "oom", "Succeeded", timeout=300)
    assert st["restarts"] == 1 and st["lastRestartReason"] == "OOMKilled"
    job = get(control_plane, "job", "oom", namespace) or {}
    assert job["status"].get("failed") == 1


def test_permanent_exit_code_fails_at_once(control_plane: Any, run: Any, namespace: str) -> None:
    """A dataset without the label column fails the Job at once (no retries) with the job's message."""
    run("nolabel", dataset={"labelField": "target"}, runPolicy={"maxRetries": 3})
    st = wait_phase(control_plane, namespace, "nolabel", "Failed", timeout=180)
    assert "spec.dataset.labelField" in st["message"] and "'target'" in st["message"]
    assert len(pods(control_plane, namespace, "nolabel")) == 1 and st["restarts"] == 0


def test_too_many_gpus_waits_unschedulable_until_a_node_fits(
    control_plane: Any, kubelet: Any, run: Any, namespace: str
) -> None:
    """More GPUs than any node has: Pending with reason Unschedulable; it runs once a big node joins."""
    from tests.testbed.kubelet import NodeSpec

    run("huge", resources={"gpus": 16})
    wait_for(
        "Unschedulable",
        lambda: any(
            c.get("reason") == "Unschedulable" and c["type"] == "Running"
            for c in status(control_plane, namespace, "huge").get("conditions", [])
        ),
    )
    assert status(control_plane, namespace, "huge")["phase"] == "Pending"
    kubelet.add_node(NodeSpec("gpu-node-big", gpus=16))
    try:
        wait_phase(control_plane, namespace, "huge", "Succeeded", timeout=240)
    finally:
        kubelet.delete_node("gpu-node-big")


def test_a_quota_that_refuses_the_pod_explains_pending_until_it_is_raised(
    control_plane: Any, run: Any, namespace: str
) -> None:
    """A ResourceQuota that leaves no room for the pod: Pending with reason QuotaExceeded and the
    quota's message (read from the Job's FailedCreate Event); it runs once the quota is raised."""
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-room"}}
    assert apply(control_plane, {**quota, "spec": {"hard": {"pods": "0"}}}, namespace=namespace).returncode == 0
    # Until the quota controller has counted usage, admission refuses with "status unknown", not "exceeded".
    counted = lambda: (get(control_plane, "resourcequota", "no-room", namespace) or {}).get("status")  # noqa: E731
    wait_for("the quota's usage", counted)
    run("quota")

    def refused() -> dict[str, Any] | None:
        st = status(control_plane, namespace, "quota")
        reasons = {c["type"]: c["reason"] for c in st.get("conditions", [])}
        return st if reasons.get("Running") == "QuotaExceeded" else None

    st = wait_for("QuotaExceeded", refused, timeout=60)
    assert st["phase"] == "Pending" and "exceeded quota: no-room" in st["message"], st
    assert apply(control_plane, {**quota, "spec": {"hard": {"pods": "10"}}}, namespace=namespace).returncode == 0
    # The Job controller retries the create with its own backoff (at most a minute).
    wait_for(
        "a pod past the quota",
        lambda: status(control_plane, namespace, "quota").get("phase") in ("Running", "Succeeded"),
        timeout=150,
    )


def test_suspend_then_resume_continues_from_the_checkpoint(control_plane: Any, run: Any, namespace: str) -> None:
    """Suspending stops the pods; resuming starts a new pod that resumes from the committed checkpoint."""
    doc = run("pausable", hyperparameters={"epochs": 6})  # 600 steps: still training when the suspend lands
    wait_for("a committed checkpoint", lambda: committed(doc), timeout=180, every=0.1)
    doc["spec"]["runPolicy"] = {"suspend": True}
    assert apply(control_plane, doc, namespace=namespace).returncode == 0
    wait_phase(control_plane, namespace, "pausable", "Suspended", timeout=60)
    assert (get(control_plane, "job", "pausable", namespace) or {})["spec"]["suspend"] is True
    wait_for(
        "pods gone",
        lambda: all(
            p["status"].get("phase") in ("Failed", "Succeeded") for p in pods(control_plane, namespace, "pausable")
        ),
    )
    doc["spec"]["runPolicy"] = {"suspend": False}
    assert apply(control_plane, doc, namespace=namespace).returncode == 0
    wait_phase(control_plane, namespace, "pausable", "Succeeded", timeout=300)
    last = pods(control_plane, namespace, "pausable")[-1]
    summary = pod_summary(last)
    assert summary["resumedFromStep"] >= 20 and summary["finalStep"] == 600


def test_delete_cascades_to_job_pods_and_metrics(
    control_plane: Any, run: Any, namespace: str, pushgateway: Any
) -> None:
    """Deleting the FineTuneJob removes its Job and pods (ownerReferences) and its Pushgateway group."""
    run("doomed", hyperparameters={"epochs": 3})
    wait_phase(control_plane, namespace, "doomed", "Running", timeout=120)

    def pushed() -> bool:
        return any(
            'finetunejob="doomed"' in line and f'namespace="{namespace}"' in line
            for line in pushgateway.metrics_text().splitlines()
        )

    wait_for("the job's metrics on the gateway", pushed, timeout=120)
    kubectl(control_plane, "delete", "ftj", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for("the Job gone", lambda: get(control_plane, "job", "doomed", namespace) is None, timeout=60)
    wait_for("the pods gone", lambda: not pods(control_plane, namespace, "doomed"), timeout=90)
    wait_for("the metrics group gone", lambda: not pushed(), timeout=30)


def test_restarted_operator_creates_exactly_one_job(
    control_plane: Any, operator: Operator, namespace: str, assets: Path
) -> None:
    """With the Job created and no status written (a crash in between), a restart converges on one Job."""
    operator.stop()
    try:
        doc = ftj("crashed", assets)
        assert apply(control_plane, doc, namespace=namespace).returncode == 0
        live = get(control_plane, "ftj", "crashed", namespace) or {}
        owner = Owner("crashed", namespace, live["metadata"]["uid"])
        job = children(owner, parse_manifest(doc).spec, OperatorSettings(job_image=JOB_IMAGE))[0]
        assert apply(control_plane, job).returncode == 0
        uid = (get(control_plane, "job", "crashed", namespace) or {})["metadata"]["uid"]
    finally:
        operator.start()
    wait_phase(control_plane, namespace, "crashed", "Succeeded", timeout=240)
    operator.stop()
    operator.start()  # the resume handler replays the FineTuneJob: nothing new is created
    jobs = json.loads(kubectl(control_plane, "get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
    assert [j["metadata"]["uid"] for j in jobs] == [uid]
    assert status(control_plane, namespace, "crashed")["phase"] == "Succeeded"


def test_operator_account_cannot_read_secrets(control_plane: Any, operator: Operator) -> None:
    """The operator's ServiceAccount can manage Jobs and write FineTuneJob status, but cannot change a
    FineTuneJob itself, nor get or list Secrets."""

    def can(*args: str) -> str:
        done = kubectl(control_plane, "auth", "can-i", *args, "-A", kubeconfig=operator.kubeconfig, check=False)
        return done.stdout.strip()

    assert can("create", "jobs.batch") == "yes"
    assert can("patch", "finetunejobs.kubetune.io", "--subresource=status") == "yes"
    assert can("patch", "finetunejobs.kubetune.io") == "no"
    assert can("get", "secrets") == "no" and can("list", "secrets") == "no"


def test_two_nodes_make_an_indexed_job_and_a_headless_service(control_plane: Any, run: Any, namespace: str) -> None:
    """nodes: 2 creates an Indexed Job of 2 and a headless Service, with torchrun's environment."""
    run("wide", resources={"nodes": 2, "gpus": 4}, runPolicy={"suspend": True})
    job = wait_for("the Job", lambda: get(control_plane, "job", "wide", namespace))
    svc = wait_for("the Service", lambda: get(control_plane, "service", "wide-workers", namespace))
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert svc["spec"]["clusterIP"] == "None" and job["spec"]["template"]["spec"]["subdomain"] == "wide-workers"
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_NNODES"]["value"] == "2" and env["KUBETUNE_NPROC_PER_NODE"]["value"] == "4"
    assert env["KUBETUNE_MASTER_ADDR"]["value"] == "wide-0.wide-workers"
    assert "job-completion-index" in env["KUBETUNE_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_two_nodes_train_as_one_run(control_plane: Any, run: Any, namespace: str) -> None:
    """nodes: 2 runs for real: both pods rendezvous at pod 0's name (the test kubelet stands in for
    cluster DNS), train one DistributedDataParallel run that splits the data, and the Job succeeds."""
    doc = run("pair", resources={"nodes": 2, "gpus": 1})
    st = wait_phase(control_plane, namespace, "pair", "Succeeded", timeout=360)
    # 800 examples, 8 per process, 2 processes: 50 steps (one process alone would take 100).
    assert st["progress"].get("totalSteps") == st["progress"].get("step") == 50, json.dumps(st, indent=1)
    assert "evalAccuracy" in st["metrics"] and st["outputUri"] == doc["spec"]["output"]["uri"], st
    assert (Path(doc["spec"]["output"]["uri"]) / "model.safetensors").is_file()
    done = {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
        for p in pods(control_plane, namespace, "pair")
    }
    assert sorted(done) == ["0", "1"] and all(p["status"]["phase"] == "Succeeded" for p in done.values())
    node1 = pod_summary(done["1"])
    assert node1["message"] == "node 1: the summary is node 0's"


def test_a_preempted_node_stops_the_run_and_it_resumes_without_a_retry(
    control_plane: Any, kubelet: Any, run: Any, namespace: str
) -> None:
    """nodes: 2, node 1's pod preempted mid-training: every rank stops at the same step after a commit,
    both pods are replaced, the run resumes from the checkpoint, and no retry is used."""
    doc = run("pairs", resources={"nodes": 2, "gpus": 1}, hyperparameters={"epochs": 3}, runPolicy={"maxRetries": 0})
    wait_for("a committed checkpoint", lambda: committed(doc), timeout=240, every=0.1)
    node1 = next(
        p["metadata"]["name"]
        for p in pods(control_plane, namespace, "pairs")
        if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1"
    )
    kubelet.preempt(namespace, node1, grace=30)
    st = wait_phase(control_plane, namespace, "pairs", "Succeeded", timeout=240)
    assert st["progress"]["step"] == 150, json.dumps(st, indent=1)
    assert st["restarts"] >= 1 and st["lastRestartReason"] == "Preempted", json.dumps(st, indent=1)
    last = [p for p in pods(control_plane, namespace, "pairs") if p["status"]["phase"] == "Succeeded"]
    assert len(last) == 2, [p["metadata"]["name"] for p in last]  # one of each index, both replaced
    node0 = next(p for p in last if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    summary = pod_summary(node0)
    assert summary["resumedFromStep"] >= 20 and summary["stepsThisRun"] == 150 - summary["resumedFromStep"]
