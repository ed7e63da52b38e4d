"""The contract package's own rules: the job's env rendered for a pod, metric names, the summary's fit."""

from __future__ import annotations

import json

import pytest

from kubetune_api.metrics import api_name, eval_name
from kubetune_api.settings import JobSettings, env_name, pod_env
from kubetune_api.summary import LIMIT, Summary


def test_pod_env_is_read_back_as_the_same_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What pod_env renders, JobSettings reads back; the stated defaults appear, None fields do not."""
    values = {"name": "bert", "nproc_per_node": 4, "master_port": 29600, "pushgateway_url": None}
    env = pod_env(values)
    names = [e["name"] for e in env]
    assert "KUBETUNE_WORK_DIR" in names and "KUBETUNE_SUMMARY_PATH" in names and "KUBETUNE_PUSHGATEWAY_URL" not in names
    for entry in env:
        monkeypatch.setenv(entry["name"], entry["value"])
    read = JobSettings()
    assert (read.name, read.nproc_per_node, read.master_port, read.pushgateway_url) == ("bert", 4, 29600, None)
    assert read.work_dir == JobSettings.model_fields["work_dir"].default


def test_pod_env_refuses_what_is_not_a_setting() -> None:
    """A name JobSettings lacks is an error at render time, not a variable the job ignores."""
    with pytest.raises(KeyError):
        pod_env({"nproc": 2})
    assert pod_env({"node_rank": {"fieldRef": {"fieldPath": "x"}}})[-1] == {
        "name": env_name("node_rank"),
        "valueFrom": {"fieldRef": {"fieldPath": "x"}},
    }


def test_metric_names_are_camel_cased_once() -> None:
    """Trainer names and the spec's evaluation metrics get one API spelling."""
    assert api_name("train_loss") == "trainLoss" and api_name("eval_f1") == "evalF1"
    assert eval_name("matthews_correlation") == "evalMatthewsCorrelation" == api_name("eval_matthews_correlation")


def test_a_summary_that_cannot_fit_keeps_its_essential_fields() -> None:
    """Past the limit even with a short message and few warnings, only the ESSENTIAL fields remain."""
    huge = Summary(phase="Succeeded", final_step=9, output_uri="s3://b/m/", labels=[f"label-{i}" for i in range(900)])
    text = huge.encode()
    assert len(text.encode()) <= LIMIT
    assert json.loads(text) == {"phase": "Succeeded", "finalStep": 9, "outputUri": "s3://b/m/"}


def test_a_termination_message_that_is_not_a_summary_is_none() -> None:
    """A crash's last words or a list parse to None; a newer job's extra keys are ignored."""
    assert Summary.parse("Traceback (most recent call last)") is None
    assert Summary.parse("[1, 2]") is None and Summary.parse(None) is None
    assert Summary.parse('{"phase": "Failed", "exitCode": 12, "newField": 1}') == Summary(phase="Failed", exit_code=12)
