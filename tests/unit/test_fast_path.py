"""The fast path's decisions, the global batch, and how the job launches several processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.exit_codes import ExitCode
from kubetune_api.settings import JobSettings
from kubetune_api.spec import FineTuneJobSpec, parse_manifest
from kubetune_job import launch
from kubetune_job.arguments import arguments, check_extra, global_batch, pad_multiple
from kubetune_job.errors import ConfigError
from tests.unit.test_spec import GOOD


def spec(**hyper: Any) -> FineTuneJobSpec:
    return parse_manifest({**GOOD, "spec": {**GOOD["spec"], "hyperparameters": hyper}}).spec


def kwargs(*, cuda: bool, tf32: bool = False, processes: int = 1, **hyper: Any) -> dict[str, Any]:
    precision = "bf16" if cuda else "fp32"
    return arguments(
        spec(**hyper), output_dir=Path("out"), precision=precision, has_eval=True, cuda=cuda, tf32=tf32,
        processes=processes,
    )  # fmt: skip


# The fast path's TrainingArguments


def test_cpu_keeps_the_plain_trainer_defaults() -> None:
    """On CPU the job sets no optimizer, no loader workers, no TF32 and no pinned memory."""
    kw = kwargs(cuda=False)
    assert not {"optim", "tf32", "dataloader_num_workers", "dataloader_persistent_workers", "use_cpu"} & set(kw)
    assert kw["dataloader_pin_memory"] is False and kw["bf16"] is False and kw["fp16"] is False
    assert kw["train_sampling_strategy"] == "random" and kw["torch_compile"] is False


def test_gpu_gets_fused_adamw_tf32_and_loader_workers() -> None:
    """On an Ampere or newer GPU: bf16, TF32, fused AdamW, two pinned-memory loader workers kept alive."""
    kw = kwargs(cuda=True, tf32=True)
    assert kw["bf16"] is True and kw["tf32"] is True and kw["optim"] == "adamw_torch_fused"
    assert kw["dataloader_num_workers"] == 2 and kw["dataloader_persistent_workers"] is True
    assert kw["dataloader_pin_memory"] is True


def test_tf32_only_where_the_gpu_has_it() -> None:
    """An older GPU gets no tf32 key, which TrainingArguments would reject there."""
    assert "tf32" not in kwargs(cuda=True, tf32=False)


def test_every_fast_path_key_is_a_training_argument() -> None:
    """The fast path names only real TrainingArguments fields, on GPU and CPU, one process or several."""
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for cuda in (True, False):
        assert set(kwargs(cuda=cuda, tf32=cuda, processes=2)) <= known


def test_extra_overrides_a_fast_path_choice() -> None:
    """hyperparameters.extra wins over the fast path; no loader workers means none to keep alive."""
    kw = kwargs(cuda=True, tf32=True, extra={"optim": "adamw_torch", "dataloader_num_workers": 0, "tf32": False})
    assert kw["optim"] == "adamw_torch" and kw["tf32"] is False and kw["dataloader_num_workers"] == 0
    assert "dataloader_persistent_workers" not in kw


def test_compile_and_length_grouping_are_spec_fields() -> None:
    """compile and groupByLength map onto torch_compile and the length-grouped sampler."""
    kw = kwargs(cuda=True, compile=True, groupByLength=True)
    assert kw["torch_compile"] is True and kw["train_sampling_strategy"] == "group_by_length"


def test_extra_cannot_set_what_a_spec_field_sets() -> None:
    """torch_compile in extra points at hyperparameters.compile."""
    with pytest.raises(ConfigError) as e:
        check_extra({"torch_compile": True}, {"torch_compile"})
    assert "hyperparameters.compile" in e.value.message


def test_several_processes_on_cpu_use_gloo_ddp_without_the_unused_parameter_search() -> None:
    """With several CPU processes the Trainer is told to use the CPU (DDP over gloo) and skips find_unused."""
    kw = kwargs(cuda=False, processes=2)
    assert kw["use_cpu"] is True and kw["ddp_find_unused_parameters"] is False
    assert kwargs(cuda=True, tf32=True, processes=4)["ddp_find_unused_parameters"] is False
    assert "ddp_find_unused_parameters" not in kwargs(cuda=True, tf32=True)


@pytest.mark.parametrize(
    ("cuda", "field", "expected"), [(True, None, 8), (False, None, None), (True, 1, None), (False, 64, 64)]
)
def test_padding_multiple(cuda: bool, field: int | None, expected: int | None) -> None:
    """Batches pad to a multiple of 8 on GPU, not at all on CPU, unless padToMultipleOf says otherwise."""
    assert pad_multiple(spec(padToMultipleOf=field).hyperparameters, cuda=cuda) == expected


def test_global_batch_is_per_device_batch_times_processes_times_accumulation() -> None:
    """batchSize is per device: 8 per GPU x 4 GPUs x 2 accumulation steps = 64 examples per step."""
    hp = spec(batchSize=8, gradientAccumulationSteps=2).hyperparameters
    assert global_batch(hp, processes=4) == 64
    assert global_batch(hp, processes=1) == 16


def test_attention_defaults_to_sdpa_and_rejects_unknown_kernels() -> None:
    """attention is sdpa unless set to eager; anything else is a spec error."""
    from kubetune_api.spec import SpecError

    assert spec().hyperparameters.attention == "sdpa"
    with pytest.raises(SpecError):
        spec(attention="flash")


# Launching several processes


def settings(tmp_path: Path, **fields: Any) -> JobSettings:
    return JobSettings(work_dir=tmp_path / "work", summary_path=tmp_path / "summary.json", **fields)


def test_the_job_learns_its_process_layout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBETUNE_NPROC_PER_NODE, _NNODES, _NODE_RANK, _MASTER_ADDR and _MASTER_PORT land in JobSettings."""
    env = {"NPROC_PER_NODE": "4", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "ft-0.ft", "MASTER_PORT": "29400"}
    for key, value in env.items():
        monkeypatch.setenv(f"KUBETUNE_{key}", value)
    s = JobSettings()
    assert (s.nproc_per_node, s.nnodes, s.node_rank, s.master_addr, s.master_port) == (4, 2, 1, "ft-0.ft", 29400)


def test_launch_only_with_several_processes_and_not_inside_torchrun(tmp_path: Path) -> None:
    """One process runs the job itself; several relaunch under torchrun, except in a worker (LOCAL_RANK set)."""
    assert not launch.needed(settings(tmp_path), {})
    assert launch.needed(settings(tmp_path, nproc_per_node=2), {})
    assert not launch.needed(settings(tmp_path, nproc_per_node=2), {"LOCAL_RANK": "0"})
    assert launch.needed(settings(tmp_path, nnodes=2, master_addr="m"), {})


def test_torchrun_argv_for_one_pod(tmp_path: Path) -> None:
    """One node: a standalone rendezvous, N processes, no torchrun restarts, the job as a module."""
    argv = launch.torchrun_argv(settings(tmp_path, nproc_per_node=4), python="py")
    assert argv == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone", "--max-restarts=0",
        "-m", "kubetune_job",
    ]  # fmt: skip


def test_torchrun_argv_for_several_pods(tmp_path: Path) -> None:
    """Several nodes: a static rendezvous at node 0's address, with this pod's node rank."""
    s = settings(tmp_path, nproc_per_node=8, nnodes=2, node_rank=1, master_addr="ft-0.ft", master_port=29400)
    argv = launch.torchrun_argv(s, python="py")
    assert argv[3:9] == [
        "--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=ft-0.ft", "--master-port=29400",
        "--max-restarts=0",
    ]  # fmt: skip
    assert "--standalone" not in argv


def test_several_pods_without_a_master_address_is_a_config_error(tmp_path: Path) -> None:
    """nnodes > 1 with no KUBETUNE_MASTER_ADDR names that variable."""
    with pytest.raises(ConfigError) as e:
        launch.torchrun_argv(settings(tmp_path, nproc_per_node=2, nnodes=2))
    assert e.value.field == "KUBETUNE_MASTER_ADDR"


def test_workers_write_their_summary_to_a_private_file(tmp_path: Path) -> None:
    """The workers' summary goes under the work directory; the launcher owns the termination message."""
    env = launch.worker_environment(settings(tmp_path, nproc_per_node=2), {"PATH": "/bin"})
    assert env["KUBETUNE_SUMMARY_PATH"] == str(tmp_path / "work" / launch.WORKER_SUMMARY)
    assert env["PATH"] == "/bin"


def test_rank0_permanent_error_is_the_pod_exit_code() -> None:
    """torchrun's generic 1 becomes rank 0's data-error code 12, with rank 0's summary."""
    rank0 = {"phase": "Failed", "exitCode": 12, "reason": "DataError", "message": "no column"}
    summary, code = launch.outcome(1, rank0, node_rank=0)
    assert code == ExitCode.DATA_ERROR and summary == rank0


def test_success_is_read_from_rank0_summary() -> None:
    """Rank 0's Succeeded summary and torchrun's 0 make exit code 0."""
    summary, code = launch.outcome(0, {"phase": "Succeeded", "finalStep": 10}, node_rank=0)
    assert code == 0 and summary["finalStep"] == 10


def test_a_crash_before_any_summary_is_retried() -> None:
    """No summary from rank 0 (killed, crashed) is a retryable error that says where to look."""
    summary, code = launch.outcome(-9, None, node_rank=0)
    assert code == ExitCode.RETRYABLE and summary["phase"] == "Failed" and "pod log" in summary["message"]


def test_other_nodes_report_their_own_code_but_not_the_runs_summary() -> None:
    """Node 1's first process succeeded: exit 0 with a note, since the run's summary is node 0's. It stopped
    because a peer was preempted: exit 21 like node 0, so the Job ignores it there too."""
    summary, code = launch.outcome(0, {"phase": "Succeeded", "finalStep": 10}, node_rank=1)
    assert code == 0 and summary == {"phase": "Succeeded", "message": "node 1: the summary is node 0's"}
    stopped = {"phase": "Failed", "exitCode": 21, "reason": "Preempted", "message": "stopped by SIGTERM"}
    assert launch.outcome(1, stopped, node_rank=1) == (stopped, ExitCode.PREEMPTED)


def test_only_each_nodes_first_process_writes_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 on rank 0's node fails like rank 0 but leaves the summary file to it; another node's first
    process (local rank 0) writes its own, for its own launcher."""
    from kubetune_job.orchestrate import execute

    logging.getLogger("kubetune_job").setLevel(logging.CRITICAL)
    s = settings(tmp_path).model_copy(update={"spec": "not json"})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert execute(s) == ExitCode.INVALID_CONFIG
    assert not s.summary_path.exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert execute(s) == ExitCode.INVALID_CONFIG
    assert json.loads(s.summary_path.read_text())["reason"] == "InvalidConfig"


def test_the_launcher_turns_an_invalid_layout_into_a_config_error(tmp_path: Path) -> None:
    """launch() with two nodes and no master address exits 10 with a summary naming the variable."""
    s = settings(tmp_path, nproc_per_node=2, nnodes=2)
    assert launch.launch(s, environ=dict(os.environ)) == ExitCode.INVALID_CONFIG
    assert json.loads(s.summary_path.read_text())["field"] == "KUBETUNE_MASTER_ADDR"


# Loading the model


def test_a_model_without_sdpa_falls_back_to_eager(tmp_path: Path) -> None:
    """BigBird has no sdpa kernel: the job loads it with eager attention instead of failing."""
    from transformers import BigBirdConfig, BigBirdForSequenceClassification

    from kubetune_job.orchestrate import Pretrained
    from kubetune_job.tasks import Prepared, TextClassification

    config = BigBirdConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, attention_type="original_full",
    )  # fmt: skip
    BigBirdForSequenceClassification(config).save_pretrained(str(tmp_path))
    pretrained = Pretrained(str(tmp_path), "spec.model.uri", {}, str(tmp_path))
    model = TextClassification().load_model(
        pretrained, Prepared(None, ["a", "b"]), spec=spec(attention="sdpa"), precision="fp32"
    )
    assert model.config._attn_implementation == "eager"


def test_the_classifier_loss_is_not_rescaled_by_the_trainer(tmp_path: Path) -> None:
    """The loaded model opts out of num_items_in_batch, so DDP and accumulation keep a mean loss."""
    from kubetune_job.orchestrate import Pretrained
    from kubetune_job.tasks import Prepared, TextClassification
    from tests.models import build_tiny_bert

    path = str(build_tiny_bert(tmp_path))
    model = TextClassification().load_model(
        Pretrained(path, "spec.model.uri", {}, path), Prepared(None, ["0", "1"]), spec=spec(attention="sdpa"),
        precision="fp32",
    )  # fmt: skip
    assert model.accepts_loss_kwargs is False and model.config._attn_implementation == "sdpa"
