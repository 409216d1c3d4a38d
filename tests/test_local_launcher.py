"""LocalLauncher with real processes: outcomes, cancel with SIGTERM then SIGKILL, re-attach after a plane restart."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.launchers.base import LaunchError, LaunchRequest
from service.launchers.local import LocalLauncher, default_command, last_log_line, process_alive

TOKEN = "sft_" + "T0kenValueThatMustNeverBeWrittenAnywhere0000"
PLANE_URL = "http://127.0.0.1:8123"
SPEC = {"name": "demo", "base_model": "s3://models/m/", "dataset": "s3://data/d.jsonl", "output": "s3://out/o/"}

SCRIPTS = {
    "ok": """
        import hashlib, os
        print("job", os.environ["SFTOPS_JOB_ID"], "plane", os.environ["SFTOPS_PLANE_URL"])
        print("token sha256", hashlib.sha256(os.environ["SFTOPS_JOB_TOKEN"].encode()).hexdigest())
        print("extra", os.environ.get("EXTRA_SETTING"), "plane secret", os.environ.get("SFTOPS_DATABASE_URL"))
        print("done")
    """,
    "bad_input": """
        import sys
        print("loading dataset")
        print("error: s3://data/d.jsonl:3: assistant turn is empty (remove the row or set on_invalid: skip)",
              file=sys.stderr)
        print("", file=sys.stderr)
        sys.exit(2)
    """,
    "graceful": """
        import signal, sys, time
        def stop(signum, frame):
            print("got SIGTERM, saving checkpoint", flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """,
    "stubborn": """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """,
    "sleep_then_ok": """
        import time
        print("ready", flush=True)
        time.sleep(1.0)
        print("finished")
    """,
}


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until predicate() is truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {predicate}")


def wait_done(launcher: LocalLauncher, job_id: str, handle: str, timeout: float = 10.0):
    """Poll until the run is no longer running; return its RunStatus."""
    return wait_for(lambda: (s := launcher.poll(job_id, handle)).state != "running" and s, timeout)


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, list[str]]:
    """Each test script written to disk, as a command line."""
    out = {}
    for name, body in SCRIPTS.items():
        path = tmp_path / "scripts" / f"{name}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(body))
        out[name] = [sys.executable, str(path)]
    return out


def make(tmp_path: Path, command: list[str], **kw) -> LocalLauncher:
    """A launcher over tmp_path/data running the given command as the job."""
    return LocalLauncher(tmp_path / "data", command=command, **kw)


def request(job_id: str = "job1") -> LaunchRequest:
    """A launch request carrying the secret token."""
    return LaunchRequest(job_id=job_id, spec=SPEC, token=TOKEN, plane_url=PLANE_URL)


def all_files_text(root: Path) -> str:
    """Every file under root, concatenated (to look for leaked secrets)."""
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


def test_success_env_and_no_token_on_disk(tmp_path, scripts, monkeypatch):
    """A job exiting 0 succeeds; it sees its id, plane URL and token in env, and the token is in no file."""
    monkeypatch.setenv("SFTOPS_DATABASE_URL", "postgresql://plane:dbpassword@db/sftops")
    launcher = make(tmp_path, scripts["ok"], env={"EXTRA_SETTING": "on"})
    handle = launcher.submit(request())
    status = wait_done(launcher, "job1", handle)
    assert (status.state, status.exit_code, status.reason) == ("succeeded", 0, None)

    job_dir = tmp_path / "data" / "jobs" / "job1"
    log = (job_dir / "job.log").read_text()
    assert f"job job1 plane {PLANE_URL}" in log
    assert f"token sha256 {hashlib.sha256(TOKEN.encode()).hexdigest()}" in log
    assert "extra on plane secret None" in log  # env merged; the plane's own secrets are not passed on
    assert TOKEN not in all_files_text(tmp_path / "data")
    assert TOKEN not in handle

    assert json.loads((job_dir / "spec.json").read_text()) == SPEC
    assert stat.S_IMODE((job_dir / "spec.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    assert (job_dir / "exit_code").read_text() == "0\n"
    assert json.loads(handle)["job_dir"] == str(job_dir)


def test_exit_code_2_names_last_log_line(tmp_path, scripts):
    """A job exiting 2 fails with the code and its last non-empty stderr line."""
    launcher = make(tmp_path, scripts["bad_input"])
    handle = launcher.submit(request())
    status = wait_done(launcher, "job1", handle)
    assert status.state == "failed"
    assert status.exit_code == 2
    assert status.reason == "exit code 2"
    assert status.message == (
        "exit code 2: error: s3://data/d.jsonl:3: assistant turn is empty (remove the row or set on_invalid: skip)"
    )


def test_cancel_graceful_job_exits_on_sigterm(tmp_path, scripts):
    """cancel() sends SIGTERM once; a job that handles it stops at once, well before the grace period."""
    launcher = make(tmp_path, scripts["graceful"], grace_seconds=30)
    handle = launcher.submit(request())
    log = tmp_path / "data" / "jobs" / "job1" / "job.log"
    wait_for(lambda: "ready" in log.read_text())
    started = time.monotonic()
    launcher.cancel("job1", handle)
    assert time.monotonic() - started < 1.0  # never blocks the caller
    status = wait_done(launcher, "job1", handle, timeout=5)
    assert (status.state, status.exit_code) == ("failed", 143)
    assert status.message == "exit code 143: got SIGTERM, saving checkpoint"
    assert log.read_text().count("got SIGTERM") == 1  # forwarded once, not once per process in the group
    launcher.cancel("job1", handle)  # idempotent after the end


def test_cancel_escalates_to_sigkill_after_grace(tmp_path, scripts):
    """A job ignoring SIGTERM is killed with its whole process group after grace_seconds."""
    launcher = make(tmp_path, scripts["stubborn"], grace_seconds=1.0)
    handle = launcher.submit(request())
    job_dir = tmp_path / "data" / "jobs" / "job1"
    wait_for(lambda: "ready" in (job_dir / "job.log").read_text())
    child_pid = int((job_dir / "child_pid").read_text())
    launcher.cancel("job1", handle)
    launcher.cancel("job1", handle)  # a second call before the deadline changes nothing
    time.sleep(0.1)
    assert launcher.poll("job1", handle).state == "running"  # still in its grace period
    status = wait_done(launcher, "job1", handle, timeout=5)
    assert (status.state, status.reason) == ("failed", "Cancelled")
    wait_for(lambda: not Path(f"/proc/{child_pid}").exists() or "Z" in Path(f"/proc/{child_pid}/stat").read_text())


def test_restarted_plane_escalates_a_cancel_itself(tmp_path, scripts):
    """If the SIGKILL timer died with the plane, a new launcher's cancel() past the deadline sends SIGKILL."""
    first = make(tmp_path, scripts["stubborn"], grace_seconds=300)
    handle = first.submit(request())
    job_dir = tmp_path / "data" / "jobs" / "job1"
    wait_for(lambda: "ready" in (job_dir / "job.log").read_text())
    first.cancel("job1", handle)
    # the plane restarts: the old timer is far off, and the recorded deadline is moved into the past
    cancel = json.loads((job_dir / "cancel").read_text())
    (job_dir / "cancel").write_text(json.dumps({**cancel, "kill_at": time.time() - 1}))
    second = make(tmp_path, scripts["stubborn"], grace_seconds=300)
    assert second.poll("job1", handle).state in ("running", "failed")  # poll escalates too
    second.cancel("job1", handle)
    status = wait_done(second, "job1", handle, timeout=5)
    assert (status.state, status.reason) == ("failed", "Cancelled")


def test_reattach_after_restart_to_running_and_finished(tmp_path, scripts):
    """A fresh launcher (a restarted plane) follows a job it did not start, through to its exit code."""
    first = make(tmp_path, scripts["sleep_then_ok"])
    handle = first.submit(request())
    second = make(tmp_path, scripts["sleep_then_ok"])
    assert second.poll("job1", handle).state == "running"
    assert wait_done(second, "job1", handle).state == "succeeded"
    third = make(tmp_path, scripts["sleep_then_ok"])
    assert third.poll("job1", handle).state == "succeeded"


def test_reattach_to_finished_failure(tmp_path, scripts):
    """The exit code file outlives the runner: a new launcher still reports the failure and its message."""
    first = make(tmp_path, scripts["bad_input"])
    handle = first.submit(request())
    wait_done(first, "job1", handle)
    status = make(tmp_path, scripts["ok"]).poll("job1", handle)
    assert (status.state, status.exit_code) == ("failed", 2)
    assert status.message.startswith("exit code 2: error: s3://data/d.jsonl:3:")


def test_runner_killed_without_exit_file_is_reported(tmp_path, scripts):
    """If the runner dies without recording an exit code, the job failed without reporting."""
    launcher = make(tmp_path, scripts["stubborn"])
    handle = launcher.submit(request())
    job_dir = tmp_path / "data" / "jobs" / "job1"
    wait_for(lambda: "ready" in (job_dir / "job.log").read_text())
    os.killpg(json.loads(handle)["pid"], 9)
    status = wait_done(launcher, "job1", handle)
    assert (status.state, status.reason) == ("failed", "Died")
    assert status.message.startswith("the job process died without reporting")


def test_recycled_pid_is_not_mistaken_for_the_runner(tmp_path, scripts):
    """A handle whose start time does not match the live pid reads as a dead runner."""
    me = os.getpid()
    assert process_alive(me, int(Path(f"/proc/{me}/stat").read_text().rsplit(")", 1)[1].split()[19]))
    handle = json.dumps({"pid": me, "start_time": 1, "job_dir": str(tmp_path / "data" / "jobs" / "ghost")})
    (tmp_path / "data" / "jobs" / "ghost").mkdir(parents=True)
    launcher = make(tmp_path, scripts["ok"])
    assert launcher.poll("ghost", handle).reason == "Died"
    launcher.cancel("ghost", handle)  # must not signal this test process
    assert process_alive(me, int(Path(f"/proc/{me}/stat").read_text().rsplit(")", 1)[1].split()[19]))


def test_submitting_a_running_job_again_replaces_the_run(tmp_path, scripts):
    """A second submit (new token) stops the earlier run first: never two runs of one job at once."""
    launcher = make(tmp_path, scripts["graceful"], grace_seconds=5)
    log = tmp_path / "data" / "jobs" / "job1" / "job.log"
    first = launcher.submit(request())
    wait_for(lambda: "ready" in log.read_text())
    second = launcher.submit(request())
    assert second != first
    assert launcher.poll("job1", second).state == "running"
    assert not process_alive(json.loads(first)["pid"], json.loads(first)["start_time"])
    assert log.read_text().count("got SIGTERM") == 1
    launcher.cancel("job1", second)
    assert wait_done(launcher, "job1", second).state == "failed"


def test_missing_command_fails_with_127(tmp_path):
    """A job command that cannot start is a failure with exit code 127 and the reason."""
    launcher = make(tmp_path, [str(tmp_path / "no-such-binary")])
    handle = launcher.submit(request())
    status = wait_done(launcher, "job1", handle)
    assert (status.state, status.exit_code) == ("failed", 127)
    assert "cannot start the job command" in status.message


@pytest.mark.parametrize("handle", ["", "{}", "not json", '{"pid": "x", "start_time": 1, "job_dir": "/"}'])
def test_bad_handle_is_a_launch_error(tmp_path, handle):
    """A handle that is not ours raises LaunchError(BadHandle) naming the job."""
    launcher = LocalLauncher(tmp_path)
    with pytest.raises(LaunchError, match="local job j1: handle") as info:
        launcher.poll("j1", handle)
    assert info.value.reason == "BadHandle"


def test_unwritable_data_dir_is_a_launch_error(tmp_path):
    """A data dir that cannot be created raises LaunchError saying what to check."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LaunchError, match="SFTOPS_DATA_DIR is writable") as info:
        LocalLauncher(blocker / "data").submit(request())
    assert info.value.reason == "StartFailed"


def test_default_command_and_capacity(tmp_path):
    """The job runs `python -m job run --spec <spec.json>`; capacity is left to the reconciler."""
    assert default_command("/usr/bin/python3", tmp_path / "spec.json") == [
        "/usr/bin/python3", "-m", "job", "run", "--spec", str(tmp_path / "spec.json"),
    ]
    assert LocalLauncher(tmp_path).capacity() is None


def test_last_log_line(tmp_path):
    """The last non-empty line is found past trailing blank lines, and long lines are trimmed."""
    log = tmp_path / "job.log"
    assert last_log_line(log) == ""
    log.write_text("first\nsecond  \n\n  \n")
    assert last_log_line(log) == "second"
    log.write_text("x" * 2000 + "\n")
    assert last_log_line(log) == "x" * 497 + "..."


def test_real_job_command_bad_input(tmp_path):
    """The default command really runs `python -m job run --spec spec.json`: a missing dataset fails with exit 2."""
    spec = {"name": "demo", "base_model": str(tmp_path / "model"), "dataset": str(tmp_path / "missing.jsonl"),
            "output": str(tmp_path / "out")}
    launcher = LocalLauncher(tmp_path / "data")
    # nothing listens on port 9: the job's reporter retries in the background and must not block the exit
    handle = launcher.submit(LaunchRequest(job_id="real1", spec=spec, token=TOKEN, plane_url="http://127.0.0.1:9"))
    status = wait_done(launcher, "real1", handle, timeout=30)
    assert (status.state, status.exit_code) == ("failed", 2)
    assert status.message.startswith(f"exit code 2: error: dataset {tmp_path / 'missing.jsonl'}: not found")
    assert TOKEN not in all_files_text(tmp_path / "data")
