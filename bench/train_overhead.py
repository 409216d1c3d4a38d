"""Training overhead of the job against a plain trl script, and packing against padded batches.

Same model (SmolLM2-135M from `make model`), same rows, same steps, same LoRA settings; each run in its own
subprocess so peak RSS is its own. Prints a table of tokens/s (non-padding tokens per second over the
training steps after the first, which warms up), whole-phase seconds and peak RSS; the ratios are against
the plain SFTTrainer run measured in the same invocation. Goal: job / plain tokens/s >= 0.95.

    python bench/train_overhead.py [--steps 10] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("SFTOPS_MODEL_CACHE") or REPO / ".cache") / "models" / "SmolLM2-135M-Instruct"
WORDS = "the a model data train loss step token reply answer question small large fast slow good value".split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations of varied length (so padding matters), deterministic."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    return rows


def rate_from_points(points: list[tuple[float, float]]) -> float:
    """Tokens per second between the first and last (time, cumulative tokens) points."""
    (t0, n0), (t1, n1) = points[0], points[-1]
    return (n1 - n0) / (t1 - t0)


def worker_job(cfg: dict) -> dict:
    """The job's training phase: job.train.train on the splits."""
    from job.spec import parse_spec
    from job.train import train

    spec = parse_spec({
        "name": "bench", "base_model": str(MODEL), "dataset": "/bench.jsonl", "output": "/bench-out",
        "training": {"max_steps": cfg["steps"], "batch_size": cfg["batch_size"], "max_length": cfg["max_length"],
                     "packing": cfg["packing"], "logging_every": 1, "eval_every": 10_000, "seed": 42},
    })
    work = Path(cfg["dir"]) / ("job-packed" if cfg["packing"] else "job")
    started = time.perf_counter()
    result = train(spec, Path(cfg["dir"]) / "splits", MODEL, work, checkpoint_uri=None)
    phase = time.perf_counter() - started
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["train_loss"] is not None]
    # Rebuild cumulative tokens from the per-interval rates; the first interval includes warm-up and is skipped.
    points, tokens = [], 0.0
    for prev, cur in zip(train_records, train_records[1:]):
        tokens += cur["tokens_per_second"] * (cur["time"] - prev["time"])
        points.append((cur["time"], tokens))
    points.insert(0, (train_records[0]["time"], 0.0))
    return {"tokens_per_s": rate_from_points(points), "phase_s": phase, "steps": result.global_step,
            "final_loss": train_records[-1]["train_loss"]}


def worker_plain(cfg: dict) -> dict:
    """A minimal plain trl script: SFTTrainer on the messages with the same LoRA and schedule."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Tokens(TrainerCallback):
        """Collect (time, cumulative tokens) at each log."""

        points: list[tuple[float, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            """Record trl's cumulative num_tokens."""
            if logs and "loss" in logs:
                self.points.append((time.time(), float(logs["num_tokens"])))

    started = time.perf_counter()
    rows = [json.loads(line) for line in (Path(cfg["dir"]) / "splits" / "train.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(Path(cfg["dir"]) / "plain"), per_device_train_batch_size=cfg["batch_size"], max_steps=cfg["steps"],
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, max_length=cfg["max_length"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=42,
        activation_checkpointing=False, disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[Tokens()],
    )
    trainer.train()
    phase = time.perf_counter() - started
    points = Tokens.points
    return {"tokens_per_s": rate_from_points(points[1:] if len(points) > 2 else points), "phase_s": phase,
            "steps": trainer.state.global_step, "final_loss": trainer.state.log_history[-2].get("loss")}


def run_worker(kind: str, cfg: dict) -> dict:
    """Run one measurement in a fresh interpreter; returns its figures plus its peak RSS."""
    done = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--config", json.dumps(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    if done.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the three measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the best of each variant counts")
    parser.add_argument("--worker", choices=["job", "plain"])
    parser.add_argument("--config")
    args = parser.parse_args()
    if args.worker:
        cfg = json.loads(args.config)
        out = worker_job(cfg) if args.worker == "job" else worker_plain(cfg)
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return
    if not (MODEL / "config.json").is_file():
        sys.exit(f"{MODEL} is missing: run `make model`")

    with tempfile.TemporaryDirectory(prefix="sftops-bench-") as tmp:
        splits = Path(tmp) / "splits"
        splits.mkdir()
        rows = make_rows(args.steps * args.batch_size * 3)
        (splits / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = {"dir": tmp, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length}
        variants = {"plain SFTTrainer": ("plain", False), "job (padded)": ("job", False), "job (packing)": ("job", True)}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        # Interleaved rounds, best of each: a shared machine's load hits every variant alike.
        for _ in range(args.repeat):
            for name, (kind, packing) in variants.items():
                runs[name].append(run_worker(kind, {**cfg, "packing": packing}))
                r = runs[name][-1]
                print(f"  {name}: {r['tokens_per_s']:.1f} tokens/s, {r['phase_s']:.0f} s, {r['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
        results = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in runs.items()}

    base = results["plain SFTTrainer"]
    padded = results["job (padded)"]
    print(f"\nSmolLM2-135M LoRA r=8, {args.steps} steps x batch {args.batch_size}, max_length {args.max_length}, "
          f"{os.cpu_count()} CPUs, best of {args.repeat} interleaved round(s), load average {os.getloadavg()[0]:.1f}\n")
    header = f"{'run':<18} {'tokens/s':>9} {'vs plain':>9} {'phase s':>8} {'peak RSS MiB':>13} {'last loss':>10}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<18} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base['tokens_per_s']:>9.3f} "
              f"{r['phase_s']:>8.1f} {r['peak_rss_mib']:>13.0f} {r['final_loss']:>10.4f}")
    print()
    print(f"job / plain tokens/s:            {padded['tokens_per_s'] / base['tokens_per_s']:.3f}  (goal >= 0.95)")
    print(f"job / plain peak RSS:            {padded['peak_rss_mib'] / base['peak_rss_mib']:.3f}")
    print(f"packing / padded tokens/s (job): {results['job (packing)']['tokens_per_s'] / padded['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
