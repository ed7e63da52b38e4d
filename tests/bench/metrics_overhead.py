"""Training samples/s with metrics pushed every 5 s, divided by samples/s with metrics off.

Three settings of the same job (the example's all-MiniLM-L6-v2 on examples/data/paraphrase): metrics
off, pushing to a real Pushgateway, and pushing to a blackholed gateway (a TCP listener that accepts
and never answers, so every push waits out its timeout). Each run is a fresh process, the settings
alternate, all in this one invocation (these machines are noisy: only the ratios mean something).
Target: >= 0.995 for both. A second, noise-free estimate bounds the overhead from what the metrics
cost on the training thread (the callback's hooks per step) and on the push thread (CPU per push).

    .venv/bin/python tests/bench/metrics_overhead.py [--epochs 1] [--repeats 2] [--interval 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "examples" / "models" / "all-MiniLM-L6-v2"
DATA = ROOT / "examples" / "data" / "paraphrase"
BATCH = 16

CHILD = """
import json, sys
from pathlib import Path
from kubetune_api.settings import JobSettings
from kubetune_api.spec import parse_manifest
from kubetune_job.orchestrate import execute
model_dir, data_dir, out, epochs, gateway, interval = sys.argv[1:7]
out = Path(out)
job = parse_manifest({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
    "spec": {"model": {"uri": model_dir}, "dataset": {"uri": data_dir, "maxLength": 64},
             "hyperparameters": {"epochs": float(epochs), "batchSize": BATCH, "evalBatchSize": 64,
                                 "learningRate": 1e-4},
             "metrics": ["accuracy"], "checkpoints": {"uri": str(out / "ckpt"), "every": "epoch", "keep": 1},
             "output": {"uri": str(out / "model")}}})
settings = JobSettings(name="bench", namespace="bench", work_dir=out / "scratch", summary_path=out / "summary.json",
                       pushgateway_url=gateway or None, push_interval_seconds=float(interval))
code = execute(settings, spec=job.spec, console_logs=False)
summary = json.loads((out / "summary.json").read_text())
assert code == 0, summary
print("RESULT", json.dumps({"samples_per_second": summary["trainSamplesPerSecond"],
                            "push_failures": summary.get("metricsPushFailures")}))
""".replace("BATCH", str(BATCH))


def measure(epochs: float, gateway: str, interval: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-c", CHILD, str(MODEL), str(DATA), out, str(epochs), gateway, str(interval)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"benchmark run failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def costs(gateway: str) -> tuple[float, float]:
    """(seconds of hooks per training step on the training thread, CPU seconds per push on the push thread)."""
    from kubetune_job.prometheus import JobMetrics

    metrics = JobMetrics(gateway, namespace="bench", finetunejob="costs", interval=3600)
    callback = metrics.callback(SimpleNamespace(last_committed=10, last_committed_time=time.time()))
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, epoch=0.0, num_input_tokens_seen=0)
    steps = 20000
    began = time.perf_counter()
    for step in range(steps):
        state.global_step = step
        callback.on_step_end(None, state, None)
        if step % 10 == 0:  # the Trainer logs every 10 steps
            callback.on_log(None, state, None, logs={"loss": 0.5, "learning_rate": 1e-4, "grad_norm": 1.0})
    per_step = (time.perf_counter() - began) / steps
    callback.on_evaluate(None, state, None, metrics={"eval_loss": 0.4, "eval_accuracy": 0.8, "eval_f1": 0.7})
    pushes = 50
    began = time.thread_time()
    ok = sum(metrics.push() for _ in range(pushes))
    per_push = (time.thread_time() - began) / pushes
    if ok != pushes:
        sys.exit("pushes to the benchmark's gateway failed")
    return per_step, per_push


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--interval", type=float, default=5.0, help="seconds between pushes")
    a = p.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit("examples/models/all-MiniLM-L6-v2 is missing: run `make install` first")
    from tests.blackhole import Blackhole
    from tests.testbed.prometheus import Pushgateway

    with tempfile.TemporaryDirectory() as tmp:
        gateway = Pushgateway.start(Path(tmp) / "pushgateway")
        hole = Blackhole()
        try:
            runs: dict[str, list[float]] = {"off": [], "gateway": [], "blackholed": []}
            failures = 0.0
            for i in range(a.repeats):
                for name, url in (("off", ""), ("gateway", gateway.url), ("blackholed", hole.url)):
                    result = measure(a.epochs, url, a.interval)
                    runs[name].append(result["samples_per_second"])
                    if name == "blackholed":
                        failures += result["push_failures"] or 0
                shown = ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items())
                print(f"round {i + 1}: samples/s {shown}", flush=True)
            per_step, per_push = costs(gateway.url)
        finally:
            hole.close()
            gateway.stop()
    off = statistics.median(runs["off"])
    print(f"metrics off:              {off:.2f} samples/s (median of {a.repeats})")
    for name in ("gateway", "blackholed"):
        ratio = statistics.median(runs[name]) / off
        print(f"pushing every {a.interval:g} s, {name + ':':<11} {statistics.median(runs[name]):.2f} samples/s, "
              f"ratio {ratio:.4f} (target >= 0.995)")  # fmt: skip
    print(f"failed pushes to the blackholed gateway: {failures:g} in {a.repeats} runs (training went on)")
    steps_per_second = off / BATCH
    share = per_step * steps_per_second + per_push / a.interval
    print(
        f"cost on the training thread: {per_step * 1e6:.1f} us per step; on the push thread: "
        f"{per_push * 1e3:.2f} ms CPU per push -> at most {share:.5%} of training time, ratio >= {1 - share:.4f}"
    )


if __name__ == "__main__":
    main()
