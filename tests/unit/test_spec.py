"""The FineTuneJob API: parsing, defaults, and a message that names the field for every bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_job.spec import SpecError, load_manifest, parse_manifest

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
    assert spec.metrics == ["accuracy", "f1"] and spec.checkpoints.keep == 2 and spec.task == "text-classification"


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
