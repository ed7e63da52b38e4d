"""Training tokens/s, evaluation loss and peak memory of kubetune's text-generation job against a plain TRL script.

The same model, data, LoRA adapter and SFTConfig values in both (max_length, batch, learning rate, steps,
gradient checkpointing, precision, seed, one checkpoint every --save-every steps, one evaluation at the last
step);
each run in a fresh process, alternating (plain, kubetune, plain, kubetune...) in this one invocation (these
machines are noisy, so only the ratio is meaningful). Both count the same tokens: the non-padding input
tokens the Trainer saw (include_num_input_tokens_seen="non_padding"), over the Trainer's own train_runtime.
Peak RSS is the child process's ru_maxrss. Targets: tokens/s ratio >= 0.98, evaluation losses equal within
noise.

The plain script does what a TRL user does to get the same loss: with chat data whose template marks no
assistant turns it trains on each conversation's last answer (messages as a conversational prompt and
completion); with a template that TRL can mark, on every assistant turn (assistant_only_loss).

Default model: the tiny Llama of tests/models.py, built into a temporary directory, on its chat data.

    .venv/bin/python tests/bench/sft_throughput.py [--repeats 3] [--steps 200] [--full] \
        [--model examples/models/SmolLM2-135M-Instruct] [--data DIR] [--max-length 128] [--batch-size 8] \
        [--threads 1]
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

#: What both children run first: a callback that records the Trainer's own throughput figures.
PROBE = """
import json, sys, time
from pathlib import Path
from transformers import TrainerCallback

class Probe(TrainerCallback):
    def __init__(self):
        self.runtime, self.tokens, self.steps, self.cpu = None, 0, 0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.cpu = -time.process_time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" in logs:
            self.runtime = float(logs["train_runtime"])

    def on_train_end(self, args, state, control, **kwargs):
        self.tokens, self.steps = int(state.num_input_tokens_seen), int(state.global_step)
        self.cpu += time.process_time()

    def report(self, eval_loss, **extra):
        out = {"tokens": self.tokens, "steps": self.steps, "train_runtime": self.runtime,
               "tokens_per_second": self.tokens / self.runtime,
               "tokens_per_cpu_second": self.tokens / self.cpu, "eval_loss": float(eval_loss), **extra}
        print("RESULT " + json.dumps(out), flush=True)

c = json.loads(sys.argv[1])
out = Path(c["out"])
probe = Probe()
"""

#: The plain TRL script: SFTConfig with the benchmark's values, the rest TRL's defaults.
PLAIN = (
    PROBE
    + """
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template

cuda = torch.cuda.is_available()
precision = c["precision"]
if precision == "auto":
    precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp16" if cuda else "fp32"
readers = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
files = {s: next(p for p in sorted(Path(c["data"]).glob(s + ".*")) if p.suffix in readers)
         for s in ("train", "validation")}
data = load_dataset(readers[files["train"].suffix], data_files={s: str(p) for s, p in files.items()})
tok = AutoTokenizer.from_pretrained(c["model"])

every_turn = False
if "messages" in data["train"].column_names:
    try:
        get_training_chat_template(tok)  # the template marks the assistant turns, or TRL knows a marked one
        every_turn = True
    except ValueError:  # no: train on the last answer, the conversation before it as the prompt
        def last_answer(record):
            turns = [{"role": t["role"], "content": t["content"]} for t in record["messages"]]
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            return {"prompt": turns[:last], "completion": [turns[last]]}
        data = data.map(last_answer, remove_columns=data["train"].column_names)

set_seed(42)
lora = c["adapter"]
# A frozen base loads in the training precision; a full fine-tune keeps fp32 weights under autocast.
dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32) if lora else torch.float32
model = AutoModelForCausalLM.from_pretrained(c["model"], dtype=dtype, attn_implementation="sdpa")
peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         target_modules="all-linear", task_type="CAUSAL_LM", bias="none") if lora else None
args = SFTConfig(
    output_dir=str(out / "trainer"), max_steps=c["steps"], per_device_train_batch_size=c["batch"],
    per_device_eval_batch_size=c["eval_batch"], learning_rate=c["lr"], seed=42, max_length=c["max_length"],
    gradient_checkpointing=c["gradient_checkpointing"], bf16=precision == "bf16", fp16=precision == "fp16",
    eval_strategy="steps", eval_steps=c["steps"], save_strategy="steps", save_steps=c["save_every"],
    save_total_limit=2, logging_steps=10, report_to="none", disable_tqdm=True,
    include_num_input_tokens_seen="non_padding", assistant_only_loss=every_turn,
)
trainer = SFTTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                     processing_class=tok, peft_config=peft_config, callbacks=[probe])
trainer.train()
evaluation = [e for e in trainer.state.log_history if "eval_loss" in e][-1]
trainer.save_model(str(out / "model"))
probe.report(evaluation["eval_loss"])
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
         "gradientCheckpointing": c["gradient_checkpointing"], "precision": c["precision"], "seed": 42,
         "evalEvery": c["steps"]}
spec = {"task": "text-generation", "model": {"uri": c["model"]},
        "dataset": {"uri": c["data"], "maxLength": c["max_length"]}, "hyperparameters": hyper,
        "metrics": ["perplexity"], "output": {"uri": str(out / "model")},
        "checkpoints": {"uri": str(out / "checkpoints"), "every": c["save_every"], "keep": 2}}
if c["adapter"]:
    spec["adapter"] = c["adapter"]
job = parse_manifest({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
                      "spec": spec})
settings = JobSettings(work_dir=out / "scratch", summary_path=out / "summary.json")
code = execute(settings, spec=job.spec, callbacks=[probe])
summary = json.loads((out / "summary.json").read_text())
if code:
    sys.exit(f"kubetune exited {code}: {summary.get('reason')}: {summary.get('message')}")
probe.report(summary["metrics"]["evalLoss"], summary_tokens_per_second=summary.get("trainTokensPerSecond"))
"""
)

BUILD_TINY = """
import sys
from pathlib import Path
from tests.models import CHATML, CHATML_MARKED, build_tiny_llama
build_tiny_llama(Path(sys.argv[1]), template=CHATML_MARKED if sys.argv[2] == "marked" else CHATML)
"""


def prepare(a: argparse.Namespace, tmp: Path) -> tuple[str, str]:
    """The model and data directories: given, or the tiny Llama and its chat data built into `tmp`."""
    model = a.model
    if model is None:
        model = tmp / "model"
        subprocess.run(
            [sys.executable, "-c", BUILD_TINY, str(model), a.template], env=environment(), cwd=ROOT, check=True
        )
    elif not (model / "config.json").is_file():
        sys.exit(f"{model} holds no config.json: give a saved causal LM directory")
    data = a.data
    if data is None:
        sys.path.insert(0, str(ROOT))
        from tests.models import write_chats

        data = write_chats(tmp / "data", train=a.train_examples, validation=a.eval_examples)
    return str(model.resolve()), str(data.resolve())


def summarize(name: str, results: list[dict[str, Any]]) -> dict[str, float]:
    speeds = [r["tokens_per_second"] for r in results]
    return {
        "mean": statistics.mean(speeds),
        "median": statistics.median(speeds),
        "stdev": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
        "per_cpu": statistics.mean(r["tokens_per_cpu_second"] for r in results),
        "eval_loss": statistics.mean(r["eval_loss"] for r in results),
        "rss": max(r["peak_rss_mib"] for r in results),
        "wall": statistics.mean(r["wall_s"] for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a saved causal LM directory (default: the tiny Llama, built here)")
    p.add_argument("--data", type=Path, help="a directory with train.* and validation.* (default: tiny chat data)")
    p.add_argument("--template", choices=("chatml", "marked"), default="chatml",
                   help="the tiny Llama's chat template: marked trains on every assistant turn")  # fmt: skip
    p.add_argument("--train-examples", type=int, default=400, help="of the default data")
    p.add_argument("--eval-examples", type=int, default=40, help="of the default data")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, help="default 4 x batch size (kubetune's default)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--full", action="store_true", help="fine-tune every weight instead of a LoRA adapter")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, help="default 2 x rank")
    p.add_argument("--dropout", type=float, default=0.05)
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
        "adapter": None if a.full else {"rank": a.rank, "alpha": a.alpha or 2 * a.rank, "dropout": a.dropout},
        "gradient_checkpointing": not a.no_gradient_checkpointing,
        "precision": a.precision,
        "save_every": a.save_every or a.steps,
    }
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "kubetune": []}
    with tempfile.TemporaryDirectory(prefix="kubetune-sft-bench-") as tmp:
        config["model"], config["data"] = prepare(a, Path(tmp))
        shown = {k: v for k, v in config.items() if k not in ("model", "data")}
        print(f"model {config['model']}\ndata {config['data']}\n{json.dumps(shown)}", flush=True)
        for i in range(a.repeats):
            runs["plain"].append(measure(PLAIN, config, threads=a.threads))
            runs["kubetune"].append(measure(KUBETUNE, config, threads=a.threads))
            plain, kube = runs["plain"][-1], runs["kubetune"][-1]
            speeds = plain["tokens_per_second"], kube["tokens_per_second"]
            print(
                f"round {i + 1}: tokens/s plain {speeds[0]:.1f}, kubetune {speeds[1]:.1f} (ratio "
                f"{speeds[1] / speeds[0]:.3f}); "
                f"eval loss {plain['eval_loss']:.4f} / {kube['eval_loss']:.4f}; tokens {plain['tokens']} / "
                f"{kube['tokens']}; kubetune summary {kube['summary_tokens_per_second']}",
                flush=True,
            )
    stats = {name: summarize(name, results) for name, results in runs.items()}
    print(
        f"\n{'run':<10} {'tokens/s mean':>14} {'median':>10} {'stdev':>8} {'tokens/CPU-s':>13} {'eval loss':>10} "
        f"{'peak RSS':>12} {'wall':>8}"
    )
    for name, s in stats.items():
        print(
            f"{name:<10} {s['mean']:>14.1f} {s['median']:>10.1f} {s['stdev']:>8.1f} {s['per_cpu']:>13.1f} "
            f"{s['eval_loss']:>10.4f} {s['rss']:>8.0f} MiB {s['wall']:>6.1f} s"
        )
    ratio = stats["kubetune"]["mean"] / stats["plain"]["mean"]
    ratios = [
        k["tokens_per_second"] / p["tokens_per_second"] for p, k in zip(runs["plain"], runs["kubetune"], strict=True)
    ]
    verdict = "met" if ratio >= 0.98 else "MISSED"
    print(f"\ntokens/s kubetune/plain: {ratio:.3f} (means; per round {', '.join(f'{r:.3f}' for r in ratios)}); "
          f"target >= 0.98: {verdict}")  # fmt: skip
    cpu_ratio = stats["kubetune"]["per_cpu"] / stats["plain"]["per_cpu"]
    print(f"tokens per CPU-second kubetune/plain: {cpu_ratio:.3f} (training's process CPU time: less sensitive to "
          "other load on the machine than wall-clock tokens/s)")  # fmt: skip
    gap = abs(stats["kubetune"]["eval_loss"] - stats["plain"]["eval_loss"])
    print(f"eval loss gap {gap:.4f} (mean of {a.repeats}); peak RSS kubetune - plain "
          f"{stats['kubetune']['rss'] - stats['plain']['rss']:+.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
