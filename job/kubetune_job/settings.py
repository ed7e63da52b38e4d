"""The job's settings: everything it reads from its environment (KUBETUNE_*), nothing from the API."""

from __future__ import annotations

from pathlib import Path

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
    pushgateway_url: str | None = Field(None, description="Prometheus Pushgateway for training metrics.")
    log_level: str = Field("INFO", description="Python logging level.")
