"""Training metrics: the Pushgateway group and catalog, pushing against real local HTTP servers, the
callback's values, and the dashboards' and alerts' structure."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from kubetune_api.metrics import BY_NAME, CATALOG, GATEWAY_METRICS
from kubetune_api.spec import EVAL_METRICS
from kubetune_job.pushgateway import delete_group, group_url
from tests.blackhole import blackhole as gateway_blackhole

ROOT = Path(__file__).parents[2]
DASHBOARDS = sorted((ROOT / "charts" / "kubetune" / "dashboards").glob("*.json"))
RULES = ROOT / "charts" / "kubetune" / "alerts" / "kubetune.rules.yaml"
RULE_TESTS = ROOT / "tests" / "alerts" / "kubetune.rules.test.yaml"


# A real HTTP server that records what it receives (the client_python way: no mocks of the gateway).


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.arrived = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)
        return list(self.requests)


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        with self.server.arrived:
            self.server.requests.append(
                {"method": self.command, "path": self.path, "type": self.headers.get("Content-Type"), "body": body}
            )
            self.server.arrived.notify_all()
        self.send_response(202 if self.command == "DELETE" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_DELETE = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def blackhole() -> Iterator[str]:
    """The URL of a TCP listener that accepts connections and never answers."""
    with gateway_blackhole() as url:
        yield url


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def job_metrics(url: str, **kw: Any) -> Any:
    from kubetune_job.prometheus import JobMetrics

    return JobMetrics(url, namespace="ml", finetunejob="bert", **{"interval": 60.0, "timeout": 1.0, **kw})


def series(metrics: Any, name: str) -> dict[tuple[str, ...], float]:
    return dict(metrics.snapshot().get(name, {}))


def value(metrics: Any, name: str, labels: tuple[str, ...] = ()) -> float | None:
    return series(metrics, name).get(labels)


# The group and the catalog.


def test_group_url_names_job_namespace_and_finetunejob() -> None:
    """The group URL is /metrics/job/kubetune/ then the grouping key, finetunejob/<name>/namespace/<ns> (sorted)."""
    url = group_url("http://gw:9091/", "ml", "bert-mrpc")
    assert url == "http://gw:9091/metrics/job/kubetune/finetunejob/bert-mrpc/namespace/ml"


def test_group_url_accepts_host_and_port_without_scheme() -> None:
    """A gateway given as host:port is reached over http."""
    assert group_url("gw:9091", "ml", "a").startswith("http://gw:9091/metrics/job/kubetune/")


def test_group_url_base64_encodes_values_a_path_cannot_hold() -> None:
    """A value with a slash, or an empty one, goes base64url-encoded as the gateway expects."""
    url = group_url("http://gw", "a/b", "")
    assert url.endswith("/finetunejob@base64/=/namespace@base64/YS9i")


def test_pushgateway_module_imports_nothing_heavy() -> None:
    """The operator can import kubetune_job.pushgateway without prometheus_client, torch or transformers."""
    code = (
        "import sys, kubetune_job.pushgateway; "
        "print(sorted(m for m in ('prometheus_client', 'torch', 'transformers', 'pydantic') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_catalog_names_follow_prometheus_conventions() -> None:
    """Names are kubetune_ snake case; counters end in _total and only they do; units are base units."""
    for m in CATALOG:
        assert re.fullmatch(r"kubetune_[a-z0-9_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert not re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|gb|percent)(_|$)", m.name), m.name
        assert m.help and m.help.endswith("."), m.name
    assert len(BY_NAME) == len(CATALOG)


def test_docs_table_lists_exactly_the_catalog() -> None:
    """docs/metrics.md has one table row per catalog metric, with its type and labels."""
    rows = re.findall(r"^\| `(kubetune_\w+)` \| (\w+) \|([^|]*)\|", (ROOT / "docs" / "metrics.md").read_text(), re.M)
    documented = {name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}
    assert documented == {m.name: (m.kind, m.labels) for m in CATALOG}


# Pushing, against real local servers.


def test_start_puts_the_group_in_text_format(gateway: Recorder) -> None:
    """start() PUTs the group at once: start time and running, in the 0.0.4 text format."""
    metrics = job_metrics(gateway.url).start()
    first = gateway.wait_for(1)[0]
    metrics.finish({"phase": "Succeeded"})
    assert first["method"] == "PUT" and first["path"] == "/metrics/job/kubetune/finetunejob/bert/namespace/ml"
    assert first["type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "kubetune_job_running 1.0" in first["body"] and "kubetune_job_start_time_seconds " in first["body"]


def test_pushed_series_carry_no_pod_or_attempt_label(gateway: Recorder) -> None:
    """Series hold only catalog labels; the group supplies namespace and finetunejob."""
    metrics = job_metrics(gateway.url).start()
    metrics.finish({"phase": "Failed", "exitCode": 1, "reason": "Error"})
    labels = set(re.findall(r"[{,](\w+)=", "".join(r["body"] for r in gateway.requests)))
    assert labels <= {"phase", "reason", "retryable"}


def test_finish_pushes_the_outcome_and_stops(gateway: Recorder) -> None:
    """finish() pushes running 0 and the outcome with reason and retryability, then the thread ends."""
    metrics = job_metrics(gateway.url).start()
    failures = metrics.finish({"phase": "Failed", "exitCode": 12, "reason": "DataError"})
    last = gateway.requests[-1]["body"]
    assert failures == 0 and not metrics._thread.is_alive()
    assert 'kubetune_job_outcome{phase="Failed",reason="DataError",retryable="false"} 1.0' in last
    assert "kubetune_job_running 0.0" in last


def test_retryable_failure_is_marked_retryable(gateway: Recorder) -> None:
    """An exit code Kubernetes retries gives retryable="true"."""
    metrics = job_metrics(gateway.url).start()
    metrics.finish({"phase": "Failed", "exitCode": 20, "reason": "StorageUnavailable"})
    assert 'reason="StorageUnavailable",retryable="true"' in gateway.requests[-1]["body"]


def test_pushes_come_every_interval(gateway: Recorder) -> None:
    """Without events, the thread pushes once per interval."""
    metrics = job_metrics(gateway.url, interval=0.3).start()
    time.sleep(1.05)
    count = len(gateway.requests)
    metrics.finish({"phase": "Succeeded"})
    assert 3 <= count <= 5  # the start push, then one every 0.3 s


def test_requested_pushes_are_coalesced_to_one_a_second(gateway: Recorder) -> None:
    """Many evaluation/checkpoint push requests within a second cause at most two pushes."""
    metrics = job_metrics(gateway.url).start()
    for _ in range(50):
        metrics.push_soon()
        time.sleep(0.01)
    count = len(gateway.requests)
    metrics.finish({"phase": "Succeeded"})
    assert 1 <= count <= 2


def test_blackholed_gateway_never_blocks_the_training_thread(blackhole: str) -> None:
    """With a gateway that never answers, callback hooks stay instant and finish() is bounded."""
    metrics = job_metrics(blackhole, interval=0.05, timeout=0.5).start()
    callback = metrics.callback()
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, epoch=0.0, num_input_tokens_seen=0)
    began = time.monotonic()
    for step in range(2000):
        state.global_step = step
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 0.5, "learning_rate": 1e-4})
        callback.on_save(None, state, None)
    hooks = time.monotonic() - began
    began = time.monotonic()
    failures = metrics.finish({"phase": "Succeeded"})
    assert hooks < 0.5, f"2000 steps of hooks took {hooks:.2f} s"
    assert time.monotonic() - began < 2 * 0.5 + 1.5
    assert failures >= 1


def test_refused_pushes_are_counted_and_logged_once_per_minute(caplog: pytest.LogCaptureFixture) -> None:
    """A gateway refusing connections: every failure counts, one warning is logged for the lot."""
    metrics = job_metrics(closed_port_url(), interval=0.05, timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="kubetune_job.prometheus"):
        metrics.start()
        time.sleep(0.6)
        failures = metrics.finish({"phase": "Succeeded"})
    assert failures >= 3
    assert len([r for r in caplog.records if "cannot push metrics" in r.getMessage()]) == 1


def test_failure_count_arrives_with_the_next_successful_push(gateway: Recorder) -> None:
    """kubetune_push_failures_total reports the failures once the gateway answers again."""
    metrics = job_metrics(closed_port_url())
    assert not metrics.push() and not metrics.push()
    metrics.url = gateway.url
    assert metrics.push()
    assert "kubetune_push_failures_total 2.0" in gateway.requests[-1]["body"]


def test_malformed_gateway_url_counts_as_a_failed_push() -> None:
    """A gateway URL that cannot be requested is a counted failure, never an exception."""
    metrics = job_metrics("http://[not a host")
    assert metrics.push() is False and metrics.failures == 1


def test_delete_group_sends_delete_to_the_group(gateway: Recorder) -> None:
    """delete_group DELETEs the FineTuneJob's group URL."""
    delete_group(gateway.url, "ml", "bert")
    assert gateway.requests[-1]["method"] == "DELETE"
    assert gateway.requests[-1]["path"] == "/metrics/job/kubetune/finetunejob/bert/namespace/ml"


def test_unknown_metric_name_is_rejected() -> None:
    """Setting a name that is not in the catalog raises (typos never reach the gateway)."""
    with pytest.raises(ValueError, match="catalog"):
        job_metrics("http://gw").set("kubetune_trian_loss", 1.0)


def test_no_gateway_means_no_metrics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without pushgateway_url the job starts no metrics (local runs without --pushgateway push nothing)."""
    from kubetune_api.settings import JobSettings
    from kubetune_job.prometheus import start

    monkeypatch.delenv("KUBETUNE_PUSHGATEWAY_URL", raising=False)
    assert start(JobSettings(work_dir=tmp_path)) is None


def test_only_the_main_process_pushes(monkeypatch: pytest.MonkeyPatch, gateway: Recorder) -> None:
    """A torchrun worker other than rank 0 starts no metrics."""
    from kubetune_api.settings import JobSettings
    from kubetune_job.prometheus import start

    monkeypatch.setenv("RANK", "1")
    assert start(JobSettings(pushgateway_url=gateway.url)) is None


def test_push_interval_and_timeout_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """KUBETUNE_PUSH_INTERVAL_SECONDS and KUBETUNE_PUSH_TIMEOUT_SECONDS configure pushing."""
    from kubetune_api.settings import JobSettings

    monkeypatch.setenv("KUBETUNE_PUSH_INTERVAL_SECONDS", "5")
    monkeypatch.setenv("KUBETUNE_PUSH_TIMEOUT_SECONDS", "1.5")
    settings = JobSettings()
    assert (settings.push_interval_seconds, settings.push_timeout_seconds) == (5.0, 1.5)


# The callback's values (hooks called as the Trainer calls them).


def state(**kw: Any) -> SimpleNamespace:
    base = {"is_world_process_zero": True, "global_step": 0, "epoch": 0.0, "num_input_tokens_seen": 0, "max_steps": 100}
    return SimpleNamespace(**{**base, **kw})


def args(**kw: Any) -> SimpleNamespace:
    base = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "world_size": 1, "device": None}
    return SimpleNamespace(**{**base, **kw})


def test_logs_set_loss_learning_rate_and_grad_norm() -> None:
    """The Trainer's logged loss, learning rate and grad norm become the train gauges."""
    metrics = job_metrics("http://gw")
    metrics.callback().on_log(args(), state(), None, logs={"loss": 0.42, "learning_rate": 2e-5, "grad_norm": 1.5})
    assert value(metrics, "kubetune_train_loss") == 0.42
    assert value(metrics, "kubetune_train_learning_rate") == 2e-5
    assert value(metrics, "kubetune_train_grad_norm") == 1.5


def test_evaluation_gives_one_series_per_score_and_the_eval_loss() -> None:
    """Each score is kubetune_eval_metric{metric=...}; eval loss and step have their own gauges."""
    metrics = job_metrics("http://gw")
    scores = {"eval_loss": 0.3, "eval_accuracy": 0.8, "eval_f1": 0.7, "eval_runtime": 2.0, "epoch": 1.0}
    metrics.callback().on_evaluate(args(), state(global_step=40), None, metrics=scores)
    assert series(metrics, "kubetune_eval_metric") == {("accuracy",): 0.8, ("f1",): 0.7}
    assert value(metrics, "kubetune_eval_loss") == 0.3 and value(metrics, "kubetune_eval_step") == 40


def test_throughput_and_eta_come_from_step_times() -> None:
    """Samples/s, tokens/s and time left follow the step rate between two samples."""
    metrics = job_metrics("http://gw")
    callback = metrics.callback()
    callback.on_train_begin(args(), state(max_steps=100), None)
    callback.tokens_per_sample = 20.0
    callback.progress = (10, 0.1, 0, 1000.0)
    callback.sample()
    callback.progress = (30, 0.3, 0, 1010.0)  # 20 steps in 10 s, 16 samples a step
    callback.sample()
    assert value(metrics, "kubetune_train_samples_per_second") == pytest.approx(32.0)
    assert value(metrics, "kubetune_train_tokens_per_second") == pytest.approx(640.0)
    assert value(metrics, "kubetune_train_eta_seconds") == pytest.approx(35.0)
    assert value(metrics, "kubetune_train_global_step") == 30 and value(metrics, "kubetune_train_total_steps") == 100


def test_a_run_shorter_than_the_sampling_window_still_reports_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    """No two samples a window apart (a short run on a fast machine): train end sets the whole run's rate."""
    import kubetune_job.prometheus as prometheus

    metrics = job_metrics("http://gw")
    callback = metrics.callback()
    clock = iter([1000.0, 1004.0])
    monkeypatch.setattr(prometheus.time, "time", lambda: next(clock))
    callback.on_train_begin(args(), state(max_steps=100), None)
    callback.on_train_end(args(), state(global_step=100, epoch=2.0), None)  # 100 steps of 16 samples in 4 s
    assert value(metrics, "kubetune_train_samples_per_second") == pytest.approx(400.0)
    assert value(metrics, "kubetune_train_eta_seconds") == 0


def test_counted_tokens_win_over_the_estimate() -> None:
    """With the Trainer counting input tokens, tokens/s uses the count."""
    metrics = job_metrics("http://gw")
    callback = metrics.callback()
    callback.on_train_begin(args(), state(), None)
    callback.tokens_per_sample = 20.0
    callback.progress = (0, 0.0, 0, 1000.0)
    callback.sample()
    callback.progress = (10, 0.1, 5000, 1010.0)
    callback.sample()
    assert value(metrics, "kubetune_train_tokens_per_second") == pytest.approx(500.0)


def test_mean_tokens_reads_the_tokenized_split() -> None:
    """The mean tokens per example comes from the dataset's input_ids lengths."""
    from datasets import Dataset

    from kubetune_job.prometheus import mean_tokens

    loader = SimpleNamespace(dataset=Dataset.from_dict({"input_ids": [[1, 2], [1, 2, 3, 4]], "labels": [0, 1]}))
    assert mean_tokens(loader) == 3.0 and mean_tokens(None) is None


def test_checkpoint_values_come_from_the_committer() -> None:
    """Step, time, upload seconds and bytes, and the upload wait are read from the commit callback."""
    metrics = job_metrics("http://gw")
    commit = SimpleNamespace(
        last_committed=40, last_committed_time=1234.5, last_upload_seconds=2.5, last_upload_bytes=1000,
        upload_wait_seconds=0.25,
    )  # fmt: skip
    metrics.callback(commit).sample()
    assert value(metrics, "kubetune_checkpoint_step") == 40
    assert value(metrics, "kubetune_checkpoint_timestamp_seconds") == 1234.5
    assert value(metrics, "kubetune_checkpoint_upload_seconds") == 2.5
    assert value(metrics, "kubetune_checkpoint_upload_bytes") == 1000
    assert value(metrics, "kubetune_checkpoint_upload_wait_seconds_total") == 0.25


def test_committer_without_timestamps_gets_the_time_it_was_seen() -> None:
    """A commit callback that only knows its step still yields a commit time, fixed per step."""
    metrics = job_metrics("http://gw")
    commit = SimpleNamespace(last_committed=20)
    callback = metrics.callback(commit)
    callback.sample()
    first = value(metrics, "kubetune_checkpoint_timestamp_seconds")
    callback.sample()
    assert first is not None and abs(first - time.time()) < 5
    assert value(metrics, "kubetune_checkpoint_timestamp_seconds") == first


def fake_cuda(*, utilization: bool = True) -> SimpleNamespace:
    def use(i: int) -> int:
        if not utilization:
            raise ModuleNotFoundError("pynvml does not seem to be installed")
        return 50 + i

    return SimpleNamespace(
        memory_allocated=lambda i: 1 << 30, memory_reserved=lambda i: 2 << 30, device_count=lambda: 2, utilization=use
    )


def test_gpu_memory_and_utilization_on_a_cuda_device() -> None:
    """On cuda:1, memory gauges carry gpu="1" and utilization covers every GPU as a ratio."""
    from kubetune_job.prometheus import TrainingMetrics

    metrics = job_metrics("http://gw")
    callback = TrainingMetrics(metrics, cuda=fake_cuda())
    callback.on_train_begin(args(device=SimpleNamespace(type="cuda", index=1)), state(), None)
    callback.sample()
    assert series(metrics, "kubetune_gpu_memory_allocated_bytes") == {("1",): 1 << 30}
    assert series(metrics, "kubetune_gpu_memory_reserved_bytes") == {("1",): 2 << 30}
    assert series(metrics, "kubetune_gpu_utilization_ratio") == {("0",): 0.5, ("1",): 0.51}


def test_missing_nvml_drops_only_utilization() -> None:
    """Without NVML the memory gauges stay and utilization is left out."""
    from kubetune_job.prometheus import TrainingMetrics

    metrics = job_metrics("http://gw")
    callback = TrainingMetrics(metrics, cuda=fake_cuda(utilization=False))
    callback.on_train_begin(args(device=SimpleNamespace(type="cuda", index=0)), state(), None)
    callback.sample()
    assert series(metrics, "kubetune_gpu_memory_allocated_bytes") and not series(
        metrics, "kubetune_gpu_utilization_ratio"
    )


def test_cpu_training_pushes_no_gpu_metrics() -> None:
    """On CPU no kubetune_gpu_* series exist."""
    metrics = job_metrics("http://gw")
    callback = metrics.callback()
    callback.on_train_begin(args(device=SimpleNamespace(type="cpu", index=None)), state(), None)
    callback.sample()
    assert not [name for name in metrics.snapshot() if name.startswith("kubetune_gpu_")]


# Dashboards and alerts: structure.


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_the_chart_ships_both_dashboards() -> None:
    """The chart has the Fine-tuning job and the Overview dashboards."""
    assert {load(p)["title"] for p in DASHBOARDS} == {"kubetune / Fine-tuning job", "kubetune / Overview"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panel_ids_are_unique(path: Path) -> None:
    """Every panel (rows and their children included) has its own id."""
    ids = [p["id"] for p in panels(load(path))]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_has_a_prometheus_datasource_variable(path: Path) -> None:
    """The first variable picks the Prometheus data source."""
    first = load(path)["templating"]["list"][0]
    assert (first["name"], first["type"], first["query"]) == ("datasource", "datasource", "prometheus")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_hard_codes_no_datasource_uid(path: Path) -> None:
    """Every data source reference is the ${datasource} variable, never a fixed uid."""
    refs = [
        node["datasource"] for node in walk(load(path)) if "datasource" in node and node.get("type") != "datasource"
    ]
    assert refs and all(ref == {"type": "prometheus", "uid": "${datasource}"} for ref in refs)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_use_only_pushed_metrics(path: Path) -> None:
    """Every metric name in a query is in the catalog or added by the gateway."""
    names = {n for e in exprs(load(path)) for n in re.findall(r"\b(kubetune_\w+|push_\w+)", e)}
    assert names and names <= set(BY_NAME) | set(GATEWAY_METRICS)


def test_job_dashboard_shows_every_metric() -> None:
    """Each catalog metric appears in some panel of the Fine-tuning job dashboard."""
    text = " ".join(exprs(load(ROOT / "charts/kubetune/dashboards/kubetune-job.json")))
    assert [m.name for m in CATALOG if not re.search(rf"\b{m.name}\b", text)] == []


#: Evaluation metrics that are not fractions (perplexity runs from 1 up; rewards and their margin are log-ratios
#: times beta, of either sign): never shown in percent.
UNBOUNDED = ("perplexity", "reward_margin", "chosen_reward", "rejected_reward")


def shown_metrics(expr: str) -> set[str]:
    """The evaluation metrics a query of kubetune_eval_metric shows, by its metric="..." or metric!="..."."""
    if "kubetune_eval_metric" not in expr:
        return set()
    shown = set(EVAL_METRICS)
    for op, name in re.findall(r'\bmetric\s*(!?=)\s*"(\w+)"', expr):
        shown = shown & {name} if op == "=" else shown - {name}
    return shown


def test_job_dashboard_shows_every_tasks_scores_each_in_a_fitting_unit() -> None:
    """Every task's evaluation metrics (accuracy... for classifiers, perplexity and exact_match for causal LMs, the
    rewards for preference) show in some graph of the job dashboard; those that are no fraction never in a percent
    panel."""
    graphs = [
        p for p in panels(load(ROOT / "charts/kubetune/dashboards/kubetune-job.json")) if p["type"] == "timeseries"
    ]
    seen: set[str] = set()
    for panel in graphs:
        shown = {m for t in panel.get("targets", []) for m in shown_metrics(t["expr"])}
        if panel["fieldConfig"]["defaults"].get("unit") == "percentunit":
            assert not shown & set(UNBOUNDED), panel["title"]
        seen |= shown
    assert seen == set(EVAL_METRICS)
    assert shown_metrics('kubetune_eval_metric{metric!="perplexity"}') == set(EVAL_METRICS) - {"perplexity"}


def test_job_dashboard_selects_one_job_in_every_query() -> None:
    """Each metric selector of the job dashboard filters on $namespace and $finetunejob."""
    for expr in exprs(load(ROOT / "charts/kubetune/dashboards/kubetune-job.json")):
        for selector in re.findall(r"\b(?:kubetune_\w+|push_time_seconds)(\{[^}]*\})?", expr):
            assert 'namespace="$namespace"' in selector and 'finetunejob="$finetunejob"' in selector, expr


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    """tests/alerts/ expects each alert of the rules file both to fire and to stay quiet somewhere."""
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts and fired == alerts and quiet == alerts
