"""Loss-curve health: is a fine-tuning run healthy, judged from its train and eval loss while it runs.

Pure Python (no torch, no I/O). `HealthTracker` takes points one at a time and keeps O(1) state per
update (a short median window, running first/min values, and a trailing window of pre-summed buckets for
the least-squares slope); `analyze()` feeds a tracker with a whole log, so both always agree.

How a curve is read
- Train loss is smoothed with a running median of the last `smooth_points` raw values (per-step SFT losses
  are noisy and skewed; a median ignores single bad batches). Eval loss is already an average over the whole
  test split, so it is used as reported.
- The slope is a least-squares fit of the smoothed values against the step over a trailing window: the last
  `window_fraction` of the run's steps (at least `min_window_points` points). The window is kept as at most
  `max_window_buckets` buckets of summed moments: when it would grow past that, neighbours merge, so memory
  stays bounded while the fit stays exact over the points the window holds. Uneven logging intervals are
  fine: the fit is against the step, not the point index.
- A trend counts only when it is significant: the raw values' slope (whose residuals are independent from
  step to step) must be `trend_t` standard errors from zero to call the curve falling, `rise_t` to call it
  rising. Otherwise noise alone would make flat runs "still improving" or "diverging".
- `tail_change` is the slope projected over `window_fraction` of the run, relative to the level: "how much
  would the loss still move over the last fifth of this run". It is scale free, so the same thresholds work
  for a 50-step smoke test and a 100,000-step run.
- The level ("where the loss sits now") is the fitted end of the window when it trends, else the window's
  mean; the floor is the lowest window mean so far. Both average many points, so band and rise decisions
  do not hang on one noisy median.

Verdicts, in order of precedence (the first that applies wins):
1. `diverging`: a non-finite train or eval loss (at any run length); or, with enough points, train rising
   (significant, more than `rise_tolerance` over the last `window_fraction` of the run, and more than
   `rise_tolerance` above its floor), or its level more than `max_rise` above the floor whatever the slope,
   or at least `spike_count` raw losses above `spike_ratio` x the running median inside the window.
2. `insufficient_data`: fewer than `min_train_points` train losses, so no trend can be told from noise.
3. `overfitting`: eval rose at each of the last `overfit_evals` evaluations (by more than
   `eval_rise_tolerance` above its best) while train fell; or eval sits more than `overfit_margin` above its
   best while train is lower than it was then; or eval is far above train (check 3) with train below the band.
4. `not_learning`: train improved less than `min_improvement` from its start level and is not falling now.
5. `still_improving`: train is still falling at the end (tail_change below -flat_tolerance): train longer
   or add data.
6. `plateau_high`: train has flattened above the target band.
7. `healthy`: none of the above. Failed checks that do not decide the verdict (eval below train, a final
   train loss below the band, no eval at all) are added to `reasons` as warnings.
Diverging comes first because its cause (the optimiser) also breaks every other reading; overfitting before
not_learning/still_improving because eval getting worse is what a user must act on even if train looks fine.

The five checks (each pass / fail / n/a with the numbers behind it): (1) train and eval both went down,
(2) the final train loss is in the target band, (3) train is a little below eval, (4) train flattened at
the end, (5) if it has not flattened, more training is needed.
"""

from __future__ import annotations

import math
from bisect import bisect_right, insort
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Named thresholds; a job overrides them by name in spec.health.thresholds. Why each value:
DEFAULT_THRESHOLDS: dict[str, float] = {
    # Fewer train losses than this cannot separate a trend from per-step noise (and cover a median window).
    "min_train_points": 10,
    # Running-median width for train loss: 5 points shrug off 2 outlier batches in a row and lag only 2
    # points (a wider median lags too far behind the curve on runs of a few dozen logged steps).
    "smooth_points": 5,
    # "The end of the run" is its last fifth: long enough to average out noise, short enough to ignore
    # the first epochs' steep drop (and the previous epoch boundary of a 3-epoch run).
    "window_fraction": 0.2,
    # The trailing window never holds fewer points than this, so very short runs still get a fit.
    "min_window_points": 8,
    # Bucket cap for the trailing window: bounds memory and per-update work on 100k+ point runs.
    "max_window_buckets": 256,
    # Flat = the smoothed loss would move less than 5% of its level over the last fifth of the run; a
    # converged exponential decay moves ~1-3%, one that still has real gains ahead moves 7%+.
    "flat_tolerance": 0.05,
    # A trend counts only when the slope is 2 standard errors from zero (~95%): noise alone must not make a
    # flat run "still improving" or "rising".
    "trend_t": 2.0,
    # Rising needs 3 standard errors: "diverging" pages someone, and a live run is tested at every point,
    # so a false alarm must be much rarer than a false "still improving".
    "rise_t": 3.0,
    # The start level is the median of the points in the first 5% of the run's steps (at least
    # smooth_points of them, at most 256): one median of 5 noisy per-step losses is too rough to tell a 5%
    # improvement. Counting steps, not points, keeps it right on thinned samples (the plane analyses its
    # first points plus a thinned tail).
    "start_fraction": 0.05,
    # Not learning = less than 5% below the starting loss; LoRA SFT of an instruct model moves 10%+.
    "min_improvement": 0.05,
    # Diverging = a significant 10% climb over the window, to 10% above the lowest window mean.
    "rise_tolerance": 0.10,
    # Diverging whatever the slope says: the loss level sits 50% above the lowest it reached.
    "max_rise": 0.5,
    # A spike is a raw loss 3x the running median: far beyond batch-to-batch variation.
    "spike_ratio": 3.0,
    # Three such spikes inside the trailing window is instability, one is a bad batch.
    "spike_count": 3,
    # Overfitting: eval rose at each of the last 2 evaluations (one rise alone is often noise)...
    "overfit_evals": 2,
    # ...by more than 2% of its minimum in all (smaller wiggles happen on a converged run).
    "eval_rise_tolerance": 0.02,
    # Overfitting: eval 10% above its best while train kept improving.
    "overfit_margin": 0.10,
    # "A little below": eval may sit up to 50% above train; more is memorization of the train split.
    "max_gap_ratio": 0.5,
    # Eval more than 10% below train is suspicious (dropout and in-step averaging explain a few percent;
    # more points to test rows leaking into train or mismatched splits).
    "leak_margin": 0.10,
}

VERDICTS: tuple[str, ...] = (
    "diverging",
    "insufficient_data",
    "overfitting",
    "not_learning",
    "still_improving",
    "plateau_high",
    "healthy",
)

# What a CI gate fails on: everything but `healthy` and `insufficient_data`. A run too short to judge is not
# evidence of a bad run (a smoke test of 5 steps must not break a pipeline), and `still_improving` does fail:
# the model shipped is worse than the data allows, which is worth a red build (raise epochs or max_steps).
UNHEALTHY_VERDICTS: frozenset[str] = frozenset(VERDICTS) - {"healthy", "insufficient_data"}

_INT_THRESHOLDS = ("min_train_points", "smooth_points", "min_window_points", "max_window_buckets", "spike_count",
                   "overfit_evals")


def resolve_thresholds(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """DEFAULT_THRESHOLDS with overrides applied; raises ValueError on an unknown name or a bad value."""
    merged = dict(DEFAULT_THRESHOLDS)
    for name, value in (overrides or {}).items():
        if name not in DEFAULT_THRESHOLDS:
            raise ValueError(f"unknown health threshold {name!r}; known: {sorted(DEFAULT_THRESHOLDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"health threshold {name!r} must be a finite number >= 0, got {value!r}")
        merged[name] = float(value)
    for name in _INT_THRESHOLDS:
        merged[name] = max(1, int(merged[name]))
    if not 0 < merged["window_fraction"] <= 1:
        raise ValueError(f"health threshold 'window_fraction' must be in (0, 1], got {merged['window_fraction']}")
    merged["min_window_points"] = max(2, merged["min_window_points"])
    merged["max_window_buckets"] = max(4, merged["max_window_buckets"])
    return merged


def _check_band(band: Iterable[float]) -> tuple[float, float]:
    """Validate a (low, high) target band; raises ValueError."""
    low, high = (float(v) for v in band)
    if not (0 <= low < high) or not math.isfinite(high):
        raise ValueError(f"target band must be (low, high) with 0 <= low < high, got ({low}, {high})")
    return low, high


class _Window:
    """Least-squares fits over a trailing window of points, kept as buckets of pre-summed moments.

    Each point carries its smoothed value (the slope users see) and its raw value (whose residuals are
    independent from step to step, so they give an honest standard error for the slope's significance).
    """

    # Moment slots of a bucket and of the running totals; a bucket also ends with its last step.
    N, SX, SXX, SY, SXY, RY, RXY, RYY, SPIKES = range(9)
    __slots__ = ("buckets", "per_bucket", "max_buckets", "min_points", "origin", "tot", "_fit")

    def __init__(self, max_buckets: int, min_points: int) -> None:
        """An empty window of at most max_buckets buckets, never fewer than min_points points."""
        self.buckets: deque[list[float]] = deque()
        self.per_bucket = 1
        self.max_buckets = max_buckets
        self.min_points = min_points
        self.origin: float | None = None  # steps are stored relative to the first one, to keep sums small
        self.tot = [0.0] * 9
        self._fit: tuple[float | None, float | None] | None = None  # (slope, t value), until the next point

    @property
    def n(self) -> int:
        """Points in the window."""
        return int(self.tot[self.N])

    @property
    def spikes(self) -> int:
        """Spikes in the window."""
        return int(self.tot[self.SPIKES])

    def mean(self) -> float:
        """Mean smoothed value over the window (the window must not be empty)."""
        return self.tot[self.SY] / self.tot[self.N]

    def add(self, step: float, value: float, raw: float, spike: bool, window_start: float) -> None:
        """Append a point, then drop whole buckets that ended before window_start."""
        if self.origin is None:
            self.origin = step
        self._fit = None
        x = step - self.origin
        moments = (1.0, x, x * x, value, x * value, raw, x * raw, raw * raw, float(spike))
        if not self.buckets or self.buckets[-1][self.N] >= self.per_bucket:
            self.buckets.append([0.0] * 9 + [step])
        bucket, tot = self.buckets[-1], self.tot
        for i, m in enumerate(moments):
            bucket[i] += m
            tot[i] += m
        bucket[9] = step
        while (len(self.buckets) > 1 and self.buckets[0][9] < window_start
               and tot[self.N] - self.buckets[0][self.N] >= self.min_points):
            first = self.buckets.popleft()
            for i in range(9):
                tot[i] -= first[i]
        if len(self.buckets) > self.max_buckets:
            self._merge()

    def _merge(self) -> None:
        """Merge neighbouring buckets pairwise and re-sum (amortised O(1); also resets rounding drift)."""
        old = list(self.buckets)
        self.buckets = deque()
        for i in range(0, len(old), 2):
            pair = old[i : i + 2]
            self.buckets.append([sum(b[k] for b in pair) for k in range(9)] + [pair[-1][9]])
        self.per_bucket *= 2
        self.tot = [sum(b[k] for b in self.buckets) for k in range(9)]

    def _sxx(self) -> float | None:
        """Centred sum of squared steps, or None when the window's steps do not spread."""
        n, sx, sxx = self.tot[self.N], self.tot[self.SX], self.tot[self.SXX]
        if n < 2:
            return None
        centred = sxx - sx * sx / n
        return centred if centred > 1e-12 * max(1.0, sxx) else None

    def slope(self) -> float | None:
        """Least-squares slope (value per step) of the smoothed values, or None with fewer than 2 steps."""
        if self._fit is None:
            self._fit = self._compute_fit()
        return self._fit[0]

    def t_value(self) -> float | None:
        """The raw values' least-squares slope over its standard error (None with fewer than 4 points)."""
        if self._fit is None:
            self._fit = self._compute_fit()
        return self._fit[1]

    def _compute_fit(self) -> tuple[float | None, float | None]:
        """(smoothed slope, raw slope's t value) from the running sums."""
        sxx = self._sxx()
        if sxx is None:
            return None, None
        n, sx, sy, sxy, ry, rxy, ryy = (self.tot[i] for i in (self.N, self.SX, self.SY, self.SXY, self.RY, self.RXY,
                                                                  self.RYY))
        slope = (sxy - sx * sy / n) / sxx
        if n < 4:
            return slope, None
        cxy = rxy - sx * ry / n
        raw_slope = cxy / sxx
        residual = max(ryy - ry * ry / n - raw_slope * cxy, 0.0) / (n - 2)
        se = math.sqrt(residual / sxx)
        if se <= 1e-12 * max(1e-12, abs(raw_slope)):
            return slope, (math.copysign(math.inf, raw_slope) if raw_slope else 0.0)
        return slope, raw_slope / se

    def span(self) -> float:
        """Steps covered by the window (its first bucket counted from its mean step)."""
        if not self.buckets:
            return 0.0
        first = self.buckets[0]
        return self.buckets[-1][9] - (self.origin + first[self.SX] / first[self.N])


class _Series:
    """One loss series: running median, start/min/floor levels, trailing-window fit, non-finite count."""

    def __init__(self, smooth_points: int, min_window: int, th: dict[str, float]) -> None:
        """An empty series smoothed over smooth_points raw values, fitted over at least min_window points."""
        self.k = smooth_points
        self.th = th
        self.recent: deque[float] = deque()  # last k raw finite values, arrival order
        self.sorted: list[float] = []  # the same values, sorted, for the median
        self.first_raw: list[float] = []  # the first _START_CAP raw finite values (the start level)
        self.first_steps: list[float] = []  # their steps
        self._start: tuple[int, float] | None = None  # (prefix length, its median), cached
        self.window = _Window(int(th["max_window_buckets"]), min_window)
        self.points = 0
        self.finite = 0
        self.nonfinite = 0
        self.first_step: float | None = None
        self.last_step: float | None = None
        self.last: float | None = None  # running median of the last k raw values
        self.min: float | None = None  # lowest running median
        # Lowest trailing-window mean: a minimum that noise cannot drag down, to measure rises against.
        self.floor: float | None = None

    def add(self, step: float, loss: float) -> bool:
        """Add a point; returns False (and ignores it) when its step goes back in time."""
        if self.last_step is not None and step < self.last_step:
            return False
        self.points += 1
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        if not math.isfinite(loss):
            self.nonfinite += 1
            return True
        self.finite += 1
        # A spike is judged against the median before it, so that it cannot dilute its own yardstick.
        spike = len(self.recent) >= 3 and self.last is not None and loss > self.th["spike_ratio"] * self.last > 0
        if len(self.first_raw) < _START_CAP:
            self.first_raw.append(loss)
            self.first_steps.append(step)
        self.recent.append(loss)
        insort(self.sorted, loss)
        if len(self.recent) > self.k:
            self.sorted.remove(self.recent.popleft())
        self.last = _median_sorted(self.sorted)
        if self.min is None or self.last < self.min:
            self.min = self.last
        window_start = step - self.th["window_fraction"] * (step - self.first_step)
        self.window.add(step, self.last, loss, spike, window_start)
        if self.window.n >= self.window.min_points:
            mean = self.window.mean()
            if self.floor is None or mean < self.floor:
                self.floor = mean
        return True

    def start(self) -> float | None:
        """The start level: median of the values in the first start_fraction of the steps (DEFAULT_THRESHOLDS)."""
        if not self.first_raw:
            return None
        until = self.first_steps[0] + self.th["start_fraction"] * (self.last_step - self.first_steps[0])
        m = min(len(self.first_raw), max(self.k, bisect_right(self.first_steps, until)))
        if self._start is None or self._start[0] != m:
            self._start = (m, _median_sorted(sorted(self.first_raw[:m])))
        return self._start[1]

    def trend(self) -> int:
        """-1 falling, +1 rising, 0 flat or not significant (slope within trend_t / rise_t standard errors)."""
        t = self.window.t_value()
        if t is None:
            return 0
        # Few points make the standard error itself uncertain: widen the bar like Student's t does
        # (2.0 becomes ~2.5 at 6 degrees of freedom, ~2.15 at 20).
        small_sample = 1 + 1.5 / (self.window.n - 2)
        if t <= -self.th["trend_t"] * small_sample:
            return -1
        if t >= self.th["rise_t"] * small_sample:
            return 1
        return 0

    def level(self) -> float | None:
        """Where the loss sits now: the fitted end of the window when it trends, else the window's mean."""
        w = self.window
        if w.n == 0:
            return None
        mean = w.mean()
        slope = w.slope()
        if slope is None or self.trend() == 0:
            return mean
        return mean + slope * (self.last_step - w.origin - w.tot[w.SX] / w.n)

    def tail_change(self) -> float | None:
        """The slope projected over window_fraction of the run, relative to the current level."""
        slope = self.window.slope()
        level = self.level()
        if slope is None or level is None or level <= 0 or self.first_step is None:
            return None
        return slope * self.th["window_fraction"] * (self.last_step - self.first_step) / level

    def summary(self) -> dict[str, Any]:
        """The contract's per-series numbers, plus the start level and the non-finite count."""
        slope = self.window.slope()
        per_100 = None if slope is None else slope * 100
        rel = None if per_100 is None or self.last is None or self.last <= 0 else per_100 / self.last
        return {
            "last": self.last,
            "min": self.min,
            "slope": slope,
            "slope_per_100": per_100,
            "relative_slope": rel,
            "points": self.points,
            "first": self.start(),
            "nonfinite": self.nonfinite,
        }


_START_CAP = 256  # raw values kept for the start level; bounds memory on long runs


def _median_sorted(values: list[float]) -> float:
    """Median of an already sorted, non-empty list."""
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2


@dataclass(frozen=True)
class _Facts:
    """The numbers a verdict and the checks are decided from, computed once per analysis."""

    enough: bool  # enough finite train points to judge
    start: float | None  # train start level
    last: float | None  # train running median
    level: float | None  # train level now (see _Series.level)
    improvement: float | None  # (start - level) / start
    tail: float | None  # relative change over the last window_fraction of the run
    falling: bool  # significantly (trend_t) and materially (flat_tolerance) falling at the end
    rising: bool  # significantly (rise_t) and materially (flat_tolerance) rising at the end
    gap: float | None  # eval - train at the latest eval
    gap_ratio: float | None  # gap / train
    train_at_eval: float | None  # train running median at the latest eval


class HealthTracker:
    """Incremental health of one run: add points as they arrive, ask for `analysis()` at any time."""

    def __init__(self, target_band: Iterable[float] = (0.3, 0.5),
                 thresholds: Mapping[str, float] | None = None) -> None:
        """A tracker for one run; raises ValueError on a bad band or an unknown threshold."""
        self.band = _check_band(target_band)
        self.th = resolve_thresholds(thresholds)
        self.train = _Series(int(self.th["smooth_points"]), int(self.th["min_window_points"]), self.th)
        # Eval is an average over the whole test split already: no smoothing; it is sparse, so its slope
        # is fitted over at least its last 3 evaluations.
        self.eval = _Series(1, 3, self.th)
        # Per evaluation: (step, eval loss, train running median, train level), the last overfit_evals + 1.
        self.recent_evals: deque[tuple[float, float, float | None, float | None]] = deque(
            maxlen=int(self.th["overfit_evals"]) + 1)
        self.eval_first: float | None = None
        self.train_at_eval_min: float | None = None  # train level when eval was at its best
        self._cache: dict[str, Any] | None = None

    def add_train(self, step: float, loss: float) -> None:
        """Add one train-loss point (a step before the last one, e.g. re-logged after a resume, is ignored)."""
        if self.train.add(float(step), float(loss)):
            self._cache = None

    def add_eval(self, step: float, loss: float) -> None:
        """Add one eval-loss point; it is paired with the train loss seen so far."""
        loss = float(loss)
        before_min = self.eval.min
        if not self.eval.add(float(step), loss):
            return
        self._cache = None
        if not math.isfinite(loss):
            return
        level = self.train.level()
        if self.eval_first is None:
            self.eval_first = loss
        if before_min is None or loss < before_min:
            self.train_at_eval_min = level
        self.recent_evals.append((float(step), loss, self.train.last, level))

    def analysis(self) -> dict[str, Any]:
        """The current analysis dict (see the module docstring); cached until the next point."""
        if self._cache is None:
            self._cache = self._analyse()
        return self._cache

    # -- the judgement --------------------------------------------------------------------------------

    def _facts(self) -> _Facts:
        """Gather the numbers every decision below reads."""
        th, tr = self.th, self.train
        enough = tr.finite >= th["min_train_points"]
        start, level = tr.start(), tr.level()
        improvement = (start - level) / start if enough and start and start > 0 and level is not None else None
        tail = tr.tail_change() if enough else None
        trend = tr.trend() if enough else 0
        gap = gap_ratio = train_at_eval = None
        if self.recent_evals and self.recent_evals[-1][2] is not None:
            _, ev, train_at_eval, _ = self.recent_evals[-1]
            gap = ev - train_at_eval
            gap_ratio = gap / train_at_eval if train_at_eval > 0 else None
        return _Facts(
            enough=enough, start=start, last=tr.last, level=level, improvement=improvement, tail=tail,
            falling=tail is not None and tail < -th["flat_tolerance"] and trend < 0,
            rising=tail is not None and tail > th["flat_tolerance"] and trend > 0,
            gap=gap, gap_ratio=gap_ratio, train_at_eval=train_at_eval,
        )

    def _analyse(self) -> dict[str, Any]:
        """Compute verdict, reasons and checks from the current state."""
        f = self._facts()
        checks = [self._check_down(f), self._check_band(f), self._check_gap(f), self._check_flat(f),
                  self._check_more(f)]
        verdict, reasons = self._decide(f)
        # Failed checks that did not decide the verdict are still worth a line.
        if checks[2]["status"] == "fail" and verdict != "overfitting":
            reasons.append(checks[2]["detail"])
        if checks[1]["status"] == "fail" and verdict in ("healthy", "still_improving") and f.level < self.band[0]:
            reasons.append(checks[1]["detail"])
        if checks[0]["status"] == "fail" and verdict in ("healthy", "plateau_high", "still_improving"):
            reasons.append(checks[0]["detail"])
        if not self.eval.points and verdict not in ("insufficient_data", "diverging"):
            reasons.append("no eval loss was logged: overfitting cannot be judged (set training.eval_every)")
        return {"verdict": verdict, "reasons": reasons, "checks": checks, "train": _finite(self.train.summary()),
                "eval": _finite(self.eval.summary()), "gap": _number(f.gap)}

    def _decide(self, f: _Facts) -> tuple[str, list[str]]:
        """The verdict by the module's precedence, with the reasons behind it."""
        th, tr, ev = self.th, self.train, self.eval
        low, high = self.band
        frac = f"{100 * th['window_fraction']:.0f}%"
        if tr.nonfinite or ev.nonfinite:
            which, count = ("train", tr.nonfinite) if tr.nonfinite else ("eval", ev.nonfinite)
            return "diverging", [f"{count} non-finite {which} loss value(s) (NaN/inf): lower the learning rate, "
                                 "check the data for broken rows, or train in bf16/fp32 instead of fp16"]
        if not f.enough:
            return "insufficient_data", [f"only {tr.finite} train loss point(s); need at least "
                                         f"{int(th['min_train_points'])} to judge the curve"]
        reasons = []
        above = f.level / tr.floor - 1 if tr.floor and f.level is not None else 0.0
        if (f.rising and f.tail > th["rise_tolerance"] and above > th["rise_tolerance"]) or above > th["max_rise"]:
            reasons.append(f"train loss is rising: it sits at {f.level:.4g}, {100 * above:.0f}% above its lowest "
                           f"level {tr.floor:.4g}, and moves {100 * (f.tail or 0):+.0f}% over the last {frac} of "
                           "the run: lower the learning rate or clip gradients")
        if tr.window.spikes >= th["spike_count"]:
            reasons.append(f"{tr.window.spikes} loss spikes above {th['spike_ratio']:g}x the running median in the "
                           f"last {frac} of the run: lower the learning rate or clip gradients harder")
        if reasons:
            return "diverging", reasons
        overfit = self._overfitting(f)
        if overfit:
            return "overfitting", overfit
        if f.improvement is not None and f.improvement < th["min_improvement"] and not f.falling:
            return "not_learning", [f"train loss moved {100 * f.improvement:.1f}% from its start ({f.start:.4g} -> "
                                    f"{f.level:.4g}); expected at least {100 * th['min_improvement']:.0f}%: raise the "
                                    "learning rate, check that the loss covers the assistant replies, or check the "
                                    "LoRA target modules"]
        if f.falling:
            return "still_improving", [f"train loss is still falling: {100 * f.tail:+.1f}% over the last {frac} of "
                                       "the run: train longer (more epochs or max_steps) or add data"]
        if f.level > high:
            return "plateau_high", [f"train loss flattened at {f.level:.4g}, above the target band "
                                    f"[{low:g}, {high:g}]: raise the learning rate or LoRA rank, train longer, "
                                    "or check the data quality"]
        reasons = [f"train loss fell from {f.start:.4g} to {f.level:.4g} and flattened"
                   + (f" inside the target band [{low:g}, {high:g}]" if low <= f.level <= high else "")]
        if ev.last is not None:
            reasons.append(f"eval loss {ev.last:.4g} (best {ev.min:.4g}) is not rising")
        return "healthy", reasons

    def _overfitting(self, f: _Facts) -> list[str]:
        """Reasons the run overfits (empty when it does not)."""
        th, ev = self.th, self.eval
        n = int(th["overfit_evals"])
        recent = list(self.recent_evals)
        if len(recent) == n + 1 and ev.min and ev.min > 0:
            evals = [e for _, e, _, _ in recent]
            trains = [t for _, _, _, t in recent]
            rose = all(b > a for a, b in zip(evals, evals[1:]))
            rose = rose and (evals[-1] - ev.min) / ev.min > th["eval_rise_tolerance"]
            if rose and None not in trains and trains[-1] < trains[0]:
                path = " -> ".join(f"{e:.4g}" for e in evals)
                return [f"eval loss rose at each of the last {n} evaluations ({path}) while train loss fell "
                        f"({trains[0]:.4g} -> {trains[-1]:.4g}): stop earlier (fewer epochs), lower the learning "
                        "rate or LoRA rank, or add data"]
        then = self.train_at_eval_min
        above_best = ev.last is not None and ev.min and ev.last > ev.min * (1 + th["overfit_margin"])
        if above_best and then is not None and f.level is not None and f.level < then:
            return [f"eval loss {ev.last:.4g} is {100 * (ev.last / ev.min - 1):.0f}% above its best {ev.min:.4g} "
                    f"while train loss kept falling ({then:.4g} -> {f.level:.4g}): keep the best checkpoint, train "
                    "fewer epochs or add data"]
        far_above = f.gap_ratio is not None and f.gap_ratio > th["max_gap_ratio"]
        if far_above and f.level is not None and f.level < self.band[0]:
            return [f"train loss {f.level:.4g} is below the target band and eval is {100 * f.gap_ratio:.0f}% above "
                    "train: the model memorises the train split; train fewer epochs or add data"]
        return []

    # -- the five checks -----------------------------------------------------------------------------

    def _check_down(self, f: _Facts) -> dict[str, Any]:
        """Check 1: both train and eval loss went down."""
        ev, name = self.eval, "train and eval loss go down"
        first = self.eval_first
        eval_change = (ev.last - first) / first if first and ev.last is not None else None
        values = {"train_start": f.start, "train_level": f.level,
                  "train_change": None if f.improvement is None else -f.improvement,
                  "eval_first": first, "eval_last": ev.last, "eval_change": eval_change,
                  "min_improvement": self.th["min_improvement"]}
        if not f.enough or ev.finite < 2:
            return _check(1, name, "n/a", f"not enough {'eval' if f.enough else 'train'} loss points yet", values)
        if f.improvement is None or eval_change is None:
            return _check(1, name, "n/a", "a loss level at or below zero: relative change undefined", values)
        train_ok = f.improvement >= self.th["min_improvement"]
        eval_ok = eval_change < 0
        detail = (f"train {f.start:.4g} -> {f.level:.4g} ({-100 * f.improvement:+.1f}%), "
                  f"eval {first:.4g} -> {ev.last:.4g} ({100 * eval_change:+.1f}%)")
        detail += "" if train_ok else "; train barely moved"
        detail += "" if eval_ok else "; eval did not go down"
        return _check(1, name, "pass" if train_ok and eval_ok else "fail", detail, values)

    def _check_band(self, f: _Facts) -> dict[str, Any]:
        """Check 2: the final train loss is in the target band."""
        low, high = self.band
        name = "final train loss in target band"
        values = {"train_level": f.level, "train_last": f.last, "low": low, "high": high}
        if not f.enough:
            return _check(2, name, "n/a", "not enough train loss points yet", values)
        if low <= f.level <= high:
            return _check(2, name, "pass", f"train loss {f.level:.4g} in [{low:g}, {high:g}]", values)
        side = "above" if f.level > high else "below"
        hint = ("train longer or raise the learning rate" if side == "above"
                else "the model may be memorising the train split; compare eval loss and the verification outputs")
        return _check(2, name, "fail", f"train loss {f.level:.4g} is {side} the target band [{low:g}, {high:g}]: "
                      f"{hint}", values)

    def _check_gap(self, f: _Facts) -> dict[str, Any]:
        """Check 3: train is a little below eval."""
        th, name = self.th, "train a little below eval"
        values = {"gap": f.gap, "gap_ratio": f.gap_ratio, "train": f.train_at_eval,
                  "eval": self.recent_evals[-1][1] if self.recent_evals else None,
                  "max_gap_ratio": th["max_gap_ratio"], "leak_margin": th["leak_margin"]}
        if f.gap_ratio is None or not f.enough:
            return _check(3, name, "n/a", "no eval loss paired with enough train loss yet", values)
        if f.gap_ratio > th["max_gap_ratio"]:
            return _check(3, name, "fail", f"eval loss is {100 * f.gap_ratio:.0f}% above train (gap {f.gap:.4g}): "
                          "far above means overfitting; train fewer epochs or add data", values)
        if f.gap_ratio < -th["leak_margin"]:
            return _check(3, name, "fail", f"eval loss is {100 * -f.gap_ratio:.0f}% below train (gap {f.gap:.4g}): "
                          "suspicious; check that test rows do not leak into train and that both splits come from "
                          "the same data", values)
        return _check(3, name, "pass", f"eval - train = {f.gap:.4g} ({100 * f.gap_ratio:+.0f}% of train)", values)

    def _check_flat(self, f: _Facts) -> dict[str, Any]:
        """Check 4: train loss flattens at the end."""
        tr, th, name = self.train, self.th, "train loss flattens at the end"
        s = tr.summary()
        values = {"slope_per_100": s["slope_per_100"], "relative_slope": s["relative_slope"], "tail_change": f.tail,
                  "t_value": tr.window.t_value(), "flat_tolerance": th["flat_tolerance"],
                  "window_steps": tr.window.span(), "window_points": tr.window.n}
        if not f.enough or f.tail is None:
            return _check(4, name, "n/a", "not enough train loss points yet", values)
        moves = f"train moves {100 * f.tail:+.1f}% over the last {100 * th['window_fraction']:.0f}% of the run"
        if abs(f.tail) <= th["flat_tolerance"]:
            return _check(4, name, "pass", f"{moves} (within +/-{100 * th['flat_tolerance']:.0f}%)", values)
        if not (f.falling or f.rising):
            return _check(4, name, "pass", f"{moves}, within the noise (slope under {th['trend_t']:g} standard "
                          "errors)", values)
        return _check(4, name, "fail", f"{moves} (more than +/-{100 * th['flat_tolerance']:.0f}%)", values)

    def _check_more(self, f: _Facts) -> dict[str, Any]:
        """Check 5: a curve that has not flattened needs more training."""
        name = "more training needed if not flat"
        values = {"tail_change": f.tail, "steps": self.train.last_step}
        if not f.enough or f.tail is None:
            return _check(5, name, "n/a", "not enough train loss points yet", values)
        if f.falling:
            return _check(5, name, "fail", "train loss is still falling: train longer (more epochs or max_steps) "
                          "or add data", values)
        if f.rising:
            return _check(5, name, "n/a", "train loss is rising: more training will not help", values)
        return _check(5, name, "pass", "train loss flattened: no more training needed", values)


def _check(id_: int, name: str, status: str, detail: str, values: dict[str, Any]) -> dict[str, Any]:
    """One check's dict (its values JSON-safe)."""
    return {"id": id_, "name": name, "status": status, "detail": detail, "values": _finite(values)}


def _number(value: Any) -> Any:
    """None for a non-finite float (JSON has no NaN or inf), else the value."""
    return None if type(value) is float and not math.isfinite(value) else value


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """A flat dict of numbers, JSON-safe."""
    return {k: _number(v) for k, v in values.items()}


def analyze(train_points: Iterable[tuple[float, float]], eval_points: Iterable[tuple[float, float]],
            target_band: Iterable[float] = (0.3, 0.5), thresholds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Analyse whole train/eval logs of (step, loss); raises ValueError on a bad band or threshold.

    Points are merged by step (train before eval at the same step, as trainers log them) and fed to a
    HealthTracker, so the result is exactly what the tracker would say live.
    """
    tracker = HealthTracker(target_band, thresholds)
    merged = [(float(s), 0, float(v)) for s, v in train_points] + [(float(s), 1, float(v)) for s, v in eval_points]
    merged.sort(key=lambda p: (p[0], p[1]))
    for step, kind, loss in merged:
        (tracker.add_eval if kind else tracker.add_train)(step, loss)
    return tracker.analysis()
