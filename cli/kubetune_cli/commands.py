"""The `kubetune` command line: validate and run manifests locally; later, render and crd.

Each subcommand imports what it needs when it runs, so `kubetune validate` works with the base
install and `kubetune run` needs only the job extra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _validate(args: argparse.Namespace) -> int:
    from kubetune_api.exit_codes import ExitCode
    from kubetune_api.spec import SpecError, load_manifest

    failed = False
    known: set[str] | None = None
    for path in args.files:
        try:
            job = load_manifest(path)
            extra = job.spec.hyperparameters.extra
            if extra:
                known = _training_argument_names() if known is None else known
                _check_extra(extra, known, path)
        except SpecError as e:
            print(e, file=sys.stderr)
            failed = True
        else:
            print(f"{path}: valid FineTuneJob {job.metadata.name!r}")
    if known is not None and not known:
        print(
            "note: transformers is not installed here, so hyperparameters.extra was not checked against "
            "TrainingArguments (the job checks it before training)",
            file=sys.stderr,
        )
    return int(ExitCode.INVALID_CONFIG) if failed else 0


def _training_argument_names() -> set[str]:
    """The fields of transformers.TrainingArguments, or an empty set where transformers is not installed
    (the job image has it; `kubetune validate` also runs from the operator's lighter install)."""
    import dataclasses

    try:
        from transformers import TrainingArguments
    except ImportError:
        return set()
    return {f.name for f in dataclasses.fields(TrainingArguments)}


def _check_extra(extra: dict[str, Any], known: set[str], path: Path) -> None:
    """The job's own check of hyperparameters.extra, so validate refuses what the job would."""
    from kubetune_api.spec import SpecError
    from kubetune_job.arguments import check_extra
    from kubetune_job.errors import ConfigError

    if not known:
        return
    try:
        check_extra(extra, known)
    except ConfigError as e:
        raise SpecError(str(path), [f"{e.field}: {e.message}"]) from None


def _run(args: argparse.Namespace) -> int:
    from kubetune_api.exit_codes import ExitCode
    from kubetune_api.spec import SpecError
    from kubetune_job.local import run

    try:
        return run(args.file, workdir=args.workdir, pushgateway=args.pushgateway)
    except SpecError as e:
        print(e, file=sys.stderr)
        return int(ExitCode.INVALID_CONFIG)


def _crd(args: argparse.Namespace) -> int:
    import json

    import yaml

    from kubetune_operator.crd import crd

    if args.output == "json":
        print(json.dumps(crd(), indent=2))
    else:
        print(yaml.safe_dump(crd(), sort_keys=False), end="")
    return 0


def _render(args: argparse.Namespace) -> int:
    import yaml

    from kubetune_api.exit_codes import ExitCode
    from kubetune_api.spec import SpecError, load_manifest
    from kubetune_operator.manifests import InvalidSpec, Owner, children
    from kubetune_operator.settings import OperatorSettings

    try:
        job = load_manifest(args.file)
        owner = Owner(job.metadata.name, args.namespace or job.metadata.namespace or "default", "<uid>")
        objects = children(owner, job.spec, OperatorSettings())
    except (SpecError, InvalidSpec) as e:
        print(e, file=sys.stderr)
        return int(ExitCode.INVALID_CONFIG)
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


def _docs(args: argparse.Namespace) -> int:
    from kubetune_cli import docs
    from kubetune_operator.crd import crd

    if args.what == "api":
        print(docs.api_markdown(crd()), end="")
        return 0
    if not (args.chart / "values.schema.json").is_file():
        print(f"{args.chart}: no values.schema.json; pass the chart's directory with --chart", file=sys.stderr)
        return 2
    print(docs.chart_values_markdown(args.chart), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune Hugging Face models from FineTuneJob manifests."
    )
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check FineTuneJob manifests and explain every problem")
    v.add_argument("files", nargs="+", type=Path)
    v.set_defaults(func=_validate)

    r = sub.add_parser("run", help="run a FineTuneJob manifest on this machine (no cluster)")
    r.add_argument("file", type=Path)
    r.add_argument(
        "--workdir", type=Path, default=None, help="where runs live: <workdir>/<name>/ (default ./kubetune-runs)"
    )
    r.add_argument("--pushgateway", default=None, help="push training metrics to this Prometheus Pushgateway URL")
    r.set_defaults(func=_run)

    c = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    c.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    c.set_defaults(func=_crd)

    d = sub.add_parser("render", help="print the objects the operator would create (settings from KUBETUNE_OPERATOR_*)")
    d.add_argument("file", type=Path)
    d.add_argument("-n", "--namespace", default=None, help="namespace (default: the manifest's, else default)")
    d.set_defaults(func=_render)

    g = sub.add_parser("docs", help="print docs/api.md (from the CRD) or docs/values.md (from the chart)")
    g.add_argument("what", choices=["api", "values"])
    g.add_argument("--chart", type=Path, default=Path("charts/kubetune"), help="the chart (default charts/kubetune)")
    g.set_defaults(func=_docs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
