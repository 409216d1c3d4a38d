"""End to end: jobs report loss curves to a real gunicorn plane, a real Prometheus scrapes it and evaluates
alerts.yaml, and the unhealthy jobs' alerts fire while the healthy job's do not."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
import yaml

from tests.plugins.plane import auth, free_port
from tests.test_alerts import ALERTS, DASHBOARD, dashboard_exprs

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
WAIT_S = 60


def fast_rules(path: Path) -> Path:
    """alerts.yaml with every `for:` shortened to 2s (nothing else changed), so alerts fire within seconds."""
    original = ALERTS.read_text()
    fast, count = re.subn(r"^(\s+)for: \S+$", r"\1for: 2s", original, flags=re.M)
    assert count >= 5
    before, after = yaml.safe_load(original), yaml.safe_load(fast)
    for group_a, group_b in zip(before["groups"], after["groups"]):
        for a, b in zip(group_a["rules"], group_b["rules"]):
            assert {**a, "for": None} == {**b, "for": None}
    path.write_text(fast)
    return path


@pytest.fixture
def prometheus(tmp_path: Path, live_plane):
    """A real Prometheus on a free loopback port scraping live_plane every second with the fast rules."""
    if not Path(PROMETHEUS).exists():
        pytest.fail("prometheus is not installed: run `make system-deps` (Debian package prometheus)")
    port = free_port()
    rules = fast_rules(tmp_path / "alerts.yaml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "sftops", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [live_plane.url.removeprefix("http://")]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def records(loss, steps: int = 400, eval_every: int = 50) -> list[dict]:
    """Metric records as the job's reporter sends them, one per step, eval loss every eval_every steps."""
    out = []
    for step in range(1, steps + 1):
        out.append({"step": step, "epoch": step / steps, "train_loss": loss(step / steps),
                    "eval_loss": loss(step / steps) + 0.06 if step % eval_every == 0 else None,
                    "learning_rate": 2e-4, "grad_norm": 0.9, "tokens_per_second": 1500.0, "time": time.time()})
    return out


def healthy(x: float) -> float:
    """Falls and flattens inside the default band."""
    return 0.4 + 1.4 * math.exp(-6 * x)


def diverging(x: float) -> float:
    """Healthy until 60% of the run, then climbing."""
    return healthy(x) if x < 0.6 else healthy(0.6) * (1 + 3 * (x - 0.6))


def report_curve(plane, job_id: str, token: str, rows: list[dict]) -> None:
    """Send the records in batches of 100, as the job's reporter would (NaN written as JSON's NaN, like json.dumps)."""
    for i in range(0, len(rows), 100):
        body = json.dumps({"total_steps": len(rows), "metrics": rows[i : i + 100]})
        response = requests.post(f"{plane.url}/v1/jobs/{job_id}/reports", data=body, timeout=10,
                                 headers={**auth(token), "Content-Type": "application/json"})
        assert response.status_code == 202, response.text


def wait_for_alerts(prometheus: str, wanted: dict[tuple[str, str], set[str]]) -> list[dict]:
    """Poll /api/v1/alerts until every (alertname, job_id) is in one of its wanted states; bounded by WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        alerts = requests.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        states = {(a["labels"]["alertname"], a["labels"].get("job_id")): a["state"] for a in alerts}
        if all(states.get(key) in ok for key, ok in wanted.items()):
            return alerts
        if time.monotonic() > deadline:
            pytest.fail(f"alerts not {wanted} after {WAIT_S}s; Prometheus has {states}")
        time.sleep(0.5)


def test_unhealthy_curves_fire_alerts_through_prometheus(live_plane, prometheus):
    """A diverging curve fires SftopsTrainLossRising, a NaN fires SftopsNonFiniteLoss; a healthy job fires nothing."""
    bad_id, bad_token = live_plane.create_job(status="running")
    nan_id, nan_token = live_plane.create_job(status="running")
    good_id, good_token = live_plane.create_job(status="running")
    report_curve(live_plane, bad_id, bad_token, records(diverging))
    report_curve(live_plane, good_id, good_token, records(healthy))
    nan_rows = records(healthy, steps=120)
    nan_rows[-1]["train_loss"] = float("nan")
    report_curve(live_plane, nan_id, nan_token, nan_rows)

    # the plane's own verdicts, as exposed to the scraper
    exposition = requests.get(f"{live_plane.url}/metrics", timeout=10).text
    for job_id, verdict in ((bad_id, "diverging"), (good_id, "healthy"), (nan_id, "diverging")):
        assert re.search(rf'sftops_job_health\{{[^}}]*job_id="{job_id}"[^}}]*verdict="{verdict}"[^}}]*\}} 1\.0', exposition), \
            (job_id, verdict)

    alerts = wait_for_alerts(prometheus, {("SftopsTrainLossRising", bad_id): {"firing"},
                                          ("SftopsNonFiniteLoss", nan_id): {"firing"}})
    rising = next(a for a in alerts if a["labels"]["alertname"] == "SftopsTrainLossRising"
                  and a["labels"]["job_id"] == bad_id)
    assert rising["labels"]["severity"] == "critical"
    assert rising["labels"]["job_name"] == "demo"
    assert rising["annotations"]["summary"] == f"Train loss rising: job demo ({bad_id})"
    assert [a["labels"]["alertname"] for a in alerts if a["labels"].get("job_id") == good_id] == []

    # every dashboard query is valid PromQL against this Prometheus, and the per-job ones find our jobs
    for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
        query = expr.replace("$job_id", ".*").replace("$job", ".*").replace("$__rate_interval", "1m")
        body = requests.get(f"{prometheus}/api/v1/query?query={quote(query)}", timeout=5).json()
        assert body["status"] == "success", (expr, body)
        if "sftops_job_" in query and "label_values" not in query:
            assert body["data"]["result"], expr
