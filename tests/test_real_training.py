"""The one real-model test: LoRA SFT of SmolLM2-135M-Instruct through `python -m job run` learns a simple task."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_run import job_env, jsonl, run_job, write_spec

# Three bins named arbitrarily: the base model cannot guess the answer format, the tuned one learns it
# from the item's (well-known) category.
BINS = {
    "BIN-A": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"],
    "BIN-B": ["hammer", "wrench", "saw", "drill", "chisel", "pliers", "screwdriver", "shovel", "rake", "axe"],
    "BIN-C": ["dog", "cat", "horse", "cow", "sheep", "goat", "rabbit", "tiger", "lion", "zebra"],
}
ROWS = 270
STEPS = 30


def bin_rows(n: int) -> list[dict]:
    """n distinct rows: an order number and an item; the answer is the item's bin."""
    items = [(item, label) for label, words in BINS.items() for item in words]
    rows = []
    for i in range(n):
        item, label = items[(i * 7) % len(items)]
        rows.append({"messages": [
            {"role": "user", "content": f"Order {1000 + i}: which bin does this item go in? {item}"},
            {"role": "assistant", "content": label},
        ]})
    return rows


@pytest.mark.slow
def test_real_model_learns_the_task(s3, smollm_dir, tmp_path):
    spec = {
        "name": "smollm-bins",
        "base_model": str(smollm_dir),
        "dataset": s3.put("data/bins.jsonl", jsonl(bin_rows(ROWS))),
        "output": s3.uri("runs/smollm/"),
        "training": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 1e-3, "max_length": 96,
                     "eval_every": 6, "checkpoint_every": 15, "logging_every": 1, "warmup_ratio": 0.05},
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
    assert len(evals) == STEPS // 6
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
