"""The test bed itself: each real part does what the project's tests will rely on."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.testbed.waits import condition, container_state, eventually, job_pods, read_pod

pytestmark = pytest.mark.integration

SLEEPER = ["python", "-c", "import time; time.sleep(300)"]
MERGE_PATCH = "application/merge-patch+json"  # the client's PATCH default is a JSON patch


def pod_manifest(name: str, *, command: list[str], **container: Any) -> dict[str, Any]:
    """A single-container pod on the python image that never restarts."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "python:3.11-slim", "command": command, **container}],
        },
    }


def job_manifest(name: str, *, command: list[str], **spec: Any) -> dict[str, Any]:
    """A one-pod batch/v1 Job whose pod runs ``command`` on the python image."""
    template = pod_manifest(name, command=command)["spec"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": template}, **spec},
    }


def running_pod(core: k8s.CoreV1Api, namespace: str, job: str) -> k8s.V1Pod:
    """Wait for the Job's first pod to run and return it."""

    def probe() -> k8s.V1Pod | None:
        pods = [p for p in job_pods(core, namespace, job) if p.status.phase == "Running"]
        return pods[0] if pods else None

    return eventually(probe, what=f"a running pod of job {job}")


def terminated_pod(core: k8s.CoreV1Api, namespace: str, name: str) -> k8s.V1Pod:
    """Wait until the pod's first container reports ``state.terminated`` and return the pod."""

    def probe() -> k8s.V1Pod | None:
        pod = read_pod(core, namespace, name)
        state = container_state(pod) if pod else None
        return pod if state is not None and state.terminated is not None else None

    return eventually(probe, what=f"pod {name} to terminate")


@pytest.fixture
def core(kube_admin: Any) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(kube_admin)


@pytest.fixture
def batch(kube_admin: Any) -> k8s.BatchV1Api:
    return k8s.BatchV1Api(kube_admin)


# --- jobs, pods and the kubelet


def test_job_completes_and_reports_termination_message(
    core: k8s.CoreV1Api, batch: k8s.BatchV1Api, kubelet: Any, namespace: str
) -> None:
    """A Job's pod runs a Python command to success, and its termination message reaches the pod status."""
    summary = {"step": 3, "pod": "$(POD_NAME)"}  # the kubelet expands $(VAR) in commands
    write = f"open('/dev/termination-log', 'w').write({json.dumps(json.dumps(summary))})"
    job = job_manifest("hello", command=["python", "-c", write])
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]
    batch.create_namespaced_job(namespace, job)

    done = eventually(lambda: condition(batch.read_namespaced_job("hello", namespace), "Complete"), what="job Complete")
    assert done.status == "True"
    pod = job_pods(core, namespace, "hello")[0]
    terminated = container_state(pod).terminated
    assert pod.status.phase == "Succeeded"
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert json.loads(terminated.message) == {"step": 3, "pod": pod.metadata.name}


def test_pod_asking_for_more_gpus_than_any_node_stays_unschedulable(
    core: k8s.CoreV1Api, kubelet: Any, namespace: str
) -> None:
    """A pod requesting more nvidia.com/gpu than a node has stays Pending with reason Unschedulable."""
    pod = pod_manifest("greedy", command=SLEEPER, resources={"limits": {"nvidia.com/gpu": "9"}})
    core.create_namespaced_pod(namespace, pod)

    scheduled = eventually(lambda: condition(core.read_namespaced_pod("greedy", namespace), "PodScheduled"))
    assert (scheduled.status, scheduled.reason) == ("False", "Unschedulable")
    assert "nvidia.com/gpu" in scheduled.message
    current = core.read_namespaced_pod("greedy", namespace)
    assert current.status.phase == "Pending" and not current.spec.node_name


def test_deleting_a_job_collects_its_pods(
    core: k8s.CoreV1Api, batch: k8s.BatchV1Api, kubelet: Any, namespace: str
) -> None:
    """Deleting a Job with Background propagation removes its running pod through the garbage collector."""
    batch.create_namespaced_job(namespace, job_manifest("doomed", command=SLEEPER))
    pod = running_pod(core, namespace, "doomed")

    batch.delete_namespaced_job("doomed", namespace, propagation_policy="Background")

    eventually(lambda: read_pod(core, namespace, pod.metadata.name) is None, what="the Job's pod to be collected")


def test_preempted_pod_is_replaced_without_counting_a_failure(
    core: k8s.CoreV1Api, batch: k8s.BatchV1Api, kubelet: Any, namespace: str
) -> None:
    """A preempted pod carries DisruptionTarget, and a podFailurePolicy ignoring it gets a replacement, failed=0."""
    policy = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    batch.create_namespaced_job(namespace, job_manifest("train", command=SLEEPER, podFailurePolicy=policy))
    first = running_pod(core, namespace, "train")

    kubelet.preempt(namespace, first.metadata.name)

    preempted = core.read_namespaced_pod(first.metadata.name, namespace)
    assert condition(preempted, "DisruptionTarget").reason == "PreemptionByScheduler"

    def replacement() -> k8s.V1Pod | None:
        pods = [p for p in job_pods(core, namespace, "train") if p.metadata.name != first.metadata.name]
        return next((p for p in pods if p.status.phase == "Running"), None)

    eventually(replacement, what="a running replacement pod")
    job = batch.read_namespaced_job("train", namespace)
    assert not job.status.failed
    assert condition(job, "Failed") is None


def test_suspending_a_job_stops_its_running_pod(
    core: k8s.CoreV1Api, batch: k8s.BatchV1Api, kubelet: Any, namespace: str
) -> None:
    """Suspending a Job makes its controller delete the pod; the kubelet stops the process and the pod goes."""
    batch.create_namespaced_job(namespace, job_manifest("pausable", command=SLEEPER))
    pod = running_pod(core, namespace, "pausable")

    batch.patch_namespaced_job("pausable", namespace, {"spec": {"suspend": True}}, _content_type=MERGE_PATCH)

    eventually(lambda: read_pod(core, namespace, pod.metadata.name) is None, what="the suspended Job's pod to go")
    suspended = eventually(lambda: condition(batch.read_namespaced_job("pausable", namespace), "Suspended"))
    assert suspended.status == "True"


def test_empty_dir_mount_path_is_mapped_into_the_pod_directory(
    core: k8s.CoreV1Api, kubelet: Any, namespace: str
) -> None:
    """A path under an emptyDir mountPath, passed through env, lands in the pod's own volume directory."""
    write = ["python", "-c", "import os; open(os.environ['OUT'], 'w').write('checkpoint')"]
    pod = pod_manifest(
        "writer",
        command=write,
        env=[{"name": "OUT", "value": "/scratch/out.txt"}],
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    pod["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    core.create_namespaced_pod(namespace, pod)

    terminated = container_state(terminated_pod(core, namespace, "writer")).terminated
    assert terminated.exit_code == 0
    assert (kubelet.pod_dir(namespace, "writer") / "volumes" / "scratch" / "out.txt").read_text() == "checkpoint"


def test_oom_killed_container_reports_exit_137(core: k8s.CoreV1Api, kubelet: Any, namespace: str) -> None:
    """An OOM kill ends the container with exit code 137 and reason OOMKilled, and the pod Failed."""
    core.create_namespaced_pod(namespace, pod_manifest("hungry", command=SLEEPER))
    eventually(lambda: core.read_namespaced_pod("hungry", namespace).status.phase == "Running", what="pod running")

    kubelet.oom_kill(namespace, "hungry")

    pod = terminated_pod(core, namespace, "hungry")
    terminated = container_state(pod).terminated
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled")
    assert eventually(lambda: core.read_namespaced_pod("hungry", namespace).status.phase == "Failed")


def test_failed_container_falls_back_to_log_tail(core: k8s.CoreV1Api, kubelet: Any, namespace: str) -> None:
    """With FallbackToLogsOnError and an empty message file, a failed container's message is its log tail."""
    crash = ["python", "-c", "import sys; print('boom: bad dataset'); sys.exit(3)"]
    pod = pod_manifest("crash", command=crash, terminationMessagePolicy="FallbackToLogsOnError")
    core.create_namespaced_pod(namespace, pod)

    terminated = container_state(terminated_pod(core, namespace, "crash")).terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert "boom: bad dataset" in terminated.message


def test_unknown_image_waits_in_image_pull_back_off(core: k8s.CoreV1Api, kubelet: Any, namespace: str) -> None:
    """An image the kubelet maps to no command is reported as a failed pull and the pod stays Pending."""
    pod = pod_manifest("ghost", command=["serve"])
    pod["spec"]["containers"][0]["image"] = "registry.invalid/nothing:1.0"
    core.create_namespaced_pod(namespace, pod)

    def backing_off() -> bool:
        state = container_state(core.read_namespaced_pod("ghost", namespace))
        return bool(state and state.waiting and state.waiting.reason == "ImagePullBackOff")

    eventually(backing_off, what="ImagePullBackOff")
    assert core.read_namespaced_pod("ghost", namespace).status.phase == "Pending"


# --- secrets and RBAC


@pytest.fixture
def other_namespace(core: k8s.CoreV1Api, namespace: str) -> Iterator[str]:
    """A second namespace, for checks that something does not cross namespaces."""
    name = f"{namespace}-other"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def secret(name: str, values: dict[str, str]) -> k8s.V1Secret:
    return k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data=values)


def secret_env(secret_name: str, key: str) -> list[dict[str, Any]]:
    return [{"name": "VALUE", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}]


def test_env_from_secret_in_the_pods_namespace_is_resolved(core: k8s.CoreV1Api, kubelet: Any, namespace: str) -> None:
    """A secretKeyRef to a Secret in the pod's namespace becomes the process's environment variable."""
    token = secrets.token_hex(8)
    core.create_namespaced_secret(namespace, secret("s3-creds", {"AWS_SECRET_ACCESS_KEY": token}))
    echo = ["python", "-c", "import os; open('/dev/termination-log', 'w').write(os.environ['VALUE'])"]
    core.create_namespaced_pod(
        namespace, pod_manifest("reader", command=echo, env=secret_env("s3-creds", "AWS_SECRET_ACCESS_KEY"))
    )

    terminated = container_state(terminated_pod(core, namespace, "reader")).terminated
    assert (terminated.exit_code, terminated.message) == (0, token)


def test_secret_in_another_namespace_is_not_resolved(
    core: k8s.CoreV1Api, kubelet: Any, namespace: str, other_namespace: str
) -> None:
    """A Secret of the same name in another namespace is not used: the container waits in CreateContainerConfigError."""
    core.create_namespaced_secret(other_namespace, secret("s3-creds", {"AWS_SECRET_ACCESS_KEY": "elsewhere"}))
    core.create_namespaced_pod(
        namespace, pod_manifest("reader", command=SLEEPER, env=secret_env("s3-creds", "AWS_SECRET_ACCESS_KEY"))
    )

    def config_error() -> Any:
        state = container_state(core.read_namespaced_pod("reader", namespace))
        waiting = state.waiting if state else None
        return waiting if waiting and waiting.reason == "CreateContainerConfigError" else None

    waiting = eventually(config_error, what="CreateContainerConfigError")
    assert waiting.message == 'secret "s3-creds" not found'
    assert core.read_namespaced_pod("reader", namespace).status.phase == "Pending"


def test_token_of_a_narrow_role_lists_jobs_but_not_secrets(
    control_plane: Any, core: k8s.CoreV1Api, kube_admin: Any, namespace: str
) -> None:
    """A ServiceAccount token bound to a Role on Jobs may list Jobs and is forbidden to list Secrets."""
    rbac = k8s.RbacAuthorizationV1Api(kube_admin)
    core.create_namespaced_service_account(namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="watcher")))
    rule = {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]}
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "jobs-reader"}, "rules": [rule]})
    binding = {
        "metadata": {"name": "watcher-jobs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "jobs-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "watcher", "namespace": namespace}],
    }
    rbac.create_namespaced_role_binding(namespace, binding)
    request = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=600))
    token = core.create_namespaced_service_account_token("watcher", namespace, request).status.token

    with control_plane.api_client(token) as as_watcher:
        assert k8s.BatchV1Api(as_watcher).list_namespaced_job(namespace).items == []
        with pytest.raises(ApiException) as denied:
            k8s.CoreV1Api(as_watcher).list_namespaced_secret(namespace)
    assert denied.value.status == 403


# --- object storage and metrics


def test_s3_put_list_get_through_obstore(s3: Any) -> None:
    """obstore puts, lists and gets objects on SeaweedFS with SigV4 credentials."""
    import obstore

    bucket = "testbed-" + secrets.token_hex(4)
    s3.create_bucket(bucket)
    store = s3.store(bucket)
    obstore.put(store, "runs/a/checkpoint-1/model.bin", b"\x00weights\xff")
    obstore.put(store, "runs/a/checkpoint-1/manifest.json", b'{"step": 1}')

    listed = sorted(meta["path"] for batch in obstore.list(store, prefix="runs/a/") for meta in batch)
    assert listed == ["runs/a/checkpoint-1/manifest.json", "runs/a/checkpoint-1/model.bin"]
    assert obstore.get(store, "runs/a/checkpoint-1/model.bin").bytes().to_bytes() == b"\x00weights\xff"


def test_prometheus_scrapes_a_value_pushed_to_the_gateway(pushgateway: Any, prometheus: Any) -> None:
    """A gauge pushed with prometheus_client is queryable in Prometheus, grouping labels kept (honor_labels)."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    Gauge("kubetune_testbed_probe", "A value the test bed test pushes.", registry=registry).set(42.5)
    grouping = {"namespace": "ml", "finetunejob": "probe-" + secrets.token_hex(3)}
    push_to_gateway(pushgateway.address, job="kubetune", registry=registry, grouping_key=grouping)

    result = prometheus.query(f'kubetune_testbed_probe{{finetunejob="{grouping["finetunejob"]}"}}')
    (sample,) = result
    assert sample["metric"]["namespace"] == "ml" and sample["metric"]["job"] == "kubetune"
    assert float(sample["value"][1]) == 42.5
