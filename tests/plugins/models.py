"""Model fixtures: the real SmolLM2 directory made by `make model`, and a tiny random Llama that trains in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SMOLLM_NAME = "SmolLM2-135M-Instruct"


def model_cache() -> Path:
    """Where `make model` puts imported models (SFTOPS_MODEL_CACHE, else the repo's .cache)."""
    default = Path(__file__).resolve().parents[2] / ".cache"
    return Path(os.environ.get("SFTOPS_MODEL_CACHE") or default)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The real SmolLM2-135M-Instruct model directory (float32 safetensors, ChatML tokenizer)."""
    path = model_cache() / "models" / SMOLLM_NAME
    if not (path / "config.json").is_file():
        pytest.fail(f"{path} is missing: run `make model` to import SmolLM2 from its GGUF file")
    return path


@pytest.fixture(scope="session")
def tiny_model(smollm_dir, tmp_path_factory) -> Path:
    """A tiny random-weight LlamaForCausalLM (hidden 64, 2 layers) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
