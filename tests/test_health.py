"""job.health on synthetic loss curves with seeded noise: each verdict, the hard shapes, the five checks."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from job.errors import InputError
from job.health import DEFAULT_THRESHOLDS, UNHEALTHY_VERDICTS, VERDICTS, HealthTracker, analyze
from job.spec import parse_spec

SEEDS = range(5)


def curve(shape, steps, *, every=1, sigma=0.2, seed=0, uneven=False):
    """Train points (step, loss) of shape(fraction of run) with multiplicative log-normal per-step noise."""
    rng = random.Random(seed)
    points, step = [], 0
    while True:
        step += rng.choice((1, 2, 5, 10, 25)) if uneven else every
        if step > steps:
            return points
        points.append((step, shape(step / steps) * math.exp(rng.gauss(0, sigma))))


def evals(shape, steps, every, *, seed=0):
    """Eval points every `every` steps; eval is an average over a test split, so its noise is small."""
    rng = random.Random(1000 + seed)
    return [(s, shape(s / steps) * math.exp(rng.gauss(0, 0.005))) for s in range(every, steps + 1, every)]


def healthy(x):
    """Falls from 1.8 and settles near 0.4 (inside the default band) long before the end."""
    return 0.4 + 1.4 * math.exp(-6 * x)


def healthy_eval(x):
    """A little above healthy train."""
    return 0.46 + 1.3 * math.exp(-6 * x)


def improving(x):
    """Still falling steeply at the end: the run was too short."""
    return 0.3 + 1.5 * math.exp(-1.2 * x)


def plateau(x):
    """Flattens at ~0.9, above the default band."""
    return 0.9 + 1.0 * math.exp(-6 * x)


def diverging(x):
    """Healthy until 60% of the run, then climbing."""
    return healthy(x) if x < 0.6 else healthy(0.6) * (1 + 3 * (x - 0.6))


def flat(x):
    """Never moves."""
    return 1.8


def overfit_train(x):
    """Keeps falling well below the band."""
    return 0.15 + 1.6 * math.exp(-5 * x)


def overfit_eval(x):
    """U-shaped: best at ~40% of the run, then rising."""
    return 0.9 + 0.9 * math.exp(-8 * x) + 0.8 * max(0.0, x - 0.4)


def staircase(x):
    """Three SFT epochs: a sharp drop at each epoch boundary, nearly flat within epochs 2 and 3."""
    epoch = min(int(x * 3), 2)
    within = x * 3 - epoch
    base = (1.05, 0.62, 0.42)[epoch]
    return base + (0.6 * math.exp(-8 * within) if epoch == 0 else 0.02 * (1 - within))


def staircase_eval(x):
    """Eval of a healthy multi-epoch run: falls and levels off a little above train."""
    return 0.5 + 0.3 * math.exp(-4 * x) + (0.15 if x < 1 / 3 else 0.0)


def verdicts(train_shape, eval_shape, steps, eval_every, **kw):
    """The verdict for each seed."""
    return [
        analyze(curve(train_shape, steps, seed=seed, **kw), evals(eval_shape, steps, eval_every, seed=seed))["verdict"]
        for seed in SEEDS
    ]


# -- each verdict on noisy per-step curves ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("train_shape", "eval_shape", "steps", "sigma", "expected"),
    [
        (healthy, healthy_eval, 2000, 0.25, "healthy"),
        (improving, lambda x: improving(x) + 0.08, 5000, 0.2, "still_improving"),
        (plateau, lambda x: plateau(x) + 0.1, 300, 0.25, "plateau_high"),
        (diverging, healthy_eval, 300, 0.25, "diverging"),
        (flat, lambda x: 1.9, 2000, 0.2, "not_learning"),
        (overfit_train, overfit_eval, 300, 0.25, "overfitting"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_verdict_on_noisy_per_step_losses(train_shape, eval_shape, steps, sigma, expected):
    """Every seed of a noisy per-step curve gets the verdict of its shape."""
    assert verdicts(train_shape, eval_shape, steps, max(steps // 10, 1), sigma=sigma) == [expected] * len(SEEDS)


def test_three_epoch_staircase_is_healthy_not_diverging_or_overfitting():
    """Epoch-boundary drops of multi-epoch SFT are neither a rise nor overfitting."""
    results = verdicts(staircase, staircase_eval, 1500, 100, sigma=0.2)
    assert results == ["healthy"] * len(SEEDS)


def test_staircase_watched_live_never_diverges_or_overfits():
    """Judged after every point, a healthy staircase is never called diverging or overfitting."""
    steps = 1500
    train, ev = curve(staircase, steps, sigma=0.2, seed=3), dict(evals(staircase_eval, steps, 100, seed=3))
    tracker = HealthTracker()
    seen = set()
    for step, loss in train:
        tracker.add_train(step, loss)
        if step in ev:
            tracker.add_eval(step, ev[step])
        seen.add(tracker.analysis()["verdict"])
    assert seen.isdisjoint({"diverging", "overfitting"}), seen
    assert tracker.analysis()["verdict"] == "healthy"


def test_sparse_eval_and_logging_every_ten_steps():
    """Eval three times in a 3000-step run and train logged every 10 steps: still judged healthy."""
    assert verdicts(healthy, healthy_eval, 3000, 1000, every=10, sigma=0.2) == ["healthy"] * len(SEEDS)


def test_uneven_logging_intervals():
    """Steps 1..25 apart (a resumed or rate-limited logger) fit like evenly spaced ones."""
    assert verdicts(healthy, healthy_eval, 3000, 300, uneven=True, sigma=0.2) == ["healthy"] * len(SEEDS)
    assert verdicts(diverging, healthy_eval, 3000, 300, uneven=True, sigma=0.2) == ["diverging"] * len(SEEDS)


def test_overfitting_when_eval_rises_at_consecutive_evaluations():
    """Train keeps falling while eval rises at the last two evaluations."""
    train = [(s, 1.5 * math.exp(-s / 100) + 0.2) for s in range(1, 401)]
    ev = [(100, 0.9), (200, 0.8), (300, 0.83), (400, 0.87)]
    result = analyze(train, ev)
    assert result["verdict"] == "overfitting"
    assert "rose at each of the last 2 evaluations (0.8 -> 0.83 -> 0.87)" in result["reasons"][0]


def test_one_eval_uptick_is_not_overfitting():
    """A single rise of eval is within what a converged run does."""
    train = [(s, 1.4 * math.exp(-s / 50) + 0.4) for s in range(1, 401)]
    ev = [(100, 0.62), (200, 0.5), (300, 0.48), (400, 0.485)]
    assert analyze(train, ev)["verdict"] == "healthy"


def test_overfitting_when_eval_sits_well_above_its_minimum():
    """Eval 25% above its best (reached at step 100) while train fell since: overfitting."""
    train = [(s, 1.5 * math.exp(-s / 100) + 0.2) for s in range(1, 401)]
    ev = [(100, 0.8), (200, 1.1), (300, 1.0), (400, 1.0)]
    result = analyze(train, ev)
    assert result["verdict"] == "overfitting"
    assert "is 25% above its best 0.8" in result["reasons"][0]


def test_very_short_runs_are_insufficient_data():
    """Fewer points than min_train_points: no verdict beyond insufficient_data, checks n/a."""
    for n in (0, 1, 5, int(DEFAULT_THRESHOLDS["min_train_points"]) - 1):
        result = analyze([(s, 2.0 - 0.1 * s) for s in range(1, n + 1)], [(n, 1.5)] if n else [])
        assert result["verdict"] == "insufficient_data", n
        assert {c["status"] for c in result["checks"]} == {"n/a"}
        assert result["train"]["points"] == n


def test_nan_is_diverging_even_in_a_short_run():
    """A NaN train loss makes the run diverging whatever else the curve does."""
    result = analyze([(1, 2.0), (2, 1.9), (3, float("nan"))], [])
    assert result["verdict"] == "diverging"
    assert "1 non-finite train loss" in result["reasons"][0]
    assert result["train"]["nonfinite"] == 1
    json.dumps(result, allow_nan=False)  # JSON-safe


def test_infinite_eval_loss_is_diverging():
    """inf in eval is as broken as NaN in train."""
    train = [(s, healthy(s / 300)) for s in range(1, 301)]
    result = analyze(train, [(100, 0.9), (200, float("inf"))])
    assert result["verdict"] == "diverging"
    assert "non-finite eval loss" in result["reasons"][0]


def test_loss_spikes_are_diverging_and_one_spike_is_not():
    """Three raw losses far above the running median at the end: unstable; one: a bad batch."""
    base = [(s, healthy(s / 400)) for s in range(1, 401)]
    spiky = [(s, v * 8 if s in (350, 370, 390) else v) for s, v in base]
    result = analyze(spiky, [])
    assert result["verdict"] == "diverging"
    assert result["reasons"][0].startswith("3 loss spikes above 3x the running median")
    one = [(s, v * 8 if s == 390 else v) for s, v in base]
    assert analyze(one, [])["verdict"] == "healthy"


def test_diverging_takes_precedence_over_overfitting():
    """Train rising and eval rising: the cause is divergence, reported as such."""
    train = [(s, diverging(s / 400)) for s in range(1, 401)]
    ev = [(100, 0.9), (200, 0.6), (300, 0.7), (400, 0.9)]
    assert analyze(train, ev)["verdict"] == "diverging"


def test_tracker_sees_divergence_when_it_starts():
    """Live: the same run is not unhealthy before the climb and is diverging once it is clearly rising."""
    tracker = HealthTracker()
    by_step = {}
    for step, loss in curve(diverging, 1000, sigma=0.2, seed=7):
        tracker.add_train(step, loss)
        by_step[step] = tracker.analysis()["verdict"]
    assert by_step[550] in ("healthy", "still_improving")
    assert by_step[1000] == "diverging"
    first = min(s for s, v in by_step.items() if v == "diverging")
    assert 600 < first < 800, first


# -- the five checks with their numbers --------------------------------------------------------------------


def exact_curve():
    """Noise-free train 0.4 + e^(-s/20) for steps 1..200, eval 0.05 above at every 50 steps."""
    train = [(s, 0.4 + math.exp(-s / 20)) for s in range(1, 201)]
    ev = [(s, 0.45 + math.exp(-s / 20)) for s in range(50, 201, 50)]
    return train, ev


def least_squares_slope(points):
    """Reference slope."""
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def test_numbers_on_an_exact_curve():
    """Every number follows from the definitions: running median of 5, start over the first 5%, window last 20%."""
    train, ev = exact_curve()
    loss = dict(train)
    result = analyze(train, ev)
    t = result["train"]
    # monotone curve: the running median of the last 5 points is the middle one
    assert t["last"] == pytest.approx(loss[198])
    assert t["min"] == pytest.approx(loss[198])
    assert t["first"] == pytest.approx((loss[5] + loss[6]) / 2)  # median of the first 10 = 5% of 200
    # window: steps from 200 - 0.2 * 199 = 160.2 on, i.e. 161..200, of the smoothed values loss[s - 2]
    slope = least_squares_slope([(s, loss[s - 2]) for s in range(161, 201)])
    assert t["slope"] == pytest.approx(slope, rel=1e-9)
    assert t["slope_per_100"] == pytest.approx(100 * slope, rel=1e-9)
    assert t["relative_slope"] == pytest.approx(100 * slope / loss[198], rel=1e-9)
    assert t["points"] == 200
    assert result["eval"] == pytest.approx(
        {"last": 0.45 + math.exp(-10), "min": 0.45 + math.exp(-10), "points": 4, "first": 0.45 + math.exp(-2.5),
         "nonfinite": 0, **{k: result["eval"][k] for k in ("slope", "slope_per_100", "relative_slope")}}
    )
    # gap: eval at step 200 minus the train running median then
    assert result["gap"] == pytest.approx(0.45 + math.exp(-10) - loss[198])

    checks = {c["id"]: c for c in result["checks"]}
    assert [c["id"] for c in result["checks"]] == [1, 2, 3, 4, 5]
    assert all(c["status"] == "pass" for c in checks.values()), [c["detail"] for c in checks.values()]
    assert checks[1]["values"]["train_start"] == pytest.approx((loss[5] + loss[6]) / 2)
    assert checks[1]["values"]["eval_change"] == pytest.approx(
        (0.45 + math.exp(-10)) / (0.45 + math.exp(-2.5)) - 1)
    assert checks[2]["values"]["low"] == 0.3 and checks[2]["values"]["high"] == 0.5
    assert 0.3 <= checks[2]["values"]["train_level"] <= 0.5
    assert checks[3]["values"]["gap_ratio"] == pytest.approx(result["gap"] / loss[198])
    tail = checks[4]["values"]["tail_change"]
    assert abs(tail) <= DEFAULT_THRESHOLDS["flat_tolerance"]
    assert checks[4]["values"]["window_points"] == 40
    assert result["verdict"] == "healthy"


def test_checks_fail_with_their_reasons():
    """Still falling above the band with eval below train: checks 2, 3, 4, 5 fail and say why."""
    train = [(s, 0.6 + 1.5 * math.exp(-s / 300)) for s in range(1, 301)]
    ev = [(s, 0.5 + 1.2 * math.exp(-s / 300)) for s in range(60, 301, 60)]
    result = analyze(train, ev)
    checks = {c["id"]: c for c in result["checks"]}
    assert result["verdict"] == "still_improving"
    assert checks[1]["status"] == "pass"
    assert checks[2]["status"] == "fail" and "above the target band [0.3, 0.5]" in checks[2]["detail"]
    assert checks[3]["status"] == "fail" and "below train" in checks[3]["detail"] and "leak" in checks[3]["detail"]
    assert checks[4]["status"] == "fail" and checks[4]["values"]["tail_change"] < -0.05
    assert checks[5]["status"] == "fail" and "train longer" in checks[5]["detail"]
    # a failed check that did not decide the verdict is still reported
    assert any("below train" in r for r in result["reasons"])


def test_eval_far_above_train_below_band_is_overfitting():
    """Train memorised (0.1) while eval sits at 0.6: check 3 fails and the verdict is overfitting."""
    train = [(s, 0.1 + 1.5 * math.exp(-s / 40)) for s in range(1, 401)]
    ev = [(s, 0.6 + 0.5 * math.exp(-s / 40)) for s in range(100, 401, 100)]
    result = analyze(train, ev)
    assert result["verdict"] == "overfitting"
    assert next(c for c in result["checks"] if c["id"] == 3)["status"] == "fail"
    assert "memorises" in result["reasons"][0]


def test_no_eval_points_leaves_eval_checks_na():
    """Without eval, checks 1 and 3 are n/a and the reasons say overfitting cannot be judged."""
    result = analyze([(s, healthy(s / 300)) for s in range(1, 301)], [])
    status = {c["id"]: c["status"] for c in result["checks"]}
    assert status[1] == "n/a" and status[3] == "n/a"
    assert result["verdict"] == "healthy"
    assert any("no eval loss" in r for r in result["reasons"])
    assert result["gap"] is None and result["eval"]["last"] is None


# -- thresholds, band, API ---------------------------------------------------------------------------------


def test_threshold_overrides_change_the_verdict():
    """The same curve under different thresholds and bands."""
    train = [(s, plateau(s / 300)) for s in range(1, 301)]
    assert analyze(train, [])["verdict"] == "plateau_high"
    assert analyze(train, [], target_band=(0.5, 1.0))["verdict"] == "healthy"
    assert analyze(train, [], thresholds={"min_train_points": 500})["verdict"] == "insufficient_data"
    slow = [(s, improving(s / 300)) for s in range(1, 301)]
    assert analyze(slow, [])["verdict"] == "still_improving"
    assert analyze(slow, [], thresholds={"flat_tolerance": 0.5})["verdict"] == "plateau_high"
    barely = [(s, 1.0 - 0.08 * s / 300) for s in range(1, 301)]  # 8% in all, ~1.6% over the tail
    assert analyze(barely, [], target_band=(0.3, 1.5))["verdict"] == "healthy"
    assert analyze(barely, [], target_band=(0.3, 1.5), thresholds={"min_improvement": 0.1})["verdict"] == "not_learning"


def test_bad_thresholds_and_bands_are_rejected():
    """Unknown names and impossible values raise ValueError; the spec rejects unknown names by field."""
    with pytest.raises(ValueError, match="unknown health threshold 'nope'"):
        HealthTracker(thresholds={"nope": 1})
    with pytest.raises(ValueError, match="window_fraction"):
        HealthTracker(thresholds={"window_fraction": 2})
    with pytest.raises(ValueError, match="finite number"):
        HealthTracker(thresholds={"flat_tolerance": float("nan")})
    with pytest.raises(ValueError, match="0 <= low < high"):
        HealthTracker(target_band=(0.5, 0.3))
    spec = {"name": "a", "base_model": "m", "dataset": "d.jsonl", "output": "out"}
    assert parse_spec({**spec, "health": {"thresholds": {"flat_tolerance": 0.1}}}).health.thresholds == {
        "flat_tolerance": 0.1}
    with pytest.raises(InputError, match=r"health\.thresholds: unknown threshold\(s\) \['nope'\]"):
        parse_spec({**spec, "health": {"thresholds": {"nope": 0.1}}})


def test_every_threshold_is_a_documented_number():
    """Every threshold is a number with a comment above it saying why (the README explains them)."""
    import inspect

    import job.health as health

    source = inspect.getsource(health)
    for name, value in DEFAULT_THRESHOLDS.items():
        assert isinstance(value, (int, float)) and value > 0, name
        line_index = next(i for i, line in enumerate(source.splitlines()) if line.strip().startswith(f'"{name}":'))
        assert source.splitlines()[line_index - 1].strip().startswith("#"), name


def test_verdict_sets():
    """CI fails on every verdict but healthy and insufficient_data."""
    assert set(VERDICTS) == {"healthy", "still_improving", "plateau_high", "overfitting", "diverging",
                             "not_learning", "insufficient_data"}
    assert UNHEALTHY_VERDICTS == set(VERDICTS) - {"healthy", "insufficient_data"}


def test_tracker_matches_analyze_at_every_prefix():
    """Feeding points one by one gives exactly analyze() of the points so far."""
    train = curve(overfit_train, 400, sigma=0.2, seed=1)
    ev = dict(evals(overfit_eval, 400, 50, seed=1))
    tracker = HealthTracker(thresholds={"flat_tolerance": 0.04})
    seen_train, seen_eval = [], []
    for step, loss in train:
        tracker.add_train(step, loss)
        seen_train.append((step, loss))
        if step in ev:
            tracker.add_eval(step, ev[step])
            seen_eval.append((step, ev[step]))
        if step % 37 == 0 or step == 400:
            assert tracker.analysis() == analyze(seen_train, seen_eval, thresholds={"flat_tolerance": 0.04}), step
    assert tracker.analysis()["verdict"] == "overfitting"


def test_analyze_accepts_points_in_any_order_and_ignores_steps_going_back():
    """analyze() sorts by step; a live tracker ignores a re-logged earlier step (e.g. after a resume)."""
    train, ev = exact_curve()
    assert analyze(list(reversed(train)), list(reversed(ev))) == analyze(train, ev)
    tracker = HealthTracker()
    for step, loss in train:
        tracker.add_train(step, loss)
    before = tracker.analysis()
    tracker.add_train(150, 9.0)
    assert tracker.analysis() is before


def test_window_stays_bounded_and_exact_on_a_long_run():
    """100,000 points: the window holds at most max_window_buckets buckets and the slope is still right."""
    tracker = HealthTracker(target_band=(0.3, 3.0))
    rng = random.Random(0)
    true_slope = -2e-6  # -2.5% over the last fifth: flat
    for s in range(1, 100_001):
        tracker.add_train(s, 2.0 + true_slope * s + rng.gauss(0, 0.02))
    window = tracker.train.window
    assert len(window.buckets) <= DEFAULT_THRESHOLDS["max_window_buckets"]
    assert 19_000 <= window.span() <= 21_000  # about the last 20% of the run
    assert tracker.analysis()["train"]["slope"] == pytest.approx(true_slope, rel=0.05)
    assert tracker.analysis()["verdict"] == "healthy"


def plane_sample(points, head=32, window=1000, tail_fraction=0.3):
    """What the plane feeds analyze() on each report (service/store.py): the first points, the lowest, and
    the last 30% of steps thinned to about 1000 points."""
    last = points[-1][0]
    low = last - max(int(last * tail_fraction), window)
    tail = [p for p in points if p[0] >= low]
    stride = max(1, math.ceil(len(tail) / window))
    kept = dict(tail[::stride] + [tail[-1]] + points[:head] + [min(points, key=lambda p: p[1])])
    return sorted(kept.items())


@pytest.mark.parametrize(
    ("train_shape", "eval_shape", "expected"),
    [(healthy, healthy_eval, "healthy"), (improving, improving, "still_improving"), (plateau, plateau, "plateau_high"),
     (diverging, healthy_eval, "diverging"), (flat, flat, "not_learning"), (overfit_train, overfit_eval, "overfitting"),
     (staircase, staircase_eval, "healthy")],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_plane_sample_of_a_long_run_gets_the_same_verdict(train_shape, eval_shape, expected):
    """20,000 noisy steps judged in full and as the plane's bounded sample (head + thinned tail) agree."""
    steps = 20_000
    train = curve(train_shape, steps, sigma=0.2, seed=11)
    ev = evals(eval_shape, steps, 1000, seed=11)
    full, sampled = analyze(train, ev), analyze(plane_sample(train), ev)
    assert len(plane_sample(train)) < 1100
    assert full["verdict"] == sampled["verdict"] == expected
    assert sampled["train"]["first"] == pytest.approx(full["train"]["first"], rel=0.1)


def test_odd_values_never_crash_and_stay_json_safe():
    """Zero, negative, huge and non-finite losses, repeated or huge steps, tiny thresholds: always a JSON-safe dict."""
    rng = random.Random(5)
    odd = [0.0, -1.0, 1e-300, 1e300, float("nan"), float("inf"), -float("inf")]
    for _ in range(400):
        n = rng.randint(0, 60)
        steps = sorted(rng.choice((rng.randint(0, 3), rng.randint(0, 10**6))) for _ in range(n))
        share = rng.choice((0.05, 0.3, 1.0))
        train = [(s, rng.choice(odd) if rng.random() < share else rng.uniform(0, 3)) for s in steps]
        ev = [(s, rng.choice(odd) if rng.random() < share else rng.uniform(0, 3)) for s in steps[:: rng.randint(1, 9)]]
        thresholds = {"min_train_points": rng.choice((1, 2)), "smooth_points": rng.choice((1, 2)),
                      "min_window_points": rng.choice((1, 2))}
        result = analyze(train, ev, thresholds=thresholds)
        assert result["verdict"] in VERDICTS
        json.dumps(result, allow_nan=False)
