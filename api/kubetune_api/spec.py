"""The FineTuneJob API (kubetune.io/v1alpha1): the one source of truth for every other part.

This module depends on pydantic alone, so the operator can import it without torch. Field names
are camelCase on the wire (YAML, JSON, the CRD) and snake_case in Python. Every field carries a
description: the CRD schema and the API reference are generated from these models.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

API_VERSION = "kubetune.io/v1alpha1"
KIND = "FineTuneJob"

#: Tasks the job knows; each name has an implementation in kubetune_job.tasks.
TASKS = ("text-classification", "text-generation", "preference")
#: The tasks that fine-tune a causal language model (adapters, chat templates).
LLM_TASKS = ("text-generation", "preference")
#: Preference metrics: the implicit rewards beta * log(policy / reference) of the chosen and rejected answers,
#: the fraction of pairs whose chosen reward is the higher, and the mean margin between the two.
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
#: The evaluation metrics of each task. Metrics the trainer computes itself are TRAINER_METRICS; every other
#: one is a metric module shipped with the job (kubetune_job/metric_modules/<name>/<name>.py).
TASK_METRICS = {
    "text-classification": ("accuracy", "f1", "precision", "recall", "matthews_correlation"),
    "text-generation": ("perplexity", "exact_match"),
    "preference": PREFERENCE_METRICS,
}
TRAINER_METRICS = ("perplexity", *PREFERENCE_METRICS)
EVAL_METRICS = tuple(m for metrics in TASK_METRICS.values() for m in metrics)
#: What an empty spec.metrics means for each task.
DEFAULT_METRICS = {
    "text-classification": ("accuracy", "f1"),
    "text-generation": ("perplexity",),
    "preference": PREFERENCE_METRICS,
}
#: Metrics that score generated text: they need spec.evaluation.generate.
GENERATED_METRICS = ("exact_match",)
#: Tokens per example after truncation when spec.dataset.maxLength is not set.
DEFAULT_MAX_LENGTH = {"text-classification": 128, "text-generation": 1024, "preference": 1024}
#: Preference-tuning methods (spec.preference.method) and the losses of TRL's DPOTrainer (spec.preference.loss);
#: a unit test keeps the losses in step with the TRL release the job installs.
PREFERENCE_METHODS = ("dpo",)
PREFERENCE_LOSSES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
#: Data formats of text-generation datasets (spec.dataset.format).
DATA_FORMATS = ("messages", "prompt-completion", "text")
#: The longest chat template spec.dataset.chatTemplate takes (Jinja; real ones run to a few thousand characters).
MAX_TEMPLATE = 32768
#: URI schemes the job can read and write; a plain path is a local path.
URI_SCHEMES = ("s3://", "file://")

#: The only spec fields that may change after creation (the CRD's CEL rules enforce it).
MUTABLE_FIELDS = ("runPolicy.suspend", "runPolicy.ttlSecondsAfterFinished")

# Bounds. The CRD is generated from these models, so every bound here is also the API server's: a
# manifest `kubetune validate` accepts is one the API server accepts, and the other way round.
# Every string, list and map has an upper bound (the API server needs them to cost the CEL rules).
MAX_STRING, MAX_ITEMS = 1024, 64
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
#: numpy seeds its generator with at most 32 bits; transformers seeds numpy with hyperparameters.seed.
SEED_MAX = 2**32 - 1
MAX_NODES = 64
#: Levels of maps and lists a value of hyperparameters.extra may nest (deepspeed's optimizer.params.betas
#: is four: map, map, map, list). Deeper documents are refused: parsing them recurses without bound.
EXTRA_DEPTH = 4

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL_MAX, DNS_SUBDOMAIN_MAX = 63, 253
#: A label key (Kubernetes' "qualified name"): an optional DNS subdomain prefix and "/", then a name of
#: at most 63 characters. The prefix's length (at most 253) is checked apart (label_key_rule).
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_KEY_MAX = DNS_SUBDOMAIN_MAX + 1 + DNS_LABEL_MAX
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
HUB_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
#: Printable ASCII without spaces: what an image reference or a URL is made of. (The classes are spelt
#: out: \s and \S mean Unicode whitespace to pydantic and ASCII whitespace to the API server.)
NO_SPACE = r"^[!-~]*$"
#: A location must have something in it besides whitespace.
NOT_BLANK = r"[^ \t\n\r\f\v]"
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"


def cel_string(text: str) -> str:
    """A CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def matches(pattern: str, value: str) -> bool:
    """Whether value matches pattern as the API server's regular expressions do ($ is the end of the text)."""
    return re.search(pattern.removesuffix("$") + r"\Z" if pattern.endswith("$") else pattern, value) is not None


#: CEL rules the CRD carries beside the schema; pydantic enforces the same with validators.
ONE_OF_ID_URI: JsonDict = {"rule": "has(self.id) != has(self.uri)", "message": "set exactly one of id or uri"}
URI_SCHEME: JsonDict = {
    "rule": "!self.contains('://') || self.startsWith('s3://') || self.startsWith('file://')",
    "message": "use s3://bucket/prefix/ or a local path",
}
S3_BUCKET: JsonDict = {
    "rule": f"!self.startsWith('s3://') || self.matches({cel_string(S3_URI)})",
    "message": "use s3://<bucket>/<prefix> with a valid bucket name (3-63 of a-z, 0-9, '.', '-')",
}
URI: JsonDict = {"x-kubernetes-validations": [URI_SCHEME, S3_BUCKET], "pattern": NOT_BLANK}


def label_key_rule(var: str) -> str:
    """CEL: the string `var` is a label key (its prefix at most DNS_SUBDOMAIN_MAX characters)."""
    return (
        f"{var}.size() <= {LABEL_KEY_MAX} && {var}.matches({cel_string(LABEL_KEY)}) "
        f"&& {var}.indexOf('/') <= {DNS_SUBDOMAIN_MAX}"
    )


def label_key_problem(key: str) -> str | None:
    """What is wrong with a label key (pydantic's side of label_key_rule), or None."""
    if len(key) > LABEL_KEY_MAX or not matches(LABEL_KEY, key) or key.find("/") > DNS_SUBDOMAIN_MAX:
        return (
            f"{key!r} is not a label key: an optional DNS subdomain prefix of at most {DNS_SUBDOMAIN_MAX} "
            f"characters and '/', then at most {DNS_LABEL_MAX} letters, digits, '-', '_' or '.', starting and "
            "ending with a letter or digit (e.g. example.com/gpu-type)"
        )
    return None


def name_limit(nodes: int) -> int:
    """The longest FineTuneJob name for `nodes` nodes. The Job is Indexed, so the API server checks that its
    last pod's hostname, <name>-<nodes-1>, is a DNS label; with more than one node, the headless Service
    <name>-workers must be a DNS-1035 label too."""
    limit = DNS_LABEL_MAX - 1 - len(str(nodes - 1))
    if nodes > 1:
        limit = min(limit, DNS_LABEL_MAX - len("-workers"))
    return limit


def name_problem(name: str, nodes: int) -> str | None:
    """What is wrong with a FineTuneJob's name for `nodes` nodes (pydantic's side of NAME_RULE), or None."""
    limit = name_limit(nodes)
    if nodes > 1 and (len(name) > limit or not matches(DNS_1035_LABEL, name)):
        return (
            f"with spec.resources.nodes {nodes}, the name must be at most {limit} characters, start with a "
            f"letter and hold only lowercase letters, digits and '-' (the pods are <name>-<index>, the headless "
            "Service <name>-workers)"
        )
    if len(name) > limit or not matches(DNS_LABEL, name):
        return (
            f"the name must be at most {limit} characters of lowercase letters, digits and '-', starting and "
            "ending with a letter or digit (the Job's pods are named <name>-<index>)"
        )
    return None


def _piecewise(var: str, values: list[tuple[int, int]]) -> str:
    """CEL for a step function given as (last argument, value) pairs in increasing order."""
    (upto, value), *rest = values
    return str(value) if not rest else f"({var} <= {upto} ? {value} : {_piecewise(var, rest)})"


def _name_rule() -> JsonDict:
    steps: list[tuple[int, int]] = []
    for count in range(1, MAX_NODES + 1):
        if steps and steps[-1][1] == name_limit(count):
            steps[-1] = (count, steps[-1][1])
        else:
            steps.append((count, name_limit(count)))
    nodes = "self.spec.resources.nodes"
    name = "self.metadata.name"
    rule = (
        f"!has(self.spec) || !has(self.spec.resources) || !has({nodes}) || "
        f"({name}.size() <= {_piecewise(nodes, steps)} && {name}.matches({cel_string(DNS_LABEL)}) "
        f"&& ({nodes} <= 1 || {name}.matches({cel_string(DNS_1035_LABEL)})))"
    )
    return {
        "rule": rule,
        "message": f"metadata.name must be a DNS label of at most {name_limit(1)} characters (lowercase letters, "
        f"digits, '-'; the Job's pods are <name>-<index>); with spec.resources.nodes > 1, at most "
        f"{name_limit(2)} characters starting with a letter (the headless Service is <name>-workers)",
    }


#: The CRD's rule at the root of a FineTuneJob: the Job, its pods and its Service can be named after it.
NAME_RULE = _name_rule()


def free_form(depth: int) -> JsonDict:
    """OpenAPI for a value that is a scalar, or maps and lists nesting at most `depth` levels (of at most
    MAX_ITEMS entries; strings of at most MAX_STRING characters). Structural schemas have no union type
    and CEL cannot see into untyped values, so the schema spells out each level: the last one admits only
    scalars and empty maps and lists."""
    node: JsonDict = {"x-kubernetes-preserve-unknown-fields": True, "maxLength": MAX_STRING}
    if depth == 0:
        return {**node, "maxProperties": 0, "maxItems": 0}
    child = free_form(depth - 1)
    return {**node, "maxProperties": MAX_ITEMS, "maxItems": MAX_ITEMS, "additionalProperties": child, "items": child}


def free_form_value(value: Any, depth: int, path: str) -> Any:
    """value as the API server stores it under free_form(depth), or a field_error naming where it breaks a
    bound. As the server does, it drops the null values of every map the schema reaches (not those of the
    last level's maps, nor nulls in lists). Recurses at most `depth` levels: a document nested a thousand
    levels deep is refused at the first level past the bound, not walked."""
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise field_error(path, f"strings here hold at most {MAX_STRING} characters")
    if not isinstance(value, dict | list):
        return value
    if depth == 0:
        if value:
            raise field_error(
                path,
                f"nested too deeply: a value of hyperparameters.extra is a scalar, or maps and lists nested at most "
                f"{EXTRA_DEPTH} levels (TrainingArguments takes scalars, lists such as report_to, dicts such as "
                "deepspeed)",
            )
        return value
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if v is not None}
    if len(value) > MAX_ITEMS:
        raise field_error(path, f"holds {len(value)} entries; at most {MAX_ITEMS}")
    if isinstance(value, dict):
        return {k: free_form_value(v, depth - 1, f"{path}.{k}") for k, v in value.items()}
    return [free_form_value(v, depth - 1, f"{path}.{i}") for i, v in enumerate(value)]


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error that names a field elsewhere in the manifest (describe_errors shows `field`)."""
    return PydanticCustomError("field", "{message}", {"field": field, "message": message})


def distinct(message: str) -> Callable[[list[str]], list[str]]:
    """A validator for a list that is a set (x-kubernetes-list-type: set in the CRD)."""

    def check(value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(message)
        return value

    return check


Text = Annotated[str, Field(max_length=MAX_STRING)]
LabelValue = Annotated[str, Field(max_length=DNS_LABEL_MAX, pattern=LABEL_VALUE)]


def _label_key(key: str) -> str:
    problem = label_key_problem(key)
    if problem:
        raise ValueError(problem)
    return key


LabelKey = Annotated[
    str,
    Field(
        max_length=LABEL_KEY_MAX,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": label_key_rule("self"),
                    "message": "a label key: an optional DNS subdomain prefix and '/', then a name of at most "
                    f"{DNS_LABEL_MAX} characters",
                }
            ]
        },
    ),
    AfterValidator(_label_key),
]


class Model(BaseModel):
    """Strict where the CRD is strict: no string for a number or a boolean, no number for a string (a float
    field still takes an integer, as the CRD's `number` does). The input is first read as the API server
    reads it (as_the_api_server_reads)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _as_the_api_server_reads(cls, data: Any) -> Any:
        return as_the_api_server_reads(cls, data) if isinstance(data, Mapping) else data


#: The API server takes a float for an integer when it is a whole number of at most 2^53 - 1 (beyond, a
#: float64 no longer holds every integer); kubectl writes YAML's 2.0 as 2 anyway.
WHOLE_FLOAT_MAX = 2**53 - 1


def as_the_api_server_reads(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """A model's input as the API server reads it: a null counts as leaving the field out (the server prunes
    it), except in fields that take null on purpose (dataset.evalSplit); a whole float in an integer field
    is that integer. Mappings that are not dicts (a JSON view) read as dicts, which strict pydantic wants."""
    nullable, integers = _field_kinds(model)
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and not isinstance(value, dict):
            value = dict(value)
        if value is None and key not in nullable:
            continue
        whole = isinstance(value, float) and value.is_integer() and abs(value) <= WHOLE_FLOAT_MAX
        if whole and key in integers and key not in getattr(model, "READ_BY_CEL", ()):
            value = int(value)
        out[key] = value
    return out


def _field_kinds(model: type[BaseModel]) -> tuple[set[str], set[str]]:
    """Names and aliases of the fields that take null, and of those that are integers (or null)."""
    nullable, integers = set(), set()
    for name, info in model.model_fields.items():
        keys = {name, info.alias or name}
        branches = get_args(info.annotation) if get_origin(info.annotation) in (Union, UnionType) else ()
        if type(None) in branches:
            nullable |= keys
        types = [get_args(b)[0] if get_origin(b) is Annotated else b for b in branches or (info.annotation,)]
        if {t for t in types if t is not type(None)} == {int}:
            integers |= keys
    return nullable, integers


Int64 = Annotated[int, Field(le=INT64_MAX)]
Int32 = Annotated[int, Field(le=INT32_MAX)]

Every = Annotated[
    Literal["epoch"] | Annotated[int, Field(gt=0, le=INT64_MAX)],
    Field(description='"epoch", or a number of optimizer steps.'),
]


def _check_uri(value: str | None, field: str) -> str | None:
    """A URI is s3://bucket/prefix, file:///path or a plain local path; other schemes are errors."""
    if value is None:
        return None
    if not matches(NOT_BLANK, value):
        raise ValueError(f"{field} is empty: give s3://bucket/prefix/ or a local path")
    if "://" in value and not value.startswith(URI_SCHEMES):
        raise ValueError(f"unsupported scheme in {value!r}: use s3://bucket/prefix/ or a local path")
    if value.startswith("s3://") and not matches(S3_URI, value):
        raise ValueError(f"{value!r} is not s3://<bucket>/<prefix> with a valid bucket name")
    return value


class ModelSource(Model):
    """Which pretrained model to fine-tune: exactly one of id (Hub) or uri (object storage / local)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [ONE_OF_ID_URI]})

    id: str | None = Field(
        None,
        pattern=HUB_ID,
        max_length=MAX_STRING,
        description="Hugging Face Hub repository id, e.g. bert-base-cased.",
    )
    uri: Text | None = Field(
        None, description="s3://bucket/prefix/ or a local directory holding a saved model.", json_schema_extra=URI
    )
    revision: Text = Field("main", min_length=1, description="Hub revision (branch, tag or commit) when id is set.")
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

    id: str | None = Field(
        None, pattern=HUB_ID, max_length=MAX_STRING, description="Hugging Face Hub dataset id, e.g. nyu-mll/glue."
    )
    config: Text | None = Field(None, description="Hub dataset configuration, e.g. mrpc.")
    uri: Text | None = Field(
        None,
        description="s3://bucket/prefix/ or a local directory with one csv, jsonl or parquet file per split, "
        "named <split>.<ext>.",
        json_schema_extra=URI,
    )
    train_split: Text = Field("train", min_length=1, description="Split (or file name under uri) to train on.")
    eval_split: Text | None = Field(
        "validation", description="Split (or file name under uri) to evaluate on; null to skip evaluation."
    )
    text_fields: list[Text] = Field(
        ["sentence1", "sentence2"],
        min_length=1,
        max_length=2,
        description="One text column, or two for sentence pairs.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    label_field: Text = Field(
        "label", min_length=1, description="Column holding the label (integers or strings); text-classification."
    )
    max_length: int | None = Field(
        None,
        ge=8,
        le=131072,
        description="Tokens per example after truncation; default "
        + ", ".join(f"{n} for {task}" for task, n in DEFAULT_MAX_LENGTH.items())
        + ".",
    )
    format: Literal[DATA_FORMATS] | None = Field(  # type: ignore[valid-type]
        None,
        description="text-generation: messages (a `messages` column of {role, content} turns), prompt-completion "
        "(`prompt` and `completion` columns) or text (a `text` column); read from the columns when omitted.",
    )
    packing: bool = Field(
        False,
        description="text-generation: pack short examples into maxLength sequences (no padding tokens). Each "
        "example's position ids restart at 0, which the attention reads as a boundary; the job checks the model "
        "keeps packed examples apart before training.",
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEMPLATE,
        description="text-generation: a Jinja chat template that replaces the tokenizer's (needed when the "
        "tokenizer has none and the data is messages).",
    )

    _uri = field_validator("uri")(lambda v: _check_uri(v, "dataset.uri"))

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSource:
        if (self.id is None) == (self.uri is None):
            raise ValueError("set exactly one of id (a Hub dataset) or uri (s3:// or a local directory)")
        return self

    _text_fields = field_validator("text_fields")(distinct("textFields must name two different columns"))


class Adapter(Model):
    """A LoRA adapter trained on a frozen base model (PEFT); QLoRA loads the base in 4 bits."""

    method: Literal["lora", "qlora"] = Field(
        "lora",
        description="lora: the base in the training precision; qlora: the base quantized to 4-bit NF4 with bf16 "
        "compute (bitsandbytes; needs a CUDA GPU).",
    )
    rank: int = Field(16, ge=1, le=4096, description="Rank r of the low-rank update matrices.")
    alpha: int | None = Field(
        None, ge=1, le=65536, description="Scaling numerator: updates are scaled by alpha / rank; default 2 x rank."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[Text] = Field(
        ["all-linear"],
        min_length=1,
        max_length=MAX_ITEMS,
        description="Names (or name suffixes) of the modules that get an adapter; all-linear: every linear layer "
        "but the output head.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    init: Literal["continue", "new"] | None = Field(
        None,
        description="When spec.model.uri holds a saved adapter (a FineTuneJob's output): continue training that "
        "adapter (the default; its own rank, alpha and target modules apply), or new: merge it into its base model "
        "and train a new adapter on the result. A model without an adapter always gets a new one.",
    )

    _targets = field_validator("target_modules")(distinct("targetModules lists a module twice"))

    @property
    def scale(self) -> int:
        """alpha, defaulted to 2 x rank."""
        return self.alpha if self.alpha is not None else 2 * self.rank


class Generation(Model):
    """Greedy generation on evaluation prompts, scored by the generated-text metrics (exact_match)."""

    examples: int = Field(64, ge=1, le=100000, description="Evaluation prompts to generate answers for.")
    max_new_tokens: int = Field(128, ge=1, le=32768, description="Longest answer generated.")


class Preference(Model):
    """Preference tuning on (prompt, chosen, rejected) pairs."""

    method: Literal[PREFERENCE_METHODS] = Field(  # type: ignore[valid-type]
        "dpo", description="dpo: Direct Preference Optimization (TRL's DPOTrainer)."
    )
    beta: float = Field(
        0.1,
        gt=0,
        le=100,
        description="How far the model may move from its reference (the starting model): higher stays closer. "
        "For loss ipo, the regularisation parameter tau.",
    )
    loss: Literal[PREFERENCE_LOSSES] = Field(  # type: ignore[valid-type]
        "sigmoid", description="The DPO loss variant, by TRL's name: sigmoid is the original DPO loss."
    )


class Evaluation(Model):
    """How a text-generation model is evaluated beyond its evaluation loss and perplexity."""

    generate: Generation | None = Field(
        None, description="Generate answers for evaluation prompts at each evaluation and score them."
    )


class Hyperparameters(Model):
    """A curated, validated subset of transformers.TrainingArguments."""

    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training split.")
    max_steps: Int64 | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
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
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed for model init, data order and dropout.")
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
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass instead of keeping them: less memory, about a "
        "third more compute. Default: on for text-generation (as TRL does), off for text-classification.",
    )
    eval_every: Every = "epoch"
    extra: dict[str, Any] = Field(
        {},
        max_length=MAX_ITEMS,
        description="Other TrainingArguments keys (snake_case; TRL's SFTConfig keys too for text-generation, DPOConfig "
        "keys for preference), checked "
        "against them before training. "
        f"A value is a scalar, or maps and lists nested at most {EXTRA_DEPTH} levels.",
        json_schema_extra={"additionalProperties": free_form(EXTRA_DEPTH)},
    )

    @field_validator("extra", mode="before")
    @classmethod
    def _bounded_extra(cls, value: Any) -> Any:
        # Before pydantic walks the value: a document nested without bound is refused, not walked.
        if not isinstance(value, dict):
            return value  # pydantic names the type error
        kept = {k: v for k, v in value.items() if v is not None}
        if len(kept) > MAX_ITEMS:
            return kept  # pydantic names the size error
        return {k: free_form_value(v, EXTRA_DEPTH, f"spec.hyperparameters.extra.{k}") for k, v in kept.items()}


class Checkpoints(Model):
    """Where and how often checkpoints are committed; a restarted job resumes from the newest."""

    uri: Text | None = Field(
        None,
        description="s3://bucket/prefix/ or a local directory; default <operator checkpoint root>/<ns>/<name>/.",
        json_schema_extra=URI,
    )
    every: Every = "epoch"
    keep: int = Field(2, ge=1, le=100, description="Committed checkpoints kept in storage; older ones are pruned.")

    _uri = field_validator("uri")(lambda v: _check_uri(v, "checkpoints.uri"))


class Output(Model):
    """Where the final model, tokenizer, metrics.json and model card go."""

    uri: Text | None = Field(None, description="s3://bucket/prefix/ or a local directory.", json_schema_extra=URI)
    merge: bool = Field(
        False,
        description="With spec.adapter: also write the base model with the adapter merged in (safetensors, under "
        "merged/), which plain AutoModelForCausalLM.from_pretrained loads and inference servers serve.",
    )

    _uri = field_validator("uri")(lambda v: _check_uri(v, "output.uri"))


class Storage(Model):
    """The S3-compatible endpoint for s3:// URIs; credentials come from a Secret, never inline."""

    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[!-.0-~]+(/[!-~]*)?$",
        max_length=MAX_STRING,
        description="http(s)://host:port of the S3 API.",
    )
    region: str | None = Field(
        None, pattern=r"^[a-z0-9-]+$", max_length=DNS_LABEL_MAX, description="S3 region, e.g. us-east-1."
    )
    credentials_secret: str | None = Field(
        None,
        pattern=DNS_SUBDOMAIN,
        max_length=DNS_SUBDOMAIN_MAX,
        description="Secret in the same namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )


class Resources(Model):
    """Compute per node."""

    #: Fields a CEL rule reads (NAME_RULE): the API server hands CEL a whole float as a float, which fails
    #: the rule, so these take integers only.
    READ_BY_CEL: ClassVar[tuple[str, ...]] = ("nodes",)

    gpus: int = Field(1, ge=0, le=16, description="GPUs per node; the job runs one process per GPU.")
    nodes: int = Field(
        1, ge=1, le=MAX_NODES, description="Nodes; more than 1 runs torchrun across pods of an Indexed Job."
    )
    cpu: str | None = Field(None, pattern=QUANTITY, max_length=32, description='CPU request per node, e.g. "8".')
    memory: str | None = Field(
        None, pattern=QUANTITY, max_length=32, description='Memory request per node, e.g. "32Gi".'
    )


#: Kubernetes' own rules for a toleration, as CEL (Toleration enforces the same in pydantic).
TOLERATION_RULES: list[JsonDict] = [
    {
        "rule": "has(self.key) || self.operator == 'Exists'",
        "message": "a toleration without a key must use operator Exists (it matches every taint)",
    },
    {
        "rule": "self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "message": "a toleration with operator Exists has no value",
    },
    {
        "rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "message": "tolerationSeconds needs effect NoExecute",
    },
]


class Toleration(Model):
    """A Kubernetes toleration."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": list(TOLERATION_RULES)})

    key: LabelKey | None = Field(None, description="Taint key; empty with operator Exists matches every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: LabelValue | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect.")
    toleration_seconds: Int64 | None = Field(None, ge=0, description="How long a NoExecute taint is tolerated.")

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.key is None and self.operator != "Exists":
            raise ValueError(TOLERATION_RULES[0]["message"])
        if self.operator == "Exists" and self.value:
            raise ValueError(TOLERATION_RULES[1]["message"])
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(TOLERATION_RULES[2]["message"])
        return self


#: How a topology level binds the pods (spec.scheduling.topology.mode), in Kueue's words.
TOPOLOGY_MODES = ("Required", "Preferred")
#: Topology needs Kueue, which reads it (as CEL; Scheduling._topology_needs_a_queue enforces the same).
TOPOLOGY_NEEDS_QUEUE: JsonDict = {
    "rule": "!has(self.topology) || (has(self.queueName) && self.queueName != '')",
    "message": "topology is placed by Kueue's topology-aware scheduling: set scheduling.queueName to a "
    "LocalQueue whose ClusterQueue has a flavor with a topology, or remove topology",
    "fieldPath": ".topology",
}


class Topology(Model):
    """Keep every pod of the job inside one domain of a topology level (one rack, one block), as Kueue's
    topology-aware scheduling places them."""

    level: LabelKey = Field(
        description="The node label that names a level of the ClusterQueue's Kueue Topology, e.g. "
        "example.com/rack: every pod runs on nodes with the same value of it."
    )
    mode: Literal[TOPOLOGY_MODES] = Field(  # type: ignore[valid-type]
        "Required",
        description="Required: the job waits in its queue until one domain of the level has room for every pod. "
        "Preferred: one domain of the level if one has room, else one domain of the next level up, and so on; "
        "the job is admitted even when its pods must spread.",
    )


class Scheduling(Model):
    """Where the pods may run."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [TOPOLOGY_NEEDS_QUEUE]})

    node_selector: dict[str, LabelValue] = Field(
        {},
        max_length=MAX_ITEMS,
        description="Node labels the pods require.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.all(k, {label_key_rule('k')})",
                    "message": "every key must be a label key (e.g. example.com/gpu-type)",
                }
            ]
        },
    )
    tolerations: list[Toleration] = Field([], max_length=MAX_ITEMS, description="Taints the pods tolerate.")
    priority_class_name: str = Field(
        "",
        max_length=DNS_SUBDOMAIN_MAX,
        pattern=f"^({DNS_SUBDOMAIN.strip('^$')})?$",
        description="PriorityClass of the pods.",
    )
    queue_name: LabelValue = Field(
        "", description="Kueue LocalQueue; the Job is created suspended and Kueue admits it."
    )
    topology: Topology | None = Field(
        None,
        description="With queueName: the topology level the pods share (Kueue's topology-aware scheduling). "
        "Omit: the pods go wherever the scheduler puts them.",
    )

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            problem = label_key_problem(key)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _topology_needs_a_queue(self) -> Scheduling:
        if self.topology is not None and not self.queue_name:
            raise field_error("spec.scheduling.topology", str(TOPOLOGY_NEEDS_QUEUE["message"]))
        return self


class RunPolicy(Model):
    """Retries, deadlines and suspension."""

    max_retries: int = Field(3, ge=0, le=100, description="Failures that count; preemption never counts.")
    active_deadline_seconds: Int64 | None = Field(None, gt=0, description="Fail the job after this many seconds.")
    ttl_seconds_after_finished: Int32 | None = Field(None, ge=0, description="Delete the Job this long after it ends.")
    suspend: bool = Field(
        False,
        description="Suspend (true) or resume (false) the job; it resumes from a checkpoint. With queueName, "
        "through Kueue's Workload (needs the operator's Kueue support).",
    )


def _in(var: str, values: tuple[str, ...]) -> str:
    return f"{var} in [{', '.join(cel_string(v) for v in values)}]"


def _task_is(task: str) -> str:
    """CEL: the spec's task is `task` (an absent task is the default, text-classification)."""
    if task == TASKS[0]:
        return f"(!has(self.task) || self.task == {cel_string(task)})"
    return f"(has(self.task) && self.task == {cel_string(task)})"


def _per_task(var: str, allowed: Mapping[str, tuple[str, ...]]) -> str:
    """CEL: `var` is one of the values `allowed` lists for the spec's task."""
    *rest, (_, last) = allowed.items()
    out = _in(var, last)
    for task, values in reversed(rest):
        out = f"({_task_is(task)} ? {_in(var, values)} : {out})"
    return out


#: The rules that tie one spec field to another, as CEL (FineTuneJobSpec._consistent enforces the same).
GENERATION = _task_is("text-generation")
LLM = f"(has(self.task) && {_in('self.task', LLM_TASKS)})"
SPEC_RULES: list[JsonDict] = [
    {
        "rule": f"!has(self.metrics) || self.metrics.all(m, {_per_task('m', TASK_METRICS)})",
        "message": "every metric must be one of the task's: "
        + "; ".join(f"{task}: {', '.join(ms)}" for task, ms in TASK_METRICS.items()),
        "fieldPath": ".metrics",
    },
    {
        "rule": "!has(self.metrics) || !self.metrics.exists(m, "
        f"{_in('m', GENERATED_METRICS)}) || (has(self.evaluation) && has(self.evaluation.generate))",
        "message": f"{', '.join(GENERATED_METRICS)} scores generated answers: set spec.evaluation.generate",
        "fieldPath": ".evaluation.generate",
    },
    {
        "rule": f"{LLM} || !has(self.adapter)",
        "message": f"adapter is a field of the LLM tasks ({', '.join(LLM_TASKS)}): set one of them as task or "
        "remove adapter",
        "fieldPath": ".adapter",
    },
    {
        "rule": f"{GENERATION} || !has(self.evaluation)",
        "message": "evaluation is a text-generation field: set task: text-generation or remove it",
        "fieldPath": ".evaluation",
    },
    {
        "rule": f"{GENERATION} || (!has(self.dataset.format) && (!has(self.dataset.packing) || !self.dataset.packing))",
        "message": "dataset.format and dataset.packing are text-generation fields: set task: text-generation or "
        "remove them",
        "fieldPath": ".dataset",
    },
    {
        "rule": f"{LLM} || !has(self.dataset.chatTemplate)",
        "message": f"dataset.chatTemplate is a field of the LLM tasks ({', '.join(LLM_TASKS)}): set one of them as "
        "task or remove it",
        "fieldPath": ".dataset.chatTemplate",
    },
    {
        "rule": "!has(self.output) || !has(self.output.merge) || !self.output.merge || has(self.adapter)",
        "message": "output.merge merges an adapter into its base model: set spec.adapter, or remove merge (a full "
        "fine-tune's output is already a whole model)",
        "fieldPath": ".output.merge",
    },
    {
        "rule": f"{_task_is('preference')} || !has(self.preference)",
        "message": "preference is the field of task: preference: set that task or remove it",
        "fieldPath": ".preference",
    },
]


class FineTuneJobSpec(Model):
    """What to fine-tune, on what, how, and where the results go."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": list(SPEC_RULES)})

    model: ModelSource = Field(description="The pretrained model to start from.")
    task: Literal[TASKS] = Field("text-classification", description="What the model learns to do.")  # type: ignore[valid-type]
    dataset: DatasetSource = Field(description="The training and evaluation data.")
    adapter: Adapter | None = Field(
        None,
        description="text-generation and preference: train a LoRA/QLoRA adapter instead of every weight (omit: full "
        "fine-tune).",
    )
    evaluation: Evaluation | None = Field(
        None, description="text-generation: evaluation beyond loss and perplexity (generated answers)."
    )
    preference: Preference | None = Field(
        None, description="preference: the method, beta and loss (omit: DPO, beta 0.1, the sigmoid loss)."
    )
    hyperparameters: Hyperparameters = Field(Hyperparameters(), description="Training arguments.")
    metrics: list[Literal[EVAL_METRICS]] = Field(  # type: ignore[valid-type]
        [],
        max_length=len(EVAL_METRICS),
        description="Evaluation metrics; the first one is shown first. Empty: "
        + "; ".join(f"{', '.join(ms)} for {task}" for task, ms in DEFAULT_METRICS.items())
        + ".",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    checkpoints: Checkpoints = Field(Checkpoints(), description="Checkpoint location and cadence.")
    output: Output = Field(Output(), description="Where the final model goes.")
    storage: Storage = Field(Storage(), description="S3-compatible storage settings.")
    hub_token_secret: str | None = Field(
        None,
        pattern=DNS_SUBDOMAIN,
        max_length=DNS_SUBDOMAIN_MAX,
        description="Secret in the same namespace with key HF_TOKEN.",
    )
    resources: Resources = Field(Resources(), description="GPUs, nodes, CPU and memory.")
    scheduling: Scheduling = Field(
        Scheduling(), description="Node selection, tolerations, priority, queue and topology."
    )
    run_policy: RunPolicy = Field(RunPolicy(), description="Retries, deadlines and suspension.")
    image: str = Field(
        "",
        max_length=512,
        pattern=NO_SPACE,
        description="Job image; empty for the operator's default. Admins may restrict prefixes.",
    )

    _metrics = field_validator("metrics")(distinct("metrics lists a metric twice"))

    @model_validator(mode="after")
    def _consistent(self) -> FineTuneJobSpec:
        """SPEC_RULES, each naming the field to fix."""
        generation, llm = self.task == "text-generation", self.task in LLM_TASKS
        wrong = [m for m in self.metrics if m not in TASK_METRICS[self.task]]
        if wrong:
            raise field_error(
                "spec.metrics",
                f"{', '.join(wrong)} not a {self.task} metric; use {', '.join(TASK_METRICS[self.task])}",
            )
        generated = [m for m in self.metrics if m in GENERATED_METRICS]
        if generated and (self.evaluation is None or self.evaluation.generate is None):
            raise field_error("spec.evaluation.generate", f"{', '.join(generated)} scores generated answers: set it")
        ds = self.dataset
        broken = [
            (not llm and self.adapter is not None, "spec.adapter"),
            (not generation and self.evaluation is not None, "spec.evaluation"),
            (not generation and (ds.format is not None or ds.packing), "spec.dataset"),
            (not llm and ds.chat_template is not None, "spec.dataset.chatTemplate"),
            (self.output.merge and self.adapter is None, "spec.output.merge"),
            (self.task != "preference" and self.preference is not None, "spec.preference"),
        ]
        for (wrong_here, field), rule in zip(broken, SPEC_RULES[2:], strict=True):
            if wrong_here:
                raise field_error(field, rule["message"])  # type: ignore[arg-type]
        return self

    @property
    def eval_metrics(self) -> list[str]:
        """The metrics evaluated: spec.metrics, or the task's defaults when it is empty."""
        return list(self.metrics or DEFAULT_METRICS[self.task])

    @property
    def preference_settings(self) -> Preference:
        """spec.preference, or its defaults."""
        return self.preference or Preference()

    @property
    def max_length(self) -> int:
        """Tokens per example after truncation: dataset.maxLength or the task's default."""
        return self.dataset.max_length or DEFAULT_MAX_LENGTH[self.task]


class Metadata(BaseModel):
    """The part of Kubernetes object metadata kubetune reads; the rest is passed through untouched."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(pattern=DNS_LABEL, max_length=DNS_LABEL_MAX, description="FineTuneJob name.")
    namespace: str | None = Field(None, pattern=DNS_LABEL, max_length=DNS_LABEL_MAX)


class FineTuneJob(Model):
    """A FineTuneJob manifest."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: Metadata
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = Field(None, description="Written by the operator; ignored on input.")

    @model_validator(mode="after")
    def _name_fits(self) -> FineTuneJob:
        problem = name_problem(self.metadata.name, self.spec.resources.nodes)
        if problem:
            raise field_error("metadata.name", problem)
        return self


class SpecError(ValueError):
    """A manifest that is not a valid FineTuneJob; `problems` lists one line per field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listed = f" {problems[0]}" if len(problems) == 1 else "".join(f"\n  {p}" for p in problems)
        super().__init__(f"{source}: invalid FineTuneJob:{listed}")


def describe_errors(error: ValidationError, prefix: str = "") -> list[str]:
    """One readable line per problem: the field path in manifest spelling, then what to do."""
    lines = []
    for e in error.errors():
        loc = prefix + ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
        if e["type"] == "field":  # field_error: the check ran on a parent, the field is named in ctx
            loc = e["ctx"]["field"]
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
    except RecursionError:
        # The YAML parser recurses once per level of nesting; a manifest needs a handful.
        raise SpecError(
            str(path),
            [
                "the document nests maps and lists too deeply to read (values of spec.hyperparameters.extra nest "
                f"at most {EXTRA_DEPTH} levels)"
            ],
        ) from None
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
