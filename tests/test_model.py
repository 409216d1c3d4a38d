"""Base model resolution (real S3 on loopback, ETag-keyed cache) and the cheap model-directory check."""

from __future__ import annotations

import json
import shutil

import pytest

from job import model as model_mod
from job import storage
from job.errors import InputError, StorageError
from job.model import check_model_dir, choose_device, resolve_model


def upload_dir(s3, src, prefix: str) -> None:
    """Put every file of a local directory under an S3 prefix."""
    for path in sorted(src.iterdir()):
        s3.put(f"{prefix}/{path.name}", path.read_bytes())


@pytest.fixture
def download_calls(monkeypatch):
    """Records every object download (the real download still runs)."""
    calls = []
    real = storage.download

    def spy(uri, dest):
        calls.append(uri)
        return real(uri, dest)

    monkeypatch.setattr(model_mod.storage, "download", spy)
    return calls


def test_s3_model_is_pulled_once_and_served_from_the_etag_cache(s3, tiny_model, tmp_path, download_calls):
    upload_dir(s3, tiny_model, "models/tiny")
    cache = tmp_path / "cache"

    first = resolve_model(s3.uri("models/tiny/"), cache)
    names = sorted(p.name for p in tiny_model.iterdir())
    assert sorted(p.name for p in first.iterdir()) == names
    assert (first / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert len(download_calls) == len(names)
    check_model_dir(first)

    download_calls.clear()
    again = resolve_model(s3.uri("models/tiny"), cache)  # without the trailing slash: same prefix
    assert again == first
    assert download_calls == []

    # A rewritten object changes its ETag, so the next resolve pulls a fresh entry.
    config = json.loads((tiny_model / "config.json").read_text())
    config["_comment"] = "changed"
    s3.put("models/tiny/config.json", json.dumps(config))
    changed = resolve_model(s3.uri("models/tiny/"), cache)
    assert changed != first
    assert json.loads((changed / "config.json").read_text())["_comment"] == "changed"
    assert len(download_calls) == len(names)
    # No temporary download directories are left behind.
    assert sorted(p.name for p in (cache / "s3").iterdir()) == sorted([first.name, changed.name])


def test_empty_s3_prefix_is_a_storage_error_naming_it(s3, tmp_path):
    with pytest.raises(StorageError, match=rf"base_model s3://{s3.bucket}/nothing/: no objects under this prefix"):
        resolve_model(s3.uri("nothing/"), tmp_path)


def test_missing_bucket_is_a_storage_error(s3_env, tmp_path):
    with pytest.raises(StorageError, match="no-such-bucket-sftops"):
        resolve_model("s3://no-such-bucket-sftops/model/", tmp_path)


def test_local_path_and_file_uri_resolve_in_place(tiny_model, tmp_path):
    assert resolve_model(str(tiny_model), tmp_path) == tiny_model
    assert resolve_model(f"file://{tiny_model}", tmp_path) == tiny_model
    with pytest.raises(InputError, match="base_model /no/such/model: no such model directory"):
        resolve_model("/no/such/model", tmp_path)


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """A writable copy of the tiny model directory."""
    return shutil.copytree(tiny_model, tmp_path / "model")


def test_check_model_dir_accepts_a_causal_lm(model_copy):
    check_model_dir(model_copy)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json not found"),
        (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], "no tokenizer files"),
        (lambda d: (d / "model.safetensors").unlink(), r"no weights \(\*.safetensors or \*.bin\)"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({"architectures": ["BertForSequenceClassification"], "model_type": "bert"})
            ),
            "BertForSequenceClassification is not a causal language model",
        ),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"model_type": "t5"})),
            "model_type 't5' is not a causal language model",
        ),
    ],
    ids=["no-config", "no-tokenizer", "no-weights", "bad-json", "classifier", "encoder-type"],
)
def test_check_model_dir_rejects_what_cannot_be_fine_tuned(model_copy, break_it, message):
    break_it(model_copy)
    with pytest.raises(InputError, match=rf"^base_model s3://b/m/: .*{message}"):
        check_model_dir(model_copy, uri="s3://b/m/")


def test_model_type_alone_is_enough_for_a_known_causal_lm(model_copy):
    (model_copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    check_model_dir(model_copy)


def test_cpu_trains_in_float32_and_refuses_fp16(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (choose_device("auto").device, choose_device("auto").dtype) == ("cpu", "float32")
    assert choose_device("bf16").dtype == "bfloat16"
    with pytest.raises(InputError, match="training.precision: fp16 needs a CUDA GPU"):
        choose_device("fp16")
