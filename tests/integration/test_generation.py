"""Text generation end to end on CPU: a tiny Llama fine-tuned with a LoRA adapter or fully, as a pod runs it.

What the output holds (adapter, tokenizer, generation config, card, merged model), that a full fine-tune
learns, what checkpoints hold and that resumes after SIGKILL and SIGTERM repeat and skip no step, two
processes in one pod (on a chat template that marks the assistant turns), and a base model downloaded from
S3 once per pod and checked against its listing.
"""

from __future__ import annotations

import json
import math
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from tests import jobrun
from tests.faultproxy import FaultProxy
from tests.integration import test_distributed as two
from tests.models import CHATML, CHATML_MARKED, build_tiny_llama, write_chats

pytestmark = pytest.mark.integration

#: 200 training chats, batch 8: 25 steps an epoch, 50 in the 2 epochs.
STEPS = 50
BATCH = 8
#: The adapter's files and the training state a checkpoint of a LoRA run holds.
ADAPTER = {"adapter_config.json", "adapter_model.safetensors"}
STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
MANIFEST = "kubetune-manifest.json"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama with a ChatML template without generation markers, the same with markers, and chats.
    The weights are drawn from a fixed seed: how well a model learns in a few steps depends on its start."""
    import torch

    base = tmp_path_factory.mktemp("llama")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_tiny_llama(base / "model", template=CHATML)
        marked = build_tiny_llama(base / "marked", template=CHATML_MARKED)
    return {"model": model, "marked": marked, "data": write_chats(base / "data")}


def generation_job(
    model: Path | str,
    data: Path,
    work: Path,
    *,
    adapter: bool = True,
    generate: bool = True,
    merge: bool = False,
    every: int = 10,
    **hyper: Any,
) -> dict[str, Any]:
    """A text-generation FineTuneJob on the chats: LoRA rank 8 (or every weight), evaluated every 25 steps."""
    metrics = ("perplexity", "exact_match") if generate else ("perplexity",)
    doc = jobrun.manifest(
        model=str(model),
        data=str(data),
        checkpoints=str(work / "checkpoints"),
        output=str(work / "output"),
        every=every,
        metrics=metrics,
        **{"learningRate": 1e-2 if adapter else 3e-3, "evalEvery": 25, **hyper},
    )
    spec = doc["spec"]
    spec["task"] = "text-generation"
    if adapter:
        spec["adapter"] = {"rank": 8}
    if generate:
        spec["evaluation"] = {"generate": {"examples": 10, "maxNewTokens": 4}}
    if merge:
        spec["output"]["merge"] = True
    return doc


@pytest.fixture(scope="module")
def lora(llama: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted LoRA run with a merged output: its work directory, manifest and summary."""
    work = tmp_path_factory.mktemp("lora")
    job = generation_job(llama["model"], llama["data"], work, merge=True)
    return {"work": work, "job": job, "summary": jobrun.run_job(job, work)}


def committed(checkpoints: Path) -> dict[int, set[str]]:
    """{step: files its manifest lists} of every committed checkpoint."""
    out = {}
    for manifest in checkpoints.glob(f"checkpoint-*/{MANIFEST}"):
        record = json.loads(manifest.read_text())
        out[record["step"]] = {f["path"] for f in record["files"]}
    return out


def adapter_weights(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_lora_output_holds_adapter_tokenizer_generation_config_and_card(
    lora: dict[str, Any], llama: dict[str, Path]
) -> None:
    """A LoRA run on messages with a template without markers writes the adapter (not the base weights), the
    tokenizer with its chat template, the generation config, metrics.json and a card naming the base model,
    the data format, the completion-only loss, the adapter's settings and the metrics."""
    from transformers import AutoTokenizer, GenerationConfig

    summary, out = lora["summary"], lora["work"] / "output"
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == summary["totalSteps"] == STEPS
    assert {"trainLoss", "evalLoss", "evalPerplexity", "evalExactMatch"} <= set(summary["metrics"])
    assert summary["warnings"] == []
    names = {p.name for p in out.iterdir()}
    assert ADAPTER | {"tokenizer.json", "generation_config.json", "metrics.json", "README.md"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}, names  # no base weights
    assert all("lora_" in key for key in adapter_weights(out)), "the adapter file holds frozen base weights"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama["model"])

    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHATML
    generation = GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == AutoTokenizer.from_pretrained(str(out)).eos_token_id
    assert json.loads((out / "metrics.json").read_text())["finalStep"] == STEPS

    card = (out / "README.md").read_text()
    assert f"base_model: {llama['model']}" in card and f"from `{llama['model']}`" in card
    assert "| data format | messages |" in card
    assert "| loss on | the completion (the last assistant turn) |" in card
    assert "| adapter | lora, rank 8, alpha 16, dropout 0.05, target modules all-linear |" in card
    for name, value in summary["metrics"].items():
        assert f"| {name} | {value:.4f} |" in card


def test_merged_model_loads_plainly_and_equals_base_plus_adapter(lora: dict[str, Any], llama: dict[str, Path]) -> None:
    """output.merge writes merged/, which plain AutoModelForCausalLM loads (no PEFT), with its tokenizer, and
    whose logits equal those of the base model with the adapter on top."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lora["work"] / "output"
    merged_dir = out / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged_dir.iterdir()}
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    assert not hasattr(merged, "peft_config")
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert tokenizer.chat_template == CHATML
    base = AutoModelForCausalLM.from_pretrained(str(llama["model"]))
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    turns = [{"role": "user", "content": "the red cat sits"}]
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(llama["model"]))(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4), "the adapter changed nothing: the comparison proves nothing"


def untrained_perplexity(model: Path, data: Path) -> float:
    """exp(mean loss) of the untrained model on the answers of the evaluation split (each chat's last turn
    with its end token), as the job's evaluation counts them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    lm = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    total, count = 0.0, 0
    for line in (data / "validation.jsonl").read_text().splitlines():
        turns = json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template(turns, tokenize=False)
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(whole, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[start - 1 :]
        total, count = total + float(losses.sum()), count + len(losses)
    return math.exp(total / count)


def test_full_fine_tune_learns(llama: dict[str, Path], tmp_path: Path) -> None:
    """Without an adapter every weight trains: greedy answers match at least half the references and the
    perplexity falls well below the untrained model's; the output is a whole model and tokens/s is reported."""
    # 4 epochs: after 50 steps exact_match ranged from 0 to 0.9 over the starting weights of 4 seeds; after
    # 100 it was 1.0 for each of 6 seeds.
    job = generation_job(llama["model"], llama["data"], tmp_path, adapter=False, every=100, epochs=4)
    summary = jobrun.run_job(job, tmp_path)
    metrics = summary["metrics"]
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == 100
    assert metrics["evalExactMatch"] >= 0.5, metrics  # an untrained model answers none right
    before = untrained_perplexity(llama["model"], llama["data"])
    assert metrics["evalPerplexity"] < before / 4, (metrics, before)  # about 1.3 against about 30
    assert metrics["evalPerplexity"] == pytest.approx(math.exp(metrics["evalLoss"]), rel=1e-4)
    assert summary["trainTokensPerSecond"] > 0 and summary["trainSamplesPerSecond"] > 0
    out = {p.name for p in (tmp_path / "output").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= out
    assert not out & ADAPTER
    card = (tmp_path / "output" / "README.md").read_text()
    assert "| adapter | none (every weight fine-tuned) |" in card


def test_checkpoints_hold_the_adapter_and_training_state(lora: dict[str, Any]) -> None:
    """A LoRA run's checkpoints hold the adapter, not the frozen base, with optimizer, scheduler and RNG state;
    the optimizer's state covers the adapter's tensors alone."""
    import torch

    checkpoints = lora["work"] / "checkpoints"
    found = committed(checkpoints)
    assert sorted(found) == [40, 50]  # every 10 steps, the newest two kept
    for step, files in found.items():
        assert files >= ADAPTER | STATE, (step, files)
        assert not files & {"model.safetensors", "pytorch_model.bin"}, (step, files)
    last = checkpoints / "checkpoint-50"
    weights = adapter_weights(last)
    assert weights and all("lora_" in key for key in weights)
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(weights)  # one state per adapter tensor: the base is frozen


def assert_same_training(resumed: Path, baseline: Path) -> None:
    """The resumed run's final adapter equals the uninterrupted run's: it trained on the same batches in the same
    order with the same dropout, none repeated, none skipped."""
    import torch

    want, got = adapter_weights(baseline / "output"), adapter_weights(resumed / "output")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=key)


def test_resume_after_sigkill_then_sigterm_ends_where_an_uninterrupted_run_does(
    lora: dict[str, Any], llama: dict[str, Path], tmp_path: Path
) -> None:
    """A LoRA run killed (SIGKILL) after its first commit, its successor preempted (SIGTERM: it commits the step
    it stopped at and exits 21), and a third attempt: each resumes from the newest committed checkpoint and
    trains each remaining step once, so the run ends at the uninterrupted run's final step, having trained on
    as many samples, with the same adapter."""
    job = generation_job(llama["model"], llama["data"], tmp_path)
    checkpoints = tmp_path / "checkpoints"
    work = tmp_path / "pod"
    proc = jobrun.start(job, work)
    jobrun.wait_for((checkpoints / "checkpoint-10" / MANIFEST).exists, proc, work, what="the first commit")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = max(committed(checkpoints))

    proc = jobrun.start(job, work)  # the container restarted
    later = checkpoints / f"checkpoint-{first + 10}" / MANIFEST
    jobrun.wait_for(later.exists, proc, work, what="a commit after the resumed checkpoint")
    proc.send_signal(signal.SIGTERM)
    stopped = jobrun.finish(proc, work, expect=21)
    step = stopped["finalStep"]
    assert stopped["phase"] == "Preempted" and stopped["reason"] == "Preempted"
    assert stopped["resumedFromStep"] == first and stopped["attempt"] == 2
    assert first + 10 < step < STEPS and stopped["lastCheckpointStep"] == step, stopped
    assert stopped["stepsThisRun"] == step - first and stopped["samplesThisRun"] == BATCH * (step - first)
    assert committed(checkpoints)[step] >= ADAPTER | STATE

    resumed = jobrun.run_job(job, tmp_path / "another-pod")
    assert resumed["resumedFromStep"] == step and resumed["attempt"] == 3
    assert resumed["stepsThisRun"] == STEPS - step and resumed["samplesThisRun"] == BATCH * (STEPS - step)
    assert resumed["finalStep"] == lora["summary"]["finalStep"] == STEPS
    assert BATCH * first + stopped["samplesThisRun"] + resumed["samplesThisRun"] == lora["summary"]["samplesThisRun"]
    assert_same_training(tmp_path, lora["work"])


def test_two_processes_train_a_lora_job_and_report_from_rank0(llama: dict[str, Path], tmp_path: Path) -> None:
    """torchrun with two CPU processes (gloo) trains the adapter once: a global batch of 16, checkpoints with
    both ranks' RNG state, one summary (rank 0's) and one output. The chat template marks the assistant turns
    ({% generation %}): the loss counts every assistant turn, and the card says so."""
    from transformers import AutoTokenizer

    job = generation_job(llama["marked"], llama["data"], tmp_path, every=13)
    code, summary = two.finish(two.start(tmp_path, job), tmp_path)
    log = (tmp_path / "job.log").read_text()
    assert code == 0, log[-3000:]
    steps = 2 * math.ceil(200 / (2 * BATCH))  # 13 steps an epoch: the last batch of each epoch is short
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == summary["totalSteps"] == steps
    assert summary == json.loads((tmp_path / "scratch" / "rank0-summary.json").read_text())
    # Both processes' samples: a full batch each at every step (the short last batches are filled up)
    assert summary["samplesThisRun"] == 2 * BATCH * steps
    assert summary["warnings"] == [] and {"evalPerplexity", "evalExactMatch"} <= set(summary["metrics"])
    assert "global batch 16" in log and len(log.split(f"committed checkpoint-{steps} ")) == 2
    assert committed(tmp_path / "checkpoints")[steps] >= {"rng_state_0.pth", "rng_state_1.pth"} | ADAPTER
    out = tmp_path / "output"
    assert {p.name for p in out.iterdir()} >= ADAPTER
    assert json.loads((out / "metrics.json").read_text())["finalStep"] == steps
    card = (out / "README.md").read_text()
    assert "| loss on | every assistant turn |" in card and "| data format | messages |" in card
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == CHATML_MARKED


class ReplaceOnGet(FaultProxy):
    """A proxy to the S3 gateway that, when the first GET of `key` passes, first replaces that object in the
    bucket with `replacement`: the object changes between the job's listing and its download, as when
    someone uploads a new version of the model while a pod downloads it."""

    def __init__(self, target: tuple[str, int], *, store: Any, bucket: str, key: str, replacement: bytes) -> None:
        super().__init__(target)
        self.store, self.key, self.replacement = store, key, replacement
        self.request_line = f"GET /{bucket}/{key} ".encode()
        self.replaced = False

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...], upstream: bool) -> None:
        if not upstream:
            super()._pump(src, dst, pair, upstream)
            return
        import obstore

        try:
            while data := src.recv(self.chunk_bytes):
                if not self.replaced and self.request_line in data:
                    obstore.put(self.store, self.key, self.replacement)
                    self.replaced = True
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self._reset(pair)


def test_base_model_from_s3_is_checked_and_downloaded_once_per_pod(
    s3: Any, llama: dict[str, Path], tmp_path: Path
) -> None:
    """A model object replaced by a shorter one between listing and download fails the attempt as retryable
    (exit 20, naming the file and both sizes); the retry in the same work directory downloads the new listing
    whole and trains; the attempt after it finds the download complete (its marker) and fetches nothing, and
    resumed from the run's last step, trains none."""
    import obstore

    bucket = f"kt-{secrets.token_hex(4)}"
    s3.create_bucket(bucket)
    for path in sorted(p for p in llama["model"].iterdir() if p.is_file()):
        obstore.put(s3.store(bucket), f"base/llama/{path.name}", path)
    config = json.loads((llama["model"] / "config.json").read_text())
    compact = json.dumps(config).encode()  # the same configuration, fewer bytes
    assert len(compact) < (llama["model"] / "config.json").stat().st_size
    job = generation_job(f"s3://{bucket}/base/llama/", llama["data"], tmp_path, generate=False, maxSteps=4, every=4)
    env = {**s3.env(), "KUBETUNE_STORAGE_RETRY_SECONDS": "20"}

    host, port = s3.endpoint.removeprefix("http://").split(":")
    key = "base/llama/config.json"
    proxy = ReplaceOnGet((host, int(port)), store=s3.store(bucket), bucket=bucket, key=key, replacement=compact)
    with proxy:
        failed = jobrun.run_job(job, tmp_path, {**env, "AWS_ENDPOINT_URL": proxy.url}, expect=20)
        assert proxy.replaced
    assert failed["reason"] == "StorageUnavailable" and failed["field"] == "spec.model.uri", failed
    size = (llama["model"] / "config.json").stat().st_size
    assert f"config.json arrived with {len(compact)} of {size} bytes" in failed["message"], failed["message"]

    downloaded = tmp_path / "scratch" / "model"
    summary = jobrun.run_job(job, tmp_path, env)
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == 4
    assert (downloaded / "config.json").read_bytes() == compact
    assert (downloaded / ".kubetune-download.json").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in downloaded.iterdir()}

    # As a pod restarted after its last commit (killed while writing the output): it trains no step past the last
    again = jobrun.run_job(job, tmp_path, env)
    assert again["phase"] == "Succeeded" and again["resumedFromStep"] == again["finalStep"] == 4
    assert again["stepsThisRun"] == 0 and again["attempt"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in downloaded.iterdir()} == stamps  # nothing fetched again
    assert f"{downloaded} already holds s3://{bucket}/base/llama/" in jobrun.log_tail(tmp_path, 10**6)


def test_a_changed_model_listing_replaces_the_whole_download(s3: Any, tmp_path: Path) -> None:
    """A model re-uploaded with other files (shards instead of one file, say) is fetched afresh: no file of the
    earlier download that the new listing lacks is left beside the new ones, where a loader would find it."""
    import obstore

    from kubetune_job.storage import DOWNLOADED, S3Storage, StorageOptions, download_prefix

    bucket = f"kt-{secrets.token_hex(4)}"
    s3.create_bucket(bucket)
    store = s3.store(bucket)
    obstore.put(store, "base/m/config.json", b"{}")
    obstore.put(store, "base/m/model.safetensors", b"old weights")
    storage = S3Storage(f"s3://{bucket}/base/m/", StorageOptions(), env=s3.env())
    target = tmp_path / "model"
    download_prefix(storage, "", target)
    assert sorted(p.name for p in target.iterdir()) == [DOWNLOADED, "config.json", "model.safetensors"]

    obstore.delete(store, "base/m/model.safetensors")
    obstore.put(store, "base/m/model-00001-of-00001.safetensors", b"new weights")
    download_prefix(storage, "", target)
    assert sorted(p.name for p in target.iterdir()) == [DOWNLOADED, "config.json", "model-00001-of-00001.safetensors"]
