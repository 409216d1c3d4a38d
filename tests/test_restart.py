"""No job is lost when the plane restarts: real gunicorn stopped and started on the same data dir and port."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import requests

from job.spec import parse_spec
from service.launchers.base import LaunchRequest
from service.launchers.local import LocalLauncher
from service.reconciler import new_job_token
from service.store import sha256_hex
from tests.plugins.plane import make_spec

# A job that reports a step every 0.2 s, tolerates the plane being down, and succeeds once ./finish exists.
FAKE_JOB = """
import json, os, time, urllib.request
url = f"{os.environ['SFTOPS_PLANE_URL']}/v1/jobs/{os.environ['SFTOPS_JOB_ID']}/reports"
headers = {"Authorization": "Bearer " + os.environ["SFTOPS_JOB_TOKEN"], "Content-Type": "application/json"}
def post(body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except OSError:
        return None
step = 0
while not os.path.exists("finish"):
    step += 1
    post({"status": "running", "total_steps": 1000, "metrics": [{"step": step, "train_loss": 2.0 / step}]})
    time.sleep(0.2)
deadline = time.time() + 30
while post({"status": "succeeded", "artifacts": {"output": "file:///tmp/out"}}) != 202 and time.time() < deadline:
    time.sleep(0.2)
"""


def _wait(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll until predicate() is truthy; returns its value or fails naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _start_running_job(plane, launcher: LocalLauncher, name: str) -> str:
    """A job launched the way the reconciler does it, but running FAKE_JOB; returns its id."""
    token = new_job_token()
    spec = parse_spec(make_spec(name)).model_dump(mode="json")
    job, _ = plane.store.create_job(spec, submitter="ci", status="running", token_sha256=sha256_hex(token))
    handle = launcher.submit(LaunchRequest(job["id"], spec, token, plane.url))
    plane.store.mark_launched(job["id"], handle)
    return job["id"]


def test_queued_and_running_jobs_survive_a_restart(plane_factory, tmp_path):
    plane = plane_factory(RECONCILE_INTERVAL=0.3, MAX_CONCURRENT_JOBS=2, REPORT_GRACE_SECONDS=1)
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    launcher = LocalLauncher(plane.data_dir, grace_seconds=1, command=[sys.executable, str(script)])
    survivor = _start_running_job(plane, launcher, "survivor")
    victim = _start_running_job(plane, launcher, "victim")
    # capacity is full, so this one waits in the queue; its data does not exist, so its real run fails fast
    spec = make_spec("queued", base_model=str(tmp_path / "no-model"), dataset=str(tmp_path / "no-data.jsonl"),
                     output=str(tmp_path / "out"))
    queued = requests.post(f"{plane.url}/v1/jobs", json=spec, headers=plane.headers("jobs:write"), timeout=10).json()["id"]
    job = lambda job_id: plane.store.get_job(job_id)  # noqa: E731
    _wait(lambda: (job(survivor)["progress"]["step"] or 0) >= 3, what="the survivor's reports")
    time.sleep(1)
    assert job(queued)["status"] == "queued"

    plane.stop()
    # While the plane is down: the victim's process dies without a word, the survivor keeps training.
    child_pid = int((launcher.job_dir(victim) / "child_pid").read_text())
    os.kill(child_pid, signal.SIGKILL)
    step_at_stop = job(survivor)["progress"]["step"]
    time.sleep(1)
    plane.start()

    _wait(lambda: job(victim)["status"] == "failed", what="the dead run to be failed")
    assert "SIGKILL" in job(victim)["error"]["message"]
    _wait(lambda: job(queued)["status"] != "queued", what="the queued job to launch")
    assert "queued -> running: launched" in [e["message"] for e in plane.store.list_events(queued)[0]]
    _wait(lambda: job(survivor)["progress"]["step"] > step_at_stop + 3, what="the survivor's reports to resume")
    assert job(survivor)["status"] == "running"
    (launcher.job_dir(survivor) / "finish").write_text("")
    _wait(lambda: job(survivor)["status"] == "succeeded", what="the survivor to succeed")
    assert job(survivor)["artifacts"] == {"output": "file:///tmp/out"}
    # the queued job's real run ends on its own (missing data); the plane records how
    _wait(lambda: job(queued)["status"] in ("failed", "cancelled"), timeout=60, what="the queued job to end")
    assert job(queued)["error"]["message"]
    log = Path(plane.log_path).read_text()
    assert "Traceback" not in log, log[-3000:]
