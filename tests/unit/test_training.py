"""Decisions about training: precision, TrainingArguments mapping, metric names, the task registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_job import spec as spec_module
from kubetune_job.errors import ConfigError
from kubetune_job.spec import parse_manifest
from kubetune_job.tasks import TASKS
from kubetune_job.train import camel_metrics, scores
from kubetune_job.training import arguments, resolve_precision
from tests.unit.test_spec import GOOD


@pytest.mark.parametrize(
    ("cuda", "bf16", "expected"), [(False, False, "fp32"), (True, False, "fp16"), (True, True, "bf16")]
)
def test_auto_precision(cuda: bool, bf16: bool, expected: str) -> None:
    """auto picks bf16 where supported, fp16 on older GPUs, fp32 on CPU."""
    assert resolve_precision("auto", cuda=cuda, bf16_supported=bf16) == expected


def test_half_precision_on_cpu_is_a_config_error() -> None:
    """Asking for bf16 without a GPU names the precision field."""
    with pytest.raises(ConfigError) as e:
        resolve_precision("bf16", cuda=False, bf16_supported=False)
    assert e.value.field == "spec.hyperparameters.precision"


def test_arguments_follow_the_spec(tmp_path: Path) -> None:
    """Steps cadences, batch sizes and warm-up map onto TrainingArguments keys."""
    doc = {**GOOD, "spec": {**GOOD["spec"], "hyperparameters": {"evalEvery": 25, "warmupRatio": 0.1, "batchSize": 4},
                            "checkpoints": {"every": 50, "keep": 3}}}  # fmt: skip
    kw = arguments(parse_manifest(doc).spec, output_dir=tmp_path, precision="fp32", has_eval=True, cuda=False)
    assert (kw["eval_strategy"], kw["eval_steps"], kw["save_strategy"], kw["save_steps"]) == ("steps", 25, "steps", 50)
    assert kw["per_device_eval_batch_size"] == 16 and kw["warmup_steps"] == 0.1 and kw["save_total_limit"] == 3


def test_no_eval_split_means_no_evaluation(tmp_path: Path) -> None:
    """evalSplit null turns evaluation off."""
    doc = {**GOOD, "spec": {**GOOD["spec"], "dataset": {"id": "x", "evalSplit": None}}}
    kw = arguments(parse_manifest(doc).spec, output_dir=tmp_path, precision="fp32", has_eval=False, cuda=False)
    assert kw["eval_strategy"] == "no" and kw["do_eval"] is False


def test_metric_names_use_the_api_spelling() -> None:
    """Trainer names become camelCase, runtimes are dropped."""
    raw = {"eval_f1": 0.9, "eval_matthews_correlation": 0.5, "eval_runtime": 3.0, "train_loss": 0.3, "epoch": 3.0}
    assert camel_metrics(scores(raw)) == {"evalF1": 0.9, "evalMatthewsCorrelation": 0.5, "trainLoss": 0.3}


def test_task_registry_matches_the_api() -> None:
    """Every task the API accepts has an implementation, and no other."""
    assert set(TASKS) == set(spec_module.TASKS)


def test_every_metric_the_api_accepts_is_shipped() -> None:
    """Each metric name has a module beside the job."""
    from kubetune_job.metric_modules import module_path

    for name in spec_module.METRICS:
        assert (module_path(name) / f"{name}.py").is_file()
