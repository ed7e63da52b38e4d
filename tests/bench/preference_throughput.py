"""Training examples/s, held-out reward accuracy and peak memory of kubetune's preference (DPO) job against a
plain TRL script.

The same model, preference pairs, LoRA adapter and DPOConfig values in both (beta, the sigmoid loss, max_length,
batch, learning rate, steps, gradient checkpointing, precision, seed, one checkpoint every --save-every steps,
one evaluation at the last step); each run in a fresh process, alternating (plain, kubetune, plain,
kubetune...) in this one invocation (these machines are noisy, so only the ratio is meaningful). Both count the
same examples: the preference pairs trained on (steps x batch) over the Trainer's own train_runtime. The reward
accuracy is the final evaluation's eval_rewards/accuracies (the fraction of held-out pairs whose chosen answer
gets the higher implicit reward, beta * log(policy / reference)); peak RSS is the child process's ru_maxrss.
Targets: examples/s ratio >= 0.98, reward accuracies equal within noise.

Starting from a saved adapter (--adapter), the plain script does what a TRL user does to continue it against
a frozen copy of itself: PeftModel.from_pretrained(base, adapter, is_trainable=True), which DPOTrainer copies
into a "ref" adapter; kubetune's job gets the adapter directory as its model with adapter.init: continue.
Without one, both train a new rank-8 adapter on the base model (a LoraConfig; the reference is the base with
the adapter disabled).

Default model: the tiny Llama of tests/models.py, built into a temporary directory, on its preference pairs.

    .venv/bin/python tests/bench/preference_throughput.py [--repeats 3] [--steps 100] [--threads 2] \
        [--adapter kubetune-runs/chat-quickstart/model --model examples/models/SmolLM2-135M-Instruct \
         --data examples/data/ticket-preferences] [--max-length 96] [--batch-size 8] [--beta 0.1] [--lr 1e-3]
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

from children import ROOT, environment, measure

#: What both children run first: a callback that records the Trainer's own throughput and evaluation figures.
PROBE = """
import json, sys, time
from pathlib import Path
from transformers import TrainerCallback

class Probe(TrainerCallback):
    def __init__(self):
        self.runtime, self.samples, self.steps, self.cpu, self.evaluation = None, 0, 0, 0.0, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.cpu = -time.process_time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" in logs:
            self.runtime = float(logs["train_runtime"])
        if logs and "eval_rewards/accuracies" in logs:
            self.evaluation = dict(logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.steps = int(state.global_step)
        # The pairs trained on, as the Trainer counts them for train_samples_per_second under max_steps.
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.samples = self.steps * batch
        self.cpu += time.process_time()

    def report(self, **extra):
        out = {"steps": self.steps, "samples": self.samples, "train_runtime": self.runtime,
               "examples_per_second": self.samples / self.runtime, "examples_per_cpu_second": self.samples / self.cpu,
               "reward_accuracy": float(self.evaluation["eval_rewards/accuracies"]),
               "reward_margin": float(self.evaluation["eval_rewards/margins"]),
               "eval_loss": float(self.evaluation["eval_loss"]), **extra}
        print("RESULT " + json.dumps(out), flush=True)

c = json.loads(sys.argv[1])
out = Path(c["out"])
probe = Probe()
"""

#: The plain TRL script: DPOConfig with the benchmark's values, the rest TRL's defaults.
PLAIN = (
    PROBE
    + """
import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOConfig, DPOTrainer

cuda = torch.cuda.is_available()
precision = c["precision"]
if precision == "auto":
    precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp16" if cuda else "fp32"
readers = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
files = {s: next(p for p in sorted(Path(c["data"]).glob(s + ".*")) if p.suffix in readers)
         for s in ("train", "validation")}
data = load_dataset(readers[files["train"].suffix], data_files={s: str(p) for s, p in files.items()})
tok = AutoTokenizer.from_pretrained(c["adapter_dir"] or c["model"])  # a saved adapter keeps its chat template

set_seed(42)
# The frozen base loads in the training precision.
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=dtype, attn_implementation="sdpa")
peft_config = None
if c["adapter_dir"]:  # continue the saved adapter; DPOTrainer keeps a frozen copy of it as the reference
    model = PeftModel.from_pretrained(model, c["adapter_dir"], is_trainable=True)
else:
    lora = c["lora"]
    peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM", bias="none")
args = DPOConfig(
    output_dir=str(out / "trainer"), max_steps=c["steps"], per_device_train_batch_size=c["batch"],
    per_device_eval_batch_size=c["eval_batch"], learning_rate=c["lr"], seed=42, max_length=c["max_length"],
    beta=c["beta"], loss_type=["sigmoid"], warmup_steps=c["warmup"],  # a float below 1: a ratio
    gradient_checkpointing=c["gradient_checkpointing"], bf16=precision == "bf16", fp16=precision == "fp16",
    eval_strategy="steps", eval_steps=c["steps"], save_strategy="steps", save_steps=c["save_every"],
    save_total_limit=2, logging_steps=10, report_to="none", disable_tqdm=True,
)
trainer = DPOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                     processing_class=tok, peft_config=peft_config, callbacks=[probe])
trainer.train()
trainer.save_model(str(out / "model"))
probe.report()
"""
)

#: kubetune's job (orchestrate.execute, as `python -m kubetune_job` runs it) with the same values.
KUBETUNE = (
    PROBE
    + """
from kubetune_api.settings import JobSettings
from kubetune_api.spec import parse_manifest
from kubetune_job.orchestrate import execute

hyper = {"maxSteps": c["steps"], "batchSize": c["batch"], "evalBatchSize": c["eval_batch"], "learningRate": c["lr"],
         "warmupRatio": c["warmup"], "gradientCheckpointing": c["gradient_checkpointing"],
         "precision": c["precision"], "seed": 42, "evalEvery": c["steps"]}
if c["adapter_dir"]:  # the saved adapter is the model; training continues it
    model, adapter = c["adapter_dir"], {"rank": 16, "init": "continue"}
else:
    model, adapter = c["model"], {"rank": c["lora"]["rank"], "alpha": c["lora"]["alpha"],
                                  "dropout": c["lora"]["dropout"]}
spec = {"task": "preference", "model": {"uri": model}, "adapter": adapter,
        "dataset": {"uri": c["data"], "maxLength": c["max_length"]},
        "preference": {"beta": c["beta"], "loss": "sigmoid"}, "hyperparameters": hyper,
        "output": {"uri": str(out / "model")},
        "checkpoints": {"uri": str(out / "checkpoints"), "every": c["save_every"], "keep": 2}}
job = parse_manifest({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
                      "spec": spec})
settings = JobSettings(work_dir=out / "scratch", summary_path=out / "summary.json")
code = execute(settings, spec=job.spec, callbacks=[probe])
summary = json.loads((out / "summary.json").read_text())
if code:
    sys.exit(f"kubetune exited {code}: {summary.get('reason')}: {summary.get('message')}")
probe.report(summary_reward_accuracy=summary["metrics"].get("evalRewardAccuracy"),
             summary_samples_per_second=summary.get("trainSamplesPerSecond"))
"""
)

BUILD_TINY = """
import sys
from pathlib import Path
from tests.models import build_tiny_llama
build_tiny_llama(Path(sys.argv[1]))
"""


def prepare(a: argparse.Namespace, tmp: Path) -> tuple[str, str, str | None]:
    """The base model, data and adapter directories: given, or the tiny Llama and its preference pairs built
    into `tmp`. With --adapter and no --model, the base is the one the adapter names."""
    adapter = None
    if a.adapter is not None:
        if not (a.adapter / "adapter_config.json").is_file():
            sys.exit(f"{a.adapter} holds no adapter_config.json: give a saved PEFT adapter directory")
        adapter = str(a.adapter.resolve())
    model = a.model
    if model is None and a.adapter is not None:
        model = Path(json.loads((a.adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    if model is None:
        model = tmp / "model"
        subprocess.run([sys.executable, "-c", BUILD_TINY, str(model)], env=environment(), cwd=ROOT, check=True)
    elif not (model / "config.json").is_file():
        sys.exit(f"{model} holds no config.json: give a saved causal LM directory")
    data = a.data
    if data is None:
        sys.path.insert(0, str(ROOT))
        from tests.models import write_preferences

        data = write_preferences(tmp / "data", train=a.train_examples, validation=a.eval_examples)
    return str(model.resolve()), str(data.resolve()), adapter


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    speeds = [r["examples_per_second"] for r in results]
    return {
        "mean": statistics.mean(speeds),
        "median": statistics.median(speeds),
        "stdev": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
        "per_cpu": statistics.mean(r["examples_per_cpu_second"] for r in results),
        "accuracy": statistics.mean(r["reward_accuracy"] for r in results),
        "margin": statistics.mean(r["reward_margin"] for r in results),
        "rss": max(r["peak_rss_mib"] for r in results),
        "wall": statistics.mean(r["wall_s"] for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a saved causal LM directory, the base (default: the tiny Llama, "
                   "built here; with --adapter, the base the adapter names)")  # fmt: skip
    p.add_argument("--adapter", type=Path, help="a saved LoRA adapter to continue (default: a new rank-8 adapter)")
    p.add_argument("--data", type=Path, help="a directory with train.jsonl and validation.jsonl of preference "
                   "pairs (default: the tiny Llama's pairs)")  # fmt: skip
    p.add_argument("--train-examples", type=int, default=400, help="of the default data")
    p.add_argument("--eval-examples", type=int, default=40, help="of the default data")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, help="default 4 x batch size (kubetune's default)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up ratio")
    p.add_argument("--rank", type=int, default=8, help="of a new adapter")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="both runs keep their activations")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: once, at the last step)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads", type=int, help="CPU threads of each run (OMP_NUM_THREADS): steadier on a shared machine"
    )
    a = p.parse_args()
    config: dict[str, Any] = {
        "steps": a.steps,
        "batch": a.batch_size,
        "eval_batch": a.eval_batch_size or 4 * a.batch_size,
        "max_length": a.max_length,
        "lr": a.lr,
        "beta": a.beta,
        "warmup": a.warmup,
        "lora": {"rank": a.rank, "alpha": 2 * a.rank, "dropout": 0.05},
        "gradient_checkpointing": not a.no_gradient_checkpointing,
        "precision": a.precision,
        "save_every": a.save_every or a.steps,
    }
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "kubetune": []}
    with tempfile.TemporaryDirectory(prefix="kubetune-dpo-bench-") as tmp:
        config["model"], config["data"], config["adapter_dir"] = prepare(a, Path(tmp))
        shown = {k: v for k, v in config.items() if k not in ("model", "data", "adapter_dir")}
        print(f"model {config['model']}\nadapter {config['adapter_dir']}\ndata {config['data']}\n{json.dumps(shown)}",
              flush=True)  # fmt: skip
        for i in range(a.repeats):
            runs["plain"].append(measure(PLAIN, config, threads=a.threads))
            runs["kubetune"].append(measure(KUBETUNE, config, threads=a.threads))
            plain, kube = runs["plain"][-1], runs["kubetune"][-1]
            speeds = plain["examples_per_second"], kube["examples_per_second"]
            print(
                f"round {i + 1}: examples/s plain {speeds[0]:.2f}, kubetune {speeds[1]:.2f} (ratio "
                f"{speeds[1] / speeds[0]:.3f}); reward accuracy {plain['reward_accuracy']:.3f} / "
                f"{kube['reward_accuracy']:.3f}; margin {plain['reward_margin']:.3f} / {kube['reward_margin']:.3f}; "
                f"examples {plain['samples']:.0f} / {kube['samples']:.0f}; kubetune summary "
                f"{kube['summary_samples_per_second']} examples/s, reward accuracy {kube['summary_reward_accuracy']}",
                flush=True,
            )
    stats = {name: summarize(results) for name, results in runs.items()}
    print(
        f"\n{'run':<10} {'examples/s mean':>16} {'median':>8} {'stdev':>7} {'ex/CPU-s':>9} {'reward acc':>11} "
        f"{'margin':>8} {'peak RSS':>12} {'wall':>8}"
    )
    for name, s in stats.items():
        print(
            f"{name:<10} {s['mean']:>16.2f} {s['median']:>8.2f} {s['stdev']:>7.2f} {s['per_cpu']:>9.3f} "
            f"{s['accuracy']:>11.3f} {s['margin']:>8.3f} {s['rss']:>8.0f} MiB {s['wall']:>6.1f} s"
        )
    ratio = stats["kubetune"]["mean"] / stats["plain"]["mean"]
    ratios = [
        k["examples_per_second"] / p["examples_per_second"]
        for p, k in zip(runs["plain"], runs["kubetune"], strict=True)
    ]
    verdict = "met" if ratio >= 0.98 else "MISSED"
    print(f"\nexamples/s kubetune/plain: {ratio:.3f} (means; per round {', '.join(f'{r:.3f}' for r in ratios)}); "
          f"target >= 0.98: {verdict}")  # fmt: skip
    cpu_ratio = stats["kubetune"]["per_cpu"] / stats["plain"]["per_cpu"]
    print(f"examples per CPU-second kubetune/plain: {cpu_ratio:.3f} (training's process CPU time: less sensitive to "
          "other load on the machine than wall-clock examples/s)")  # fmt: skip
    gap = abs(stats["kubetune"]["accuracy"] - stats["plain"]["accuracy"])
    print(f"reward accuracy gap {gap:.3f} (mean of {a.repeats}); peak RSS kubetune - plain "
          f"{stats['kubetune']['rss'] - stats['plain']['rss']:+.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
