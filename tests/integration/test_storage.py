"""The job against a real S3 server (SeaweedFS): S3 URIs, failures, kills, corruption, preemption.

Each test runs `python -m kubetune_job` as a pod would, pointed at the test bed's S3 gateway by the
standard AWS_* variables, sometimes through a fault proxy that slows or resets its connections.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from tests import jobrun
from tests.faultproxy import FaultProxy
from tests.models import build_tiny_bert, write_pairs
from tests.testbed.processes import free_port

pytestmark = pytest.mark.integration
MANIFEST = "kubetune-manifest.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {"model": build_tiny_bert(base / "model"), "data": write_pairs(base / "data", train=400, validation=40)}


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"kt-{secrets.token_hex(4)}"
    s3.create_bucket(name)
    return name


def env_for(s3: Any, endpoint: str | None = None, **overrides: str) -> dict[str, str]:
    """The pod's environment: the AWS_* variables of the test bed's server, short storage retries."""
    env = {**s3.env(), "KUBETUNE_STORAGE_RETRY_SECONDS": "20", **overrides}
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


def s3_job(tiny: dict[str, Path], bucket: str, **kwargs: Any) -> dict[str, Any]:
    """A job with local model and data, checkpoints and output in the bucket."""
    return jobrun.manifest(
        model=str(tiny["model"]),
        data=str(tiny["data"]),
        checkpoints=f"s3://{bucket}/runs/tiny/",
        output=f"s3://{bucket}/models/tiny/",
        **kwargs,
    )


def objects(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    """{key relative to prefix: size} of everything under s3://bucket/prefix, listed directly."""
    import obstore

    pages = obstore.list(s3.store(bucket), prefix.rstrip("/"))
    return {o["path"][len(prefix) :]: o["size"] for page in pages for o in page}


def checkpoints(s3: Any, bucket: str) -> dict[int, set[str]]:
    """{step: file names} of every checkpoint directory in the job's checkpoint location."""
    out: dict[int, set[str]] = {}
    for key in objects(s3, bucket, "runs/tiny/"):
        m = re.match(r"checkpoint-(\d+)/(.+)$", key)
        if m:
            out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


def committed(s3: Any, bucket: str) -> list[int]:
    return sorted(step for step, files in checkpoints(s3, bucket).items() if MANIFEST in files)


def upload_tree(s3: Any, bucket: str, directory: Path, prefix: str) -> None:
    import obstore

    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        obstore.put(s3.store(bucket), f"{prefix}/{path.relative_to(directory).as_posix()}", path)


def test_model_and_dataset_from_s3_uris_end_to_end(s3: Any, bucket: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    """Model, data, checkpoints and output all in S3, the endpoint from spec.storage: trains and uploads all."""
    upload_tree(s3, bucket, tiny["model"], "base/tiny-bert")
    upload_tree(s3, bucket, tiny["data"], "data/pairs")
    job = jobrun.manifest(
        model=f"s3://{bucket}/base/tiny-bert/",
        data=f"s3://{bucket}/data/pairs/",
        checkpoints=f"s3://{bucket}/runs/tiny/",
        output=f"s3://{bucket}/models/tiny/",
        storage={"endpoint": s3.endpoint, "region": s3.region},
        every=10,
        maxSteps=30,
    )
    env = {k: v for k, v in env_for(s3).items() if not k.startswith("AWS_ENDPOINT")}  # the spec names it
    summary = jobrun.run_job(job, tmp_path, env)
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == 30 and summary["warnings"] == []
    out = objects(s3, bucket, "models/tiny/")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "README.md"):
        assert out.get(name, 0) > 0, name
    assert committed(s3, bucket) == [20, 30]
    assert summary["outputUri"] == f"s3://{bucket}/models/tiny/"


def test_empty_checkpoint_location_starts_from_scratch(
    s3: Any, bucket: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """A bucket with nothing under checkpoints.uri: the first run trains from step 0 without warnings."""
    summary = jobrun.run_job(s3_job(tiny, bucket, every=10, maxSteps=10), tmp_path, env_for(s3))
    assert summary["resumedFromStep"] == 0 and summary["stepsThisRun"] == 10
    assert summary["warnings"] == [] and committed(s3, bucket) == [10]


def test_unreachable_storage_at_start_exits_retryable(s3: Any, tiny: dict[str, Path], tmp_path: Path) -> None:
    """No S3 server at the endpoint: exit code 20 (retried) and a message naming the endpoint."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = env_for(s3, endpoint=endpoint, KUBETUNE_STORAGE_RETRY_SECONDS="2")
    summary = jobrun.run_job(s3_job(tiny, "kt-unreachable"), tmp_path, env, expect=20)
    assert summary["reason"] == "StorageUnavailable" and summary["exitCode"] == 20
    assert endpoint in summary["message"] and summary["field"] == "spec.checkpoints.uri"


@pytest.mark.parametrize(
    ("case", "operation"),
    [("wrong-secret", "write"), ("unknown-key", "write"), ("missing-bucket", "list")],
)
def test_denied_storage_exits_permanent(
    s3: Any, bucket: str, tiny: dict[str, Path], tmp_path: Path, case: str, operation: str
) -> None:
    """Wrong credentials or a missing bucket: exit code 13 (not retried), naming the bucket and operation."""
    job = s3_job(tiny, bucket)
    env = env_for(s3)
    denied = bucket
    if case == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "unknown-key":
        env["AWS_ACCESS_KEY_ID"] = "nobody"
    else:
        denied = f"kt-missing-{secrets.token_hex(3)}"
        job["spec"]["model"]["uri"] = f"s3://{denied}/base/tiny-bert/"
    summary = jobrun.run_job(job, tmp_path, env, expect=13)
    assert summary["reason"] == "StorageDenied"
    assert f"bucket {denied!r}" in summary["message"] and f"({operation} of s3://{denied}/" in summary["message"]


def test_sigkill_during_upload_resumes_from_previous_commit(
    s3: Any, bucket: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """A job killed mid-upload leaves an uncommitted checkpoint; the next run resumes before it and removes it."""
    host, port = s3.endpoint.removeprefix("http://").split(":")
    job = s3_job(tiny, bucket, every=10, keep=2, maxSteps=40)
    with FaultProxy((host, int(port)), latency=0.02, chunk_bytes=16384) as slow:  # uploads take seconds
        proc = jobrun.start(job, tmp_path, env_for(s3, endpoint=slow.url))

        def partial() -> bool:
            found = checkpoints(s3, bucket)
            done = [s for s, files in found.items() if MANIFEST in files]
            return bool(done) and any(s > max(done) and MANIFEST not in f for s, f in found.items())

        jobrun.wait_for(partial, proc, tmp_path, what="a partly uploaded checkpoint after a committed one")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = checkpoints(s3, bucket)
    newest = max(committed(s3, bucket))
    orphans = [s for s, files in before.items() if MANIFEST not in files]
    assert orphans and min(orphans) > newest

    summary = jobrun.run_job(job, tmp_path, env_for(s3))
    assert summary["resumedFromStep"] == newest and summary["finalStep"] == 40
    assert summary["stepsThisRun"] == 40 - newest and summary["warnings"] == []
    assert f"removing uncommitted checkpoint(s) {orphans}" in jobrun.log_tail(tmp_path, 10**6)
    after = checkpoints(s3, bucket)
    assert all(MANIFEST in files for files in after.values()) and sorted(after) == [30, 40]


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(
    s3: Any, bucket: str, tiny: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    """A truncated or altered file in the newest checkpoint: it is skipped with a warning, the one before is used."""
    import obstore

    job = s3_job(tiny, bucket, every=10, keep=3, maxSteps=20)
    jobrun.run_job(job, tmp_path / "first", env_for(s3))
    assert committed(s3, bucket) == [10, 20]
    key = "runs/tiny/checkpoint-20/model.safetensors"
    weights = bytes(obstore.get(s3.store(bucket), key).bytes())
    damaged = weights[: len(weights) // 2] if damage == "truncated" else weights[:-64] + bytes(64)
    obstore.put(s3.store(bucket), key, damaged)

    summary = jobrun.run_job(job, tmp_path / "second", env_for(s3))
    assert summary["resumedFromStep"] == 10 and summary["finalStep"] == 20
    why = "wrong size" if damage == "truncated" else "checksum mismatch in model.safetensors"
    assert any("checkpoint-20" in w and why in w for w in summary["warnings"]), summary["warnings"]
    assert why in jobrun.log_tail(tmp_path / "second", 10**6)
    assert committed(s3, bucket) == [10, 20]  # checkpoint-20 trained again and committed whole


def test_resets_and_latency_mid_upload_retry_and_commit(
    s3: Any, bucket: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """Connections reset and slowed during uploads: requests are retried, every checkpoint commits, and
    training waits on uploads only when a save finds the previous upload still running."""
    host, port = s3.endpoint.removeprefix("http://").split(":")
    job = s3_job(tiny, bucket, every=10, keep=5, maxSteps=40)
    with FaultProxy((host, int(port)), latency=0.002, reset_every_bytes=400_000, max_resets=8) as proxy:
        summary = jobrun.run_job(job, tmp_path, env_for(s3, endpoint=proxy.url))
        resets = proxy.resets
    assert resets == 8, f"only {resets} resets happened: the uploads were smaller than planned"
    assert summary["finalStep"] == 40 and committed(s3, bucket) == [10, 20, 30, 40]
    assert 0 <= summary["checkpointWaitSeconds"] <= summary["checkpointUploadSeconds"]


def test_sigterm_mid_epoch_resumes_to_the_same_step_and_samples(
    s3: Any, bucket: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """SIGTERM mid-epoch commits a checkpoint and exits 21; the resumed run ends where an uninterrupted one does,
    having seen the same number of samples in all."""
    job = s3_job(tiny, bucket, every=30, keep=2, epochs=2)  # 50 steps per epoch
    other = f"kt-{secrets.token_hex(4)}"
    s3.create_bucket(other)
    baseline = jobrun.run_job(s3_job(tiny, other, every=30, keep=2, epochs=2), tmp_path / "baseline", env_for(s3))

    work = tmp_path / "preempted"
    proc = jobrun.start(job, work, env_for(s3))
    jobrun.wait_for(lambda: committed(s3, bucket) == [30], proc, work, what="checkpoint-30")
    proc.send_signal(signal.SIGTERM)
    stopped = jobrun.finish(proc, work, expect=21)
    assert stopped["phase"] == "Preempted" and stopped["reason"] == "Preempted"
    step = stopped["finalStep"]
    assert 30 < step < 50 and stopped["lastCheckpointStep"] == step, stopped  # mid-epoch, committed where it stopped
    assert committed(s3, bucket) == [30, step]

    resumed = jobrun.run_job(job, tmp_path / "resumed", env_for(s3))
    assert resumed["resumedFromStep"] == step
    assert resumed["finalStep"] == baseline["finalStep"] == 100
    assert stopped["samplesThisRun"] + resumed["samplesThisRun"] == baseline["samplesThisRun"] == 800
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["phase"] == "Succeeded"


def test_sigterm_past_the_grace_budget_leaves_no_manifest(
    s3: Any, bucket: str, tiny: dict[str, Path], tmp_path: Path
) -> None:
    """When the commit cannot finish within the grace budget, the job exits 21 without writing its manifest."""
    host, port = s3.endpoint.removeprefix("http://").split(":")
    job = s3_job(tiny, bucket, every=10, keep=2, maxSteps=100)
    env = env_for(s3, KUBETUNE_PREEMPTION_GRACE_SECONDS="1")
    with FaultProxy((host, int(port)), latency=0.05, chunk_bytes=16384) as slow:  # an upload takes many seconds
        proc = jobrun.start(job, tmp_path, {**env, "AWS_ENDPOINT_URL": slow.url})
        jobrun.wait_for(lambda: bool(checkpoints(s3, bucket)), proc, tmp_path, what="a first upload")
        proc.send_signal(signal.SIGTERM)
        stopped = jobrun.finish(proc, tmp_path, expect=21, timeout=60)
    assert stopped["phase"] == "Preempted" and "not committed within the grace budget" in stopped["message"]
    assert committed(s3, bucket) == []


def test_unfinished_multipart_uploads_are_aborted_at_resume(s3: Any, bucket: str, tmp_path: Path) -> None:
    """A writer killed mid multipart upload leaves parts that no listing shows; the next start aborts
    those under its checkpoint location, and only those."""
    import urllib.parse

    from kubetune_job.checkpoints import CheckpointStore
    from kubetune_job.storage import S3Storage, StorageOptions

    def start_upload(key: str) -> None:
        status, body = s3.request("POST", f"/{bucket}/{key}", query="uploads")
        found = re.search(rb"<UploadId>([^<]+)</UploadId>", body)
        assert status == 200 and found, body
        query = f"partNumber=1&uploadId={urllib.parse.quote(found.group(1).decode(), safe='')}"
        assert s3.request("PUT", f"/{bucket}/{key}", query=query, body=secrets.token_bytes(1 << 20))[0] == 200

    start_upload("runs/tiny/checkpoint-30/optimizer.pt")
    start_upload("models/tiny/model.safetensors")  # another location's: not the checkpoints' to touch
    storage = S3Storage(f"s3://{bucket}/runs/tiny/", StorageOptions(), env=s3.env())
    assert [key for key, _ in storage.incomplete_uploads("checkpoint-")] == ["checkpoint-30/optimizer.pt"]
    assert objects(s3, bucket, "runs/tiny/") == {}  # invisible to listing

    assert CheckpointStore(storage, keep=2).resume(tmp_path) is None
    assert storage.incomplete_uploads("checkpoint-") == []
    output = S3Storage(f"s3://{bucket}/models/tiny/", StorageOptions(), env=s3.env())
    assert [key for key, _ in output.incomplete_uploads("")] == ["model.safetensors"]
