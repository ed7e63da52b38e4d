"""From the spec to a configured transformers Trainer: arguments, metrics and callbacks.

The decisions (precision, the GPU fast path, which TrainingArguments keys the spec sets, whether an
`extra` key is allowed) are pure functions; building the Trainer is the thin part around them.

The fast path is what the job does by default on a GPU beyond a plain Trainer script: bf16 (or fp16
with loss scaling) autocast, TF32 for what stays in fp32, fused AdamW, batches padded to a multiple of
8 tokens, data loading in worker processes into pinned memory, SDPA attention (tasks.py). None of it
changes results beyond numerical noise; every switch is a spec field or a TrainingArguments key that
`hyperparameters.extra` overrides (README, "Speed").
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any

from kubetune_api.spec import LLM_TASKS, FineTuneJobSpec, Hyperparameters

from .errors import ConfigError

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
    # kubetune resumes its own callbacks' state; the Trainer's restore would replace them with new instances
    "restore_callback_states_from_checkpoint": "checkpoints.uri",
    "push_to_hub": "output.uri",
    "hub_model_id": "output.uri",
    "hub_token": "hubTokenSecret",
    "report_to": "the job's Prometheus metrics",
    "torch_compile": "hyperparameters.compile",
    "train_sampling_strategy": "hyperparameters.groupByLength",
    "activation_checkpointing": "hyperparameters.gradientCheckpointing",
    "gradient_checkpointing": "hyperparameters.gradientCheckpointing",
    # text-generation (TRL's SFTConfig)
    "max_length": "dataset.maxLength",
    "packing": "dataset.packing",
    "packing_strategy": "dataset.packing",
    "padding_free": "dataset.packing",
    "chat_template_path": "dataset.chatTemplate",
    "dataset_text_field": "dataset.format",
    "completion_only_loss": "dataset.format (the loss counts the completion or the assistant's turns)",
    "assistant_only_loss": "dataset.format (the loss counts the completion or the assistant's turns)",
    "model_init_kwargs": "model",
    "trust_remote_code": "model.trustRemoteCode",
    "pad_to_multiple_of": "hyperparameters.padToMultipleOf",
    # preference (TRL's DPOConfig)
    "beta": "preference.beta",
    "loss_type": "preference.loss",
}

#: Data-loading processes per training process on a GPU: collation and pinning overlap the GPU's work.
#: Small and fixed, since a pod's CPU quota is invisible to os.cpu_count() and there is one process per GPU.
GPU_LOADER_WORKERS = 2
#: Batches padded to a multiple of 8 tokens keep tensor-core tiles whole (fp16/bf16 GEMMs want multiples of 8).
GPU_PAD_MULTIPLE = 8


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


def fast_path(*, cuda: bool, tf32: bool, processes: int = 1) -> dict[str, Any]:
    """TrainingArguments the fast path adds on a GPU (pure); on CPU the plain Trainer's defaults stay.

    processes: how many processes train together (torchrun's WORLD_SIZE).
    """
    kwargs: dict[str, Any] = {}
    if processes > 1:
        # A classifier uses every parameter in every step: DDP need not search the autograd graph for
        # unused ones after each backward pass, as the Trainer's default makes it do.
        kwargs["ddp_find_unused_parameters"] = False
    if not cuda:
        kwargs["dataloader_pin_memory"] = False
        if processes > 1:
            # accelerate runs DDP over gloo on CPU only when told to use the CPU; a single process is
            # left to pick its device (a laptop's Apple GPU, say).
            kwargs["use_cpu"] = True
        return kwargs
    kwargs["optim"] = "adamw_torch_fused"  # one kernel per step for all parameters instead of a loop over them
    kwargs["dataloader_num_workers"] = GPU_LOADER_WORKERS
    kwargs["dataloader_persistent_workers"] = True  # no new worker processes for each epoch and each evaluation
    kwargs["dataloader_pin_memory"] = True
    if tf32:  # Ampere and newer; TrainingArguments rejects tf32=True on older GPUs
        kwargs["tf32"] = True
    return kwargs


def pad_multiple(hp: Hyperparameters, *, cuda: bool) -> int | None:
    """What DataCollatorWithPadding pads each batch's length to a multiple of (None: the longest example)."""
    multiple = hp.pad_to_multiple_of if hp.pad_to_multiple_of is not None else (GPU_PAD_MULTIPLE if cuda else 1)
    return multiple if multiple > 1 else None


def global_batch(hp: Hyperparameters, *, processes: int) -> int:
    """Examples per optimizer step across all processes: batchSize is per device (one process per GPU)."""
    return hp.batch_size * hp.gradient_accumulation_steps * processes


def llm_arguments(spec: FineTuneJobSpec, *, cuda: bool) -> dict[str, Any]:
    """The SFTConfig (text-generation) or DPOConfig (preference) keys beyond TrainingArguments' (pure). The
    loss-masking keys of SFT (assistant_only_loss, completion_only_loss) depend on the data and the chat template:
    tasks.py sets them."""
    if spec.task == "preference":
        settings = spec.preference_settings
        return {
            "max_length": spec.max_length,
            "beta": settings.beta,
            "loss_type": [settings.loss],
            "pad_to_multiple_of": pad_multiple(spec.hyperparameters, cuda=cuda),
            # tokens/s: the chosen and the rejected sequence of each pair, padding excluded
            "include_num_input_tokens_seen": "non_padding",
        }
    ds = spec.dataset
    return {
        "max_length": spec.max_length,
        "packing": ds.packing,
        # Packed examples keep their own position ids, which SDPA and flash attention read as boundaries: a
        # token never attends to another example (format text too: each document stays whole up to maxLength).
        "packing_strategy": "bfd",
        "eval_packing": False,  # evaluation loss and perplexity per example, comparable across runs
        "dataset_text_field": "text",
        "pad_to_multiple_of": pad_multiple(spec.hyperparameters, cuda=cuda),
        # tokens/s: the throughput figure of this task; padding does not count
        "include_num_input_tokens_seen": "non_padding",
    }


def gradient_checkpointing(spec: FineTuneJobSpec) -> bool:
    """hyperparameters.gradientCheckpointing; by default on for the LLM tasks (as TRL does: a causal LM's
    activations dominate its memory) and off for text-classification."""
    hp = spec.hyperparameters
    return hp.gradient_checkpointing if hp.gradient_checkpointing is not None else spec.task in LLM_TASKS


def arguments(
    spec: FineTuneJobSpec,
    *,
    output_dir: Path,
    precision: str,
    has_eval: bool,
    cuda: bool,
    tf32: bool = False,
    processes: int = 1,
) -> dict[str, Any]:
    """TrainingArguments keyword arguments for a spec (pure); `extra` overrides the fast path's choices."""
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
        "train_sampling_strategy": "group_by_length" if hp.group_by_length else "random",
        "torch_compile": hp.compile,
        "activation_checkpointing": gradient_checkpointing(spec),
        **fast_path(cuda=cuda, tf32=tf32, processes=processes),
        **(llm_arguments(spec, cuda=cuda) if spec.task in LLM_TASKS else {}),
    }
    kwargs.update(hp.extra)
    if not kwargs.get("dataloader_num_workers"):  # extra turned the workers off: there are none to keep
        kwargs.pop("dataloader_persistent_workers", None)
    return kwargs


def arguments_class(task: str) -> Any:
    """TrainingArguments, or its TRL subclass: SFTConfig for text-generation, DPOConfig for preference."""
    if task == "text-generation":
        from trl import SFTConfig

        return SFTConfig
    if task == "preference":
        from trl import DPOConfig

        return DPOConfig
    from transformers import TrainingArguments

    return TrainingArguments


def check_adapter(spec: FineTuneJobSpec, *, cuda: bool) -> None:
    """QLoRA quantizes the base with bitsandbytes' CUDA kernels: refused before anything loads elsewhere."""
    if spec.adapter is not None and spec.adapter.method == "qlora" and not cuda:
        raise ConfigError(
            "spec.adapter.method",
            "qlora needs a CUDA GPU (bitsandbytes 4-bit NF4 base with bf16 compute); this machine has none: use "
            "method: lora here, or give the job spec.resources.gpus",
        )


def training_arguments(spec: FineTuneJobSpec, *, output_dir: Path, has_eval: bool) -> Any:
    """Validated TrainingArguments (a TRL config for the LLM tasks); called before any model or data is loaded."""
    import torch

    config = arguments_class(spec.task)
    known = {f.name for f in dataclasses.fields(config)}
    check_extra(spec.hyperparameters.extra, known)
    cuda = torch.cuda.is_available()
    check_adapter(spec, cuda=cuda)
    precision = resolve_precision(
        spec.hyperparameters.precision, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported()
    )
    tf32 = cuda and torch.cuda.get_device_capability()[0] >= 8
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs = arguments(
        spec, output_dir=output_dir, precision=precision, has_eval=has_eval, cuda=cuda, tf32=tf32, processes=processes
    )
    if "activation_checkpointing" not in known:  # its name before transformers 5.2x
        kwargs["gradient_checkpointing"] = kwargs.pop("activation_checkpointing")
    try:
        return config(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError("spec.hyperparameters", f"{config.__name__} rejected the settings: {e}") from None


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
