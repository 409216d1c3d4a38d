"""`python -m job health FILE`: judge a finished or running loss log and print the analysis as JSON.

FILE is a Hugging Face `trainer_state.json` (its `log_history`: entries with `loss` are train points,
entries with `eval_loss` are eval points) or the job's `metrics.jsonl` (one record per line with `step`,
`train_loss`, `eval_loss`). Exit 0 whatever the verdict, 2 for a file that cannot be read or parsed;
with --fail-on-unhealthy, 3 for an unhealthy verdict (the same code as `sftops submit --wait --fail-on-unhealthy`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from job.errors import InputError
from job.health import DEFAULT_THRESHOLDS, UNHEALTHY_VERDICTS, analyze

Points = list[tuple[int, float]]
UNHEALTHY_EXIT = 3  # matches service/cli.py, so CI scripts read one code for "the curve is unhealthy"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m job health", description=__doc__.splitlines()[0])
    p.add_argument("file", help="trainer_state.json or metrics.jsonl")
    p.add_argument("--target-band", default="0.3,0.5", metavar="LOW,HIGH",
                   help="final train loss a healthy run ends in (default 0.3,0.5)")
    p.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help=f"override a health threshold (repeatable); names: {', '.join(sorted(DEFAULT_THRESHOLDS))}")
    p.add_argument("--fail-on-unhealthy", action="store_true",
                   help=f"exit 3 when the verdict is one of {', '.join(sorted(UNHEALTHY_VERDICTS))}")
    return p.parse_args(argv)


def parse_band(text: str) -> tuple[float, float]:
    """Parse LOW,HIGH; raises InputError."""
    parts = text.split(",")
    try:
        low, high = (float(v) for v in parts)
    except ValueError:
        raise InputError(f"--target-band: expected LOW,HIGH such as 0.3,0.5, got {text!r}") from None
    if not (0 <= low < high) or not math.isfinite(high):
        raise InputError(f"--target-band: must satisfy 0 <= LOW < HIGH, got {text!r}")
    return low, high


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """Parse NAME=VALUE overrides; raises InputError naming the bad one."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in DEFAULT_THRESHOLDS:
            raise InputError(f"--threshold {item!r}: expected NAME=VALUE with NAME one of {sorted(DEFAULT_THRESHOLDS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise InputError(f"--threshold {item!r}: {value!r} is not a number") from None
    return out


def _number(value: Any, where: str, field: str, *, integer: bool = False) -> float | int | None:
    """A JSON number (or null) from a log record; raises InputError naming where and the field."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: {field} must be a number, got {json.dumps(value)[:40]}")
    if integer:
        if not math.isfinite(value) or value != int(value) or value < 0:
            raise InputError(f"{where}: {field} must be a whole number >= 0, got {value}")
        return int(value)
    return float(value)


def read_trainer_state(path: Path, text: str) -> tuple[Points, Points]:
    """Train and eval points from a Hugging Face trainer_state.json; raises InputError."""
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise InputError(f"{path}:1: no log_history list: expected a Hugging Face trainer_state.json or a "
                         "metrics.jsonl")
    train: Points = []
    evals: Points = []
    for i, entry in enumerate(history):
        where = f"{path}: log_history[{i}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
        if "loss" not in entry and "eval_loss" not in entry:
            continue  # the run summary (train_loss, train_runtime) and other logs
        _add_points(entry, where, ("loss", "eval_loss"), train, evals)
    return train, evals


def read_metrics_jsonl(path: Path, text: str) -> tuple[Points, Points]:
    """Train and eval points from the job's metrics.jsonl; raises InputError naming the line."""
    train: Points = []
    evals: Points = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object with step, train_loss, eval_loss")
        _add_points(record, where, ("train_loss", "eval_loss"), train, evals)
    return train, evals


def _add_points(record: dict, where: str, keys: tuple[str, str], train: Points, evals: Points) -> None:
    """Append the record's (step, loss) to train and eval under the given keys; raises InputError naming `where`."""
    step = _number(record.get("step"), where, "step", integer=True)
    if step is None:
        raise InputError(f"{where}: step is missing")
    for key, points in zip(keys, (train, evals)):
        value = _number(record.get(key), where, key)
        if value is not None:
            points.append((step, value))


def read_log(path: Path) -> tuple[str, Points, Points]:
    """(format, train points, eval points) from either log format; raises InputError."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{path}:1: the file is empty")
    # trainer_state.json is one indented object with log_history; metrics.jsonl is one object per line.
    first_line = stripped.splitlines()[0].strip()
    one_object_per_line = first_line.startswith("{") and first_line.endswith("}") and '"log_history"' not in first_line
    if path.suffix == ".jsonl" or one_object_per_line:
        fmt, (train, evals) = "metrics.jsonl", read_metrics_jsonl(path, text)
    else:
        fmt, (train, evals) = "trainer_state.json", read_trainer_state(path, text)
    if not train and not evals:
        raise InputError(f"{path}: no train or eval loss points found ({fmt})")
    return fmt, train, evals


def main(argv: list[str]) -> int:
    """Analyse FILE and print the analysis as one JSON object; raises InputError for a bad file or option."""
    args = parse_args(argv)
    band = parse_band(args.target_band)
    thresholds = parse_thresholds(args.threshold)
    path = Path(args.file)
    fmt, train, evals = read_log(path)
    try:
        result = analyze(train, evals, target_band=band, thresholds=thresholds)
    except ValueError as e:
        raise InputError(f"--threshold: {e}") from None
    out = {"file": str(path), "format": fmt, "target_band": list(band), **result}
    print(json.dumps(out, indent=2, allow_nan=False))
    if args.fail_on_unhealthy and result["verdict"] in UNHEALTHY_VERDICTS:
        print(f"unhealthy: {result['verdict']}: {'; '.join(result['reasons'][:1])}", file=sys.stderr)
        return UNHEALTHY_EXIT
    return 0
