"""Prometheus metrics: the per-job collector read from the store, and /metrics across gunicorn workers."""

from __future__ import annotations

import math
import time

import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from job.health import VERDICTS
from job.spec import parse_spec
from service import metrics
from service.metrics import JobsCollector
from service.store import Store, _sqlite_url
from tests.plugins.plane import make_spec


@pytest.fixture
def sqlite_store(tmp_path):
    """A store on SQLite."""
    store = Store(_sqlite_url(tmp_path))
    yield store
    store.close()


def _job(store, name="demo", status="running", **spec):
    """Create a job; returns its id."""
    resolved = parse_spec(make_spec(name, **spec)).model_dump(mode="json")
    return store.create_job(resolved, submitter="ci", status=status)[0]["id"]


def _registry(store, retention=3600.0):
    """A registry holding only a JobsCollector on `store`."""
    registry = CollectorRegistry()
    collector = JobsCollector(store, retention)
    registry.register(collector)
    return registry, collector


def test_per_job_gauges_follow_reports(sqlite_store):
    job_id = _job(sqlite_store, health={"target_band": [0.2, 0.6]})
    sqlite_store.add_report(job_id, {
        "total_steps": 200,
        "metrics": [{"step": s, "train_loss": 2.0 - s * 0.01, "grad_norm": 0.5, "tokens_per_second": 1234.0}
                    for s in range(1, 101)] + [{"step": 50, "eval_loss": 1.7}, {"step": 100, "eval_loss": 1.2}],
    })
    registry, _ = _registry(sqlite_store)
    labels = {"job_id": job_id, "job_name": "demo"}
    value = lambda name, **extra: registry.get_sample_value(name, {**labels, **extra})  # noqa: E731
    job = sqlite_store.get_job(job_id)
    assert value(metrics.JOB_TRAIN_LOSS) == pytest.approx(1.0)
    assert value(metrics.JOB_EVAL_LOSS) == pytest.approx(1.2)
    assert value(metrics.JOB_STEP) == 100 and value(metrics.JOB_TOTAL_STEPS) == 200
    assert value(metrics.JOB_GRAD_NORM) == 0.5 and value(metrics.JOB_TOKENS_PER_SECOND) == 1234.0
    assert value(metrics.JOB_TRAIN_LOSS_SLOPE) == pytest.approx(job["health"]["train"]["slope_per_100"])
    assert value(metrics.JOB_TRAIN_LOSS_RELATIVE_SLOPE) == pytest.approx(job["health"]["train"]["relative_slope"])
    assert value(metrics.JOB_TARGET_BAND_LOW) == 0.2 and value(metrics.JOB_TARGET_BAND_HIGH) == 0.6
    assert value(metrics.JOB_TRAIN_LOSS_NONFINITE) == 0
    assert value(metrics.JOB_LAST_REPORT) == pytest.approx(time.time(), abs=30)
    verdict = job["health"]["verdict"]
    assert {v: value(metrics.JOB_HEALTH, verdict=v) for v in VERDICTS} == {v: float(v == verdict) for v in VERDICTS}
    assert value(metrics.JOB_STATUS, status="running") == 1 and value(metrics.JOB_STATUS, status="queued") == 0
    assert registry.get_sample_value(metrics.JOBS, {"status": "running"}) == 1


def test_nonfinite_loss_sets_the_flag(sqlite_store):
    job_id = _job(sqlite_store)
    sqlite_store.add_report(job_id, {"metrics": [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": math.inf}]})
    registry, _ = _registry(sqlite_store)
    labels = {"job_id": job_id, "job_name": "demo"}
    assert registry.get_sample_value(metrics.JOB_TRAIN_LOSS_NONFINITE, labels) == 1
    assert registry.get_sample_value(metrics.JOB_TRAIN_LOSS, labels) is None  # no number to show
    assert registry.get_sample_value(metrics.JOB_HEALTH, {**labels, "verdict": "diverging"}) == 1


def test_finished_jobs_drop_out_after_the_retention(sqlite_store):
    running = _job(sqlite_store, "a")
    done = _job(sqlite_store, "b")
    sqlite_store.add_report(done, {"status": "failed", "error": {"code": "internal", "message": "x"}})
    registry, collector = _registry(sqlite_store, retention=0.2)
    status = lambda job_id, name: registry.get_sample_value(  # noqa: E731
        metrics.JOB_STATUS, {"job_id": job_id, "job_name": name, "status": "failed"})
    assert status(done, "b") == 1
    time.sleep(0.3)
    assert status(done, "b") is None and status(running, "a") == 0
    assert registry.get_sample_value(metrics.JOBS, {"status": "failed"}) == 1  # the fleet count stays


def test_a_scrape_never_raises_when_the_store_fails(sqlite_store):
    registry, collector = _registry(sqlite_store)
    _job(sqlite_store)
    from sqlalchemy import create_engine

    sqlite_store.engine = create_engine("sqlite:////nonexistent-dir/db.sqlite")
    families = list(registry.collect())
    assert families == [] and collector.failures == 1
    assert collector.render() == b"" and collector.failures == 2


def test_every_metric_name_of_the_brief_is_defined():
    names = {
        "sftops_job_train_loss", "sftops_job_eval_loss", "sftops_job_train_loss_slope", "sftops_job_eval_loss_slope",
        "sftops_job_train_loss_relative_slope", "sftops_job_eval_loss_relative_slope", "sftops_job_loss_gap",
        "sftops_job_health", "sftops_job_step", "sftops_job_total_steps", "sftops_job_tokens_per_second",
        "sftops_job_grad_norm", "sftops_job_last_report_timestamp_seconds", "sftops_job_status",
        "sftops_job_train_loss_nonfinite", "sftops_job_target_band_low", "sftops_job_target_band_high",
        "sftops_jobs", "sftops_http_requests_total", "sftops_http_request_duration_seconds",
    }
    defined = {v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str) and v.startswith("sftops_")}
    assert names <= defined


def _samples(url: str) -> dict:
    """Scrape /metrics into {(name, frozenset(labels)): value}."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_agree_across_gunicorn_workers(live_plane):
    job_id, token = live_plane.create_job(make_spec("live"))
    assert live_plane.report(job_id, token, {"metrics": [{"step": 3, "train_loss": 0.9}]}).status_code == 202
    for _ in range(20):
        requests.get(f"{live_plane.url}/healthz", timeout=5)
    scrapes = [_samples(live_plane.url) for _ in range(6)]  # several connections: both workers answer
    key = ("sftops_job_train_loss", frozenset({"job_id": job_id, "job_name": "live"}.items()))
    assert all(s[key] == 0.9 for s in scrapes)
    healthz = ("sftops_http_requests_total", frozenset({"method": "GET", "endpoint": "/healthz", "status": "200"}.items()))
    assert scrapes[-1][healthz] == 20  # summed over both workers (multiprocess mode)


def test_the_fast_text_renderer_matches_prometheus_client(sqlite_store):
    from prometheus_client import generate_latest

    for i in range(3):
        job_id = _job(sqlite_store, f"job-{i}")
        sqlite_store.add_report(job_id, {"total_steps": 10, "metrics": [
            {"step": s, "train_loss": 1.0 / s, "grad_norm": 0.1 * s} for s in range(1, 30)]})
    _job(sqlite_store, "waiting", status="queued")
    registry, collector = _registry(sqlite_store)
    ours = collector.render().decode()
    theirs = generate_latest(registry).decode()
    parse = lambda text: sorted(  # noqa: E731
        (s.name, sorted(s.labels.items()), s.value) for f in text_string_to_metric_families(text) for s in f.samples)
    assert parse(ours) == parse(theirs) and len(parse(ours)) > 50
