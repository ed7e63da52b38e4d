"""The FineTuneJob API (kubetune.io/v1alpha1): the one source of truth for every other part.

This module depends on pydantic alone, so the operator can import it without torch. Field names
are camelCase on the wire (YAML, JSON, the CRD) and snake_case in Python. Every field carries a
description: the CRD schema and the API reference are generated from these models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

API_VERSION = "kubetune.io/v1alpha1"
KIND = "FineTuneJob"

#: Tasks the job knows; each name has an implementation in kubetune_job.tasks.
TASKS = ("text-classification",)
#: Metric modules shipped with the job (kubetune_job/metric_modules/<name>/<name>.py).
METRICS = ("accuracy", "f1", "precision", "recall", "matthews_correlation")
#: URI schemes the job can read and write; a plain path is a local path.
URI_SCHEMES = ("s3://", "file://")

#: The only spec fields that may change after creation (the CRD's CEL rules enforce it).
MUTABLE_FIELDS = ("runPolicy.suspend", "runPolicy.ttlSecondsAfterFinished")

#: CEL rules the CRD carries beside the schema; pydantic enforces the same with validators.
ONE_OF_ID_URI: JsonDict = {"rule": "has(self.id) != has(self.uri)", "message": "set exactly one of id or uri"}
URI_SCHEME: JsonDict = {
    "rule": "!self.contains('://') || self.startsWith('s3://') || self.startsWith('file://')",
    "message": "use s3://bucket/prefix/ or a local path",
}
URI: JsonDict = {"x-kubernetes-validations": [URI_SCHEME], "maxLength": 1024}

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


Every = Annotated[
    Literal["epoch"] | Annotated[int, Field(gt=0)],
    Field(description='"epoch", or a number of optimizer steps.'),
]


def _check_uri(value: str | None, field: str) -> str | None:
    """A URI is s3://bucket/prefix, file:///path or a plain local path; other schemes are errors."""
    if value is None:
        return None
    if not value.strip():
        raise ValueError(f"{field} is empty: give s3://bucket/prefix/ or a local path")
    if "://" in value and not value.startswith(URI_SCHEMES):
        raise ValueError(f"unsupported scheme in {value!r}: use s3://bucket/prefix/ or a local path")
    if value.startswith("s3://") and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", value):
        raise ValueError(f"{value!r} is not s3://<bucket>/<prefix> with a valid bucket name")
    return value


class ModelSource(Model):
    """Which pretrained model to fine-tune: exactly one of id (Hub) or uri (object storage / local)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [ONE_OF_ID_URI]})

    id: str | None = Field(None, pattern=HUB_ID, description="Hugging Face Hub repository id, e.g. bert-base-cased.")
    uri: str | None = Field(
        None, description="s3://bucket/prefix/ or a local directory holding a saved model.", json_schema_extra=URI
    )
    revision: str = Field("main", min_length=1, description="Hub revision (branch, tag or commit) when id is set.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Explicit opt-in only.")

    _uri = field_validator("uri")(lambda v: _check_uri(v, "model.uri"))

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.id is None) == (self.uri is None):
            raise ValueError("set exactly one of id (a Hub repository) or uri (s3:// or a local path)")
        return self


class DatasetSource(Model):
    """Which data to train on: exactly one of id (Hub) or uri (a directory with one file per split)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [ONE_OF_ID_URI]})

    id: str | None = Field(None, pattern=HUB_ID, description="Hugging Face Hub dataset id, e.g. nyu-mll/glue.")
    config: str | None = Field(None, description="Hub dataset configuration, e.g. mrpc.")
    uri: str | None = Field(
        None,
        description="s3://bucket/prefix/ or a local directory with one csv, jsonl or parquet file per split, "
        "named <split>.<ext>.",
        json_schema_extra=URI,
    )
    train_split: str = Field("train", min_length=1, description="Split (or file name under uri) to train on.")
    eval_split: str | None = Field(
        "validation", description="Split (or file name under uri) to evaluate on; null to skip evaluation."
    )
    text_fields: list[str] = Field(
        ["sentence1", "sentence2"],
        min_length=1,
        max_length=2,
        description="One text column, or two for sentence pairs.",
    )
    label_field: str = Field("label", min_length=1, description="Column holding the label (integers or strings).")
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per example after truncation.")

    _uri = field_validator("uri")(lambda v: _check_uri(v, "dataset.uri"))

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSource:
        if (self.id is None) == (self.uri is None):
            raise ValueError("set exactly one of id (a Hub dataset) or uri (s3:// or a local directory)")
        if len(set(self.text_fields)) != len(self.text_fields):
            raise ValueError("textFields must name two different columns")
        return self


class Hyperparameters(Model):
    """A curated, validated subset of transformers.TrainingArguments."""

    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training split.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(5.0e-5, gt=0, le=1, description="Peak learning rate of AdamW.")
    batch_size: int = Field(
        8,
        ge=1,
        le=4096,
        description="Training examples per device (one process per GPU) per micro-batch; the global batch is "
        "batchSize x gpus x nodes x gradientAccumulationSteps.",
    )
    eval_batch_size: int | None = Field(
        None, ge=1, le=8192, description="Evaluation examples per device; default 4x batchSize."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    seed: int = Field(42, ge=0, description="Seed for model init, data order and dropout.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."
    )
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="Attention kernel: sdpa (PyTorch's fused scaled_dot_product_attention) or eager (the model's "
        "reference code). A model without sdpa support falls back to eager with a warning.",
    )
    pad_to_multiple_of: int | None = Field(
        None,
        ge=1,
        le=128,
        description="Pad each batch to a multiple of this many tokens; default 8 on GPU (tensor-core tiles), "
        "no rounding on CPU.",
    )
    group_by_length: bool = Field(
        False, description="Batch examples of similar length together: less padding, a less random data order."
    )
    compile: bool = Field(
        False,
        description="torch.compile the model: a slower start and a recompile for each new batch shape; "
        "pays off only on long runs with few shapes.",
    )
    eval_every: Every = "epoch"
    extra: dict[str, Any] = Field(
        {},
        description="Other TrainingArguments keys (snake_case), checked against TrainingArguments before training.",
    )


class Checkpoints(Model):
    """Where and how often checkpoints are committed; a restarted job resumes from the newest."""

    uri: str | None = Field(
        None,
        description="s3://bucket/prefix/ or a local directory; default <operator checkpoint root>/<ns>/<name>/.",
        json_schema_extra=URI,
    )
    every: Every = "epoch"
    keep: int = Field(2, ge=1, le=100, description="Committed checkpoints kept in storage; older ones are pruned.")

    _uri = field_validator("uri")(lambda v: _check_uri(v, "checkpoints.uri"))


class Output(Model):
    """Where the final model, tokenizer, metrics.json and model card go."""

    uri: str | None = Field(None, description="s3://bucket/prefix/ or a local directory.", json_schema_extra=URI)

    _uri = field_validator("uri")(lambda v: _check_uri(v, "output.uri"))


class Storage(Model):
    """The S3-compatible endpoint for s3:// URIs; credentials come from a Secret, never inline."""

    endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s/]+(/.*)?$", description="http(s)://host:port of the S3 API."
    )
    region: str | None = Field(None, pattern=r"^[a-z0-9-]+$", description="S3 region, e.g. us-east-1.")
    credentials_secret: str | None = Field(
        None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="Secret in the same namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )


class Resources(Model):
    """Compute per node."""

    gpus: int = Field(1, ge=0, le=16, description="GPUs per node; the job runs one process per GPU.")
    nodes: int = Field(1, ge=1, le=64, description="Nodes; more than 1 runs torchrun across an Indexed Job.")
    cpu: str | None = Field(None, pattern=QUANTITY, description='CPU request per node, e.g. "8".')
    memory: str | None = Field(None, pattern=QUANTITY, description='Memory request per node, e.g. "32Gi".')


class Toleration(Model):
    """A Kubernetes toleration."""

    key: str | None = Field(None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect.")
    toleration_seconds: int | None = Field(None, ge=0, description="How long a NoExecute taint is tolerated.")


class Scheduling(Model):
    """Where the pods may run."""

    node_selector: dict[str, str] = Field({}, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field([], description="Taints the pods tolerate.")
    priority_class_name: str = Field("", description="PriorityClass of the pods.")
    queue_name: str = Field("", description="Kueue LocalQueue; the Job is created suspended and Kueue admits it.")


class RunPolicy(Model):
    """Retries, deadlines and suspension."""

    max_retries: int = Field(3, ge=0, le=100, description="Failures that count; preemption never counts.")
    active_deadline_seconds: int | None = Field(None, gt=0, description="Fail the job after this many seconds.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete the Job this long after it ends.")
    suspend: bool = Field(False, description="Suspend (true) or resume (false) the job; it resumes from a checkpoint.")


class FineTuneJobSpec(Model):
    """What to fine-tune, on what, how, and where the results go."""

    model: ModelSource = Field(description="The pretrained model to start from.")
    task: Literal[TASKS] = Field("text-classification", description="What the model learns to do.")  # type: ignore[valid-type]
    dataset: DatasetSource = Field(description="The training and evaluation data.")
    hyperparameters: Hyperparameters = Field(Hyperparameters(), description="Training arguments.")
    metrics: list[Literal[METRICS]] = Field(  # type: ignore[valid-type]
        ["accuracy", "f1"], max_length=len(METRICS), description="Evaluation metrics; the first one is shown first."
    )
    checkpoints: Checkpoints = Field(Checkpoints(), description="Checkpoint location and cadence.")
    output: Output = Field(Output(), description="Where the final model goes.")
    storage: Storage = Field(Storage(), description="S3-compatible storage settings.")
    hub_token_secret: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253, description="Secret in the same namespace with key HF_TOKEN."
    )
    resources: Resources = Field(Resources(), description="GPUs, nodes, CPU and memory.")
    scheduling: Scheduling = Field(Scheduling(), description="Node selection, tolerations, priority and queue.")
    run_policy: RunPolicy = Field(RunPolicy(), description="Retries, deadlines and suspension.")
    image: str = Field("", description="Job image; empty for the operator's default. Admins may restrict prefixes.")

    @field_validator("metrics")
    @classmethod
    def _unique_metrics(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("metrics lists a metric twice")
        return v


class Metadata(BaseModel):
    """The part of Kubernetes object metadata kubetune reads; the rest is passed through untouched."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="FineTuneJob name.")
    namespace: str | None = Field(None, pattern=DNS_LABEL, max_length=63)


class FineTuneJob(Model):
    """A FineTuneJob manifest."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: Metadata
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = Field(None, description="Written by the operator; ignored on input.")


class SpecError(ValueError):
    """A manifest that is not a valid FineTuneJob; `problems` lists one line per field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid FineTuneJob:\n" + "\n".join(f"  {p}" for p in problems))


def describe_errors(error: ValidationError, prefix: str = "") -> list[str]:
    """One readable line per problem: the field path in manifest spelling, then what to do."""
    lines = []
    for e in error.errors():
        loc = prefix + ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against `kubectl explain ftj.spec` or the API reference"
        elif e["type"] == "literal_error":
            msg = f"{msg} (got {e['input']!r})"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{loc or '<root>'}: {msg}")
    return sorted(set(lines), key=lines.index)


def _is_union_tag(part: object) -> bool:
    # pydantic adds the branch name of a union (e.g. "int", "literal['epoch']") to the location.
    return isinstance(part, str) and (part in {"int", "str", "float"} or part.startswith(("literal[", "constrained-")))


def parse_manifest(data: object, source: str = "<manifest>") -> FineTuneJob:
    """Validate a decoded manifest; raise SpecError naming each bad field."""
    if not isinstance(data, dict):
        raise SpecError(source, ["<root>: a FineTuneJob manifest is a mapping with apiVersion, kind, metadata, spec"])
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, describe_errors(e)) from None


def load_manifest(path: str | Path) -> FineTuneJob:
    """Read and validate a FineTuneJob YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(str(path), [f"cannot read the file: {e.strerror}"]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(str(path), [f"{where}malformed YAML: {problem}"]) from None
    if len(docs) != 1:
        raise SpecError(str(path), [f"expected one YAML document, found {len(docs)}"])
    return parse_manifest(docs[0], str(path))


def parse_spec(data: object, source: str = "spec") -> FineTuneJobSpec:
    """Validate a bare spec (what the operator hands the job)."""
    try:
        return FineTuneJobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, describe_errors(e, "spec.")) from None
