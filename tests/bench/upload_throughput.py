"""Checkpoint upload throughput: kubetune's uploader divided by boto3's upload_file and by s3fs's put.

A bert-base-sized checkpoint directory (a 440 MB model.safetensors and an 880 MB optimizer.pt of
random bytes, plus small json files; --size-mb scales the two big files) goes to a SeaweedFS that
this script starts on 127.0.0.1, the same files three ways in one run, each into a fresh bucket:

- kubetune: CheckpointStore.commit, what the job does after each save (obstore multipart uploads
  with parts in flight, the files a few at a time, sha256 of every file, then the manifest);
- boto3: upload_file for each file with the default TransferConfig (a plain training script);
- s3fs: put of the whole directory (what fsspec-based tools do).

boto3 and s3fs never enter the project's environment (botocore pins python-dateutil<3, the
kubernetes client needs >=3): they run in a subprocess from their own venv, created on first use
under ~/.cache/kubetune/bench-venv. Every upload is checked to have arrived whole. Target: >= 1.5x boto3.

    .venv/bin/python tests/bench/upload_throughput.py [--size-mb 1320] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "job")]

from kubetune_job.checkpoints import CheckpointStore  # noqa: E402
from kubetune_job.storage import S3Storage, StorageOptions  # noqa: E402
from tests.testbed.s3 import SeaweedS3  # noqa: E402

BENCH_VENV = Path.home() / ".cache" / "kubetune" / "bench-venv"

OTHERS = """
import json, os, sys, time
tool, endpoint, key, secret, region, bucket, directory = sys.argv[1:8]
began, cpu = time.monotonic(), os.times()
if tool == "boto3":
    import boto3
    from botocore.config import Config
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                          region_name=region, config=Config(s3={"addressing_style": "path"}))
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            path = os.path.join(root, name)
            client.upload_file(path, bucket, "checkpoint-1/" + os.path.relpath(path, directory))
else:
    import s3fs
    fs = s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=endpoint, client_kwargs={"region_name": region})
    fs.put(directory.rstrip("/") + "/", f"{bucket}/checkpoint-1/", recursive=True)
used = os.times()
spent = used.user + used.system - cpu.user - cpu.system
print("RESULT", json.dumps({"seconds": time.monotonic() - began, "cpu": spent}))
"""


def bench_python() -> Path:
    """The separate venv's python with boto3 and s3fs, created on first use."""
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {BENCH_VENV} with boto3 and s3fs (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "s3fs", "boto3"], check=True)
    return python


def make_checkpoint(directory: Path, size_mb: float) -> int:
    """bert-base proportions: weights 1/3, optimizer state 2/3 of size_mb, plus small json files."""
    directory.mkdir(parents=True, exist_ok=True)
    big = {"model.safetensors": size_mb / 3, "optimizer.pt": size_mb * 2 / 3}
    for name, mb in big.items():
        with (directory / name).open("wb") as f:
            left = int(mb * 1e6)
            while left > 0:
                f.write(os.urandom(min(left, 64 << 20)))
                left -= 64 << 20
    small = {"config.json": 700, "trainer_state.json": 5_000, "training_args.bin": 5_500, "scheduler.pt": 1_500}
    for name, size in small.items():
        (directory / name).write_bytes(os.urandom(size))
    (directory / "rng_state.pth").write_bytes(os.urandom(14_000))
    return sum(p.stat().st_size for p in directory.iterdir())


def stored_bytes(s3: SeaweedS3, bucket: str) -> int:
    import obstore

    return sum(o["size"] for page in obstore.list(s3.store(bucket), "checkpoint-1") for o in page)


def kubetune(s3: SeaweedS3, bucket: str, directory: Path, options: StorageOptions) -> tuple[float, float]:
    env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    storage = S3Storage(f"s3://{bucket}/", replace(options, endpoint=s3.endpoint, region=s3.region), env=env)
    store = CheckpointStore(storage, keep=10)
    began, cpu = time.monotonic(), os.times()
    store.commit(directory, 1)
    used = os.times()
    return time.monotonic() - began, used.user + used.system - cpu.user - cpu.system


def other(tool: str, s3: SeaweedS3, bucket: str, directory: Path) -> tuple[float, float]:
    argv = [str(bench_python()), "-c", OTHERS, tool, s3.endpoint, s3.access_key, s3.secret_key, s3.region, bucket]
    done = subprocess.run([*argv, str(directory)], capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{tool} upload failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    return float(result["seconds"]), float(result["cpu"])


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (from /proc; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    tool: str, s3: SeaweedS3, directory: Path, total: int, options: StorageOptions
) -> tuple[float, float, float]:
    """Seconds (wall, client CPU, server CPU) to upload into a fresh bucket; checked whole, then dropped."""
    bucket = f"bench-{tool}-{secrets.token_hex(3)}"
    s3.create_bucket(bucket)
    try:
        server = cpu_seconds(s3.process.pid)
        took = kubetune(s3, bucket, directory, options) if tool == "kubetune" else other(tool, s3, bucket, directory)
        server = cpu_seconds(s3.process.pid) - server
        arrived = stored_bytes(s3, bucket)
        if arrived < total:
            sys.exit(f"{tool}: only {arrived} of {total} bytes arrived")
    finally:
        s3.delete_bucket(bucket)
    return (*took, server)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=1320.0, help="size of the two big files together")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--part-mb", type=int, default=StorageOptions.part_bytes >> 20)
    p.add_argument("--parts-in-flight", type=int, default=StorageOptions.parts_in_flight)
    a = p.parse_args()
    options = StorageOptions(part_bytes=a.part_mb << 20, parts_in_flight=a.parts_in_flight)
    bench_python()
    with tempfile.TemporaryDirectory(prefix="kubetune-upload-bench-") as tmp:
        directory = Path(tmp) / "checkpoint-1"
        total = make_checkpoint(directory, a.size_mb)
        print(f"checkpoint: {total / 1e6:.0f} MB in {len(list(directory.iterdir()))} files", flush=True)
        s3 = SeaweedS3.start(Path(tmp) / "s3")
        times: dict[str, list[float]] = {"kubetune": [], "boto3": [], "s3fs": []}
        cpu: dict[str, list[float]] = {tool: [] for tool in times}
        server_cpu: dict[str, list[float]] = {tool: [] for tool in times}
        try:
            for i in range(a.repeats):
                for tool in times:
                    seconds, used, served = measure(tool, s3, directory, total, options)
                    times[tool].append(seconds)
                    cpu[tool].append(used)
                    server_cpu[tool].append(served)
                    rate = total / 1e6 / seconds
                    line = f"{seconds:6.2f} s {rate:6.1f} MB/s, CPU client {used:5.2f} s server {served:5.2f} s"
                    print(f"round {i + 1}: {tool:8} {line}", flush=True)
        finally:
            s3.stop()
    best: dict[str, Any] = {tool: statistics.median(t) for tool, t in times.items()}
    for tool, seconds in best.items():
        per_gb = [statistics.median(c[tool]) / (total / 1e9) for c in (cpu, server_cpu)]
        print(
            f"{tool:8} {total / 1e6 / seconds:7.1f} MB/s, CPU per GB client {per_gb[0]:5.2f} s "
            f"server {per_gb[1]:5.2f} s (median of {a.repeats})"
        )
    print(f"ratio kubetune/boto3: {best['boto3'] / best['kubetune']:.2f}x (target >= 1.5)")
    print(f"ratio kubetune/s3fs:  {best['s3fs'] / best['kubetune']:.2f}x")


if __name__ == "__main__":
    main()
