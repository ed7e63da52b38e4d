"""Bad inputs the job meets at run time: each is a permanent error that names the field to fix."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from kubetune_api.exit_codes import PERMANENT_EXIT_CODES, ExitCode
from kubetune_api.settings import JobSettings
from kubetune_api.spec import DatasetSource, parse_manifest
from kubetune_job.arguments import check_extra, training_arguments
from kubetune_job.data import check_columns, label_names, load_local
from kubetune_job.errors import ConfigError, DataError, ModelError
from kubetune_job.orchestrate import execute, model_source
from tests.unit.test_spec import GOOD

SOURCE = DatasetSource(uri="/data", text_fields=["sentence1", "sentence2"], label_field="label")


def splits(**columns: list[object]) -> datasets.DatasetDict:
    one = datasets.Dataset.from_dict(columns)
    return datasets.DatasetDict({"train": one, "eval": one})


def test_extra_key_that_is_not_a_training_argument() -> None:
    """An `extra` key TrainingArguments lacks is an InvalidConfig error with a suggestion."""
    with pytest.raises(ConfigError) as e:
        check_extra({"lr_scheduler_typ": "cosine"}, {"lr_scheduler_type", "optim"})
    assert e.value.field == "spec.hyperparameters.extra.lr_scheduler_typ"
    assert "did you mean 'lr_scheduler_type'" in e.value.message


def test_extra_key_the_spec_already_sets() -> None:
    """An `extra` key that duplicates a spec field points to that field."""
    with pytest.raises(ConfigError) as e:
        check_extra({"learning_rate": 0.1}, {"learning_rate"})
    assert "spec.hyperparameters.learningRate" in e.value.message


def test_extra_is_checked_before_loading_anything(tmp_path: Path) -> None:
    """training_arguments rejects a bad extra key against the real TrainingArguments."""
    spec = parse_manifest(GOOD).spec.model_copy(deep=True)
    spec = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(update={"extra": {"nope": 1}})})
    with pytest.raises(ConfigError) as e:
        training_arguments(spec, output_dir=tmp_path, has_eval=True)
    assert e.value.field == "spec.hyperparameters.extra.nope"


def test_text_field_missing_from_the_data() -> None:
    """A textFields column absent from the data names the field and lists the columns."""
    with pytest.raises(DataError) as e:
        check_columns(splits(sentence1=["a"], label=[0]), SOURCE)
    assert e.value.field == "spec.dataset.textFields" and "'sentence2'" in e.value.message


def test_label_field_missing_from_the_data() -> None:
    """A missing label column names spec.dataset.labelField."""
    with pytest.raises(DataError) as e:
        check_columns(splits(sentence1=["a"], sentence2=["b"], target=[0]), SOURCE)
    assert e.value.field == "spec.dataset.labelField" and "'label'" in e.value.message


def test_empty_split() -> None:
    """An empty training split is a data error on spec.dataset.trainSplit."""
    with pytest.raises(DataError) as e:
        check_columns(splits(sentence1=[], sentence2=[], label=[]), SOURCE)
    assert e.value.field == "spec.dataset.trainSplit" and "empty" in e.value.message


def test_unknown_split_lists_the_files_present(tmp_path: Path) -> None:
    """A split with no file names the field and what is there."""
    (tmp_path / "train.csv").write_text("sentence1,sentence2,label\na,b,0\n")
    (tmp_path / "dev.csv").write_text("sentence1,sentence2,label\na,b,0\n")
    with pytest.raises(DataError) as e:
        load_local(tmp_path, SOURCE)
    assert e.value.field == "spec.dataset.evalSplit" and "dev.csv" in e.value.message


def test_model_path_that_does_not_exist(tmp_path: Path) -> None:
    """A local model path that is not there is a ModelError on spec.model.uri."""
    spec = parse_manifest(GOOD).spec
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"id": None, "uri": str(tmp_path / "no")})})
    with pytest.raises(ModelError) as e:
        model_source(spec, tmp_path)
    assert e.value.field == "spec.model.uri" and "does not exist" in e.value.message


def test_errors_exit_with_permanent_codes(tmp_path: Path) -> None:
    """execute() turns a bad model path into the permanent model exit code and a JSON summary."""
    doc = {**GOOD, "spec": {**GOOD["spec"], "model": {"uri": str(tmp_path / "missing")}}}
    settings = JobSettings(work_dir=tmp_path / "w", summary_path=tmp_path / "summary.json")
    code = execute(settings, spec=parse_manifest(doc).spec)
    assert code == ExitCode.MODEL_ERROR and code in PERMANENT_EXIT_CODES
    text = (tmp_path / "summary.json").read_text()
    assert '"reason":"ModelError"' in text and '"field":"spec.model.uri"' in text


def test_string_labels_are_sorted_and_int_labels_keep_their_ids() -> None:
    """Label ids: 0..K-1 integers keep theirs; strings are sorted."""
    assert label_names([1, 0, 1]) == ["0", "1"]
    assert label_names(["pos", "neg"], ["neg"]) == ["neg", "pos"]


def test_eval_label_never_seen_in_training() -> None:
    """An evaluation label absent from training is a data error."""
    with pytest.raises(DataError) as e:
        label_names(["a", "b"], ["c"])
    assert e.value.field == "spec.dataset.labelField" and "'c'" in e.value.message
