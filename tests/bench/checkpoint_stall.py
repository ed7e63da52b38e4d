"""Training time lost per checkpoint: background upload divided by saving and uploading synchronously.

The kubetune job fine-tunes the example's all-MiniLM-L6-v2 (a ~270 MB checkpoint with optimizer
state) with checkpoints in a SeaweedFS that this script starts on 127.0.0.1, twice, each in a fresh
process, in this one invocation:

- background: the job as it ships; training blocks only to hard-link the checkpoint for the
  upload, and to wait when a save finds the previous upload still running;
- synchronous: the same job with the commit done inside on_save, training stopped until it ends.

Both runs also spend the Trainer's own local save (the same in both). Reported per checkpoint: the
upload part of the stall (time training blocked in the commit callback's on_save) in each mode and
their ratio, target <= 0.1; the whole stall with the local save included; the wait at train end for
the last upload (training is over then; the output follows it); and each run's training
throughput, which also shows what uploading beside training costs on shared CPUs.

    .venv/bin/python tests/bench/checkpoint_stall.py [--steps 60] [--every 15]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
MODEL = ROOT / "examples" / "models" / "all-MiniLM-L6-v2"
DATA = ROOT / "examples" / "data" / "paraphrase"

RUN = """
import json, sys, time
from pathlib import Path
from transformers import Trainer
from kubetune_job import callbacks
from kubetune_job.checkpoints import checkpoint_dir
from kubetune_api.settings import JobSettings
from kubetune_api.spec import parse_manifest
from kubetune_job.orchestrate import run

mode, model, data, uri, out, steps, every = sys.argv[1:8]
blocked, at_end, saving = [], [], []

def timed(method, into):
    def wrapper(self, *args, **kwargs):
        began = time.monotonic()
        try:
            return method(self, *args, **kwargs)
        finally:
            into.append(time.monotonic() - began)
    return wrapper

def commit_now(self, args, state, control, **kwargs):  # the synchronous baseline
    began = time.monotonic()
    self.store.commit(Path(args.output_dir) / checkpoint_dir(state.global_step), state.global_step)
    self.upload_seconds += time.monotonic() - began

if mode == "synchronous":
    callbacks.CommitCheckpoints.on_save = commit_now
    callbacks.CommitCheckpoints.on_train_end = lambda self, *a, **k: None
callbacks.CommitCheckpoints.on_save = timed(callbacks.CommitCheckpoints.on_save, blocked)
callbacks.CommitCheckpoints.on_train_end = timed(callbacks.CommitCheckpoints.on_train_end, at_end)
Trainer._save_checkpoint = timed(Trainer._save_checkpoint, saving)

job = parse_manifest({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bench"},
    "spec": {"model": {"uri": model}, "dataset": {"uri": data, "maxLength": 64, "evalSplit": None},
             "hyperparameters": {"maxSteps": int(steps), "batchSize": 16, "learningRate": 1e-4},
             "checkpoints": {"uri": uri, "every": int(every), "keep": 2}, "output": {"uri": str(Path(out) / "model")}}})
summary = run(job.spec, JobSettings(work_dir=Path(out) / "scratch", summary_path=Path(out) / "summary.json"))
speed, uploads = summary["trainSamplesPerSecond"], summary["checkpointUploadSeconds"]
result = {"blocked": blocked, "at_end": at_end, "saving": saving}
result.update(samples_per_second=speed, upload_seconds=uploads)
print("RESULT", json.dumps(result))
"""


def measure(mode: str, s3: Any, steps: int, every: int) -> dict[str, Any]:
    bucket = f"stall-{mode[:4]}-{secrets.token_hex(3)}"
    s3.create_bucket(bucket)
    env = {**os.environ, **s3.env(), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "job")}
    try:
        with tempfile.TemporaryDirectory() as out:
            argv = [sys.executable, "-c", RUN, mode, str(MODEL), str(DATA), f"s3://{bucket}/run/", out]
            done = subprocess.run([*argv, str(steps), str(every)], env=env, capture_output=True, text=True, check=False)
    finally:
        s3.delete_bucket(bucket)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=15)
    a = p.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit("examples/models/all-MiniLM-L6-v2 is missing: run `make install` first")
    sys.path.insert(0, str(ROOT))
    from tests.testbed.s3 import SeaweedS3

    with tempfile.TemporaryDirectory(prefix="kubetune-stall-bench-") as tmp:
        s3 = SeaweedS3.start(Path(tmp) / "s3")
        try:
            results = {mode: measure(mode, s3, a.steps, a.every) for mode in ("background", "synchronous")}
        finally:
            s3.stop()
    per: dict[str, dict[str, float]] = {}
    for mode, r in results.items():
        n = len(r["saving"])
        per[mode] = {"upload": sum(r["blocked"]) / n, "save": sum(r["saving"]) / n}
        print(
            f"{mode:12} {n} checkpoints: blocked on the commit {per[mode]['upload']:6.3f} s, local save "
            f"{per[mode]['save']:5.2f} s per checkpoint; {r['samples_per_second']:.2f} samples/s; "
            f"uploads took {r['upload_seconds']:.2f} s in all; {sum(r['at_end']):.2f} s waited at train end"
        )
    bg, sync = per["background"], per["synchronous"]
    print(f"upload part of the stall, background/synchronous: {bg['upload'] / sync['upload']:.3f} (target <= 0.1)")
    whole = (bg["upload"] + bg["save"]) / (sync["upload"] + sync["save"])
    print(f"whole stall with the local save, background/synchronous: {whole:.3f}")
    speed = results["background"]["samples_per_second"] / results["synchronous"]["samples_per_second"]
    print(f"training throughput, background/synchronous: {speed:.3f}")


if __name__ == "__main__":
    main()
