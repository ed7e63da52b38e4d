"""The chat quickstart a newcomer runs: LoRA on the real SmolLM2-135M-Instruct, offline, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "chat-quickstart.yaml"
MODEL = ROOT / "examples" / "models" / "SmolLM2-135M-Instruct"
DATA = ROOT / "examples" / "data" / "ticket-routing"
PREFERENCE_EXAMPLE = ROOT / "examples" / "preference-quickstart.yaml"


def base_exact_match(limit: int, max_new_tokens: int) -> float:
    """The untuned model's exact match on the same validation prompts, scored by the job's own functions."""
    import evaluate
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_job.conversations import generation_pairs
    from kubetune_job.metric_modules import module_path
    from kubetune_job.sft import answers, greedy_answers

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as the job's trainer sets it
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="float32").eval()
    records = load_dataset("json", data_files=str(DATA / "validation.jsonl"), split="train")
    asked = answers(tokenizer, generation_pairs(records, "messages", limit), [], max_new_tokens)
    predictions = greedy_answers(
        model, tokenizer, asked.prompts, max_new_tokens=max_new_tokens, batch=16, special_tokens=asked.special_tokens
    )
    scored = evaluate.load(str(module_path("exact_match"))).compute(
        predictions=predictions, references=asked.references
    )
    return float(scored["exact_match"])


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`kubetune run examples/chat-quickstart.yaml` in a fresh work directory: the run's directory and the command."""
    if not (MODEL / "config.json").is_file():
        pytest.fail("examples/models/SmolLM2-135M-Instruct is missing: run `make install` first")
    workdir = tmp_path_factory.mktemp("runs")
    return workdir / "chat-quickstart", kubetune_run(EXAMPLE, workdir)


def kubetune_run(manifest: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kubetune_cli", "run", str(manifest), "--workdir", str(workdir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_chat_quickstart_teaches_the_base_model_a_skill_it_lacks(
    chat_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    """`kubetune run examples/chat-quickstart.yaml` succeeds offline; exact match on the held-out chats ends at
    least 0.5 above the base model's on the same prompts; the adapter and a merged model that plain
    from_pretrained loads are written."""
    run, done = chat_run
    summary = json.loads((run / "summary.json").read_text())
    tuned = summary["metrics"]["evalExactMatch"]
    base = base_exact_match(limit=48, max_new_tokens=8)
    assert tuned >= base + 0.5, (base, tuned)
    assert summary["trainTokensPerSecond"] > 0 and "evalExactMatch" in done.stdout
    model = run / "model"
    assert (model / "adapter_model.safetensors").is_file() and (model / "chat_template.jinja").is_file()
    assert "base_model:" in (model / "README.md").read_text()

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(model / "merged")
    assert merged.config.model_type == "llama"


def test_preference_quickstart_aligns_the_chat_quickstarts_adapter(
    chat_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """`examples/preference-quickstart.yaml` on the chat quickstart's output (its model.uri, relative to the
    repository's own run directory, pointed at this test's run; every other field as shipped): DPO continues the
    adapter and the held-out reward accuracy ends clearly above chance (0 before training: the model is its own
    reference), with the chosen answers rewarded over the rejected ones."""
    import yaml

    run, _ = chat_run
    doc = yaml.safe_load(PREFERENCE_EXAMPLE.read_text())
    doc["spec"]["model"]["uri"] = str(run / "model")
    doc["spec"]["dataset"]["uri"] = str(PREFERENCE_EXAMPLE.parent / doc["spec"]["dataset"]["uri"])
    manifest = tmp_path / "preference-quickstart.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    kubetune_run(manifest, tmp_path)
    summary = json.loads((tmp_path / "preference-quickstart" / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["phase"] == "Succeeded" and metrics["evalRewardAccuracy"] >= 0.75, metrics
    assert metrics["evalChosenReward"] > metrics["evalRejectedReward"]
    card = (tmp_path / "preference-quickstart" / "model" / "README.md").read_text()
    assert "trained further" in card
