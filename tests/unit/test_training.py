"""Decisions about training: precision, TrainingArguments mapping, metric names, the task registry, and the
run record a checkpoint carries to the next attempt."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from kubetune_api import spec as spec_module
from kubetune_api.spec import parse_manifest
from kubetune_job.arguments import arguments, check_extra, resolve_precision
from kubetune_job.callbacks import LogAtSaves, RunAccount
from kubetune_job.errors import ConfigError
from kubetune_job.summary import Lineage, camel_metrics, scores
from kubetune_job.tasks import IMPLEMENTATIONS
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
    assert set(IMPLEMENTATIONS) == set(spec_module.TASKS)


def test_every_metric_the_api_accepts_is_shipped() -> None:
    """Each metric name but those the trainer computes (perplexity, the preference rewards) has a module beside the
    job."""
    from kubetune_job.metric_modules import module_path

    for name in set(spec_module.EVAL_METRICS) - set(spec_module.TRAINER_METRICS):
        assert (module_path(name) / f"{name}.py").is_file()


def test_the_trainers_own_callback_restore_is_refused() -> None:
    """restore_callback_states_from_checkpoint in extra would swap kubetune's callbacks for new instances."""
    with pytest.raises(ConfigError) as e:
        check_extra({"restore_callback_states_from_checkpoint": True}, {"restore_callback_states_from_checkpoint"})
    assert e.value.field == "spec.hyperparameters.extra.restore_callback_states_from_checkpoint"


def test_every_checkpoint_logs_the_loss() -> None:
    """A step or epoch end that saves also logs, so a checkpoint's history covers each of its steps."""
    saving, plain = TrainerControl(should_save=True), TrainerControl()
    LogAtSaves().on_step_end(None, None, saving)
    LogAtSaves().on_step_end(None, None, plain)
    assert saving.should_log and not plain.should_log
    at_epoch = TrainerControl(should_save=True)
    LogAtSaves().on_epoch_end(None, None, at_epoch)
    assert at_epoch.should_log


def begin(account: RunAccount, state: TrainerState) -> None:
    account.on_train_begin(SimpleNamespace(world_size=2), state, TrainerControl())


def test_the_run_record_travels_in_trainer_state_json(tmp_path: Path) -> None:
    """What attempt 1 records at its checkpoint (JSON, as the Trainer saves it) starts attempt 2's lineage."""
    first = RunAccount()
    state = TrainerState(stateful_callbacks=[first])  # as the Trainer builds it for a fresh run
    begin(first, state)
    first.samples = 80  # per process; 2 processes
    state.global_step = 20
    state.stateful_callbacks["RunAccount"] = first.state()  # what the Trainer's save does
    state.save_to_json(str(tmp_path / "trainer_state.json"))
    saved = state.stateful_callbacks["RunAccount"]["attributes"]

    second = RunAccount()
    begin(second, TrainerState.load_from_json(str(tmp_path / "trainer_state.json")))
    assert first.lineage.attempt == 1
    assert second.lineage == Lineage(attempt=2, start_steps=(0, 20), seconds=saved["train_seconds"], samples=160)


def test_a_checkpoint_from_before_the_record_resumes_and_saves(tmp_path: Path) -> None:
    """Resuming a checkpoint without the record: attempt 2, and the state gets the entry the Trainer's save updates."""
    state = TrainerState(global_step=30)
    state.save_to_json(str(tmp_path / "trainer_state.json"))
    restored = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    account = RunAccount()
    begin(account, restored)
    assert account.lineage == Lineage(attempt=2, start_steps=(30,))
    assert restored.stateful_callbacks["RunAccount"]["attributes"]["attempt"] == 2
