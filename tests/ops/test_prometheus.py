"""The alert rules and the dashboard against real Prometheus tools: promtool for the rule files and their
unit tests, and a real Prometheus scraping the running guard for every dashboard and alert expression."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.ops._prometheus import JOB
from tests.ops._queries import Query, dashboard_queries, metric_names, rule_queries, unknown_metrics
from tests.ops.conftest import Ops
from tests.ops.paths import DASHBOARD, REPO, RULE_TESTS, RULES

NO_PROMETHEUS = "Debian's prometheus package is not installed (apt-get install prometheus; .ci/run does)"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(NO_PROMETHEUS)
    return path


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=300, check=False)


def alerts_in(path: Path) -> list[str]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r]


class TestRuleFiles:
    def test_promtool_check_rules(self) -> None:
        """promtool accepts the rule file (syntax, PromQL, templates)."""
        proc = run(promtool(), "check", "rules", str(RULES))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"SUCCESS: {len(rule_queries(RULES))} rules found" in proc.stdout

    def test_promtool_unit_tests_pass(self) -> None:
        """promtool test rules passes the unit tests in deploy/prometheus/."""
        proc = run(promtool(), "test", "rules", str(RULE_TESTS))
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def test_every_alert_has_a_firing_and_a_quiet_case(self) -> None:
        """Each alert is expected to fire in some unit test and expected silent at some evaluation time."""
        tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
        cases = [case for t in tests for case in t.get("alert_rule_test", ())]
        for alert in alerts_in(RULES):
            mine = [c for c in cases if c["alertname"] == alert]
            assert any(c["exp_alerts"] for c in mine), f"{alert}: no unit test expects it to fire"
            assert any(not c["exp_alerts"] for c in mine), f"{alert}: no unit test expects it to stay silent"

    def test_unit_tests_catch_a_changed_threshold(self, tmp_path: Path) -> None:
        """The unit tests can fail: with the upstream-error threshold raised from 5% to 50%, promtool reports
        the alert that no longer fires."""
        rules = tmp_path / "inference-guard.rules.yaml"
        text = RULES.read_text()
        assert "/ sum by (namespace, pod, instance, job) (rate(inference_guard_requests_total[5m])) > 0.05" in text
        rules.write_text(text.replace("(rate(inference_guard_requests_total[5m])) > 0.05",
                                      "(rate(inference_guard_requests_total[5m])) > 0.5"))
        (tmp_path / "tests.yaml").write_text(RULE_TESTS.read_text())
        proc = run(promtool(), "test", "rules", str(tmp_path / "tests.yaml"))
        assert proc.returncode != 0
        assert "alertname: InferenceGuardUpstreamErrors" in proc.stdout + proc.stderr

    def test_deploy_files_are_the_charts(self) -> None:
        """deploy/ links the chart's files (one source for the plain files and the chart's objects)."""
        assert (REPO / "deploy" / "prometheus" / "inference-guard.rules.yaml").resolve() == RULES.resolve()
        assert (REPO / "deploy" / "grafana" / "inference-guard.json").resolve() == DASHBOARD.resolve()


class TestNameCheck:
    def test_a_misspelt_metric_is_reported_with_where_it_is_used(self) -> None:
        """The exported-name check names the unknown metric and the panel using it."""
        queries = [Query("panel X", "sum(rate(inference_guard_request_total[5m]))")]
        assert unknown_metrics(queries, {"inference_guard_requests_total"}) == {
            "inference_guard_request_total": ["panel X"]}


_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "info": ("_info",), "summary": ("_sum", "_count", "_created")}


def exported_names(ops: Ops) -> set[str]:
    """Series names the guard's /metrics declares (fetched over HTTP): its samples, and the names of metric
    families declared without a series yet (a labelled counter before its first event)."""
    with urllib.request.urlopen(f"{ops.guard.admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    families = list(text_string_to_metric_families(text))
    names = {s.name for family in families for s in family.samples}
    names |= {family.name + suffix for family in families for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def prom(ops: Ops) -> Any:
    """The test's Prometheus once it has scraped the guard after the traffic and evaluated every rule."""
    if ops.prometheus is None:
        pytest.skip(NO_PROMETHEUS)
    prom = ops.prometheus
    prom.wait_for(f'up{{job="{JOB}"}} == 1')
    # counters scraped after the traffic ended, and every rule group evaluated since
    prom.wait_for(f'timestamp(inference_guard_requests_total{{job="{JOB}"}}) > {ops.ended + 1}', timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        groups = prom.api("rules")["data"]["groups"]
        if groups and all(not r["lastEvaluation"].startswith("0001") for g in groups for r in g["rules"]):
            break
        time.sleep(0.5)
    return prom


@pytest.mark.slow
class TestLivePrometheus:
    def test_every_metric_the_dashboard_and_rules_read_is_exported(self, ops: Ops) -> None:
        """Each inference_guard_* name in a panel, variable or rule is on the running guard's /metrics."""
        queries = dashboard_queries(DASHBOARD) + rule_queries(RULES)
        assert len(metric_names(queries)) >= 20
        assert unknown_metrics(queries, exported_names(ops)) == {}

    def test_every_dashboard_query_evaluates(self, prom: Any) -> None:
        """Every panel and variable query runs without error, and the panels of what happened have data."""
        failures, empty = [], []
        for q in dashboard_queries(DASHBOARD):
            answer = prom.query(q.expr)
            if answer.get("status") != "success":
                failures.append(f"{q.where}: {q.expr}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                empty.append(f"{q.where}: {q.legend}")
        assert failures == []
        # nothing failed upstream and Redis never fell back: those series do not exist (yet)
        quiet = {"panel Scoring failures and budget overruns: upstream {{kind}}",
                 "panel Session store: fallback {{reason}}"}
        assert set(empty) <= quiet, f"no data for {sorted(set(empty) - quiet)}"

    def test_dashboard_shows_the_attack(self, prom: Any, ops: Ops) -> None:
        """Over the traffic window the rule panel shows blocks by the policy's block rules, and the pod filter
        matters."""
        window = "5m"
        blocks = prom.query(f'sum by (rule) (increase(inference_guard_decisions_total{{namespace="models", '
                            f'pod="digits-0", action="block"}}[{window}]))')["data"]["result"]
        block_rules = {r.id for r in ops.guard.state.policies.current.default.rules if r.action == "block"}
        assert blocks and {r["metric"]["rule"] for r in blocks} <= block_rules
        other_pod = prom.query('sum(inference_guard_requests_total{namespace="models", pod="elsewhere"})')
        assert other_pod["data"]["result"] == []

    def test_every_rule_expression_evaluates_and_every_rule_is_healthy(self, prom: Any) -> None:
        """Each alert and recording expression runs through the query API, and Prometheus reports every loaded
        rule healthy (no evaluation error)."""
        for q in rule_queries(RULES):
            answer = prom.query(q.expr)
            assert answer.get("status") == "success", f"{q.where}: {answer.get('error')}"
        rules = [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]
        assert len(rules) == len(rule_queries(RULES))
        assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    def test_no_alert_fires_on_a_healthy_guard(self, prom: Any) -> None:
        """A guard that blocked an attack but is otherwise healthy raises no alert (the attack alone is too
        short and too new for the baseline alert)."""
        firing = [a for a in prom.api("alerts")["data"]["alerts"] if a["state"] == "firing"]
        assert firing == []

    def test_a_rejected_reload_fires_its_alert(self, prom: Any, ops: Ops) -> None:
        """A broken policy pushed to the running guard (POST /admin/reload answers 422; the last good policy stays)
        fires InferenceGuardReloadRejected in the real Prometheus within seconds, naming the pod. (Runs after the
        healthy-guard check; the good policy is put back.)"""
        good = ops.guard.policy.read_text()
        try:
            ops.guard.policy.write_text("version: 1\nrules:\n  - id: x\n    action: explode\n")
            req = urllib.request.Request(f"{ops.guard.admin}/admin/reload", method="POST",
                                         headers={"Authorization": f"Bearer {ops.guard.state.settings.admin_token}"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=10)
            assert refused.value.code == 422
        finally:
            ops.guard.policy.write_text(good)
        firing = prom.wait_for('ALERTS{alertname="InferenceGuardReloadRejected", alertstate="firing"}', timeout=60)
        assert firing[0]["metric"]["pod"] == "digits-0" and firing[0]["metric"]["namespace"] == "models"

    def test_queries_plot(self, prom: Any, ops: Ops, tmp_path: Path) -> None:
        """The dashboard's main queries over the test's traffic plot to a PNG (the README's picture;
        OPS_DASHBOARD_PNG=path writes it there)."""
        from tests.ops._plot import plot_dashboard

        out = Path(os.environ.get("OPS_DASHBOARD_PNG") or tmp_path / "dashboard.png")
        plot_dashboard(prom, DASHBOARD, out, start=ops.started - 5, end=time.time())
        assert out.stat().st_size > 10_000
        assert re.match(rb"\x89PNG", out.read_bytes()[:4])
