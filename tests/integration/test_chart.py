"""The Helm chart: lint, template, schema, and a real install on the test bed that runs an example
FineTuneJob end to end with the operator running from the chart under the chart's own RBAC."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
import yaml

from kubetune_operator.crd import crd
from kubetune_operator.rbac import RULES, lease_rules, rules
from tests.kube import get, kubectl, wait_for
from tests.testbed import binaries, processes

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "kubetune"
BUCKET = "kubetune"


def helm(*args: str, plane: Any = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    config = [f"--kubeconfig={plane.kubeconfig}"] if plane else []
    argv = [str(binaries.require("helm")), *config, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if check and done.returncode:
        raise AssertionError(f"helm {args[0]} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


def rendered(*values: str) -> list[dict[str, Any]]:
    out = helm("template", "kubetune", str(CHART), "-n", "kubetune", *values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("values", sorted((CHART / "ci").glob("*.yaml")), ids=lambda p: p.name)
def test_lint_and_template_each_ci_values_file(values: Path) -> None:
    """helm lint --strict and helm template pass with every values file in ci/."""
    helm("lint", "--strict", str(CHART), "-f", str(values))
    kinds = {d["kind"] for d in rendered("-f", str(values))}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ConfigMap"} <= kinds


def test_bad_values_are_rejected_by_the_schema(tmp_path: Path) -> None:
    """An unknown key or a wrong type fails with a message naming it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("operator:\n  replica: 2\nstorage:\n  checkpointRoot: gs://elsewhere\n")
    done = helm("template", "kubetune", str(CHART), "-f", str(bad), check=False)
    assert done.returncode != 0
    assert "replica" in done.stderr and "checkpointRoot" in done.stderr


def test_chart_crd_is_the_generated_one() -> None:
    """The chart's CRD equals `kubetune crd` (regenerate: `kubetune crd -o json > charts/kubetune/files/crd.json`)."""
    chart = json.loads((CHART / "files" / "crd.json").read_text())
    assert chart == json.loads(json.dumps(crd())), "stale: run kubetune crd -o json > charts/kubetune/files/crd.json"
    (templated,) = [d for d in rendered() if d["kind"] == "CustomResourceDefinition"]
    assert templated["spec"] == chart["spec"]
    assert templated["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_chart_rbac_is_the_operators_rules_and_no_secrets() -> None:
    """The ClusterRole (or each namespaced Role) grants exactly rbac.RULES, and Kueue's Workloads only with
    kueue.enabled: no Secrets, no wildcards."""
    (role,) = [d for d in rendered() if d["kind"] == "ClusterRole"]
    assert role["rules"] == RULES
    roles = [d for d in rendered("--set", "operator.watchNamespaces={a,b}") if d["kind"] == "Role"]
    watching = [r for r in roles if not r["metadata"]["name"].endswith("-leader-election")]
    assert [r["metadata"]["namespace"] for r in watching] == ["a", "b"] and all(r["rules"] == RULES for r in watching)
    (with_kueue,) = [d for d in rendered("--set", "kueue.enabled=true") if d["kind"] == "ClusterRole"]
    assert with_kueue["rules"] == rules(kueue=True) != RULES
    flat = json.dumps(rules(kueue=True))
    assert "secrets" not in flat and "*" not in flat


def test_chart_grants_leases_in_its_own_namespace_only() -> None:
    """Leader election's Role is in the release namespace, grants lease_rules() for the Lease the operator
    is told to use, and the ClusterRole grants no Lease; without election there is no such Role."""
    docs = rendered("--set", "operator.replicas=2")
    (settings,) = [d for d in docs if d["kind"] == "ConfigMap" and "KUBETUNE_OPERATOR_LEASE_NAME" in d.get("data", {})]
    lease = settings["data"]["KUBETUNE_OPERATOR_LEASE_NAME"]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "kubetune" and role["rules"] == lease_rules(lease)
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert "leases" not in json.dumps([d for d in docs if d["kind"] == "ClusterRole"])
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 2 and settings["data"]["KUBETUNE_OPERATOR_LEADER_ELECTION"] == "true"
    unelected = rendered("--set", "operator.leaderElection.enabled=false")
    assert not [d for d in unelected if d["kind"] == "Role"]
    done = helm(
        "template",
        "kubetune",
        str(CHART),
        "--set",
        "operator.replicas=2,operator.leaderElection.enabled=false",
        check=False,
    )
    assert done.returncode != 0 and "operator.leaderElection.enabled" in done.stderr


def test_dashboards_ship_as_labelled_configmaps() -> None:
    """Each dashboard JSON becomes a ConfigMap with Grafana's sidecar label."""
    maps = [d for d in rendered() if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(maps) == len(list((CHART / "dashboards").glob("*.json"))) >= 2
    for cm in maps:
        (body,) = cm["data"].values()
        assert json.loads(body)["title"].startswith("kubetune")


# --- installed for real


@pytest.fixture(scope="module")
def release(control_plane: Any, kubelet: Any, s3: Any, pushgateway: Any, images: Any) -> Iterator[dict[str, Any]]:
    """The chart installed with the images built from this tree: the operator and the jobs run as containers."""
    for ns in ("kubetune", "ml"):
        kubectl(control_plane, "create", "namespace", ns)
        kubectl(control_plane, "label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    metrics, health = processes.free_port(), processes.free_port()
    settings = [
        f"storage.endpoint={s3.endpoint}",
        f"storage.region={s3.region}",
        f"storage.checkpointRoot=s3://{BUCKET}/runs",
        f"storage.outputRoot=s3://{BUCKET}/models",
        f"metrics.pushgateway.url={pushgateway.url}",
        "metrics.pushgateway.groupTtlSeconds=5",
        f"operator.metricsPort={metrics}",
        f"operator.healthPort={health}",
        *[
            f"{part}.image.{key}={value}"
            for part in ("operator", "job")
            for key, value in zip(("repository", "tag"), images[part].rsplit(":", 1), strict=True)
        ],
    ]
    crd_name = crd()["metadata"]["name"]
    if kubectl(control_plane, "get", "crd", crd_name, check=False).returncode == 0:
        # Applied by kubectl earlier in this session (another module's install_crd): the release adopts
        # it, as an admin moving to the chart would, instead of failing on an object it does not own.
        release_of = ("meta.helm.sh/release-name=kubetune", "meta.helm.sh/release-namespace=kubetune")
        kubectl(control_plane, "annotate", "--overwrite", "crd", crd_name, *release_of)
        kubectl(control_plane, "label", "--overwrite", "crd", crd_name, "app.kubernetes.io/managed-by=Helm")
    args = ["install", "kubetune", str(CHART), "-n", "kubetune", "--wait", "--timeout=180s"]
    helm(*args, *[x for s in settings for x in ("--set", s)], plane=control_plane)
    yield {"metrics_port": metrics}
    helm("uninstall", "kubetune", "-n", "kubetune", "--wait", plane=control_plane, check=False)


def operator_pods(plane: Any) -> list[dict[str, Any]]:
    out = kubectl(plane, "get", "pods", "-n", "kubetune", "-l", "app.kubernetes.io/component=operator", "-o", "json")
    return [p for p in json.loads(out.stdout)["items"] if p["status"].get("phase") == "Running"]


def stage_example(s3: Any) -> None:
    s3.create_bucket(BUCKET)
    store = s3.store(BUCKET)
    for local, prefix in (
        (ROOT / "examples/models/all-MiniLM-L6-v2", "models/all-MiniLM-L6-v2"),
        (ROOT / "examples/data/paraphrase", "data/paraphrase"),
    ):
        for path in sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")):
            obstore.put(store, f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_operator_runs_from_the_chart_under_restricted_pod_security(control_plane: Any, release: Any) -> None:
    """The chart's operator pod is admitted in a restricted namespace, runs, and holds its Lease."""
    (pod,) = wait_for("the operator pod", lambda: operator_pods(control_plane))
    assert pod["spec"]["serviceAccountName"] == "kubetune-operator"
    assert pod["status"]["containerStatuses"][0]["containerID"].startswith("podman://")
    # It leads under the chart's Lease Role, named by its pod name (the downward API).
    wait_for(
        "the operator to hold its Lease",
        lambda: (
            ((get(control_plane, "lease", "kubetune-operator", "kubetune") or {}).get("spec") or {}).get(
                "holderIdentity"
            )
            == pod["metadata"]["name"]
        ),
        timeout=60,
    )


def test_offline_examples_run_to_succeeded(control_plane: Any, release: Any, s3: Any, pushgateway: Any) -> None:
    """Each example that needs no Hub is applied with kubectl and succeeds, its model landing in S3."""
    stage_example(s3)
    secret = [
        "--from-literal=AWS_ACCESS_KEY_ID=" + s3.access_key,
        "--from-literal=AWS_SECRET_ACCESS_KEY=" + s3.secret_key,
    ]
    kubectl(control_plane, "create", "secret", "generic", "s3-creds", "-n", "ml", *secret)
    examples = [p for p in sorted((ROOT / "examples").glob("*.yaml")) if "s3://" in p.read_text()]
    assert examples, "no offline cluster example in examples/"
    for path in examples:
        kubectl(control_plane, "apply", "-n", "ml", "-f", str(path))
    for path in examples:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        st = wait_for(
            f"{name} to succeed",
            lambda n=name: (
                ((get(control_plane, "ftj", n, "ml") or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed")
                and get(control_plane, "ftj", n, "ml")["status"]
            ),
            timeout=600,
        )
        assert st["phase"] == "Succeeded", st.get("message")
        (job_pod,) = json.loads(
            kubectl(
                control_plane, "get", "pods", "-n", "ml", "-l", f"kubetune.io/finetunejob={name}", "-o", "json"
            ).stdout
        )["items"]
        assert job_pod["status"]["containerStatuses"][0]["containerID"].startswith("podman://")
        assert st["outputUri"] == f"s3://{BUCKET}/models/ml/{name}/" and st["metrics"]["evalAccuracy"] > 0.6
        stored = {o["path"] for batch in obstore.list(s3.store(BUCKET), prefix=f"models/ml/{name}/") for o in batch}
        assert f"models/ml/{name}/model.safetensors" in stored and f"models/ml/{name}/metrics.json" in stored
        wait_for(
            "the operator to remove the metrics group after its TTL",
            lambda n=name: (get(control_plane, "ftj", n, "ml") or {}).get("status", {}).get("metricsDeleted"),
            timeout=120,
        )
        assert f'finetunejob="{name}"' not in pushgateway.metrics_text()


def test_upgrade_with_changed_values_rolls_the_operator(control_plane: Any, release: Any) -> None:
    """helm upgrade with a changed setting replaces the operator pod."""
    (before,) = wait_for("the operator pod", lambda: operator_pods(control_plane))
    helm(
        "upgrade",
        "kubetune",
        str(CHART),
        "-n",
        "kubetune",
        "--reuse-values",
        "--set",
        "operator.logLevel=DEBUG",
        "--wait",
        "--timeout=180s",
        plane=control_plane,
    )
    after = wait_for(
        "a new operator pod",
        lambda: [p for p in operator_pods(control_plane) if p["metadata"]["uid"] != before["metadata"]["uid"]],
    )
    assert len(after) == 1


def test_uninstall_leaves_only_the_kept_crd(control_plane: Any, release: Any) -> None:
    """helm uninstall removes the operator and its RBAC, never hangs, and keeps the CRD (crds.keep)."""
    helm("uninstall", "kubetune", "-n", "kubetune", "--wait", "--timeout=120s", plane=control_plane)
    assert get(control_plane, "deployment", "kubetune-operator", "kubetune") is None
    assert kubectl(control_plane, "get", "clusterrole", "kubetune-operator", check=False).returncode != 0
    assert kubectl(control_plane, "get", "crd", "finetunejobs.kubetune.io", check=False).returncode == 0
