"""The dataset: find the splits, check them against the spec, map labels, tokenize (cached).

Every problem with the data is a DataError that names the spec field to fix: retrying cannot
help, so the job fails at once with the permanent data exit code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune_api.spec import DatasetSource

from .errors import DataError

log = logging.getLogger(__name__)

#: File extensions of local or object-storage datasets, and the `datasets` builder for each.
FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def split_file(directory: Path, split: str, field: str) -> Path:
    """The file holding one split: `split` itself if it names a file, else <split>.<ext>."""
    if Path(split).suffix in FORMATS:
        candidates = [directory / split]
    else:
        candidates = [directory / f"{split}{ext}" for ext in FORMATS]
    found = [c for c in candidates if c.is_file()]
    if not found:
        present = sorted(p.name for p in directory.iterdir() if p.suffix in FORMATS) if directory.is_dir() else []
        hint = f"files present: {', '.join(present)}" if present else "no csv, jsonl or parquet files are there"
        want = " or ".join(c.name for c in candidates)
        raise DataError(field, f"split {split!r} not found: no {want} in {directory} ({hint})")
    if len(found) > 1:
        raise DataError(field, f"split {split!r} is ambiguous: {', '.join(f.name for f in found)}; keep one")
    return found[0]


def load_local(directory: Path, source: DatasetSource) -> Any:
    """A DatasetDict with 'train' (and 'eval') from files in a local directory."""
    import datasets

    if not directory.is_dir():
        raise DataError("spec.dataset.uri", f"{directory} is not a directory; give a directory with one file per split")
    wanted = {"train": (source.train_split, "spec.dataset.trainSplit")}
    if source.eval_split:
        wanted["eval"] = (source.eval_split, "spec.dataset.evalSplit")
    out = {}
    for name, (split, field) in wanted.items():
        path = split_file(directory, split, field)
        try:
            out[name] = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # the builders raise many types for unreadable files
            raise DataError(field, f"cannot read {path}: {e}") from None
    return datasets.DatasetDict(out)


def load_hub(source: DatasetSource, token: str | None) -> Any:
    """A DatasetDict with 'train' (and 'eval') from the Hugging Face Hub."""
    import datasets

    try:
        splits = datasets.get_dataset_split_names(source.id, source.config, token=token)
    except Exception as e:
        raise DataError(
            "spec.dataset.id", f"cannot open Hub dataset {source.id!r} (config {source.config!r}): {e}"
        ) from None
    wanted = {"train": (source.train_split, "spec.dataset.trainSplit")}
    if source.eval_split:
        wanted["eval"] = (source.eval_split, "spec.dataset.evalSplit")
    for split, field in wanted.values():
        if split not in splits:
            raise DataError(field, f"split {split!r} not in {source.id}; available: {', '.join(splits)}")
    loaded = {n: datasets.load_dataset(source.id, source.config, split=s, token=token) for n, (s, _) in wanted.items()}
    return datasets.DatasetDict(loaded)


def check_columns(splits: Any, source: DatasetSource) -> None:
    """Text and label columns exist in every split, and no split is empty."""
    fields = {"train": "spec.dataset.trainSplit", "eval": "spec.dataset.evalSplit"}
    for name, ds in splits.items():
        split = source.train_split if name == "train" else source.eval_split
        if len(ds) == 0:
            raise DataError(fields[name], f"split {split!r} is empty")
        columns = ", ".join(ds.column_names)
        for col in source.text_fields:
            if col not in ds.column_names:
                raise DataError(
                    "spec.dataset.textFields", f"column {col!r} is not in split {split!r} (columns: {columns})"
                )
        if source.label_field not in ds.column_names:
            raise DataError(
                "spec.dataset.labelField",
                f"column {source.label_field!r} is not in split {split!r} (columns: {columns})",
            )


def label_names(train_labels: Sequence[Any], eval_labels: Sequence[Any] = ()) -> list[str]:
    """Label names in id order. Integer labels 0..K-1 keep their ids; anything else is sorted."""
    values = set(train_labels)
    if None in values:
        raise DataError("spec.dataset.labelField", "some training examples have no label")
    unseen = set(eval_labels) - values
    if unseen:
        shown = ", ".join(map(repr, sorted(unseen, key=str)[:5]))
        raise DataError("spec.dataset.labelField", f"evaluation labels never seen in training: {shown}")
    if len(values) < 2:
        raise DataError(
            "spec.dataset.labelField", f"training data has {len(values)} distinct label(s); need at least 2"
        )
    if values == set(range(len(values))) and not any(isinstance(v, bool) for v in values):
        return [str(v) for v in range(len(values))]
    return [str(v) for v in sorted(values, key=lambda v: (str(type(v)), v))]


def fingerprint(*parts: object) -> str:
    """A stable cache key for tokenized data."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenize(
    splits: Any, tokenizer: Any, source: DatasetSource, labels: list[str], cache: Path, *, max_length: int
) -> Any:
    """Tokenized splits with a `labels` column, saved under cache/<key> so a restart reuses them."""
    import datasets

    key = fingerprint(
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        source.model_dump(),
        max_length,
        labels,
        {n: ds._fingerprint for n, ds in splits.items()},
    )
    path = cache / f"tokenized-{key}"
    if (path / "dataset_dict.json").exists():
        log.info("reusing tokenized data from %s", path)
        return datasets.load_from_disk(str(path))
    ids = {name: i for i, name in enumerate(labels)}
    fields = source.text_fields

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        texts = [batch[f] for f in fields]
        for f, column in zip(fields, texts, strict=True):
            if not all(isinstance(t, str) for t in column):
                raise DataError("spec.dataset.textFields", f"column {f!r} has a missing or non-text value")
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        enc["labels"] = [ids[str(v)] for v in batch[source.label_field]]
        return dict(enc)

    out = splits.map(encode, batched=True, remove_columns=splits["train"].column_names, desc="tokenize")
    tmp = path.with_name(path.name + ".tmp")
    out.save_to_disk(str(tmp))
    tmp.rename(path)
    return datasets.load_from_disk(str(path))
