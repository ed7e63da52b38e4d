"""`kubetune validate` and the API server give the same answer, and the bounds are the right ones.

Manifests are generated from the CRD's own schema (so a new field is fuzzed without a change here),
starting from a text-classification or a text-generation manifest: valid values for each field, then
mutations of one field (wrong type, out of range, too long, null, unknown key, bad label key or value,
bad bucket, duplicate list item, deep `extra`, long names) or one field left out. Each one goes to a
real kube-apiserver with a server-side dry run and through the CLI's parser; both accept it, or both
refuse it naming a field (for the rules that tie fields together, spec.SPEC_RULES, the same field). A
second group of tests puts every bound at its limit: the server accepts the FineTuneJob and the Job and
Service the operator renders for it.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune_api import spec as api
from kubetune_api.spec import SpecError, parse_manifest
from kubetune_operator.crd import GROUP, PLURAL, VERSION, crd
from kubetune_operator.manifests import Owner, children
from kubetune_operator.settings import OperatorSettings
from tests.kube import install_crd
from tests.unit.test_spec import GOOD

pytestmark = pytest.mark.integration

ROOT = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC = ROOT["properties"]["spec"]
IMAGE = "registry.test/kubetune/kubetune-job:dev"
#: Examples per run: every field is mutated a few times over; about ten seconds on a 2-core machine.
EXAMPLES = 300
#: Characters of generated strings: printable ASCII with space, tab and newline (what manifests hold;
#: spec.NO_SPACE says why Unicode whitespace is no fair test of two regex engines).
ALPHABET = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")

Verdict = list[str] | None  # None: accepted; else what was wrong


# --- values from the schema ---------------------------------------------------------------------


def values(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that the schema node's structure admits (its CEL rules may still refuse some)."""
    if schema.get("x-kubernetes-int-or-string"):
        return st.one_of(st.just("epoch"), st.integers(1, api.INT64_MAX))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind is None:  # spec.free_form: scalars, maps and lists, now and then nested too deeply
        return json_values()
    if kind == "string":
        return strings(schema)
    if kind in ("integer", "number"):
        return numbers(schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        unique = schema.get("x-kubernetes-list-type") == "set"
        return st.lists(values(schema["items"]), max_size=min(schema["maxItems"], 3), unique=unique)
    if "properties" in schema:
        props = schema["properties"]
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: values(v) for k, v in props.items() if k in required},
            optional={k: values(v) for k, v in props.items() if k not in required},
        )
    if isinstance(schema.get("additionalProperties"), dict):
        return st.dictionaries(map_keys(), values(schema["additionalProperties"]), max_size=3)
    return st.dictionaries(st.text(ALPHABET, min_size=1, max_size=8), json_values(), max_size=3)


def strings(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    """Strings of the field's pattern (and s3:// URIs with odd buckets where a rule reads s3://), twice as
    often as free text."""
    limit = schema["maxLength"]
    pattern = schema.get("pattern")
    free = st.text(ALPHABET, min_size=schema.get("minLength", 0), max_size=min(limit, 40))
    if pattern is None:
        shaped = free
    else:
        anchored = pattern.startswith("^") and pattern.endswith("$")
        shaped = st.from_regex(pattern, fullmatch=anchored).filter(lambda s: len(s) <= limit)
    if any("s3://" in r["rule"] for r in schema.get("x-kubernetes-validations", [])):
        bucket = st.text(string.ascii_lowercase + string.digits + ".-_A", min_size=1, max_size=66)
        shaped = st.one_of(shaped, st.builds(lambda b: f"s3://{b}/prefix/", bucket))
    return st.one_of(shaped, shaped, free)


def numbers(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    low, high = schema.get("minimum"), schema.get("maximum")
    if schema["type"] == "integer":
        low = None if low is None else low + int(bool(schema.get("exclusiveMinimum")))
        high = None if high is None else high - int(bool(schema.get("exclusiveMaximum")))
        edges = [v for v in (low, high) if v is not None]
        return st.one_of(st.integers(low, high), st.sampled_from(edges)) if edges else st.integers(low, high)
    return st.floats(
        low,
        high,
        exclude_min=bool(schema.get("exclusiveMinimum")),
        exclude_max=bool(schema.get("exclusiveMaximum")),
        allow_nan=False,
        allow_infinity=False,
    )


def map_keys() -> st.SearchStrategy[str]:
    """Keys of a map: label keys (nodeSelector's rule) and anything else."""
    return st.one_of(
        st.from_regex(api.LABEL_KEY, fullmatch=True).filter(lambda k: len(k) <= 80),
        st.text(ALPHABET, min_size=1, max_size=20),
    )


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(-1e6, 1e6), st.text(ALPHABET, max_size=8)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(ALPHABET, min_size=1, max_size=6), inner),
        max_leaves=12,
    )


# --- where to change a manifest, and how ---------------------------------------------------------


def fields(schema: dict[str, Any], path: tuple[str, ...] = ("spec",)) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every field under spec with its schema; a list of objects is reached through its first item."""
    found = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        found += fields(child, (*path, name))
    items = schema.get("items", {})
    if "properties" in items:
        found += fields(items, (*path, "0"))
    return found


FIELDS = fields(SPEC)


def wrong_types(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = "int-or-string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
    others: dict[str | None, list[Any]] = {
        "string": [1, True, 2.5, ["x"], {"a": "b"}],
        "integer": ["5", True, 2.5, 2.0, "true", [1]],
        "number": ["0.5", True, [0.5], {"v": 1}],
        "boolean": ["true", "false", 1, 0, "yes"],
        "array": ["a", 1, {"a": 1}, True],
        "object": ["x", 1, [1], True],
        "int-or-string": [True, 2.5, 5.0, [1], {"a": 1}],
    }
    return st.sampled_from(others.get(kind, [[1], 1]))


def out_of_range(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    kind = schema.get("type")
    if kind in ("integer", "number"):
        edges = [v + d for v, d in ((schema.get("minimum"), -1), (schema.get("maximum"), 1)) if v is not None]
        if schema.get("exclusiveMinimum"):
            edges.append(schema["minimum"])
        return st.sampled_from([*edges, 2**63, -(2**63) - 1, 2**31, api.INT64_MAX])
    if "enum" in schema:
        return st.sampled_from(["", "unknown", schema["enum"][0].upper()])
    if kind == "string":
        return st.integers(1, 3).map(lambda extra: "a" * (schema["maxLength"] + extra))
    if kind == "array":
        item = schema["items"]
        return st.lists(values(item), min_size=schema["maxItems"] + 1, max_size=schema["maxItems"] + 1)
    if schema.get("x-kubernetes-int-or-string"):
        return st.sampled_from([0, -1, 2**63, "epochs", ""])
    return st.just(None)


def deep(levels: int) -> Any:
    value: Any = 1
    for i in range(levels):
        value = [value] if i % 3 == 2 else {"k": value}
    return value


def mutations(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A value for a field that is likely wrong in one way."""
    options = [wrong_types(schema), out_of_range(schema), st.none()]
    if "properties" in schema:
        options.append(values(schema).map(lambda v: {**v, "notAField": 1}))
    if schema.get("x-kubernetes-list-type") == "set":
        options.append(values(schema["items"]).map(lambda v: [v, v]))
    if schema.get("type") == "object" and "additionalProperties" in schema:
        options.append(st.builds(lambda n: {"deepspeed": deep(n)}, st.integers(3, 9)))
        options.append(st.dictionaries(st.text(ALPHABET, min_size=1, max_size=6), st.text(ALPHABET), min_size=1))
    return st.one_of(options)


def names() -> st.SearchStrategy[str]:
    """Names around the limits: 54-62 characters, starting with a letter or a digit, now and then a dot."""
    body = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=70)
    long = st.integers(54, 64).flatmap(
        lambda n: st.sampled_from(["a", "7"]).map(lambda first: first + "b" * (n - 2) + "c")
    )
    return st.one_of(long, body, st.builds(lambda a, b: f"{a}.{b}", body, body))


def put(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set doc at path, making what is missing or not a mapping into one (an index "0", a one-item list)."""
    node: Any = doc
    for here, below in itertools.pairwise(path):
        key: Any = 0 if isinstance(node, list) else here
        empty: Any = [{}] if below == "0" else {}
        if isinstance(node, list) and not node:
            node.append(empty)
        elif not isinstance(node[key] if isinstance(node, list) else node.get(key), dict | list):
            node[key] = empty
        node = node[key]
    if isinstance(node, list):
        node[:1] = [value]
    else:
        node[path[-1]] = value


def present(doc: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = doc
    for key in path:
        if isinstance(node, list) and key == "0" and node:
            node = node[0]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return False
    return True


def drop(doc: dict[str, Any], path: tuple[str, ...]) -> None:
    """Remove the field at path (present(doc, path) holds)."""
    node: Any = doc
    for key in path[:-1]:
        node = node[0] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node.pop(0)
    else:
        del node[path[-1]]


#: A text-generation manifest that sets every field of that task, each to a value other than its default.
GENERATION: dict[str, Any] = {
    **GOOD,
    "metadata": {"name": "chat"},
    "spec": {
        "model": {"uri": "s3://models/smollm2-135m-instruct/"},
        "task": "text-generation",
        "dataset": {
            "uri": "s3://data/support-chats/",
            "format": "messages",
            "packing": True,
            "chatTemplate": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "maxLength": 512,
        },
        "adapter": {"method": "qlora", "rank": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]},
        "evaluation": {"generate": {"examples": 16, "maxNewTokens": 32}},
        "hyperparameters": {"gradientCheckpointing": False},
        "metrics": ["exact_match", "perplexity"],
        "output": {"uri": "s3://models/support-bot/", "merge": True},
    },
}
#: A preference manifest that sets every field of that task, each to a value other than its default
#: (spec.preference.method has one value, dpo, so it is set to its default).
PREFERENCE: dict[str, Any] = {
    **GOOD,
    "metadata": {"name": "prefs"},
    "spec": {
        "model": {"uri": "s3://models/support-bot/"},
        "task": "preference",
        "dataset": {
            "uri": "s3://data/ticket-preferences/",
            "chatTemplate": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "maxLength": 768,
        },
        "adapter": {
            "method": "qlora",
            "rank": 4,
            "alpha": 8,
            "dropout": 0.0,
            "targetModules": ["q_proj", "k_proj"],
            "init": "new",
        },
        "preference": {"method": "dpo", "beta": 0.25, "loss": "ipo"},
        "hyperparameters": {"gradientCheckpointing": True},
        "metrics": ["reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"],
        "output": {"uri": "s3://models/support-bot-dpo/", "merge": True},
    },
}
#: The manifests the fuzz starts from: one of each task.
BASES = (GOOD, GENERATION, PREFERENCE)
#: The fields spec.SPEC_RULES read (self.task, self.dataset.format...), read from the rules themselves: they
#: are set or left out more often than the others, so that each rule breaks, alone and together.
CROSS = [
    (path, schema)
    for path, schema in FIELDS
    if len(path) > 1 and any(re.search(rf"self\.{'.'.join(path[1:])}(?![\w.])", str(r["rule"])) for r in api.SPEC_RULES)
]


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A base manifest with up to two fields set to valid values, then (mostly) one field mutated or left
    out, or the name changed."""
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(0, 2))):
        path, schema = draw(st.sampled_from(FIELDS[1:]))
        put(doc, path, draw(values(schema)))
    choice = draw(st.sampled_from(["mutate", "mutate", "mutate", "drop", "cross", "cross", "name", "none"]))
    if choice == "mutate":
        path, schema = draw(st.sampled_from(FIELDS[1:]))
        put(doc, path, draw(mutations(schema)))
    elif choice == "drop":
        drop(doc, draw(st.sampled_from([path for path, _ in FIELDS[1:] if present(doc, path)])))
    elif choice == "cross":
        for _ in range(draw(st.integers(1, 3))):
            path, schema = draw(st.sampled_from(CROSS))
            if present(doc, path) and draw(st.booleans()):
                drop(doc, path)
            else:
                put(doc, path, draw(values(schema)))
    elif choice == "name":
        doc["metadata"]["name"] = draw(names())
        put(doc, ("spec", "resources", "nodes"), draw(st.sampled_from([1, 2, 10, 11, 64])))
    return doc


# --- the two judges -----------------------------------------------------------------------------


def server_verdict(api_client: Any, namespace: str, doc: dict[str, Any]) -> Verdict:
    """The API server's answer to a create (server-side dry run, unknown fields refused as kubectl does)."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    body = {**doc, "metadata": {**doc["metadata"], "namespace": namespace}}
    try:
        k8s.CustomObjectsApi(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All", field_validation="Strict"
        )
    except ApiException as e:
        if e.status not in (400, 422):
            raise
        body = json.loads(e.body)
        causes = (body.get("details") or {}).get("causes") or []
        return [body["message"], *(f"{c.get('field', '')}: {c.get('message', '')}" for c in causes)]
    return None


def cli_verdict(doc: dict[str, Any]) -> Verdict:
    try:
        parse_manifest(copy.deepcopy(doc))
    except SpecError as e:
        return e.problems
    return None


def names_a_field(message: str) -> bool:
    return "spec." in message or "metadata.name" in message or 'unknown field "spec' in message


def broken_rules(server: list[str]) -> list[int]:
    """Which of spec.SPEC_RULES the server's answer (message, then one line per cause) says were broken."""
    return [i for i, rule in enumerate(api.SPEC_RULES) if any(str(rule["message"]) in c for c in server[1:])]


def agree(server: Verdict, cli: Verdict, doc: dict[str, Any]) -> None:
    where = json.dumps(doc)[:2000]
    assert (server is None) == (cli is None), f"server: {server}\ncli: {cli}\nmanifest: {where}"
    if server is not None and cli is not None:
        assert names_a_field(server[0]), f"the server's message names no field: {server}"
        assert all(names_a_field(line) or line.startswith(("metadata.", "spec")) for line in cli), cli
        causes = server[1:]
        if causes and len(broken_rules(server)) == len(causes):
            # Only rules that tie fields together broke: the CLI checks them in order and names the first.
            fields = {c.split(": ", 1)[0] for c in causes}
            assert {line.split(": ", 1)[0] for line in cli} <= fields, f"server: {causes}\ncli: {cli}\n{where}"


# --- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(control_plane: Any) -> Any:
    install_crd(control_plane)
    return control_plane


def test_cli_and_server_agree_on_generated_manifests(installed: Any, kube_admin: Any, namespace: str) -> None:
    """Valid and mutated manifests from the CRD's schema: the CLI and the API server give the same answer."""
    seen = {"accepted": 0, "refused": 0}
    per_task = {task: {"accepted": 0, "refused": 0} for task in api.TASKS if task != "text-classification"}
    rules = [0] * len(api.SPEC_RULES)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(doc=manifests())
    def check(doc: dict[str, Any]) -> None:
        server = server_verdict(kube_admin, namespace, doc)
        agree(server, cli_verdict(doc), doc)
        verdict = "accepted" if server is None else "refused"
        seen[verdict] += 1
        task = doc["spec"].get("task") if isinstance(doc.get("spec"), dict) else None
        if task in per_task:
            per_task[task][verdict] += 1
        for i in broken_rules(server or []):
            rules[i] += 1

    check()
    # Both answers must be common, for each task too, and each cross-field rule must break somewhere,
    # or the run proved little.
    assert min(seen.values()) >= EXAMPLES // 10, seen
    assert all(min(counts.values()) >= EXAMPLES // 20 for counts in per_task.values()), per_task
    assert min(rules) > 0, rules


def test_the_text_generation_base_sets_every_field_of_its_task() -> None:
    """The fuzz's text-generation manifest is valid and carries each field the task added (so they are
    fuzzed in valid company), and its metrics are the task's own."""
    spec = parse_manifest(copy.deepcopy(GENERATION)).spec
    assert spec.adapter is not None and spec.evaluation is not None and spec.evaluation.generate is not None
    assert spec.dataset.format and spec.dataset.packing and spec.dataset.chat_template and spec.output.merge
    assert set(spec.metrics) == set(api.TASK_METRICS["text-generation"])
    assert spec.hyperparameters.gradient_checkpointing is False


def test_the_preference_base_sets_every_field_of_its_task() -> None:
    """The fuzz's preference manifest is valid and carries each field the task added or shares with
    text-generation (adapter with init, chat template, merge), each off its default where it has another
    value, and its metrics are the task's own."""
    spec = parse_manifest(copy.deepcopy(PREFERENCE)).spec
    assert spec.task == "preference" and spec.preference is not None
    defaults, fields = api.Preference(), api.Preference.model_fields
    changed = {name for name in fields if getattr(spec.preference, name) != getattr(defaults, name)}
    assert changed == set(fields) - {"method"}
    assert spec.adapter is not None and spec.adapter.init == "new" and spec.output.merge
    assert spec.dataset.chat_template and spec.dataset.max_length
    assert set(spec.metrics) == set(api.TASK_METRICS["preference"])
    assert spec.metrics != list(api.DEFAULT_METRICS["preference"])
    # Every field of the spec the text-generation base leaves out is set here (or has no other value).
    assert set(PREFERENCE["spec"]) - set(GENERATION["spec"]) == {"preference"}


#: Generated manifests created for real under the running operator, and how long each may wait for a status.
REAL_EXAMPLES, STATUS_BOUND_SECONDS, RSS_BOUND_MB = 120, 120, 400


@pytest.mark.chaos
def test_generated_manifests_created_for_real_each_get_a_status(operator: Any, kube_admin: Any, namespace: str) -> None:
    """The generated manifests the API server accepts, created for real (suspended, so no pod runs) under the
    running operator: each gets a status phase within a bound, and the operator stays healthy, its
    memory bounded."""
    import time
    import urllib.request

    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    custom = k8s.CustomObjectsApi(kube_admin)
    created: list[str] = []

    @settings(
        max_examples=REAL_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(doc=manifests())
    def create(doc: dict[str, Any]) -> None:
        doc = copy.deepcopy(doc)
        put(doc, ("spec", "runPolicy", "suspend"), True)
        name = f"gen-{len(created)}"
        body = {**doc, "metadata": {"name": name, "namespace": namespace}}
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict")
        except ApiException as e:
            if e.status not in (400, 422):
                raise
            return
        created.append(name)

    create()
    assert len(created) >= REAL_EXAMPLES // 10, len(created)
    deadline = time.monotonic() + STATUS_BOUND_SECONDS
    while True:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items}
        waiting = [n for n in created if phases.get(n) not in ("Suspended", "Failed")]
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not waiting, {n: phases.get(n) for n in waiting[:10]}
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.info['health_port']}/healthz", timeout=5) as answer:
        assert answer.status == 200
    rss = next(
        ln
        for ln in Path(f"/proc/{operator.info['process'].pid}/status").read_text().splitlines()
        if ln.startswith("VmRSS:")
    )
    assert int(rss.split()[1]) / 1024 < RSS_BOUND_MB, rss


FIXED: dict[str, Callable[[dict[str, Any]], None]] = {
    "valid": lambda d: None,
    "batch-size-true": lambda d: put(d, ("spec", "hyperparameters", "batchSize"), True),
    "suspend-string": lambda d: put(d, ("spec", "runPolicy", "suspend"), "true"),
    "every-string": lambda d: put(d, ("spec", "checkpoints", "every"), "5"),
    "seed-int64": lambda d: put(d, ("spec", "hyperparameters", "seed"), 2**63),
    "duplicate-metrics": lambda d: put(d, ("spec", "metrics"), ["f1", "f1"]),
    "bad-bucket": lambda d: put(d, ("spec", "output", "uri"), "s3://Bad_Bucket/x/"),
    "null-hyperparameters": lambda d: put(d, ("spec", "hyperparameters"), None),
    "long-name": lambda d: put(d, ("metadata", "name"), "a" * 62),
    "two-nodes-long-name": lambda d: (
        put(d, ("metadata", "name"), "a" * 56),
        put(d, ("spec", "resources", "nodes"), 2),
    ),
}


#: A null sub-object is left out (the API server prunes it), so it takes its defaults.
ACCEPTED = {"valid", "null-hyperparameters"}


@pytest.mark.parametrize("case", sorted(FIXED))
def test_kubetune_validate_agrees_with_kubectl(installed: Any, namespace: str, tmp_path: Path, case: str) -> None:
    """The real `kubetune validate` and `kubectl apply --dry-run=server` agree on the issue's examples."""
    from tests.kube import kubectl

    doc = copy.deepcopy(GOOD)
    FIXED[case](doc)
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(doc))
    cli = validate(path)
    server = kubectl(installed, "apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert (cli.returncode == 0) == (server.returncode == 0), f"kubetune: {cli.stderr}\nkubectl: {server.stderr}"
    assert (case in ACCEPTED) == (cli.returncode == 0), cli.stderr
    if cli.returncode:
        assert names_a_field(cli.stderr) and names_a_field(server.stderr), (cli.stderr, server.stderr)


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune_cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deep_extra_is_refused_by_server_and_cli(installed: Any, namespace: str, tmp_path: Path) -> None:
    """extra nested 1000 levels deep: the server refuses it naming the field; validate says so in one line."""
    from tests.kube import kubectl

    doc = copy.deepcopy(GOOD)
    put(doc, ("spec", "hyperparameters", "extra"), {"deepspeed": "DEEP"})
    # Written as text: Python's own JSON and YAML writers (and the Kubernetes client) recurse per level.
    text = json.dumps(doc).replace('"DEEP"', '{"a": ' * 1000 + "1" + "}" * 1000)
    path = tmp_path / "deep.yaml"
    path.write_text(text)  # JSON is YAML
    server = kubectl(installed, "create", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert server.returncode != 0 and "spec.hyperparameters.extra.deepspeed" in server.stderr, server.stderr
    done = validate(path)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "nests maps and lists too deeply" in line and str(path) in line


def test_extra_at_its_bounds_is_accepted(installed: Any, kube_admin: Any, namespace: str) -> None:
    """extra with 64 keys, values nested four levels (deepspeed's shape) of 64 entries: both accept it."""
    level: Any = ["x" * api.MAX_STRING] * api.MAX_ITEMS
    for _ in range(api.EXTRA_DEPTH - 1):
        level = {f"k{i}": level for i in range(2)} | {f"s{i}": 1 for i in range(api.MAX_ITEMS - 2)}
    doc = copy.deepcopy(GOOD)
    put(doc, ("spec", "hyperparameters", "extra"), {f"key{i}": level if i == 0 else i for i in range(api.MAX_ITEMS)})
    agree(server_verdict(kube_admin, namespace, doc), cli_verdict(doc), doc)
    assert cli_verdict(doc) is None
    put(doc, ("spec", "hyperparameters", "extra", "key1"), deep(api.EXTRA_DEPTH + 1))
    agree(server_verdict(kube_admin, namespace, doc), cli_verdict(doc), doc)
    assert cli_verdict(doc) is not None


# --- every bound at its limit -------------------------------------------------------------------

PREFIX = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # a DNS subdomain of 253 characters
LABEL_KEY = f"{PREFIX}/{'k' * 63}"
LABEL_VALUE = "v" + "-" * 61 + "v"


def at_limits(name: str, nodes: int) -> dict[str, Any]:
    """A FineTuneJob with every bound the Job, pods, Service and labels derive from at its limit."""
    doc = copy.deepcopy(GOOD)
    doc["metadata"]["name"] = name
    doc["spec"].update(
        {
            "resources": {"nodes": nodes, "gpus": 16, "cpu": "1" * 32, "memory": "1" * 30 + "Gi"},
            "scheduling": {
                "nodeSelector": {LABEL_KEY: LABEL_VALUE, "gpu": ""},
                "tolerations": [
                    {"key": LABEL_KEY, "operator": "Equal", "value": LABEL_VALUE, "effect": "NoSchedule"},
                    {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": api.INT64_MAX},
                ],
                "priorityClassName": PREFIX,
                "queueName": LABEL_VALUE,
                "topology": {"level": LABEL_KEY, "mode": "Preferred"},
            },
            "runPolicy": {
                "maxRetries": 100,
                "activeDeadlineSeconds": api.INT64_MAX,
                "ttlSecondsAfterFinished": api.INT32_MAX,
            },
            "image": "registry.test/" + "i" * (512 - len("registry.test/") - len(":dev")) + ":dev",
            "storage": {"credentialsSecret": PREFIX, "endpoint": "http://s3.test:8333"},
            "hubTokenSecret": PREFIX,
        }
    )
    return doc


def rendered(doc: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """What the operator creates for doc: its Indexed Job (every Job is one), and the Service.
    Only the spec is parsed, so a name past its limit renders too."""
    spec = api.parse_spec(doc["spec"])
    objects = children(Owner(doc["metadata"]["name"], namespace, "uid-1"), spec, OperatorSettings(job_image=IMAGE))
    (job,) = [obj for obj in objects if obj["kind"] == "Job"]
    assert job["spec"]["completionMode"] == "Indexed"  # what the name limits are computed for
    return objects


def server_accepts_children(api_client: Any, objects: list[dict[str, Any]]) -> list[str]:
    """The API server's complaints about the rendered objects (server-side dry run), if any."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    problems = []
    for obj in objects:
        ns = obj["metadata"]["namespace"]
        create = (
            k8s.BatchV1Api(api_client).create_namespaced_job
            if obj["kind"] == "Job"
            else k8s.CoreV1Api(api_client).create_namespaced_service
        )
        try:
            create(ns, obj, dry_run="All", field_validation="Strict")
        except ApiException as e:
            problems.append(json.loads(e.body)["message"])
    return problems


@pytest.mark.parametrize(("length", "nodes"), [(61, 1), (55, 2), (55, 64)])
def test_bounds_at_their_limits_are_accepted_with_the_jobs_and_services(
    installed: Any, kube_admin: Any, namespace: str, length: int, nodes: int
) -> None:
    """Every bound at its limit: the FineTuneJob, its Indexed Job and its Service are all accepted."""
    doc = at_limits("a" * (length - 1) + "z", nodes)
    assert cli_verdict(doc) is None
    assert server_verdict(kube_admin, namespace, doc) is None
    assert server_accepts_children(kube_admin, rendered(doc, namespace)) == []


def test_text_generation_fields_at_their_limits_are_accepted_with_the_job(
    installed: Any, kube_admin: Any, namespace: str
) -> None:
    """The text-generation fields at their limits too (the longest chat template, 64 target modules of the
    longest name): both accept the FineTuneJob, and the server its Job, which carries the spec to the pod."""
    doc = at_limits("a" * 60 + "z", 1)
    doc["spec"].update(copy.deepcopy({k: v for k, v in GENERATION["spec"].items() if k not in ("model", "output")}))
    doc["spec"]["dataset"].update({"chatTemplate": "t" * api.MAX_TEMPLATE, "maxLength": 131072})
    doc["spec"]["adapter"].update(
        {"rank": 4096, "alpha": 65536, "targetModules": [f"{i:02d}" + "m" * (api.MAX_STRING - 2) for i in range(64)]}
    )
    doc["spec"]["evaluation"]["generate"] = {"examples": 100000, "maxNewTokens": 32768}
    assert cli_verdict(doc) is None
    assert server_verdict(kube_admin, namespace, doc) is None
    assert server_accepts_children(kube_admin, rendered(doc, namespace)) == []


def test_preference_fields_at_their_limits_are_accepted_with_the_job(
    installed: Any, kube_admin: Any, namespace: str
) -> None:
    """The preference fields at their limits (beta 100, the longest chat template, the largest adapter): both
    accept the FineTuneJob, and the server its Job."""
    doc = at_limits("a" * 60 + "z", 1)
    doc["spec"].update(copy.deepcopy({k: v for k, v in PREFERENCE["spec"].items() if k not in ("model", "output")}))
    doc["spec"]["dataset"].update({"chatTemplate": "t" * api.MAX_TEMPLATE, "maxLength": 131072})
    doc["spec"]["adapter"].update({"rank": 4096, "alpha": 65536})
    doc["spec"]["preference"]["beta"] = 100
    assert cli_verdict(doc) is None
    assert server_verdict(kube_admin, namespace, doc) is None
    assert server_accepts_children(kube_admin, rendered(doc, namespace)) == []


@pytest.mark.parametrize(("length", "nodes"), [(62, 1), (56, 2), (56, 64)])
def test_one_past_the_name_limit_is_refused_and_the_job_would_be_too(
    installed: Any, kube_admin: Any, namespace: str, length: int, nodes: int
) -> None:
    """One character more: both refuse the FineTuneJob, and the server would refuse its Job or Service."""
    doc = at_limits("a" * (length - 1) + "z", nodes)
    server = server_verdict(kube_admin, namespace, doc)
    agree(server, cli_verdict(doc), doc)
    assert server and "metadata.name" in server[0], server
    assert server_accepts_children(kube_admin, rendered(doc, namespace)) != []


def test_a_multi_node_name_starts_with_a_letter(installed: Any, kube_admin: Any, namespace: str) -> None:
    """With nodes > 1 both refuse a name starting with a digit: <name>-workers is a DNS-1035 label for
    Services (API servers with RelaxedServiceNameValidation accept it; older ones do not)."""
    doc = at_limits("7" + "a" * 54, 2)
    server = server_verdict(kube_admin, namespace, doc)
    agree(server, cli_verdict(doc), doc)
    assert server and "metadata.name" in server[0], server
    assert cli_verdict(at_limits("7" + "a" * 60, 1)) is None
