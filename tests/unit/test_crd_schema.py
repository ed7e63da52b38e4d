"""The CRD generated from the spec carries every bound, and `kubetune validate` refuses what the job would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kubetune_api import spec as api
from kubetune_cli.commands import main
from kubetune_operator.crd import crd, structural
from tests.unit.test_spec import GOOD

SPEC = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def nodes(schema: dict[str, Any], path: str = "spec") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from nodes(schema[key], f"{path}[{key}]")


def test_every_string_list_map_and_integer_of_the_spec_is_bounded() -> None:
    """The API server costs CEL rules by these bounds, and the CLI shares each of them."""
    for path, node in nodes(SPEC):
        kind = node.get("type")
        if kind == "string" and "enum" not in node:
            assert "maxLength" in node, path
        elif kind == "array":
            assert "maxItems" in node, path
        elif kind == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path
        elif kind == "integer":
            assert "maximum" in node or node.get("format") == "int64", path


def test_a_field_without_a_bound_is_an_error_not_a_silent_default() -> None:
    """A new string field with no max_length fails the CRD's generation, naming the field."""

    class Unbounded(BaseModel):
        note: str = ""

    raw = Unbounded.model_json_schema()
    with pytest.raises(ValueError, match="maxLength"):
        structural(raw, {})


def test_extra_spells_out_its_levels() -> None:
    """extra's values: maps and lists EXTRA_DEPTH levels deep, then only scalars and empty containers."""
    node = SPEC["properties"]["hyperparameters"]["properties"]["extra"]["additionalProperties"]
    depth = 0
    while "items" in node:
        assert node["additionalProperties"] == node["items"]
        node, depth = node["items"], depth + 1
    assert depth == api.EXTRA_DEPTH and node["maxProperties"] == node["maxItems"] == 0


def test_name_rule_sits_at_the_root() -> None:
    """metadata.name can be checked only at the root, where it sits beside spec.resources.nodes."""
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert api.NAME_RULE in root["x-kubernetes-validations"]


def test_cross_field_rules_sit_on_the_spec_beside_the_immutability_rules() -> None:
    """Every rule that ties spec fields together (SPEC_RULES, FineTuneJobSpec._consistent's twin) is in the
    CRD, and names the field to fix: without a fieldPath the API server reports it on `spec` alone."""
    rules = SPEC["x-kubernetes-validations"]
    assert [r for r in rules if r in api.SPEC_RULES] == api.SPEC_RULES
    assert any("oldSelf" in r["rule"] for r in rules)
    assert [r["message"] for r in api.SPEC_RULES if not r.get("fieldPath")] == []


def write(tmp_path: Path, name: str, doc: Any) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def test_validate_refuses_an_extra_key_that_is_not_a_training_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`extra: {not_a_training_argument: 1}` is refused as the job would refuse it, with a suggestion."""
    pytest.importorskip("transformers")
    doc = json.loads(json.dumps(GOOD))
    doc["spec"]["hyperparameters"] = {"extra": {"not_a_training_argument": 1, "lr_scheduler_type": "linear"}}
    bad = write(tmp_path, "bad.yaml", doc)
    doc["spec"]["hyperparameters"] = {"extra": {"max_grad_norm": 0.5}}
    good = write(tmp_path, "good.yaml", doc)
    assert main(["validate", str(bad), str(good)]) == 10
    out = capsys.readouterr()
    assert "spec.hyperparameters.extra.not_a_training_argument: not a TrainingArguments field" in out.err
    assert f"{good}: valid FineTuneJob" in out.out


def test_validate_a_file_nested_too_deeply_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A YAML file nested 1200 levels deep: exit code 10 and one line naming the file, no traceback."""
    text = yaml.safe_dump(GOOD) + "deep: " + "{a: " * 1200 + "1" + "}" * 1200 + "\n"
    path = write(tmp_path, "deep.yaml", text)
    assert main(["validate", str(path)]) == 10
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{path}: invalid FineTuneJob: the document nests maps and lists too deeply")
