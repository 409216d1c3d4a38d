"""Resumable checkpoints mirrored to `checkpoint_uri/step-N/`, uploaded in the background, a COMPLETE marker last.

A checkpoint counts only once its COMPLETE marker exists, so a crash mid-upload never leaves a checkpoint that
looks usable. The trainer saves locally (adapter, optimizer, scheduler, RNG, trainer state); `CheckpointSync`
hard-links that directory into a staging area (the trainer may rotate its own copy away meanwhile) and
uploads it on one worker thread. Training waits only if the previous upload has not finished yet.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from job import storage

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STEP_RE = re.compile(r"^step-(\d+)/")


def step_uri(checkpoint_uri: str, step: int) -> str:
    """The prefix of one checkpoint."""
    return storage.join(checkpoint_uri, f"step-{step}") + "/"


def complete_steps(checkpoint_uri: str) -> list[int]:
    """Steps of the complete checkpoints under the URI, ascending; raises StorageError."""
    steps = set()
    for obj in storage.list_objects(checkpoint_uri):
        m = STEP_RE.match(obj.key)
        if m and obj.key == f"step-{m.group(1)}/{MARKER}":
            steps.add(int(m.group(1)))
    return sorted(steps)


def latest_complete(checkpoint_uri: str) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    steps = complete_steps(checkpoint_uri)
    return steps[-1] if steps else None


def download(checkpoint_uri: str, step: int, dest: Path) -> Path:
    """Fetch one complete checkpoint into `dest` (replaced if present) and return it; raises StorageError."""
    if dest.exists():
        shutil.rmtree(dest)
    storage.download_prefix(step_uri(checkpoint_uri, step), dest)
    (dest / MARKER).unlink(missing_ok=True)
    return dest


def _link_tree(src: Path, dest: Path) -> None:
    """Snapshot a directory by hard links (copies where links are impossible): cheap and immune to later deletes."""

    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link_or_copy)


class CheckpointSync:
    """Uploads local checkpoints to `checkpoint_uri/step-N/` on a background thread, keeping the newest `keep`."""

    def __init__(self, checkpoint_uri: str, staging_dir: Path, keep: int = 2):
        """Nothing is uploaded until `submit`."""
        self.uri = checkpoint_uri
        self.staging = Path(staging_dir)
        self.keep = keep
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future | None = None
        self.uploaded: list[int] = []

    def submit(self, step: int, local_dir: Path, extra_files: dict[str, Path] | None = None) -> None:
        """Snapshot `local_dir` (plus extra files copied under their names) and upload it in the background."""
        self.wait()  # back-pressure: one upload in flight, and its failure surfaces here
        target = self.staging / f"step-{step}"
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_tree(Path(local_dir), target)
        for name, path in (extra_files or {}).items():
            if path.is_file():
                shutil.copyfile(path, target / name)  # a copy: these files keep growing
        self._pending = self._pool.submit(self._upload, step, target)

    def _upload(self, step: int, local: Path) -> None:
        """Upload one snapshot, then its marker, then prune old checkpoints; runs on the worker thread."""
        started = time.monotonic()
        prefix = step_uri(self.uri, step)
        storage.delete_prefix(prefix)  # leftovers of an interrupted upload of the same step
        files = storage.upload_prefix(local, prefix)
        marker = {"step": step, "files": sorted(f[len(prefix) :] for f in files), "time": time.time()}
        storage.write_text(prefix + MARKER, json.dumps(marker))
        shutil.rmtree(local, ignore_errors=True)
        self.uploaded.append(step)
        log.info("checkpoint step %d uploaded to %s in %.1f s", step, prefix, time.monotonic() - started)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than `newest`."""
        complete = complete_steps(self.uri)
        old = set(complete[: -self.keep]) if len(complete) > self.keep else set()
        partial = set()
        for obj in storage.list_objects(self.uri):
            m = STEP_RE.match(obj.key)
            if m and int(m.group(1)) < newest and int(m.group(1)) not in complete:
                partial.add(int(m.group(1)))
        # Resume only ever picks the newest complete step, so a pruned step that is half deleted is never used.
        for step in sorted(old | partial):
            storage.delete_prefix(step_uri(self.uri, step))

    def failed(self) -> BaseException | None:
        """The error of a finished upload that failed, without waiting."""
        if self._pending is not None and self._pending.done():
            return self._pending.exception()
        return None

    def wait(self) -> None:
        """Block until the upload in flight is done; re-raises its error (StorageError)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the outstanding upload, then stop the worker; re-raises an upload error."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
