"""Export: adapter and merged weights load back and agree; manifest.json lists every file and is written last."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from job import export, storage
from job.errors import InputError, StorageError
from job.spec import ExportSpec


def lora_model(model_dir: Path):
    """A peft LoRA model over the tiny model with non-zero B matrices (a fresh adapter is a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model, AutoTokenizer.from_pretrained(model_dir)


def test_adapter_and_merged_load_back_with_same_logits(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = lora_model(tiny_model)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is two plus two?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        tuned_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)  # the adapter really changes the model

    written = export.save_model(model, tokenizer, tmp_path, ExportSpec(), tiny_model)
    assert set(written) == {"adapter", "merged"}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors"))
    assert not list((tmp_path / "merged").glob("*.bin"))

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float32  # the tiny base model's dtype
    with torch.no_grad():
        adapter_logits = reloaded(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(adapter_logits, tuned_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tok.chat_template == tokenizer.chat_template


def test_merged_dtype_follows_spec(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = lora_model(tiny_model)
    export.save_model(model, tokenizer, tmp_path, ExportSpec(adapter=False, dtype="bfloat16"), tiny_model)
    assert not (tmp_path / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert merged.dtype == torch.bfloat16


def test_base_dtype_reads_config(tmp_path):
    for config, expected in [({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"),
                             ({}, "float32"), ({"dtype": "int8"}, "float32")]:
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert export.base_dtype(tmp_path) == expected


def staged_output(root: Path) -> Path:
    """A small output staging directory like the job writes."""
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (root / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (root / "splits").mkdir()
    (root / "splits" / "train.jsonl").write_text('{"messages": []}\n')
    (root / "report.json").write_text('{"name": "x"}')
    (root / "spec.json").write_text('{"name": "x"}')
    return root


def test_publish_lists_every_file_with_sha256_and_writes_manifest_last(s3, tmp_path, monkeypatch):
    out = staged_output(tmp_path / "out")
    output = s3.uri("runs/one/")
    order: list[str] = []
    real_upload, real_write = storage.upload, storage.write_text
    monkeypatch.setattr(storage, "upload", lambda src, uri: (order.append(uri), real_upload(src, uri))[1])
    monkeypatch.setattr(storage, "write_text", lambda uri, text: (order.append(uri), real_write(uri, text))[1])

    artifacts = export.publish(out, output, overwrite=False, status="succeeded", device="cpu")

    assert order[-1] == s3.uri("runs/one/manifest.json")
    assert len(order) == 6
    manifest = json.loads(s3.get("runs/one/manifest.json"))
    assert manifest["status"] == "succeeded"
    assert manifest["device"] == "cpu"
    assert set(manifest["libraries"]) >= {"torch", "transformers", "peft", "trl"}
    assert manifest["libraries"]["torch"].startswith("2.")
    listed = {f["path"]: f for f in manifest["files"]}
    assert sorted(listed) == [k.removeprefix("runs/one/") for k in s3.keys("runs/one/") if not k.endswith("manifest.json")]
    for path, entry in listed.items():
        body = s3.get(f"runs/one/{path}")
        assert entry["size"] == len(body)
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()
    assert artifacts["manifest"] == s3.uri("runs/one/manifest.json")
    assert artifacts["adapter"] == s3.uri("runs/one/adapter/")
    assert artifacts["merged"] is None


def test_failed_upload_leaves_no_manifest(s3, tmp_path, monkeypatch):
    out = staged_output(tmp_path / "out")
    real_upload = storage.upload
    calls = []

    def flaky(src, uri):
        calls.append(uri)
        if len(calls) == 3:
            raise StorageError(f"{uri}: connection reset")
        real_upload(src, uri)

    monkeypatch.setattr(storage, "upload", flaky)
    with pytest.raises(StorageError):
        export.publish(out, s3.uri("runs/two/"), overwrite=False, status="succeeded")
    assert "runs/two/manifest.json" not in s3.keys("runs/two/")
    assert export.read_manifest(s3.uri("runs/two/")) is None


def test_complete_output_is_not_overwritten(s3, tmp_path):
    output = s3.uri("runs/done/")
    export.publish(staged_output(tmp_path / "a"), output, overwrite=False, status="succeeded")
    before = {k: s3.get(k) for k in s3.keys("runs/done/")}
    other = staged_output(tmp_path / "b")
    (other / "report.json").write_text('{"name": "second"}')
    with pytest.raises(InputError, match=r"already holds a completed job .*export.overwrite: true"):
        export.publish(other, output, overwrite=False, status="succeeded")
    assert {k: s3.get(k) for k in s3.keys("runs/done/")} == before


def test_overwrite_removes_old_manifest_first_and_stale_files(s3, tmp_path, monkeypatch):
    output = s3.uri("runs/again/")
    first = staged_output(tmp_path / "a")
    (first / "merged").mkdir()
    (first / "merged" / "model.safetensors").write_bytes(b"old")
    export.publish(first, output, overwrite=False, status="succeeded")

    second = staged_output(tmp_path / "b")
    (second / "report.json").write_text('{"name": "second"}')
    seen_manifest_during_upload = []
    real_upload = storage.upload

    def spy(src, uri):
        seen_manifest_during_upload.append("runs/again/manifest.json" in s3.keys("runs/again/"))
        real_upload(src, uri)

    monkeypatch.setattr(storage, "upload", spy)
    artifacts = export.publish(second, output, overwrite=True, status="succeeded")
    assert seen_manifest_during_upload and not any(seen_manifest_during_upload)
    assert "runs/again/merged/model.safetensors" not in s3.keys("runs/again/")  # stale merged weights gone
    assert artifacts["merged"] is None
    assert json.loads(s3.get("runs/again/report.json")) == {"name": "second"}
    manifest = export.read_manifest(output)
    assert {f["path"] for f in manifest["files"]} == {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "report.json", "spec.json",
        "splits/train.jsonl",
    }


def test_publish_to_local_directory(tmp_path):
    out = staged_output(tmp_path / "out")
    target = tmp_path / "result"
    export.publish(out, str(target), overwrite=False, status="succeeded")
    manifest = json.loads((target / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (target / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    with pytest.raises(InputError):
        export.publish(out, str(target), overwrite=False, status="succeeded")
    export.publish(out, str(target), overwrite=True, status="succeeded")
    assert (target / "manifest.json").is_file()
