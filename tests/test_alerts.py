"""The alert rules (promtool check + unit tests) and the Grafana dashboard (parses, uses only exposed metrics)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

FILES = Path(__file__).resolve().parents[1] / "charts" / "sftops" / "files"
ALERTS = FILES / "alerts.yaml"
ALERTS_TEST = FILES / "alerts_test.yaml"
DASHBOARD = FILES / "dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# What service/metrics.py exposes (the brief's metric contract); the histogram adds _bucket/_sum/_count.
PER_JOB_METRICS = {
    "sftops_job_train_loss", "sftops_job_eval_loss", "sftops_job_train_loss_slope", "sftops_job_eval_loss_slope",
    "sftops_job_train_loss_relative_slope", "sftops_job_eval_loss_relative_slope", "sftops_job_loss_gap",
    "sftops_job_health", "sftops_job_step", "sftops_job_total_steps", "sftops_job_tokens_per_second",
    "sftops_job_grad_norm", "sftops_job_last_report_timestamp_seconds", "sftops_job_status",
    "sftops_job_train_loss_nonfinite", "sftops_job_target_band_low", "sftops_job_target_band_high",
}
FLEET_METRICS = {
    "sftops_jobs", "sftops_http_requests_total",
    *(f"sftops_http_request_duration_seconds{s}" for s in ("_bucket", "_sum", "_count")),
}
EXPOSED = PER_JOB_METRICS | FLEET_METRICS
PROMETHEUS_BUILTIN = {"ALERTS"}  # Prometheus' own series of active alerts
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "le", "inf", "nan"}


def promtool(*args: str, cwd: Path = FILES) -> subprocess.CompletedProcess:
    """Run promtool (installed by `make system-deps`)."""
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is not installed: run `make system-deps` (Debian package prometheus)")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (strings, label matchers, groupings, ranges removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery selectors, $__rate_interval included
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # dashboard variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue  # a function call, an operator keyword or a duration
        names.add(name)
    return names


def alert_rules() -> list[dict]:
    """Every rule of alerts.yaml."""
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules():
    """The rules file is valid Prometheus configuration."""
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    """Each alert fires on its unhealthy series and not on healthy ones (alerts_test.yaml)."""
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests bite: a rule that ignores job status fires on finished jobs and fails them."""
    broken = ALERTS.read_text().replace(
        'and on (job_id) (max by (job_id) (sftops_job_status{status="running"}) == 1)', "")
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yaml").write_text(broken)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yaml")
    result = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "finished-bad" in result.stdout + result.stderr or "finished-quietly" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    """Each alert has a test where it fires and the healthy group expects it silent; each is labelled and named."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    healthy = next(t for t in tests if t["name"] == "healthy running job fires nothing")
    quiet = {c["alertname"] for c in healthy["alert_rule_test"] if not c["exp_alerts"]}
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {"SftopsTrainLossRising", "SftopsOverfitting", "SftopsLossNotDecreasing",
                     "SftopsLossPlateauAboveBand", "SftopsNonFiniteLoss", "SftopsJobStalled", "SftopsJobFailed"}
    assert fired == names and quiet == names
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        for key in ("summary", "description"):
            text = rule["annotations"][key]
            assert "{{ $labels.job_name }}" in text and "{{ $labels.job_id }}" in text, (rule["alert"], key)
        assert metric_names(rule["expr"]) <= EXPOSED, rule["alert"]


def test_plateau_alert_uses_the_jobs_own_band():
    """The plateau rule compares against sftops_job_target_band_high, not a constant."""
    rule = next(r for r in alert_rules() if r["alert"] == "SftopsLossPlateauAboveBand")
    assert "sftops_job_target_band_high" in metric_names(rule["expr"])


def test_metric_name_extraction():
    """The PromQL scanner finds selected series and skips functions, keywords, labels and variables."""
    assert metric_names('histogram_quantile(0.95, sum by (le, endpoint) (rate(x_bucket{a="b"}[$__rate_interval])))') == {"x_bucket"}
    assert metric_names("time() - max by (job_id) (a offset 1h) > on (job_id) b and bool c") == {"a", "b", "c"}
    assert metric_names('max by (job_id) (sftops_job_step{job_id=~"$job_id"}) / sftops_job_total_steps') == {
        "sftops_job_step", "sftops_job_total_steps"}


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets (rows included) and templating queries."""
    panels = list(dashboard["panels"])
    for panel in list(panels):
        panels += panel.get("panels", [])
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(re.fullmatch(r"label_values\((.*),\s*\w+\)", query).group(1))
    return exprs


def test_dashboard_parses_and_uses_only_exposed_metrics():
    """dashboard.json is Grafana JSON whose queries select only metrics the plane exposes."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 15
    used = set().union(*(metric_names(e) for e in exprs))
    assert used <= EXPOSED | PROMETHEUS_BUILTIN, used - EXPOSED - PROMETHEUS_BUILTIN
    # the dashboard shows what it promises: curves, slopes, gap, verdict, progress, throughput
    for metric in ("sftops_job_train_loss", "sftops_job_eval_loss", "sftops_job_train_loss_slope",
                   "sftops_job_loss_gap", "sftops_job_health", "sftops_job_step", "sftops_job_total_steps",
                   "sftops_job_tokens_per_second"):
        assert metric in used, metric
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_job_variable_filters_every_per_job_panel():
    """A `job` variable lists job names (label_values of sftops_job_step) and every per-job query filters by it."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["query"]["query"] == "label_values(sftops_job_step, job_name)"
    assert "$job" in variables["job_id"]["query"]["query"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if metric_names(target["expr"]) & PER_JOB_METRICS:
                assert '$job_id"' in target["expr"], (panel["title"], target["expr"])
