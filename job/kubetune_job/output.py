"""The final artefacts: model (or adapter), tokenizer, label mapping, metrics.json, a model card and what
the task adds (a text-generation model's generation config, the merged model)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_api.spec import FineTuneJobSpec

from .errors import StorageUnavailable
from .storage import Storage, upload_dir

CARD = """---
library_name: transformers
base_model: {base}
tags: [kubetune, {task}]
---

# {name}

Fine-tuned by kubetune from `{base}` for {task} on `{dataset}`.

| | |
|---|---|
{details}

## Results

| metric | value |
|---|---|
{results}

## Training

| setting | value |
|---|---|
{settings}
"""


def model_card(
    *, name: str, spec: FineTuneJobSpec, base: str, details: dict[str, str], metrics: dict[str, float], steps: int
) -> str:
    """A short Hugging Face model card (README.md) with the results and settings of the run. base: the base model
    as the spec names it (or, for a saved adapter the spec starts from, as its config names it)."""
    hp = spec.hyperparameters
    ds = spec.dataset
    dataset = ds.id + (f" ({ds.config})" if ds.config else "") if ds.id else str(ds.uri)
    settings = {
        "epochs": hp.epochs,
        "steps": steps,
        "learning rate": hp.learning_rate,
        "batch size per device": hp.batch_size,
        "gradient accumulation": hp.gradient_accumulation_steps,
        "precision": hp.precision,
        "seed": hp.seed,
        "max length": spec.max_length,
    }
    return CARD.format(
        name=name,
        base=base,
        task=spec.task,
        dataset=dataset,
        details="\n".join(f"| {k} | {v} |" for k, v in details.items()),
        results="\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) or "| (no evaluation) | |",
        settings="\n".join(f"| {k} | {v} |" for k, v in settings.items()),
    )


def save(
    trainer: Any,
    tokenizer: Any,
    storage: Storage,
    *,
    card: str,
    metrics: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write everything to a scratch directory, upload it, and check every file arrived whole.

    extra: writes the task's own files into the directory, after the model and the tokenizer."""
    with tempfile.TemporaryDirectory(prefix="kubetune-output-") as tmp:
        out = Path(tmp)
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        if extra is not None:
            extra(out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (out / "README.md").write_text(card)
        sent = upload_dir(storage, out, "")
    present = {o.key: o.size for o in storage.list("")}
    missing = [key for key, size, _ in sent if present.get(key) != size]
    if missing:
        raise StorageUnavailable("output.uri", f"upload to {storage.uri} incomplete: {', '.join(missing[:3])}")
