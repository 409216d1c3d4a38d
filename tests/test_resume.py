"""Interrupt `python -m job run` after a checkpoint (SIGTERM, then SIGKILL), rerun, and see it continue from there."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.test_reporter import TOKEN, dead_url
from tests.test_run import ROOT, job_env, run_job, staged, tiny_spec, write_spec  # noqa: F401 (staged: fixture)

TOTAL_STEPS = 15
CHECKPOINT_EVERY = 3
KEY = "runs/resume/"


def complete_steps(s3) -> list[int]:
    """Steps of the complete checkpoints under the output."""
    keys = s3.keys(f"{KEY}checkpoints/")
    return sorted(int(k.split("/")[-2].removeprefix("step-")) for k in keys if k.endswith("/COMPLETE"))


def start_job(spec_path, env) -> subprocess.Popen:
    """Start `python -m job run` in the background."""
    return subprocess.Popen([sys.executable, "-m", "job", "run", "--spec", str(spec_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_after_checkpoint(s3, proc: subprocess.Popen, after: int, sig: signal.Signals) -> tuple[str, float]:
    """Wait (job still running) for a complete checkpoint past step `after`, send `sig`; return stderr, stop time."""
    deadline = time.monotonic() + 180
    try:
        while not any(step > after for step in complete_steps(s3)):
            if proc.poll() is not None:
                pytest.fail(f"job ended (rc {proc.returncode}) before a new checkpoint:\n{proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no new checkpoint within the time limit")
            time.sleep(0.1)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=90)
        return stderr, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_interrupted_job_resumes_from_checkpoint(s3, staged, tmp_path):
    spec = tiny_spec(s3, staged["model"], staged["data"], KEY, max_steps=TOTAL_STEPS,
                     checkpoint_every=CHECKPOINT_EVERY, eval_every=5)
    spec_path = write_spec(tmp_path, spec)
    # A plane that is not there: the job must neither hang on it nor fail because of it.
    env = job_env(tmp_path, SFTOPS_JOB_ID="r1", SFTOPS_PLANE_URL=dead_url(), SFTOPS_JOB_TOKEN=TOKEN)

    # 1. SIGTERM (pod stop, cancel): a prompt, clean exit 143 with one line; checkpoints stay.
    stderr, stop_s = interrupt_after_checkpoint(s3, start_job(spec_path, env), 0, signal.SIGTERM)
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM"), stderr[-3000:]
    assert stop_s < 30  # promptly, not after training to the end
    assert TOKEN not in stderr
    first = complete_steps(s3)[-1]
    assert first < TOTAL_STEPS and f"{KEY}manifest.json" not in s3.keys(KEY)

    # 2. Rerun, then SIGKILL (node loss, OOM kill) after its next checkpoint: nothing runs on the way out.
    proc = start_job(spec_path, env)
    stderr, _ = interrupt_after_checkpoint(s3, proc, first, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert f"resuming from checkpoint step {first}" in stderr
    second = complete_steps(s3)[-1]
    assert first < second < TOTAL_STEPS and f"{KEY}manifest.json" not in s3.keys(KEY)

    # 3. Rerun to the end: continues from the last complete checkpoint, ends at the same step count.
    final = run_job(spec_path, job_env(tmp_path))
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resuming from checkpoint step {second}" in final.stderr
    report = json.loads(s3.get(f"{KEY}report.json"))
    assert report["train"]["resumed_from_step"] == second
    assert report["train"]["steps"] == report["train"]["total_steps"] == TOTAL_STEPS
    records = [json.loads(line) for line in s3.get(f"{KEY}metrics.jsonl").decode().splitlines()]
    train_steps = [r["step"] for r in records if r["train_loss"] is not None]
    assert train_steps == list(range(1, TOTAL_STEPS + 1))  # every step once: nothing lost, nothing repeated
    assert json.loads(s3.get(f"{KEY}manifest.json"))["steps"] == TOTAL_STEPS
    assert not s3.keys(f"{KEY}checkpoints/")
