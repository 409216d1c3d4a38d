"""`python -m job COMMAND`: the batch job's entry point.

Commands: run (the whole job), prepare (data stage), health (analyse a loss log),
import-gguf (turn a GGUF file into a trainable model directory).
Each command module exposes `main(argv) -> int` and raises JobError for anything a user can fix;
this entry turns those into one line on stderr and the error's exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

from job.errors import JobError

COMMANDS = {
    "run": ("job.run", "run a whole job from a spec: pull, prepare, train, verify, export, report"),
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
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
