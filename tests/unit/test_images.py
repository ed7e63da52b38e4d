"""The Dockerfile's two images, checked without a container engine: pins, users, entrypoints, extras.

A small parser reads the Dockerfile's instructions into stages (inheriting ENV, USER and ENTRYPOINT
from a parent stage the way a build does), and the checks compare them with what the rest of the
project expects: the operator's and the chart's UID, the pod's command and writable mounts, and the
extras in pyproject.toml. The import checks import every module of a package in an interpreter that
can import only what installing that package's extra brings, as in the image.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kubetune_api.spec import FineTuneJobSpec, parse_manifest
from kubetune_operator.manifests import SCRATCH, Owner, environment, pod_template
from kubetune_operator.settings import OperatorSettings
from tests.unit.test_spec import GOOD

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TARGETS = {"operator": "kubetune_operator", "job": "kubetune_job"}
# An exact release: a digest, or a tag with a full major.minor.patch version.
PINNED = re.compile(r"@sha256:[0-9a-f]{64}$|:[^/:@]*\d+\.\d+\.\d+[^/:@]*$")


@dataclass
class Stage:
    """One FROM ... AS name block, with what it inherits from a parent stage already merged in."""

    name: str
    image: str
    parent: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    entrypoint: list[str] | None = None
    runs: list[str] = field(default_factory=list)
    copies: list[list[str]] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments and blank lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def _flags(rest: str) -> tuple[list[str], str]:
    """An instruction's leading --flags, and the rest."""
    flags = []
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        flags.append(flag)
        rest = rest.lstrip()
    return flags, rest


def parse(text: str) -> dict[str, Stage]:
    """The Dockerfile's stages by name (an unnamed stage gets its index)."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for keyword, rest in instructions(text):
        if keyword == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            _, source = _flags(rest)
            image, *alias = re.split(r"\s+as\s+", _substitute(source, global_args), flags=re.I)
            parent = stages.get(image)
            stage = Stage(name=alias[0] if alias else str(len(stages)), image=image)
            if parent is not None:
                stage.parent, stage.image = parent.name, parent.image
                stage.env, stage.user, stage.entrypoint = dict(parent.env), parent.user, parent.entrypoint
                stage.runs = list(parent.runs)
            stages[stage.name] = stage
        elif stage is None:
            raise AssertionError(f"{keyword} before the first FROM")
        elif keyword == "ENV":
            words = shlex.split(rest)
            pairs = [w.split("=", 1) for w in words] if "=" in words[0] else [[words[0], " ".join(words[1:])]]
            stage.env.update({k: v for k, v in pairs})
        elif keyword == "USER":
            stage.user = rest
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = json.loads(rest)  # the exec form: a JSON list, so signals reach python
        elif keyword == "RUN":
            stage.runs.append(_flags(rest)[1])
        elif keyword == "COPY":
            flags, paths = _flags(rest)
            if not any(f.startswith("--from=") for f in flags):
                stage.copies.append(shlex.split(paths)[:-1])
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return parse(DOCKERFILE.read_text())


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def spec() -> FineTuneJobSpec:
    return parse_manifest(GOOD).spec


def extras_installed(stage: Stage) -> set[str]:
    """The extras of this project that the stage's pip installs name (`...whl[operator]`)."""
    found: set[str] = set()
    for run in stage.runs:
        if "pip install" in run:
            for group in re.findall(r"(?:\.whl\)?|\s\.)\[([\w,-]+)\]", run):
                found.update(group.split(","))
    return found


def uid(stage: Stage) -> int:
    assert stage.user is not None, f"stage {stage.name} sets no USER: it would run as root"
    user = stage.user.split(":")[0]
    assert user.isdigit(), f"stage {stage.name}: USER {stage.user!r} must be numeric for runAsNonRoot to verify"
    return int(user)


def requirements(name: str, extra: str) -> list[Requirement]:
    """What installing name[extra] asks for: this project's from pyproject.toml, the others' from their metadata."""
    if name == "kubetune":
        project = pyproject()["project"]
        return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"].get(extra, [])]
    try:
        requires = metadata.distribution(name).requires or []
    except metadata.PackageNotFoundError:
        return []  # not installed here, so not importable here either
    return [r for r in map(Requirement, requires) if not r.marker or r.marker.evaluate({"extra": extra})]


def dist_closure(extra: str) -> set[str]:
    """Distributions that installing kubetune[extra] brings: its requirements and theirs, recursively."""
    seen: set[tuple[str, str]] = set()
    todo = [("kubetune", extra)]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) not in seen:
            seen.add((name, wanted))
            for requirement in requirements(name, wanted):
                child = canonicalize_name(requirement.name)
                todo += [(child, "")] + [(child, e) for e in requirement.extras]
    return {name for name, _ in seen} - {"kubetune"}


def importable_in(extra: str) -> list[str]:
    """Top-level modules an image with kubetune[extra] installed can import, besides the stdlib."""
    dists = dist_closure(extra)
    modules = {
        m for m, owners in metadata.packages_distributions().items() if dists & set(map(canonicalize_name, owners))
    }
    return sorted(modules | {"kubetune_api", "kubetune_job", "kubetune_operator"})


# Imports every module of a package in a fresh interpreter where a module installed in site-packages
# but outside `allowed` fails to import, the way it would in the image. Such a module has a spec without a
# location (torch looks some up by name), whose loading fails.
IMPORT_ONLY = """
import importlib, importlib.abc, importlib.machinery, json, pkgutil, site, sys
allowed = set(json.loads(sys.argv[1])) | sys.stdlib_module_names
installed = tuple(site.getsitepackages())
class Missing(importlib.abc.Loader):
    def create_module(self, spec):
        raise ModuleNotFoundError(f"{spec.name} is not installed in this image", name=spec.name)
    def exec_module(self, module):
        pass
class Image:
    def find_spec(self, name, path=None, target=None):
        if path is not None or name in allowed:
            return None
        found = importlib.machinery.PathFinder.find_spec(name)
        where = found and (found.origin or next(iter(found.submodule_search_locations or []), ""))
        if where and where.startswith(installed):
            return importlib.machinery.ModuleSpec(name, Missing())
sys.meta_path.insert(0, Image())
package = importlib.import_module(sys.argv[2])
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
"""


def import_in_image(package: str, extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY, json.dumps(importable_in(extra)), package],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves path out: the last matching pattern wins, `!` re-includes."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        include = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        globs = {glob, glob.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, g) for p in prefixes for g in globs):
            ignored = not include
    return ignored


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def runs_as_user(values: Any) -> list[int]:
    """Every runAsUser set anywhere under a piece of the chart's values."""
    if isinstance(values, dict):
        found = [values["runAsUser"]] if isinstance(values.get("runAsUser"), int) else []
        return found + [u for k, v in values.items() if k != "runAsUser" for u in runs_as_user(v)]
    if isinstance(values, list):
        return [u for v in values for u in runs_as_user(v)]
    return []


# --- the parser itself ---------------------------------------------------------------------------


def test_parser_follows_stage_inheritance() -> None:
    """A stage built FROM another stage inherits its ENV, USER and ENTRYPOINT, and may override them."""
    text = (
        'ARG BASE=python:3.11.16-slim\nFROM ${BASE} AS a\nENV A=1 \\\n  B="two words"\nUSER 7\nFROM a AS b\nENV B=3\n'
    )
    found = parse(text)
    assert found["b"].image == "python:3.11.16-slim" and found["b"].parent == "a"
    assert found["b"].env == {"A": "1", "B": "3"} and found["a"].env["B"] == "two words"
    assert found["b"].user == "7"


def test_pin_pattern_rejects_floating_tags() -> None:
    """Only a digest or a full major.minor.patch tag counts as pinned."""
    assert PINNED.search("python:3.11.16-slim-bookworm") and PINNED.search("python@sha256:" + "a" * 64)
    for floating in ("python", "python:latest", "python:3.11-slim", "python:3-slim", "localhost:5000/python"):
        assert not PINNED.search(floating), floating


# --- the Dockerfile ------------------------------------------------------------------------------


def test_both_targets_exist(stages: dict[str, Stage]) -> None:
    """`docker build --target operator` and `--target job` both name a stage."""
    assert set(TARGETS) <= set(stages)


def test_every_base_image_is_pinned(stages: dict[str, Stage]) -> None:
    """Every FROM names an exact release of its base image, never latest or a floating tag."""
    for stage in stages.values():
        assert "latest" not in stage.image, stage.image
        assert PINNED.search(stage.image), f"stage {stage.name}: pin {stage.image!r} to a full version or a digest"


def test_one_builder_stage_builds_the_wheel(stages: dict[str, Stage]) -> None:
    """The wheel is built once, in a stage both images install it from."""
    builders = [s for s in stages.values() if any("pip wheel" in r for r in s.runs)]
    assert [b.name for b in builders] == ["builder"]
    for target in TARGETS:
        assert not any("pip wheel" in r for r in stages[target].runs), f"{target} builds its own wheel"
    text = DOCKERFILE.read_text()
    assert text.count("from=builder") >= len(TARGETS)


def test_targets_run_as_the_operator_setting_uid(stages: dict[str, Stage]) -> None:
    """Each image's final USER is numeric 1000, the UID the operator runs job pods as."""
    for target in TARGETS:
        assert uid(stages[target]) == 1000 == OperatorSettings().run_as_user


def test_targets_run_as_the_chart_uid(stages: dict[str, Stage]) -> None:
    """Every runAsUser the chart's values set for an image equals that image's USER."""
    values_file = ROOT / "charts" / "kubetune" / "values.yaml"
    values = yaml.safe_load(values_file.read_text()) if values_file.is_file() else {}
    for target in TARGETS:
        for chart_uid in runs_as_user(values.get(target, {})):
            assert chart_uid == uid(stages[target]), f"values.yaml {target} runAsUser {chart_uid}"


def test_entrypoints_run_the_packages(stages: dict[str, Stage]) -> None:
    """Each target's ENTRYPOINT is `python -m <package>` and that package has a __main__ module."""
    for target, package in TARGETS.items():
        assert stages[target].entrypoint == ["python", "-m", package]
        assert find_spec(f"{package}.__main__") is not None


def test_job_pods_run_the_job_entrypoint(stages: dict[str, Stage]) -> None:
    """The command the operator gives job pods is the job image's entrypoint."""
    pod = pod_template(Owner("x", "ml", "uid"), spec(), OperatorSettings())
    assert pod["spec"]["containers"][0]["command"] == stages["job"].entrypoint


def test_chart_runs_the_operator_entrypoint(stages: dict[str, Stage]) -> None:
    """The chart's operator Deployment, where it sets a command, runs the operator image's entrypoint."""
    deployment = ROOT / "charts" / "kubetune" / "templates" / "deployment.yaml"
    commands = re.findall(r"^\s*command:\s*(\[.*\])\s*$", deployment.read_text(), re.M) if deployment.is_file() else []
    for command in commands:
        assert json.loads(command) == stages["operator"].entrypoint


def test_extras_installed_are_the_projects(stages: dict[str, Stage]) -> None:
    """Each target installs exactly its own extra of pyproject.toml."""
    declared = set(pyproject()["project"]["optional-dependencies"])
    for target in TARGETS:
        assert extras_installed(stages[target]) == {target} <= declared


def test_operator_image_installs_no_torch(stages: dict[str, Stage]) -> None:
    """Neither the operator stage's installs nor the operator extra's dependencies bring torch."""
    assert not any("torch" in run for run in stages["operator"].runs)
    assert "torch" not in dist_closure("operator")


def test_job_image_installs_torch(stages: dict[str, Stage]) -> None:
    """The job stage pins torch, whose PyPI wheel brings its CUDA libraries."""
    assert any(re.search(r'"torch==\$\{?TORCH_VERSION', run) for run in stages["job"].runs)


def test_job_image_environment_suits_a_read_only_root(stages: dict[str, Stage]) -> None:
    """HOME, caches and TMPDIR lie on the pod's emptyDirs and match the pod's env; no bytecode is written."""
    env = stages["job"].env
    pod_env = {e["name"]: e.get("value") for e in environment(Owner("x", "ml", "uid"), spec(), OperatorSettings())}
    for name in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TMPDIR"):
        assert env[name] == pod_env[name], name
        assert any(env[name] == m or env[name].startswith(m + "/") for m in SCRATCH.values()), name
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_job_image_does_not_force_offline_hub(stages: dict[str, Stage]) -> None:
    """The job image leaves HF_HUB_OFFLINE unset, so Hub model and dataset ids resolve."""
    assert not {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"} & set(stages["job"].env)


def test_operator_image_writes_only_to_tmp(stages: dict[str, Stage]) -> None:
    """The operator's HOME and TMPDIR are under /tmp, the chart's one writable mount for it."""
    env = stages["operator"].env
    assert env["HOME"].startswith("/tmp") and env["TMPDIR"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"


# --- what goes into the images -------------------------------------------------------------------


def test_build_context_keeps_out_the_working_tree() -> None:
    """.dockerignore leaves out .git, .venv, tests, example models, caches and local runs."""
    patterns = dockerignore()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/unit/test_images.py",
        "examples/models/x/config.json",
        "job/kubetune_job/__pycache__/spec.cpython-311.pyc",
        "kubetune-runs/q/summary.json",
        "charts/kubetune",
    ):
        assert dockerignored(path, patterns), path


def test_build_context_keeps_what_the_dockerfile_copies(stages: dict[str, Stage]) -> None:
    """Every source a COPY names, and every file of the two packages, survives .dockerignore."""
    patterns = dockerignore()
    sources = [s.rstrip("/") for stage in stages.values() for copy in stage.copies for s in copy]
    assert sources, "the Dockerfile copies nothing from the context"
    for source in sources:
        assert not dockerignored(source, patterns), source
    for path in [
        *(ROOT / "api" / "kubetune_api").rglob("*.py"),
        *(ROOT / "job" / "kubetune_job").rglob("*.py"),
        *(ROOT / "operator" / "kubetune_operator").rglob("*.py"),
    ]:
        relative = path.relative_to(ROOT).as_posix()
        assert "__pycache__" in relative or not dockerignored(relative, patterns), relative


def test_wheel_ships_the_metric_modules() -> None:
    """pyproject's package data covers every metric module, which the job loads by path."""
    globs = pyproject()["tool"]["setuptools"]["package-data"]["kubetune_job"]
    package = ROOT / "job" / "kubetune_job"
    modules = [p.relative_to(package).as_posix() for p in (package / "metric_modules").glob("*/*.py")]
    assert modules
    for module in modules:
        assert any(fnmatch.fnmatchcase(module, g) for g in globs), module


def test_operator_imports_with_only_the_operator_extra() -> None:
    """Every operator module imports with only what kubetune[operator] installs (no torch)."""
    done = import_in_image("kubetune_operator", "operator")
    assert done.returncode == 0, done.stderr[-3000:]


def test_job_imports_with_only_the_job_extra() -> None:
    """Every job module imports with only what kubetune[job] installs (no Kubernetes client)."""
    done = import_in_image("kubetune_job", "job")
    assert done.returncode == 0, done.stderr[-3000:]


def test_operator_image_inputs_leave_out_the_command_line(stages: dict[str, Stage], tmp_path: Path) -> None:
    """No stage copies cli/, the context leaves it out, and the wheel's pyproject.toml loses the `kubetune` script."""
    sources = [s.rstrip("/") for stage in stages.values() for copy in stage.copies for s in copy]
    assert not [s for s in sources if s == "cli" or s.startswith(("cli/", "."))], sources
    for path in (ROOT / "cli" / "kubetune_cli").rglob("*.py"):
        assert dockerignored(path.relative_to(ROOT).as_posix(), dockerignore()), path
    assert any(t.endswith(":main") for t in pyproject()["project"]["scripts"].values())
    # Run the builder's own edit of pyproject.toml on a copy: what the wheel is built from names no script.
    (edit,) = [run.split("&&")[0].strip() for run in stages["builder"].runs if "project.scripts" in run]
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    subprocess.run(["bash", "-c", edit], cwd=tmp_path, check=True)
    built = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert "scripts" not in built["project"] and "readme" not in built["project"]
    assert built["project"]["optional-dependencies"] == pyproject()["project"]["optional-dependencies"]
