"""LoRA SFT of the tiny Llama end to end: metrics, eval, checkpoints on a real S3, resume, divergence, packing."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from job import checkpoints, storage
from job.spec import parse_spec
from job.train import METRICS_FILE, NonFiniteLossError, train

FIELDS = {"step", "epoch", "train_loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "time"}
CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", METRICS_FILE}


def conversation(i: int) -> dict:
    """A short two-turn row whose reply is a function of the prompt."""
    a, b = i % 10, (i * 7) % 10
    return {"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]}


@pytest.fixture
def splits(tmp_path):
    """train.jsonl (32 rows) and test.jsonl (4 rows) as the data stage writes them."""
    d = tmp_path / "splits"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(32)))
    (d / "test.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(100, 104)))
    return d


def make_spec(model_dir, **training):
    """A spec for the tiny model with a small, fast schedule."""
    base = {"batch_size": 4, "max_length": 96, "learning_rate": 1e-3, "logging_every": 1,
            "eval_every": 100, "checkpoint_every": 100}
    return parse_spec({"name": "tiny", "base_model": str(model_dir), "dataset": "/data.jsonl", "output": "/out",
                       "training": {**base, **training}})


def read_metrics(path):
    """Records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_adapter(a, b) -> None:
    """Two peft models carry identical, trained (non-zero) LoRA B weights."""
    import torch
    from peft import get_peft_model_state_dict

    wa, wb = get_peft_model_state_dict(a), get_peft_model_state_dict(b)
    assert wa.keys() == wb.keys()
    assert any(k.endswith("lora_B.weight") and wa[k].abs().sum() > 0 for k in wa)  # LoRA B starts at zero
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_short_run_logs_evaluates_and_uploads_complete_checkpoints(tiny_model, splits, tmp_path, s3, monkeypatch):
    order = []  # every storage write of the checkpoint uploader, in order
    real_upload, real_write = storage.upload, storage.write_bytes
    monkeypatch.setattr(storage, "upload", lambda src, uri: (order.append(uri), real_upload(src, uri))[1])
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (order.append(uri), real_write(uri, data))[1])
    records = []
    spec = make_spec(tiny_model, max_steps=5, logging_every=2, eval_every=2, checkpoint_every=2)

    result = train(spec, splits, tiny_model, tmp_path / "work", checkpoint_uri=s3.uri("run/checkpoints/"),
                   on_log=records.append)

    assert (result.global_step, result.total_steps, result.resumed_from_step) == (5, 5, None)
    assert (result.device, result.dtype) == ("cpu", "float32")
    assert result.rows_dropped == {}
    # LoRA r=8 on all 7 linear layers of 2 blocks (hidden 64, kv 32, mlp 128): 8 * sum(in + out).
    assert result.trainable_params == 2 * 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert result.total_params > 3_000_000
    assert result.metrics_path == tmp_path / "work" / METRICS_FILE

    metrics = read_metrics(result.metrics_path)
    assert metrics == records  # on_log saw exactly what was written
    assert all(set(r) == FIELDS for r in metrics)
    train_points = [r for r in metrics if r["train_loss"] is not None]
    eval_points = [r for r in metrics if r["eval_loss"] is not None]
    assert [r["step"] for r in train_points] == [2, 4, 5]  # every logging_every steps, and the last step
    assert [r["step"] for r in eval_points] == [2, 4, 5]  # every eval_every steps, and at the end
    for r in train_points:
        assert math.isfinite(r["train_loss"]) and r["grad_norm"] > 0 and r["tokens_per_second"] > 0
        assert r["learning_rate"] is not None and r["epoch"] > 0
    assert all(math.isfinite(r["eval_loss"]) and r["train_loss"] is None for r in eval_points)

    # Checkpoints at 2, 4 and the end (5); the oldest is pruned, the newest two are complete with full state.
    assert checkpoints.complete_steps(s3.uri("run/checkpoints/")) == [4, 5]
    assert not s3.keys("run/checkpoints/step-2/")
    for step in (4, 5):
        keys = {k.rsplit("/", 1)[1] for k in s3.keys(f"run/checkpoints/step-{step}/")}
        assert CHECKPOINT_FILES | {"COMPLETE"} <= keys
        marker = json.loads(s3.get(f"run/checkpoints/step-{step}/COMPLETE"))
        assert marker["step"] == step and set(marker["files"]) == keys - {"COMPLETE"}
        state = json.loads(s3.get(f"run/checkpoints/step-{step}/trainer_state.json"))
        assert state["global_step"] == step
        saved = [json.loads(line) for line in s3.get(f"run/checkpoints/step-{step}/{METRICS_FILE}").splitlines()]
        assert saved == [r for r in metrics if r["step"] <= step][: len(saved)] and saved[-1]["step"] == step
    # The COMPLETE marker of each checkpoint is written after every one of its files.
    for step in (2, 4, 5):
        writes = [i for i, uri in enumerate(order) if f"/step-{step}/" in uri]
        assert order[writes[-1]].endswith(f"step-{step}/COMPLETE")
        assert len(writes) == len(marker["files"]) + 1


def test_resume_continues_from_the_latest_complete_checkpoint(tiny_model, splits, tmp_path, s3):
    spec = make_spec(tiny_model, max_steps=3, checkpoint_every=1)
    uri = s3.uri("resume/checkpoints/")
    first = train(spec, splits, tiny_model, tmp_path / "first", checkpoint_uri=uri)
    uninterrupted = {r["step"]: r for r in read_metrics(first.metrics_path) if r["train_loss"] is not None}
    assert checkpoints.complete_steps(uri) == [2, 3]

    # A crash while step 3 was uploading: its files are there, its marker is not.
    s3.client.delete_object(Bucket=s3.bucket, Key="resume/checkpoints/step-3/COMPLETE")
    assert checkpoints.latest_complete(uri) == 2
    records = []
    second = train(spec, splits, tiny_model, tmp_path / "second", checkpoint_uri=uri, on_log=records.append)

    assert (second.resumed_from_step, second.global_step, second.total_steps) == (2, 3, 3)
    assert [r["step"] for r in records if r["train_loss"] is not None] == [3]  # only new steps are reported
    resumed = read_metrics(second.metrics_path)
    assert [r["step"] for r in resumed if r["train_loss"] is not None] == [1, 2, 3]  # earlier ones carried over
    # Same data order, optimizer, scheduler and RNG: the resumed step reproduces the uninterrupted one.
    for r in resumed:
        if r["train_loss"] is not None:
            assert r["train_loss"] == pytest.approx(uninterrupted[r["step"]]["train_loss"], rel=1e-4)
            assert r["learning_rate"] == pytest.approx(uninterrupted[r["step"]]["learning_rate"], rel=1e-6)
    assert checkpoints.complete_steps(uri) == [2, 3]
    assert_same_adapter(first.model, second.model)


def test_resume_from_the_last_step_trains_nothing_more(tiny_model, splits, tmp_path):
    spec = make_spec(tiny_model, max_steps=1, checkpoint_every=1, warmup_ratio=0)
    uri = str(tmp_path / "ckpt")  # a local checkpoint prefix works the same way
    first = train(spec, splits, tiny_model, tmp_path / "a", checkpoint_uri=uri)
    again = train(spec, splits, tiny_model, tmp_path / "b", checkpoint_uri=uri)
    assert (again.resumed_from_step, again.global_step, again.total_steps) == (1, 1, 1)
    assert_same_adapter(first.model, again.model)  # the trained adapter, not a fresh one


def test_non_finite_loss_stops_the_run_at_that_step(tiny_model, splits, tmp_path, s3):
    import torch
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], math.inf)  # an overflowed base model
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    spec = make_spec(broken, max_steps=4, checkpoint_every=1)

    with pytest.raises(NonFiniteLossError, match=r"train loss became nan at step 1: .*learning_rate") as info:
        train(spec, splits, broken, tmp_path / "work", checkpoint_uri=s3.uri("nan/"))

    assert (info.value.step, info.value.code, info.value.exit_code) == (1, "non_finite_loss", 1)
    logged = read_metrics(tmp_path / "work" / METRICS_FILE)
    assert [r["step"] for r in logged] == [1] and math.isnan(logged[0]["train_loss"])
    assert checkpoints.complete_steps(s3.uri("nan/")) == []  # diverged weights are never checkpointed


def test_packing_trains_padding_free_in_fewer_steps(tiny_model, splits, tmp_path):
    (splits / "train.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(12)))
    spec = make_spec(tiny_model, epochs=1, packing=True, max_length=160)
    result = train(spec, splits, tiny_model, tmp_path / "work", checkpoint_uri=None)
    unpacked_steps = math.ceil(12 / spec.training.batch_size)
    assert 0 < result.total_steps < unpacked_steps  # 3 rows of ~49 tokens fit in each 160-token sequence
    assert result.global_step == result.total_steps
    metrics = read_metrics(result.metrics_path)
    assert all(math.isfinite(r["train_loss"]) for r in metrics if r["train_loss"] is not None)
    assert metrics[-1]["eval_loss"] is not None


def test_masking_errors_reach_the_caller_before_training(tiny_model, splits, tmp_path):
    from job.errors import InputError

    (splits / "train.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}) + "\n")
    with pytest.raises(InputError, match="train.jsonl: no row has a trainable assistant token"):
        train(make_spec(tiny_model, max_steps=1), splits, tiny_model, tmp_path / "work", checkpoint_uri=None)


def test_unusable_checkpoint_bucket_fails_before_training(tiny_model, splits, tmp_path, s3_env):
    from job.errors import StorageError

    with pytest.raises(StorageError, match="s3://no-such-bucket-sftops/ckpt/: bucket 'no-such-bucket-sftops' does not exist"):
        train(make_spec(tiny_model, max_steps=1), splits, tiny_model, tmp_path / "work",
              checkpoint_uri="s3://no-such-bucket-sftops/ckpt/")
    assert not (tmp_path / "work" / "trainer").exists()
