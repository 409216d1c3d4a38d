"""The reconciler: launches queued jobs as capacity frees, follows runs, and finishes cancels.

One pass is `reconcile_once()`. Every plane process runs passes in a background thread, but only the holder
of the store's `reconciler` lease acts, so several gunicorn workers and replicas never double-launch; a
launch additionally claims its job with a conditional UPDATE. A run that ends without its job reporting a
final status is failed, with the launcher's reason, after `SFTOPS_REPORT_GRACE_SECONDS`.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from service.launchers.base import Launcher, LaunchError, LaunchRequest, RunStatus
from service.store import Store, sha256_hex

log = logging.getLogger(__name__)

LOCK_NAME = "reconciler"
LAUNCH_LEASE_SECONDS = 120.0  # longer than any launcher.submit takes


def new_job_token() -> str:
    """A job's report token: `sft_` + 43 url-safe characters."""
    return "sft_" + secrets.token_urlsafe(32)


class Reconciler:
    """Drives jobs between the store and a launcher; created unbound, attached with init_app."""

    def __init__(self, launcher: Launcher | None = None):
        """Use `launcher`, or build the configured one on first use."""
        self._launcher = launcher
        self._launcher_factory: Callable[[], Launcher] | None = None
        self.store: Store | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.max_concurrent = 1
        self.plane_url = "http://127.0.0.1:8000"
        self.grace_seconds = 10.0
        self.interval = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def init_app(self, app, store: Store) -> None:
        """Read the settings, attach, and start the background thread unless SFTOPS_RECONCILE_INTERVAL is 0."""
        from service.launchers import create_launcher

        self.store = store
        config = app.config
        self.max_concurrent = int(config["MAX_CONCURRENT_JOBS"])
        self.plane_url = str(config["PUBLIC_URL"]).rstrip("/")
        self.grace_seconds = float(config["REPORT_GRACE_SECONDS"])
        self.interval = float(config["RECONCILE_INTERVAL"])
        settings = dict(config)
        self._launcher_factory = lambda: create_launcher(settings)
        app.extensions["sftops.reconciler"] = self
        if self.interval > 0:
            self.start()

    @property
    def launcher(self) -> Launcher:
        """The launcher, created on first use so an API-only process never imports it."""
        if self._launcher is None:
            self._launcher = self._launcher_factory()
        return self._launcher

    # -- background thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Run passes every `interval` seconds in a daemon thread."""
        if self._thread is not None:
            return
        # A fresh process must not inherit a forked parent's (dead) owner name.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sftops-reconciler", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop the thread and hand the leader lease back so another process takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.store.release_lock(LOCK_NAME, self.owner)
        except Exception:
            log.warning("could not release the reconciler lease; it expires on its own", exc_info=True)

    def _loop(self) -> None:
        """Reconcile until stopped; a failed pass is logged and retried next interval."""
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except (LaunchError, ValueError) as e:
                # A launcher that cannot be built (no cluster credentials, a bad SFTOPS_K8S_* value) says why.
                log.error("reconciler cannot launch jobs: %s; retrying in %.1fs", e, self.interval)
            except Exception:
                log.exception("reconcile pass failed; retrying in %.1fs", self.interval)
            self._stop.wait(self.interval)

    # -- one pass --------------------------------------------------------------------------------

    def reconcile_once(self) -> dict[str, Any]:
        """One pass: follow active runs, then launch queued jobs. Returns what it did (for tests and logs)."""
        ttl = max(15.0, 5 * self.interval)
        if not self.store.try_lock(LOCK_NAME, self.owner, ttl):
            return {"leader": False, "launched": [], "finished": []}
        finished = self._follow_runs()
        launched = self._launch_queued()
        return {"leader": True, "launched": launched, "finished": finished}

    def _launch_queued(self) -> list[str]:
        """Start queued jobs, oldest first, while capacity allows."""
        room = self.max_concurrent - self.store.count_active()
        capacity = self.launcher.capacity()
        if capacity is not None:
            room = min(room, capacity)
        launched = []
        if room <= 0:
            return launched
        for job_id in self.store.queued_job_ids(room):
            if not self.store.claim_for_launch(job_id, self.owner, LAUNCH_LEASE_SECONDS):
                continue  # another process got it first
            if self._launch(job_id):
                launched.append(job_id)
        return launched

    def _launch(self, job_id: str) -> bool:
        """Submit one claimed job; True when a run was started."""
        token = new_job_token()
        # The hash is stored before the run starts, so its first report is already accepted.
        self.store.set_job_token(job_id, sha256_hex(token))
        job = self.store.get_job(job_id)
        request = LaunchRequest(job_id=job_id, spec=job["spec"], token=token, plane_url=self.plane_url)
        try:
            handle = self.launcher.submit(request)
        except LaunchError as e:
            log.warning("launching job %s failed (%s): %s", job_id, e.reason, e)
            self.store.launch_failed(job_id, e.reason, str(e), e.retryable)
            return False
        except Exception as e:
            log.exception("launcher crashed while submitting job %s", job_id)
            self.store.launch_failed(job_id, "LauncherError", f"the launcher failed: {type(e).__name__}: {e}", False)
            return False
        status = self.store.mark_launched(job_id, handle)
        log.info("launched job %s (handle %s)", job_id, handle)
        if status in ("cancelled", "cancelling"):
            # Cancelled while it was being launched: stop the run we just started.
            self._cancel_run(job_id, handle)
        return True

    def _follow_runs(self) -> list[str]:
        """Poll every active run; returns the jobs this pass finished."""
        finished = []
        for job in self.store.active_jobs():
            job_id, handle = job["id"], job["handle"]
            status = self._poll(job_id, handle)
            if status is None:
                continue
            if status.events:
                self.store.record_run_events(job_id, list(status.events))
            if job["status"] == "cancelling":
                if status.state in ("pending", "running"):
                    self._cancel_run(job_id, handle)
                    status = self._poll(job_id, handle) or status
                if status.state not in ("pending", "running"):
                    if self.store.finish_if(job_id, {"cancelling"}, "cancelled", message="the run was stopped"):
                        finished.append(job_id)
                continue
            if status.state in ("pending", "running"):
                continue
            # The run is over but the job has not reported a final status (yet: its last report may be in flight).
            gone_since = self.store.note_run_gone(job_id)
            if time.time() - gone_since < self.grace_seconds:
                continue
            reason = describe_run(status)
            if self.store.finish_if(job_id, {"running"}, "failed", message=reason,
                                    error={"code": "run_lost", "message": reason}):
                log.warning("job %s failed: %s", job_id, reason)
                finished.append(job_id)
        return finished

    def _poll(self, job_id: str, handle: str) -> RunStatus | None:
        """The launcher's view of a run; None when it could not tell this time (retried next pass)."""
        try:
            return self.launcher.poll(job_id, handle)
        except LaunchError as e:
            if e.retryable:
                log.warning("polling job %s failed, will retry: %s", job_id, e)
                return None
            return RunStatus(state="unknown", reason=e.reason, message=str(e))

    def _cancel_run(self, job_id: str, handle: str) -> None:
        """Ask the launcher to stop a run; failures are logged and retried next pass."""
        try:
            self.launcher.cancel(job_id, handle)
        except LaunchError as e:
            log.warning("cancelling job %s failed, will retry: %s", job_id, e)
            self.store.record_run_events(job_id, [("warning", f"cancel failed, retrying: {e}")])


def describe_run(status: RunStatus) -> str:
    """Why a run ended without a final report, in words (reason, exit code, message)."""
    if status.state == "succeeded":
        head = "the run exited successfully but the job never reported success"
    elif status.state == "failed":
        head = "the run failed without reporting"
    else:
        head = "the run is gone (the launcher no longer knows it)"
    parts = [head]
    if status.reason:
        parts.append(f"reason: {status.reason}")
    if status.exit_code is not None:
        parts.append(f"exit code {status.exit_code}")
    if status.message:
        parts.append(status.message)
    return "; ".join(parts)
