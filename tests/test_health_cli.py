"""`python -m job health FILE` on real-shaped trainer_state.json and metrics.jsonl files, through the real entry."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_health(*args: str) -> subprocess.CompletedProcess:
    """Run the command as a user would: a new `python -m job health` process."""
    return subprocess.run([sys.executable, "-m", "job", "health", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def health_cmd(capsys):
    """The same entry (`job.__main__.main`, which maps errors to exit codes) in-process: no interpreter start-up."""
    from job.__main__ import main

    def run(*args: str) -> subprocess.CompletedProcess:
        """Run `health ARGS` and capture what it prints."""
        capsys.readouterr()
        code = main(["health", *map(str, args)])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def healthy_loss(step: int, steps: int = 400) -> float:
    """Falls from ~1.8 and settles near 0.42."""
    return 0.42 + 1.4 * math.exp(-6 * step / steps)


def trainer_state(path: Path, loss=healthy_loss, steps: int = 400) -> Path:
    """A trainer_state.json as transformers writes it: logs every 5 steps, eval every 50, a run summary last."""
    rng = random.Random(0)
    history = []
    for step in range(5, steps + 1, 5):
        history.append({"epoch": round(step / 200, 4), "grad_norm": 0.8, "learning_rate": 2e-4 * (1 - step / steps),
                        "loss": round(loss(step) * math.exp(rng.gauss(0, 0.1)), 4), "step": step})
        if step % 50 == 0:
            history.append({"epoch": round(step / 200, 4), "eval_loss": loss(step) + 0.06, "eval_runtime": 3.2,
                            "eval_samples_per_second": 31.0, "eval_steps_per_second": 4.0, "step": step})
    history.append({"epoch": 2.0, "step": steps, "total_flos": 1.2e15, "train_loss": 0.71, "train_runtime": 812.5,
                    "train_samples_per_second": 3.9, "train_steps_per_second": 0.49})
    state = {"best_metric": None, "best_model_checkpoint": None, "epoch": 2.0, "eval_steps": 50, "global_step": steps,
             "is_hyper_param_search": False, "is_local_process_zero": True, "is_world_process_zero": True,
             "log_history": history, "logging_steps": 5, "max_steps": steps, "num_train_epochs": 2,
             "save_steps": 100, "train_batch_size": 8, "trial_name": None, "trial_params": None}
    path.write_text(json.dumps(state, indent=2))
    return path


def metrics_jsonl(path: Path, loss, steps: int = 300, eval_every: int = 50) -> Path:
    """The job's metrics.jsonl: one record per logged step, eval_loss on evaluation steps."""
    rng = random.Random(1)
    with path.open("w") as f:
        for step in range(1, steps + 1):
            value = loss(step)
            record = {"step": step, "epoch": step / steps, "train_loss": value * math.exp(rng.gauss(0, 0.1))
                      if math.isfinite(value) else value, "eval_loss": None, "learning_rate": 1e-4,
                      "grad_norm": 1.0, "tokens_per_second": 900.0, "time": 1.7e9 + step}
            f.write(json.dumps(record) + "\n")
            if step % eval_every == 0:
                f.write(json.dumps({"step": step, "epoch": step / steps, "train_loss": None,
                                    "eval_loss": healthy_loss(step, steps) + 0.05}) + "\n")
    return path


def test_trainer_state_json(tmp_path):
    """The log_history's loss entries are train points, eval_loss entries eval points; the summary is skipped."""
    result = run_health(trainer_state(tmp_path / "trainer_state.json"))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["format"] == "trainer_state.json"
    assert out["verdict"] == "healthy", out["reasons"]
    assert out["train"]["points"] == 80 and out["eval"]["points"] == 8
    assert [c["status"] for c in out["checks"]] == ["pass"] * 5
    assert out["gap"] == pytest.approx(out["eval"]["last"] - out["checks"][2]["values"]["train"])
    assert set(out) >= {"verdict", "reasons", "checks", "train", "eval", "gap"}


def test_metrics_jsonl_diverging_with_nan(tmp_path, health_cmd):
    """A metrics.jsonl whose last train loss is NaN: verdict diverging, exit 0, output is strict JSON."""
    path = metrics_jsonl(tmp_path / "metrics.jsonl", lambda s: float("nan") if s == 300 else healthy_loss(s, 300))
    result = health_cmd(path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert out["format"] == "metrics.jsonl"
    assert out["verdict"] == "diverging"
    assert out["train"]["nonfinite"] == 1 and out["train"]["points"] == 300 and out["eval"]["points"] == 6


def test_target_band_threshold_and_fail_on_unhealthy(tmp_path, health_cmd):
    """The band and thresholds change the verdict; --fail-on-unhealthy turns an unhealthy verdict into exit 3."""
    path = metrics_jsonl(tmp_path / "metrics.jsonl", lambda s: 0.9 + 1.0 * math.exp(-6 * s / 300))
    assert json.loads(health_cmd(path).stdout)["verdict"] == "plateau_high"
    assert json.loads(health_cmd(path, "--target-band", "0.6,1.0").stdout)["verdict"] == "healthy"
    assert json.loads(health_cmd(path, "--threshold", "min_train_points=1000").stdout)["verdict"] == "insufficient_data"
    failing = health_cmd(path, "--fail-on-unhealthy")
    assert failing.returncode == 3
    assert failing.stderr.strip().startswith("unhealthy: plateau_high: train loss flattened at")
    assert health_cmd(path, "--fail-on-unhealthy", "--target-band", "0.6,1.0").returncode == 0


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("metrics.jsonl", '{"step": 1, "train_loss": 2.0}\n\n{"step": 2, "train_loss": 1.9\n',
         "metrics.jsonl:3: not valid JSON"),
        ("metrics.jsonl", '{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": "low"}\n',
         'metrics.jsonl:2: train_loss must be a number, got "low"'),
        ("metrics.jsonl", '{"step": 1, "train_loss": 2.0}\n{"train_loss": 1.0}\n', "metrics.jsonl:2: step is missing"),
        ("metrics.jsonl", '{"step": 1.5, "train_loss": 2.0}\n', "metrics.jsonl:1: step must be a whole number"),
        ("metrics.jsonl", "[1, 2]\n", "metrics.jsonl:1: expected a JSON object"),
        ("metrics.jsonl", '{"step": 1}\n', "metrics.jsonl: no train or eval loss points found"),
        ("trainer_state.json", '{\n  "log_history": [\n    {"loss": 1.0, "step": 1},\n    {"loss": 0.9 "step": 2}\n  ]\n}\n',
         "trainer_state.json:4: not valid JSON"),
        ("trainer_state.json", '{\n  "global_step": 3\n}\n', "trainer_state.json:1: no log_history list"),
        ("trainer_state.json", '{"log_history": [{"loss": 1.0, "step": 1}, {"loss": null, "eval_loss": "x", "step": 2}]}',
         'trainer_state.json: log_history[1]: eval_loss must be a number, got "x"'),
        ("trainer_state.json", "", "trainer_state.json:1: the file is empty"),
    ],
)
def test_malformed_files_exit_2_with_file_and_line(tmp_path, health_cmd, name, content, message):
    """One line on stderr naming the file (and line or entry), exit code 2, nothing on stdout."""
    path = tmp_path / name
    path.write_text(content)
    result = health_cmd(path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path}/") and message in lines[0], lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-band", "0.5,0.3"], "--target-band: must satisfy 0 <= LOW < HIGH"),
        (["--target-band", "low"], "--target-band: expected LOW,HIGH"),
        (["--threshold", "nope=1"], "--threshold 'nope=1': expected NAME=VALUE"),
        (["--threshold", "flat_tolerance=abc"], "is not a number"),
        (["--threshold", "window_fraction=3"], "window_fraction"),
    ],
)
def test_bad_options_exit_2(tmp_path, health_cmd, args, message):
    """Bad options are user errors: exit 2 and one line saying which option."""
    result = health_cmd(trainer_state(tmp_path / "trainer_state.json"), *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_file_exits_2(tmp_path):
    """A path that does not exist is named."""
    result = run_health(tmp_path / "nope.json")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path}/nope.json: file not found"
