"""The text-generation task's decisions: data format and record checks, what the trainer is given, which models
and adapters it takes, its SFTConfig arguments, the spec rules that tie its fields together, and the packing
probe on real tiny models."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kubetune_api.exit_codes import PERMANENT_EXIT_CODES, ExitCode
from kubetune_api.spec import Adapter, FineTuneJobSpec, SpecError, parse_manifest, parse_spec
from kubetune_job import conversations as chats
from kubetune_job import sft
from kubetune_job.arguments import (
    MANAGED,
    arguments,
    check_adapter,
    gradient_checkpointing,
    llm_arguments,
    training_arguments,
)
from kubetune_job.data import load_local
from kubetune_job.errors import ConfigError, DataError
from kubetune_job.orchestrate import Pretrained
from kubetune_job.tasks import TextGeneration, truncation_report
from tests.models import CHATML_MARKED, build_tiny_llama, write_chats

USER = {"role": "user", "content": "the red cat sits"}
ANSWER = {"role": "assistant", "content": "CAT RED"}


def generation_body(**spec: Any) -> dict[str, Any]:
    """A text-generation spec as written; keyword arguments replace (or, for mappings, update) its fields."""
    body: dict[str, Any] = {"model": {"uri": "/model"}, "task": "text-generation", "dataset": {"uri": "/data"}}
    for key, value in copy.deepcopy(spec).items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return body


def generation_spec(**spec: Any) -> FineTuneJobSpec:
    return parse_spec(generation_body(**spec))


def spec_problems(**spec: Any) -> list[str]:
    """The problems parse_manifest finds in a manifest with this spec."""
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "chat"}}
    with pytest.raises(SpecError) as e:
        parse_manifest({**doc, "spec": generation_body(**spec)})
    return e.value.problems


# Data formats


@pytest.mark.parametrize(
    ("columns", "fmt"),
    [(["id", "messages"], "messages"), (["prompt", "completion"], "prompt-completion"), (["text", "source"], "text")],
)
def test_format_is_read_from_the_columns(columns: list[str], fmt: str) -> None:
    """Without spec.dataset.format, the columns decide the format."""
    assert chats.detect_format(columns, None) == fmt


def test_requested_format_wins_where_its_columns_are_there() -> None:
    """A given format is taken even when another format's columns are there too."""
    assert chats.detect_format(["messages", "text"], "text") == "text"


def test_format_whose_columns_are_missing_names_the_columns_found() -> None:
    """A given format whose columns are absent names the field, the missing column, the columns found and the
    format those columns do hold."""
    with pytest.raises(DataError) as e:
        chats.detect_format(["prompt", "completion"], "messages")
    assert e.value.field == "spec.dataset.format"
    assert "messages not found" in e.value.message and "(columns: prompt, completion)" in e.value.message
    assert "set format: prompt-completion" in e.value.message


def test_prompt_without_completion_column_names_the_columns_found() -> None:
    """prompt-completion data with no completion column, format given: the missing column and those found."""
    with pytest.raises(DataError) as e:
        chats.detect_format(["prompt", "answer"], "prompt-completion")
    assert e.value.field == "spec.dataset.format"
    assert "completion not found (columns: prompt, answer)" in e.value.message
    assert "set format" not in e.value.message  # those columns hold no format to suggest


def test_columns_of_no_format_are_named() -> None:
    """Columns that match no format: the error lists them and what each format reads."""
    with pytest.raises(DataError) as e:
        chats.detect_format(["question", "answer"], None)
    assert e.value.field == "spec.dataset.format" and "(question, answer)" in e.value.message


def test_evaluation_split_in_another_format_names_the_eval_split() -> None:
    """An evaluation split without the training data's columns is a problem of spec.dataset.evalSplit."""
    chats.check_columns(["messages", "id"], "messages", "validation")
    with pytest.raises(DataError) as e:
        chats.check_columns(["prompt", "completion"], "messages", "validation")
    assert e.value.field == "spec.dataset.evalSplit"
    assert "split 'validation' lacks the column(s) messages" in e.value.message
    assert "(columns: prompt, completion)" in e.value.message


# Record checks


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ([USER, {"role": "bot", "content": "hi"}], "messages[1].role is 'bot'; use one of system, user, assistant"),
        ([USER], "no assistant turn"),
        ([USER, {"role": "assistant", "content": ["CAT"]}], "messages[1].content is list, not text"),
        ([{"role": "user"}, ANSWER], "messages[0].content is NoneType, not text"),
        ([], "messages is not a non-empty list"),
        ("the red cat", "messages is not a non-empty list"),
        ([USER, "CAT RED"], "messages[1] is not a {role, content} mapping"),
    ],
)
def test_bad_conversation_says_what_is_wrong(turns: Any, problem: str) -> None:
    """Each kind of malformed conversation gets a message that points at the turn and the key."""
    found = chats.turns_problem(turns)
    assert found is not None and found.startswith(problem)


def test_good_conversation_has_no_problem() -> None:
    """Every role may appear; a conversation with an assistant turn is well formed."""
    assert chats.turns_problem([{"role": "system", "content": "be brief"}, USER, ANSWER]) is None


@pytest.mark.parametrize(
    ("prompt", "completion", "problem"),
    [
        ("the red cat sits", None, "completion is missing"),
        (None, " CAT", "prompt is missing"),
        ("the red cat sits", [ANSWER], "prompt and completion must both be text or both be lists of turns"),
        ([USER], " CAT RED", "prompt and completion must both be text or both be lists of turns"),
        ([USER], [USER], "no assistant turn"),
        ([USER], [{"role": "assistant", "content": 3}], "completion[0].content is int, not text"),
        ("the red cat sits", "  ", "completion is empty"),
        ("the red cat sits", 3, "completion is int, not text or a list of turns"),
    ],
)
def test_bad_prompt_completion_record_says_what_is_wrong(prompt: Any, completion: Any, problem: str) -> None:
    """A missing or empty side, mixed text and turns, or a completion that answers nothing is named."""
    found = chats.pair_problem(prompt, completion)
    assert found is not None and found.startswith(problem)


def test_good_prompt_completion_records() -> None:
    """Text pairs and conversational pairs (the prompt needs no assistant turn) are well formed."""
    assert chats.pair_problem("the red cat sits", " CAT RED") is None
    assert chats.pair_problem([USER], [ANSWER]) is None


@pytest.mark.parametrize("text", [None, "", " \n", 3])
def test_missing_or_empty_text_record(text: Any) -> None:
    """A text record must hold some text."""
    assert chats.text_problem(text) == "text is missing or empty"
    assert chats.text_problem("the red cat sits") is None


def test_record_problems_name_the_first_few_bad_records() -> None:
    """Bad records are reported by index, at most SHOWN of them."""
    records = [{"messages": [USER, ANSWER]}, *({"messages": [USER]} for _ in range(5))]
    bad = chats.record_problems(records, "messages")
    assert [i for i, _ in bad] == [1, 2, 3] and len(bad) == chats.SHOWN


def test_bad_record_names_the_split_field_and_the_record() -> None:
    """check_records raises on the field of the split holding the bad record, naming the record."""
    import datasets

    good = datasets.Dataset.from_list([{"messages": [USER, ANSWER]}] * 3)
    bad = datasets.Dataset.from_list([{"messages": [USER, ANSWER]}, {"messages": [USER, USER]}])
    names = {"train": "train", "eval": "dev"}
    chats.check_records(datasets.DatasetDict({"train": good, "eval": good}), "messages", names)
    with pytest.raises(DataError) as e:
        chats.check_records(datasets.DatasetDict({"train": good, "eval": bad}), "messages", names)
    assert e.value.field == "spec.dataset.evalSplit"
    assert "split 'dev'" in e.value.message and "record 1: no assistant turn" in e.value.message
    empty = datasets.Dataset.from_dict({"messages": []})
    with pytest.raises(DataError) as e:
        chats.check_records(datasets.DatasetDict({"train": empty}), "messages", names)
    assert e.value.field == "spec.dataset.trainSplit" and "empty" in e.value.message


# What the trainer and the generation evaluation are given


def test_split_turns_makes_the_last_answer_the_completion() -> None:
    """The last assistant turn is the completion; earlier turns (answers too) are the prompt; turns after it
    and keys other than role and content are dropped."""
    first = {"role": "assistant", "content": "CAT RED", "name": "bot"}
    turns = [USER, first, {"role": "user", "content": "the blue dog sits"}, {"role": "assistant", "content": "DOG"},
             {"role": "user", "content": "thanks"}]  # fmt: skip
    prompt, completion = chats.split_turns(turns)
    assert prompt == [USER, {"role": "assistant", "content": "CAT RED"}, turns[2]]
    assert completion == [{"role": "assistant", "content": "DOG"}]
    assert chats.as_last_turn({"messages": turns}) == {"prompt": prompt, "completion": completion}
    assert chats.earlier_assistant_turns([turns, [USER, ANSWER]]) == 1


def test_generation_pairs_ask_the_prompt_and_expect_the_answer() -> None:
    """(prompt, reference) pairs: a conversation's prompt turns and last answer, a text pair's prompt and
    completion, a conversational completion's last assistant turn; at most `limit` of them."""
    conversations = [{"messages": [USER, ANSWER]}, {"messages": [USER, {"role": "assistant", "content": "DOG"}]}]
    assert chats.generation_pairs(conversations, "messages", 1) == [([USER], "CAT RED")]
    pairs = [
        {"prompt": "the red cat sits", "completion": " CAT RED"},
        {"prompt": [USER], "completion": [ANSWER]},
        {"prompt": [USER], "completion": [ANSWER, {"role": "user", "content": "thanks"}]},
    ]
    expected = [("the red cat sits", " CAT RED"), ([USER], "CAT RED"), ([USER], "CAT RED")]
    assert chats.generation_pairs(pairs, "prompt-completion", 5) == expected


# Models and adapters


def test_causal_lm_problem() -> None:
    """A causal LM passes; a classifier checkpoint of a causal-capable type, or a type with no causal LM class,
    is refused with the reason."""
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    assert sft.causal_lm_problem("llama", ["LlamaForCausalLM"], causal) is None
    assert sft.causal_lm_problem("gpt2", ["GPT2LMHeadModel"], causal) is None
    assert sft.causal_lm_problem("llama", [], causal) is None  # a config without architectures: the type decides
    saved = sft.causal_lm_problem("bert", ["BertForSequenceClassification"], causal)
    assert saved is not None and "BertForSequenceClassification" in saved
    assert "vit" not in causal
    kind = sft.causal_lm_problem("vit", ["ViTModel"], causal)
    assert kind is not None and "'vit'" in kind


def test_unmatched_targets_follow_peft_matching() -> None:
    """A target matches a module's full name or its last dotted parts, never part of a name."""
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]
    assert sft.unmatched_targets(["q_proj", "self_attn.v_proj", "all-linear"], names) == []
    assert sft.unmatched_targets(["proj", "query", "model.layers.0.mlp.up_proj"], names) == ["proj", "query"]


@pytest.mark.parametrize(
    ("precision", "adapter", "dtype"),
    [("bf16", True, "bfloat16"), ("fp16", True, "float16"), ("fp32", True, "float32"), ("bf16", False, "float32"),
     ("fp16", False, "float32")],
)  # fmt: skip
def test_base_dtype(precision: str, adapter: bool, dtype: str) -> None:
    """A frozen base under an adapter loads in the training precision; a full fine-tune keeps fp32 weights."""
    assert sft.base_dtype(precision, adapter=Adapter() if adapter else None) == dtype


def test_perplexity_is_exp_loss_capped() -> None:
    """perplexity = exp(loss), and a diverged loss gives a finite number instead of an overflow."""
    assert sft.perplexity(0.0) == 1.0
    assert sft.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert sft.perplexity(1e6) == math.exp(sft.MAX_LOSS) and math.isfinite(sft.perplexity(float("inf")))


# SFTConfig arguments


def test_llm_arguments_are_sft_config_fields(tmp_path: Path) -> None:
    """Every key kubetune adds for text-generation is an SFTConfig field, and they follow the spec."""
    from trl import SFTConfig

    spec = generation_spec(dataset={"maxLength": 64, "packing": True})
    extra = llm_arguments(spec, cuda=False)
    assert set(extra) <= {f.name for f in dataclasses.fields(SFTConfig)}

    def kwargs(spec: FineTuneJobSpec) -> dict[str, Any]:
        return arguments(spec, output_dir=tmp_path, precision="fp32", has_eval=True, cuda=False)

    kw = kwargs(spec)
    assert (kw["max_length"], kw["packing"], kw["eval_packing"]) == (64, True, False)
    assert kwargs(generation_spec())["max_length"] == 1024
    assert "max_length" not in kwargs(parse_spec({"model": {"id": "m"}, "dataset": {"id": "d"}}))


def test_sft_config_is_built_from_a_generation_spec(tmp_path: Path) -> None:
    """training_arguments gives an SFTConfig with the spec's length and packing, and SFTConfig keys in extra."""
    from trl import SFTConfig

    spec = generation_spec(dataset={"maxLength": 48}, hyperparameters={"extra": {"dataset_num_proc": 1}})
    config = training_arguments(spec, output_dir=tmp_path, has_eval=True)
    assert isinstance(config, SFTConfig)
    assert (config.max_length, config.packing, config.dataset_num_proc) == (48, False, 1)


def test_sft_config_keys_are_refused_for_a_classifier(tmp_path: Path) -> None:
    """extra is checked against the task's arguments class: an SFTConfig key is no TrainingArguments field."""
    spec = parse_spec({"model": {"id": "m"}, "dataset": {"id": "d"}, "hyperparameters": {"extra": {"eval_packing": 1}}})
    with pytest.raises(ConfigError) as e:
        training_arguments(spec, output_dir=tmp_path, has_eval=True)
    assert e.value.field == "spec.hyperparameters.extra.eval_packing"


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("max_length", "dataset.maxLength"),
        ("packing", "dataset.packing"),
        ("assistant_only_loss", "dataset.format"),
        ("chat_template_path", "dataset.chatTemplate"),
        ("gradient_checkpointing", "hyperparameters.gradientCheckpointing"),
        ("pad_to_multiple_of", "hyperparameters.padToMultipleOf"),
    ],
)
def test_extra_keys_kubetune_sets_are_refused(key: str, field: str, tmp_path: Path) -> None:
    """An SFTConfig key that a spec field sets is refused, pointing to that field."""
    assert MANAGED[key].startswith(field)
    spec = generation_spec(hyperparameters={"extra": {key: 1}})
    with pytest.raises(ConfigError) as e:
        training_arguments(spec, output_dir=tmp_path, has_eval=True)
    assert e.value.field == f"spec.hyperparameters.extra.{key}" and f"spec.{field}" in e.value.message


def test_gradient_checkpointing_default_follows_the_task(tmp_path: Path) -> None:
    """On by default for text-generation, off for text-classification; an explicit value wins either way."""
    classifier = {"model": {"id": "m"}, "dataset": {"id": "d"}}
    assert gradient_checkpointing(generation_spec()) is True
    assert gradient_checkpointing(parse_spec(classifier)) is False
    assert gradient_checkpointing(generation_spec(hyperparameters={"gradientCheckpointing": False})) is False
    assert gradient_checkpointing(parse_spec({**classifier, "hyperparameters": {"gradientCheckpointing": True}}))
    kw = arguments(generation_spec(), output_dir=tmp_path, precision="fp32", has_eval=True, cuda=False)
    assert kw["activation_checkpointing"] is True


def test_qlora_without_cuda_is_a_permanent_config_error() -> None:
    """QLoRA needs CUDA: elsewhere an InvalidConfig error (exit 10, not retried) on spec.adapter.method; LoRA and
    QLoRA on CUDA pass."""
    qlora = generation_spec(adapter={"method": "qlora"})
    with pytest.raises(ConfigError) as e:
        check_adapter(qlora, cuda=False)
    assert e.value.field == "spec.adapter.method" and "CUDA" in e.value.message
    assert e.value.code == ExitCode.INVALID_CONFIG == 10 and e.value.code in PERMANENT_EXIT_CODES
    check_adapter(qlora, cuda=True)
    check_adapter(generation_spec(adapter={"method": "lora"}), cuda=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is allowed where CUDA is")
def test_qlora_is_refused_before_anything_loads(tmp_path: Path) -> None:
    """training_arguments, the job's first step, refuses QLoRA on this CUDA-less machine."""
    with pytest.raises(ConfigError) as e:
        training_arguments(generation_spec(adapter={"method": "qlora"}), output_dir=tmp_path, has_eval=True)
    assert e.value.field == "spec.adapter.method"


# Spec rules (pydantic's side of SPEC_RULES)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"metrics": ["accuracy"]}, "spec.metrics: accuracy not a text-generation metric"),
        ({"task": "text-classification", "metrics": ["perplexity"]}, "spec.metrics: perplexity not a "),
        ({"metrics": ["exact_match"]}, "spec.evaluation.generate: exact_match scores generated answers"),
        ({"metrics": ["exact_match"], "evaluation": {}}, "spec.evaluation.generate: exact_match"),
        ({"task": "text-classification", "adapter": {}}, "spec.adapter: adapter is a field of the LLM tasks"),
        ({"task": "text-classification", "evaluation": {"generate": {}}}, "spec.evaluation: evaluation is a "),
        ({"task": "text-classification", "dataset": {"format": "text"}}, "spec.dataset: dataset.format and "),
        ({"task": "text-classification", "dataset": {"packing": True}}, "spec.dataset: dataset.format and "),
        ({"task": "text-classification", "dataset": {"chatTemplate": "{{ x }}"}}, "spec.dataset.chatTemplate: "),
        ({"output": {"merge": True}}, "spec.output.merge: output.merge merges an adapter"),
        ({"adapter": {"rank": 0}}, "spec.adapter.rank: "),
        ({"adapter": {"rank": -4}}, "spec.adapter.rank: "),
        ({"adapter": {"alpha": 0}}, "spec.adapter.alpha: "),
        ({"adapter": {"alpha": -1}}, "spec.adapter.alpha: "),
    ],
)
def test_spec_rules_name_the_field(spec: dict[str, Any], problem: str) -> None:
    """Each rule that ties text-generation fields together (or bounds them) names the field to fix."""
    found = spec_problems(**spec)
    assert len(found) == 1 and found[0].startswith(problem), found


def test_generation_spec_defaults() -> None:
    """A text-generation spec evaluates perplexity by default, truncates at 1024 tokens, and a merge with an
    adapter and exact_match with evaluation.generate are valid."""
    spec = generation_spec()
    assert spec.eval_metrics == ["perplexity"] and spec.max_length == 1024
    full = generation_spec(
        adapter={}, output={"merge": True}, metrics=["perplexity", "exact_match"], evaluation={"generate": {}}
    )
    assert full.adapter is not None and full.adapter.scale == 2 * full.adapter.rank and full.output.merge


# On a real tiny causal LM


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


def load(path: Path, attention: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_llama_keeps_packed_examples_apart(llama: Path, attention: str) -> None:
    """transformers' SDPA and eager attention read restarting position ids as a boundary."""
    model = load(llama, attention)
    assert model.config._attn_implementation == attention
    assert sft.packing_keeps_apart(model) is True
    assert model.training is False  # from_pretrained leaves eval mode, and the probe restores it


def test_model_whose_attention_ignores_position_ids_is_caught() -> None:
    """The original GPT (openai-gpt) masks attention with a fixed causal triangle whatever the position ids:
    a packed example sees the one before it, and the probe says so."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(0)
    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=32, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    model.train()
    assert sft.packing_keeps_apart(model) is False
    assert model.training is True  # the probe put the model back in training mode


def test_target_modules_matching_nothing_list_the_linear_layers(llama: Path) -> None:
    """lora_config refuses a target that names no module, listing the model's linear layer names."""
    model = load(llama)
    with pytest.raises(ConfigError) as e:
        sft.lora_config(Adapter(target_modules=["query", "q_proj"]), model)
    assert e.value.field == "spec.adapter.targetModules"
    assert e.value.message.startswith("query matches no module")
    assert "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in e.value.message
    config = sft.lora_config(Adapter(rank=4, target_modules=["q_proj", "v_proj"]), model)
    assert config.r == 4 and config.lora_alpha == 8 and set(config.target_modules) == {"q_proj", "v_proj"}


def test_truncation_report() -> None:
    """Examples TRL dropped are a warning; all of a split's examples dropped is a DataError on maxLength."""
    assert truncation_report("train", 10, 10, 32) == []
    dropped = truncation_report("eval", 10, 7, 32)
    assert dropped == ["3 of 10 eval examples dropped: their answer starts past maxLength 32"]
    with pytest.raises(DataError) as e:
        truncation_report("train", 10, 0, 8)
    assert e.value.field == "spec.dataset.maxLength" and "8 tokens" in e.value.message


def test_messages_loss_follows_the_chat_template(llama: Path, tmp_path: Path) -> None:
    """Without generation markers in the template, conversations become prompt-completion pairs (the loss counts
    the last answer); with them, the messages stay and the loss counts every assistant turn."""
    from transformers import AutoTokenizer

    data = write_chats(tmp_path / "data", train=8, validation=4)
    spec = generation_spec(model={"uri": str(llama)}, dataset={"uri": str(data)})
    task, tokenizer = TextGeneration(), AutoTokenizer.from_pretrained(str(llama))
    plain = task.prepare(load_local(data, spec.dataset), tokenizer, spec, tmp_path / "cache")
    assert not plain.assistant_only_loss and plain.data["train"].column_names == ["prompt", "completion"]
    marked = generation_spec(model={"uri": str(llama)}, dataset={"uri": str(data), "chatTemplate": CHATML_MARKED})
    tokenizer = task.load_tokenizer(Pretrained(str(llama), "spec.model.uri", {}, str(llama)), marked)
    prepared = task.prepare(load_local(data, marked.dataset), tokenizer, marked, tmp_path / "cache")
    assert prepared.assistant_only_loss and prepared.data["train"].column_names == ["messages"]


def test_packed_training_split_reports_no_dropped_examples(llama: Path, tmp_path: Path) -> None:
    """Packed, the training split holds fewer rows (bins of examples) than it had examples; none was dropped,
    and the run reports none."""
    data = write_chats(tmp_path / "data", train=16, validation=4)
    spec = generation_spec(model={"uri": str(llama)}, dataset={"uri": str(data), "maxLength": 64, "packing": True})
    task = TextGeneration()
    tokenizer = task.load_tokenizer(Pretrained(str(llama), "spec.model.uri", {}, str(llama)), spec)
    prepared = task.prepare(load_local(data, spec.dataset), tokenizer, spec, tmp_path / "cache")
    args = training_arguments(spec, output_dir=tmp_path / "out", has_eval=True)
    trainer = task.trainer(
        model=load(llama), args=args, prepared=prepared, tokenizer=tokenizer, spec=spec, callbacks=[]
    )
    assert len(trainer.train_dataset) < 16 and len(trainer.eval_dataset) == 4
    assert prepared.warnings == []
