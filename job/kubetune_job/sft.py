"""Supervised fine-tuning of causal language models on TRL's SFTTrainer and PEFT: loading the base model
(full, LoRA or QLoRA), the adapter's configuration and its checks, evaluation beyond the loss
(perplexity, greedy answers scored by the generated-text metrics) and the merged model.

The decisions (is this a causal LM, which target modules match, which dtype the base loads in) are pure
functions; the rest is the thin part around TRL, PEFT and transformers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api.spec import Adapter, FineTuneJobSpec

from .errors import ConfigError, ModelError

if TYPE_CHECKING:
    from .orchestrate import Pretrained

log = logging.getLogger(__name__)

#: PEFT's word for every linear layer but the output head.
ALL_LINEAR = "all-linear"
#: Class-name endings of the architectures that generate text token by token.
CAUSAL_ENDINGS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
#: Perplexity is exp(loss); a diverged run's loss would overflow it.
MAX_LOSS = 50.0
#: Module names listed in an error at most.
SHOWN_MODULES = 24


def causal_lm_problem(model_type: str, architectures: Sequence[str], causal_types: Iterable[str]) -> str | None:
    """Why a model is not one text-generation can fine-tune (pure), or None."""
    if model_type not in set(causal_types):
        return f"its model type {model_type!r} has no causal language-model class in transformers"
    if architectures and not any(a.endswith(CAUSAL_ENDINGS) for a in architectures):
        return f"it was saved as {', '.join(architectures)}, not a causal language model"
    return None


def base_dtype(precision: str, *, adapter: Adapter | None) -> str:
    """The dtype the base model loads in (pure). Under an adapter the base is frozen and loads in the training
    precision (half the memory in bf16/fp16); a full fine-tune keeps fp32 master weights, which the Trainer's
    autocast computes in bf16/fp16."""
    if adapter is not None and precision in ("bf16", "fp16"):
        return {"bf16": "bfloat16", "fp16": "float16"}[precision]
    return "float32"


def unmatched_targets(targets: Sequence[str], module_names: Iterable[str]) -> list[str]:
    """Targets that name no module, by PEFT's rule: a module matches a target equal to its full name or to
    its last dotted parts (pure)."""
    names = list(module_names)
    return [t for t in targets if t != ALL_LINEAR and not any(n == t or n.endswith("." + t) for n in names)]


def linear_module_names(model: Any) -> list[str]:
    """The distinct last names of the model's linear layers: what targetModules usually lists."""
    import torch

    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(leaves)


def lora_config(adapter: Adapter, model: Any) -> Any:
    """PEFT's LoraConfig for spec.adapter, after checking every target names a module of `model`."""
    from peft import LoraConfig

    targets = list(adapter.target_modules)
    missing = unmatched_targets(targets, (name for name, _ in model.named_modules()))
    if missing:
        linear = linear_module_names(model)
        shown = ", ".join(linear[:SHOWN_MODULES]) + (" ..." if len(linear) > SHOWN_MODULES else "")
        verb = "matches" if len(missing) == 1 else "match"
        raise ConfigError(
            "spec.adapter.targetModules",
            f"{', '.join(missing)} {verb} no module of the model; its linear layers are named {shown} "
            f"(or use {ALL_LINEAR})",
        )
    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.scale,
        lora_dropout=adapter.dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        task_type="CAUSAL_LM",
        bias="none",
    )


def check_causal_lm(source: str, field: str, **hub: Any) -> None:
    """A ModelError unless the model at `source` is a causal LM; reads its configuration alone (no weights)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source, **hub)
    except (OSError, ValueError) as e:
        raise ModelError(field, f"cannot load a model configuration from {source!r}: {e}") from None
    problem = causal_lm_problem(
        config.model_type, getattr(config, "architectures", None) or (), MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if problem:
        raise ModelError(
            field,
            f"{source} is not a causal language model: {problem}. text-generation fine-tunes a model that "
            "AutoModelForCausalLM loads (Llama, Qwen, SmolLM, Mistral...); a classifier takes "
            "task: text-classification",
        )


def adapter_plan(adapter: Adapter | None, *, saved: bool) -> str:
    """How the model to train is made (pure): "continue" trains the saved adapter spec.model.uri holds; "merge"
    merges it into its base first (then spec.adapter, if set, adds a new adapter to the result); "new" adds
    spec.adapter's new adapter to the base model; "full" trains every weight of the base model."""
    if saved:
        return "continue" if adapter is not None and adapter.init != "new" else "merge"
    if adapter is not None and adapter.init == "continue":
        raise ConfigError(
            "spec.adapter.init",
            "continue trains the saved adapter spec.model.uri holds, and it holds a whole model (config.json, no "
            "adapter_config.json): remove init, or name a FineTuneJob's adapter output in spec.model.uri",
        )
    return "new" if adapter is not None else "full"


def load_causal_lm(pretrained: Pretrained, *, spec: FineTuneJobSpec, precision: str, attention: str) -> Any:
    """The model to train: the base model, in the dtype base_dtype chooses (with qlora, quantized to 4-bit NF4 on
    this process's GPU), with the saved adapter spec.model.uri holds, trainable or merged in (adapter_plan)."""
    plan = adapter_plan(spec.adapter, saved=pretrained.adapter is not None)
    model = load_base_lm(pretrained.path, pretrained.field, spec=spec, precision=precision, attention=attention,
                         **pretrained.hub)  # fmt: skip
    if pretrained.adapter is None:
        return model
    from peft import PeftModel

    try:
        adapted = PeftModel.from_pretrained(model, pretrained.adapter, is_trainable=plan == "continue")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(
            "spec.model.uri", f"cannot load the adapter {pretrained.adapter} onto {pretrained.reference}: {e}"
        ) from None
    if plan == "merge":
        return adapted.merge_and_unload()
    return adapted


def load_base_lm(source: str, field: str, *, spec: FineTuneJobSpec, precision: str, attention: str, **hub: Any) -> Any:
    """The base model, in the dtype base_dtype chooses; with qlora, quantized to 4-bit NF4 on this process's GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    check_causal_lm(source, field, **hub)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, base_dtype(precision, adapter=spec.adapter))}
    if spec.adapter is not None and spec.adapter.method == "qlora":
        from transformers import BitsAndBytesConfig

        from .distributed import local_rank

        kwargs["dtype"] = torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": local_rank()}
    try:
        return AutoModelForCausalLM.from_pretrained(source, attn_implementation=attention, **kwargs, **hub)
    except ValueError as e:
        if attention != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise ModelError(field, f"cannot load a causal language model from {source!r}: {e}") from None
        log.warning("%s has no sdpa attention; using eager (%s)", source, e)
        return AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", **kwargs, **hub)
    except OSError as e:
        raise ModelError(field, f"cannot load a causal language model from {source!r}: {e}") from None


def packing_keeps_apart(model: Any) -> bool:
    """Whether this model's attention keeps packed examples apart: the logits of an example packed after another
    (its position ids restarting at 0, no attention mask, no cache, as TRL's padding-free packing feeds it) equal
    those of the example alone. transformers' SDPA, eager and flash attention read the restart as a boundary;
    a model with its own attention code may not."""
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    first = torch.arange(1, 6) % vocab
    second = torch.arange(7, 11) % vocab
    device = model.get_input_embeddings().weight.device
    packed = torch.cat([first, second])[None].to(device)
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=second[None].to(device), use_cache=False).logits[0].float()
            together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0, 5:].float()
    finally:
        model.train(was_training)
    tolerance = 1e-3 if alone.dtype == torch.float32 and model.dtype == torch.float32 else 5e-2
    return bool(torch.allclose(alone, together, atol=tolerance * max(1.0, float(alone.abs().max()))))


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped where a diverged loss would overflow."""
    return math.exp(min(loss, MAX_LOSS))


@dataclass(frozen=True)
class Answers:
    """What the generation evaluation asks and how it scores the answers."""

    #: Prompts as the model sees them (a conversation through the chat template, ending on the assistant's cue).
    prompts: list[str]
    #: Whether the tokenizer adds its special tokens: not to a chat template's text, which holds its own.
    special_tokens: bool
    references: list[str]
    modules: list[Any]
    max_new_tokens: int


def answers(tokenizer: Any, pairs: Sequence[tuple[Any, str]], modules: list[Any], max_new_tokens: int) -> Answers:
    """Answers for (prompt, reference) pairs; prompts that are lists of turns go through the chat template."""
    chat = bool(pairs) and isinstance(pairs[0][0], list)
    prompts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if chat else p for p, _ in pairs
    ]
    return Answers(prompts, not chat, [r for _, r in pairs], modules, max_new_tokens)


def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, batch: int, special_tokens: bool
) -> list[str]:
    """Greedy answers to rendered prompts, batched with left padding (the answers start at one column)."""
    import torch
    from transformers import GenerationConfig

    generation = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
    )
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch):
                chunk = list(prompts[start : start + batch])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=special_tokens)
                enc = enc.to(model.device)
                out = model.generate(**enc, generation_config=generation)
                answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


class NoCacheTraining:
    """A Trainer mixin: no key/value cache while training. It is never read, and with one the attention reads
    packed examples' restarting position ids as nothing (packing_keeps_apart). Generation turns it back on."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        config = self.accelerator.unwrap_model(self.model).config  # type: ignore[attr-defined]
        before, config.use_cache = config.use_cache, False
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            config.use_cache = before


def trainer_class() -> type:
    """TRL's SFTTrainer with kubetune's evaluation: perplexity from the loss and, given prompts, greedy answers
    scored by the generated-text metrics. TRL's own evaluation extras (token accuracy, entropy) are logged but
    only the requested metrics reach status and Prometheus."""
    from trl import SFTTrainer

    class Trainer(NoCacheTraining, SFTTrainer):
        def __init__(self, *args: Any, answers: Answers | None = None, **kwargs: Any) -> None:
            self.answers = answers
            super().__init__(*args, **kwargs)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # TRL adds its own figures to the dict it is given, which is also the one the callbacks' on_evaluate
            # receives: they go to the log history only.
            super().log(dict(logs), start_time)

        def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
            out = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", "eval")
            metrics = out.metrics
            assert metrics is not None  # the Trainer's loop always returns a dict, updated in place below
            loss = metrics.get(f"{prefix}_loss")
            if loss is not None:
                metrics[f"{prefix}_perplexity"] = perplexity(float(loss))
            if self.answers is not None and self.is_world_process_zero():
                metrics.update({f"{prefix}_{k}": v for k, v in self._score_answers().items()})
            return out

        def _score_answers(self) -> dict[str, float]:
            asked = self.answers
            assert asked is not None
            predictions = greedy_answers(
                self.accelerator.unwrap_model(self.model), self.processing_class, asked.prompts,
                max_new_tokens=asked.max_new_tokens, batch=self.args.per_device_eval_batch_size,
                special_tokens=asked.special_tokens,
            )  # fmt: skip
            scores: dict[str, float] = {}
            for module in asked.modules:
                scores.update(module.compute(predictions=predictions, references=asked.references))
            return scores

    return Trainer


def merge(pretrained: Pretrained, adapter_dir: Path, target: Path, tokenizer: Any, *, under: bool) -> None:
    """The base model with the adapter merged in, saved as safetensors with the tokenizer. The base is loaded
    afresh in its checkpoint's dtype (a QLoRA base was 4-bit in training; the merge is into full weights).
    under: the adapter was trained on the base with the saved adapter spec.model.uri holds merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pretrained.path, dtype="auto", **pretrained.hub)
    if under:
        assert pretrained.adapter is not None
        base = PeftModel.from_pretrained(base, pretrained.adapter).merge_and_unload()
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
