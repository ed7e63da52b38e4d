"""From the spec to a configured transformers Trainer: arguments, metrics and callbacks.

The decisions (precision, which TrainingArguments keys the spec sets, whether an `extra` key is
allowed) are pure functions; building the Trainer is the thin part around them.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .spec import FineTuneJobSpec

log = logging.getLogger(__name__)

#: TrainingArguments keys kubetune sets itself, and the spec field to use instead.
MANAGED = {
    "output_dir": "checkpoints.uri",
    "num_train_epochs": "hyperparameters.epochs",
    "max_steps": "hyperparameters.maxSteps",
    "learning_rate": "hyperparameters.learningRate",
    "per_device_train_batch_size": "hyperparameters.batchSize",
    "per_device_eval_batch_size": "hyperparameters.evalBatchSize",
    "gradient_accumulation_steps": "hyperparameters.gradientAccumulationSteps",
    "warmup_steps": "hyperparameters.warmupRatio",
    "weight_decay": "hyperparameters.weightDecay",
    "seed": "hyperparameters.seed",
    "bf16": "hyperparameters.precision",
    "fp16": "hyperparameters.precision",
    "eval_strategy": "hyperparameters.evalEvery",
    "eval_steps": "hyperparameters.evalEvery",
    "do_eval": "dataset.evalSplit",
    "save_strategy": "checkpoints.every",
    "save_steps": "checkpoints.every",
    "save_total_limit": "checkpoints.keep",
    "resume_from_checkpoint": "checkpoints.uri",
    "push_to_hub": "output.uri",
    "hub_model_id": "output.uri",
    "hub_token": "hubTokenSecret",
    "report_to": "the job's Prometheus metrics",
}


def resolve_precision(requested: str, *, cuda: bool, bf16_supported: bool) -> str:
    """auto: bf16 where the GPU has it, fp16 (with loss scaling) on older GPUs, fp32 on CPU."""
    if requested != "auto":
        if requested in ("bf16", "fp16") and not cuda:
            raise ConfigError("spec.hyperparameters.precision", f"{requested} needs a GPU; use auto or fp32 on CPU")
        if requested == "bf16" and not bf16_supported:
            raise ConfigError("spec.hyperparameters.precision", "this GPU has no bf16; use auto or fp16")
        return requested
    if not cuda:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def check_extra(extra: dict[str, Any], known: set[str]) -> None:
    """Every `extra` key is a TrainingArguments field that the spec does not already set."""
    for key in extra:
        field = f"spec.hyperparameters.extra.{key}"
        if key in MANAGED:
            raise ConfigError(field, f"kubetune sets {key} itself; use spec.{MANAGED[key]} instead")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(field, f"not a TrainingArguments field{hint}")


def every(value: str | int) -> dict[str, Any]:
    """'epoch' or N steps, as a TrainingArguments (strategy, steps) pair."""
    return {"strategy": "epoch", "steps": None} if value == "epoch" else {"strategy": "steps", "steps": int(value)}


def arguments(spec: FineTuneJobSpec, *, output_dir: Path, precision: str, has_eval: bool, cuda: bool) -> dict[str, Any]:
    """TrainingArguments keyword arguments for a spec (pure)."""
    hp = spec.hyperparameters
    evals, saves = every(hp.eval_every), every(spec.checkpoints.every)
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": hp.epochs,
        "max_steps": hp.max_steps or -1,
        "learning_rate": hp.learning_rate,
        "per_device_train_batch_size": hp.batch_size,
        "per_device_eval_batch_size": hp.eval_batch_size or 4 * hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "warmup_steps": hp.warmup_ratio,
        "weight_decay": hp.weight_decay,
        "seed": hp.seed,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "eval_strategy": evals["strategy"] if has_eval else "no",
        "eval_steps": evals["steps"] if has_eval else None,
        "do_eval": has_eval,
        "save_strategy": saves["strategy"],
        "save_steps": saves["steps"] or 500,
        "save_total_limit": spec.checkpoints.keep,
        "logging_strategy": "steps",
        "logging_steps": 10,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_pin_memory": cuda,
    }
    kwargs.update(hp.extra)
    return kwargs


def training_arguments(spec: FineTuneJobSpec, *, output_dir: Path, has_eval: bool) -> Any:
    """Validated TrainingArguments; called before any model or data is loaded."""
    import torch
    from transformers import TrainingArguments

    check_extra(spec.hyperparameters.extra, {f.name for f in dataclasses.fields(TrainingArguments)})
    cuda = torch.cuda.is_available()
    precision = resolve_precision(
        spec.hyperparameters.precision, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported()
    )
    kwargs = arguments(spec, output_dir=output_dir, precision=precision, has_eval=has_eval, cuda=cuda)
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError("spec.hyperparameters", f"TrainingArguments rejected the settings: {e}") from None


def metric_function(names: list[str], num_labels: int, predictions: Any) -> Any:
    """compute_metrics for the Trainer, with the shipped metric modules (no network)."""
    import evaluate

    from .metric_modules import module_path

    modules = {name: evaluate.load(str(module_path(name))) for name in names}
    average = "binary" if num_labels == 2 else "macro"

    def compute(eval_pred: Any) -> dict[str, float]:
        preds = predictions(eval_pred.predictions)
        out: dict[str, float] = {}
        for module in modules.values():
            out.update(module.compute(predictions=preds, references=eval_pred.label_ids, average=average))
        return out

    return compute
