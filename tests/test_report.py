"""The job's report: live health tracking, report.json/.md content, loss.png."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from job import report
from job.spec import HealthSpec, parse_spec


class Recorder:
    """A reporter that keeps what it is given (the real one posts it; see test_reporter)."""

    def __init__(self):
        """Start empty."""
        self.metrics, self.events = [], []

    def metric(self, record):
        """Keep a metrics record."""
        self.metrics.append(dict(record))

    def event(self, level, message, data=None):
        """Keep an event."""
        self.events.append((level, message, data))


def records(train: list[float], eval_every: int = 10, evals: dict[int, float] | None = None) -> list[dict]:
    """Metrics records as the trainer writes them: one per train step, eval records at eval steps."""
    out = []
    for step, loss in enumerate(train, 1):
        out.append({"step": step, "epoch": step / 100, "train_loss": loss, "eval_loss": None, "learning_rate": 1e-4,
                    "grad_norm": 1.0, "tokens_per_second": 1000.0 + step, "time": 1.7e9 + step})
        if evals and step in evals:
            out.append({"step": step, "epoch": step / 100, "train_loss": None, "eval_loss": evals[step],
                        "learning_rate": None, "grad_norm": None, "tokens_per_second": None, "time": 1.7e9 + step})
    return out


def healthy_curve(n: int = 200) -> tuple[list[float], dict[int, float]]:
    """Train falls from 2.0 and flattens near 0.4; eval sits a little above."""
    train = [0.4 + 1.6 * math.exp(-i / 25) for i in range(n)]
    evals = {s: 0.45 + 1.6 * math.exp(-(s - 1) / 25) for s in range(20, n + 1, 20)}
    return train, evals


def test_live_health_forwards_every_record_and_logs_verdict_changes(caplog):
    caplog.set_level("INFO")
    sink = Recorder()
    live = report.LiveHealth(HealthSpec(), sink)
    train, evals = healthy_curve()
    rows = records(train, evals=evals)
    for r in rows:
        live(r)
    assert sink.metrics == rows
    verdicts = [m for _, m, _ in sink.events]
    assert verdicts[0] == "health: insufficient_data"
    assert verdicts[-1] == f"health: {live.verdict}"
    assert len(verdicts) == len(set(verdicts)) or all(a != b for a, b in zip(verdicts, verdicts[1:]))
    assert "health at step 1: insufficient_data" in caplog.text
    final = report.final_health(rows, HealthSpec())
    assert final["verdict"] == live.verdict == "healthy"


def test_live_health_announces_a_verdict_only_once_it_holds():
    """A verdict flickering near a boundary is not announced; one that holds is; diverging is at once."""

    class Scripted:
        """Stands in for the tracker, replaying a scripted sequence of verdicts."""

        def __init__(self, verdicts):
            self.verdicts = iter(verdicts)

        def add_train(self, step, loss):
            """Ignore the point."""

        def add_eval(self, step, loss):
            """Ignore the point."""

        def analysis(self):
            """The next scripted verdict."""
            return {"verdict": next(self.verdicts), "reasons": []}

    sink = Recorder()
    live = report.LiveHealth(HealthSpec(), sink)
    hold = report.VERDICT_HOLD_RECORDS
    flicker = ["plateau_high", "still_improving"] * 4
    live.tracker = Scripted(["insufficient_data"] + flicker + ["healthy"] * hold + ["diverging"])
    for r in records([1.0] * (2 + len(flicker) + hold)):
        live(r)
    assert [m for _, m, _ in sink.events] == ["health: insufficient_data", "health: healthy", "health: diverging"]


def test_live_health_survives_a_bad_record(caplog):
    sink = Recorder()
    live = report.LiveHealth(HealthSpec(), sink)
    live({"step": "not-a-number", "train_loss": 1.0})
    assert sink.metrics == [{"step": "not-a-number", "train_loss": 1.0}]
    assert "health tracking failed" in caplog.text


def test_loss_points_keep_latest_per_step():
    rows = [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.0}, {"step": 2, "eval_loss": 2.5},
            {"step": 1, "train_loss": 2.9}]  # a resumed run may log step 1 again
    assert report.loss_points(rows) == ([(1, 2.9), (2, 2.0)], [(2, 2.5)])


def make_report(verification=True):
    """A report built from a healthy curve."""
    spec = parse_spec({"name": "r1", "base_model": "/m", "dataset": "/d.jsonl", "output": "/o"})
    train, evals = healthy_curve()
    rows = records(train, evals=evals)
    result = SimpleNamespace(global_step=200, total_steps=200, resumed_from_step=120, train_runtime_s=100.0,
                             trainable_params=50, total_params=1000, device="cpu", dtype="float32",
                             rows_dropped={"no_trainable_tokens": 1})
    data = {"format": "messages", "rows_read": 1000, "rows_valid": 990, "rows_invalid": 10, "duplicates_removed": 0,
            "splits": {"train": 840, "test": 100, "verification": 50}, "warnings": ["w1"]}
    scores = {"rows": 50, "base": {"exact_match": 0.1, "token_f1": 0.3},
              "tuned": {"exact_match": 0.6, "token_f1": float("nan")}} if verification else None
    doc = report.build_report(spec, device="cpu", data=data, train=report.train_summary(result, rows),
                              health_analysis=report.final_health(rows, spec.health), verification=scores)
    return doc, rows


def test_report_json_content():
    doc, _ = make_report()
    assert doc["name"] == "r1" and doc["device"] == "cpu"
    assert doc["train"]["steps"] == 200 and doc["train"]["resumed_from_step"] == 120
    assert doc["train"]["trainable_share"] == pytest.approx(0.05)
    assert doc["train"]["tokens_per_second"] == pytest.approx(1000 + 100.5)
    assert doc["health"]["verdict"] == "healthy"
    assert [c["id"] for c in doc["health"]["checks"]] == [1, 2, 3, 4, 5]
    assert doc["verification"]["tuned"]["token_f1"] is None  # NaN became null
    json.dumps(doc, allow_nan=False)  # strict JSON


def test_report_markdown_has_checks_table_and_scores():
    doc, _ = make_report()
    md = report.render_markdown(doc)
    assert md.startswith("# Fine-tuning report: r1\n")
    assert "## Loss-curve health: **healthy**" in md
    assert "| # | check | status | detail |" in md
    for check in doc["health"]["checks"]:
        assert f"| {check['id']} | {check['name']} | {check['status']} |" in md
    assert "| base | 0.1 | 0.3 |" in md
    assert "| tuned | 0.6 | - |" in md
    assert "(resumed from step 120)" in md
    assert "- warning: w1" in md
    no_verify, _ = make_report(verification=False)
    assert "Verification was disabled" in report.render_markdown(no_verify)


def test_write_reports_makes_png(tmp_path):
    doc, rows = make_report()
    report.write_reports(tmp_path, doc, rows)
    assert json.loads((tmp_path / "report.json").read_text()) == doc
    assert (tmp_path / "report.md").read_text().startswith("# Fine-tuning report")
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_live_health_after_resume_reads_earlier_steps_once(tmp_path):
    train, evals = healthy_curve()
    rows = records(train, evals=evals)
    history = tmp_path / "metrics.jsonl"
    # As the trainer leaves it on resume at step 150: the restored records, then the first new one.
    resumed_at = next(i for i, r in enumerate(rows) if r["step"] == 151 and r["train_loss"] is not None)
    history.write_text("".join(json.dumps(r) + "\n" for r in rows[: resumed_at + 1]))
    sink = Recorder()
    live = report.LiveHealth(HealthSpec(), sink, history=history)
    for r in rows[resumed_at:]:
        live(r)
    assert [m["step"] for m in sink.metrics][0] == 151  # only new records go to the plane
    assert sink.events[0][1] != "health: insufficient_data"  # judged on the whole curve from the first call
    assert live.tracker.analysis()["train"]["points"] == len(train)
    fresh = report.LiveHealth(HealthSpec(), Recorder(), history=tmp_path / "absent.jsonl")
    fresh(rows[0])
    assert fresh.verdict == "insufficient_data"
