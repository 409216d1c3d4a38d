"""The reconciler: launching within capacity, following runs, failing lost runs, cancelling, leadership."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from job.spec import parse_spec
from service.launchers.base import LaunchError, LaunchRequest, RunStatus
from service.launchers.local import LocalLauncher
from service.reconciler import Reconciler
from service.store import Store, _sqlite_url, sha256_hex
from tests.plugins.plane import make_spec


class FakeLauncher:
    """A launcher double implementing the Protocol: runs are dict entries the test moves by hand."""

    name = "fake"

    def __init__(self):
        """No runs yet."""
        self.requests: list[LaunchRequest] = []
        self.runs: dict[str, RunStatus] = {}
        self.cancelled: list[str] = []
        self.submit_error: LaunchError | None = None
        self.lock = threading.Lock()

    def submit(self, request: LaunchRequest) -> str:
        """Record the request and start a 'running' run."""
        if self.submit_error is not None:
            raise self.submit_error
        with self.lock:
            self.requests.append(request)
            self.runs[request.job_id] = RunStatus("running")
        return f"fake-{request.job_id}"

    def poll(self, job_id: str, handle: str) -> RunStatus:
        """The run's state as the test set it."""
        assert handle == f"fake-{job_id}"
        return self.runs.get(job_id, RunStatus("unknown", reason="NotFound"))

    def cancel(self, job_id: str, handle: str) -> None:
        """Stop the run."""
        self.cancelled.append(job_id)
        self.runs[job_id] = RunStatus("failed", reason="Cancelled")

    def capacity(self) -> int | None:
        """No limit of its own."""
        return None


@pytest.fixture
def store(tmp_path):
    """A SQLite store (the store's own tests cover PostgreSQL)."""
    store = Store(_sqlite_url(tmp_path))
    yield store
    store.close()


def _reconciler(store, launcher, *, max_jobs=1, grace=0.0) -> Reconciler:
    """A reconciler without its thread, driven with reconcile_once()."""
    r = Reconciler(launcher)
    r.store = store
    r.max_concurrent = max_jobs
    r.grace_seconds = grace
    r.plane_url = "http://127.0.0.1:9"
    return r


def _queue(store, name="demo") -> str:
    """A queued job."""
    return store.create_job(parse_spec(make_spec(name)).model_dump(mode="json"), submitter="ci")[0]["id"]


def _status(store, job_id) -> str:
    """The job's status."""
    return store.get_job(job_id)["status"]


def test_launches_oldest_first_within_capacity(store):
    launcher = FakeLauncher()
    r = _reconciler(store, launcher, max_jobs=2)
    a, b, c = _queue(store, "a"), _queue(store, "b"), _queue(store, "c")
    assert r.reconcile_once()["launched"] == [a, b]
    assert [_status(store, j) for j in (a, b, c)] == ["running", "running", "queued"]
    assert r.reconcile_once()["launched"] == []
    launcher.runs[a] = RunStatus("succeeded", exit_code=0)
    store.add_report(a, {"status": "succeeded"})
    assert r.reconcile_once()["launched"] == [c]


def test_the_launch_request_carries_a_fresh_token_whose_hash_is_stored(store):
    launcher = FakeLauncher()
    job_id = _queue(store)
    _reconciler(store, launcher).reconcile_once()
    request = launcher.requests[0]
    assert request.job_id == job_id and request.plane_url == "http://127.0.0.1:9"
    assert request.spec == store.get_job(job_id)["spec"]
    assert request.token.startswith("sft_") and len(request.token) == 47
    assert store.job_token_sha256(job_id) == sha256_hex(request.token)
    events = [e["message"] for e in store.list_events(job_id)[0]]
    assert events[-1] == "queued -> running: launched"
    assert request.token not in str(store.list_events(job_id)[0])


def test_a_run_that_dies_without_reporting_fails_with_the_reason(store):
    launcher = FakeLauncher()
    r = _reconciler(store, launcher, grace=0.3)
    job_id = _queue(store)
    r.reconcile_once()
    launcher.runs[job_id] = RunStatus("failed", reason="OOMKilled", message="container used 64Gi", exit_code=137,
                                      events=[("warning", "OOMKilled: the container ran out of memory")])
    r.reconcile_once()
    assert _status(store, job_id) == "running"  # within the grace period its last report may still arrive
    time.sleep(0.35)
    assert r.reconcile_once()["finished"] == [job_id]
    job = store.get_job(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "run_lost"
    assert "reason: OOMKilled" in job["error"]["message"] and "exit code 137" in job["error"]["message"]
    messages = [e["message"] for e in store.list_events(job_id)[0]]
    assert messages.count("OOMKilled: the container ran out of memory") == 1


def test_a_final_report_within_the_grace_period_wins(store):
    launcher = FakeLauncher()
    r = _reconciler(store, launcher, grace=30)
    job_id = _queue(store)
    r.reconcile_once()
    launcher.runs[job_id] = RunStatus("succeeded", exit_code=0)
    r.reconcile_once()
    store.add_report(job_id, {"status": "succeeded", "artifacts": {"output": "s3://o/"}})
    r.reconcile_once()
    assert _status(store, job_id) == "succeeded"


def test_cancel_of_a_running_job_stops_the_run(store):
    launcher = FakeLauncher()
    r = _reconciler(store, launcher)
    job_id = _queue(store)
    r.reconcile_once()
    assert store.cancel(job_id)["status"] == "cancelling"
    assert r.reconcile_once()["finished"] == [job_id]
    assert launcher.cancelled == [job_id] and _status(store, job_id) == "cancelled"


def test_a_job_cancelled_while_launching_is_stopped(store):
    launcher = FakeLauncher()
    r = _reconciler(store, launcher)
    job_id = _queue(store)
    original = launcher.submit

    def submit_then_user_cancels(request):
        """Start the run, then cancel the job as a user would."""
        handle = original(request)
        store.cancel(job_id)  # the user cancels between submit() and the bookkeeping
        return handle

    launcher.submit = submit_then_user_cancels
    r.reconcile_once()
    assert launcher.cancelled == [job_id] and _status(store, job_id) == "cancelled"


def test_launch_errors_fail_the_job_or_retry(store):
    launcher = FakeLauncher()
    r = _reconciler(store, launcher)
    launcher.submit_error = LaunchError("namespace default: quota exceeded", reason="Forbidden", retryable=True)
    job_id = _queue(store)
    r.reconcile_once()
    assert _status(store, job_id) == "queued"
    assert "launch will be retried" in store.list_events(job_id)[0][-1]["message"]
    launcher.submit_error = LaunchError("image sftops:nope not found", reason="InvalidImage")
    r.reconcile_once()
    job = store.get_job(job_id)
    assert job["status"] == "failed" and job["error"] == {"code": "launch_failed", "message": "image sftops:nope not found"}


def test_only_the_leader_acts_and_no_job_is_launched_twice(store, tmp_path):
    launcher = FakeLauncher()
    jobs = [_queue(store, f"j{i}") for i in range(6)]
    # four processes' reconcilers, each with its own store connection, racing on the same database
    stores = [Store(_sqlite_url(tmp_path)) for _ in range(4)]
    reconcilers = [_reconciler(s, launcher, max_jobs=6) for s in stores]
    barrier = threading.Barrier(4)

    def run(r):
        """Three passes of one reconciler."""
        barrier.wait()
        for _ in range(3):
            r.reconcile_once()

    threads = [threading.Thread(target=run, args=(r,)) for r in reconcilers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(req.job_id for req in launcher.requests) == sorted(jobs)
    assert all(_status(store, j) == "running" for j in jobs)
    for s in stores:
        s.close()


def test_leases_free_the_job_claim_for_another_process(store):
    job_id = _queue(store)
    assert store.claim_for_launch(job_id, "dead-process", 0.05)
    launcher = FakeLauncher()
    r = _reconciler(store, launcher)
    assert r.reconcile_once()["launched"] == []  # still leased, and it holds the only slot
    time.sleep(0.1)
    assert r.reconcile_once()["launched"] == [job_id]


def test_with_the_real_local_launcher_a_silent_exit_fails_the_job(store, tmp_path):
    launcher = LocalLauncher(tmp_path / "runs", command=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    r = _reconciler(store, launcher)
    job_id = _queue(store)
    assert r.reconcile_once()["launched"] == [job_id]
    deadline = time.monotonic() + 20
    while _status(store, job_id) == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        r.reconcile_once()
    job = store.get_job(job_id)
    assert job["status"] == "failed"
    assert "exit code 3" in job["error"]["message"] and "boom" in job["error"]["message"]


def test_with_the_real_local_launcher_cancel_kills_the_run(store, tmp_path):
    launcher = LocalLauncher(tmp_path / "runs", grace_seconds=0.5,
                             command=[sys.executable, "-c", "import time; time.sleep(60)"])
    r = _reconciler(store, launcher)
    job_id = _queue(store)
    r.reconcile_once()
    store.cancel(job_id)
    deadline = time.monotonic() + 20
    while _status(store, job_id) == "cancelling" and time.monotonic() < deadline:
        r.reconcile_once()
        time.sleep(0.1)
    assert _status(store, job_id) == "cancelled"


def test_create_launcher_builds_the_configured_launcher(tmp_path, monkeypatch):
    from service.launchers import create_launcher

    local = create_launcher({"LAUNCHER": "local", "DATA_DIR": str(tmp_path)})
    assert isinstance(local, LocalLauncher) and local.data_dir == tmp_path.resolve()
    with pytest.raises(ValueError, match="K8S_NAMESPAC"):
        create_launcher({"LAUNCHER": "kubernetes", "DATA_DIR": str(tmp_path), "K8S_NAMESPAC": "ml"})
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(LaunchError):
        create_launcher({"LAUNCHER": "kubernetes", "DATA_DIR": str(tmp_path), "K8S_NAMESPACE": "ml"})
    with pytest.raises(ValueError, match="must be 'local' or 'kubernetes'"):
        create_launcher({"LAUNCHER": "slurm"})
