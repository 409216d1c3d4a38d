"""`python -m job prepare`: validate, normalize and split a dataset into train/test/verification JSONL.

The splits and data_report.json are written to a local temporary directory first and then copied to --out
(a directory or an s3:// prefix), data_report.json last, so an output with a report is always complete.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pydantic import ValidationError

from job import data, storage
from job.errors import InputError
from job.formats import FORMATS
from job.spec import SplitSpec, format_validation_error


class _Parser(argparse.ArgumentParser):
    """argparse that raises InputError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        """Turn a usage error into InputError."""
        raise InputError(f"prepare: {message} (see python -m job prepare --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = _Parser(prog="python -m job prepare", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset: s3://bucket/key, file:// URI or local path")
    p.add_argument("--out", required=True, help="output: s3://bucket/prefix/ or a local directory")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="row format (default: auto-detect)")
    p.add_argument("--seed", default="42", help="seed of the split hash (default 42)")
    p.add_argument("--ratios", default="0.85,0.10,0.05", help="train,test,verification shares (default 0.85,0.10,0.05)")
    p.add_argument("--min-rows", default="100", help="fail with fewer valid rows than this (default 100)")
    p.add_argument("--on-invalid", default="fail", choices=("fail", "skip"), help="fail on bad rows, or skip them")
    return p


def parse_split(ratios: str, seed: str) -> SplitSpec:
    """--ratios and --seed as a SplitSpec; raises InputError naming the option."""
    parts = [p.strip() for p in ratios.split(",")]
    try:
        train, test, verification = (float(p) for p in parts)
    except ValueError:
        raise InputError(
            f"--ratios: expected three comma-separated numbers train,test,verification (e.g. 0.85,0.10,0.05), got {ratios!r}"
        ) from None
    try:
        seed_value = int(seed)
    except ValueError:
        raise InputError(f"--seed: expected a non-negative integer, got {seed!r}") from None
    try:
        return SplitSpec(train=train, test=test, verification=verification, seed=seed_value)
    except ValidationError as e:
        first = format_validation_error(e, "x").splitlines()[0].split(": ", 2)
        field, message = first[1], first[2]
        option = "--seed" if field == "seed" else "--ratios"
        where = f"{field}: " if field not in ("(root)", "seed") else ""
        raise InputError(f"{option}: {where}{message}") from None


def main(argv: list[str]) -> int:
    """Run the data stage from the command line; raises InputError/StorageError for the user to fix."""
    args = build_parser().parse_args(argv)
    split = parse_split(args.ratios, args.seed)
    try:
        min_rows = int(args.min_rows)
    except ValueError:
        raise InputError(f"--min-rows: expected an integer, got {args.min_rows!r}") from None
    if min_rows < 3:
        raise InputError(f"--min-rows: must be at least 3 (one row per split), got {min_rows}")

    # Fail on an unwritable output before spending minutes on the data.
    storage.check_writable(args.out)
    with tempfile.TemporaryDirectory(prefix="sftops-prepare-") as tmp:
        report = data.prepare(args.data, Path(tmp), fmt=args.format, split=split, min_rows=min_rows,
                              on_invalid=args.on_invalid)
        for name in data.SPLIT_FILES.values():
            storage.upload(Path(tmp) / name, storage.join(args.out, name))
        storage.upload(Path(tmp) / data.REPORT_FILE, storage.join(args.out, data.REPORT_FILE))

    counts = report["splits"]
    print(
        f"prepared {args.data} ({report['format']}): {report['rows_read']} rows read, "
        f"{report['rows_invalid']} invalid, {report['duplicates_removed']} duplicates removed -> "
        f"train {counts['train']}, test {counts['test']}, verification {counts['verification']} "
        f"in {args.out}"
    )
    return 0
