"""The operator's least-privilege RBAC rules: what the chart's (Cluster)Role grants, and all the
operator needs. No Secrets (pods read them through secretKeyRef), no wildcards. A test compares
the chart's Role with these rules, and the operator's own tests run under exactly these."""

from __future__ import annotations

from typing import Any

RULES: list[dict[str, Any]] = [
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"], "verbs": ["patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
]

#: With Kueue support on (the chart's kueue.enabled): read the Workloads Kueue keeps for the Jobs, to explain
#: a wait or a preemption, and patch one's spec.active, the only way to stop a Job that Kueue admitted
#: (Kueue unsuspends an admitted Job that anyone else suspends).
KUEUE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list", "watch", "patch"]},
]


def rules(*, kueue: bool) -> list[dict[str, Any]]:
    """The operator's rules, with Kueue's when its support is on."""
    return RULES + (KUEUE_RULES if kueue else [])


def lease_rules(name: str) -> list[dict[str, Any]]:
    """Leader election's rules, granted by a Role in the operator's own namespace only (never the
    ClusterRole): read and renew its one Lease, and create it (a create cannot be limited by name)."""
    group = {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"]}
    return [{**group, "verbs": ["create"]}, {**group, "resourceNames": [name], "verbs": ["get", "update"]}]
