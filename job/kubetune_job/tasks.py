"""The task registry: what a task loads, how it prepares data, which Trainer trains it and what it adds
to the output.

A new task is one class with the methods of Task, registered in IMPLEMENTATIONS under a name that
spec.TASKS also lists (a unit test keeps the two in step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubetune_api.spec import GENERATED_METRICS, FineTuneJobSpec

from .data import check_columns, label_names, tokenize
from .errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A task's data, ready for its Trainer."""

    #: "train" and, with an evaluation split, "eval".
    data: Any
    #: Class names, in id order (text-classification).
    labels: list[str] = field(default_factory=list)
    #: text-generation: the data format, whether the loss counts every assistant turn (the chat template
    #: marks them) or the completion, and the (prompt, reference) pairs the generation evaluation asks.
    format: str | None = None
    assistant_only_loss: bool = False
    pairs: list[tuple[Any, str]] = field(default_factory=list)
    #: What the run should report about the data.
    warnings: list[str] = field(default_factory=list)


class Task(Protocol):
    def load_tokenizer(self, source: str, field: str, spec: FineTuneJobSpec, **hub: Any) -> Any: ...

    def prepare(self, splits: Any, tokenizer: Any, spec: FineTuneJobSpec, cache: Path) -> Prepared: ...

    def load_model(
        self, source: str, prepared: Prepared, field: str, *, spec: FineTuneJobSpec, precision: str, **hub: Any
    ) -> Any: ...

    def trainer(
        self, *, model: Any, args: Any, prepared: Prepared, tokenizer: Any, spec: FineTuneJobSpec, callbacks: list[Any]
    ) -> Any: ...

    def save_extra(
        self, trainer: Any, tokenizer: Any, out: Path, *, spec: FineTuneJobSpec, source: str, **hub: Any
    ) -> None:
        """Write what this task adds to the output directory beyond the Trainer's model and the tokenizer."""

    def card(self, spec: FineTuneJobSpec, prepared: Prepared) -> dict[str, str]:
        """Model-card rows particular to this task."""


def load_tokenizer(source: str, field: str, **hub: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **hub)
    except (OSError, ValueError) as e:
        raise ModelError(field, f"cannot load a tokenizer from {source!r}: {e}") from None


def precision_of(args: Any) -> str:
    """The training precision the TrainingArguments settled on."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


class TextClassification:
    """One text or a text pair -> one label (MRPC, SST-2, NLI...)."""

    def load_tokenizer(self, source: str, field: str, spec: FineTuneJobSpec, **hub: Any) -> Any:
        return load_tokenizer(source, field, **hub)

    def prepare(self, splits: Any, tokenizer: Any, spec: FineTuneJobSpec, cache: Path) -> Prepared:
        source = spec.dataset
        check_columns(splits, source)
        eval_labels = splits["eval"][source.label_field] if "eval" in splits else ()
        labels = label_names(splits["train"][source.label_field], eval_labels)
        return Prepared(tokenize(splits, tokenizer, source, labels, cache, max_length=spec.max_length), labels)

    def load_model(
        self, source: str, prepared: Prepared, field: str, *, spec: FineTuneJobSpec, precision: str, **hub: Any
    ) -> Any:
        from transformers import AutoModelForSequenceClassification

        labels = prepared.labels
        attention = spec.hyperparameters.attention

        def load(attn_implementation: str) -> Any:
            return AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                ignore_mismatched_sizes=True,  # a fresh head when the checkpoint had another label count
                attn_implementation=attn_implementation,
                dtype="float32",  # fp32 master weights; the Trainer's autocast computes in bf16/fp16
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

    def trainer(
        self, *, model: Any, args: Any, prepared: Prepared, tokenizer: Any, spec: FineTuneJobSpec, callbacks: list[Any]
    ) -> Any:
        from transformers import DataCollatorWithPadding, Trainer

        from .arguments import metric_function, pad_multiple

        has_eval = "eval" in prepared.data
        return Trainer(
            model=model,
            args=args,
            train_dataset=prepared.data["train"],
            eval_dataset=prepared.data["eval"] if has_eval else None,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(
                tokenizer, pad_to_multiple_of=pad_multiple(spec.hyperparameters, cuda=args.device.type == "cuda")
            ),
            compute_metrics=metric_function(spec.eval_metrics, len(prepared.labels), predictions) if has_eval else None,
            callbacks=callbacks,
        )

    def save_extra(
        self, trainer: Any, tokenizer: Any, out: Path, *, spec: FineTuneJobSpec, source: str, **hub: Any
    ) -> None:
        return None

    def card(self, spec: FineTuneJobSpec, prepared: Prepared) -> dict[str, str]:
        return {"labels": ", ".join(f"{i}: `{n}`" for i, n in enumerate(prepared.labels))}


def predictions(logits: Any) -> Any:
    """Class ids from a classifier's logits."""
    import numpy as np

    if isinstance(logits, tuple):
        logits = logits[0]
    return np.argmax(logits, axis=-1)


class TextGeneration:
    """Supervised fine-tuning of a causal LM on chat, prompt-completion or plain text (TRL's SFTTrainer),
    fully or with a LoRA/QLoRA adapter (PEFT)."""

    def load_tokenizer(self, source: str, field: str, spec: FineTuneJobSpec, **hub: Any) -> Any:
        """The tokenizer, with spec.dataset.chatTemplate if set. The model's configuration is checked first: a model
        that is no causal LM is the problem to report, before any the tokenizer or the data would show."""
        from .sft import check_causal_lm

        check_causal_lm(source, field, **hub)
        tokenizer = load_tokenizer(source, field, **hub)
        if spec.dataset.chat_template is not None:
            tokenizer.chat_template = spec.dataset.chat_template
        return tokenizer

    def prepare(self, splits: Any, tokenizer: Any, spec: FineTuneJobSpec, cache: Path) -> Prepared:
        from . import conversations as chats

        ds = spec.dataset
        names = {"train": ds.train_split, "eval": ds.eval_split or ""}
        fmt = chats.detect_format(splits["train"].column_names, ds.format)
        if "eval" in splits:
            chats.check_eval_columns(splits["eval"].column_names, fmt, names["eval"])
        chats.check_records(splits, fmt, names)
        prepared = Prepared(data=None, format=fmt, pairs=self._pairs(splits, fmt, spec))
        conversational = fmt == "messages" or isinstance(splits["train"][0].get("prompt"), list)
        if conversational and not tokenizer.chat_template:
            raise ConfigError(
                "spec.dataset.chatTemplate",
                f"the tokenizer of spec.model has no chat template and the data is {fmt} conversations: set "
                "spec.dataset.chatTemplate to a Jinja chat template, or use a model whose tokenizer has one",
            )
        if fmt == "messages" and assistant_masks(tokenizer):
            prepared.assistant_only_loss = True  # every assistant turn, as the template marks them
        elif fmt == "messages":
            earlier = chats.earlier_assistant_turns(splits["train"]["messages"])
            if earlier:
                prepared.warnings.append(
                    f"{earlier} conversations have assistant turns before their last: the chat template marks no "
                    "assistant turns, so the loss counts each conversation's last answer and the earlier ones are "
                    "context (a template with {% generation %} markers in spec.dataset.chatTemplate trains on all)"
                )
            splits = splits.map(chats.as_last_turn, remove_columns=splits["train"].column_names, desc="last turns")
        columns = chats.COLUMNS["prompt-completion" if fmt == "messages" and not prepared.assistant_only_loss else fmt]
        prepared.data = splits.select_columns(list(columns))
        return prepared

    @staticmethod
    def _pairs(splits: Any, fmt: str, spec: FineTuneJobSpec) -> list[tuple[Any, str]]:
        """The (prompt, reference) pairs evaluation.generate asks, from the evaluation split."""
        from .conversations import generation_pairs

        generate = spec.evaluation.generate if spec.evaluation else None
        if generate is None:
            return []
        if fmt == "text":
            raise ConfigError(
                "spec.evaluation.generate",
                "generation answers prompts, and text data has none: use messages or prompt-completion data, "
                "or remove evaluation.generate",
            )
        if "eval" not in splits:
            raise ConfigError(
                "spec.evaluation.generate", "generation answers evaluation prompts: set spec.dataset.evalSplit"
            )
        return generation_pairs(splits["eval"], fmt, generate.examples)

    def load_model(
        self, source: str, prepared: Prepared, field: str, *, spec: FineTuneJobSpec, precision: str, **hub: Any
    ) -> Any:
        from .sft import load_causal_lm

        return load_causal_lm(
            source, field, spec=spec, precision=precision, attention=spec.hyperparameters.attention, **hub
        )

    def trainer(
        self, *, model: Any, args: Any, prepared: Prepared, tokenizer: Any, spec: FineTuneJobSpec, callbacks: list[Any]
    ) -> Any:
        import evaluate

        from . import sft
        from .metric_modules import module_path

        args.assistant_only_loss = prepared.assistant_only_loss
        if spec.dataset.packing and not sft.packing_keeps_apart(model):
            raise ConfigError(
                "spec.dataset.packing",
                f"this model's attention ({model.config.model_type}, {spec.hyperparameters.attention}) lets packed "
                "examples attend to each other, so one conversation would learn from another's turns: set "
                "packing: false (or try hyperparameters.attention: eager or sdpa if another is set)",
            )
        peft_config = sft.lora_config(spec.adapter, model) if spec.adapter is not None else None
        answers = None
        if prepared.pairs:
            modules = [evaluate.load(str(module_path(m))) for m in spec.eval_metrics if m in GENERATED_METRICS]
            generate = spec.evaluation.generate if spec.evaluation else None
            assert generate is not None
            answers = sft.answers(tokenizer, prepared.pairs, modules, generate.max_new_tokens)
        data = prepared.data
        sizes = {name: len(split) for name, split in data.items()}
        try:
            trainer = sft.trainer_class()(
                model=model,
                args=args,
                train_dataset=data["train"],
                eval_dataset=data.get("eval"),
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=callbacks,
                answers=answers,
            )
        except ValueError as e:
            if peft_config is not None and "target" in str(e).lower():
                raise ConfigError("spec.adapter.targetModules", f"PEFT cannot attach the adapter: {e}") from None
            raise
        kept = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
        if spec.dataset.packing:
            # Packed, the training split holds bins of examples, not examples; TRL drops none of them (it
            # truncates an example longer than maxLength). Evaluation is never packed.
            sizes.pop("train")
        for name, size in sizes.items():
            left = len(kept[name])
            prepared.warnings += truncation_report(name, size, left, spec.max_length)
        return trainer

    def save_extra(
        self, trainer: Any, tokenizer: Any, out: Path, *, spec: FineTuneJobSpec, source: str, **hub: Any
    ) -> None:
        from .sft import merge

        model = trainer.accelerator.unwrap_model(trainer.model)
        model.generation_config.save_pretrained(str(out))
        if spec.output.merge:
            merge(source, out, out / "merged", tokenizer, **hub)

    def card(self, spec: FineTuneJobSpec, prepared: Prepared) -> dict[str, str]:
        rows = {"data format": str(prepared.format)}
        rows["loss on"] = (
            "every assistant turn"
            if prepared.assistant_only_loss
            else "the text"
            if prepared.format == "text"
            else "the completion (the last assistant turn)"
        )
        adapter = spec.adapter
        if adapter is None:
            rows["adapter"] = "none (every weight fine-tuned)"
        else:
            targets = ", ".join(adapter.target_modules)
            rows["adapter"] = (
                f"{adapter.method}, rank {adapter.rank}, alpha {adapter.scale:g}, dropout {adapter.dropout:g}, "
                f"target modules {targets}"
            )
        if spec.dataset.packing:
            rows["packing"] = "examples packed into maxLength sequences"
        return rows


def assistant_masks(tokenizer: Any) -> bool:
    """Whether TRL can mask every assistant turn: the chat template marks them ({% generation %}), or TRL has
    a marked version of it."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return False
    return True


def truncation_report(split: str, before: int, after: int, max_length: int) -> list[str]:
    """Warnings (or the error) for examples TRL dropped because truncation to maxLength left no loss token."""
    if after == 0 and before > 0:
        raise DataError(
            "spec.dataset.maxLength",
            f"every example of the {split} split loses its whole answer to truncation at {max_length} tokens, so "
            "there is nothing to learn from: raise maxLength or shorten the prompts",
        )
    if after < before:
        return [
            f"{before - after} of {before} {split} examples dropped: their answer starts past maxLength {max_length}"
        ]
    return []


IMPLEMENTATIONS: dict[str, Task] = {"text-classification": TextClassification(), "text-generation": TextGeneration()}
