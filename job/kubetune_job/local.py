"""`kubetune run`: the same FineTuneJob manifest, run in this process with local directories.

The embedded default: no cluster, no operator, no object storage unless the manifest names s3://
URIs. Relative paths in the manifest are read relative to the manifest's own directory, so an
example runs from any working directory.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback

from kubetune_api.settings import JobSettings, local_checkpoints
from kubetune_api.spec import FineTuneJob, load_manifest

from .storage import is_remote, local_path
from .summary import scores


def anchored(uri: str | None, base: Path) -> str | None:
    """A local path made absolute against the manifest's directory; s3:// left alone."""
    if uri is None or is_remote(uri):
        return uri
    path = local_path(uri)
    return str(path if path.is_absolute() else (base / path).resolve())


def localize(job: FineTuneJob, manifest_dir: Path, run_dir: Path) -> FineTuneJob:
    """The manifest's spec with local paths resolved and default locations under run_dir."""
    spec = job.spec
    updates = {
        "model": spec.model.model_copy(update={"uri": anchored(spec.model.uri, manifest_dir)}),
        "dataset": spec.dataset.model_copy(update={"uri": anchored(spec.dataset.uri, manifest_dir)}),
        "checkpoints": spec.checkpoints.model_copy(
            update={"uri": anchored(spec.checkpoints.uri, manifest_dir) or local_checkpoints(run_dir)}
        ),
        "output": spec.output.model_copy(
            update={"uri": anchored(spec.output.uri, manifest_dir) or str(run_dir / "model")}
        ),
    }
    return job.model_copy(update={"spec": spec.model_copy(update=updates)})


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TerminalProgress(TrainerCallback):
    """One live line of progress: step, epoch, loss, throughput and time left."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self.tty = out.isatty()
        self.loss: float | None = None
        self.start = time.monotonic()
        self.first_step = 0
        self.shown = -1

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start, self.first_step = time.monotonic(), state.global_step
        if state.global_step:
            self._print(f"resumed at step {state.global_step}/{state.max_steps}")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        done, total = state.global_step, max(state.max_steps, 1)
        percent = 100 * done // total
        if not self.tty and percent // 10 == self.shown // 10 and done != total:
            return  # in a log file, one line per 10%
        self.shown = percent
        elapsed = time.monotonic() - self.start
        rate = (done - self.first_step) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate else 0.0
        samples = rate * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        loss = f"loss {self.loss:.4f}  " if self.loss is not None else ""
        line = (
            f"step {done}/{total} ({percent}%)  epoch {state.epoch or 0:.2f}  {loss}"
            f"{samples:.1f} samples/s  ETA {duration(eta)}"
        )
        if self.tty:
            self.out.write("\r\033[K" + line)
            self.out.flush()
        else:
            self._print(line)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        shown = "  ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in scores(metrics or {}).items())
        self._print(f"evaluation at step {state.global_step}: {shown}")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._print(f"checkpoint-{state.global_step} saved; committing it in the background")

    def _print(self, line: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        print(line, file=self.out, flush=True)


def table(summary: dict[str, Any]) -> str:
    """The end-of-run summary as an aligned two-column table."""
    rows: list[tuple[str, str]] = [("result", summary.get("phase", "?"))]
    if summary.get("phase") == "Failed":
        rows += [("reason", summary.get("reason", "")), ("exit code", str(summary.get("exitCode")))]
        if summary.get("field"):
            rows.append(("field", summary["field"]))
        rows.append(("message", summary.get("message", "")))
    else:
        rows.append(("steps", f"{summary['finalStep']}/{summary['totalSteps']} (epoch {summary['epoch']})"))
        if summary.get("resumedFromStep"):
            rows.append(("resumed from", f"step {summary['resumedFromStep']} (attempt {summary.get('attempt', '?')})"))
        rows += [(k, f"{v:.4f}") for k, v in summary.get("metrics", {}).items()]
        rows.append(("samples/s", f"{summary['trainSamplesPerSecond']:.1f}"))
        if summary.get("trainTokensPerSecond"):
            rows.append(("tokens/s", f"{summary['trainTokensPerSecond']:.1f}"))
        rows.append(("model", summary["outputUri"]))
        rows += [("warning", w) for w in summary.get("warnings") or []]
    if summary.get("metricsPushFailures"):
        rows.append(("metrics", f"{summary['metricsPushFailures']} pushes to the Pushgateway failed"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def run(manifest: Path, *, workdir: Path | None = None, pushgateway: str | None = None) -> int:
    """Run a manifest to completion here; print progress and a summary; return the exit code."""
    import json

    from transformers.utils import logging as hf_logging

    from .orchestrate import execute

    job = load_manifest(manifest)
    run_dir = (workdir or Path("kubetune-runs")).resolve() / job.metadata.name
    job = localize(job, manifest.resolve().parent, run_dir)
    settings = JobSettings(
        name=job.metadata.name,
        namespace=job.metadata.namespace or "default",
        work_dir=run_dir / "scratch",
        summary_path=run_dir / "summary.json",
        pushgateway_url=pushgateway,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()
    print(f"kubetune: running {job.metadata.name} in {run_dir}", file=sys.stderr)
    code = execute(settings, spec=job.spec, callbacks=[TerminalProgress()], console_logs=False)
    print(table(json.loads(settings.summary_path.read_text())))
    return code
