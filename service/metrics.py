"""Every Prometheus metric of the plane: per-job gauges read from the store at scrape time, and HTTP metrics.

The per-job gauges come from JobsCollector, which builds fresh metric families from the store on every
scrape, so any gunicorn worker answers the same. HTTP metrics use prometheus_client's multiprocess mode when
PROMETHEUS_MULTIPROC_DIR is set (gunicorn.conf.py sets it), so /metrics sums all workers.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson
from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# Per-job gauges (labels job_id, job_name), name -> (help, how to read the value from a store row).
JOB_TRAIN_LOSS = "sftops_job_train_loss"
JOB_EVAL_LOSS = "sftops_job_eval_loss"
JOB_TRAIN_LOSS_SLOPE = "sftops_job_train_loss_slope"
JOB_EVAL_LOSS_SLOPE = "sftops_job_eval_loss_slope"
JOB_TRAIN_LOSS_RELATIVE_SLOPE = "sftops_job_train_loss_relative_slope"
JOB_EVAL_LOSS_RELATIVE_SLOPE = "sftops_job_eval_loss_relative_slope"
JOB_LOSS_GAP = "sftops_job_loss_gap"
JOB_HEALTH = "sftops_job_health"
JOB_STEP = "sftops_job_step"
JOB_TOTAL_STEPS = "sftops_job_total_steps"
JOB_TOKENS_PER_SECOND = "sftops_job_tokens_per_second"
JOB_GRAD_NORM = "sftops_job_grad_norm"
JOB_LAST_REPORT = "sftops_job_last_report_timestamp_seconds"
JOB_STATUS = "sftops_job_status"
JOB_TRAIN_LOSS_NONFINITE = "sftops_job_train_loss_nonfinite"
JOB_TARGET_BAND_LOW = "sftops_job_target_band_low"
JOB_TARGET_BAND_HIGH = "sftops_job_target_band_high"
# Fleet and plane metrics.
JOBS = "sftops_jobs"
HTTP_REQUESTS = "sftops_http_requests_total"
HTTP_DURATION = "sftops_http_request_duration_seconds"
SCRAPE_ERRORS = "sftops_metrics_scrape_errors_total"

JOB_LABELS = ["job_id", "job_name"]
STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


def _verdicts() -> tuple[str, ...]:
    """The health verdicts job.health can return (each gets a 0/1 sample)."""
    from job import health

    return tuple(getattr(health, "VERDICTS", ()))


def _gauge(key: str):
    """Reader of one value of a store row's flattened gauges."""
    return lambda row, gauges: gauges.get(key)


# name, help, reader(row, gauges) -> value or None (no sample)
_GAUGES: list[tuple[str, str, Any]] = [
    (JOB_TRAIN_LOSS, "Last finite train loss reported.", _gauge("train_loss")),
    (JOB_EVAL_LOSS, "Last eval loss reported.", _gauge("eval_loss")),
    (JOB_TRAIN_LOSS_SLOPE, "Train loss change per 100 steps (trailing window).", _gauge("train_slope")),
    (JOB_EVAL_LOSS_SLOPE, "Eval loss change per 100 steps (trailing window).", _gauge("eval_slope")),
    (JOB_TRAIN_LOSS_RELATIVE_SLOPE, "Train slope per 100 steps divided by the loss level.",
     _gauge("train_relative_slope")),
    (JOB_EVAL_LOSS_RELATIVE_SLOPE, "Eval slope per 100 steps divided by the loss level.",
     _gauge("eval_relative_slope")),
    (JOB_LOSS_GAP, "Eval loss minus train loss.", _gauge("gap")),
    (JOB_STEP, "Last optimizer step reported.", _gauge("step")),
    (JOB_TOTAL_STEPS, "Optimizer steps the job will run.", _gauge("total_steps")),
    (JOB_TOKENS_PER_SECOND, "Training throughput.", _gauge("tokens_per_second")),
    (JOB_GRAD_NORM, "Last gradient norm reported.", _gauge("grad_norm")),
    (JOB_LAST_REPORT, "Unix time of the job's last report.", lambda row, _: row["last_report_at"]),
    (JOB_TRAIN_LOSS_NONFINITE, "1 when the last train loss reported was NaN or infinite.",
     lambda row, _: 1.0 if row["train_nonfinite"] else 0.0),
    (JOB_TARGET_BAND_LOW, "Low end of the job's healthy final train loss band.", lambda row, _: row["band_low"]),
    (JOB_TARGET_BAND_HIGH, "High end of the job's healthy final train loss band.", lambda row, _: row["band_high"]),
]


class JobsCollector:
    """Per-job and fleet gauges built from the store on every scrape; never raises."""

    def __init__(self, store, retention_seconds: float, errors: Counter | None = None):
        """Read `store`; show finished jobs for `retention_seconds`; count failed scrapes in `errors`."""
        self.store = store
        self.retention_seconds = retention_seconds
        self.errors = errors
        self.failures = 0  # also kept here for collectors without a counter (tests)

    def describe(self):
        """No up-front description: registering must not query the store."""
        return []

    def _read(self) -> tuple[list[dict], dict[str, int]] | None:
        """The store rows a scrape shows, or None (logged and counted) when the store cannot be read."""
        try:
            return self.store.metric_rows(self.retention_seconds), self.store.status_counts()
        except Exception:
            # A scrape must not fail because the store is down: emit no job series and count the error.
            log.exception("metrics scrape could not read the store")
            self.failures += 1
            if self.errors is not None:
                self.errors.inc()
            return None

    def collect(self):
        """Yield fresh metric families for every job /metrics shows."""
        read = self._read()
        if read is None:
            return
        rows, counts = read
        for name, help_, extra, samples in _job_series(rows):
            family = GaugeMetricFamily(name, help_, labels=JOB_LABELS + ([extra] if extra else []))
            for job_id, job_name, extra_value, value in samples:
                family.add_metric([job_id, job_name] + ([extra_value] if extra else []), value)
            yield family
        yield _fleet(counts)

    def render(self) -> bytes:
        """The same metrics as collect(), as Prometheus text written directly (never raises).

        prometheus_client's generate_latest spends most of a 1,000-job scrape building and formatting
        Sample objects; every series here is a gauge labelled by job id, DNS name and an enum word.
        """
        read = self._read()
        if read is None:
            return b""
        rows, counts = read
        prefix = {row["id"]: f'job_id="{row["id"]}",job_name="{_escape(row["name"])}"' for row in rows}
        out: list[str] = []
        for name, help_, extra, samples in _job_series(rows):
            out.append(f"# HELP {name} {help_}\n# TYPE {name} gauge\n")
            if extra:
                out += [f'{name}{{{prefix[j]},{extra}="{e}"}} {floatToGoString(v)}\n' for j, _, e, v in samples]
            else:
                out += [f"{name}{{{prefix[j]}}} {floatToGoString(v)}\n" for j, _, _, v in samples]
        fleet = _fleet(counts)
        out.append(f"# HELP {fleet.name} {fleet.documentation}\n# TYPE {fleet.name} gauge\n")
        out += [f'{fleet.name}{{status="{s.labels["status"]}"}} {floatToGoString(s.value)}\n' for s in fleet.samples]
        return "".join(out).encode()


def _job_series(rows: list[dict]):
    """Per family: (name, help, extra label or None, [(job_id, job_name, extra value, value)])."""
    parsed = [(row, orjson.loads(row["gauges"]) if row["gauges"] else {}) for row in rows]
    for name, help_, read in _GAUGES:
        samples = []
        for row, gauges in parsed:
            value = read(row, gauges)
            if value is not None and value == value:  # None and NaN have no sample
                samples.append((row["id"], row["name"], None, float(value)))
        yield name, help_, None, samples
    verdicts = _verdicts()
    health = []
    for row, gauges in parsed:
        current = gauges.get("verdict")
        if current is not None:
            health += [(row["id"], row["name"], v, 1.0 if v == current else 0.0) for v in verdicts or (current,)]
    yield JOB_HEALTH, "1 for the job's current health verdict, 0 for the others.", "verdict", health
    status = [(row["id"], row["name"], s, 1.0 if s == row["status"] else 0.0) for row, _ in parsed for s in STATUSES]
    yield JOB_STATUS, "1 for the job's current status, 0 for the others.", "status", status


def _fleet(counts: dict[str, int]) -> GaugeMetricFamily:
    """Jobs by status over the whole store."""
    fleet = GaugeMetricFamily(JOBS, "Jobs in the store by status.", labels=["status"])
    for s in STATUSES:
        fleet.add_metric([s], float(counts.get(s, 0)))
    return fleet


def _escape(value: str) -> str:
    """A label value escaped for the text format (only when it needs it)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return value


class PlaneMetrics:
    """The app's registry, HTTP metrics and /metrics exposition; created unbound, attached with init_app."""

    def __init__(self):
        """Nothing until init_app."""
        self.registry: CollectorRegistry | None = None
        self.multiprocess = False

    def init_app(self, app: Flask, store) -> None:
        """Build the registry (multiprocess-aware), the collector, and the request hooks."""
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # http_registry: the HTTP metrics (exposed by prometheus_client); registry: those plus the job
        # collector, for anyone who wants one registry (tests read samples from it).
        self.http_registry = CollectorRegistry()
        # In multiprocess mode values go to files and MultiProcessCollector sums them, so the metric
        # objects themselves are not registered anywhere.
        own = None if self.multiprocess else self.http_registry
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.http_registry)
        self.requests = Counter(HTTP_REQUESTS, "HTTP requests by method, endpoint and status.",
                                ["method", "endpoint", "status"], registry=own)
        self.duration = Histogram(HTTP_DURATION, "HTTP request latency.", ["method", "endpoint"], registry=own,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.scrape_errors = Counter(SCRAPE_ERRORS, "Scrapes that could not read the store.", registry=own)
        self.collector = JobsCollector(store, float(app.config["METRICS_RETENTION_SECONDS"]), self.scrape_errors)
        self.registry = CollectorRegistry()
        self.registry.register(_Both(self.http_registry, self.collector))
        app.extensions["sftops.metrics"] = self
        app.before_request(self._start)
        app.after_request(self._observe)

    def _start(self) -> None:
        """Remember when the request started."""
        g.sftops_started = time.perf_counter()

    def _observe(self, response: Response) -> Response:
        """Count and time the request by its route (not its raw path, which would explode cardinality)."""
        started = g.get("sftops_started")
        if started is not None:
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            self.requests.labels(request.method, endpoint, str(response.status_code)).inc()
            self.duration.labels(request.method, endpoint).observe(time.perf_counter() - started)
        return response

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text of every metric (all workers' HTTP metrics plus the store's job gauges)."""
        return generate_latest(self.http_registry) + self.collector.render(), CONTENT_TYPE_LATEST


class _Both:
    """A collector yielding a registry's metrics and then the job collector's."""

    def __init__(self, registry: CollectorRegistry, collector: JobsCollector):
        """Combine the two."""
        self._registry, self._collector = registry, collector

    def collect(self):
        """Everything /metrics shows, as metric families."""
        yield from self._registry.collect()
        yield from self._collector.collect()
