"""The job's reporter against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from job.reporter import NullReporter, Reporter

TOKEN = "sft_" + "T0k3n-secret-value-that-must-not-leak-xyz0"


class Plane:
    """A tiny plane stand-in: records every POST; answers with scripted statuses, optionally slowly."""

    def __init__(self, responses: list[int] | None = None, delay: float = 0.0):
        """Start serving on a free loopback port."""
        self.requests: list[dict] = []
        self.responses = list(responses or [])
        self.delay = delay
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                """Record the report and answer."""
                body = self.rfile.read(int(self.headers["Content-Length"]))
                plane.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": json.loads(body)}
                )
                if plane.delay:
                    time.sleep(plane.delay)
                code = plane.responses.pop(0) if plane.responses else 202
                payload = json.dumps({"accepted": {}} if code < 300 else {"error": {"code": "x", "message": "no"}})
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                """Keep test output quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[dict]:
        """Every report body received, in order."""
        return [r["body"] for r in self.requests]


@pytest.fixture
def plane():
    p = Plane()
    yield p
    p.stop()


def dead_url() -> str:
    """A loopback URL where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def record(step: int) -> dict:
    """One metrics record as the trainer logs it."""
    return {"step": step, "epoch": step / 100, "train_loss": 2.0 - step / 100, "eval_loss": None,
            "learning_rate": 1e-4, "grad_norm": 0.5, "tokens_per_second": 900.0, "time": 1.7e9 + step}


def test_batches_arrive_in_order_with_token(plane):
    reporter = Reporter(plane.url, "job1", TOKEN, interval=0.2).start()
    reporter.status("running", total_steps=60)
    for step in range(1, 61):
        reporter.metric(record(step))
        if step == 30:
            reporter.event("info", "halfway", {"step": 30})
    time.sleep(0.5)  # let the thread post at least one batch on its own
    assert reporter.finish("succeeded", artifacts={"output": "s3://b/o/"}, total_steps=60) is True

    assert {r["path"] for r in plane.requests} == {"/v1/jobs/job1/reports"}
    assert {r["auth"] for r in plane.requests} == {f"Bearer {TOKEN}"}
    bodies = plane.bodies()
    steps = [m["step"] for b in bodies for m in b.get("metrics", [])]
    assert steps == list(range(1, 61))
    assert len(bodies) < 10  # batched, not one post per record
    statuses = [b["status"] for b in bodies if "status" in b]
    assert statuses == ["running", "succeeded"]
    assert bodies[0]["status"] == "running" and bodies[0]["total_steps"] == 60
    assert bodies[-1] == {"status": "succeeded", "artifacts": {"output": "s3://b/o/"}, "total_steps": 60}
    events = [e for b in bodies for e in b.get("events", [])]
    assert [(e["level"], e["message"], e["data"]) for e in events] == [("info", "halfway", {"step": 30})]


def test_retries_with_backoff_until_accepted():
    plane = Plane(responses=[503, 502])
    try:
        reporter = Reporter(plane.url, "job1", TOKEN, interval=0.05, max_backoff=0.3).start()
        reporter.status("running")
        reporter.metric(record(1))
        deadline = time.monotonic() + 10
        while reporter.posted < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reporter.posted == 1
        reporter.finish("succeeded", timeout=2)
        bodies = plane.bodies()
        assert bodies[0] == bodies[1] == bodies[2]  # the same batch, retried
        assert bodies[2]["status"] == "running" and [m["step"] for m in bodies[2]["metrics"]] == [1]
        assert bodies[-1] == {"status": "succeeded"}
    finally:
        plane.stop()


def test_rejected_report_is_dropped_not_retried():
    plane = Plane(responses=[409])
    try:
        reporter = Reporter(plane.url, "job1", TOKEN, interval=0.05, max_backoff=0.1).start()
        reporter.status("running")
        time.sleep(0.5)
        reporter.close()
        assert reporter.rejected == 409
        assert len(plane.requests) == 1
    finally:
        plane.stop()


def test_queue_is_bounded_dropping_oldest_metrics_but_no_events(plane):
    reporter = Reporter(plane.url, "job1", TOKEN, max_metrics=5)  # not started: everything queues
    reporter.status("running")
    for step in range(1, 11):
        reporter.metric(record(step))
        reporter.event("info", f"e{step}")
    assert reporter.dropped_metrics == 5
    assert reporter.finish("failed", error={"code": "internal", "message": "boom"}) is True
    bodies = plane.bodies()
    assert [m["step"] for b in bodies for m in b.get("metrics", [])] == [6, 7, 8, 9, 10]
    assert [e["message"] for b in bodies for e in b.get("events", [])] == [f"e{i}" for i in range(1, 11)]
    assert bodies[-1] == {"status": "failed", "error": {"code": "internal", "message": "boom"}}


def test_non_finite_losses_are_sent(plane):
    reporter = Reporter(plane.url, "job1", TOKEN)
    reporter.metric({**record(1), "train_loss": math.nan})
    reporter.finish("failed")
    raw = plane.bodies()[0]["metrics"][0]["train_loss"]
    assert math.isnan(raw)


@pytest.mark.parametrize("kind", ["dead", "slow"])
def test_unreachable_or_slow_plane_never_blocks(kind, caplog):
    caplog.set_level(logging.DEBUG)
    plane = Plane(delay=30) if kind == "slow" else None
    url = plane.url if plane else dead_url()
    try:
        reporter = Reporter(url, "job1", TOKEN, interval=0.05, request_timeout=0.5).start()
        started = time.monotonic()
        reporter.status("running")
        for step in range(1, 2001):
            reporter.metric(record(step))
            reporter.event("info", "tick")
        enqueue_s = time.monotonic() - started
        time.sleep(0.3)  # the thread is now stuck connecting or waiting
        started = time.monotonic()
        ok = reporter.finish("succeeded", timeout=1.5)
        finish_s = time.monotonic() - started
    finally:
        if plane:
            plane.server.shutdown()  # do not wait for the sleeping handler threads
    assert ok is False
    assert enqueue_s < 1.0
    assert finish_s < 3.0
    assert TOKEN not in caplog.text
    assert "will retry" in caplog.text or "out of time" in caplog.text


def test_token_never_logged_when_rejected(caplog):
    caplog.set_level(logging.DEBUG)
    plane = Plane(responses=[401])
    try:
        reporter = Reporter(plane.url, "job1", TOKEN)
        assert TOKEN not in repr(reporter)
        reporter.finish("running")
    finally:
        plane.stop()
    assert "rejected with HTTP 401" in caplog.text
    assert TOKEN not in caplog.text


def test_from_env():
    assert isinstance(Reporter.from_env({}), NullReporter)
    partial = {"SFTOPS_JOB_ID": "j1", "SFTOPS_PLANE_URL": "http://127.0.0.1:9"}
    assert isinstance(Reporter.from_env(partial), NullReporter)
    full = {**partial, "SFTOPS_JOB_TOKEN": TOKEN}
    reporter = Reporter.from_env(full)
    assert isinstance(reporter, Reporter)
    assert reporter.url == "http://127.0.0.1:9/v1/jobs/j1/reports"
    # under torchrun only rank 0 reports; the others would post every point again
    assert isinstance(Reporter.from_env({**full, "RANK": "0"}), Reporter)
    assert isinstance(Reporter.from_env({**full, "RANK": "1"}), NullReporter)


def test_total_steps_goes_out_when_training_starts(plane):
    """The total step count is posted on its own, long before the final status, so the plane can show an ETA."""
    reporter = Reporter(plane.url, "job1", TOKEN, interval=0.05).start()
    reporter.status("running")
    reporter.total_steps(40)
    deadline = time.monotonic() + 10
    while len(plane.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert plane.bodies()[:2] == [{"status": "running"}, {"total_steps": 40}]
    assert reporter.finish("succeeded", timeout=2) is True
    assert NullReporter().total_steps(40) is None
