"""The task registry: what a task loads, how it prepares data and how it scores predictions.

A new task is one class with the same four methods, registered in IMPLEMENTATIONS under a name
that spec.TASKS also lists (a unit test keeps the two in step).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from kubetune_api.spec import DatasetSource

from .data import check_columns, label_names, tokenize
from .errors import ModelError

log = logging.getLogger(__name__)


class Task(Protocol):
    def load_tokenizer(self, source: str, field: str, **hub: Any) -> Any: ...

    def prepare(self, splits: Any, tokenizer: Any, source: DatasetSource, cache: Path) -> tuple[Any, list[str]]: ...

    def load_model(self, source: str, labels: list[str], field: str, *, attention: str, **hub: Any) -> Any: ...

    def predictions(self, logits: Any) -> Any: ...


class TextClassification:
    """One text or a text pair -> one label (MRPC, SST-2, NLI...)."""

    def load_tokenizer(self, source: str, field: str, **hub: Any) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source, **hub)
        except (OSError, ValueError) as e:
            raise ModelError(field, f"cannot load a tokenizer from {source!r}: {e}") from None

    def prepare(self, splits: Any, tokenizer: Any, source: DatasetSource, cache: Path) -> tuple[Any, list[str]]:
        check_columns(splits, source)
        eval_labels = splits["eval"][source.label_field] if "eval" in splits else ()
        labels = label_names(splits["train"][source.label_field], eval_labels)
        return tokenize(splits, tokenizer, source, labels, cache), labels

    def load_model(self, source: str, labels: list[str], field: str, *, attention: str, **hub: Any) -> Any:
        from transformers import AutoModelForSequenceClassification

        def load(attn_implementation: str) -> Any:
            return AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                ignore_mismatched_sizes=True,  # a fresh head when the checkpoint had another label count
                attn_implementation=attn_implementation,
                **hub,
            )

        try:
            try:
                model = load(attention)
            except ValueError as e:
                # Raised before any weight is read, so the retry costs little.
                if attention != "sdpa" or "scaled_dot_product_attention" not in str(e):
                    raise
                log.warning("%s has no sdpa attention; using eager (%s)", source, e)
                model = load("eager")
        except (OSError, ValueError) as e:
            raise ModelError(field, f"cannot load a model from {source!r}: {e}") from None
        # The loss is a mean over the batch's examples. Many models take the Trainer's num_items_in_batch
        # (through **kwargs) and ignore it; the Trainer then skips dividing by gradientAccumulationSteps and
        # multiplies by the process count, scaling gradients and the logged loss by both.
        model.accepts_loss_kwargs = False
        return model

    def predictions(self, logits: Any) -> Any:
        import numpy as np

        if isinstance(logits, tuple):
            logits = logits[0]
        return np.argmax(logits, axis=-1)


IMPLEMENTATIONS: dict[str, Task] = {"text-classification": TextClassification()}
