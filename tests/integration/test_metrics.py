"""Training metrics end to end: real tiny jobs (a classifier, a causal LM, and the causal LM on preference pairs)
push to the test bed's Pushgateway, Prometheus scrapes them, and every dashboard query and alert rule is checked
against what arrived."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api.metrics import BY_NAME, CATALOG, eval_name
from kubetune_api.spec import PREFERENCE_METRICS, TASK_METRICS, TASKS
from kubetune_job.pushgateway import delete_group
from tests.blackhole import blackhole as gateway_blackhole
from tests.models import build_tiny_bert, build_tiny_llama, write_chats, write_pairs, write_preferences
from tests.testbed import binaries

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
DASHBOARDS = sorted((ROOT / "charts" / "kubetune" / "dashboards").glob("*.json"))
RULES = ROOT / "charts" / "kubetune" / "alerts" / "kubetune.rules.yaml"
RULE_TESTS = ROOT / "tests" / "alerts" / "kubetune.rules.test.yaml"
NAMESPACE = "metrics"
#: Prometheus' rate windows for the substituted $__rate_interval: the test bed scrapes every second.
RATE_INTERVAL = "1m"


def promtool() -> Path:
    """promtool (Debian's prometheus package); skipped, or failed under KUBETUNE_REQUIRE_TESTBED, when missing."""
    found = binaries.find("promtool")
    if found is None:
        message = "promtool is missing: run tests/testbed/build (it installs Debian's prometheus)"
        if os.environ.get("KUBETUNE_REQUIRE_TESTBED"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def manifest(tiny: dict[str, Path], work: Path, name: str, **hyper: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(tiny["model"])},
            "dataset": {"uri": str(tiny["data"]), "maxLength": 32},
            "hyperparameters": {"epochs": 2, "batchSize": 8, "learningRate": 1e-3, "evalEvery": 25, **hyper},
            "metrics": ["accuracy", "f1"],
            "checkpoints": {"uri": str(work / "checkpoints"), "every": 25, "keep": 2},
            "output": {"uri": str(work / "output")},
        },
    }


def run_job(job: dict[str, Any], work: Path, gateway_url: str) -> tuple[int, dict[str, Any]]:
    """`python -m kubetune_job` as a pod runs it, pushing to the gateway every second."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    env = {
        **os.environ,
        "KUBETUNE_SPEC_FILE": str(work / "job.yaml"),
        "KUBETUNE_WORK_DIR": str(work / "scratch"),
        "KUBETUNE_SUMMARY_PATH": str(work / "summary.json"),
        "KUBETUNE_NAME": job["metadata"]["name"],
        "KUBETUNE_NAMESPACE": NAMESPACE,
        "KUBETUNE_PUSHGATEWAY_URL": gateway_url,
        "KUBETUNE_PUSH_INTERVAL_SECONDS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    with (work / "job.log").open("wb") as log:
        code = subprocess.run([sys.executable, "-m", "kubetune_job"], env=env, stdout=log, stderr=log, timeout=600)
    return code.returncode, json.loads((work / "summary.json").read_text())


def group_lines(text: str, name: str) -> list[str]:
    """The gateway's sample lines for one FineTuneJob's group."""
    return [ln for ln in text.splitlines() if not ln.startswith("#") and f'finetunejob="{name}"' in ln]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {"model": build_tiny_bert(base / "model"), "data": write_pairs(base / "data", train=400, validation=80)}


def finished(job: dict[str, Any], work: Path, gateway: Any, prometheus: Any) -> Any:
    """Run the job to success and wait until Prometheus scraped its outcome."""
    name = job["metadata"]["name"]
    code, summary = run_job(job, work, gateway.url)
    assert code == 0, (work / "job.log").read_text()[-3000:]
    prometheus.query(f'kubetune_job_outcome{{finetunejob="{name}", phase="Succeeded"}}', timeout=30)
    return type("Trained", (), {"name": name, "summary": summary, "work": work})


@pytest.fixture(scope="module")
def trained(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, pushgateway: Any, prometheus: Any) -> Any:
    """A tiny job (100 steps, 4 evaluations and checkpoints) that pushed to the gateway and was scraped to its end."""
    work = tmp_path_factory.mktemp("trained")
    return finished(manifest(tiny, work, f"tiny-{secrets.token_hex(3)}"), work, pushgateway, prometheus)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory, pushgateway: Any, prometheus: Any) -> Any:
    """A tiny text-generation job (a causal LM on chat data, 25 steps, 3 evaluations with generated answers
    scored by exact_match, and perplexity) that pushed to the gateway and was scraped to its end."""
    base = tmp_path_factory.mktemp("chat")
    model, data = build_tiny_llama(base / "model"), write_chats(base / "data", train=200, validation=20)
    work = base / "run"
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"chat-{secrets.token_hex(3)}"},
        "spec": {
            "model": {"uri": str(model)},
            "task": "text-generation",
            "dataset": {"uri": str(data), "maxLength": 32},
            "evaluation": {"generate": {"examples": 4, "maxNewTokens": 4}},
            "hyperparameters": {"epochs": 1, "batchSize": 8, "learningRate": 3e-3, "evalEvery": 10},
            "metrics": ["exact_match", "perplexity"],
            "checkpoints": {"uri": str(work / "checkpoints"), "every": 10, "keep": 1},
            "output": {"uri": str(work / "output")},
        },
    }
    return finished(job, work, pushgateway, prometheus)


@pytest.fixture(scope="module")
def preferred(tmp_path_factory: pytest.TempPathFactory, pushgateway: Any, prometheus: Any) -> Any:
    """A tiny preference job (DPO with a new LoRA adapter on the causal LM, 25 steps, 3 evaluations, the task's
    default metrics: the four rewards) that pushed to the gateway and was scraped to its end."""
    base = tmp_path_factory.mktemp("prefs")
    model, data = build_tiny_llama(base / "model"), write_preferences(base / "data", train=200, validation=20)
    work = base / "run"
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"prefs-{secrets.token_hex(3)}"},
        "spec": {
            "model": {"uri": str(model)},
            "task": "preference",
            "dataset": {"uri": str(data), "maxLength": 32},
            "adapter": {"rank": 8},
            "preference": {"beta": 0.1},
            "hyperparameters": {"epochs": 1, "batchSize": 8, "learningRate": 1e-2, "evalEvery": 10},
            "checkpoints": {"uri": str(work / "checkpoints"), "every": 10, "keep": 1},
            "output": {"uri": str(work / "output")},
        },
    }
    return finished(job, work, pushgateway, prometheus)


@pytest.mark.parametrize("run", ["trained", "generated", "preferred"])
def test_training_job_pushes_every_metric_to_its_group(
    run: str, request: pytest.FixtureRequest, pushgateway: Any
) -> None:
    """The group of each task's run holds every catalog metric a CPU run has (all but GPU ones), and the
    gateway's push time."""
    name = request.getfixturevalue(run).name  # trains first, if no test did yet
    names = {ln.split("{")[0] for ln in group_lines(pushgateway.metrics_text(), name)}
    expected = {m.name for m in CATALOG if not m.gpu} | {"push_time_seconds"}
    assert expected <= names, sorted(expected - names)


def test_pushed_series_carry_only_the_grouping_key(trained: Any, pushgateway: Any) -> None:
    """Series are labelled job, namespace and finetunejob (plus catalog labels): no pod, no attempt."""
    allowed = {"job", "namespace", "finetunejob", "instance"} | {label for m in CATALOG for label in m.labels}
    lines = group_lines(pushgateway.metrics_text(), trained.name)
    labels = {label for ln in lines for label in re.findall(r'[{,](\w+)="', ln)}
    assert labels <= allowed and 'namespace="metrics"' in lines[0] and 'job="kubetune"' in lines[0]


def test_successful_job_reports_succeeded_outcome_and_no_failed_pushes(trained: Any, prometheus: Any) -> None:
    """After success: outcome Succeeded, running 0, no failed pushes (in the summary and on the gateway)."""
    sel = f'namespace="{NAMESPACE}", finetunejob="{trained.name}"'
    assert trained.summary["metricsPushFailures"] == 0
    assert prometheus.query(f"kubetune_job_running{{{sel}}} == 0 and kubetune_push_failures_total{{{sel}}} == 0")


def test_pushed_metrics_pass_promtool_check_metrics(trained: Any, pushgateway: Any) -> None:
    """promtool's naming lint finds nothing in what the job pushed."""
    text = pushgateway.metrics_text()
    families = {ln.split("{")[0] for ln in group_lines(text, trained.name)} - {"push_time_seconds"}
    ours = [
        ln
        for ln in text.splitlines()
        if (ln.split(" ")[2] if ln.startswith("#") else ln.split("{")[0]) in families
        and (ln.startswith("#") or f'finetunejob="{trained.name}"' in ln)
    ]
    done = subprocess.run(
        [str(promtool()), "check", "metrics"], input="\n".join(ours) + "\n", capture_output=True, text=True
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


# Dashboards: every query of every panel and variable, with the variables substituted, returns data.


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def tasks_of(expr: str) -> list[str]:
    """The tasks whose runs a query shows: those having every evaluation metric it selects by name
    (metric="perplexity" is text-generation's alone, metric="reward_margin" preference's), or every task."""
    named = set(re.findall(r'\bmetric="(\w+)"', expr))
    return [task for task in TASKS if named <= set(TASK_METRICS[task])]


#: The run of each task that the dashboard tests query.
RUNS = {"text-classification": "trained", "text-generation": "generated", "preference": "preferred"}


def panel_targets() -> list[Any]:
    params = []
    for path in DASHBOARDS:
        for panel in load(path)["panels"]:
            for child in [panel, *panel.get("panels", [])]:
                for target in child.get("targets", []):
                    names = re.findall(r"\bkubetune_\w+", target["expr"])
                    gpu = bool(names) and all(BY_NAME[n].gpu for n in names)
                    where = f"{path.stem}:{child['title']}:{target['refId']}"
                    params += [
                        pytest.param(target["expr"], gpu, RUNS[task], id=f"{where}:{task}")
                        for task in tasks_of(target["expr"])
                    ]
    return params


def substitute(expr: str, name: str) -> str:
    values = {"namespace": NAMESPACE, "finetunejob": name, "__rate_interval": RATE_INTERVAL}
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


def test_every_panel_shows_some_task() -> None:
    """Each panel query selects metrics some task's run pushes (a misspelt metric label would show nothing)."""
    assert all(tasks_of(str(p.values[0])) for p in panel_targets()) and len(panel_targets()) > 30


@pytest.mark.parametrize(("expr", "gpu", "run"), panel_targets())
def test_dashboard_query_returns_data(
    expr: str, gpu: bool, run: str, request: pytest.FixtureRequest, prometheus: Any
) -> None:
    """The panel's query, for the job of each task it shows, returns data from the real Prometheus."""
    query = substitute(expr, request.getfixturevalue(run).name)
    if gpu and not _cuda():
        # Only a GPU run pushes kubetune_gpu_*: here the query must still be valid PromQL.
        assert prometheus.query_once(query) == []
        pytest.skip("GPU panel: returns data only for a job that trained on a GPU")
    assert prometheus.query(query, timeout=20), query


def test_text_generation_scores_show_in_the_evaluation_panels(generated: Any, prometheus: Any) -> None:
    """The causal LM's exact_match is among the scores (a fraction), its perplexity in its own panel (not a
    fraction), both in the last evaluation; its throughput in tokens/s is above its samples/s."""
    dashboard = load(ROOT / "charts" / "kubetune" / "dashboards" / "kubetune-job.json")
    shown = {}
    for panel in dashboard["panels"]:
        if panel["title"] in ("Evaluation scores", "Perplexity", "Last evaluation"):
            found = prometheus.query(substitute(panel["targets"][0]["expr"], generated.name), timeout=20)
            shown[panel["title"]] = {r["metric"]["metric"]: float(r["value"][1]) for r in found}
    assert set(shown["Evaluation scores"]) == {"exact_match"} and 0 <= shown["Evaluation scores"]["exact_match"] <= 1
    assert set(shown["Perplexity"]) == {"perplexity"} and shown["Perplexity"]["perplexity"] >= 1
    assert shown["Last evaluation"] == {**shown["Evaluation scores"], **shown["Perplexity"]}
    assert generated.summary["metrics"]["evalPerplexity"] == pytest.approx(shown["Perplexity"]["perplexity"])
    sel = f'namespace="{NAMESPACE}", finetunejob="{generated.name}"'
    faster = f"kubetune_train_tokens_per_second{{{sel}}} > kubetune_train_samples_per_second{{{sel}}}"
    assert prometheus.query(faster, timeout=20)


def test_preference_rewards_show_in_the_evaluation_panels(preferred: Any, prometheus: Any) -> None:
    """The preference run's reward_accuracy is among the scores (a fraction); its reward margin and the chosen
    and rejected rewards (not fractions, negative at times) are in the Reward margin panel and not among the
    scores; all four in the last evaluation, with the summary's final values."""
    dashboard = load(ROOT / "charts" / "kubetune" / "dashboards" / "kubetune-job.json")
    shown: dict[str, dict[str, float]] = {}
    for panel in dashboard["panels"]:
        if panel["title"] in ("Evaluation scores", "Reward margin", "Last evaluation"):
            for target in panel["targets"]:
                if "kubetune_eval_metric" in target["expr"]:
                    found = prometheus.query(substitute(target["expr"], preferred.name), timeout=20)
                    shown.setdefault(panel["title"], {}).update(
                        {r["metric"]["metric"]: float(r["value"][1]) for r in found}
                    )
    rewards = {"reward_margin", "chosen_reward", "rejected_reward"}
    assert set(shown["Evaluation scores"]) == {"reward_accuracy"}
    assert 0 <= shown["Evaluation scores"]["reward_accuracy"] <= 1
    assert set(shown["Reward margin"]) == rewards
    assert shown["Last evaluation"] == {**shown["Evaluation scores"], **shown["Reward margin"]}
    final = preferred.summary["metrics"]  # rounded to 6 decimals
    assert {m: final[eval_name(m)] for m in PREFERENCE_METRICS} == pytest.approx(shown["Last evaluation"], abs=1e-6)
    margin = shown["Reward margin"]
    assert margin["reward_margin"] == pytest.approx(margin["chosen_reward"] - margin["rejected_reward"], abs=1e-4)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def variable_queries() -> list[Any]:
    return [
        pytest.param(v["query"]["query"], id=f"{path.stem}:{v['name']}")
        for path in DASHBOARDS
        for v in load(path)["templating"]["list"]
        if v["type"] == "query"
    ]


@pytest.mark.parametrize("definition", variable_queries())
def test_dashboard_variable_offers_the_trained_job(definition: str, trained: Any, prometheus: Any) -> None:
    """label_values(...) of each variable, run as PromQL, lists the trained job's namespace or name."""
    m = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
    assert m, definition
    selector, label = substitute(m.group(1), trained.name), m.group(2)
    found = {r["metric"].get(label) for r in prometheus.query(f"group by ({label}) ({selector})", timeout=20)}
    assert {NAMESPACE, trained.name} & found


# Outcomes and the group's end.


def test_failed_job_pushes_its_failure_and_reason(tiny: dict[str, Path], tmp_path: Path, pushgateway: Any,
                                                  prometheus: Any) -> None:  # fmt: skip
    """A job with an invalid spec pushes outcome Failed, reason InvalidConfig, not retryable."""
    name = f"bad-{secrets.token_hex(3)}"
    code, summary = run_job(manifest(tiny, tmp_path, name, epochs=-1), tmp_path, pushgateway.url)
    assert code == 10 and summary["reason"] == "InvalidConfig"
    sel = f'namespace="{NAMESPACE}", finetunejob="{name}"'
    assert prometheus.query(f'kubetune_job_outcome{{{sel}, phase="Failed", reason="InvalidConfig", retryable="false"}}')


def test_deleted_group_leaves_no_series_on_the_gateway(tiny: dict[str, Path], tmp_path: Path, pushgateway: Any) -> None:
    """After a job ended, delete_group removes every series of that job from the gateway, and only those."""
    from kubetune_job.prometheus import JobMetrics

    name = f"gone-{secrets.token_hex(3)}"
    run_job(manifest(tiny, tmp_path, name, epochs=-1), tmp_path, pushgateway.url)
    assert group_lines(pushgateway.metrics_text(), name)
    other = f"kept-{secrets.token_hex(3)}"
    assert JobMetrics(pushgateway.url, namespace=NAMESPACE, finetunejob=other).push()
    delete_group(pushgateway.url, NAMESPACE, name)
    text = pushgateway.metrics_text()
    assert group_lines(text, name) == [] and group_lines(text, other)
    delete_group(pushgateway.url, NAMESPACE, other)


# Local runs and a gateway that is down.


def test_kubetune_run_pushgateway_flag_pushes_a_local_run(tiny: dict[str, Path], tmp_path: Path, pushgateway: Any,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`kubetune run FILE --pushgateway URL` pushes the local run's group, outcome included."""
    from kubetune_cli.commands import main

    name = f"local-{secrets.token_hex(3)}"
    job = manifest(tiny, tmp_path, name, maxSteps=10)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code = main(
        ["run", str(tmp_path / "job.yaml"), "--workdir", str(tmp_path / "runs"), "--pushgateway", pushgateway.url]
    )
    lines = group_lines(pushgateway.metrics_text(), name)
    assert code == 0
    assert any(ln.startswith("kubetune_job_outcome{") and 'phase="Succeeded"' in ln for ln in lines)
    assert any(ln.startswith("kubetune_train_global_step{") and ln.endswith(" 10") for ln in lines)
    assert all('namespace="default"' in ln for ln in lines)
    delete_group(pushgateway.url, "default", name)


@pytest.fixture
def blackhole() -> Iterator[str]:
    """The URL of a TCP listener that accepts connections and never answers."""
    with gateway_blackhole() as url:
        yield url


def test_blackholed_gateway_neither_fails_nor_stops_training(tiny: dict[str, Path], tmp_path: Path,
                                                             blackhole: str) -> None:  # fmt: skip
    """Training against a gateway that never answers succeeds, and the summary counts the failed pushes."""
    from kubetune_api.settings import JobSettings
    from kubetune_api.spec import parse_manifest
    from kubetune_job.orchestrate import execute

    job = parse_manifest(manifest(tiny, tmp_path, "blackholed", maxSteps=30), "test")
    settings = JobSettings(
        name="blackholed", namespace=NAMESPACE, work_dir=tmp_path / "scratch", summary_path=tmp_path / "summary.json",
        pushgateway_url=blackhole, push_interval_seconds=0.2, push_timeout_seconds=0.5,
    )  # fmt: skip
    code = execute(settings, spec=job.spec, console_logs=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 0 and summary["finalStep"] == 30 and summary["metricsPushFailures"] >= 1


# Alerting rules: promtool's checks and unit tests.


def test_alert_rules_pass_promtool_check_rules() -> None:
    """`promtool check rules` accepts the chart's rules file."""
    done = subprocess.run([str(promtool()), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """`promtool test rules` passes every alert's firing and quiet cases."""
    done = subprocess.run([str(promtool()), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
