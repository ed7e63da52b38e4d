"""Preference tuning (DPO) end to end on CPU, as a pod runs it: a tiny Llama learns to prefer the right answer of
each pair, from its base model with a new adapter or from a text-generation job's adapter output (continued, or
merged in under a new adapter), through resumes after SIGKILL and SIGTERM, in two processes, from S3, and on
bad data, which fails before training with a field and a record named.
"""

from __future__ import annotations

import json
import math
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.exit_codes import ExitCode
from tests import jobrun
from tests.integration import test_distributed as two
from tests.integration.test_generation import ADAPTER, MANIFEST, STATE, adapter_weights, committed, generation_job
from tests.models import CHATML, build_tiny_llama, write_chats, write_preferences

pytestmark = pytest.mark.integration

#: 160 training pairs, batch 8: 20 steps an epoch, 40 in the 2 epochs.
STEPS = 40
BATCH = 8
REWARDS = {"evalRewardAccuracy", "evalRewardMargin", "evalChosenReward", "evalRejectedReward", "evalLoss"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama (seeded weights), its chats, preference pairs as chat turns and as text, and the adapter
    output of a short text-generation (SFT) run on the chats: the usual starting point of preference tuning."""
    import torch

    base = tmp_path_factory.mktemp("preference")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_tiny_llama(base / "model", template=CHATML)
    chats = write_chats(base / "chats", train=80, validation=8)
    sft_work = base / "sft"
    sft = generation_job(model, chats, sft_work, generate=False, maxSteps=10, every=10)
    summary = jobrun.run_job(sft, sft_work)
    assert summary["phase"] == "Succeeded"
    return {
        "model": model,
        "pairs": write_preferences(base / "pairs", train=160, validation=16),
        "text-pairs": write_preferences(base / "text-pairs", train=160, validation=16, chat_turns=False),
        "sft": sft_work / "output",
        "chats": chats,
    }


def preference_job(model: Path | str, data: Path | str, work: Path, *, every: int = 10, **spec: Any) -> dict[str, Any]:
    """A preference FineTuneJob on the pairs: DPO (beta 0.1) with a LoRA rank 8 adapter, evaluated every 20 steps.
    spec: top-level spec fields to add or update (hyperparameters among them)."""
    doc = generation_job(model, data, work, adapter=False, generate=False, every=every, learningRate=1e-2,
                         evalEvery=20)  # fmt: skip
    body = doc["spec"]
    body.update(task="preference", metrics=[], adapter={"rank": 8}, preference={"beta": 0.1})
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return doc


@pytest.fixture(scope="module")
def continued(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run continuing the SFT adapter: its work directory and summary."""
    work = tmp_path_factory.mktemp("continued")
    job = preference_job(tiny["sft"], tiny["pairs"], work, hyperparameters={"learningRate": 3e-3})
    return {"work": work, "summary": jobrun.run_job(job, work)}


def test_a_new_adapter_learns_the_preference(tiny: dict[str, Path], tmp_path: Path) -> None:
    """DPO with a new adapter on the base model: held-out reward accuracy well above chance, chosen rewarded over
    rejected; the summary counts pairs, not the sequences the model read; the output holds the adapter alone (no
    reference copy), naming its base model, and a card with the method and the reward metrics."""
    summary = jobrun.run_job(preference_job(tiny["model"], tiny["pairs"], tmp_path), tmp_path)
    metrics = summary["metrics"]
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == summary["totalSteps"] == STEPS
    assert REWARDS | {"trainLoss"} == set(metrics), metrics
    assert metrics["evalRewardAccuracy"] >= 0.8, metrics
    assert metrics["evalChosenReward"] > metrics["evalRejectedReward"] and metrics["evalRewardMargin"] > 0
    assert metrics["evalRewardMargin"] == pytest.approx(
        metrics["evalChosenReward"] - metrics["evalRejectedReward"], abs=1e-5
    )
    assert metrics["evalLoss"] < math.log(2)  # the DPO loss of a model that prefers neither answer
    assert summary["samplesThisRun"] == BATCH * STEPS and summary["warnings"] == []
    assert summary["trainTokensPerSecond"] > 0
    out = tmp_path / "output"
    names = {p.name for p in out.iterdir()}
    assert ADAPTER | {"tokenizer.json", "generation_config.json", "metrics.json", "README.md"} <= names
    assert not names & {"ref", "model.safetensors"}, names
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny["model"])
    card = (out / "README.md").read_text()
    assert "| data | preference pairs (prompt, chosen, rejected) as chat turns |" in card
    assert "| method | dpo, loss sigmoid, beta 0.1; the reference is the starting model, frozen |" in card
    assert "| adapter | lora, rank 8, alpha 16, dropout 0.05, target modules all-linear |" in card
    assert f"| evalRewardAccuracy | {metrics['evalRewardAccuracy']:.4f} |" in card


@pytest.mark.parametrize("start", ["base", "continue", "new"])
def test_the_reference_is_the_frozen_starting_model(start: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    """With a learning rate too small to move the model, the rewards (beta * log(policy / reference)) stay at 0
    whatever the start: a new adapter on the base (reference: the adapter disabled), the SFT adapter continued
    (reference: its frozen copy, not the base) or merged in under a new adapter (reference: the merged model).
    The SFT adapter does change the model's answers, so a reference without it would give rewards far from 0."""
    model, adapter = (tiny["model"], {}) if start == "base" else (tiny["sft"], {"init": start})
    job = preference_job(model, tiny["pairs"], tmp_path, adapter=adapter,
                         hyperparameters={"learningRate": 1e-12, "maxSteps": 2}, every=2)  # fmt: skip
    job["spec"]["hyperparameters"]["evalEvery"] = 2
    metrics = jobrun.run_job(job, tmp_path)["metrics"]
    assert abs(metrics["evalChosenReward"]) < 1e-4 and abs(metrics["evalRejectedReward"]) < 1e-4, metrics
    if start == "continue":
        assert sft_changes_log_probs(tiny) > 0.05


def sft_changes_log_probs(tiny: dict[str, Path]) -> float:
    """The largest change the SFT adapter makes to a token's log-probability of one chosen answer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny["sft"]))
    pair = json.loads((tiny["pairs"] / "validation.jsonl").read_text().splitlines()[0])
    text = tokenizer.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny["model"])).eval()
    with torch.no_grad():
        plain = torch.log_softmax(base(input_ids=ids).logits, -1)
        adapted = torch.log_softmax(PeftModel.from_pretrained(base, str(tiny["sft"])).eval()(input_ids=ids).logits, -1)
    return float((plain - adapted).abs().max())


def test_continuing_an_sft_adapter_resumes_after_sigkill_and_sigterm(
    continued: dict[str, Any], tiny: dict[str, Path], tmp_path: Path
) -> None:
    """The SFT adapter continued: a run killed (SIGKILL) after its first commit, its successor preempted (SIGTERM:
    it commits the step it stopped at and exits 21), and a third attempt end at the uninterrupted run's step with
    the same adapter: each resume restores the trained adapter while the reference stays the saved one. The
    checkpoints and the output hold the trained adapter alone; its config names the SFT adapter's base."""
    import torch

    baseline = continued["summary"]
    assert baseline["phase"] == "Succeeded" and set(baseline["metrics"]) >= REWARDS
    trained, saved = adapter_weights(continued["work"] / "output"), adapter_weights(tiny["sft"])
    assert any(not torch.allclose(trained[key], saved[key]) for key in saved), "the saved adapter did not train"
    job = preference_job(tiny["sft"], tiny["pairs"], tmp_path, hyperparameters={"learningRate": 3e-3})
    checkpoints, work = tmp_path / "checkpoints", tmp_path / "pod"
    proc = jobrun.start(job, work)
    jobrun.wait_for((checkpoints / "checkpoint-10" / MANIFEST).exists, proc, work, what="the first commit")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = max(committed(checkpoints))

    proc = jobrun.start(job, work)
    later = checkpoints / f"checkpoint-{first + 10}" / MANIFEST
    jobrun.wait_for(later.exists, proc, work, what="a commit after the resumed checkpoint")
    proc.send_signal(signal.SIGTERM)
    stopped = jobrun.finish(proc, work, expect=ExitCode.PREEMPTED)
    step = stopped["finalStep"]
    assert stopped["phase"] == "Preempted" and stopped["resumedFromStep"] == first and stopped["attempt"] == 2
    assert first + 10 < step < STEPS and stopped["lastCheckpointStep"] == step, stopped
    assert stopped["samplesThisRun"] == BATCH * (step - first)

    resumed = jobrun.run_job(job, tmp_path / "another-pod")
    assert resumed["resumedFromStep"] == step and resumed["attempt"] == 3 and resumed["finalStep"] == STEPS
    assert resumed["samplesThisRun"] == BATCH * (STEPS - step)
    assert resumed["metrics"] == pytest.approx(baseline["metrics"], rel=1e-4, abs=1e-6)
    want, got = adapter_weights(continued["work"] / "output"), adapter_weights(tmp_path / "output")
    assert want.keys() == got.keys() == saved.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)
    for files in committed(checkpoints).values():
        assert files >= ADAPTER | STATE and not any(f.startswith("ref/") for f in files), files
    out = tmp_path / "output"
    assert not (out / "ref").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny["model"])
    card = (out / "README.md").read_text()
    assert f"| started from | the adapter at `{tiny['sft']}`, trained further |" in card
    assert "| adapter | the saved one: lora, rank 8, alpha 16" in card


def test_a_new_adapter_over_the_merged_sft_adapter_merges_whole(tiny: dict[str, Path], tmp_path: Path) -> None:
    """init: new merges the SFT adapter into the base and trains a new adapter over it; output.merge writes the
    base with both merged, which plain from_pretrained loads and whose logits equal that composition's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = preference_job(tiny["sft"], tiny["pairs"], tmp_path, adapter={"init": "new"}, output={"merge": True},
                         hyperparameters={"maxSteps": 10})  # fmt: skip
    summary = jobrun.run_job(job, tmp_path)
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == 10
    out = tmp_path / "output"
    card = (out / "README.md").read_text()
    assert f"| started from | the adapter at `{tiny['sft']}` merged into the base model" in card
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny["model"]))
    under = PeftModel.from_pretrained(base, str(tiny["sft"])).merge_and_unload()
    composed = PeftModel.from_pretrained(under, str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("<|im_start|>user the red cat sits", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, composed(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_text_pairs_drop_prompts_longer_than_max_length(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Pairs as plain text, some with a prompt that fills maxLength: those are dropped and counted in the
    summary's warnings, the rest train."""
    data = tmp_path / "data"
    data.mkdir()
    lines = (tiny["text-pairs"] / "train.jsonl").read_text().splitlines()
    long = [json.dumps({**json.loads(line), "prompt": " ".join(["the red cat sits"] * 10)}) for line in lines[:24]]
    (data / "train.jsonl").write_text("\n".join(long + lines[24:]) + "\n")
    (data / "validation.jsonl").write_text((tiny["text-pairs"] / "validation.jsonl").read_text())
    job = preference_job(tiny["model"], data, tmp_path, dataset={"maxLength": 24}, hyperparameters={"maxSteps": 4})
    summary = jobrun.run_job(job, tmp_path)
    assert summary["phase"] == "Succeeded", summary
    assert summary["warnings"] == ["24 of 160 train examples dropped: their answer starts past maxLength 24"]
    card = (tmp_path / "output" / "README.md").read_text()
    assert "| data | preference pairs (prompt, chosen, rejected) as text |" in card


def test_two_processes_train_one_adapter(tiny: dict[str, Path], tmp_path: Path) -> None:
    """torchrun with two CPU processes (gloo): a global batch of 16 pairs, both ranks' RNG state in the
    checkpoints, rank 0's summary and one output, with the reward metrics gathered from both."""
    job = preference_job(tiny["model"], tiny["pairs"], tmp_path, every=5)
    code, summary = two.finish(two.start(tmp_path, job), tmp_path)
    log = (tmp_path / "job.log").read_text()
    assert code == 0, log[-3000:]
    steps = 2 * 160 // 16
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == summary["totalSteps"] == steps
    assert summary["samplesThisRun"] == 2 * BATCH * steps and set(summary["metrics"]) >= REWARDS
    assert "global batch 16" in log and len(log.split(f"committed checkpoint-{steps} ")) == 2
    assert committed(tmp_path / "checkpoints")[steps] >= {"rng_state_0.pth", "rng_state_1.pth"} | ADAPTER
    assert json.loads((tmp_path / "output" / "metrics.json").read_text())["finalStep"] == steps


def test_an_adapter_and_its_base_on_s3(s3: Any, tiny: dict[str, Path], tmp_path: Path) -> None:
    """model.uri an s3:// adapter whose config names an s3:// base: the job downloads both and continues the
    adapter; its output names the same s3:// base."""
    import obstore

    bucket = f"kt-{secrets.token_hex(4)}"
    s3.create_bucket(bucket)
    store = s3.store(bucket)
    for path in sorted(p for p in tiny["model"].iterdir() if p.is_file()):
        obstore.put(store, f"base/{path.name}", path)
    for path in sorted(p for p in tiny["sft"].iterdir() if p.is_file()):
        body = path.read_bytes()
        if path.name == "adapter_config.json":
            body = json.dumps({**json.loads(body), "base_model_name_or_path": f"s3://{bucket}/base/"}).encode()
        obstore.put(store, f"sft/{path.name}", body)
    job = preference_job(f"s3://{bucket}/sft/", tiny["pairs"], tmp_path, hyperparameters={"maxSteps": 4})
    summary = jobrun.run_job(job, tmp_path, s3.env())
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == 4, summary
    scratch = tmp_path / "scratch"
    assert (scratch / "model" / "adapter_config.json").is_file() and (scratch / "base" / "config.json").is_file()
    config = json.loads((tmp_path / "output" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"s3://{bucket}/base/"


def test_text_generation_continues_a_saved_adapter_too(tiny: dict[str, Path], tmp_path: Path) -> None:
    """model.uri naming a text-generation job's adapter output works for text-generation as well: the adapter trains
    further from its saved weights and the card says where it started."""
    job = generation_job(tiny["sft"], tiny["chats"], tmp_path, generate=False, maxSteps=4, every=4)
    job["spec"]["adapter"] = {"init": "continue"}
    summary = jobrun.run_job(job, tmp_path)
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == 4
    trained, saved = adapter_weights(tmp_path / "output"), adapter_weights(tiny["sft"])
    assert trained.keys() == saved.keys() and any(not torch_equal(trained[k], saved[k]) for k in saved)
    assert (
        f"| started from | the adapter at `{tiny['sft']}`, trained further |"
        in (tmp_path / "output" / "README.md").read_text()
    )


def test_a_classifier_refuses_an_adapter(tiny: dict[str, Path], tmp_path: Path) -> None:
    job = jobrun.manifest(model=str(tiny["sft"]), data=str(tmp_path), checkpoints=str(tmp_path / "c"),
                          output=str(tmp_path / "o"))  # fmt: skip
    summary = jobrun.run_job(job, tmp_path, expect=ExitCode.MODEL_ERROR)
    assert summary["field"] == "spec.model.uri" and "holds a LoRA adapter" in summary["message"]


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b))


# --- bad inputs: each fails before training with a permanent exit code, naming the field and the record --------


def write_pairs(directory: Path, train: list[dict[str, Any]], validation: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True)
    for split, records in (("train", train), ("validation", validation)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


USER = [{"role": "user", "content": "the red cat sits"}]
GOOD = {"prompt": USER, "chosen": [{"role": "assistant", "content": "CAT RED"}],
        "rejected": [{"role": "assistant", "content": "RED CAT"}]}  # fmt: skip


@pytest.mark.parametrize(
    ("train", "validation", "field", "message"),
    [
        ([{"prompt": "p", "answer": "a"}] * 4, [GOOD], "spec.dataset.trainSplit",
         "split 'train' lacks the column(s) chosen, rejected that the format preference reads (columns: prompt, "
         "answer)"),
        ([GOOD] * 4, [GOOD, {**GOOD, "rejected": GOOD["chosen"]}], "spec.dataset.evalSplit",
         "record 1: chosen and rejected are the same answer: the pair prefers nothing"),
        ([GOOD, GOOD, {**GOOD, "chosen": [{"role": "assistant", "content": ""}]}], [GOOD], "spec.dataset.trainSplit",
         "record 2: chosen is empty"),
        ([GOOD] * 4, [{"prompt": "p", "chosen": "a"}], "spec.dataset.evalSplit",
         "split 'validation' lacks the column(s) rejected"),
    ],
)  # fmt: skip
def test_bad_pairs_name_the_field_and_record(
    train: list[dict[str, Any]], validation: list[dict[str, Any]], field: str, message: str, tiny: dict[str, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    data = write_pairs(tmp_path / "data", train, validation)
    summary = jobrun.run_job(preference_job(tiny["model"], data, tmp_path), tmp_path, expect=ExitCode.DATA_ERROR)
    assert summary["field"] == field and message in summary["message"], summary
    assert not any((tmp_path / "checkpoints").glob("checkpoint-*"))


def test_every_prompt_past_max_length_fails_on_max_length(tiny: dict[str, Path], tmp_path: Path) -> None:
    job = preference_job(tiny["model"], tiny["pairs"], tmp_path, dataset={"maxLength": 8})
    summary = jobrun.run_job(job, tmp_path, expect=ExitCode.DATA_ERROR)
    assert summary["field"] == "spec.dataset.maxLength" and "every example of the train split" in summary["message"]


def test_continue_on_a_whole_model_is_a_config_error(tiny: dict[str, Path], tmp_path: Path) -> None:
    job = preference_job(tiny["model"], tiny["pairs"], tmp_path, adapter={"init": "continue"})
    summary = jobrun.run_job(job, tmp_path, expect=ExitCode.INVALID_CONFIG)
    assert summary["field"] == "spec.adapter.init" and "holds a whole model" in summary["message"]
