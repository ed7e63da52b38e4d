"""The job's linear main: configure -> load -> tokenize -> resume -> train -> evaluate -> save.

`run` raises JobError subclasses for problems a user can fix; `execute` turns any outcome into
an exit code and the JSON summary. Side effects (output, summary) happen on the main process only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_api.exit_codes import ExitCode
from kubetune_api.settings import JobSettings, local_checkpoints
from kubetune_api.spec import HUB_ID, FineTuneJobSpec, SpecError, matches
from kubetune_api.summary import Summary

from .checkpoints import CheckpointStore, checkpoint_dir
from .errors import JobError, ModelError, Preempted
from .storage import StorageOptions, check_writable, download_prefix, is_remote, local_path, open_storage
from .summary import camel_metrics, failure, per_second, run_loss, scores
from .summary import write as write_summary

if TYPE_CHECKING:
    from .callbacks import CommitCheckpoints, RunAccount
    from .preemption import Preemption
    from .prometheus import JobMetrics

log = logging.getLogger(__name__)

#: The file that marks a saved PEFT adapter.
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Pretrained:
    """What the job starts from: a base model and, when spec.model.uri holds a saved adapter, that adapter."""

    #: The base model: a local directory or a Hub id.
    path: str
    #: The spec field that names it, for errors.
    field: str
    #: from_pretrained keyword arguments (revision, trust_remote_code).
    hub: dict[str, Any]
    #: The base model as the spec (or the saved adapter's config) names it: a Hub id, an s3:// URI or a path.
    #: An adapter this job writes records it as its base.
    reference: str
    #: A saved adapter (a directory with adapter_config.json) to continue training or merge into the base.
    adapter: str | None = None

    @property
    def tokenizer(self) -> str:
        """Where the tokenizer is read: the saved adapter's directory when it holds one (a FineTuneJob's output
        does, with its chat template), else the base model."""
        if self.adapter and (Path(self.adapter) / "tokenizer_config.json").is_file():
            return self.adapter
        return self.path


def saved_adapter_base(config: dict[str, Any]) -> tuple[str, str | None]:
    """(base model, revision) an adapter_config.json names (pure)."""
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise ModelError(
            "spec.model.uri",
            "the adapter's adapter_config.json names no base model (base_model_name_or_path): set it to the base "
            "model's Hub id, s3:// URI or path",
        )
    revision = config.get("revision")
    return base, revision if isinstance(revision, str) and revision else None


def model_directory(uri: str, target: Path, *, download: bool, options: StorageOptions | None, what: str) -> Path:
    """The local directory of a model at `uri` (an s3:// prefix is downloaded into target), holding a saved
    model (config.json) or a saved adapter (adapter_config.json)."""
    if is_remote(uri):
        if download:
            download_prefix(open_storage(uri, options, field="spec.model.uri"), "", target)
        if not target.is_dir() or not any(target.iterdir()):
            raise ModelError("spec.model.uri", f"no files under {uri}{what}")
        path = target
    else:
        path = local_path(uri)
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        found = "does not exist" if not path.exists() else "has neither config.json nor adapter_config.json"
        raise ModelError(
            "spec.model.uri",
            f"{path}{what} {found}; give a directory holding a saved model (config.json) or a saved adapter "
            "(adapter_config.json, as a text-generation FineTuneJob with an adapter writes)",
        )
    return path


def model_source(
    spec: FineTuneJobSpec, work_dir: Path, *, download: bool = True, options: StorageOptions | None = None
) -> Pretrained:
    """The base model (a path or Hub id) with its from_pretrained keyword arguments, and the saved adapter when
    spec.model.uri holds one: its base model is the one its adapter_config.json names, resolved as spec.model
    is (a Hub id, an s3:// URI or a path).

    download=False: another process of this pod has downloaded it into work_dir already.
    """
    import json

    m = spec.model
    hub: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if m.id:
        return Pretrained(m.id, "spec.model.id", {**hub, "revision": m.revision}, m.id)
    assert m.uri is not None  # the spec guarantees exactly one of id/uri
    path = model_directory(m.uri, work_dir / "model", download=download, options=options, what="")
    if (path / "config.json").is_file():
        return Pretrained(str(path), "spec.model.uri", hub, m.uri)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelError("spec.model.uri", f"cannot read {ADAPTER_CONFIG} of {m.uri}: {e}") from None
    base, revision = saved_adapter_base(config if isinstance(config, dict) else {})
    named = f" (the base model that {m.uri}/{ADAPTER_CONFIG} names)"
    if "://" in base or Path(base).is_dir() or not matches(HUB_ID, base):  # else a Hub id
        base_path = model_directory(base, work_dir / "base", download=download, options=options, what=named)
        if not (base_path / "config.json").is_file():
            raise ModelError(
                "spec.model.uri",
                f"{base}{named} is itself an adapter: start from an output with a merged model (output.merge) or "
                "name a whole model as the adapter's base",
            )
        return Pretrained(str(base_path), "spec.model.uri", hub, base, adapter=str(path))
    return Pretrained(base, "spec.model.uri", {**hub, "revision": revision or "main"}, base, adapter=str(path))


def dataset_splits(
    spec: FineTuneJobSpec, work_dir: Path, *, download: bool = True, options: StorageOptions | None = None
) -> Any:
    from .data import load_hub, load_local

    ds = spec.dataset
    if ds.id:
        return load_hub(ds, token=None)
    assert ds.uri is not None
    if is_remote(ds.uri):
        target = work_dir / "data"
        if download:
            download_prefix(open_storage(ds.uri, options, field="spec.dataset.uri"), "", target)
        return load_local(target, ds)
    return load_local(local_path(ds.uri), ds)


def last_eval(history: list[dict[str, Any]], step: int) -> dict[str, float] | None:
    """The evaluation logged at `step`, if the Trainer already ran one there."""
    for entry in reversed(history):
        if entry.get("step") == step and any(k.startswith("eval_") for k in entry):
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return None


def storage_options(spec: FineTuneJobSpec, settings: JobSettings) -> StorageOptions:
    """How to reach s3:// URIs: the spec's storage block over the AWS_* environment."""
    return StorageOptions(
        endpoint=spec.storage.endpoint, region=spec.storage.region, retry_seconds=settings.storage_retry_seconds
    )


def progress(
    trainer: Any, account: RunAccount, commit: CommitCheckpoints, resumed: int | None, warnings: Sequence[str]
) -> dict[str, Any]:
    """Where training stands, for the summary of a finished or a preempted run (Summary fields)."""
    return {
        "final_step": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,
        "epoch": round(float(trainer.state.epoch or 0), 4),
        "resumed_from_step": resumed or 0,
        "attempt": account.lineage.attempt,
        "steps_this_run": account.steps,
        "samples_this_run": account.run_samples,  # every process's
        "last_checkpoint_step": commit.last_committed or resumed,
        "checkpoint_wait_seconds": round(commit.upload_wait_seconds, 3),
        "checkpoint_upload_seconds": round(commit.upload_seconds, 3),
        "warnings": list(warnings),
    }


def requested(evaluation: dict[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """The evaluation's loss and the requested metrics (a Trainer may log more: TRL's token accuracy...)."""
    keep = {"eval_loss", *(f"eval_{m}" for m in metrics)}
    return {k: v for k, v in evaluation.items() if k in keep}


def run(
    spec: FineTuneJobSpec,
    settings: JobSettings,
    *,
    callbacks: Sequence[Any] = (),
    console_logs: bool = True,
    job_metrics: JobMetrics | None = None,
    preemption: Preemption | None = None,
) -> Summary:
    """Fine-tune as the spec says; return the summary of a successful run.

    preemption: the SIGTERM handler execute() installed; without one, SIGTERM is not handled.

    console_logs=False drops the Trainer's printed log dicts (a terminal shows its own progress).
    job_metrics, when given, is fed by a callback (execute() starts it and pushes the outcome).
    """
    from transformers import PrinterCallback, set_seed

    from .arguments import global_batch, training_arguments
    from .callbacks import CommitCheckpoints, LogAtSaves, RunAccount, StopAtLastStep, TrainingDone
    from .distributed import SaveBarrier, from_main, is_local_main, is_main, local_main_first
    from .output import model_card, save
    from .preemption import Preemption
    from .tasks import IMPLEMENTATIONS, precision_of

    work = settings.work_dir
    staging = work / "trainer"
    has_eval = spec.dataset.eval_split is not None
    args = training_arguments(spec, output_dir=staging, has_eval=has_eval)  # before any heavy loading
    checkpoints_uri = spec.checkpoints.uri or local_checkpoints(work)
    output_uri = spec.output.uri or str(work / "output")
    if not spec.checkpoints.uri:
        log.warning("no checkpoints.uri: checkpoints stay in %s and do not outlive this machine", checkpoints_uri)
    preemption = preemption or Preemption(settings.preemption_grace_seconds)
    opts = storage_options(spec, settings)
    checkpoint_storage = open_storage(checkpoints_uri, opts, field="spec.checkpoints.uri")
    store = CheckpointStore(checkpoint_storage, keep=spec.checkpoints.keep)
    output = open_storage(output_uri, opts, field="spec.output.uri")
    if is_main():  # a refused write fails the job now, not after training
        check_writable(checkpoint_storage)
        check_writable(output)

    task = IMPLEMENTATIONS[spec.task]
    hp = spec.hyperparameters
    with local_main_first():  # one download and one tokenization per pod, however many processes
        pretrained = model_source(spec, work, download=is_local_main(), options=opts)
        tokenizer = task.load_tokenizer(pretrained, spec)
        splits = dataset_splits(spec, work, download=is_local_main(), options=opts)
        prepared = task.prepare(splits, tokenizer, spec, work / "cache")
    set_seed(hp.seed)  # a new classification head or adapter is initialised at load: part of what the seed fixes
    model = task.load_model(pretrained, prepared, spec=spec, precision=precision_of(args))
    log.info(
        "global batch %d: batchSize %d x %d processes x %d accumulation steps",
        global_batch(hp, processes=args.world_size), hp.batch_size, args.world_size, hp.gradient_accumulation_steps,
    )  # fmt: skip

    resumed = from_main(store.resume(staging) if is_main() else None)  # rank 0 chooses and fetches
    with local_main_first():  # every other node fetches the same checkpoint once for its processes
        if resumed is not None and is_local_main() and not is_main():
            store.fetch(resumed, staging)
    if resumed is not None:
        log.info("resuming from checkpoint-%d of %s", resumed, checkpoints_uri)
    account = RunAccount(task.inputs_per_example)
    commit = CommitCheckpoints(store, spool=work / "uploading", deadline=preemption.deadline)
    with local_main_first():  # TRL tokenizes in the Trainer: once per pod, the others read the cache
        trainer = task.trainer(
            model=model,
            args=args,
            prepared=prepared,
            tokenizer=tokenizer,
            spec=spec,
            callbacks=[
                StopAtLastStep(),
                SaveBarrier(),
                commit,
                account,
                preemption,
                *([job_metrics.callback(commit)] if job_metrics else []),
                *callbacks,
                LogAtSaves(),  # last: it sees every save the others ask for
            ],
        )
    warnings = store.warnings  # the checkpoint store's, as they happen, after the data's
    warnings[:0] = prepared.warnings
    if not console_logs:
        trainer.remove_callback(PrinterCallback)
    try:
        with preemption.deferred():  # SIGTERM: save, commit, stop (the last upload is waited for at train end)
            result = trainer.train(resume_from_checkpoint=str(staging / checkpoint_dir(resumed)) if resumed else None)
    except TrainingDone:  # resumed from the last step's checkpoint: its weights are loaded, nothing is left to train
        log.info("checkpoint-%s holds the run's last step: nothing left to train", resumed)
        result = None
    except Preempted as e:
        e.details = progress(trainer, account, commit, resumed, warnings)
        raise
    if preemption.requested:
        stopped = Preempted(None, f"stopped by SIGTERM; checkpoint-{commit.last_committed} committed")
        stopped.details = progress(trainer, account, commit, resumed, warnings)
        raise stopped
    step = trainer.state.global_step
    evaluation = (last_eval(trainer.state.log_history, step) or trainer.evaluate()) if has_eval else {}
    evaluation = requested(evaluation, spec.eval_metrics)
    lineage = account.lineage
    loss = run_loss(
        trainer.state.log_history,
        start_steps=lineage.start_steps,
        final_step=step,
        attempt_loss=result.training_loss if result else 0.0,
    )
    metrics = camel_metrics(scores({"train_loss": loss, **evaluation}))
    seconds = float(result.metrics.get("train_runtime", 0.0)) if result else 0.0  # this attempt's, as measured

    tokens = trainer.state.num_input_tokens_seen  # restored with the checkpoint: the whole run's
    summary = Summary(
        phase="Succeeded",
        **progress(trainer, account, commit, resumed, warnings),
        metrics=metrics,
        # Over the whole run: every attempt's samples and training time up to the checkpoint it ended with
        train_samples_per_second=per_second(lineage.samples + account.run_samples, lineage.seconds + seconds),
        train_tokens_per_second=per_second(tokens, lineage.seconds + seconds) if tokens else None,
        train_seconds=round(lineage.seconds + seconds, 3),
        train_seconds_this_run=round(seconds, 3),
        output_uri=output_uri,
        labels=prepared.labels or None,
    )
    if trainer.is_world_process_zero():
        card = model_card(
            name=settings.name,
            spec=spec,
            base=pretrained.reference,
            details=task.card(spec, prepared, pretrained),
            metrics=metrics,
            steps=step,
        )
        save(
            trainer,
            tokenizer,
            output,
            card=card,
            metrics={**summary.wire(), "warnings": None},
            extra=lambda out: task.save_extra(trainer, tokenizer, out, spec=spec, pretrained=pretrained),
        )
    return summary


def load_spec(settings: JobSettings) -> FineTuneJobSpec:
    """The spec from KUBETUNE_SPEC (JSON) or KUBETUNE_SPEC_FILE (a spec or a whole manifest)."""
    import json

    import yaml

    from kubetune_api.spec import parse_manifest, parse_spec

    if settings.spec:
        try:
            return parse_spec(json.loads(settings.spec), "KUBETUNE_SPEC")
        except json.JSONDecodeError as e:
            raise SpecError("KUBETUNE_SPEC", [f"not JSON: {e}"]) from None
    if settings.spec_file:
        try:
            data = yaml.safe_load(settings.spec_file.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(str(settings.spec_file), [f"cannot read: {e}"]) from None
        if isinstance(data, dict) and "apiVersion" in data:
            return parse_manifest(data, str(settings.spec_file)).spec
        return parse_spec(data, str(settings.spec_file))
    raise SpecError("environment", ["set KUBETUNE_SPEC (JSON) or KUBETUNE_SPEC_FILE (a path)"])


def execute(
    settings: JobSettings,
    *,
    spec: FineTuneJobSpec | None = None,
    callbacks: Sequence[Any] = (),
    console_logs: bool = True,
) -> int:
    """Run the job to an exit code, writing the summary whatever happens (and pushing it as metrics)."""
    from .distributed import is_local_main, is_main

    main = is_main()  # under torchrun, rank 0 alone pushes metrics
    # Each node's first process writes the summary its launcher reads (rank 0, node 0's first, the run's).
    writes_summary = is_local_main()
    metrics = None
    if settings.pushgateway_url and main:
        from .prometheus import start as start_metrics

        metrics = start_metrics(settings)
    from .preemption import Preemption

    preemption = Preemption(settings.preemption_grace_seconds)
    try:
        with preemption.installed():
            job_spec = spec or load_spec(settings)
            summary = run(
                job_spec,
                settings,
                callbacks=callbacks,
                console_logs=console_logs,
                job_metrics=metrics,
                preemption=preemption,
            )
        code = ExitCode.SUCCEEDED
    except SpecError as e:
        summary, code = (
            failure(ExitCode.INVALID_CONFIG, "InvalidConfig", "; ".join(e.problems)),
            ExitCode.INVALID_CONFIG,
        )
    except JobError as e:
        summary = failure(e.code, e.reason, e.message, e.field, e.phase).model_copy(update=e.details)
        code = e.code
    except Exception as e:  # unexpected: retried by the Job's backoffLimit
        log.exception("the job failed")
        summary, code = failure(ExitCode.RETRYABLE, "Error", f"{type(e).__name__}: {e}"), ExitCode.RETRYABLE
    if code != ExitCode.SUCCEEDED:
        log.error("%s: %s", summary.reason, summary.message)
    if metrics is not None:
        summary = summary.model_copy(update={"metrics_push_failures": metrics.failures})
    if writes_summary:
        write_summary(settings.summary_path, summary)
    if metrics is not None:  # after the summary: a hung gateway must not eat a preempted pod's grace period
        metrics.finish(summary.wire())
    return int(code)
