"""`python -m job COMMAND`: the batch job's entry point.

Commands: run (the whole job), prepare (data stage), health (analyse a loss log),
import-gguf (turn a GGUF file into a trainable model directory).
Each command module exposes `main(argv) -> int` and raises JobError for anything a user can fix;
this entry turns those into one line on stderr and the error's exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from job.errors import JobError
from job.run import EXIT_TERMINATED, Terminated


def run(spec_uri: str, work_dir: Path | None = None) -> None:
    """The whole job: parse spec -> validate everything cheap -> pull -> prepare -> train -> verify -> export -> report.

    Raises JobError (exit 2 for input the user must fix) or job.run.Terminated on SIGTERM.
    """
    from job import run as stage  # stages import torch and the trainer lazily
    from job.report import LiveHealth
    from job.spec import load_spec

    with stage.JobRun(work_dir) as job:  # reports running now, failed/succeeded at the end; SIGTERM stops it
        spec = job.start(load_spec(spec_uri))  # log the resolved spec; spec.json beside the artifacts
        stage.validate(spec)  # output not complete and writable, dataset and model present: exit 2 otherwise
        model_dir = stage.pull_model(spec, job.cache_dir)  # resolve, then check it is a causal LM
        data_report = stage.prepare(spec, job.splits_dir)  # validate, normalise, split
        stage.reset_output(spec)  # only when replacing a completed output (export.overwrite)
        live = LiveHealth(spec.health, job.reporter, history=job.train_dir / "metrics.jsonl")  # health as it trains
        result = stage.train(spec, job, model_dir, on_log=live)
        scores = stage.verify(spec, result, job)  # greedy base vs tuned on the verification split
        document = stage.write_report(spec, job, data_report, result, scores)  # report.json/.md, loss.png
        artifacts = stage.export(spec, job, result, model_dir, document)  # upload; manifest.json last
        job.succeeded(artifacts, result.total_steps)  # final status to the plane


def run_main(argv: list[str]) -> int:
    """`python -m job run --spec URI [--work-dir DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m job run", description=COMMANDS["run"][1])
    parser.add_argument("--spec", required=True, help="the job spec: a local path, file:// or s3:// URI (YAML/JSON)")
    parser.add_argument("--work-dir", type=Path, help="scratch directory to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    run(args.spec, args.work_dir)
    return 0


COMMANDS = {
    "run": ("job.__main__:run_main", "run a whole job from a spec: pull, prepare, train, verify, export, report"),
    "prepare": ("job.prepare", "validate, normalize and split a dataset"),
    "health": ("job.health_cli", "analyse a loss log (trainer_state.json or metrics.jsonl)"),
    "import-gguf": ("job.gguf", "dequantize a GGUF model into a Hugging Face model directory"),
}


def usage() -> str:
    """The top-level help text."""
    lines = ["usage: python -m job COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`python -m job COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; map JobError to its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m job: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, _, function = COMMANDS[name][0].partition(":")
    command = getattr(importlib.import_module(module_name), function or "main")
    try:
        return int(command(rest) or 0)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"error: {e}; uploaded checkpoints remain, rerun the same spec to resume", file=sys.stderr)
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
