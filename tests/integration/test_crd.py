"""The FineTuneJob CRD on a real kube-apiserver: schema, defaults, CEL rules and printer columns."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from typing import Any

import pytest

from kubetune_api.spec import SPEC_RULES, SpecError, parse_manifest
from tests.kube import apply as kube_apply
from tests.kube import install_crd, kubectl
from tests.status_cases import derived_statuses, without_nulls
from tests.unit.test_spec import GOOD as SPEC_GOOD

pytestmark = pytest.mark.integration

GOOD: dict[str, Any] = {
    **SPEC_GOOD,
    "spec": {**SPEC_GOOD["spec"], "storage": {"endpoint": "http://seaweedfs.storage:8333"}},
}


@pytest.fixture(scope="module")
def installed(control_plane: Any) -> Any:
    install_crd(control_plane)
    return control_plane


def apply(plane: Any, namespace: str, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return kube_apply(plane, doc, namespace=namespace)


def rejected(plane: Any, namespace: str, doc: dict[str, Any]) -> str:
    done = apply(plane, namespace, doc)
    assert done.returncode != 0, f"the API server accepted {doc['spec']}"
    return done.stderr


def with_spec(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["spec"].update(changes)
    return doc


def test_valid_manifest_is_stored_with_defaults(installed: Any, namespace: str) -> None:
    """A minimal FineTuneJob is accepted and the schema's defaults are filled in."""
    assert apply(installed, namespace, GOOD).returncode == 0
    got = json.loads(kubectl(installed, "get", "ftj", "bert-mrpc", "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["hyperparameters"]["epochs"] == 3 and got["spec"]["checkpoints"]["keep"] == 2
    assert got["spec"]["dataset"]["textFields"] == ["sentence1", "sentence2"]


def test_both_id_and_uri_is_rejected(installed: Any, namespace: str) -> None:
    """model with id and uri fails the one-of CEL rule."""
    err = rejected(installed, namespace, with_spec(model={"id": "bert-base-cased", "uri": "s3://b/m/"}))
    assert "set exactly one of id or uri" in err


def test_zero_epochs_is_rejected(installed: Any, namespace: str) -> None:
    """epochs 0 is below the schema's exclusive minimum."""
    err = rejected(installed, namespace, with_spec(hyperparameters={"epochs": 0}))
    assert "spec.hyperparameters.epochs" in err


def test_storage_endpoint_must_be_a_url(installed: Any, namespace: str) -> None:
    """A storage endpoint that is not http(s)://... is rejected."""
    err = rejected(installed, namespace, with_spec(storage={"endpoint": "seaweedfs:8333"}))
    assert "spec.storage.endpoint" in err


def test_unknown_field_is_rejected(installed: Any, namespace: str) -> None:
    """kubectl's strict field validation rejects an unknown field by name."""
    err = rejected(installed, namespace, with_spec(serviceAccountName="admin"))
    assert "serviceAccountName" in err and "unknown field" in err


def test_bad_uri_scheme_is_rejected(installed: Any, namespace: str) -> None:
    """A gs:// URI fails the scheme rule."""
    err = rejected(installed, namespace, with_spec(output={"uri": "gs://bucket/x/"}))
    assert "use s3://bucket/prefix/ or a local path" in err


def test_model_cannot_change_after_creation(installed: Any, namespace: str) -> None:
    """Changing spec.model is rejected by a transition rule; suspend may change."""
    assert apply(installed, namespace, GOOD).returncode == 0
    err = rejected(installed, namespace, with_spec(model={"id": "roberta-base"}))
    assert "spec.model cannot change after creation" in err
    assert apply(installed, namespace, with_spec(runPolicy={"suspend": True})).returncode == 0


def test_eval_every_accepts_epoch_or_steps(installed: Any, namespace: str) -> None:
    """evalEvery takes 'epoch' or a positive integer, nothing else."""
    assert apply(installed, namespace, with_spec(hyperparameters={"evalEvery": 100})).returncode == 0
    err = rejected(installed, namespace, with_spec(hyperparameters={"evalEvery": "hourly"}))
    assert "positive number of steps" in err


def test_explain_describes_the_fields(installed: Any) -> None:
    """kubectl explain teaches the API from the schema's descriptions."""
    out = kubectl(installed, "explain", "ftj.spec.dataset").stdout
    assert "textFields" in out and "One text column" in out


def with_name(name: str, **changes: Any) -> dict[str, Any]:
    doc = with_spec(**changes)
    doc["metadata"] = {"name": name}
    return doc


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (with_name("a" * 64), "metadata.name"),
        (with_name("a" * 62), "metadata.name"),
        (with_name("a" * 56, resources={"nodes": 2}), "metadata.name"),
        (with_name("a.b", resources={"nodes": 2}), "metadata.name"),
        (with_spec(scheduling={"nodeSelector": {"bad key": "x"}}), "spec.scheduling.nodeSelector"),
        (with_spec(scheduling={"nodeSelector": {"gpu": "not a value"}}), "spec.scheduling.nodeSelector"),
        (with_spec(scheduling={"tolerations": [{"operator": "Equal", "value": "x"}]}), "spec.scheduling.tolerations"),
        (with_spec(scheduling={"tolerations": [{"key": "k", "tolerationSeconds": 1}]}), "spec.scheduling.tolerations"),
        (with_spec(scheduling={"priorityClassName": "Not_A_Name"}), "spec.scheduling.priorityClassName"),
        (with_spec(scheduling={"queueName": "not a label value"}), "spec.scheduling.queueName"),
        (with_spec(runPolicy={"ttlSecondsAfterFinished": 2**31}), "spec.runPolicy.ttlSecondsAfterFinished"),
        (with_spec(image="registry.test/job: 1"), "spec.image"),
        (with_spec(hyperparameters={"extra": {"deepspeed": {"a": {"b": {"c": {"d": {"e": 1}}}}}}}), "extra.deepspeed"),
    ],
)
def test_what_the_job_or_service_would_refuse_is_refused_here(
    installed: Any, namespace: str, doc: dict[str, Any], field: str
) -> None:
    """What the operator's Job, pods or Service could not carry is refused at once, naming the field."""
    assert field in rejected(installed, namespace, doc)


def test_topology_without_a_queue_is_refused_naming_topology(installed: Any, namespace: str) -> None:
    """Only Kueue reads scheduling.topology: without queueName the server refuses it, on that field and with
    the CLI's message; with a queue it is stored with its default mode."""
    topology = {"level": "example.com/rack"}
    err = rejected(installed, namespace, with_spec(scheduling={"topology": topology}))
    assert "spec.scheduling.topology" in err and "set scheduling.queueName" in err, err
    queued = with_spec(scheduling={"queueName": "team", "topology": topology})
    assert apply(installed, namespace, queued).returncode == 0
    stored = json.loads(kubectl(installed, "get", "ftj", "bert-mrpc", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["scheduling"]["topology"] == {**topology, "mode": "Required"}


def test_duplicate_metrics_are_refused(installed: Any, namespace: str) -> None:
    """metrics is a set: a metric listed twice is refused, as the CLI refuses it."""
    assert "spec.metrics[1]: Duplicate value" in rejected(installed, namespace, with_spec(metrics=["f1", "f1"]))


def test_every_derived_status_survives_the_api_server(installed: Any, namespace: str) -> None:
    """Each status the operator derives in the decision tests is written through the status subresource
    and read back whole: the generated schema prunes nothing the operator writes."""
    assert apply(installed, namespace, GOOD).returncode == 0
    for status in derived_statuses():
        stored = json.loads(kubectl(installed, "get", "ftj", "bert-mrpc", "-n", namespace, "-o", "json").stdout)
        stored["status"] = status
        kubectl(installed, "replace", "--subresource=status", "-n", namespace, "-f", "-", stdin=json.dumps(stored))
        got = json.loads(kubectl(installed, "get", "ftj", "bert-mrpc", "-n", namespace, "-o", "json").stdout)
        assert got["status"] == without_nulls(status)


# --- text-generation: its fields and the rules that tie spec fields together (spec.SPEC_RULES) -----------

TEXT_GENERATION: dict[str, Any] = {
    "task": "text-generation",
    "model": {"uri": "s3://models/smollm2-135m-instruct/"},
    "dataset": {"uri": "s3://data/support-chats/", "format": "messages", "packing": False, "maxLength": 1024},
    "adapter": {"method": "lora", "rank": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]},
    "evaluation": {"generate": {"examples": 64, "maxNewTokens": 128}},
    "metrics": ["perplexity", "exact_match"],
    "output": {"uri": "s3://models/support-bot/", "merge": True},
}


GLUE = SPEC_GOOD["spec"]["dataset"]


def generation(**changes: Any) -> dict[str, Any]:
    doc = with_spec(**TEXT_GENERATION)
    doc["spec"].update(changes)
    return doc


def refused_field(stderr: str) -> str:
    """The field an API server error is reported on: `<field>: Invalid value: ...`."""
    found = re.search(r"(spec[\w.\[\]]*): Invalid value", stderr)
    assert found, stderr
    return found.group(1)


def cli_fields(doc: dict[str, Any]) -> set[str]:
    with pytest.raises(SpecError) as e:
        parse_manifest(doc)
    return {line.split(":", 1)[0] for line in e.value.problems}


def test_a_text_generation_manifest_is_stored_with_its_defaults(installed: Any, namespace: str) -> None:
    """The issue's text-generation manifest is accepted; a bare adapter and generate block get their defaults."""
    assert apply(installed, namespace, generation()).returncode == 0
    bare = with_name(
        "bare-chat",
        task="text-generation",
        adapter={},
        evaluation={"generate": {}},
        metrics=["exact_match"],
    )
    assert apply(installed, namespace, bare).returncode == 0
    got = json.loads(kubectl(installed, "get", "ftj", "bare-chat", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["adapter"] == {"method": "lora", "rank": 16, "dropout": 0.05, "targetModules": ["all-linear"]}
    assert got["evaluation"]["generate"] == {"examples": 64, "maxNewTokens": 128}
    assert got["dataset"]["packing"] is False and got["output"]["merge"] is False
    assert "format" not in got["dataset"] and "chatTemplate" not in got["dataset"]


# --- preference: its fields, and the rules that keep them to their task --------------------------------

#: The minimal preference manifest: DPO on a LoRA adapter, everything else defaulted.
PREFERENCE: dict[str, Any] = {
    "task": "preference",
    "model": {"uri": "s3://models/support-bot/"},
    "dataset": {"uri": "s3://data/ticket-preferences/"},
    "adapter": {"rank": 8},
    "preference": {"beta": 0.1},
}


def preference(**changes: Any) -> dict[str, Any]:
    doc = with_name("prefs", **PREFERENCE)
    doc["spec"].update(changes)
    return doc


def test_a_preference_manifest_is_stored_with_its_defaults(installed: Any, namespace: str) -> None:
    """The minimal preference manifest is accepted: spec.preference gets DPO and the sigmoid loss, the adapter
    its defaults but no init (a saved adapter is continued unless init says otherwise); the CLI agrees."""
    doc = preference()
    assert parse_manifest(copy.deepcopy(doc)).spec.eval_metrics == [
        "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"
    ]  # fmt: skip
    assert apply(installed, namespace, doc).returncode == 0
    got = json.loads(kubectl(installed, "get", "ftj", "prefs", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["preference"] == {"method": "dpo", "beta": 0.1, "loss": "sigmoid"}
    assert got["adapter"] == {"method": "lora", "rank": 8, "dropout": 0.05, "targetModules": ["all-linear"]}
    assert got["dataset"]["packing"] is False and "format" not in got["dataset"]
    assert "metrics" not in got or got["metrics"] == []
    # A bare preference block takes every default too; the task alone (a full fine-tune) is valid.
    bare = with_name("bare-prefs", task="preference", model=PREFERENCE["model"], dataset=PREFERENCE["dataset"],
                     preference={})  # fmt: skip
    assert apply(installed, namespace, bare).returncode == 0
    got = json.loads(kubectl(installed, "get", "ftj", "bare-prefs", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["preference"] == {"method": "dpo", "beta": 0.1, "loss": "sigmoid"} and "adapter" not in got
    alone = with_name("task-alone", task="preference", model=PREFERENCE["model"], dataset=PREFERENCE["dataset"])
    assert apply(installed, namespace, alone).returncode == 0


def test_a_preference_manifest_takes_a_chat_template_metrics_and_a_merge(installed: Any, namespace: str) -> None:
    """dataset.chatTemplate is a field of every LLM task; metrics are the task's; a merge needs the adapter."""
    doc = preference(
        dataset={**PREFERENCE["dataset"], "chatTemplate": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
        preference={"method": "dpo", "beta": 0.5, "loss": "ipo"},
        metrics=["reward_margin", "reward_accuracy"],
        output={"uri": "s3://models/support-bot-dpo/", "merge": True},
    )
    assert parse_manifest(copy.deepcopy(doc)).spec.eval_metrics == ["reward_margin", "reward_accuracy"]
    done = apply(installed, namespace, doc)
    assert done.returncode == 0, done.stderr
    got = json.loads(kubectl(installed, "get", "ftj", "prefs", "-n", namespace, "-o", "json").stdout)["spec"]
    assert got["dataset"]["chatTemplate"].startswith("{% for m") and got["preference"]["loss"] == "ipo"


@pytest.mark.parametrize("init", ["continue", "new"])
def test_adapter_init_takes_continue_or_new(installed: Any, namespace: str, init: str) -> None:
    """adapter.init is continue or new, for either LLM task; the API server and the CLI accept both."""
    for doc in (preference(adapter={"rank": 8, "init": init}), generation(adapter={"init": init})):
        doc["metadata"] = {"name": f"init-{init}-{doc['spec']['task']}"}
        adapter = parse_manifest(copy.deepcopy(doc)).spec.adapter
        assert adapter is not None and adapter.init == init
        done = apply(installed, namespace, doc)
        assert done.returncode == 0, done.stderr
        name = doc["metadata"]["name"]
        got = json.loads(kubectl(installed, "get", "ftj", name, "-n", namespace, "-o", "json").stdout)["spec"]
        assert got["adapter"]["init"] == init


@pytest.mark.parametrize(
    ("doc", "field", "said"),
    [
        pytest.param(preference(preference={"loss": "dpo"}), "spec.preference.loss", "Unsupported value", id="loss"),
        pytest.param(
            preference(preference={"loss": "Sigmoid"}), "spec.preference.loss", "Unsupported value", id="loss-case"
        ),
        pytest.param(
            preference(preference={"method": "orpo"}), "spec.preference.method", "Unsupported value", id="method"
        ),
        pytest.param(preference(preference={"beta": 0}), "spec.preference.beta", "greater than 0", id="beta-zero"),
        pytest.param(
            preference(preference={"beta": 101}), "spec.preference.beta", "less than or equal to 100", id="beta-large"
        ),
        pytest.param(preference(adapter={"init": "merge"}), "spec.adapter.init", "Unsupported value", id="init"),
        pytest.param(preference(adapter={"init": "New"}), "spec.adapter.init", "Unsupported value", id="init-case"),
    ],
)
def test_bad_preference_values_are_refused(
    installed: Any, namespace: str, doc: dict[str, Any], field: str, said: str
) -> None:
    """An unknown loss or method, a beta out of (0, 100], an unknown adapter.init: refused by the API server
    and the CLI, both naming the field."""
    err = rejected(installed, namespace, doc)
    assert re.search(rf"{re.escape(field)}: (Unsupported|Invalid) value", err) and said in err, err
    assert field in cli_fields(doc), cli_fields(doc)


#: A case of each of SPEC_RULES (its index) for each task: what breaks it.
RULE_CASES = [
    pytest.param(0, with_spec(metrics=["perplexity"]), id="classifier-perplexity"),
    pytest.param(0, generation(metrics=["accuracy"]), id="generation-accuracy"),
    pytest.param(0, with_spec(metrics=["reward_accuracy"]), id="classifier-reward-accuracy"),
    pytest.param(0, generation(metrics=["perplexity", "reward_margin"]), id="generation-reward-margin"),
    pytest.param(0, preference(metrics=["perplexity"]), id="preference-perplexity"),
    pytest.param(0, preference(metrics=["reward_accuracy", "f1"]), id="preference-f1"),
    pytest.param(1, generation(evaluation={}), id="exact-match-without-generate"),
    pytest.param(1, generation(evaluation=None), id="exact-match-without-evaluation"),
    pytest.param(2, with_spec(adapter={"rank": 8}), id="classifier-adapter"),
    pytest.param(2, with_spec(task="text-classification", adapter={}), id="explicit-classifier-adapter"),
    pytest.param(3, with_spec(evaluation={"generate": {"examples": 4}}), id="classifier-evaluation"),
    pytest.param(3, preference(evaluation={"generate": {"examples": 4}}), id="preference-evaluation"),
    pytest.param(3, preference(evaluation={}), id="preference-empty-evaluation"),
    pytest.param(4, with_spec(dataset={**GLUE, "format": "text"}), id="classifier-format"),
    pytest.param(4, with_spec(dataset={**GLUE, "packing": True}), id="classifier-packing"),
    pytest.param(4, preference(dataset={**PREFERENCE["dataset"], "format": "messages"}), id="preference-format"),
    pytest.param(4, preference(dataset={**PREFERENCE["dataset"], "packing": True}), id="preference-packing"),
    pytest.param(5, with_spec(dataset={**GLUE, "chatTemplate": "{{ messages }}"}), id="classifier-template"),
    pytest.param(6, generation(adapter=None), id="merge-without-adapter"),
    pytest.param(6, preference(adapter=None, output={"merge": True}), id="preference-merge-without-adapter"),
    pytest.param(7, with_spec(preference={"beta": 0.1}), id="classifier-preference"),
    pytest.param(7, with_spec(preference={}), id="classifier-empty-preference"),
    pytest.param(7, generation(preference={"loss": "ipo"}), id="generation-preference"),
]


@pytest.mark.parametrize(("rule", "doc"), RULE_CASES)
def test_each_cross_field_rule_refuses_with_its_message(
    installed: Any, namespace: str, rule: int, doc: dict[str, Any]
) -> None:
    """Each of SPEC_RULES refuses what FineTuneJobSpec._consistent refuses, with its message, on the field
    the CLI names (the rule's own fieldPath: spec.adapter, spec.preference...)."""
    doc["spec"] = {k: v for k, v in doc["spec"].items() if v is not None}
    err = rejected(installed, namespace, doc)
    assert str(SPEC_RULES[rule]["message"]) in err, err
    assert refused_field(err) in cli_fields(doc), (err, cli_fields(doc))
    assert refused_field(err) == "spec" + str(SPEC_RULES[rule]["fieldPath"]), err


def test_every_cross_field_rule_is_exercised() -> None:
    """The cases above break each of SPEC_RULES at least once (a rule added later needs a case)."""
    assert {case.values[0] for case in RULE_CASES} == set(range(len(SPEC_RULES)))
