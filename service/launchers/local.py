"""Run each job as a detached local process: the embedded default launcher.

Layout of `data_dir/jobs/<id>/` (0700):
  spec.json   the resolved spec (0600); the job reads it with `--spec`
  job.log     the job's stdout and stderr
  launch.json the runner's pid and start time (the handle, kept so a repeated submit can find it)
  child_pid   the job's pid, written by the runner
  exit_code   the job's exit code, written atomically by the runner when the job ends
  cancel      written by cancel(): when SIGTERM was sent and when SIGKILL is due

The job token travels only in the process environment, never in a file.

Cancelling: SIGTERM goes to the runner, which forwards it once to the job, the way a container
runtime signals PID 1. After `grace_seconds` SIGKILL goes to the whole process group (runner, job
and anything the job started). cancel() never blocks: a daemon thread does the SIGKILL, and
because that thread dies with a plane restart, any later cancel() or poll() past the deadline
recorded in `cancel` sends the SIGKILL itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from service.launchers.base import (
    ENV_JOB_ID,
    ENV_JOB_TOKEN,
    ENV_PLANE_URL,
    LaunchError,
    LaunchRequest,
    RunStatus,
)
from service.launchers.local_runner import CHILD_PID_FILE, EXIT_CODE_FILE, write_atomic

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
LOG_FILE = "job.log"
LAUNCH_FILE = "launch.json"
CANCEL_FILE = "cancel"
LOG_TAIL_BYTES = 64 * 1024
MESSAGE_MAX_CHARS = 500
# Plane settings a job has no business seeing (database password, API tokens, callback key).
_PLANE_SECRET_ENV = re.compile(r"^SFTOPS_.*(SECRET|TOKEN|PASSWORD|PASSWD|DATABASE|DB_URL|KEY)", re.IGNORECASE)


def default_command(python: str, spec_path: Path) -> list[str]:
    """The job's command line: `python -m job run --spec PATH`."""
    return [python, "-m", "job", "run", "--spec", str(spec_path)]


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if gone."""
    stat = _read_stat(pid)
    return None if stat is None else int(stat[19])


def _read_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces); None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # fields after ")": state is [0], starttime (field 22 overall) is [19]
    return raw[raw.rindex(")") + 2 :].split()


def process_alive(pid: int, start_time: int) -> bool:
    """True while the process with this pid and start time runs (a recycled pid or a zombie is not it)."""
    stat = _read_stat(pid)
    return stat is not None and int(stat[19]) == start_time and stat[0] not in ("Z", "X")


class LocalLauncher:
    """Starts each job as `python -m job run` in its own session, supervised by local_runner."""

    name = "local"

    def __init__(
        self,
        data_dir: Path,
        python: str = sys.executable,
        grace_seconds: float = 10.0,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
    ):
        """Jobs live under data_dir/jobs; env is merged over the plane's environment; command replaces the job's (tests)."""
        self.data_dir = Path(data_dir)
        self.python = python
        self.grace_seconds = grace_seconds
        self.env = dict(env or {})
        self.command = list(command) if command is not None else None
        self._children: dict[int, subprocess.Popen] = {}  # runners this process forked, to reap them
        self._lock = threading.Lock()

    def job_dir(self, job_id: str) -> Path:
        """Where a job's files live."""
        return self.data_dir / "jobs" / job_id

    def job_env(self, request: LaunchRequest) -> dict[str, str]:
        """The plane's environment minus its own secrets, plus `env` and the job's id, plane URL and token."""
        env = {k: v for k, v in os.environ.items() if not _PLANE_SECRET_ENV.match(k)}
        env.update(self.env)
        env.update({ENV_JOB_ID: request.job_id, ENV_PLANE_URL: request.plane_url, ENV_JOB_TOKEN: request.token})
        env.setdefault("PYTHONUNBUFFERED", "1")  # so job.log's last line is current
        return env

    def submit(self, request: LaunchRequest) -> str:
        """Write spec.json and start the runner detached; return the handle. Raises LaunchError."""
        job_dir = self.job_dir(request.job_id)
        existing = self._live_handle(job_dir)
        if existing is not None:
            # A plane that died between submit and storing the handle launches the job again with a new
            # token; the old run could no longer report, and two runs must never share an output.
            self._stop_stale_run(request.job_id, existing)
        try:
            job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for stale in (EXIT_CODE_FILE, CHILD_PID_FILE, CANCEL_FILE, LAUNCH_FILE):
                (job_dir / stale).unlink(missing_ok=True)
            spec_path = job_dir / SPEC_FILE
            write_atomic(spec_path, json.dumps(request.spec, indent=2, sort_keys=True) + "\n")
            command = self.command or default_command(self.python, spec_path)
            argv = [self.python, "-m", "service.launchers.local_runner", str(job_dir), "--", *command]
            log_fd = os.open(job_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=subprocess.STDOUT,
                    env=self.job_env(request),
                    cwd=job_dir,
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                os.close(log_fd)
        except OSError as e:
            raise LaunchError(
                f"local job {request.job_id}: cannot start it in {job_dir}: {e} "
                "(check that SFTOPS_DATA_DIR is writable and the python executable exists)",
                reason="StartFailed",
            ) from e
        # 0 never matches a live process: a runner already gone reads as dead, not as someone else's pid
        start_time = process_start_time(proc.pid) or 0
        with self._lock:
            self._children[proc.pid] = proc
        handle = json.dumps({"pid": proc.pid, "start_time": start_time, "job_dir": str(job_dir)}, sort_keys=True)
        write_atomic(job_dir / LAUNCH_FILE, handle + "\n")
        log.info("local job %s started: runner pid %d, log %s", request.job_id, proc.pid, job_dir / LOG_FILE)
        return handle

    def poll(self, job_id: str, handle: str) -> RunStatus:
        """Running while the runner lives; then the recorded exit code decides. Raises LaunchError on a bad handle."""
        pid, start_time, job_dir = self._parse_handle(job_id, handle)
        self._reap(pid)
        code = self._exit_code(job_dir)
        if code is None:
            if process_alive(pid, start_time):
                self._escalate_if_due(job_dir, pid)
                return RunStatus("running")
            # the runner may have written the file and exited between the two checks
            code = self._exit_code(job_dir)
        if code is None:
            if not job_dir.exists():
                return RunStatus("failed", reason="Lost", message=f"the job directory {job_dir} disappeared")
            if (job_dir / CANCEL_FILE).exists():
                return RunStatus("failed", reason="Cancelled", message="cancelled: the job was killed")
            return RunStatus(
                "failed",
                reason="Died",
                message="the job process died without reporting (killed by the OOM killer or a reboot?); "
                f"see {job_dir / LOG_FILE}",
            )
        if code == 0:
            return RunStatus("succeeded", exit_code=0)
        return self._failed(job_dir, code)

    def cancel(self, job_id: str, handle: str) -> None:
        """SIGTERM the job now and SIGKILL its process group after the grace period; idempotent, never blocks."""
        pid, start_time, job_dir = self._parse_handle(job_id, handle)
        self._reap(pid)
        if not process_alive(pid, start_time):
            return
        cancel_file = job_dir / CANCEL_FILE
        if cancel_file.exists():
            self._escalate_if_due(job_dir, pid)
            return
        now = time.time()
        write_atomic(cancel_file, json.dumps({"term_at": now, "kill_at": now + self.grace_seconds}) + "\n")
        self._signal(pid, signal.SIGTERM, group=False)
        log.info("local job %s: SIGTERM sent, SIGKILL in %.0fs if still running", job_id, self.grace_seconds)
        timer = threading.Timer(self.grace_seconds, self._kill_if_alive, args=(job_id, pid, start_time))
        timer.daemon = True
        timer.start()

    def capacity(self) -> int | None:
        """No local limit: the reconciler counts running jobs in the store."""
        return None

    # -- helpers ------------------------------------------------------------------------------

    def _parse_handle(self, job_id: str, handle: str) -> tuple[int, int, Path]:
        """Decode a handle from submit(); raises LaunchError if it is not one."""
        try:
            data = json.loads(handle)
            return int(data["pid"]), int(data["start_time"]), Path(data["job_dir"])
        except (ValueError, TypeError, KeyError) as e:
            raise LaunchError(
                f"local job {job_id}: handle {handle[:80]!r} is not a local launcher handle "
                "(was the job started by another launcher? check SFTOPS_LAUNCHER)",
                reason="BadHandle",
            ) from e

    def _live_handle(self, job_dir: Path) -> str | None:
        """The handle of a runner still alive for this job dir, if any."""
        try:
            handle = (job_dir / LAUNCH_FILE).read_text().strip()
            data = json.loads(handle)
            alive = process_alive(int(data["pid"]), int(data["start_time"]))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, OSError) as e:
            log.warning("ignoring unreadable %s: %s", job_dir / LAUNCH_FILE, e)
            return None
        return handle if alive else None

    def _reap(self, pid: int) -> None:
        """Collect the exit status of a runner this process forked, so it does not linger as a zombie."""
        with self._lock:
            proc = self._children.get(pid)
            if proc is not None and proc.poll() is not None:
                del self._children[pid]

    def _stop_stale_run(self, job_id: str, handle: str) -> None:
        """Stop an earlier run of the same job before starting anew: SIGTERM, then SIGKILL after the grace period."""
        pid, start_time, _ = self._parse_handle(job_id, handle)
        log.warning("local job %s: stopping an earlier run (runner pid %d) before launching it again", job_id, pid)
        self._signal(pid, signal.SIGTERM, group=False)
        deadline = time.monotonic() + self.grace_seconds
        while process_alive(pid, start_time) and time.monotonic() < deadline:
            self._reap(pid)
            time.sleep(0.05)
        if process_alive(pid, start_time):
            self._signal(pid, signal.SIGKILL, group=True)
            while process_alive(pid, start_time):
                self._reap(pid)
                time.sleep(0.05)

    @staticmethod
    def _exit_code(job_dir: Path) -> int | None:
        """The job's exit code as the runner recorded it, or None while there is none."""
        try:
            return int((job_dir / EXIT_CODE_FILE).read_text().strip())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # written atomically, so this is only a foreign file; treat as not yet done

    def _failed(self, job_dir: Path, code: int) -> RunStatus:
        """A failed status naming the exit code (or signal) and the log's last line."""
        if code < 0:
            try:
                what = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                what = f"killed by signal {-code}"
            reason = "Cancelled" if (job_dir / CANCEL_FILE).exists() else "Killed"
        else:
            what, reason = f"exit code {code}", f"exit code {code}"
        last = last_log_line(job_dir / LOG_FILE)
        message = f"{what}: {last}" if last else what
        return RunStatus("failed", reason=reason, message=message, exit_code=code)

    def _escalate_if_due(self, job_dir: Path, pid: int) -> None:
        """SIGKILL the process group if a cancel's grace period has run out (covers a restarted plane)."""
        try:
            kill_at = float(json.loads((job_dir / CANCEL_FILE).read_text())["kill_at"])
        except FileNotFoundError:
            return
        except (ValueError, TypeError, KeyError) as e:
            log.warning("unreadable %s (%s): sending SIGKILL now", job_dir / CANCEL_FILE, e)
            kill_at = 0.0
        if time.time() >= kill_at:
            self._signal(pid, signal.SIGKILL, group=True)

    def _kill_if_alive(self, job_id: str, pid: int, start_time: int) -> None:
        """Timer callback: SIGKILL the process group if the runner still runs after the grace period."""
        if process_alive(pid, start_time):
            log.warning("local job %s ignored SIGTERM for %.0fs: sending SIGKILL", job_id, self.grace_seconds)
            self._signal(pid, signal.SIGKILL, group=True)
        self._reap(pid)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
        """Send a signal to the runner or its whole process group; a process already gone is fine."""
        try:
            if group:
                # the runner is a session leader (start_new_session), so its pid is the group id
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass


def last_log_line(path: Path) -> str:
    """The last non-empty line of a log file (from its tail), trimmed; '' if none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    for line in reversed(tail.splitlines()):
        if line.strip():
            line = line.strip()
            return line if len(line) <= MESSAGE_MAX_CHARS else line[: MESSAGE_MAX_CHARS - 3] + "..."
    return ""
