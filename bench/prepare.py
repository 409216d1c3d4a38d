"""Benchmark of the data stage: rows/s and peak RSS of `python -m job prepare` on generated data.

Generates N short conversations (messages format, ~2% exact duplicates, a few invalid rows skipped)
into a temporary JSONL file, runs the stage as a subprocess several times and prints the median wall time,
rows/s and peak RSS (from wait4's rusage), with the same at a baseline size (100k) for a ratio.
Goal: 1M rows in under 60 s on 2 cores, peak RSS under 3 GB.

    python bench/prepare.py [--rows 1000000] [--baseline 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the a model data train loss token adapter layer rank alpha batch step eval split row chat user reply".split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """Write `rows` JSONL conversations (1-3 exchanges, some with a system turn), with duplicates and bad rows."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        buf = []
        for i in range(rows):
            if i % 50 == 49:  # an exact duplicate of an earlier row
                buf.append(buf[-1] if buf else b"{}")
            elif i % 1000 == 999:  # an invalid row (ends on a user turn)
                buf.append(orjson.dumps({"messages": [{"role": "user", "content": "unanswered"}]}))
            else:
                msgs = []
                if rnd.random() < 0.3:
                    msgs.append({"role": "system", "content": "You are a helpful assistant."})
                for _ in range(rnd.randint(1, 3)):
                    msgs.append({"role": "user", "content": " ".join(rnd.choices(WORDS, k=rnd.randint(4, 12))) + f" #{i}"})
                    msgs.append({"role": "assistant", "content": " ".join(rnd.choices(WORDS, k=rnd.randint(6, 20)))})
                buf.append(orjson.dumps({"messages": msgs}))
            if len(buf) >= 10000:
                f.write(b"\n".join(buf) + b"\n")
                buf = []
        if buf:
            f.write(b"\n".join(buf) + b"\n")


def run_once(data: Path, out: Path) -> tuple[float, float, int]:
    """One `python -m job prepare` run: (wall seconds, CPU seconds, peak RSS bytes of the child)."""
    cmd = [sys.executable, "-m", "job", "prepare", "--data", str(data), "--out", str(out), "--on-invalid", "skip"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if proc.returncode != 0:
        sys.exit(f"prepare failed (exit {proc.returncode}):\n{err}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def measure(rows: int, runs: int, tmp: Path) -> dict:
    """Generate a dataset of `rows` and time `runs` runs; medians."""
    data = tmp / f"bench-{rows}.jsonl"
    generate(data, rows)
    times, cpus, rss = [], [], []
    for i in range(runs):
        t, c, m = run_once(data, tmp / f"out-{rows}-{i}")
        times.append(t)
        cpus.append(c)
        rss.append(m)
    size = data.stat().st_size
    data.unlink()
    wall = statistics.median(times)
    return {"rows": rows, "mb": size / 1e6, "wall": wall, "min": min(times), "max": max(times), "cpu": statistics.median(cpus),
            "rows_s": rows / wall, "rss_mb": statistics.median(rss) / 2**20}


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--baseline", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sftops-bench-") as tmp:
        results = [measure(n, args.runs, Path(tmp)) for n in (args.baseline, args.rows)]
    base = results[0]
    load = os.getloadavg()[0]
    print(f"prepare stage, {args.runs} runs each, median; cpus={os.cpu_count()}, load average {load:.1f}")
    print(f"{'rows':>10} {'file MB':>8} {'wall s':>8} {'min-max s':>13} {'cpu s':>7} {'rows/s':>10} "
          f"{'peak RSS MB':>12} {'time x base':>11} {'rows/s x base':>13}")
    for r in results:
        print(f"{r['rows']:>10} {r['mb']:>8.1f} {r['wall']:>8.2f} {r['min']:>6.2f}-{r['max']:<6.2f} {r['cpu']:>7.2f} "
              f"{r['rows_s']:>10.0f} {r['rss_mb']:>12.0f} {r['wall'] / base['wall']:>11.2f} "
              f"{r['rows_s'] / base['rows_s']:>13.2f}")
    print("wall time counts other processes competing for the cores; cpu s is the stage's own user+sys time")
    big = results[-1]
    print(f"goal: {args.rows} rows < 60 s and < 3072 MB RSS -> "
          f"{'met' if big['wall'] < 60 and big['rss_mb'] < 3072 else 'NOT met'}")


if __name__ == "__main__":
    main()
