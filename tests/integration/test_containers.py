"""The job image as a real container (podman) under the test kubelet: the restricted securityContext
as the runtime enforces it, any UID, a real memory limit's OOM kill, and preemption then resume,
all through the operator with S3 for the model, data, checkpoints and output."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest

from tests.integration.conftest import Operator, ftj, pod_summary, pods, wait_phase
from tests.kube import apply, install_crd, kubectl, operator_account, wait_for

pytestmark = pytest.mark.integration
BUCKET = "containers"
#: Not the image's own user: an arbitrary UID as OpenShift assigns, with no passwd entry in the image.
ANY_UID = 12345

PROBE = textwrap.dedent(
    """
    import json, os, tempfile
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    def writable(directory):
        try:
            with tempfile.NamedTemporaryFile(dir=directory):
                return True
        except OSError:
            return False
    os.makedirs(os.environ["HF_HOME"], exist_ok=True)
    limit = open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read().strip()
    import torch, transformers, kubetune_job
    report = {
        "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
        "root": writable("/usr/local"), "etc": writable("/etc"), "tmp": writable("/tmp"),
        "cache": writable(os.environ["HF_HOME"]), "shm": writable("/dev/shm"),
        "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
        "seccomp": status["Seccomp"].strip(), "memory_limit": int(limit), "torch": torch.__version__,
    }
    open("/dev/termination-log", "w").write(json.dumps(report))
    """
)


def restricted_pod(name: str, image: str, script: str, *, memory: str) -> dict[str, Any]:
    """A pod as the restricted Pod Security Standard wants it, with the job image's scratch volumes."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": ANY_UID,
                "runAsGroup": 0,
                "fsGroup": ANY_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "probe",
                    "image": image,
                    "command": ["python", "-c", script],
                    "resources": {"limits": {"memory": memory, "cpu": "1"}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "readOnlyRootFilesystem": True,
                    },
                    "volumeMounts": [
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "cache", "mountPath": "/cache"},
                        {"name": "dshm", "mountPath": "/dev/shm"},
                    ],
                }
            ],
            "volumes": [
                {"name": "tmp", "emptyDir": {}},
                {"name": "cache", "emptyDir": {}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            ],
        },
    }


def ended(plane: Any, namespace: str, name: str) -> dict[str, Any]:
    """The pod's only container status once the pod is terminal."""

    def probe() -> dict[str, Any] | None:
        out = kubectl(plane, "get", "pod", name, "-n", namespace, "-o", "json", check=False)
        if out.returncode != 0:
            return None
        status = json.loads(out.stdout)["status"]
        return status["containerStatuses"][0] if status.get("phase") in ("Succeeded", "Failed") else None

    return wait_for(f"pod {name} to end", probe, timeout=180)


@pytest.fixture
def restricted(control_plane: Any, namespace: str) -> str:
    kubectl(control_plane, "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    return namespace


def test_job_image_runs_restricted_as_any_uid(control_plane: Any, kubelet: Any, images: Any, restricted: str) -> None:
    """Under the restricted standard, as UID 12345 with no passwd entry: read-only root, writable volumes
    (HF_HOME on the cache volume), no capabilities, no new privileges, seccomp on, the memory limit set."""
    apply(control_plane, restricted_pod("probe", images["job"], PROBE, memory="2Gi"), namespace=restricted)
    state = ended(control_plane, restricted, "probe")
    terminated = state["state"]["terminated"]
    assert terminated["exitCode"] == 0, kubelet.logs(restricted, "probe")
    assert state["containerID"].startswith("podman://")
    report = json.loads(terminated["message"])
    assert report["uid"] == ANY_UID and report["gid"] == 0 and ANY_UID in report["groups"]
    assert not report["root"] and not report["etc"] and report["tmp"] and report["cache"] and report["shm"]
    assert int(report["cap_eff"], 16) == 0 and report["no_new_privs"] == "1" and report["seccomp"] == "2"
    assert report["memory_limit"] == 2 * 1024**3 and report["torch"]


def test_root_image_user_is_refused_under_run_as_non_root(
    control_plane: Any, kubelet: Any, images: Any, namespace: str
) -> None:
    """runAsNonRoot with no runAsUser and an image whose user is root: CreateContainerConfigError, never started."""
    from tests.testbed import podman

    doc = restricted_pod("rooted", podman.base_image(), "print('ran')", memory="256Mi")
    del doc["spec"]["securityContext"]["runAsUser"]
    apply(control_plane, doc, namespace=namespace)

    def waiting() -> dict[str, Any] | None:
        out = kubectl(control_plane, "get", "pod", "rooted", "-n", namespace, "-o", "json")
        statuses = json.loads(out.stdout)["status"].get("containerStatuses") or [{}]
        return (
            statuses[0].get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"
            and (statuses[0])
        )

    state = wait_for("CreateContainerConfigError", waiting, timeout=60)
    assert "runAsNonRoot" in state["state"]["waiting"]["message"]


# --- through the operator, with S3


@pytest.fixture(scope="module")
def staged(s3: Any, assets: Path) -> str:
    """The tiny model and data in S3, as a cluster user stages them."""
    s3.create_bucket(BUCKET)
    store = s3.store(BUCKET)
    for part in ("model", "data"):
        for path in sorted(p for p in (assets / part).rglob("*") if p.is_file()):
            obstore.put(store, f"{part}/{path.relative_to(assets / part).as_posix()}", path.read_bytes())
    return f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def image_operator(
    control_plane: Any, kubelet: Any, pushgateway: Any, s3: Any, images: Any, testbed_dir: Path
) -> Iterator[Operator]:
    """The operator (a process) defaulting to the job image, S3 storage, and pods running as ANY_UID."""
    install_crd(control_plane)
    settings = {
        "job_image": images["job"],
        "allowed_image_prefixes": '["localhost/"]',
        "pushgateway_url": pushgateway.url,
        "progress_interval_seconds": "2",
        "storage_endpoint": s3.endpoint,
        "storage_region": s3.region,
        "credentials_secret": "s3-creds",
        "checkpoint_root": f"s3://{BUCKET}/runs",
        "output_root": f"s3://{BUCKET}/models",
        "run_as_user": str(ANY_UID),
    }
    account = operator_account(control_plane, testbed_dir, namespace="kubetune-images")
    op = Operator(account, testbed_dir / "operator-images", **settings)
    op.start()
    yield op
    op.stop()


@pytest.fixture
def submit(control_plane: Any, image_operator: Operator, s3: Any, staged: str, namespace: str, assets: Path) -> Any:
    """Apply a FineTuneJob that reads and writes S3 only (nothing of the host's disk reaches a container)."""
    secret = [
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    ]
    kubectl(control_plane, "create", "secret", "generic", "s3-creds", "-n", namespace, *secret)

    def go(name: str, **spec: Any) -> dict[str, Any]:
        doc = ftj(name, assets, model={"uri": f"{staged}/model/"}, dataset={"uri": f"{staged}/data/"}, **spec)
        doc["spec"]["checkpoints"].pop("uri")
        doc["spec"].pop("output")
        done = apply(control_plane, doc, namespace=namespace)
        assert done.returncode == 0, done.stderr
        return doc

    return go


def committed_in_s3(s3: Any, namespace: str, name: str) -> list[int]:
    listed = obstore.list(s3.store(BUCKET), prefix=f"runs/{namespace}/{name}/")
    paths = [o["path"] for batch in listed for o in batch if o["path"].endswith("/kubetune-manifest.json")]
    return sorted(int(p.split("/")[-2].split("-")[1]) for p in paths)


def test_preempted_container_resumes_from_its_checkpoint(
    control_plane: Any, kubelet: Any, s3: Any, submit: Any, namespace: str
) -> None:
    """The job image, as ANY_UID: SIGTERM from a preemption commits a checkpoint; the next pod resumes from
    it, ends at the same final step, and no retry is used."""
    submit("preempted", hyperparameters={"epochs": 10}, runPolicy={"maxRetries": 0})
    first = wait_for("a committed checkpoint in S3", lambda: committed_in_s3(s3, namespace, "preempted"), timeout=300)
    (pod,) = pods(control_plane, namespace, "preempted")
    assert pod["spec"]["securityContext"]["runAsUser"] == ANY_UID
    assert pod["status"]["containerStatuses"][0]["containerID"].startswith("podman://")
    name = pod["metadata"]["name"]
    log = kubelet.pod_dir(namespace, name) / "logs" / "trainer.log"  # kept after the pod is gone
    kubelet.preempt(namespace, name, grace=30)
    st = wait_phase(control_plane, namespace, "preempted", "Succeeded", timeout=600)
    assert st["restarts"] == 1 and st["lastRestartReason"] == "Preempted" and st["progress"]["step"] == 1000
    assert [(f["pod"], f["reason"]) for f in st["failures"]] == [(name, "Preempted")]
    saved = re.search(r"stopped by SIGTERM; checkpoint-(\d+) committed", log.read_text())
    assert saved, log.read_text()[-2000:]
    (last,) = pods(control_plane, namespace, "preempted")
    assert last["status"]["containerStatuses"][0]["containerID"].startswith("podman://")
    summary = pod_summary(last)
    assert summary["resumedFromStep"] == int(saved.group(1)) >= first[0]
    assert summary["stepsThisRun"] == 1000 - summary["resumedFromStep"]
    listed = obstore.list(s3.store(BUCKET), prefix=f"models/{namespace}/preempted/")
    assert f"models/{namespace}/preempted/model.safetensors" in {o["path"] for batch in listed for o in batch}


def test_a_real_memory_limit_oom_kills_the_pod(control_plane: Any, kubelet: Any, submit: Any, namespace: str) -> None:
    """resources.memory becomes the container's cgroup limit; the kernel kills the job, the pod reports
    OOMKilled (exit 137) as a kubelet does, and the operator records it as the failure's reason."""
    submit("squeezed", resources={"gpus": 1, "memory": "160Mi"}, runPolicy={"maxRetries": 0})
    st = wait_phase(control_plane, namespace, "squeezed", "Failed", timeout=300)
    (pod,) = pods(control_plane, namespace, "squeezed")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled" and terminated["exitCode"] == 137
    assert [f["reason"] for f in st["failures"]] == ["OOMKilled"], st
