"""Reports a job's status, metrics and events to the control plane: `POST {plane}/v1/jobs/{id}/reports`.

A background thread batches what the job hands it (about once a second), retries failed posts with
backoff, and drops the oldest metrics when the plane is unreachable for long; events and statuses are
never dropped. Nothing here blocks or fails training, and the job token never reaches a log line.
Without SFTOPS_JOB_ID, SFTOPS_PLANE_URL and SFTOPS_JOB_TOKEN the job runs standalone (`NullReporter`).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import requests

log = logging.getLogger(__name__)

ENV_JOB_ID = "SFTOPS_JOB_ID"  # same names as service/launchers/base.py (the job must not import the service)
ENV_PLANE_URL = "SFTOPS_PLANE_URL"
ENV_JOB_TOKEN = "SFTOPS_JOB_TOKEN"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_BATCH = 500  # metrics or events per post; keeps each body far below the plane's size limit


class NullReporter:
    """The reporter of a standalone job: accepts everything, sends nothing."""

    enabled = False

    def start(self) -> NullReporter:
        """Nothing to start."""
        return self

    def status(self, status: str, **extra: Any) -> None:
        """Ignore a status."""

    def metric(self, record: Mapping[str, Any]) -> None:
        """Ignore a metrics record."""

    def total_steps(self, total: int) -> None:
        """Ignore the total step count."""

    def event(self, level: str, message: str, data: Mapping[str, Any] | None = None) -> None:
        """Ignore an event."""

    def finish(self, status: str | None, timeout: float = 5.0, **extra: Any) -> bool:
        """Nothing to flush; reports success."""
        return True

    def close(self) -> None:
        """Nothing to stop."""


class Reporter:
    """Batches reports for one job and posts them from a daemon thread; every public method returns at once."""

    enabled = True

    def __init__(
        self,
        plane_url: str,
        job_id: str,
        token: str,
        *,
        interval: float = 1.0,
        max_metrics: int = 10_000,
        request_timeout: float = 5.0,
        max_backoff: float = 30.0,
    ):
        """Set up the queue; call start() to begin posting."""
        self.url = f"{plane_url.rstrip('/')}/v1/jobs/{job_id}/reports"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.interval = interval
        self.request_timeout = request_timeout
        self.max_backoff = max_backoff
        self._lock = threading.Condition()
        self._metrics: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_metrics)
        self._events: list[dict[str, Any]] = []
        self._statuses: list[dict[str, Any]] = []
        self._inflight: dict[str, Any] | None = None  # a batch that failed and is being retried
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped_metrics = 0
        self.posted = 0  # successful posts, for tests and the final log line
        self.rejected: int | None = None  # last non-retryable HTTP status (401, 403, 409, ...)

    def __repr__(self) -> str:
        """Show where reports go, never the token."""
        return f"Reporter({self.url!r})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Reporter | NullReporter:
        """A Reporter when the plane's three variables are set (on rank 0), else a NullReporter (standalone run)."""
        env = os.environ if environ is None else environ
        if env.get("RANK", "0") != "0":  # under torchrun every process runs the job: only rank 0 speaks for it
            return NullReporter()
        values = [env.get(ENV_JOB_ID), env.get(ENV_PLANE_URL), env.get(ENV_JOB_TOKEN)]
        if all(values):
            job_id, plane_url, token = values
            return cls(plane_url, job_id, token, **kwargs)
        if any(values):
            missing = [n for n, v in zip((ENV_JOB_ID, ENV_PLANE_URL, ENV_JOB_TOKEN), values) if not v]
            log.warning("reporting disabled: %s not set (set all three or none)", ", ".join(missing))
        return NullReporter()

    # --- producer side: called from the job, must never block -------------------------------------

    def start(self) -> Reporter:
        """Start the background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sftops-reporter", daemon=True)
            self._thread.start()
            log.info("reporting to %s", self.url)
        return self

    def status(self, status: str, **extra: Any) -> None:
        """Queue a status change (running, ...) with optional extra keys such as total_steps."""
        with self._lock:
            self._statuses.append({"status": status, **extra})
            self._lock.notify()

    def metric(self, record: Mapping[str, Any]) -> None:
        """Queue one metrics record; when the queue is full the oldest record is dropped."""
        with self._lock:
            if len(self._metrics) == self._metrics.maxlen:
                self.dropped_metrics += 1
            self._metrics.append(dict(record))

    def total_steps(self, total: int) -> None:
        """Queue the run's total step count, known once training starts (progress and ETA need it)."""
        with self._lock:
            self._statuses.append({"total_steps": int(total)})
            self._lock.notify()

    def event(self, level: str, message: str, data: Mapping[str, Any] | None = None) -> None:
        """Queue an event (info, warning, error); events are never dropped."""
        with self._lock:
            self._events.append({"time": time.time(), "level": level, "message": message, "data": dict(data or {})})

    # --- consumer side -----------------------------------------------------------------------------

    def _take_batch(self) -> dict[str, Any] | None:
        """Move the next batch out of the queues (a status goes out alone with what came before it)."""
        with self._lock:
            body: dict[str, Any] = {}
            if self._events:
                body["events"], self._events = self._events[:MAX_BATCH], self._events[MAX_BATCH:]
            if self._metrics:
                body["metrics"] = [self._metrics.popleft() for _ in range(min(MAX_BATCH, len(self._metrics)))]
            if self._statuses:
                body.update(self._statuses.pop(0))
            return body or None

    def _post(self, body: dict[str, Any], timeout: float) -> bool | None:
        """POST one batch: True sent, False retry later, None rejected for good (dropped)."""
        try:
            data = json.dumps(body, allow_nan=True)  # NaN/inf losses stay visible to the plane's health check
            resp = requests.post(self.url, data=data, headers=self._headers, timeout=(min(2.0, timeout), timeout))
        except requests.RequestException as e:
            log.warning("report to %s failed (will retry): %s", self.url, type(e).__name__)
            return False
        if resp.status_code < 300:
            self.posted += 1
            return True
        if resp.status_code in RETRY_STATUSES:
            log.warning("report to %s got HTTP %d (will retry)", self.url, resp.status_code)
            return False
        self.rejected = resp.status_code
        log.warning("report to %s rejected with HTTP %d: %s (dropped)", self.url, resp.status_code, _error_text(resp))
        return None

    def _loop(self) -> None:
        """Post batches until stopped; back off on failures without ever raising."""
        failures = 0
        while not self._stop.is_set():
            with self._lock:
                self._lock.wait(self.interval)  # batches what arrives within about one interval
            if self._stop.is_set():
                break
            while not self._stop.is_set():
                batch = self._inflight or self._take_batch()
                if batch is None:
                    break
                self._inflight = batch
                sent = self._post(batch, self.request_timeout)
                if sent is False:
                    failures += 1
                    delay = min(self.max_backoff, 0.5 * 2 ** min(failures, 10)) * random.uniform(0.8, 1.2)
                    self._stop.wait(delay)
                    break
                failures = 0
                self._inflight = None

    def finish(self, status: str | None, timeout: float = 5.0, **extra: Any) -> bool:
        """Stop the thread, flush what is queued and post the final status (if any) synchronously within `timeout` s.

        Returns whether the last batch reached the plane; never raises.
        """
        deadline = time.monotonic() + timeout
        self.close(join_timeout=min(1.0, timeout / 4))
        pending = [self._inflight] if self._inflight else []
        self._inflight = None
        while (batch := self._take_batch()) is not None:
            pending.append(batch)
        if status is not None:
            pending.append({"status": status, **extra})  # last, so the plane sees every metric before the end
        ok = True
        for body in pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0.05:
                log.warning("report to %s: out of time, %d batch(es) not sent", self.url, len(pending))
                return False
            ok = self._post(body, remaining) is True
        if self.dropped_metrics:
            log.warning("reporter dropped %d metrics records while the plane was unreachable", self.dropped_metrics)
        return ok

    def close(self, join_timeout: float = 1.0) -> None:
        """Stop the background thread without flushing (finish() flushes)."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(join_timeout)


def _error_text(resp: requests.Response) -> str:
    """The plane's error code and message, if the body is the API's error shape."""
    try:
        err = resp.json()["error"]
        return f"{err.get('code')}: {err.get('message')}"
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
