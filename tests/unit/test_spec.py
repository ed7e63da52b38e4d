"""The FineTuneJob API: parsing, defaults, and a message that names the field for every bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import spec as api
from kubetune_api.spec import SpecError, load_manifest, parse_manifest

EXAMPLES = Path(__file__).parents[2] / "examples"

GOOD: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "bert-mrpc"},
    "spec": {
        "model": {"id": "bert-base-cased"},
        "dataset": {"id": "nyu-mll/glue", "config": "mrpc"},
    },
}


def problems(patch: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> list[str]:
    doc = copy.deepcopy(GOOD)
    for dotted, value in (patch or {}).items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    for dotted in drop:
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        del node[leaf]
    with pytest.raises(SpecError) as e:
        parse_manifest(doc)
    return e.value.problems


def test_minimal_manifest_gets_the_documented_defaults() -> None:
    """A manifest with only model and dataset is valid and gets api.md's defaults."""
    spec = parse_manifest(GOOD).spec
    assert spec.hyperparameters.epochs == 3 and spec.hyperparameters.batch_size == 8
    assert spec.metrics == [] and spec.eval_metrics == ["accuracy", "f1"] and spec.task == "text-classification"
    assert spec.checkpoints.keep == 2 and spec.max_length == 128 and spec.adapter is None


def test_every_example_manifest_is_valid() -> None:
    """Each manifest in examples/ parses."""
    for path in EXAMPLES.glob("*.yaml"):
        assert load_manifest(path).kind == "FineTuneJob"


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    """Malformed YAML is reported with its position."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kubetune.io/v1alpha1\nspec:\n  model: [unclosed\n")
    with pytest.raises(SpecError) as e:
        load_manifest(bad)
    assert "malformed YAML" in e.value.problems[0] and "line" in e.value.problems[0]


def test_unknown_field_is_named() -> None:
    """A misspelt field is an error naming its path."""
    msgs = problems({"spec.hyperparameters.learningrate": 1e-4})
    assert any(m.startswith("spec.hyperparameters.learningrate: unknown field") for m in msgs)


def test_model_with_both_id_and_uri() -> None:
    """model.id and model.uri together are rejected."""
    (msg,) = problems({"spec.model.uri": "s3://bucket/models/x/"})
    assert msg.startswith("spec.model:") and "exactly one of id" in msg


def test_dataset_with_neither_id_nor_uri() -> None:
    """A dataset without id or uri is rejected."""
    (msg,) = problems(drop=("spec.dataset.id",))
    assert msg.startswith("spec.dataset:") and "exactly one of id" in msg


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_must_be_positive(epochs: int) -> None:
    """epochs <= 0 is rejected."""
    (msg,) = problems({"spec.hyperparameters.epochs": epochs})
    assert msg.startswith("spec.hyperparameters.epochs:") and "greater than 0" in msg


def test_learning_rate_must_be_positive() -> None:
    """learningRate <= 0 is rejected."""
    (msg,) = problems({"spec.hyperparameters.learningRate": 0})
    assert msg.startswith("spec.hyperparameters.learningRate:")


def test_unknown_precision_lists_the_choices() -> None:
    """An unknown precision names the allowed values."""
    (msg,) = problems({"spec.hyperparameters.precision": "fp8"})
    assert msg.startswith("spec.hyperparameters.precision:") and "'bf16'" in msg and "'fp8'" in msg


def test_unknown_metric_lists_the_shipped_ones() -> None:
    """A metric the job does not ship is rejected with the list of those it does."""
    (msg,) = problems({"spec.metrics": ["accuracy", "bleu"]})
    assert msg.startswith("spec.metrics.1:") and "'matthews_correlation'" in msg


def test_eval_every_takes_epoch_or_steps() -> None:
    """evalEvery is 'epoch' or a positive step count; anything else names the field."""
    assert parse_manifest({**GOOD, "spec": {**GOOD["spec"], "hyperparameters": {"evalEvery": 50}}})
    msgs = problems({"spec.hyperparameters.evalEvery": "hourly"})
    assert all(m.startswith("spec.hyperparameters.evalEvery:") for m in msgs)


def test_uri_scheme_must_be_s3_or_local() -> None:
    """An unsupported URI scheme is rejected."""
    (msg,) = problems({"spec.output.uri": "gs://bucket/x"})
    assert msg.startswith("spec.output.uri:") and "s3://" in msg


def test_manifest_must_be_a_finetunejob() -> None:
    """Another kind is rejected by name."""
    msgs = problems({"kind": "Job"})
    assert any(m.startswith("kind:") for m in msgs)


def test_yaml_round_trip_uses_camel_case(tmp_path: Path) -> None:
    """Dumping a parsed manifest gives the wire spelling back."""
    job = parse_manifest(GOOD)
    dumped = job.model_dump(by_alias=True, exclude_none=True)
    assert "learningRate" in dumped["spec"]["hyperparameters"] and dumped["apiVersion"] == "kubetune.io/v1alpha1"
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(dumped))
    assert load_manifest(tmp_path / "x.yaml") == job


# --- the same answer as the API server (issue: the CLI and the CRD disagreed on 53 of 375 manifests) ---


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spec.hyperparameters.batchSize", True),
        ("spec.runPolicy.suspend", "true"),
        ("spec.checkpoints.every", "5"),
        ("spec.hyperparameters.seed", 2**63),
        ("spec.hyperparameters.maxSteps", 2**63),
        ("spec.runPolicy.ttlSecondsAfterFinished", 2**31),
        ("spec.dataset.config", "c" * 1025),
        ("spec.model.revision", 7),
        ("spec.hyperparameters.batchSize", 2.5),
        ("spec.resources.nodes", 2.0),
    ],
)
def test_what_the_crd_refuses_is_refused_naming_the_field(field: str, value: Any) -> None:
    """No coercion where the CRD is strict, and the CRD's bounds: each is an error naming the field."""
    msgs = problems({field: value})
    assert msgs and all(m.startswith(field + ":") for m in msgs), msgs


def test_a_whole_float_is_an_integer_as_the_api_server_reads_it() -> None:
    """batchSize 2.0 is 2 (kubectl sends YAML's 2.0 as 2); a float field takes an integer."""
    doc = copy.deepcopy(GOOD)
    doc["spec"]["hyperparameters"] = {"batchSize": 2.0, "epochs": 2}
    hp = parse_manifest(doc).spec.hyperparameters
    assert hp.batch_size == 2 and isinstance(hp.batch_size, int) and hp.epochs == 2.0


def test_null_is_left_out_except_where_null_means_something() -> None:
    """A null sub-object or field takes its default, as the API server prunes it; evalSplit: null skips evaluation."""
    doc = copy.deepcopy(GOOD)
    doc["spec"].update(hyperparameters=None, checkpoints={"keep": None}, metrics=None)
    doc["spec"]["dataset"] = {**doc["spec"]["dataset"], "evalSplit": None}
    spec = parse_manifest(doc).spec
    assert (
        spec.hyperparameters.batch_size == 8 and spec.checkpoints.keep == 2 and spec.eval_metrics == ["accuracy", "f1"]
    )
    assert spec.dataset.eval_split is None
    (msg,) = problems({"spec.model": None})
    assert msg == "spec.model: required field is missing"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spec.metrics", ["f1", "f1"]),
        ("spec.dataset.textFields", ["a", "a"]),
        ("spec.output.uri", "s3://Bad_Bucket/x/"),
        ("spec.output.uri", "s3://ab/x/"),
        ("spec.checkpoints.uri", " \t"),
        ("spec.image", "registry.test/job: latest"),
        ("spec.scheduling.priorityClassName", "Not_A_Name"),
        ("spec.scheduling.queueName", "team a"),
        ("spec.scheduling.queueName", "q" * 64),
        ("spec.scheduling.nodeSelector", {"bad key": "x"}),
        ("spec.scheduling.nodeSelector", {f"{'p' * 254}/gpu": "x"}),
        ("spec.scheduling.nodeSelector", {"gpu": "-x"}),
        ("spec.scheduling.tolerations", [{"operator": "Equal", "value": "x"}]),
        ("spec.scheduling.tolerations", [{"key": "k", "operator": "Exists", "value": "x"}]),
        ("spec.scheduling.tolerations", [{"key": "k", "tolerationSeconds": 5, "effect": "NoSchedule"}]),
        ("spec.scheduling.tolerations", [{"key": "k/a/b"}]),
    ],
)
def test_what_the_job_and_pods_would_refuse_is_refused(field: str, value: Any) -> None:
    """Values the Job, pod, Service or labels cannot carry are refused naming the field."""
    msgs = problems({field: value})
    assert msgs and all(m.startswith(field) for m in msgs), msgs


def test_label_keys_and_values_at_their_limits_are_valid() -> None:
    """A 253-character prefix, a 63-character name and value, an empty value: what Kubernetes allows."""
    prefix = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    key = f"{prefix}/{'N' * 62}z"
    doc = copy.deepcopy(GOOD)
    doc["spec"]["scheduling"] = {
        "nodeSelector": {key: "v" * 63, "gpu": ""},
        "tolerations": [{"operator": "Exists"}, {"key": key, "effect": "NoExecute", "tolerationSeconds": 0}],
        "priorityClassName": prefix,
        "queueName": "Q_q.q-1",
    }
    assert parse_manifest(doc).spec.scheduling.node_selector[key] == "v" * 63


def test_name_limit_follows_the_node_count() -> None:
    """<name>-<nodes-1> is a DNS label (61 for one node); with more, <name>-workers is too (55)."""
    assert [api.name_limit(n) for n in (1, 2, 10, 11, 64)] == [61, 55, 55, 55, 55]
    assert parse_manifest({**GOOD, "metadata": {"name": "a" * 61}})
    (msg,) = problems({"metadata.name": "a" * 62})
    assert msg.startswith("metadata.name:") and "at most 61" in msg
    (msg,) = problems({"metadata.name": "a" * 56, "spec.resources.nodes": 2})
    assert msg.startswith("metadata.name:") and "at most 55" in msg
    (msg,) = problems({"metadata.name": "7a", "spec.resources.nodes": 2})
    assert msg.startswith("metadata.name:") and "start with a letter" in msg


def test_the_crd_name_rule_is_generated_from_the_limit() -> None:
    """The CEL rule carries name_limit's numbers, so the server and the CLI cut at the same length."""
    rule = api.NAME_RULE["rule"]
    assert f"<= 1 ? {api.name_limit(1)} : {api.name_limit(2)})" in rule and "self.metadata.name" in rule


def nested(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def test_extra_nests_at_most_four_levels() -> None:
    """deepspeed's shape (map, map, map, list) is valid; one level more is refused naming where."""
    deepspeed = {"optimizer": {"params": {"betas": [0.9, 0.999]}}, "zero_optimization": {"stage": 2}}
    doc = copy.deepcopy(GOOD)
    doc["spec"]["hyperparameters"] = {"extra": {"deepspeed": deepspeed, "report_to": ["none"], "gone": None}}
    assert parse_manifest(doc).spec.hyperparameters.extra == {"deepspeed": deepspeed, "report_to": ["none"]}
    (msg,) = problems({"spec.hyperparameters.extra": {"x": nested(5)}})
    assert msg.startswith("spec.hyperparameters.extra.x.a.a.a.a: nested too deeply"), msg


def test_extra_nested_a_thousand_levels_is_refused_without_recursing() -> None:
    """The issue's manifest: refused with one message, no RecursionError (it is never walked)."""
    (msg,) = problems({"spec.hyperparameters.extra": {"deepspeed": nested(100_000)}})
    assert msg.startswith("spec.hyperparameters.extra.deepspeed.a.a.a.a: nested too deeply")


def test_deeply_nested_yaml_is_one_clean_error(tmp_path: Path) -> None:
    """YAML too deep for the parser to read is one line naming the file, not a traceback."""
    path = tmp_path / "deep.yaml"
    path.write_text(yaml.safe_dump(GOOD) + "extra: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(SpecError) as e:
        load_manifest(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: invalid FineTuneJob: the document nests")
