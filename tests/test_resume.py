"""Interrupt `python -m job run` after a checkpoint (SIGTERM, SIGKILL), rerun, and see it continue from there."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.test_reporter import TOKEN, dead_url
from tests.test_run import ROOT, job_env, run_job, staged, tiny_spec, write_spec  # noqa: F401 (staged: fixture)

TOTAL_STEPS = 12
CHECKPOINT_EVERY = 3


def wait_for_checkpoint(s3, proc: subprocess.Popen, key_prefix: str, timeout: float = 180) -> None:
    """Poll S3 until the first complete checkpoint exists (the job must still be running)."""
    marker = f"{key_prefix}checkpoints/step-{CHECKPOINT_EVERY}/COMPLETE"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in s3.keys(f"{key_prefix}checkpoints/"):
            return
        if proc.poll() is not None:
            pytest.fail(f"job ended (rc {proc.returncode}) before its first checkpoint:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("no checkpoint within the time limit")


def complete_steps(s3, key_prefix: str) -> list[int]:
    """Steps of the complete checkpoints under the output."""
    keys = s3.keys(f"{key_prefix}checkpoints/")
    return sorted(int(k.split("/")[-2].removeprefix("step-")) for k in keys if k.endswith("/COMPLETE"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_interrupted_job_resumes_from_checkpoint(sig, s3, staged, tmp_path):
    key = f"runs/resume-{sig.name.lower()}/"
    spec = tiny_spec(s3, staged["model"], staged["data"], key, max_steps=TOTAL_STEPS,
                     checkpoint_every=CHECKPOINT_EVERY, eval_every=6)
    spec_path = write_spec(tmp_path, spec)
    # A plane that is not there: the job must neither hang on it nor fail because of it.
    env = job_env(tmp_path, SFTOPS_JOB_ID="r1", SFTOPS_PLANE_URL=dead_url(), SFTOPS_JOB_TOKEN=TOKEN)

    proc = subprocess.Popen([sys.executable, "-m", "job", "run", "--spec", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(s3, proc, key)
        stopped_at = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        stop_s = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
        assert stop_s < 30  # promptly, not after training to the end
    else:
        assert proc.returncode == -signal.SIGKILL
    assert TOKEN not in stderr
    assert f"{key}manifest.json" not in s3.keys(key)  # not complete
    steps = complete_steps(s3, key)
    assert steps and steps[-1] < TOTAL_STEPS  # stopped part-way, checkpoints kept
    resume_step = steps[-1]

    rerun = run_job(spec_path, job_env(tmp_path))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from checkpoint step {resume_step}" in rerun.stderr
    report = json.loads(s3.get(f"{key}report.json"))
    assert report["train"]["resumed_from_step"] == resume_step
    assert report["train"]["steps"] == report["train"]["total_steps"] == TOTAL_STEPS
    records = [json.loads(line) for line in s3.get(f"{key}metrics.jsonl").decode().splitlines()]
    train_steps = [r["step"] for r in records if r["train_loss"] is not None]
    assert train_steps == list(range(1, TOTAL_STEPS + 1))  # every step once: nothing lost, nothing repeated
    assert json.loads(s3.get(f"{key}manifest.json"))["steps"] == TOTAL_STEPS
    assert not s3.keys(f"{key}checkpoints/")
