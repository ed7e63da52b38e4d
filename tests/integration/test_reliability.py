"""The operator under the faults and inputs of a shared cluster, on the real control plane: an ended
FineTuneJob never trains again, a Job the API server refuses fails its FineTuneJob with the server's
words and holds up no one else, a name deleted and re-created converges, and a preemption that
happens while the operator is away is still counted (from the Job's own record)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.integration.conftest import Operator, committed, ftj, pods, status, wait_phase
from tests.kube import apply, get, kubectl, wait_for

pytestmark = pytest.mark.integration


def jobs(plane: Any, namespace: str) -> list[dict[str, Any]]:
    return list(json.loads(kubectl(plane, "get", "jobs", "-n", namespace, "-o", "json").stdout)["items"])


def stays(what: str, probe: Any, *, seconds: float) -> None:
    """Assert `probe()` holds at every look for `seconds` (the operator's round here is 2 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert probe(), what
        time.sleep(0.5)


def test_an_ended_finetunejob_never_gets_a_second_job(control_plane: Any, run: Any, namespace: str) -> None:
    """Its Job removed by ttlSecondsAfterFinished, or by hand, a Failed FineTuneJob stays Failed and gets
    no new Job (today's bug: Failed -> Pending and a new Job every round)."""
    # A dataset without the label column: the job fails at once with a permanent exit code.
    run("ttl", dataset={"labelField": "target"}, runPolicy={"ttlSecondsAfterFinished": 3})
    run("byhand", dataset={"labelField": "target"})
    for name in ("ttl", "byhand"):
        wait_phase(control_plane, namespace, name, "Failed", timeout=180)
    before = {name: status(control_plane, namespace, name) for name in ("ttl", "byhand")}
    kubectl(control_plane, "delete", "job", "byhand", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for("the TTL to remove its Job", lambda: get(control_plane, "job", "ttl", namespace) is None, timeout=60)

    def unchanged() -> bool:
        now = {name: status(control_plane, namespace, name) for name in before}
        same = all(now[n]["phase"] == "Failed" and now[n]["conditions"] == before[n]["conditions"] for n in now)
        return same and not jobs(control_plane, namespace)

    stays("both stay Failed with no Job", unchanged, seconds=12)


def test_a_job_the_api_server_refuses_fails_the_finetunejob_and_holds_up_no_one(
    control_plane: Any, run: Any, namespace: str
) -> None:
    """A Job refused by admission (here a ValidatingAdmissionPolicy) marks its FineTuneJob Failed with
    the API server's message, once; FineTuneJobs after it still get their Jobs and live progress."""
    policy = f"refuse-jobs-{namespace}"
    docs = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["jobs"]}
                    ]
                },
                "validations": [
                    {"expression": "!object.metadata.name.startsWith('refused')", "message": "jobs named refused*"}
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {
                "policyName": policy,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
            },
        },
    ]
    assert apply(control_plane, *docs).returncode == 0
    try:
        # The policy takes effect once the API server has loaded it: probe with a dry-run Job.
        probe = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "refused-probe", "namespace": namespace},
            "spec": {
                "template": {
                    "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "registry.test/x"}]}
                }
            },
        }
        wait_for(
            "the policy to apply",
            lambda: "jobs named refused" in kubectl_dry_run(control_plane, probe),
            timeout=60,
        )
        run("refused-one", hyperparameters={"epochs": 10})
        run("after", hyperparameters={"epochs": 10})
        st = wait_phase(control_plane, namespace, "refused-one", "Failed", timeout=60)
        failed = {c["type"]: c for c in st["conditions"]}["Failed"]
        assert failed["reason"] == "InvalidSpec" and "jobs named refused" in failed["message"], st
        live = wait_for(
            "live progress of the FineTuneJob after the refused one",
            lambda: (p := status(control_plane, namespace, "after").get("progress") or {}).get("step") and p,
            timeout=180,
        )
        assert live["step"] > 0
        events = json.loads(kubectl(control_plane, "get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        refusals = [
            e for e in events if e["involvedObject"].get("name") == "refused-one" and e["reason"] == "InvalidSpec"
        ]
        assert len(refusals) == 1 and refusals[0].get("count", 1) == 1, refusals
    finally:
        kubectl(
            control_plane, "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy, check=False
        )


def kubectl_dry_run(plane: Any, obj: dict[str, Any]) -> str:
    done = kubectl(plane, "create", "--dry-run=server", "-f", "-", stdin=json.dumps(obj), check=False)
    return done.stderr + done.stdout


def test_delete_and_recreate_the_same_name_converges(
    control_plane: Any, operator: Operator, namespace: str, assets: Any
) -> None:
    """Deleted and re-applied at once (what CI pipelines do), while the old Job is still being collected
    (held here by a finalizer, as a slow garbage collector would): the new FineTuneJob waits, says so,
    is never marked Failed, and gets exactly one Job of its own once the old one is gone."""
    doc = ftj("again", assets, runPolicy={"suspend": True})
    phases: list[str] = []

    def owners() -> list[list[str]]:
        return [[r["uid"] for r in j["metadata"].get("ownerReferences", [])] for j in jobs(control_plane, namespace)]

    def settled(uid: str) -> bool:
        phase = status(control_plane, namespace, "again").get("phase", "")
        phases.append(phase)
        return phase == "Suspended" and owners() == [[uid]]

    for held in (True, False, True, False):
        assert apply(control_plane, doc, namespace=namespace).returncode == 0
        uid = (get(control_plane, "ftj", "again", namespace) or {})["metadata"]["uid"]
        wait_for("one Job of its own, and Suspended", lambda uid=uid: settled(uid), timeout=60, every=0.2)
        if held:
            hold = '{"metadata": {"finalizers": ["test.kubetune.io/hold"]}}'
            kubectl(control_plane, "patch", "job", "again", "-n", namespace, "--type=merge", "-p", hold)
        kubectl(control_plane, "delete", "ftj", "again", "-n", namespace, "--wait=false")
        if held:
            assert apply(control_plane, doc, namespace=namespace).returncode == 0
            new = (get(control_plane, "ftj", "again", namespace) or {})["metadata"]["uid"]
            waiting = wait_for(
                "the new FineTuneJob to say it waits for the old Job",
                lambda: (
                    "earlier FineTuneJob" in (st := status(control_plane, namespace, "again")).get("message", "") and st
                ),
                timeout=60,
            )
            assert waiting["phase"] == "Pending" and owners() == [[uid]], waiting
            kubectl(
                control_plane,
                "patch",
                "job",
                "again",
                "-n",
                namespace,
                "--type=merge",
                "-p",
                '{"metadata": {"finalizers": null}}',
            )
            wait_for("its own Job once the old one is gone", lambda new=new: settled(new), timeout=60, every=0.2)
            kubectl(control_plane, "delete", "ftj", "again", "-n", namespace, "--wait=false")
    assert "Failed" not in phases, phases


def test_a_preemption_while_the_operator_is_down_is_counted(
    control_plane: Any, kubelet: Any, operator: Operator, run: Any, namespace: str
) -> None:
    """Preempted, replaced and gone before the operator comes back: status still says one restart,
    Preempted, from the replacement pod's record, and maxRetries 0 is not used up."""
    doc = run("unseen", hyperparameters={"epochs": 3}, runPolicy={"maxRetries": 0})
    wait_for("a committed checkpoint", lambda: committed(doc), timeout=180, every=0.1)
    first = pods(control_plane, namespace, "unseen")[0]["metadata"]["name"]
    operator.stop()
    try:
        kubelet.preempt(namespace, first, grace=5)
        wait_for(
            "the preempted pod gone and its replacement running",
            lambda: (
                [
                    (p["metadata"]["name"] != first, p["status"].get("phase"))
                    for p in pods(control_plane, namespace, "unseen")
                ]
                == [(True, "Running")]
            ),
            timeout=120,
        )
    finally:
        operator.start()
    st = wait_phase(control_plane, namespace, "unseen", "Succeeded", timeout=600)
    assert (st.get("restarts"), st.get("lastRestartReason")) == (1, "Preempted"), st
    assert st["preemptions"] == 1
