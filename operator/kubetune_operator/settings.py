"""The operator's settings, from the environment (KUBETUNE_OPERATOR_*); the chart's values set them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
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
    run_as_user: int = Field(1000, description="UID the job's pods run as (the job image's user).")
    master_port: int = Field(29500, description="torchrun rendezvous port for multi-node jobs.")
    service_account_dir: Path = Field(
        Path("/var/run/secrets/kubernetes.io/serviceaccount"),
        description="Where the pod's ServiceAccount token and CA are mounted (in a cluster).",
    )
