"""`python -m job run` end to end: a subprocess, the tiny model and a generated dataset in real S3 (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.spec import dump_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240


# ---------------------------------------------------------------- helpers (also used by test_resume)


def dataset_rows(n: int, start: int = 0) -> list[dict]:
    """n distinct chat rows of a deterministic mapping (a number's successor)."""
    return [
        {"messages": [
            {"role": "user", "content": f"What number comes after {i}?"},
            {"role": "assistant", "content": f"{i + 1}"},
        ]}
        for i in range(start, start + n)
    ]


def jsonl(rows: list[dict]) -> str:
    """Rows as JSON Lines text."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def upload_dir(s3, src: Path, prefix: str) -> str:
    """Upload a local directory under a key prefix; returns its s3:// URI (ending in '/')."""
    for path in sorted(src.rglob("*")):
        if path.is_file():
            s3.put(f"{prefix}/{path.relative_to(src).as_posix()}", path.read_bytes())
    return s3.uri(prefix + "/")


def tiny_spec(s3, model_uri: str, data_uri: str, output_key: str, **training) -> dict:
    """A spec that trains the tiny model for a few steps."""
    return {
        "name": "tiny-run",
        "base_model": model_uri,
        "dataset": data_uri,
        "output": s3.uri(output_key),
        "training": {"max_steps": 6, "batch_size": 4, "max_length": 64, "eval_every": 3, "checkpoint_every": 3,
                     "logging_every": 1, "warmup_ratio": 0.0, **training},
        "verify": {"max_new_tokens": 4, "batch_size": 8},
    }


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment (AWS variables point at moto) without plane variables, plus a private model cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFTOPS_")}
    env.update({"SFTOPS_MODEL_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1", **extra})
    return env


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.json") -> Path:
    """Write a spec file for the job to read."""
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


def run_job(spec_path: Path, env: dict[str, str], timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `python -m job run --spec PATH` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "job", "run", "--spec", str(spec_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def snapshot(s3, prefix: str) -> dict[str, bytes]:
    """Every object under a prefix with its bytes."""
    return {k: s3.get(k) for k in s3.keys(prefix)}


@pytest.fixture
def staged(s3, tiny_model):
    """The tiny model and a 120-row dataset in the test's bucket."""
    return {
        "model": upload_dir(s3, tiny_model, "models/tiny"),
        "data": s3.put("data/train.jsonl", jsonl(dataset_rows(120))),
    }


# ---------------------------------------------------------------- the happy path


def test_run_end_to_end_then_keeps_then_overwrites_output(s3, staged, tmp_path):
    from tests.test_reporter import TOKEN, Plane

    plane = Plane()
    try:
        spec = tiny_spec(s3, staged["model"], staged["data"], "runs/e2e/")
        env = job_env(tmp_path, SFTOPS_JOB_ID="e2e1", SFTOPS_PLANE_URL=plane.url, SFTOPS_JOB_TOKEN=TOKEN)
        started = time.monotonic()
        proc = run_job(write_spec(tmp_path, spec), env)
        elapsed = time.monotonic() - started
    finally:
        plane.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TOKEN not in proc.stderr + proc.stdout
    assert "resolved spec" in proc.stderr

    keys = {k.removeprefix("runs/e2e/") for k in s3.keys("runs/e2e/")}
    expected = {
        "manifest.json", "spec.json", "metrics.jsonl", "report.json", "report.md", "loss.png", "predictions.jsonl",
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
        "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json",
        "splits/train.jsonl", "splits/test.jsonl", "splits/verification.jsonl", "splits/data_report.json",
    }
    assert expected <= keys, sorted(expected - keys)
    assert not any(k.startswith("checkpoints/") for k in keys)  # dropped once the output is complete

    manifest = json.loads(s3.get("runs/e2e/manifest.json"))
    assert manifest["status"] == "succeeded" and manifest["device"] == "cpu" and manifest["steps"] == 6
    assert {f["path"] for f in manifest["files"]} == keys - {"manifest.json"}
    for f in manifest["files"]:
        assert hashlib.sha256(s3.get(f"runs/e2e/{f['path']}")).hexdigest() == f["sha256"]

    assert json.loads(s3.get("runs/e2e/spec.json")) == json.loads(dump_spec(parse_spec(spec)))
    report = json.loads(s3.get("runs/e2e/report.json"))
    assert report["train"]["steps"] == 6 and report["train"]["total_steps"] == 6
    assert 0 < report["train"]["trainable_share"] < 1
    assert [c["id"] for c in report["health"]["checks"]] == [1, 2, 3, 4, 5]
    verification_rows = s3.get("runs/e2e/splits/verification.jsonl").decode().splitlines()
    predictions = [json.loads(line) for line in s3.get("runs/e2e/predictions.jsonl").decode().splitlines()]
    assert report["verification"]["rows"] == len(verification_rows) == len(predictions) > 0
    assert set(predictions[0]) == {"prompt", "reference", "base", "tuned"}
    assert predictions[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert s3.get("runs/e2e/loss.png").startswith(b"\x89PNG")
    assert "| # | check | status | detail |" in s3.get("runs/e2e/report.md").decode()

    bodies = [r["body"] for r in plane.requests]
    assert {r["auth"] for r in plane.requests} == {f"Bearer {TOKEN}"}
    statuses = [b["status"] for b in bodies if "status" in b]
    assert statuses == ["running", "succeeded"]
    final = bodies[-1]
    assert final["artifacts"]["manifest"] == s3.uri("runs/e2e/manifest.json")
    assert final["total_steps"] == 6
    reported_steps = sorted({m["step"] for b in bodies for m in b.get("metrics", [])})
    logged_steps = sorted({json.loads(line)["step"] for line in s3.get("runs/e2e/metrics.jsonl").decode().splitlines()})
    assert reported_steps == logged_steps and logged_steps[-1] == 6
    print(f"tiny end-to-end job: {elapsed:.1f} s")

    # The same spec again: the completed output is kept, byte for byte.
    before = snapshot(s3, "runs/e2e/")
    again = run_job(write_spec(tmp_path, spec), job_env(tmp_path))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: output s3://")
    assert "export.overwrite: true" in again.stderr
    assert snapshot(s3, "runs/e2e/") == before

    # With export.overwrite it is replaced, and files the new run does not write (merged/) are gone.
    spec["export"] = {"overwrite": True, "merged": False}
    spec["training"].update(max_steps=2, eval_every=2)
    replaced = run_job(write_spec(tmp_path, spec), job_env(tmp_path))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    keys = s3.keys("runs/e2e/")
    assert not any(k.startswith("runs/e2e/merged/") for k in keys)
    manifest = json.loads(s3.get("runs/e2e/manifest.json"))
    assert manifest["steps"] == 2
    assert {f["path"] for f in manifest["files"]} == {k.removeprefix("runs/e2e/") for k in keys} - {"manifest.json"}
    assert json.loads(s3.get("runs/e2e/spec.json"))["export"]["overwrite"] is True


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing lost


def bert_like_model(root: Path) -> Path:
    """A model directory whose config is a masked LM, not a causal LM."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    (root / "tokenizer.json").write_text("{}")
    (root / "model.safetensors").write_bytes(b"\x00" * 16)
    return root


BAD_INPUTS = {
    "missing model": (lambda s3, st, tmp: {"base_model": s3.uri("models/nothing-here/")}, "base_model"),
    "missing dataset": (lambda s3, st, tmp: {"dataset": s3.uri("data/missing.jsonl")}, "dataset"),
    "missing dataset bucket": (lambda s3, st, tmp: {"dataset": "s3://no-such-bucket-sftops/d.jsonl"},
                               "no-such-bucket-sftops"),
    "missing output bucket": (lambda s3, st, tmp: {"output": "s3://no-such-bucket-sftops/out/"},
                              "no-such-bucket-sftops"),
    "dataset fails validation": (
        lambda s3, st, tmp: {"dataset": s3.put("data/bad.jsonl", jsonl(dataset_rows(60)) + "{not json\n"
                                               + jsonl(dataset_rows(60, start=100)))},
        "bad.jsonl:61"),
    "too few rows": (lambda s3, st, tmp: {"dataset": s3.put("data/small.jsonl", jsonl(dataset_rows(20)))}, "20"),
    "not a causal LM": (lambda s3, st, tmp: {"base_model": upload_dir(s3, bert_like_model(tmp / "bert"), "models/bert")},
                        "not a causal language model"),
    "unwritable output": (lambda s3, st, tmp: {"output": str(_file(tmp / "a-file") / "out")}, "a-file"),
    "invalid spec field": (lambda s3, st, tmp: {"training": {"learning_rate": 5}}, "training.learning_rate"),
}


def _file(path: Path) -> Path:
    """Create a regular file (nothing can be written below it, even as root)."""
    path.write_text("x")
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_keeps_output(case, s3, staged, tmp_path):
    change, expected = BAD_INPUTS[case]
    s3.put("runs/bad/keep.txt", "existing artifact")
    s3.put("runs/bad/checkpoints/step-3/adapter_model.safetensors", b"\x01\x02")
    before = snapshot(s3, "runs/bad/")
    spec = {**tiny_spec(s3, staged["model"], staged["data"], "runs/bad/"), **change(s3, staged, tmp_path)}

    proc = run_job(write_spec(tmp_path, spec), job_env(tmp_path), timeout=120)

    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [i for i, line in enumerate(proc.stderr.splitlines()) if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    # One line says what is wrong; a data error may list the bad rows (FILE:LINE) on the lines after it.
    message = "\n".join(proc.stderr.splitlines()[errors[0]:])
    assert expected in message, message
    assert "Traceback" not in proc.stderr
    assert snapshot(s3, "runs/bad/") == before


def test_bad_input_reports_invalid_input_to_plane(s3, staged, tmp_path):
    from tests.test_reporter import TOKEN, Plane

    plane = Plane()
    try:
        spec = tiny_spec(s3, staged["model"], s3.uri("data/missing.jsonl"), "runs/bad/")
        env = job_env(tmp_path, SFTOPS_JOB_ID="bad1", SFTOPS_PLANE_URL=plane.url, SFTOPS_JOB_TOKEN=TOKEN)
        proc = run_job(write_spec(tmp_path, spec), env, timeout=120)
    finally:
        plane.stop()
    assert proc.returncode == 2
    bodies = [r["body"] for r in plane.requests]
    assert [b["status"] for b in bodies if "status" in b] == ["running", "failed"]
    assert bodies[-1]["error"]["code"] == "invalid_input"
    assert "data/missing.jsonl" in bodies[-1]["error"]["message"]
    assert TOKEN not in proc.stderr
