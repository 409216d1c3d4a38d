"""Terminal-status callbacks: POST the job to its spec's callback_url, HMAC-signed, retried with backoff.

Deliveries are state in the store (pending / delivered / failed, attempt count, next try), so they survive a
restart; each attempt is claimed with a conditional UPDATE, so several workers never send the same one at
once. Receivers verify `X-Sftops-Signature: sha256=<hex>` = HMAC-SHA256(secret, f"{timestamp}.{body}") and
reject stale `X-Sftops-Timestamp` values.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import threading
import time

import requests

from service.store import CALLBACK_MAX_ATTEMPTS, Store

log = logging.getLogger(__name__)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for a body sent at `timestamp`."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, max_age: float = 300.0) -> bool:
    """Check a delivery's signature and freshness (what a receiver does)."""
    try:
        age = abs(time.time() - float(timestamp))
    except ValueError:
        return False
    return age <= max_age and hmac.compare_digest(sign(secret, timestamp, body), signature)


class CallbackSender:
    """Delivers due callbacks; created unbound, attached with init_app."""

    def __init__(self, *, timeout: float = 5.0, base_delay: float = 2.0, max_attempts: int = CALLBACK_MAX_ATTEMPTS):
        """Each attempt waits `timeout`; retry n waits base_delay * 2**(n-1) (capped at 5 minutes)."""
        self.timeout = timeout
        self.base_delay = base_delay
        self.max_attempts = max_attempts
        self.store: Store | None = None
        self.secret: str | None = None
        self.interval = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def init_app(self, app, store: Store) -> None:
        """Read SFTOPS_CALLBACK_SECRET and start the delivery thread with the reconciler's interval."""
        self.store = store
        secret = app.config.get("CALLBACK_SECRET")
        self.secret = None if secret in (None, "") else str(secret)
        if self.secret is None:
            log.warning("SFTOPS_CALLBACK_SECRET is not set: callback_url deliveries will not be signed")
        self.interval = float(app.config["RECONCILE_INTERVAL"])
        app.extensions["sftops.callbacks"] = self
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name="sftops-callbacks", daemon=True)
            self._thread.start()
            atexit.register(self._stop.set)

    def _loop(self) -> None:
        """Deliver due callbacks until stopped."""
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:
                log.exception("callback pass failed; retrying")
            self._stop.wait(max(self.interval, 0.5))

    def deliver_due(self) -> int:
        """Try every callback that is due now; returns how many attempts were made."""
        attempts = 0
        for job_id in self.store.due_callbacks():
            attempt = self.store.claim_callback(job_id, lease=self.timeout * 2 + 5)
            if attempt is None:
                continue
            attempts += 1
            self._attempt(job_id, attempt)
        return attempts

    def _attempt(self, job_id: str, attempt: int) -> None:
        """POST the job once and record the outcome."""
        job = self.store.get_job(job_id)
        url = job["spec"].get("callback_url")
        body = json.dumps(job, separators=(",", ":"), sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Sftops-Timestamp": timestamp,
                   "X-Sftops-Event": f"job.{job['status']}", "User-Agent": "sftops-plane"}
        if self.secret is not None:
            headers["X-Sftops-Signature"] = sign(self.secret, timestamp, body)
        try:
            response = requests.post(url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False)
            ok = 200 <= response.status_code < 300
            outcome = f"HTTP {response.status_code}"
        except requests.RequestException as e:
            ok = False
            outcome = type(e).__name__
        host = url.split("://", 1)[-1].split("/", 1)[0]  # never log the path: it may carry a secret
        if ok:
            self.store.callback_done(job_id, delivered=True, retry_at=None,
                                     message=f"callback to {host} delivered ({outcome}, attempt {attempt})")
        elif attempt < self.max_attempts:
            delay = min(300.0, self.base_delay * 2 ** (attempt - 1))
            self.store.callback_done(
                job_id, delivered=False, retry_at=time.time() + delay,
                message=f"callback to {host} failed ({outcome}, attempt {attempt}); retrying in {delay:.0f}s",
            )
        else:
            log.warning("giving up on job %s callback to %s after %d attempts", job_id, host, attempt)
            self.store.callback_done(
                job_id, delivered=False, retry_at=None,
                message=f"callback to {host} failed ({outcome}); gave up after {attempt} attempts",
            )
