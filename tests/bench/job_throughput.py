"""Training samples/s of the kubetune job divided by a plain Hugging Face Trainer script's.

Same model (the example's all-MiniLM-L6-v2), same data (examples/data/paraphrase), same arguments,
checkpointing on in both; each run in a fresh process, alternating, in this one invocation (these
machines are noisy, so only the ratio is meaningful). Target: >= 0.98.

    .venv/bin/python tests/bench/job_throughput.py [--epochs 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[2]
MODEL = ROOT / "examples" / "models" / "all-MiniLM-L6-v2"
DATA = ROOT / "examples" / "data" / "paraphrase"

PLAIN = """
import json, sys
import numpy as np
from datasets import load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)
model_dir, data_dir, out, epochs = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
raw = load_dataset("csv", data_files={"train": f"{data_dir}/train.csv", "validation": f"{data_dir}/validation.csv"})
labels = sorted(set(raw["train"]["label"]))
tok = AutoTokenizer.from_pretrained(model_dir)
def encode(b):
    enc = tok(b["sentence1"], b["sentence2"], truncation=True, max_length=64)
    enc["labels"] = [labels.index(x) for x in b["label"]]
    return enc
data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
args = TrainingArguments(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=16,
                         per_device_eval_batch_size=64, learning_rate=1e-4, seed=42, eval_strategy="epoch",
                         save_strategy="epoch", save_total_limit=2, logging_steps=10, report_to="none",
                         disable_tqdm=True, dataloader_pin_memory=False)
acc = lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}
trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                  processing_class=tok, data_collator=DataCollatorWithPadding(tok), compute_metrics=acc)
result = trainer.train()
print("RESULT", json.dumps({"samples_per_second": result.metrics["train_samples_per_second"]}))
"""

KUBETUNE = """
import json, sys
from pathlib import Path
from kubetune_job.settings import JobSettings
from kubetune_job.spec import parse_manifest
from kubetune_job.train import run
model_dir, data_dir, out, epochs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
job = parse_manifest({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
    "spec": {"model": {"uri": model_dir}, "dataset": {"uri": data_dir, "maxLength": 64},
             "hyperparameters": {"epochs": epochs, "batchSize": 16, "evalBatchSize": 64, "learningRate": 1e-4},
             "metrics": ["accuracy"], "checkpoints": {"uri": str(out / "ckpt"), "every": "epoch", "keep": 2},
             "output": {"uri": str(out / "model")}}})
summary = run(job.spec, JobSettings(work_dir=out / "scratch", summary_path=out / "summary.json"))
print("RESULT", json.dumps({"samples_per_second": summary["trainSamplesPerSecond"]}))
"""


def measure(script: str, epochs: float) -> float:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, "-c", script, str(MODEL), str(DATA), out, str(epochs)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"benchmark run failed:\n{done.stderr[-3000:]}")
    return float(json.loads(lines[-1].removeprefix("RESULT "))["samples_per_second"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit("examples/models/all-MiniLM-L6-v2 is missing: run `make install` first")
    plain, ours = [], []
    for i in range(a.repeats):
        plain.append(measure(PLAIN, a.epochs))
        ours.append(measure(KUBETUNE, a.epochs))
        print(f"round {i + 1}: plain {plain[-1]:.2f} samples/s, kubetune {ours[-1]:.2f} samples/s", flush=True)
    ratio = statistics.median(ours) / statistics.median(plain)
    print(f"plain Trainer script: {statistics.median(plain):.2f} samples/s (median of {a.repeats})")
    print(f"kubetune job:         {statistics.median(ours):.2f} samples/s (median of {a.repeats})")
    print(f"ratio kubetune/plain: {ratio:.3f} (target >= 0.98)")


if __name__ == "__main__":
    main()
