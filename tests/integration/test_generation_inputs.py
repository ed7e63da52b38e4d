"""Bad text-generation inputs, each run through the job as a pod runs it: each fails before training with a
permanent exit code and a summary whose field and message point at what to fix.

One case runs `python -m kubetune_job` in a subprocess, as the pod does; the others call the same entry point,
orchestrate.execute, in this process, with the settings the pod's environment gives: starting a process imports
torch, transformers, TRL and PEFT again, which takes far longer than reaching any of these errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kubetune_api.exit_codes import PERMANENT_EXIT_CODES, ExitCode
from kubetune_api.settings import JobSettings
from kubetune_job.orchestrate import execute
from tests import jobrun
from tests.models import build_tiny_bert, build_tiny_llama, write_chats

pytestmark = pytest.mark.integration

USER = {"role": "user", "content": "the red cat sits"}
ANSWER = {"role": "assistant", "content": "CAT RED"}


def write_records(directory: Path, train: list[dict[str, Any]], validation: list[dict[str, Any]]) -> Path:
    """A dataset directory with train.jsonl and validation.jsonl holding these records."""
    directory.mkdir(parents=True)
    for split, records in (("train", train), ("validation", validation)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny causal LM (with and without a chat template), a tiny classifier, good data and bad data."""
    base = tmp_path_factory.mktemp("generation-inputs")
    good = [{"messages": [USER, ANSWER]}] * 4
    unanswered = [{"prompt": "the red cat sits", "answer": " CAT RED"}] * 4
    return {
        "llama": build_tiny_llama(base / "llama"),
        "llama-without-template": build_tiny_llama(base / "llama-without-template", template=None),
        "bert": build_tiny_bert(base / "bert"),
        "messages": write_chats(base / "messages", train=16, validation=4),
        "text": write_chats(base / "text", train=16, validation=4, fmt="text"),
        "unknown-role": write_records(
            base / "unknown-role", [*good, {"messages": [USER, {"role": "bot", "content": "CAT"}]}], good
        ),
        "no-answer": write_records(base / "no-answer", good, [*good, {"messages": [USER]}]),
        "no-completion": write_records(base / "no-completion", unanswered, unanswered),
    }


def run_failing(
    assets: dict[str, Path],
    work: Path,
    *,
    model: str = "llama",
    data: str = "messages",
    subprocess: bool = False,
    **spec: Any,
) -> tuple[int, dict[str, Any]]:
    """Run the job on the named model and data (spec: top-level fields to add or update), in this process or a
    subprocess; its exit code and summary, after checking that it failed with a permanent code before training."""
    job = jobrun.manifest(
        model=str(assets[model]),
        data=str(assets[data]),
        checkpoints=str(work / "checkpoints"),
        output=str(work / "output"),
        metrics=(),
        epochs=1,
    )
    job["spec"]["task"] = "text-generation"
    for key, value in spec.items():
        job["spec"][key] = {**job["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    if subprocess:
        code = jobrun.start(job, work).wait(timeout=300)
        log = jobrun.log_tail(work)
    else:
        work.mkdir(parents=True, exist_ok=True)
        (work / "job.yaml").write_text(yaml.safe_dump(job))
        settings = JobSettings(
            spec_file=work / "job.yaml", work_dir=work / "scratch", summary_path=work / "summary.json"
        )
        code, log = execute(settings), ""
    assert code in PERMANENT_EXIT_CODES, f"exit code {code}:\n{log}"
    summary: dict[str, Any] = json.loads((work / "summary.json").read_text())
    assert summary["phase"] == "Failed" and summary["exitCode"] == code
    assert "finalStep" not in summary and not any((work / "checkpoints").glob("checkpoint-*"))  # before training
    return code, summary


def test_unknown_role_names_the_record(assets: dict[str, Path], tmp_path: Path) -> None:
    """A messages record with a role that is not a chat role: `python -m kubetune_job` exits with the data error
    code, its summary naming the split, the record and the turn."""
    code, summary = run_failing(assets, tmp_path, data="unknown-role", subprocess=True)
    assert code == ExitCode.DATA_ERROR and summary["field"] == "spec.dataset.trainSplit"
    assert "record 4: messages[1].role is 'bot'" in summary["message"]


def test_conversation_without_answer_names_the_record(assets: dict[str, Path], tmp_path: Path) -> None:
    """A conversation with no assistant turn, in the evaluation split: a data error naming that split's field."""
    code, summary = run_failing(assets, tmp_path, data="no-answer")
    assert code == ExitCode.DATA_ERROR and summary["field"] == "spec.dataset.evalSplit"
    assert "split 'validation'" in summary["message"] and "record 4: no assistant turn" in summary["message"]


def test_missing_completion_column_names_the_columns(assets: dict[str, Path], tmp_path: Path) -> None:
    """format prompt-completion on data with no completion column: a data error listing the columns found."""
    code, summary = run_failing(assets, tmp_path, data="no-completion", dataset={"format": "prompt-completion"})
    assert code == ExitCode.DATA_ERROR and summary["field"] == "spec.dataset.format"
    assert "completion not found (columns: prompt, answer)" in summary["message"]


def test_every_answer_truncated_is_a_max_length_error(assets: dict[str, Path], tmp_path: Path) -> None:
    """maxLength so short that truncation cuts every answer: nothing to learn, a data error on maxLength."""
    code, summary = run_failing(assets, tmp_path, dataset={"maxLength": 8})
    assert code == ExitCode.DATA_ERROR and summary["field"] == "spec.dataset.maxLength"
    assert "every example of the train split" in summary["message"] and "8 tokens" in summary["message"]


def test_target_modules_matching_nothing_list_the_modules(assets: dict[str, Path], tmp_path: Path) -> None:
    """targetModules naming no module of the model: a config error listing the linear layers it has."""
    code, summary = run_failing(assets, tmp_path, adapter={"targetModules": ["query", "value"]})
    assert code == ExitCode.INVALID_CONFIG and summary["field"] == "spec.adapter.targetModules"
    message = summary["message"]
    assert message.startswith("query, value match no module")
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message


def test_classifier_is_not_a_causal_lm(assets: dict[str, Path], tmp_path: Path) -> None:
    """A sequence classifier given to text-generation: a model error saying why, before the data is read
    (its tokenizer has no chat template either, which is not the problem to report)."""
    code, summary = run_failing(assets, tmp_path, model="bert")
    assert code == ExitCode.MODEL_ERROR and summary["field"] == "spec.model.uri"
    assert "not a causal language model" in summary["message"]
    assert "BertForSequenceClassification" in summary["message"]


def test_tokenizer_without_chat_template(assets: dict[str, Path], tmp_path: Path) -> None:
    """messages data and a tokenizer without a chat template: a config error naming both fields."""
    code, summary = run_failing(assets, tmp_path, model="llama-without-template")
    assert code == ExitCode.INVALID_CONFIG and summary["field"] == "spec.dataset.chatTemplate"
    assert "spec.model" in summary["message"] and "spec.dataset.chatTemplate" in summary["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA runs where CUDA is")
def test_qlora_without_cuda(assets: dict[str, Path], tmp_path: Path) -> None:
    """QLoRA on a machine without CUDA: exit 10 on spec.adapter.method."""
    code, summary = run_failing(assets, tmp_path, adapter={"method": "qlora"})
    assert code == ExitCode.INVALID_CONFIG == 10 and summary["field"] == "spec.adapter.method"
    assert "CUDA" in summary["message"]


def test_generation_on_text_data(assets: dict[str, Path], tmp_path: Path) -> None:
    """evaluation.generate on text data, which has no prompts to answer: a config error on that field."""
    code, summary = run_failing(assets, tmp_path, data="text", evaluation={"generate": {"examples": 2}})
    assert code == ExitCode.INVALID_CONFIG and summary["field"] == "spec.evaluation.generate"
    assert "text data" in summary["message"]
