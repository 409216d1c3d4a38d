"""Supervise one local job process and leave its outcome on disk for any plane process to read.

Usage: python -m service.launchers.local_runner JOB_DIR -- COMMAND [ARG...]

The plane starts this runner detached (its own session), so the job outlives a plane restart.
A restarted plane cannot waitpid() a process it did not fork, so the runner does it instead:
it records the job's pid in JOB_DIR/child_pid, waits for it, and writes the exit code to
JOB_DIR/exit_code atomically. SIGTERM/SIGINT/SIGHUP sent to the runner are forwarded once to the
job (as a container runtime does to PID 1). The runner writes nothing to the log once the job has
started, so the log's last line stays the job's own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

CHILD_PID_FILE = "child_pid"
EXIT_CODE_FILE = "exit_code"
EXIT_CANNOT_START = 127
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def write_atomic(path: Path, text: str) -> None:
    """Write text so that a reader sees either no file or the whole content (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    """Split `JOB_DIR -- COMMAND...`; raises ValueError with the usage on bad input."""
    usage = "usage: python -m service.launchers.local_runner JOB_DIR -- COMMAND [ARG...]"
    if len(argv) < 3 or argv[1] != "--":
        raise ValueError(usage)
    return Path(argv[0]), argv[2:]


def run(job_dir: Path, command: list[str]) -> int:
    """Start the command, forward stop signals to it, record its pid and exit code; return the code."""
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        """Pass a stop signal on to the job, or remember it until the job exists."""
        if child is None:
            pending.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    try:
        # stdio is inherited: the launcher already points it at job.log.
        child = subprocess.Popen(command, cwd=job_dir)
    except OSError as e:
        print(f"sftops: cannot start the job command {command[0]!r}: {e}", file=sys.stderr, flush=True)
        write_atomic(job_dir / EXIT_CODE_FILE, f"{EXIT_CANNOT_START}\n")
        return EXIT_CANNOT_START
    write_atomic(job_dir / CHILD_PID_FILE, f"{child.pid}\n")
    if pending:
        # a cancel arrived while the job was being started
        child.send_signal(pending[0])
    code = child.wait()
    write_atomic(job_dir / EXIT_CODE_FILE, f"{code}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point; exits 0 once the outcome is recorded, 64 on bad usage."""
    try:
        job_dir, command = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 64
    run(job_dir, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
