"""The job's report: live loss-curve health while training, then report.json, report.md and loss.png.

Building the report is pure (dicts in, dict/markdown out); only `plot_loss` and `write_reports` touch files.
matplotlib is imported inside `plot_loss`, with the Agg backend (no display on a training node).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from job import health
from job.spec import HealthSpec, JobSpec

log = logging.getLogger(__name__)


# A new verdict is announced once it has held for this many logged records (the first one, and
# diverging, at once), so a run hovering between plateau_high and still_improving does not flood the events.
VERDICT_HOLD_RECORDS = 5


class LiveHealth:
    """Callback for each logged record: forward it to the plane and track the curve's health verdict."""

    def __init__(self, spec: HealthSpec, reporter: Any, history: Path | None = None):
        """Track against the spec's target band and threshold overrides.

        `history` is the trainer's metrics.jsonl: after a resume it already holds the steps before the
        checkpoint, which the tracker reads on the first call (they were reported by the earlier attempt).
        """
        self.tracker = health.HealthTracker(target_band=tuple(spec.target_band), thresholds=spec.thresholds or None)
        self.reporter = reporter
        self.history = history
        self.verdict: str | None = None
        self.records = 0
        self._candidate: str | None = None
        self._held = 0

    def _seed(self, before_step: int) -> None:
        """Feed the tracker the records logged before `before_step` by an earlier attempt of this job."""
        if self.history is None or not self.history.is_file():
            return
        earlier = [r for r in read_metrics(self.history) if int(r["step"]) < before_step]
        train, evals = loss_points(earlier)
        for step, loss in train:
            self.tracker.add_train(step, loss)
        for step, loss in evals:
            self.tracker.add_eval(step, loss)
        if earlier:
            log.info("health: carried %d earlier records over from before the resume", len(earlier))

    def _settled(self, verdict: str) -> bool:
        """Whether a verdict has held long enough to announce: near a boundary the verdict can flip every step."""
        self._held = self._held + 1 if verdict == self._candidate else 1
        self._candidate = verdict
        urgent = self.verdict is None or verdict == "diverging"
        return urgent or self._held >= VERDICT_HOLD_RECORDS

    def __call__(self, record: Mapping[str, Any]) -> None:
        """Called by the trainer for every logged step; cheap, and never raises into the training loop."""
        self.records += 1
        self.reporter.metric(record)
        try:
            step = int(record["step"])
            if self.records == 1:
                self._seed(step)
            if record.get("train_loss") is not None:
                self.tracker.add_train(step, float(record["train_loss"]))
            if record.get("eval_loss") is not None:
                self.tracker.add_eval(step, float(record["eval_loss"]))
            analysis = self.tracker.analysis()
        except Exception:  # a health bug must not stop training; it is logged, not swallowed
            log.exception("health tracking failed on record %s", dict(record))
            return
        if not self._settled(analysis["verdict"]):
            return
        if analysis["verdict"] != self.verdict:
            self.verdict = analysis["verdict"]
            reasons = "; ".join(analysis.get("reasons") or []) or "-"
            level = "warning" if self.verdict in health.UNHEALTHY_VERDICTS else "info"
            log.log(logging.WARNING if level == "warning" else logging.INFO,
                    "health at step %d: %s (%s)", step, self.verdict, reasons)
            self.reporter.event(level, f"health: {self.verdict}", {"step": step, "reasons": analysis.get("reasons", [])})


def loss_points(metrics: list[Mapping[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Train and eval (step, loss) points of a metrics log, in step order, the latest record winning per step."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for r in metrics:
        if r.get("train_loss") is not None:
            train[int(r["step"])] = float(r["train_loss"])
        if r.get("eval_loss") is not None:
            evals[int(r["step"])] = float(r["eval_loss"])
    return sorted(train.items()), sorted(evals.items())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (NaN/Infinity allowed, as the trainer writes them)."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def final_health(metrics: list[Mapping[str, Any]], spec: HealthSpec) -> dict[str, Any]:
    """job.health's analysis of the whole curve."""
    train, evals = loss_points(metrics)
    return health.analyze(train, evals, target_band=tuple(spec.target_band), thresholds=spec.thresholds or None)


def train_summary(result: Any, metrics: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Steps, runtime, throughput and parameter counts of a TrainResult."""
    rates = [float(r["tokens_per_second"]) for r in metrics if r.get("tokens_per_second") is not None]
    total = result.total_params or 0
    return {
        "steps": result.global_step,
        "total_steps": result.total_steps,
        "resumed_from_step": result.resumed_from_step,
        "runtime_s": result.train_runtime_s,
        "tokens_per_second": sum(rates) / len(rates) if rates else None,
        "trainable_params": result.trainable_params,
        "total_params": total,
        "trainable_share": result.trainable_params / total if total else None,
        "device": str(result.device),
        "dtype": str(result.dtype),
        "rows_dropped": dict(result.rows_dropped or {}),
    }


def build_report(
    spec: JobSpec,
    *,
    device: str,
    data: Mapping[str, Any],
    train: Mapping[str, Any],
    health_analysis: Mapping[str, Any],
    verification: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """report.json's document; non-finite numbers become null so it is strict JSON."""
    return json_safe(
        {
            "name": spec.name,
            "device": device,
            "base_model": spec.base_model,
            "dataset": spec.dataset,
            "output": spec.output,
            "data": dict(data),
            "train": dict(train),
            "health": dict(health_analysis),
            "verification": dict(verification) if verification is not None else None,
        }
    )


def json_safe(value: Any) -> Any:
    """A copy of value with NaN/inf replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    """A number for a markdown cell; '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: summary, health checks table, verification scores, data report."""
    train, data, hl, ver = report["train"], report["data"], report["health"], report.get("verification")
    lines = [
        f"# Fine-tuning report: {report['name']}",
        "",
        f"- base model: `{report['base_model']}`",
        f"- dataset: `{report['dataset']}`",
        f"- output: `{report['output']}`",
        f"- device: {report['device']} ({train.get('dtype')})",
        f"- steps: {train['steps']} of {train['total_steps']}"
        + (f" (resumed from step {train['resumed_from_step']})" if train.get("resumed_from_step") else ""),
        f"- training time: {_fmt(train.get('runtime_s'))} s, {_fmt(train.get('tokens_per_second'))} tokens/s",
        f"- trainable parameters: {train.get('trainable_params')} of {train.get('total_params')}"
        f" ({_fmt((train.get('trainable_share') or 0) * 100, 3)}%)",
        "",
        f"## Loss-curve health: **{hl['verdict']}**",
        "",
    ]
    lines += [f"- {reason}" for reason in hl.get("reasons") or []]
    lines += ["", "| # | check | status | detail |", "|---|---|---|---|"]
    lines += [
        f"| {c['id']} | {_cell(c['name'])} | {c['status']} | {_cell(c.get('detail', ''))} |" for c in hl.get("checks", [])
    ]
    tr, ev = hl.get("train") or {}, hl.get("eval") or {}
    lines += [
        "",
        "| curve | last | min | slope per 100 steps |",
        "|---|---|---|---|",
        f"| train | {_fmt(tr.get('last'))} | {_fmt(tr.get('min'))} | {_fmt(tr.get('slope_per_100'))} |",
        f"| eval | {_fmt(ev.get('last'))} | {_fmt(ev.get('min'))} | {_fmt(ev.get('slope_per_100'))} |",
        "",
        "## Verification (greedy, base vs tuned)",
        "",
    ]
    if ver is None:
        lines.append("Verification was disabled (verify.enabled: false).")
    else:
        lines += [
            f"{ver['rows']} rows of the verification split; outputs in `predictions.jsonl`.",
            "",
            "| model | exact match | token F1 |",
            "|---|---|---|",
            f"| base | {_fmt(ver['base']['exact_match'])} | {_fmt(ver['base']['token_f1'])} |",
            f"| tuned | {_fmt(ver['tuned']['exact_match'])} | {_fmt(ver['tuned']['token_f1'])} |",
        ]
    splits = data.get("splits", {})
    lines += [
        "",
        "## Data",
        "",
        f"- format: {data.get('format')}; rows read {data.get('rows_read')}, valid {data.get('rows_valid')}, "
        f"invalid {data.get('rows_invalid')}, duplicates removed {data.get('duplicates_removed')}",
        f"- splits: train {splits.get('train')}, test {splits.get('test')}, verification {splits.get('verification')}",
    ]
    lines += [f"- warning: {w}" for w in data.get("warnings") or []]
    return "\n".join(lines) + "\n"


def plot_loss(metrics: list[Mapping[str, Any]], path: Path, title: str = "loss") -> None:
    """loss.png: train and eval loss against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    from matplotlib import pyplot as plt

    train, evals = loss_points(metrics)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals), label="eval loss", marker="o", linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if train or evals:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def write_reports(out_dir: Path, report: Mapping[str, Any], metrics: list[Mapping[str, Any]]) -> None:
    """Write report.json, report.md and loss.png into out_dir."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    plot_loss(metrics, out_dir / "loss.png", title=f"{report['name']}: loss")
