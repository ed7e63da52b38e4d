"""The operator's pure decisions: the objects it creates, the CRD schema, and status derivation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_api.spec import parse_manifest
from kubetune_operator.crd import crd, spec_schema
from kubetune_operator.manifests import InvalidSpec, Owner, children, desired_suspend
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.status import (
    COMPLETION_INDEX,
    FAILURE_COUNT,
    IGNORED_FAILURE_COUNT,
    claim,
    derive,
    newest_create_failure,
    phase_of,
    pod_view,
)
from tests.unit.test_spec import GOOD

OWNER = Owner("bert-mrpc", "ml", "uid-1")
NOW = "2026-01-01T00:00:00Z"


def spec(**changes: Any) -> Any:
    return parse_manifest({**GOOD, "spec": {**GOOD["spec"], **changes}}).spec


def job_of(**changes: Any) -> dict[str, Any]:
    return children(
        OWNER,
        spec(**changes),
        OperatorSettings(checkpoint_root="s3://kubetune/runs", storage_endpoint="http://s3:8333"),
    )[-1]


def test_job_is_owned_named_and_restricted() -> None:
    """The Job carries the FineTuneJob's name and owner, and pods meet the restricted standard."""
    job = job_of()
    assert job["metadata"]["name"] == "bert-mrpc" and job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    ctx = pod["containers"][0]["securityContext"]
    assert ctx == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    assert "serviceAccountName" not in pod and "hostNetwork" not in pod


def test_defaults_fill_checkpoint_location_per_namespace_and_name() -> None:
    """checkpoints.uri defaults to <root>/<namespace>/<name>/ and reaches the pod in KUBETUNE_SPEC."""
    env = {e["name"]: e for e in job_of()["spec"]["template"]["spec"]["containers"][0]["env"]}
    passed = json.loads(env["KUBETUNE_SPEC"]["value"])
    assert passed["checkpoints"]["uri"] == "s3://kubetune/runs/ml/bert-mrpc/"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3:8333"


def test_credentials_come_by_secret_reference_only() -> None:
    """Storage and Hub credentials are secretKeyRefs in the pod; the operator never reads them."""
    env = {
        e["name"]: e
        for e in job_of(storage={"credentialsSecret": "s3-creds"}, hubTokenSecret="hf")["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"


def test_failure_policy_ignores_preemption_and_fails_permanent_codes() -> None:
    """DisruptionTarget is ignored; the job's permanent exit codes fail the Job; no duplicate pods."""
    body = job_of(runPolicy={"maxRetries": 5})["spec"]
    rules = body["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [10, 11, 12, 13]
    # A pod that stopped because its run was preempted (another node's pod, in a multi-node run).
    assert rules[2] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [21]},
    }
    assert body["backoffLimitPerIndex"] == 5 and body["maxFailedIndexes"] == 0 and body["completionMode"] == "Indexed"
    assert body["podReplacementPolicy"] == "Failed"


def test_gpus_and_scheduling_reach_the_pod() -> None:
    """GPU count, node selector, tolerations and priority class are carried over."""
    pod = job_of(
        resources={"gpus": 4, "cpu": "8", "memory": "32Gi"},
        scheduling={
            "nodeSelector": {"pool": "a100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "priorityClassName": "high",
        },
    )["spec"]["template"]["spec"]
    res = pod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "4" and res["requests"]["cpu"] == "8"
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["priorityClassName"] == "high"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_kueue_queue_creates_the_job_suspended_and_never_unsuspends() -> None:
    """With a queueName the Job starts suspended with Kueue's label; only Kueue resumes it."""
    job = job_of(scheduling={"queueName": "team-a"})
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert desired_suspend(spec(scheduling={"queueName": "team-a"}), current=True) is None
    # Suspended by its user while Kueue holds it: still Kueue's flag (the Workload is deactivated instead).
    queued_and_suspended = spec(scheduling={"queueName": "team-a"}, runPolicy={"suspend": True})
    assert desired_suspend(queued_and_suspended, current=False) is None
    assert desired_suspend(spec(runPolicy={"suspend": True}), current=False) is True


def test_a_suspended_job_waiting_for_kueue_is_queued_not_suspended() -> None:
    """A suspended Job of a queued FineTuneJob its user did not suspend waits for Kueue: Pending, Queued,
    naming the queue; without a queue (or suspended by its user) it is Suspended."""
    suspended = {"metadata": {"name": "j"}, "spec": {"suspend": True}, "status": {}}
    phase, reason, message = phase_of(suspended, [], None, ("Queued", "waiting in Kueue's queue team-a"))
    assert (phase, reason) == ("Pending", "Queued") and "team-a" in message
    assert phase_of(suspended, [], None, None)[:2] == ("Suspended", "Suspended")
    # Suspended by its user before it started: no Job at all (with a queue, none is created until resumed).
    assert phase_of(None, [], None, None, "suspended before it started") == (
        "Suspended",
        "Suspended",
        "suspended before it started",
    )


def test_image_outside_allowed_prefixes_is_invalid() -> None:
    """spec.image must start with an allowed prefix when the admin set some."""
    with pytest.raises(InvalidSpec) as e:
        children(OWNER, spec(image="evil.io/x:1"), OperatorSettings(allowed_image_prefixes=["ghcr.io/kubetune/"]))
    assert e.value.field == "spec.image"


def test_crd_schema_is_structural() -> None:
    """No $ref, anyOf or titles remain; every property has a type or is int-or-string."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            assert not {"$ref", "anyOf", "title", "const"} & set(node), path
            for key, sub in (node.get("properties") or {}).items():
                assert "type" in sub or sub.get("x-kubernetes-int-or-string"), f"{path}.{key}"
                walk(sub, f"{path}.{key}")

    walk(spec_schema(), "spec")
    assert crd()["spec"]["names"]["shortNames"] == ["ftj"]


def test_only_suspend_and_ttl_may_change() -> None:
    """Immutability rules cover every spec field except runPolicy.suspend and ttlSecondsAfterFinished."""
    rules = " ".join(r["rule"] for r in spec_schema()["x-kubernetes-validations"])
    assert "self.model == oldSelf.model" in rules and "self.runPolicy.maxRetries" in rules
    assert "runPolicy.suspend" not in rules and "ttlSecondsAfterFinished" not in rules


def pod(phase: str, *, created: str = "2026-01-01T00:00:00Z", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": f"p-{created}", "uid": created, "creationTimestamp": created},
        "status": {"phase": phase, **status},
    }


def test_unschedulable_pod_explains_pending() -> None:
    """A pod the scheduler cannot place makes the phase Pending with reason Unschedulable."""
    waiting = pod(
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes: Insufficient nvidia.com/gpu",
            }
        ],
    )
    assert phase_of({"metadata": {"name": "x"}, "spec": {}, "status": {}}, [waiting])[:2] == (
        "Pending",
        "Unschedulable",
    )


def test_a_pod_refused_by_a_quota_explains_pending_until_a_pod_exists() -> None:
    """The Job's FailedCreate Event makes the phase Pending with reason QuotaExceeded (FailedCreate for
    other refusals); later refreshes without a fresh read keep it, until a pod exists."""
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {}}
    quota = 'Error creating: pods "x-abc" is forbidden: exceeded quota: gpus, requested: pods=1, used: pods=0'
    first = derive(job=job, pods=[], metrics=[], generation=1, previous={}, now=NOW, create_failure=quota)
    running = next(c for c in first["conditions"] if c["type"] == "Running")
    assert (first["phase"], running["reason"], first["message"]) == ("Pending", "QuotaExceeded", quota)
    kept = derive(job=job, pods=[], metrics=[], generation=1, previous=first, now=NOW)
    assert next(c for c in kept["conditions"] if c["type"] == "Running")["reason"] == "QuotaExceeded"
    started = derive(job=job, pods=[pod("Pending")], metrics=[], generation=1, previous=kept, now=NOW)
    assert next(c for c in started["conditions"] if c["type"] == "Running")["reason"] == "Starting"
    psa = 'Error creating: pods "x-abc" is forbidden: violates PodSecurity "restricted:latest"'
    assert phase_of(job, [], psa)[:2] == ("Pending", "FailedCreate")
    assert phase_of({**job, "spec": {"suspend": True}}, [], quota)[:2] == ("Suspended", "Suspended")


def test_preempted_pod_counts_as_a_restart_once() -> None:
    """A preempted pod is one restart with reason Preempted, even after it is gone from the listing."""
    preempted = pod("Failed", conditions=[{"type": "DisruptionTarget", "status": "True"}])
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {}}
    first = derive(job=job, pods=[preempted], metrics=["accuracy"], generation=1, previous={}, now=NOW)
    again = derive(
        job=job, pods=[pod("Running", created="2026-01-02")], metrics=[], generation=1, previous=first, now=NOW
    )
    assert (first["restarts"], again["restarts"], again["lastRestartReason"]) == (1, 1, "Preempted")
    # A node whose peer was preempted stops with the job's exit code 21, without DisruptionTarget.
    stopped = pod("Failed", containerStatuses=[{"state": {"terminated": {"exitCode": 21}}}])
    assert (
        derive(job=job, pods=[stopped], metrics=[], generation=1, previous={}, now=NOW)["lastRestartReason"]
        == "Preempted"
    )


def test_succeeded_status_takes_metrics_from_the_summary() -> None:
    """The job's termination message fills metrics, the eval column, outputUri and 100% progress."""
    summary = {
        "phase": "Succeeded",
        "finalStep": 10,
        "totalSteps": 10,
        "metrics": {"evalAccuracy": 0.9, "trainLoss": 0.2},
        "outputUri": "s3://b/m/",
    }
    done = pod(
        "Succeeded", containerStatuses=[{"state": {"terminated": {"exitCode": 0, "message": json.dumps(summary)}}}]
    )
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    st = derive(job=job, pods=[done], metrics=["accuracy", "f1"], generation=2, previous={}, now=NOW)
    assert st["phase"] == "Succeeded" and st["eval"] == "accuracy=0.9000" and st["outputUri"] == "s3://b/m/"
    assert st["progress"]["percent"] == 100 and st["observedGeneration"] == 2


def test_a_multi_node_run_takes_its_summary_from_node_0() -> None:
    """An Indexed Job's other nodes end with a short note; the status comes from node 0's summary, even
    when another node's pod is newer (as kept by pod_view, which keeps the completion index)."""
    summary = {"phase": "Succeeded", "finalStep": 50, "totalSteps": 50, "outputUri": "s3://b/m/"}
    note = {"phase": "Succeeded", "message": "node 1: the summary is node 0's"}

    def node(index: str, created: str, message: dict[str, Any]) -> dict[str, Any]:
        done = pod(
            "Succeeded",
            created=created,
            containerStatuses=[{"state": {"terminated": {"exitCode": 0, "message": json.dumps(message)}}}],
        )
        done["metadata"]["annotations"] = {COMPLETION_INDEX: index, "other": "dropped"}
        return pod_view(done)

    pods = [node("0", "2026-01-01T00:00:00Z", summary), node("1", "2026-01-01T00:00:01Z", note)]
    assert pods[1]["metadata"]["annotations"] == {COMPLETION_INDEX: "1"}
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    st = derive(job=job, pods=pods, metrics=["accuracy"], generation=1, previous={}, now=NOW)
    assert st["outputUri"] == "s3://b/m/" and st["progress"]["step"] == st["progress"]["totalSteps"] == 50


def test_progress_is_read_from_the_jobs_pushgateway_group() -> None:
    """The group with the FineTuneJob's key gives step, total, percent, ETA, live metrics and checkpoint."""
    from kubetune_operator.progress import parse_groups

    def gauge(value: float, **labels: str) -> dict[str, Any]:
        return {"type": "GAUGE", "metrics": [{"labels": labels, "value": str(value)}]}

    group = {
        "labels": {"job": "kubetune", "namespace": "ml", "finetunejob": "bert"},
        "kubetune_train_global_step": gauge(459),
        "kubetune_train_total_steps": gauge(1377),
        "kubetune_train_eta_seconds": gauge(140.4),
        "kubetune_train_loss": gauge(0.33),
        "kubetune_eval_metric": gauge(0.855, metric="accuracy"),
        "kubetune_checkpoint_step": gauge(459),
    }
    other = {**group, "labels": {"job": "kubetune", "namespace": "ml", "finetunejob": "other"}}
    got = parse_groups([other, group], "ml", "bert")
    assert got is not None
    assert (got["step"], got["totalSteps"], got["percent"], got["etaSeconds"]) == (459, 1377, 33, 140)
    assert got["metrics"] == {"trainLoss": 0.33, "evalAccuracy": 0.855} and got["lastCheckpoint"] == {"step": 459}
    assert parse_groups([other], "ml", "bert") is None


def generation_spec(**changes: Any) -> Any:
    """A text-generation spec (a LoRA adapter), with changes."""
    body = {"task": "text-generation", "dataset": {"uri": "s3://data/chats/"}, "adapter": {}, **changes}
    return spec(**body)


def test_a_text_generation_job_without_metrics_shows_perplexity_in_the_eval_column() -> None:
    """Empty spec.metrics means the task's defaults: the operator passes spec.eval_metrics, so a finished
    text-generation run shows evalPerplexity in the Eval column, and its tokens/s in progress."""
    summary = {
        "phase": "Succeeded",
        "finalStep": 50,
        "totalSteps": 50,
        "metrics": {"trainLoss": 1.2, "evalLoss": 0.7, "evalPerplexity": 2.0138},
        "trainSamplesPerSecond": 12.5,
        "trainTokensPerSecond": 402.0,
        "outputUri": "s3://b/adapter/",
    }
    done = pod(
        "Succeeded", containerStatuses=[{"state": {"terminated": {"exitCode": 0, "message": json.dumps(summary)}}}]
    )
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    metrics = generation_spec().eval_metrics
    assert metrics == ["perplexity"]
    st = derive(job=job, pods=[done], metrics=metrics, generation=1, previous={}, now=NOW)
    assert st["eval"] == "perplexity=2.0138" and st["metrics"]["evalPerplexity"] == 2.0138
    assert st["progress"]["tokensPerSecond"] == 402.0 and st["progress"]["samplesPerSecond"] == 12.5
    # A classifier's summary has no tokens/s: progress gets none.
    del summary["trainTokensPerSecond"]
    done["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = json.dumps(summary)
    assert (
        "tokensPerSecond"
        not in derive(job=job, pods=[done], metrics=[], generation=1, previous={}, now=NOW)["progress"]
    )


def test_a_running_text_generation_job_shows_tokens_per_second_and_its_first_metric() -> None:
    """While it runs, the Pushgateway group gives progress.tokensPerSecond and the live evaluation scores;
    the Eval column shows the first of spec.metrics (exact_match here), by its API name."""
    from kubetune_operator.progress import parse_groups

    def gauge(*values: tuple[float, dict[str, str]]) -> dict[str, Any]:
        return {"type": "GAUGE", "metrics": [{"labels": labels, "value": str(v)} for v, labels in values]}

    group = {
        "labels": {"job": "kubetune", "namespace": "ml", "finetunejob": "chat"},
        "kubetune_train_global_step": gauge((20, {})),
        "kubetune_train_total_steps": gauge((50, {})),
        "kubetune_train_samples_per_second": gauge((12.5, {})),
        "kubetune_train_tokens_per_second": gauge((402.25, {})),
        "kubetune_train_loss": gauge((1.5, {})),
        "kubetune_eval_metric": gauge((0.6, {"metric": "exact_match"}), (3.25, {"metric": "perplexity"})),
    }
    progress = parse_groups([group], "ml", "chat")
    assert progress is not None and progress["tokensPerSecond"] == 402.25 and progress["percent"] == 40
    metrics = generation_spec(
        metrics=["exact_match", "perplexity"], evaluation={"generate": {"examples": 8}}
    ).eval_metrics
    job = {"metadata": {"name": "chat"}, "spec": {}, "status": {}}
    st = derive(job=job, pods=[pod("Running")], metrics=metrics, generation=1, previous={}, now=NOW, progress=progress)
    assert st["progress"]["tokensPerSecond"] == 402.25 and st["progress"]["samplesPerSecond"] == 12.5
    assert st["metrics"] == {"trainLoss": 1.5, "evalExactMatch": 0.6, "evalPerplexity": 3.25}
    assert st["eval"] == "exact_match=0.6000"


def test_a_text_generation_job_carries_its_fields_to_the_pod() -> None:
    """The adapter, evaluation, data format and merge reach the job in KUBETUNE_SPEC, defaults filled in."""
    job = children(
        OWNER,
        generation_spec(
            dataset={"uri": "s3://data/chats/", "format": "messages", "packing": True},
            evaluation={"generate": {"examples": 8}},
            metrics=["exact_match"],
            output={"uri": "s3://models/bot/", "merge": True},
        ),
        OperatorSettings(checkpoint_root="s3://kubetune/runs", storage_endpoint="http://s3:8333"),
    )[-1]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    passed = json.loads(env["KUBETUNE_SPEC"]["value"])
    assert passed["task"] == "text-generation" and passed["adapter"]["targetModules"] == ["all-linear"]
    assert passed["evaluation"]["generate"] == {"examples": 8, "maxNewTokens": 128}
    assert passed["dataset"]["format"] == "messages" and passed["dataset"]["packing"] is True
    assert passed["output"]["merge"] is True and passed["metrics"] == ["exact_match"]


def preference_spec(**changes: Any) -> Any:
    """A preference spec (DPO on a LoRA adapter), with changes."""
    body = {"task": "preference", "dataset": {"uri": "s3://data/prefs/"}, "adapter": {}, **changes}
    return spec(**body)


#: A finished preference run's evaluation, as its summary carries it: rewards are beta * log-ratios, so the
#: margin and the chosen and rejected rewards can be negative; only the accuracy is a fraction.
REWARDS = {
    "evalRewardAccuracy": 0.8125,
    "evalRewardMargin": 0.4375,
    "evalChosenReward": -0.125,
    "evalRejectedReward": -0.5625,
}


def test_a_preference_job_without_metrics_shows_reward_accuracy_in_the_eval_column() -> None:
    """Empty spec.metrics means the task's defaults, reward_accuracy first: a finished preference run shows
    evalRewardAccuracy in the Eval column and every reward metric (negative ones too) in status.metrics."""
    summary = {
        "phase": "Succeeded",
        "finalStep": 25,
        "totalSteps": 25,
        "metrics": {"trainLoss": 0.61, "evalLoss": 0.52, **REWARDS},
        "trainSamplesPerSecond": 6.5,
        "outputUri": "s3://b/dpo-adapter/",
    }
    done = pod(
        "Succeeded", containerStatuses=[{"state": {"terminated": {"exitCode": 0, "message": json.dumps(summary)}}}]
    )
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    metrics = preference_spec().eval_metrics
    assert metrics == ["reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"]
    st = derive(job=job, pods=[done], metrics=metrics, generation=1, previous={}, now=NOW)
    assert st["phase"] == "Succeeded" and st["eval"] == "reward_accuracy=0.8125"
    assert st["metrics"] == {"trainLoss": 0.61, "evalLoss": 0.52, **REWARDS}
    assert st["outputUri"] == "s3://b/dpo-adapter/" and st["progress"]["percent"] == 100
    # spec.metrics chooses the column's metric, a negative one too.
    chosen = preference_spec(metrics=["chosen_reward", "reward_accuracy"]).eval_metrics
    assert derive(job=job, pods=[done], metrics=chosen, generation=1, previous={}, now=NOW)["eval"] == (
        "chosen_reward=-0.1250"
    )


def test_a_running_preference_job_shows_its_live_rewards() -> None:
    """While it runs, the Pushgateway group's kubetune_eval_metric{metric="reward_margin"...} reach
    status.metrics by their API names (evalRewardMargin...), and the Eval column shows reward_accuracy."""
    from kubetune_operator.progress import parse_groups

    def gauge(*values: tuple[float, dict[str, str]]) -> dict[str, Any]:
        return {"type": "GAUGE", "metrics": [{"labels": labels, "value": str(v)} for v, labels in values]}

    group = {
        "labels": {"job": "kubetune", "namespace": "ml", "finetunejob": "prefs"},
        "kubetune_train_global_step": gauge((10, {})),
        "kubetune_train_total_steps": gauge((25, {})),
        "kubetune_train_loss": gauge((0.69, {})),
        "kubetune_eval_metric": gauge(
            (0.8125, {"metric": "reward_accuracy"}),
            (0.4375, {"metric": "reward_margin"}),
            (-0.125, {"metric": "chosen_reward"}),
            (-0.5625, {"metric": "rejected_reward"}),
        ),
    }
    progress = parse_groups([group], "ml", "prefs")
    assert progress is not None and progress["percent"] == 40
    job = {"metadata": {"name": "prefs"}, "spec": {}, "status": {}}
    metrics = preference_spec().eval_metrics
    st = derive(job=job, pods=[pod("Running")], metrics=metrics, generation=1, previous={}, now=NOW, progress=progress)
    assert st["phase"] == "Running" and st["metrics"] == {"trainLoss": 0.69, **REWARDS}
    assert st["eval"] == "reward_accuracy=0.8125"


def test_a_preference_job_carries_its_fields_to_the_pod() -> None:
    """spec.preference (its defaults filled in), the adapter with its init and the chat template reach the
    job in KUBETUNE_SPEC; a preference spec without the block gets none (the job applies the defaults)."""
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    settings = OperatorSettings(checkpoint_root="s3://kubetune/runs", storage_endpoint="http://s3:8333")

    def passed(prefs: Any) -> dict[str, Any]:
        job = children(OWNER, prefs, settings)[-1]
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        return dict(json.loads(env["KUBETUNE_SPEC"]["value"]))

    got = passed(
        preference_spec(
            dataset={"uri": "s3://data/prefs/", "chatTemplate": template},
            adapter={"rank": 8, "init": "new"},
            preference={"beta": 0.5},
            output={"uri": "s3://models/bot-dpo/", "merge": True},
        )
    )
    assert got["task"] == "preference" and got["preference"] == {"method": "dpo", "beta": 0.5, "loss": "sigmoid"}
    assert got["adapter"]["init"] == "new" and got["adapter"]["rank"] == 8
    assert got["dataset"]["chatTemplate"] == template and got["output"]["merge"] is True
    bare = passed(preference_spec())
    assert bare["task"] == "preference" and bare.get("preference") is None and bare["adapter"].get("init") is None
    assert api_spec(bare).preference_settings == api_spec(got).preference_settings.model_copy(update={"beta": 0.1})


def api_spec(passed: dict[str, Any]) -> Any:
    """The spec the job reads back from KUBETUNE_SPEC."""
    from kubetune_api.spec import parse_spec

    return parse_spec(passed)


def test_a_refusal_from_before_the_job_last_started_is_not_reported() -> None:
    """Only FailedCreate Events since the Job's startTime (set anew at each resume) explain a wait; the
    newest wins, whether it carries a lastTimestamp or only an eventTime."""
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {"startTime": "2026-11-27T10:00:00Z"}}
    old = {"lastTimestamp": "2026-11-27T09:59:59Z", "message": "exceeded quota: before the resume"}
    same_second = {"eventTime": "2026-11-27T10:00:00.250000Z", "message": "exceeded quota: now"}
    later = {"lastTimestamp": "2026-11-27T10:00:05Z", "message": "exceeded quota: newest"}
    assert newest_create_failure([old], job) is None
    assert newest_create_failure([old, same_second], job) == "exceeded quota: now"
    assert newest_create_failure([later, old, same_second], job) == "exceeded quota: newest"
    assert newest_create_failure([old], {**job, "status": {}}) == "exceeded quota: before the resume"
    assert newest_create_failure([], job) is None


def test_an_ended_finetunejob_stays_ended_when_its_job_is_gone() -> None:
    """Succeeded and Failed are final: a Job removed by a TTL or by hand derives no new phase or conditions."""
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    done = derive(job=job, pods=[], metrics=[], generation=1, previous={}, now=NOW)
    assert done["phase"] == "Succeeded"
    after = derive(job=None, pods=[], metrics=[], generation=1, previous=done, now="2026-01-02T00:00:00Z")
    assert after == {"phase": "Succeeded"}
    failed = {**done, "phase": "Failed"}
    assert derive(job=None, pods=[], metrics=[], generation=1, previous=failed, now=NOW) == {"phase": "Failed"}


def test_restarts_come_from_the_jobs_record_when_the_failed_pods_are_gone() -> None:
    """A preemption (or failure) whose pod the operator never saw is counted from the replacement pod's
    per-index annotations, which the Job controller writes; counts never go down."""
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {}}
    replacement = pod("Running", created="2026-01-02")
    replacement["metadata"]["annotations"] = {COMPLETION_INDEX: "0", IGNORED_FAILURE_COUNT: "1"}
    st = derive(job=job, pods=[replacement], metrics=[], generation=1, previous={}, now=NOW)
    assert (st["restarts"], st["preemptions"], st["lastRestartReason"]) == (1, 1, "Preempted")
    again = pod("Running", created="2026-01-03")
    again["metadata"]["annotations"] = {COMPLETION_INDEX: "0", IGNORED_FAILURE_COUNT: "1", FAILURE_COUNT: "1"}
    st = derive(job=job, pods=[again], metrics=[], generation=1, previous=st, now=NOW)
    assert (st["restarts"], st["preemptions"], st["lastRestartReason"]) == (2, 1, "Error")
    # The replacement not yet listed: the count the status holds stays.
    st = derive(job=job, pods=[], metrics=[], generation=1, previous=st, now=NOW)
    assert (st["restarts"], st["lastRestartReason"]) == (2, "Error")


def test_a_seen_failure_and_its_replacements_record_count_once() -> None:
    """The failed pod and the annotation on its replacement describe one failure, not two."""
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {}}
    oom = pod("Failed", containerStatuses=[{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}])
    first = derive(job=job, pods=[oom], metrics=[], generation=1, previous={}, now=NOW)
    replacement = pod("Running", created="2026-01-02")
    replacement["metadata"]["annotations"] = {FAILURE_COUNT: "1"}
    st = derive(job=job, pods=[oom, replacement], metrics=[], generation=1, previous=first, now=NOW)
    assert (st["restarts"], st["failureCount"], st["lastRestartReason"]) == (1, 1, "OOMKilled")


def test_a_child_of_the_same_name_is_ours_an_earlier_finetunejobs_or_foreign() -> None:
    """claim() tells our Job from one an earlier FineTuneJob of this name left to the garbage collector
    (wait for it) and from anyone else's (never touched)."""
    ref = {"kind": "FineTuneJob", "name": "x", "uid": "new"}
    assert claim({"metadata": {"ownerReferences": [ref]}}, "new", "x") == "ours"
    assert claim({"metadata": {"ownerReferences": [{**ref, "uid": "old"}]}}, "new", "x") == "previous"
    assert claim({"metadata": {"deletionTimestamp": NOW}}, "new", "x") == "previous"
    assert claim({"metadata": {}}, "new", "x") == "foreign"
    assert claim({"metadata": {"ownerReferences": [{**ref, "kind": "CronJob", "uid": "o"}]}}, "new", "x") == "foreign"


def test_a_refused_or_failed_job_create_explains_pending() -> None:
    """Without a Job, the reason the operator could not create one (a quota on Jobs, an API error) shows."""
    assert phase_of(None, [], 'jobs.batch "x" is forbidden: exceeded quota: jobs')[:2] == ("Pending", "QuotaExceeded")
    assert phase_of(None, [], "cannot create its Job x yet: 503")[:2] == ("Pending", "FailedCreate")
    assert phase_of(None, [])[:2] == ("Pending", "Creating")
