"""Terminal-status callbacks: signed delivery to a loopback receiver, retries with backoff, giving up."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from job.spec import parse_spec
from service.callbacks import CallbackSender, sign, verify
from service.store import Store, _sqlite_url
from tests.plugins.plane import make_spec


class Receiver:
    """A loopback HTTP server answering each POST with the next status from `statuses` (then 200)."""

    def __init__(self, statuses: list[int]):
        """Start serving on a free port."""
        self.statuses = list(statuses)
        self.received: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                """Record the delivery and answer."""
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args):
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/sftops"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def store(tmp_path):
    """A SQLite store."""
    store = Store(_sqlite_url(tmp_path))
    yield store
    store.close()


def _sender(store, secret="s3cret", **kw) -> CallbackSender:
    """A sender without its thread."""
    sender = CallbackSender(timeout=2, **kw)
    sender.store, sender.secret = store, secret
    return sender


def _finished_job(store, url) -> str:
    """A job with a callback_url that has just succeeded."""
    spec = parse_spec(make_spec(callback_url=url)).model_dump(mode="json")
    job_id = store.create_job(spec, submitter="ci", status="running")[0]["id"]
    store.add_report(job_id, {"status": "succeeded", "artifacts": {"output": "s3://out/demo/"}})
    return job_id


def test_delivery_is_signed_and_recorded(store):
    receiver = Receiver([])
    try:
        job_id = _finished_job(store, receiver.url)
        assert _sender(store).deliver_due() == 1
        headers, body = receiver.received[0]
        assert json.loads(body)["id"] == job_id and json.loads(body)["status"] == "succeeded"
        assert headers["X-Sftops-Signature"] == sign("s3cret", headers["X-Sftops-Timestamp"], body)
        assert verify("s3cret", headers["X-Sftops-Timestamp"], body, headers["X-Sftops-Signature"])
        assert not verify("other", headers["X-Sftops-Timestamp"], body, headers["X-Sftops-Signature"])
        assert store.get_row(job_id)["callback_state"] == "delivered"
        assert _sender(store).deliver_due() == 0  # never twice
        assert "delivered" in store.list_events(job_id)[0][-1]["message"]
    finally:
        receiver.close()


def test_failures_are_retried_with_backoff_then_delivered(store):
    receiver = Receiver([500, 503])
    try:
        job_id = _finished_job(store, receiver.url)
        sender = _sender(store, base_delay=0.2)
        sender.deliver_due()
        assert sender.deliver_due() == 0  # not due yet: the first retry waits 0.2 s
        time.sleep(0.25)
        sender.deliver_due()
        time.sleep(0.45)  # the second retry waits 0.4 s
        sender.deliver_due()
        assert len(receiver.received) == 3
        assert store.get_row(job_id)["callback_state"] == "delivered"
        assert store.get_row(job_id)["callback_attempts"] == 3
    finally:
        receiver.close()


def test_delivery_gives_up_after_the_last_attempt(store):
    job_id = _finished_job(store, "http://127.0.0.1:9/unreachable")
    sender = _sender(store, base_delay=0.01, max_attempts=3)
    deadline = time.monotonic() + 10
    while store.get_row(job_id)["callback_state"] == "pending" and time.monotonic() < deadline:
        sender.deliver_due()
        time.sleep(0.03)
    row = store.get_row(job_id)
    assert row["callback_state"] == "failed" and row["callback_attempts"] == 3
    last = store.list_events(job_id)[0][-1]
    assert last["level"] == "error" and "gave up after 3 attempts" in last["message"]
    assert "/unreachable" not in last["message"]  # the URL path may carry a secret


def test_jobs_without_a_callback_url_send_nothing(store):
    spec = parse_spec(make_spec()).model_dump(mode="json")
    job_id = store.create_job(spec, submitter="ci", status="running")[0]["id"]
    store.add_report(job_id, {"status": "failed", "error": {"code": "internal", "message": "x"}})
    assert _sender(store).deliver_due() == 0 and store.get_row(job_id)["callback_state"] is None
