"""Cost of keeping a run's health current: HealthTracker (incremental) vs refitting from scratch per update.

A 100,000-step run logged every step (noisy per-step losses, eval every 500 steps). For the tracker, every
update is timed: add_train (+ add_eval when due) and analysis(). A full refit per update costs O(points so
far), so it is timed at 20 points spread evenly over the run and averaged: that average is its mean cost per
update over the whole run. Baselines: `analyze()` on every point so far (what you would do without the
tracker), and a bare refit (running median + least squares only, no checks). Also shown: one analyze() on
the bounded sample the plane stores per report (first points + thinned tail), for the service's budget.

Run: .venv/bin/python bench/health.py
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.health import DEFAULT_THRESHOLDS, HealthTracker, analyze  # noqa: E402

STEPS = 100_000
EVAL_EVERY = 500
REFIT_SAMPLES = 20


def make_run(steps: int = STEPS, seed: int = 0) -> tuple[list[tuple[int, float]], dict[int, float]]:
    """A healthy noisy per-step curve and its eval points."""
    rng = random.Random(seed)
    shape = lambda x: 0.4 + 1.4 * math.exp(-6 * x)  # noqa: E731
    train = [(s, shape(s / steps) * math.exp(rng.gauss(0, 0.25))) for s in range(1, steps + 1)]
    evals = {s: shape(s / steps) + 0.05 for s in range(EVAL_EVERY, steps + 1, EVAL_EVERY)}
    return train, evals


def bare_refit(points: list[tuple[int, float]]) -> float:
    """The minimal from-scratch fit: running median of 5 over all points, least squares over the last 20%."""
    k = int(DEFAULT_THRESHOLDS["smooth_points"])
    smoothed = [(s, statistics.median(v for _, v in points[max(0, i - k + 1) : i + 1])) for i, (s, _) in enumerate(points)]
    start = points[-1][0] - DEFAULT_THRESHOLDS["window_fraction"] * (points[-1][0] - points[0][0])
    window = [(s, v) for s, v in smoothed if s >= start]
    mx = statistics.fmean(s for s, _ in window)
    my = statistics.fmean(v for _, v in window)
    sxx = sum((s - mx) ** 2 for s, _ in window)
    return sum((s - mx) * (v - my) for s, v in window) / sxx if sxx else 0.0


def time_tracker(train, evals) -> tuple[float, float, float, float, str]:
    """(mean us per update, us per update over the last 1000, us per add_train alone, p99 us, final verdict)."""
    tracker = HealthTracker()
    per_update = []
    clock = time.perf_counter
    for step, loss in train:
        t0 = clock()
        tracker.add_train(step, loss)
        if step in evals:
            tracker.add_eval(step, evals[step])
        tracker.analysis()
        per_update.append(clock() - t0)
    verdict = tracker.analysis()["verdict"]
    at_end = 1e6 * statistics.fmean(per_update[-1000:])
    adds = HealthTracker()
    t0 = clock()
    for step, loss in train:
        adds.add_train(step, loss)
    add_only = (clock() - t0) / len(train)
    per_update.sort()
    return (1e6 * sum(per_update) / len(per_update), at_end, 1e6 * add_only,
            1e6 * per_update[int(0.99 * len(per_update))], verdict)


def time_refit(fn, train, evals) -> tuple[float, float]:
    """(mean us per update over the run, us per update at the last point) for a from-scratch refit."""
    positions = [round(STEPS * (i + 0.5) / REFIT_SAMPLES) for i in range(REFIT_SAMPLES)]
    costs = []
    for n in positions:
        prefix = train[:n]
        ev = [(s, v) for s, v in evals.items() if s <= n]
        t0 = time.perf_counter()
        fn(prefix, ev)
        costs.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fn(train, list(evals.items()))
    last = time.perf_counter() - t0
    return 1e6 * statistics.fmean(costs), 1e6 * last


def plane_sample(points, head=32, window=1000, tail_fraction=0.3):
    """The plane's per-report sample (service/store.py): first points, lowest, thinned last 30% of steps."""
    last = points[-1][0]
    tail = [p for p in points if p[0] >= last - max(int(last * tail_fraction), window)]
    stride = max(1, math.ceil(len(tail) / window))
    return sorted(dict(tail[::stride] + [tail[-1]] + points[:head] + [min(points, key=lambda p: p[1])]).items())


def main() -> None:
    """Print the table."""
    train, evals = make_run()
    mean_us, end_us, add_us, p99_us, verdict = time_tracker(train, evals)
    full_mean, full_last = time_refit(lambda t, e: analyze(t, e), train, evals)
    bare_mean, bare_last = time_refit(lambda t, e: bare_refit(t), train, evals)
    sample = plane_sample(train)
    t0 = time.perf_counter()
    for _ in range(20):
        sampled_verdict = analyze(sample, list(evals.items()))["verdict"]
    sample_us = 1e6 * (time.perf_counter() - t0) / 20

    print(f"health analysis cost per update, {STEPS:,}-point noisy run (eval every {EVAL_EVERY}); verdict: {verdict}")
    print(f"python {sys.version.split()[0]}; refits timed at {REFIT_SAMPLES} evenly spaced points and averaged\n")
    rows = [
        ("HealthTracker add_train + analysis()", mean_us, end_us, f"p99 {p99_us:.0f} us; add_train alone {add_us:.1f} us"),
        ("full refit: analyze(all points so far)", full_mean, full_last, ""),
        ("bare refit: median + least squares only", bare_mean, bare_last, ""),
    ]
    print(f"{'method':<42} {'mean us/update':>15} {'us near 100k':>15} {'x tracker':>10}  note")
    for name, mean, last, note in rows:
        print(f"{name:<42} {mean:>15,.1f} {last:>15,.1f} {mean / mean_us:>10,.0f}  {note}")
    print(f"\nplane per report: analyze() on its bounded sample of {len(sample)} points: {sample_us:,.0f} us "
          f"(verdict {sampled_verdict})")
    print(f"whole run through the tracker: {mean_us * STEPS / 1e6:.2f} s; through full refits: "
          f"{full_mean * STEPS / 1e6 / 3600:.1f} h")


if __name__ == "__main__":
    main()
