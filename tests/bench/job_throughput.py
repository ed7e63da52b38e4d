"""Training samples/s and accuracy of the kubetune job against a plain Hugging Face Trainer script.

Same model (the example's all-MiniLM-L6-v2), same data (examples/data/paraphrase), same arguments
and seed, checkpointing on in both; each run in a fresh process, alternating, in this one invocation
(these machines are noisy, so only the ratio is meaningful). Targets: samples/s ratio >= 0.98, and
accuracy and F1 within a point of the plain script's. `--variant NAME=JSON` adds kubetune runs with
other hyperparameters (the GPU fast path's switches forced on, torch.compile, length grouping):

    .venv/bin/python tests/bench/job_throughput.py [--epochs 1] [--batch-size 16] [--repeats 2] \
        [--variant 'compile={"compile": true}'] [--no-defaults]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
MODEL = ROOT / "examples" / "models" / "all-MiniLM-L6-v2"
DATA = ROOT / "examples" / "data" / "paraphrase"

PLAIN = """
import json, sys
import numpy as np
from datasets import load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)
model_dir, data_dir, out, epochs, batch = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
raw = load_dataset("csv", data_files={"train": f"{data_dir}/train.csv", "validation": f"{data_dir}/validation.csv"})
labels = sorted(set(raw["train"]["label"]))
tok = AutoTokenizer.from_pretrained(model_dir)
def encode(b):
    enc = tok(b["sentence1"], b["sentence2"], truncation=True, max_length=64)
    enc["labels"] = [labels.index(x) for x in b["label"]]
    return enc
data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
set_seed(42)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
args = TrainingArguments(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=batch,
                         per_device_eval_batch_size=64, learning_rate=1e-4, seed=42, eval_strategy="epoch",
                         save_strategy="epoch", save_total_limit=2, logging_steps=10, report_to="none",
                         disable_tqdm=True, dataloader_pin_memory=False)
def scores(p):
    pred, ref = np.argmax(p.predictions, -1), p.label_ids
    tp, fp, fn = ((pred == 1) & (ref == 1)).sum(), ((pred == 1) & (ref == 0)).sum(), ((pred == 0) & (ref == 1)).sum()
    return {"accuracy": float((pred == ref).mean()), "f1": float(2 * tp / max(2 * tp + fp + fn, 1))}
trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                  processing_class=tok, data_collator=DataCollatorWithPadding(tok), compute_metrics=scores)
result = trainer.train()
last = [e for e in trainer.state.log_history if "eval_accuracy" in e][-1]
print("RESULT", json.dumps({"samples_per_second": result.metrics["train_samples_per_second"],
                            "runtime": result.metrics["train_runtime"], "accuracy": last["eval_accuracy"],
                            "f1": last["eval_f1"]}))
"""

KUBETUNE = """
import json, sys
from pathlib import Path
from kubetune_api.settings import JobSettings
from kubetune_api.spec import parse_manifest
from kubetune_job.orchestrate import run
model_dir, data_dir, epochs, batch = sys.argv[1], sys.argv[2], float(sys.argv[4]), int(sys.argv[5])
out = Path(sys.argv[3])
hyper = {"epochs": epochs, "batchSize": batch, "evalBatchSize": 64, "learningRate": 1e-4, **json.loads(sys.argv[6])}
job = parse_manifest({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
    "spec": {"model": {"uri": model_dir}, "dataset": {"uri": data_dir, "maxLength": 64}, "hyperparameters": hyper,
             "metrics": ["accuracy", "f1"], "checkpoints": {"uri": str(out / "ckpt"), "every": "epoch", "keep": 2},
             "output": {"uri": str(out / "model")}}})
summary = run(job.spec, JobSettings(work_dir=out / "scratch", summary_path=out / "summary.json"))
print("RESULT", json.dumps({"samples_per_second": summary["trainSamplesPerSecond"],
                            "accuracy": summary["metrics"]["evalAccuracy"], "f1": summary["metrics"]["evalF1"]}))
"""


def measure(script: str, epochs: float, batch: int, hyper: dict[str, Any] | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        argv = [
            sys.executable,
            "-c",
            script,
            str(MODEL),
            str(DATA),
            out,
            str(epochs),
            str(batch),
            json.dumps(hyper or {}),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"benchmark run failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, hyper = text.partition("=")
    return name, json.loads(hyper or "{}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variant", type=variant, action="append", default=[], help="NAME=JSON hyperparameters")
    p.add_argument("--no-defaults", action="store_true", help="skip kubetune with its defaults")
    a = p.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit("examples/models/all-MiniLM-L6-v2 is missing: run `make install` first")
    variants = ([] if a.no_defaults else [("kubetune", {})]) + [(f"kubetune {n}", h) for n, h in a.variant]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ["plain", *(n for n, _ in variants)]}
    for i in range(a.repeats):
        runs["plain"].append(measure(PLAIN, a.epochs, a.batch_size))
        for name, hyper in variants:
            runs[name].append(measure(KUBETUNE, a.epochs, a.batch_size, hyper))
        shown = ", ".join(f"{name} {r[-1]['samples_per_second']:.2f}" for name, r in runs.items())
        print(f"round {i + 1} samples/s: {shown}", flush=True)
    plain = statistics.median(r["samples_per_second"] for r in runs["plain"])
    for name, results in runs.items():
        speed = statistics.median(r["samples_per_second"] for r in results)
        acc, f1 = results[-1]["accuracy"], results[-1]["f1"]
        print(f"{name:<28} {speed:8.2f} samples/s  ratio {speed / plain:.3f}  accuracy {acc:.4f}  F1 {f1:.4f}")
    print(f"(medians of {a.repeats}; accuracy and F1 of the last round; target: ratio >= 0.98, scores within 0.01)")


if __name__ == "__main__":
    main()
