"""The task registry: what a task loads, how it prepares data, which Trainer trains it and what it adds
to the output.

A new task is one class with the methods of Task, registered in IMPLEMENTATIONS under a name that
spec.TASKS also lists (a unit test keeps the two in step).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kubetune_api.spec import GENERATED_METRICS, FineTuneJobSpec

from .data import check_columns, label_names, tokenize
from .errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from .orchestrate import Pretrained

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
    #: Sequences the model reads for one training example.
    inputs_per_example: int

    def load_tokenizer(self, pretrained: Pretrained, spec: FineTuneJobSpec) -> Any: ...

    def prepare(self, splits: Any, tokenizer: Any, spec: FineTuneJobSpec, cache: Path) -> Prepared: ...

    def load_model(
        self, pretrained: Pretrained, prepared: Prepared, *, spec: FineTuneJobSpec, precision: str
    ) -> Any: ...

    def trainer(
        self, *, model: Any, args: Any, prepared: Prepared, tokenizer: Any, spec: FineTuneJobSpec, callbacks: list[Any]
    ) -> Any: ...

    def save_extra(
        self, trainer: Any, tokenizer: Any, out: Path, *, spec: FineTuneJobSpec, pretrained: Pretrained
    ) -> None:
        """Write what this task adds to the output directory beyond the Trainer's model and the tokenizer."""

    def card(self, spec: FineTuneJobSpec, prepared: Prepared, pretrained: Pretrained) -> dict[str, str]:
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

    inputs_per_example = 1

    def load_tokenizer(self, pretrained: Pretrained, spec: FineTuneJobSpec) -> Any:
        if pretrained.adapter is not None:
            raise ModelError(
                pretrained.field,
                f"{spec.model.uri} holds a LoRA adapter (adapter_config.json), which text-classification does not "
                "train: give a directory with a whole model (config.json), such as an output written with "
                "output.merge",
            )
        return load_tokenizer(pretrained.path, pretrained.field, **pretrained.hub)

    def prepare(self, splits: Any, tokenizer: Any, spec: FineTuneJobSpec, cache: Path) -> Prepared:
        source = spec.dataset
        check_columns(splits, source)
        eval_labels = splits["eval"][source.label_field] if "eval" in splits else ()
        labels = label_names(splits["train"][source.label_field], eval_labels)
        return Prepared(tokenize(splits, tokenizer, source, labels, cache, max_length=spec.max_length), labels)

    def load_model(self, pretrained: Pretrained, prepared: Prepared, *, spec: FineTuneJobSpec, precision: str) -> Any:
        from transformers import AutoModelForSequenceClassification

        source, field, hub = pretrained.path, pretrained.field, pretrained.hub
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
        self, trainer: Any, tokenizer: Any, out: Path, *, spec: FineTuneJobSpec, pretrained: Pretrained
    ) -> None:
        return None

    def card(self, spec: FineTuneJobSpec, prepared: Prepared, pretrained: Pretrained) -> dict[str, str]:
        return {"labels": ", ".join(f"{i}: `{n}`" for i, n in enumerate(prepared.labels))}


def predictions(logits: Any) -> Any:
    """Class ids from a classifier's logits."""
    import numpy as np

    if isinstance(logits, tuple):
        logits = logits[0]
    return np.argmax(logits, axis=-1)


class CausalLM:
    """What the LLM tasks share: a causal LM (fully trained, or with a new or saved LoRA/QLoRA adapter), its
    tokenizer and chat template, its output and card rows."""

    inputs_per_example = 1

    def load_tokenizer(self, pretrained: Pretrained, spec: FineTuneJobSpec) -> Any:
        """The tokenizer (a saved adapter's own when it has one), with spec.dataset.chatTemplate if set. The model's
        configuration is checked first: a model that is no causal LM is the problem to report, before any the
        tokenizer or the data would show."""
        from .sft import adapter_plan, check_causal_lm

        adapter_plan(spec.adapter, saved=pretrained.adapter is not None)  # init: continue without an adapter fails now
        check_causal_lm(pretrained.path, pretrained.field, **pretrained.hub)
        tokenizer = load_tokenizer(pretrained.tokenizer, pretrained.field, **pretrained.hub)
        if spec.dataset.chat_template is not None:
            tokenizer.chat_template = spec.dataset.chat_template
        return tokenizer

    def load_model(self, pretrained: Pretrained, prepared: Prepared, *, spec: FineTuneJobSpec, precision: str) -> Any:
        from .sft import load_causal_lm

        return load_causal_lm(pretrained, spec=spec, precision=precision, attention=spec.hyperparameters.attention)

    def peft_config(self, spec: FineTuneJobSpec, model: Any) -> Any:
        """The new adapter's LoraConfig, or None: every weight trains, or the saved adapter does."""
        from peft import PeftModel

        from .sft import lora_config

        if spec.adapter is None or isinstance(model, PeftModel):
            return None
        return lora_config(spec.adapter, model)

    def save_extra(
        self, trainer: Any, tokenizer: Any, out: Path, *, spec: FineTuneJobSpec, pretrained: Pretrained
    ) -> None:
        """The generation config, the adapter's base model as the spec names it (not this pod's download
        directory) and, with output.merge, the merged model."""
        from .sft import adapter_plan, merge

        model = trainer.accelerator.unwrap_model(trainer.model)
        model.generation_config.save_pretrained(str(out))
        config_file = out / "adapter_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = pretrained.reference
            if "revision" in pretrained.hub:
                config["revision"] = pretrained.hub["revision"]
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        if spec.output.merge:
            plan = adapter_plan(spec.adapter, saved=pretrained.adapter is not None)
            merge(pretrained, out, out / "merged", tokenizer, under=plan == "merge")

    def adapter_rows(self, spec: FineTuneJobSpec, pretrained: Pretrained) -> dict[str, str]:
        """Model-card rows: what was trained, and from which saved adapter."""
        from .sft import adapter_plan

        adapter = spec.adapter
        plan = adapter_plan(adapter, saved=pretrained.adapter is not None)
        rows = {}
        if pretrained.adapter is not None:
            uri = spec.model.uri
            rows["started from"] = (
                f"the adapter at `{uri}`, trained further"
                if plan == "continue"
                else f"the adapter at `{uri}` merged into the base model: load that first (or use merged/)"
            )
        if adapter is None:
            rows["adapter"] = "none (every weight fine-tuned)"
        elif plan == "continue":
            assert pretrained.adapter is not None
            saved = json.loads((Path(pretrained.adapter) / "adapter_config.json").read_text())
            targets = saved.get("target_modules")
            targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
            rows["adapter"] = (
                f"the saved one: {saved.get('peft_type', '').lower()}, rank {saved.get('r')}, alpha "
                f"{saved.get('lora_alpha')}, target modules {targets}"
            )
        else:
            targets = ", ".join(adapter.target_modules)
            rows["adapter"] = (
                f"{adapter.method}, rank {adapter.rank}, alpha {adapter.scale:g}, dropout {adapter.dropout:g}, "
                f"target modules {targets}"
            )
        return rows


def chat_template_needed(tokenizer: Any, fmt: str) -> None:
    """A ConfigError when the data is conversations and the tokenizer has no chat template to render them."""
    if not tokenizer.chat_template:
        raise ConfigError(
            "spec.dataset.chatTemplate",
            f"the tokenizer of spec.model has no chat template and the data is {fmt} conversations: set "
            "spec.dataset.chatTemplate to a Jinja chat template, or use a model whose tokenizer has one",
        )


class TextGeneration(CausalLM):
    """Supervised fine-tuning of a causal LM on chat, prompt-completion or plain text (TRL's SFTTrainer),
    fully or with a LoRA/QLoRA adapter (PEFT)."""

    def prepare(self, splits: Any, tokenizer: Any, spec: FineTuneJobSpec, cache: Path) -> Prepared:
        from . import conversations as chats

        ds = spec.dataset
        names = {"train": ds.train_split, "eval": ds.eval_split or ""}
        fmt = chats.detect_format(splits["train"].column_names, ds.format)
        if "eval" in splits:
            chats.check_columns(splits["eval"].column_names, fmt, names["eval"])
        chats.check_records(splits, fmt, names)
        prepared = Prepared(data=None, format=fmt, pairs=self._pairs(splits, fmt, spec))
        if fmt == "messages" or isinstance(splits["train"][0].get("prompt"), list):
            chat_template_needed(tokenizer, fmt)
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
        peft_config = self.peft_config(spec, model)
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
        if spec.dataset.packing:
            # Packed, the training split holds bins of examples, not examples; TRL drops none of them (it
            # truncates an example longer than maxLength). Evaluation is never packed.
            sizes.pop("train")
        prepared.warnings += dropped_report(sizes, trainer, spec.max_length)
        return trainer

    def card(self, spec: FineTuneJobSpec, prepared: Prepared, pretrained: Pretrained) -> dict[str, str]:
        rows = {"data format": str(prepared.format)}
        rows["loss on"] = (
            "every assistant turn"
            if prepared.assistant_only_loss
            else "the text"
            if prepared.format == "text"
            else "the completion (the last assistant turn)"
        )
        rows.update(self.adapter_rows(spec, pretrained))
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


def dropped_report(sizes: dict[str, int], trainer: Any, max_length: int) -> list[str]:
    """truncation_report for each split TRL's trainer was given, from its sizes before and after."""
    kept = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    return [w for name, size in sizes.items() for w in truncation_report(name, size, len(kept[name]), max_length)]


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


class Preference(CausalLM):
    """Preference tuning of a causal LM on (prompt, chosen, rejected) pairs, text or chat turns, with DPO (TRL's
    DPOTrainer), fully or with a new or saved LoRA/QLoRA adapter. The reference is the frozen starting model."""

    #: A pair is two sequences, its chosen and its rejected answer after the prompt.
    inputs_per_example = 2

    def prepare(self, splits: Any, tokenizer: Any, spec: FineTuneJobSpec, cache: Path) -> Prepared:
        from . import conversations as chats

        ds = spec.dataset
        names = {"train": ds.train_split, "eval": ds.eval_split or ""}
        for which, split in splits.items():
            chats.check_columns(split.column_names, "preference", names[which], which)
        chats.check_records(splits, "preference", names)
        conversational = isinstance(splits["train"][0]["prompt"], list)
        if conversational:
            chat_template_needed(tokenizer, "preference")
        data = splits.select_columns(list(chats.COLUMNS["preference"]))
        return Prepared(data=data, format="chat turns" if conversational else "text")

    def trainer(
        self, *, model: Any, args: Any, prepared: Prepared, tokenizer: Any, spec: FineTuneJobSpec, callbacks: list[Any]
    ) -> Any:
        import copy

        from .preference import trainer_class

        data = prepared.data
        sizes = {name: len(split) for name, split in data.items()}
        trainer = trainer_class()(
            model=model,
            # Every weight trains: the reference is a frozen copy of the starting model. With an adapter, TRL
            # disables it (a new one) or keeps a frozen copy of it (a saved one) for the reference.
            ref_model=copy.deepcopy(model) if spec.adapter is None else None,
            args=args,
            train_dataset=data["train"],
            eval_dataset=data.get("eval"),
            processing_class=tokenizer,
            peft_config=self.peft_config(spec, model),
            callbacks=callbacks,
        )
        prepared.warnings += dropped_report(sizes, trainer, spec.max_length)
        return trainer

    def card(self, spec: FineTuneJobSpec, prepared: Prepared, pretrained: Pretrained) -> dict[str, str]:
        settings = spec.preference_settings
        rows = {
            "data": f"preference pairs (prompt, chosen, rejected) as {prepared.format}",
            "method": f"{settings.method}, loss {settings.loss}, beta {settings.beta:g}; the reference is the "
            "starting model, frozen",
        }
        rows.update(self.adapter_rows(spec, pretrained))
        return rows


IMPLEMENTATIONS: dict[str, Task] = {
    "text-classification": TextClassification(),
    "text-generation": TextGeneration(),
    "preference": Preference(),
}
