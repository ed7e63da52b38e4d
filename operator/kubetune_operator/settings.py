"""The operator's settings, from the environment (KUBETUNE_OPERATOR_*); the chart's values set them."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    """What an admin decides for every FineTuneJob in the cluster."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_OPERATOR_", extra="ignore")

    job_image: str = Field("ghcr.io/kubetune/kubetune-job:0.1.0", description="Default image of the trainer job.")
    allowed_image_prefixes: list[str] = Field(
        [], description="If set, spec.image must start with one of these (JSON list in the environment)."
    )
    gpu_resource_name: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    storage_endpoint: str | None = Field(None, description="Default S3 endpoint when spec.storage.endpoint is unset.")
    storage_region: str | None = Field(None, description="Default S3 region.")
    credentials_secret: str | None = Field(
        None, description="Default Secret name (in each job's namespace) holding AWS_* keys, when the spec names none."
    )
    checkpoint_root: str | None = Field(
        None, description="Default checkpoint location: <root>/<namespace>/<name>/ (e.g. s3://kubetune/runs)."
    )
    output_root: str | None = Field(None, description="Default output location: <root>/<namespace>/<name>/.")
    pushgateway_url: str | None = Field(None, description="Pushgateway the jobs push to and progress is read from.")
    pushgateway_group_ttl_seconds: int = Field(
        3600, ge=0, description="Delete a job's Pushgateway group this long after it ended."
    )
    progress_interval_seconds: float = Field(
        15, gt=0, description="How often a running job's progress is read from the Pushgateway."
    )
    namespaces: list[str] = Field([], description="Namespaces to watch; empty for all (JSON list).")
    workers: int = Field(
        16,
        ge=1,
        le=256,
        description="Handler threads, and with them the API client's kept-alive connections.",
    )
    metrics_port: int = Field(8080, description="Port of the operator's own /metrics.")
    termination_grace_seconds: int = Field(
        60, ge=5, description="Pod grace period: time for the job to commit a checkpoint on SIGTERM."
    )
    kueue: bool = Field(
        False,
        description="Read (and patch spec.active of) Kueue's Workloads of FineTuneJobs that name a queue: status "
        "explains a wait or a preemption in Kueue's words, and runPolicy.suspend works through the Workload "
        "(Kueue unsuspends an admitted Job that anyone else suspends). Needs Kueue's CRDs (the chart's kueue.enabled).",
    )
    run_as_user: int = Field(1000, description="UID the job's pods run as (the job image's user).")
    master_port: int = Field(29500, description="torchrun rendezvous port for multi-node jobs.")
    service_account_dir: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount"),
        description="Where the pod's ServiceAccount token and CA are mounted (in a cluster).",
    )
    health_port: int = Field(
        8081, ge=0, le=65535, description="Port of the operator's /healthz (liveness); 0 for none."
    )
    leader_election: bool = Field(
        False,
        description="Run handlers only while holding the Lease, so that of several replicas exactly one acts "
        "(the chart turns it on).",
    )
    lease_name: str = Field("kubetune-operator", min_length=1, description="Name of the leader-election Lease.")
    lease_namespace: str | None = Field(
        None,
        description="Namespace of the Lease: the operator's own (the chart sets it from the pod); "
        "required with leader_election.",
    )
    lease_duration_seconds: int = Field(
        15,
        ge=2,
        le=3600,
        description="How long a standby waits for a Lease that is no longer renewed: after the leader dies, "
        "a standby takes over within this plus one renew period.",
    )
    lease_renew_seconds: int = Field(
        5,
        ge=1,
        description="How often the leader renews the Lease and a standby looks at it. A leader that could not "
        "renew for lease_duration_seconds - lease_renew_seconds exits, before anyone may take over.",
    )
    pod_name: str | None = Field(
        None, description="The operator pod's name (the chart sets it): its identity in the Lease; else hostname-pid."
    )

    @model_validator(mode="after")
    def _lease_fits(self) -> Self:
        if self.leader_election and not self.lease_namespace:
            raise ValueError(
                "KUBETUNE_OPERATOR_LEASE_NAMESPACE is unset: leader election needs the namespace of its Lease "
                "(the operator's own namespace)"
            )
        if 2 * self.lease_renew_seconds > self.lease_duration_seconds:
            raise ValueError(
                f"KUBETUNE_OPERATOR_LEASE_RENEW_SECONDS ({self.lease_renew_seconds}) must be at most half of "
                f"KUBETUNE_OPERATOR_LEASE_DURATION_SECONDS ({self.lease_duration_seconds}), so that a failed "
                "renewal is retried before the Lease expires"
            )
        return self
