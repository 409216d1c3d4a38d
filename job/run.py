"""The stages of `python -m job run`; the order they run in is spelled out in job/__main__.py.

Each stage is a plain function of the spec and local paths. `JobRun` holds what lives for the whole job:
the work directory, the reporter to the plane, and the SIGTERM handler that stops the job promptly.
torch and the trainer are imported inside the stages that need them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from job import storage
from job.errors import InputError, JobError
from job.reporter import NullReporter, Reporter
from job.spec import JobSpec, dump_spec

log = logging.getLogger("job.run")

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
EXIT_TERMINATED = 143  # 128 + SIGTERM, what Kubernetes and shells expect


class Terminated(BaseException):
    """SIGTERM arrived (pod stop, cancel): unwinds the job like KeyboardInterrupt, past `except Exception`."""

    def __init__(self, signum: int):
        """Remember which signal stopped the job."""
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class JobRun:
    """One job's lifetime: work dirs, reporter, SIGTERM handling and the final status report."""

    def __init__(self, work_dir: Path | None = None, reporter: Reporter | NullReporter | None = None):
        """Use `work_dir` (kept) or a temporary directory (removed at the end)."""
        configured = work_dir or os.environ.get("SFTOPS_WORK_DIR")
        self._temporary = configured is None
        self.work_dir = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="sftops-job-"))
        self.out_dir = self.work_dir / "out"  # mirrors the output prefix; uploaded by export
        self.splits_dir = self.out_dir / "splits"
        self.train_dir = self.work_dir / "train"  # the trainer's scratch; its metrics.jsonl is the live log
        self.cache_dir = Path(os.environ.get("SFTOPS_MODEL_CACHE") or Path.home() / ".cache" / "sftops")
        self.reporter = reporter if reporter is not None else Reporter.from_env()
        self.step: int | None = None
        self._finished = False
        self._previous_sigterm: Any = None

    def __enter__(self) -> JobRun:
        """Start reporting (status running) and turn SIGTERM into `Terminated`."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.reporter.start()
        self.reporter.status("running")
        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread (an embedding caller); it handles signals itself
            self._previous_sigterm = None
        return self

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        """Raise once in the main thread; a second SIGTERM during cleanup is ignored."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(signum)

    def start(self, spec: JobSpec) -> JobSpec:
        """Log the resolved spec and save it as spec.json beside the artifacts."""
        text = dump_spec(spec)
        log.info("job %s: resolved spec:\n%s", spec.name, text.rstrip())
        (self.out_dir / "spec.json").write_text(text, encoding="utf-8")
        self.reporter.event("info", f"job {spec.name} started", {"output": spec.output})
        return spec

    def succeeded(self, artifacts: dict[str, Any], total_steps: int | None) -> None:
        """Report success with the artifacts' URIs (flushed synchronously, bounded time)."""
        log.info("job succeeded: %s", artifacts["manifest"])
        self.reporter.finish("succeeded", artifacts=artifacts, total_steps=total_steps)
        self._finished = True

    def __exit__(self, exc_type, exc, tb) -> None:
        """Report failure (or a stop) and clean up; the exception itself propagates to the entry."""
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        try:
            if exc is not None and not self._finished:
                self._report_end(exc)
        finally:
            if self._temporary:
                shutil.rmtree(self.work_dir, ignore_errors=True)  # best effort: only scratch files live there

    def _report_end(self, exc: BaseException) -> None:
        """Send what the plane needs about how the job ended."""
        if isinstance(exc, (Terminated, KeyboardInterrupt)):
            # No terminal status: the plane decides (cancelled, or a restarted pod resumes from the checkpoints).
            self.reporter.event("warning", f"job interrupted ({exc or 'SIGINT'}); uploaded checkpoints remain for resume")
            self.reporter.finish(None)
            return
        error = {"code": error_code(exc), "message": str(exc)[:4000] or type(exc).__name__}
        self.reporter.event("error", error["message"], {"code": error["code"]})
        self.reporter.finish("failed", error=error)


def error_code(exc: BaseException) -> str:
    """The plane's error code for an exception: invalid_input for exit-2 errors, else the error's own code."""
    if isinstance(exc, JobError):
        if exc.exit_code == 2:
            return "invalid_input"
        return getattr(exc, "code", None) or "training_failed"
    return "internal"


# ---------------------------------------------------------------- validate (cheap, before any heavy work)


def validate(spec: JobSpec) -> None:
    """Check output, dataset and model cheaply; raises InputError/StorageError (exit 2) and writes nothing lasting."""
    if storage.exists(storage.join(spec.output, MANIFEST)) and not spec.export.overwrite:
        raise InputError(
            f"output {spec.output} already holds a completed job (manifest.json): "
            "choose a new output or set export.overwrite: true"
        )
    storage.check_writable(spec.output)
    if not storage.exists(spec.dataset):
        raise InputError(f"dataset {spec.dataset}: not found (check the dataset field)")
    if spec.base_model.startswith("hf://"):
        return  # only a download can tell; resolve_model names the repository if it fails
    config = storage.join(spec.base_model, "config.json")
    if not storage.exists(config):
        raise InputError(
            f"base_model {spec.base_model}: no config.json there (it must be a Hugging Face model directory)"
        )


def pull_model(spec: JobSpec, cache_dir: Path) -> Path:
    """Resolve the base model to a local directory and check it is a causal LM; raises InputError/StorageError."""
    from job.model import check_model_dir, resolve_model

    model_dir = resolve_model(spec.base_model, cache_dir)
    check_model_dir(model_dir, spec.base_model)
    log.info("base model %s at %s", spec.base_model, model_dir)
    return model_dir


def prepare(spec: JobSpec, splits_dir: Path) -> dict[str, Any]:
    """Validate, normalise and split the dataset into splits_dir; returns the data report."""
    from job.data import prepare as prepare_data

    report = prepare_data(
        spec.dataset, splits_dir, fmt=spec.format, split=spec.split, min_rows=spec.min_rows, on_invalid=spec.on_invalid
    )
    log.info("data: %s rows valid of %s read, splits %s", report["rows_valid"], report["rows_read"], report["splits"])
    return report


def reset_output(spec: JobSpec) -> None:
    """When replacing a completed output, drop its old checkpoints so training starts fresh instead of resuming."""
    if spec.export.overwrite and storage.exists(storage.join(spec.output, MANIFEST)):
        log.info("export.overwrite: the completed output %s will be replaced", spec.output)
        storage.delete_prefix(storage.join(spec.output, CHECKPOINTS))


def train(spec: JobSpec, run: JobRun, model_dir: Path, on_log: Any) -> Any:
    """Train the LoRA adapter, checkpointing under OUTPUT/checkpoints/ and resuming from there."""
    from job.train import train as train_lora

    result = train_lora(
        spec,
        run.splits_dir,
        model_dir,
        run.train_dir,
        checkpoint_uri=storage.join(spec.output, CHECKPOINTS),
        on_log=on_log,
        on_start=run.reporter.total_steps,
    )
    if result.resumed_from_step:
        run.reporter.event("info", f"resumed from checkpoint at step {result.resumed_from_step}")
    log.info(
        "trained %d/%d steps in %.1f s on %s (%s)",
        result.global_step, result.total_steps, result.train_runtime_s, result.device, result.dtype,
    )
    shutil.copyfile(result.metrics_path, run.out_dir / "metrics.jsonl")
    return result


def verify(spec: JobSpec, result: Any, run: JobRun) -> dict[str, Any] | None:
    """Greedy generation on the verification split, base vs tuned; None when disabled."""
    if not spec.verify.enabled:
        log.info("verification disabled (verify.enabled: false)")
        return None
    from job.verify import run_verification

    return run_verification(
        result.model,
        result.tokenizer,
        run.splits_dir / "verification.jsonl",
        run.out_dir / "predictions.jsonl",
        max_new_tokens=spec.verify.max_new_tokens,
        batch_size=spec.verify.batch_size,
    )




def write_report(spec: JobSpec, run: JobRun, data_report: dict[str, Any], result: Any, scores: Any) -> dict[str, Any]:
    """report.json, report.md and loss.png into the output staging dir; returns the report."""
    from job import report

    metrics = report.read_metrics(run.out_dir / "metrics.jsonl")
    analysis = report.final_health(metrics, spec.health)
    document = report.build_report(
        spec,
        device=str(result.device),
        data=data_report,
        train=report.train_summary(result, metrics),
        health_analysis=analysis,
        verification=scores,
    )
    report.write_reports(run.out_dir, document, metrics)
    log.info("health: %s (%s)", analysis["verdict"], "; ".join(analysis.get("reasons") or []) or "-")
    run.reporter.event("info", f"final health: {analysis['verdict']}", {"reasons": analysis.get("reasons", [])})
    return document


def export(spec: JobSpec, run: JobRun, result: Any, model_dir: Path, document: dict[str, Any]) -> dict[str, Any]:
    """Save adapter/merged weights, upload everything with manifest.json last, then drop the checkpoints."""
    from job import export as exporter

    exporter.save_model(result.model, result.tokenizer, run.out_dir, spec.export, model_dir)
    artifacts = exporter.publish(
        run.out_dir,
        spec.output,
        overwrite=spec.export.overwrite,
        status="succeeded",
        job={"name": spec.name, "id": os.environ.get("SFTOPS_JOB_ID")},
        device=str(result.device),
        dtype=str(result.dtype),
        steps=result.global_step,
        health=document["health"]["verdict"],
    )
    # The output is complete now; checkpoints only served resuming and are not part of it.
    storage.delete_prefix(storage.join(spec.output, CHECKPOINTS) + "/")
    return artifacts
