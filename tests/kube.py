"""Helpers for tests on the test bed's control plane: kubectl with stdin, waiting on a condition,
and an operator process running under a ServiceAccount bound to the operator's RBAC rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kubetune_operator.crd import crd
from kubetune_operator.rbac import rules
from tests.testbed import binaries, processes
from tests.testbed.cluster import Credentials, write_kubeconfig
from tests.testbed.waits import eventually

T = TypeVar("T")
JOB_IMAGE = "registry.test/kubetune/kubetune-job:dev"


def kubectl(
    plane: Any, *args: str, stdin: str | None = None, check: bool = True, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [str(binaries.require("kubectl")), f"--kubeconfig={kubeconfig or plane.kubeconfig}", *args]
    return subprocess.run(argv, input=stdin, check=check, capture_output=True, text=True, timeout=120)


def apply(plane: Any, *docs: dict[str, Any], namespace: str | None = None) -> subprocess.CompletedProcess[str]:
    ns = ["-n", namespace] if namespace else []
    return kubectl(plane, "apply", *ns, "-f", "-", stdin=yaml.safe_dump_all(docs), check=False)


def get(plane: Any, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    done = kubectl(plane, "get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float = 120.0, every: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy (the test bed's ``eventually``, what first)."""
    return eventually(probe, timeout=timeout, interval=every, what=what)


def bare_finetunejob(name: str, *, suspend: bool = False) -> dict[str, Any]:
    """A FineTuneJob for the operator's own tests and benchmarks: its model and data do not exist, so it
    trains nothing; suspended, its Job gets no pod and its status says Suspended (no kubelet needed)."""
    spec: dict[str, Any] = {"model": {"uri": "/nonexistent/model"}, "dataset": {"uri": "/nonexistent/data"}}
    if suspend:
        spec["runPolicy"] = {"suspend": True}
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def install_crd(plane: Any) -> None:
    """Apply the CRD and wait until it is Established (read from its status: `kubectl wait` right after a
    create may find nothing yet)."""
    kubectl(plane, "apply", "-f", "-", stdin=yaml.safe_dump(crd()))

    def established() -> bool:
        conditions = (get_cluster_scoped(plane, "crd", "finetunejobs.kubetune.io") or {}).get("status", {})
        return any(
            c.get("type") == "Established" and c.get("status") == "True" for c in conditions.get("conditions") or []
        )

    wait_for("the CRD to be Established", established, timeout=60)


def get_cluster_scoped(plane: Any, kind: str, name: str) -> dict[str, Any] | None:
    done = kubectl(plane, "get", kind, name, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def operator_account(plane: Any, workdir: Path, namespace: str = "kubetune-system", *, kueue: bool = False) -> Path:
    """A ServiceAccount bound to the operator's rules (rbac.rules) cluster-wide; returns a kubeconfig with
    its token. The role is named apart from the chart's, so the chart installs in the same session."""
    docs = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "kubetune-operator", "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "kubetune-operator-under-test"},
            "rules": rules(kueue=kueue),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kubetune-operator-under-test"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kubetune-operator-under-test",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": namespace}],
        },
    ]
    kubectl(plane, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    token = kubectl(plane, "create", "token", "kubetune-operator", "-n", namespace, "--duration=24h").stdout.strip()
    user = Credentials(f"system:serviceaccount:{namespace}:kubetune-operator", token)
    return write_kubeconfig(workdir / "operator.kubeconfig", server=plane.server, ca=plane.ca_file, user=user)


@contextmanager
def operator_process(kubeconfig: Path, workdir: Path, **settings: str) -> Iterator[dict[str, Any]]:
    """`python -m kubetune_operator` with KUBETUNE_OPERATOR_* settings; yields its ports and process."""
    metrics, health = processes.free_port(), processes.free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KUBETUNE_OPERATOR_JOB_IMAGE": JOB_IMAGE,
        "KUBETUNE_OPERATOR_METRICS_PORT": str(metrics),
        "KUBETUNE_OPERATOR_HEALTH_PORT": str(health),
        **{f"KUBETUNE_OPERATOR_{k.upper()}": v for k, v in settings.items()},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"operator-{metrics}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kubetune_operator"], env=env, stdout=out, stderr=out)
    try:
        processes.wait_for_http(f"http://127.0.0.1:{health}/healthz", process=None, timeout=60)
        yield {"process": proc, "metrics_port": metrics, "health_port": health, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
