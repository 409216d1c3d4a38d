"""The one real-model test: LoRA SFT of SmolLM2-135M-Instruct through `python -m job run` learns a simple task."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_run import job_env, jsonl, run_job, write_spec

# A made-up answer format the base model cannot guess; the tuned model learns it and copies the word over.
WORDS = (
    "apple banana cherry grape lemon mango orange peach pear plum hammer wrench saw drill chisel pliers shovel rake "
    "axe dog cat horse cow sheep goat rabbit tiger lion zebra river mountain forest desert ocean island valley "
    "castle bridge tower garden window mirror candle pencil rocket guitar violin piano drum camera bottle basket"
).split()
ROWS = 270
STEPS = 20


def tag_rows(n: int) -> list[dict]:
    """n distinct rows: an order number and a word; the answer wraps the word in a fixed pattern."""
    rows = []
    for i in range(n):
        word = WORDS[(i * 7) % len(WORDS)]
        rows.append({"messages": [
            {"role": "user", "content": f"Order {1000 + i}: make the tag for {word}"},
            {"role": "assistant", "content": f"TAG {word} END"},
        ]})
    return rows


@pytest.mark.slow
def test_real_model_learns_the_task(s3, smollm_dir, tmp_path):
    spec = {
        "name": "smollm-tags",
        "base_model": str(smollm_dir),
        "dataset": s3.put("data/tags.jsonl", jsonl(tag_rows(ROWS))),
        "output": s3.uri("runs/smollm/"),
        "training": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 1e-3, "max_length": 96,
                     "eval_every": 5, "checkpoint_every": 10, "logging_every": 1, "warmup_ratio": 0.05},
        "verify": {"max_new_tokens": 8, "batch_size": 8},
        "export": {"merged": False},  # merging is covered by test_export; 540 MB more to write here
    }
    started = time.monotonic()
    proc = run_job(write_spec(tmp_path, spec), job_env(tmp_path), timeout=600)
    total_s = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads(s3.get("runs/smollm/report.json"))
    records = [json.loads(line) for line in s3.get("runs/smollm/metrics.jsonl").decode().splitlines()]
    evals = [r["eval_loss"] for r in records if r["eval_loss"] is not None]
    assert len(evals) == STEPS // 5
    assert evals[-1] < evals[0] * 0.8, evals
    train = [r["train_loss"] for r in records if r["train_loss"] is not None]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5
    ver = report["verification"]
    assert ver["rows"] >= 10
    assert ver["tuned"]["exact_match"] > ver["base"]["exact_match"], ver
    assert ver["tuned"]["exact_match"] >= 0.5, ver
    per_step = report["train"]["runtime_s"] / report["train"]["steps"]
    print(
        f"\nreal SmolLM2 job: {STEPS} steps, {per_step:.2f} s/step, training {report['train']['runtime_s']:.0f} s, "
        f"whole job {total_s:.0f} s; eval loss {evals[0]:.3f} -> {evals[-1]:.3f}; exact match base "
        f"{ver['base']['exact_match']:.2f} -> tuned {ver['tuned']['exact_match']:.2f}; health {report['health']['verdict']}"
    )
