"""The trainer job end to end on CPU: a tiny model, the quickstart example, and resume after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import jobrun
from tests.models import WORDS, build_tiny_bert, write_pairs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {"model": build_tiny_bert(base / "model"), "data": write_pairs(base / "data", train=800, validation=80)}


@pytest.fixture(scope="module")
def quick_learner(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model with a task it learns within about 70 steps: its loss falls from 0.69 to near 0,
    so a run's mean loss clearly differs from that of its steps after a resume."""
    directory = tmp_path_factory.mktemp("word")
    rng = random.Random(0)
    others = [w for w in WORDS if w != "dog"]
    for split, n in (("train", 800), ("validation", 80)):
        with (directory / f"{split}.csv").open("w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["sentence1", "sentence2", "label"])
            for i in range(n):  # label 1 when the first sentence has the word "dog"
                first = rng.sample(others, 5)
                if i % 2:
                    first[rng.randrange(5)] = "dog"
                rows.writerow([" ".join(first), " ".join(rng.sample(WORDS, 5)), i % 2])
    return {"model": tiny["model"], "data": directory}


def manifest(tiny: dict[str, Path], work: Path, **hyper: Any) -> dict[str, Any]:
    return jobrun.manifest(
        model=str(tiny["model"]),
        data=str(tiny["data"]),
        checkpoints=str(work / "checkpoints"),
        output=str(work / "output"),
        metrics=("accuracy", "f1", "matthews_correlation"),
        **hyper,
    )


def run_job(tiny: dict[str, Path], work: Path, **hyper: Any) -> dict[str, Any]:
    return jobrun.run_job(manifest(tiny, work, **hyper), work)


def committed_states(checkpoints: Path) -> dict[int, dict[str, Any]]:
    """The trainer state (log history, callbacks' records) of each committed checkpoint, by step."""
    states = {}
    for manifest in checkpoints.glob("checkpoint-*/kubetune-manifest.json"):
        step = json.loads(manifest.read_text())["step"]
        states[step] = json.loads((manifest.parent / "trainer_state.json").read_text())
    return states


def mean_loss(history: list[dict[str, Any]], *, after: int = 0) -> float:
    """Mean loss per step of the steps past `after`: each logged loss covers the steps since the previous log
    (these runs log every 10 steps and checkpoint every 20, so an attempt begins at a logged step)."""
    total, steps, previous = 0.0, 0, after
    for entry in history:
        if "loss" in entry and entry["step"] > after:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps


def final_history(work: Path) -> list[dict[str, Any]]:
    """The log history of the run's last checkpoint, at step 200: every attempt's logs up to the end."""
    history: list[dict[str, Any]] = committed_states(work / "checkpoints")[200]["log_history"]
    return history


def test_tiny_model_fine_tunes_end_to_end(tiny: dict[str, Path], tmp_path: Path) -> None:
    """python -m kubetune_job trains, evaluates, and saves model, tokenizer, labels, metrics and card."""
    summary = run_job(tiny, tmp_path)
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == summary["totalSteps"] == 200
    assert {"trainLoss", "evalAccuracy", "evalF1", "evalMatthewsCorrelation", "evalLoss"} <= set(summary["metrics"])
    out = tmp_path / "output"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"}
    assert json.loads((out / "metrics.json").read_text())["finalStep"] == 200
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-180", "checkpoint-200"]
    assert summary["attempt"] == 1 and summary["trainSeconds"] == summary["trainSecondsThisRun"] > 0
    assert summary["metrics"]["trainLoss"] == pytest.approx(mean_loss(final_history(tmp_path)), rel=1e-6, abs=5e-7)


def test_resume_after_sigkill_repeats_no_step(quick_learner: dict[str, Path], tmp_path: Path) -> None:
    """A run killed after its first commit resumes from it and ends at the uninterrupted final step; its summary's
    trainLoss and samples/s cover both attempts."""
    work = tmp_path / "killed"
    proc = jobrun.start(manifest(quick_learner, work), work)
    first = work / "checkpoints" / "checkpoint-20" / "kubetune-manifest.json"
    jobrun.wait_for(first.exists, proc, work, what="the first committed checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    states = committed_states(work / "checkpoints")

    resumed = run_job(quick_learner, work)
    start = resumed["resumedFromStep"]
    assert start >= 20
    assert resumed["finalStep"] == 200
    assert resumed["stepsThisRun"] == 200 - start

    # The summary describes the whole run, not only the attempt that finished it.
    history = final_history(work)
    whole, last_attempt = mean_loss(history), mean_loss(history, after=start)  # the latter: the Trainer's train_loss
    assert resumed["metrics"]["trainLoss"] == pytest.approx(whole, rel=1e-6, abs=5e-7)  # abs: rounded to 6 decimals
    assert resumed["metrics"]["trainLoss"] != pytest.approx(last_attempt, rel=1e-3)
    assert resumed["attempt"] == 2
    # The killed attempt's training seconds up to the checkpoint resumed from, as that checkpoint recorded them
    earlier = states[start]["stateful_callbacks"]["RunAccount"]["attributes"]["train_seconds"]
    assert earlier > 0
    assert resumed["trainSeconds"] == pytest.approx(earlier + resumed["trainSecondsThisRun"], abs=2e-3)
    samples = 800 * 2  # two epochs of the 800 training pairs, over both attempts
    assert resumed["trainSamplesPerSecond"] == pytest.approx(samples / resumed["trainSeconds"], rel=1e-3)


def test_quickstart_example_learns_offline(tmp_path: Path) -> None:
    """`kubetune run examples/quickstart.yaml` succeeds offline and beats the majority class clearly."""
    model = ROOT / "examples" / "models" / "all-MiniLM-L6-v2"
    if not (model / "config.json").is_file():
        pytest.fail("examples/models/all-MiniLM-L6-v2 is missing: run `make install` first")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kubetune_cli", "run", str(ROOT / "examples" / "quickstart.yaml")]
    done = subprocess.run([*cmd, "--workdir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "quickstart" / "summary.json").read_text())
    assert summary["metrics"]["evalAccuracy"] >= 0.85  # the majority class is 0.6; 0.895-0.905 over 3 seeds
    assert "evalAccuracy" in done.stdout and (tmp_path / "quickstart" / "model" / "model.safetensors").is_file()
