"""Preference tuning's decisions: the spec's preference block and its rules, the losses TRL supports, the record
checks, how a saved adapter is started from, where its base model is, and the evaluation's metric names."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.spec import PREFERENCE_LOSSES, SpecError, parse_spec
from kubetune_job.arguments import arguments_class, llm_arguments
from kubetune_job.conversations import preference_problem
from kubetune_job.errors import ConfigError, ModelError
from kubetune_job.orchestrate import model_source, saved_adapter_base
from kubetune_job.preference import REWARDS, reward_metrics
from kubetune_job.sft import adapter_plan

USER = [{"role": "user", "content": "the red cat sits"}]
GOOD = [{"role": "assistant", "content": "CAT RED"}]
BAD = [{"role": "assistant", "content": "RED CAT"}]


def preference_spec(**changes: Any) -> Any:
    body = {"model": {"uri": "/models/llm"}, "task": "preference", "dataset": {"uri": "/data/pairs"}, **changes}
    return parse_spec(body)


def test_preference_defaults_and_metrics() -> None:
    """task: preference alone is DPO with beta 0.1 and the sigmoid loss; its default metrics are the rewards."""
    spec = preference_spec()
    settings = spec.preference_settings
    assert (settings.method, settings.beta, settings.loss) == ("dpo", 0.1, "sigmoid")
    assert spec.eval_metrics == ["reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"]
    assert spec.max_length == 1024 and spec.adapter is None


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"task": "text-classification", "preference": {}}, "spec.preference: preference is the field of task"),
        ({"evaluation": {"generate": {}}}, "spec.evaluation: evaluation is a text-generation field"),
        ({"dataset": {"uri": "/d", "packing": True}}, "spec.dataset: dataset.format and dataset.packing"),
        ({"dataset": {"uri": "/d", "format": "messages"}}, "spec.dataset: dataset.format and dataset.packing"),
        ({"metrics": ["perplexity"]}, "spec.metrics: perplexity not a preference metric"),
        ({"preference": {"loss": "kto"}}, "spec.preference.loss: "),
        ({"preference": {"beta": 0}}, "spec.preference.beta: "),
        ({"preference": {"method": "grpo"}}, "spec.preference.method: "),
        ({"adapter": {"init": "resume"}}, "spec.adapter.init: "),
        ({"task": "text-classification", "dataset": {"uri": "/d", "chatTemplate": "{{ x }}"}},
         "spec.dataset.chatTemplate: dataset.chatTemplate is a field of the LLM tasks"),
    ],
)  # fmt: skip
def test_preference_rules_name_the_field(changes: dict[str, Any], problem: str) -> None:
    with pytest.raises(SpecError) as raised:
        preference_spec(**changes)
    assert len(raised.value.problems) == 1 and raised.value.problems[0].startswith(problem), raised.value.problems


def test_preference_takes_an_adapter_and_a_chat_template() -> None:
    spec = preference_spec(
        adapter={"rank": 4, "init": "new"}, dataset={"uri": "/d", "chatTemplate": "{{ x }}"}, metrics=["reward_margin"]
    )
    assert spec.adapter is not None and spec.adapter.init == "new" and spec.eval_metrics == ["reward_margin"]


def test_the_losses_are_those_trl_computes() -> None:
    """spec.preference.loss offers exactly the loss types of the installed TRL's DPOTrainer."""
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    assert set(PREFERENCE_LOSSES) == set(re.findall(r'loss_type == "(\w+)"', source))


def test_dpo_arguments_are_dpo_config_fields() -> None:
    spec = preference_spec(preference={"beta": 0.5, "loss": "ipo"}, dataset={"uri": "/d", "maxLength": 96})
    extra = llm_arguments(spec, cuda=False)
    assert extra["beta"] == 0.5 and extra["loss_type"] == ["ipo"] and extra["max_length"] == 96
    fields = {f.name for f in dataclasses.fields(arguments_class("preference"))}
    assert set(extra) <= fields


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ((USER, GOOD, BAD), None),
        (("the red cat sits", " CAT RED", " RED CAT"), None),
        ((None, GOOD, BAD), "prompt is missing"),
        ((USER, GOOD, None), "rejected is missing"),
        ((USER, GOOD, GOOD), "chosen and rejected are the same answer"),
        (("p", " same", " same"), "chosen and rejected are the same answer"),
        ((USER, [{"role": "assistant", "content": "  "}], BAD), "chosen is empty"),
        (("p", "a", ""), "rejected is empty"),
        ((USER, " CAT RED", BAD), "prompt, chosen and rejected must all be text or all be lists of turns"),
        ((USER, USER, BAD), "no assistant turn"),
        ((USER, GOOD, [{"role": "bot", "content": "x"}]), "rejected[0].role is 'bot'"),
        ((3, "a", "b"), "prompt is int"),
    ],
)
def test_preference_records(record: tuple[Any, Any, Any], problem: str | None) -> None:
    found = preference_problem(*record)
    assert (found is None) if problem is None else (found is not None and found.startswith(problem)), found


def test_adapter_plan() -> None:
    """A saved adapter is continued unless init: new (merge, then a new adapter), or merged for a full fine-tune;
    init: continue on a whole model is a config error naming the field."""
    spec = preference_spec(adapter={})
    assert adapter_plan(spec.adapter, saved=True) == "continue"
    assert adapter_plan(preference_spec(adapter={"init": "continue"}).adapter, saved=True) == "continue"
    assert adapter_plan(preference_spec(adapter={"init": "new"}).adapter, saved=True) == "merge"
    assert adapter_plan(None, saved=True) == "merge"
    assert adapter_plan(spec.adapter, saved=False) == "new"
    assert adapter_plan(preference_spec(adapter={"init": "new"}).adapter, saved=False) == "new"
    assert adapter_plan(None, saved=False) == "full"
    with pytest.raises(ConfigError) as raised:
        adapter_plan(preference_spec(adapter={"init": "continue"}).adapter, saved=False)
    assert raised.value.field == "spec.adapter.init"


def test_saved_adapter_base() -> None:
    assert saved_adapter_base({"base_model_name_or_path": "org/model", "revision": "v2"}) == ("org/model", "v2")
    assert saved_adapter_base({"base_model_name_or_path": "s3://b/base/", "revision": None}) == ("s3://b/base/", None)
    with pytest.raises(ModelError) as raised:
        saved_adapter_base({"base_model_name_or_path": " "})
    assert raised.value.field == "spec.model.uri" and "base_model_name_or_path" in raised.value.message


def write_adapter(directory: Path, base: str, **config: Any) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, **config}))
    return directory


def test_model_source_finds_a_saved_adapters_base(tmp_path: Path) -> None:
    """model.uri holding an adapter: its base is the path or Hub id (with its revision) the adapter names; the
    tokenizer comes from the adapter's directory when it holds one; a base that is itself an adapter, or that is
    missing, is a model error naming spec.model.uri."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = write_adapter(tmp_path / "sft", str(base))
    found = model_source(preference_spec(model={"uri": str(adapter)}), tmp_path / "work")
    assert (found.path, found.reference, found.adapter, found.tokenizer) == (str(base), str(base), str(adapter),
                                                                             str(base))  # fmt: skip
    (adapter / "tokenizer_config.json").write_text("{}")
    assert found.tokenizer == str(adapter)

    hub = model_source(preference_spec(model={"uri": str(write_adapter(tmp_path / "h", "org/llm", revision="r1"))}),
                       tmp_path / "work")  # fmt: skip
    assert (hub.path, hub.hub["revision"], hub.reference) == ("org/llm", "r1", "org/llm")

    chained = write_adapter(tmp_path / "chained", str(adapter))
    with pytest.raises(ModelError) as raised:
        model_source(preference_spec(model={"uri": str(chained)}), tmp_path / "work")
    assert raised.value.field == "spec.model.uri" and "is itself an adapter" in raised.value.message
    gone = write_adapter(tmp_path / "gone", str(tmp_path / "nowhere" / "base"))
    with pytest.raises(ModelError) as raised:
        model_source(preference_spec(model={"uri": str(gone)}), tmp_path / "work")
    assert "nowhere/base (the base model that" in raised.value.message and "does not exist" in raised.value.message


def test_reward_metrics_take_kubetunes_names() -> None:
    found = {"rewards/accuracies": [1.0, 0.5], "rewards/margins": [0.2, 0.4], "rewards/chosen": [0.1],
             "rewards/rejected": [-0.1], "logps/chosen": [-3.0]}  # fmt: skip
    assert reward_metrics(found) == pytest.approx(
        {
            "eval_reward_accuracy": 0.75,
            "eval_reward_margin": 0.3,
            "eval_chosen_reward": 0.1,
            "eval_rejected_reward": -0.1,
        }
    )
    assert reward_metrics({}) == {} and set(REWARDS) == {"reward_accuracy", "reward_margin", "chosen_reward",
                                                        "rejected_reward"}  # fmt: skip
