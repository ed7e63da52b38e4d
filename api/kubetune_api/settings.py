"""The job's settings: everything it reads from its environment (KUBETUNE_*), nothing from the API, and
the one rendering of them into a pod's environment (the operator's Job manifest uses it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class JobSettings(BaseSettings):
    """How a pod (or `kubetune run`) tells the job what to do and where to report."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", extra="ignore")

    spec: str | None = Field(None, description="The FineTuneJob spec as JSON (the operator sets this).")
    spec_file: Path | None = Field(None, description="A file with the spec or a whole manifest (YAML or JSON).")
    name: str = Field("local", description="The FineTuneJob's name: labels metrics and the model card.")
    namespace: str = Field("default", description="The FineTuneJob's namespace.")
    work_dir: Path = Field(Path("/tmp/kubetune"), description="Scratch space: staging, downloads, tokenized data.")
    summary_path: Path = Field(
        Path("/dev/termination-log"), description="Where the JSON summary goes (the pod's termination message)."
    )
    preemption_grace_seconds: float = Field(
        25.0,
        gt=0,
        description="After SIGTERM, seconds to save and commit a checkpoint before exiting with code 21; keep it "
        "below the pod's terminationGracePeriodSeconds.",
    )
    storage_retry_seconds: float = Field(
        120.0,
        gt=0,
        description="How long one storage request is retried (throttling, timeouts, 5xx, dropped connections) "
        "before the job exits with the retryable storage code 20.",
    )
    pushgateway_url: str | None = Field(None, description="Prometheus Pushgateway for training metrics.")
    push_interval_seconds: float = Field(
        10.0, gt=0, description="Seconds between metric pushes; evaluations, checkpoints and the end push at once."
    )
    push_timeout_seconds: float = Field(
        3.0, gt=0, description="Timeout of one metrics push (pushes run on a background thread, never in training)."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    nproc_per_node: int = Field(
        1, ge=1, le=64, description="Training processes in this pod, one per GPU; more than 1 runs them under torchrun."
    )
    nnodes: int = Field(1, ge=1, le=64, description="Pods (nodes) training together; more than 1 needs master_addr.")
    node_rank: int = Field(0, ge=0, description="This pod's index among the nodes: its Indexed Job completion index.")
    master_addr: str | None = Field(None, description="Host of node 0, where torchrun's rendezvous runs (multi-node).")
    master_port: int = Field(29500, ge=1, le=65535, description="Port of the rendezvous on master_addr (multi-node).")


#: Settings a pod always states, at their defaults, so that the pod spec itself says where the job
#: writes (its scratch space and its termination message).
STATED = ("work_dir", "summary_path")


def env_name(field: str) -> str:
    """The environment variable that sets a JobSettings field."""
    if field not in JobSettings.model_fields:
        raise KeyError(f"JobSettings has no field {field!r}")
    return f"{JobSettings.model_config.get('env_prefix', '')}{field}".upper()


def pod_env(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The env entries of a pod whose job runs with `values` (JobSettings field -> value), in the
    model's field order. A value is a plain value or an EnvVarSource dict ({"fieldRef": ...}), which the
    kubelet resolves in the pod; None leaves the field to its default. STATED fields appear at their
    defaults unless given."""
    unknown = set(values) - set(JobSettings.model_fields)
    if unknown:
        raise KeyError(f"not JobSettings fields: {sorted(unknown)}")
    env: list[dict[str, Any]] = []
    for field, info in JobSettings.model_fields.items():
        value = values.get(field, info.default if field in STATED else None)
        if value is None:
            continue
        if isinstance(value, Mapping):
            env.append({"name": env_name(field), "valueFrom": dict(value)})
        else:
            env.append({"name": env_name(field), "value": str(value)})
    return env


# Default locations. A FineTuneJob whose spec names no checkpoints.uri (or output.uri) gets one under the
# operator's root for it, per namespace and name; without such a root, or run by `kubetune run`, its
# checkpoints stay under a local directory, which does not outlive the machine.


def run_location(root: str, *, namespace: str, name: str) -> str:
    """The default location of a FineTuneJob's checkpoints or model under an operator root (a folder URI)."""
    return f"{root.rstrip('/')}/{namespace}/{name}/"


def local_checkpoints(base: Path) -> str:
    """The default checkpoint location under a local directory (the job's work_dir, a `kubetune run` run)."""
    return str(base / "checkpoints")
