"""The generated reference docs: docs/api.md from the CRD, docs/values.md from the chart's values schema."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kubetune_cli.commands import main
from kubetune_cli.docs import (
    API_COMMAND,
    VALUES_COMMAND,
    anchor,
    api_markdown,
    cell,
    chart_values_markdown,
    sections,
    values_markdown,
)
from kubetune_operator.crd import crd

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"


@pytest.fixture(scope="module")
def api() -> str:
    return api_markdown(crd())


def section_text(markdown: str, path: str) -> str:
    """The text of one `## path` section, up to the next heading."""
    match = re.search(rf"^## {re.escape(path)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match, f"no section {path}"
    return match.group(1)


def row(markdown: str, path: str, field: str) -> list[str]:
    """The cells of a field's row in a section's table."""
    for line in section_text(markdown, path).splitlines():
        if line.startswith(f"| `{field}` |"):
            return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    raise AssertionError(f"no row {field} in {path}")


# --- staleness -------------------------------------------------------------------------------------


def test_api_reference_is_current(api: str) -> None:
    """docs/api.md is exactly what the generator prints for the current CRD."""
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == api, f"docs/api.md is out of date: run `{API_COMMAND}` (or `make docs`)"


def test_values_reference_is_current() -> None:
    """docs/values.md is exactly what the generator prints for the chart's values schema and values."""
    committed = (ROOT / "docs" / "values.md").read_text()
    current = chart_values_markdown(CHART)
    assert committed == current, f"docs/values.md is out of date: run `{VALUES_COMMAND}` (or `make docs`)"


# --- the API reference ---------------------------------------------------------------------------


def test_api_has_a_section_per_object(api: str) -> None:
    """Every object of the spec and status, lists of objects included, gets its own section."""
    paths = [s.path for s in sections(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])]
    for expected in ("spec", "spec.model", "spec.dataset", "spec.hyperparameters", "spec.scheduling.tolerations[]"):
        assert expected in paths
    for path in paths[1:]:
        assert f"\n## {path}\n" in api


def test_api_documents_every_field(api: str) -> None:
    """Each field of each object has a row with the schema's type and description."""
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for section in sections(root):
        for name, schema in section.schema["properties"].items():
            cells = row(api, section.path or "FineTuneJob", name)
            if schema.get("description"):
                assert cells[4] == cell(schema["description"])


def test_api_shows_defaults(api: str) -> None:
    """A field's default appears as it would be written in a manifest."""
    assert row(api, "spec.model", "revision")[2] == "`main`"
    assert row(api, "spec", "metrics")[2] == "`[]`"
    assert row(api, "spec.adapter", "targetModules")[2] == '`["all-linear"]`'
    assert row(api, "spec", "image")[2] == '`""`'


def test_api_shows_ranges_and_exclusive_bounds(api: str) -> None:
    """Minimum and maximum read as comparisons, exclusive bounds as strict ones."""
    assert row(api, "spec.dataset", "maxLength")[3] == ">= 8, <= 131072"
    assert row(api, "spec.hyperparameters", "epochs")[3] == "> 0, <= 1000"
    assert row(api, "spec.hyperparameters", "warmupRatio")[3] == ">= 0, < 1"


def test_api_shows_enums_and_patterns(api: str) -> None:
    """Enumerations list their values and patterns are shown verbatim, pipes escaped for the table."""
    assert row(api, "spec.hyperparameters", "precision")[3] == "one of `auto`, `bf16`, `fp16`, `fp32`"
    assert "pattern `^[0-9]+(\\.[0-9]+)?(m\\|k\\|Ki" in row(api, "spec.resources", "memory")[3]


def test_api_marks_required_fields(api: str) -> None:
    """A required field says so."""
    assert row(api, "spec", "model")[3].startswith("required")
    assert not row(api, "spec", "task")[3].startswith("required")


def test_api_lists_object_rules_in_words(api: str) -> None:
    """An object's CEL rules are listed under its table by their messages."""
    assert "- set exactly one of id or uri" in section_text(api, "spec.model")
    assert "- spec.model cannot change after creation" in section_text(api, "spec")


def test_api_puts_field_rules_in_constraints(api: str) -> None:
    """A scalar field's CEL rule appears among its constraints."""
    assert "use s3://bucket/prefix/ or a local path" in row(api, "spec.output", "uri")[3]
    assert "use epoch, or a positive number of steps" in row(api, "spec.checkpoints", "every")[3]


def test_prose_shows_angle_brackets() -> None:
    """A placeholder like <split> outside code is escaped, so Markdown shows it instead of dropping a tag."""
    assert cell("named <split>.<ext>, <= 5, e.g. `<a>`") == "named &lt;split>.&lt;ext>, <= 5, e.g. `<a>`"


def test_api_tables_keep_five_columns(api: str) -> None:
    """Every table row has exactly five cells, whatever pipes its patterns contain."""
    for line in api.splitlines():
        if line.startswith("|"):
            assert len(re.split(r"(?<!\\)\|", line)) == 7, line


def test_api_links_resolve(api: str) -> None:
    """Every in-page link points at a heading of the page."""
    headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", api, re.M)}
    for target in re.findall(r"\]\(#([^)]+)\)", api):
        assert target in headings, target


# --- the values reference --------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft-07/schema#",
    "type": "object",
    "additionalProperties": False,
    "definitions": {
        "image": {
            "type": "object",
            "properties": {
                "repository": {"type": "string", "description": "Image repository."},
                "tag": {"type": "string", "default": "", "description": "Image tag."},
            },
        }
    },
    "properties": {
        "operator": {
            "type": "object",
            "properties": {
                "image": {"$ref": "#/definitions/image"},
                "logLevel": {"type": "string", "enum": ["DEBUG", "INFO"], "description": "Log level."},
                "replicas": {"type": ["integer", "null"], "default": 1, "description": "Pods | replicas."},
                "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "extraArgs": {"type": "array", "items": {"type": "string"}, "description": "More arguments."},
    },
}
VALUES: dict[str, Any] = {
    "operator": {"image": {"repository": "ghcr.io/x/op"}, "logLevel": "INFO", "nodeSelector": {}},
    "extraArgs": ["--a"],
}


def values_row(markdown: str, key: str) -> list[str]:
    for line in markdown.splitlines():
        if line.startswith(f"| `{key}` |"):
            return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    raise AssertionError(f"no row {key}")


def test_values_rows_are_dotted_key_paths() -> None:
    """Nested keys become one row each, named by their dotted path; objects with keys get no row."""
    keys = re.findall(r"^\| `([^`]+)` \|", values_markdown(SCHEMA, VALUES), re.M)
    expected = [
        "operator.image.repository",
        "operator.image.tag",
        "operator.logLevel",
        "operator.replicas",
        "operator.nodeSelector",
        "extraArgs",
    ]
    assert keys == expected


def test_values_types_in_words() -> None:
    """Types read as words: unions, lists and maps included."""
    markdown = values_markdown(SCHEMA, VALUES)
    assert values_row(markdown, "operator.replicas")[1] == "integer or null"
    assert values_row(markdown, "extraArgs")[1] == "list of string"
    assert values_row(markdown, "operator.nodeSelector")[1] == "map of string"


def test_values_default_comes_from_values_yaml() -> None:
    """The default is values.yaml's value, else the schema's default, else blank."""
    markdown = values_markdown(SCHEMA, VALUES)
    assert values_row(markdown, "operator.image.repository")[2] == "`ghcr.io/x/op`"
    assert values_row(markdown, "operator.image.tag")[2] == '`""`'
    assert values_row(markdown, "extraArgs")[2] == '`["--a"]`'
    assert values_row(markdown, "operator.replicas")[2] == "`1`"


def test_values_descriptions_follow_references_and_enums() -> None:
    """Descriptions come through $ref, enumerations are appended, pipes are escaped."""
    markdown = values_markdown(SCHEMA, VALUES)
    assert values_row(markdown, "operator.image.repository")[3] == "Image repository."
    assert values_row(markdown, "operator.logLevel")[3] == "Log level. One of `DEBUG`, `INFO`."
    assert values_row(markdown, "operator.replicas")[3] == "Pods \\| replicas."


# --- the command line ----------------------------------------------------------------------------


def test_docs_api_command_prints_the_reference(api: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`kubetune docs api` prints exactly the generated reference."""
    assert main(["docs", "api"]) == 0
    assert capsys.readouterr().out == api


def test_docs_values_command_needs_a_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kubetune docs values` on a directory without a values schema fails and says what to pass."""
    assert main(["docs", "values", "--chart", str(tmp_path)]) != 0
    assert "--chart" in capsys.readouterr().err
