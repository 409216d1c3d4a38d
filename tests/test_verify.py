"""Verification scoring (pure) and prompt/reference extraction."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from job.errors import InputError
from job.verify import exact_match, load_rows, normalize_tokens, run_verification, score, split_row, token_f1


def test_verify_module_does_not_import_torch():
    """Scoring must be usable where torch is not installed (the plane, CI tools)."""
    code = "import sys, job.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Hello, World!", ["hello", "world"]),
        ("  a\tb\nc  ", ["a", "b", "c"]),
        ("don't stop", ["don", "t", "stop"]),
        ("«Ça va?» — oui…", ["ça", "va", "oui"]),
        ("3.14 + 2", ["3", "14", "+", "2"]),  # '+' is a math symbol, not punctuation
        ("", []),
        ("!!! ...", []),
    ],
)
def test_normalize_tokens(text, tokens):
    assert normalize_tokens(text) == tokens


@pytest.mark.parametrize(
    ("pred", "ref", "em"),
    [
        ("Paris", "Paris", 1.0),
        ("  Paris\n", "Paris", 1.0),
        ("paris", "Paris", 0.0),  # exact match is case sensitive
        ("Paris.", "Paris", 0.0),
        ("", "", 1.0),
        ("", "x", 0.0),
    ],
)
def test_exact_match(pred, ref, em):
    assert exact_match(pred, ref) == em


@pytest.mark.parametrize(
    ("pred", "ref", "f1"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("The cat, sat!", "the cat sat", 1.0),
        ("cat sat the", "the cat sat", 1.0),  # bag of words
        ("the cat", "the cat sat", 0.8),  # p=1, r=2/3
        ("the cat sat on mat", "the cat sat", 0.75),  # p=3/5, r=1
        ("dog", "the cat sat", 0.0),
        ("the the the", "the cat", 0.4),  # overlap counts min(3,1)=1: p=1/3, r=1/2
        ("", "", 1.0),
        ("...", "", 1.0),
        ("", "answer", 0.0),
        ("answer", "", 0.0),
    ],
)
def test_token_f1(pred, ref, f1):
    assert token_f1(pred, ref) == pytest.approx(f1)


def test_score_means_per_model():
    rows = [
        {"reference": "a b", "base": "a", "tuned": "a b"},
        {"reference": "c", "base": "x", "tuned": "c"},
        {"reference": "d e", "base": "d e", "tuned": "e"},
        {"reference": "f", "base": "g", "tuned": "g"},
    ]
    result = score(rows)
    assert result["rows"] == 4
    assert result["base"]["exact_match"] == pytest.approx(1 / 4)
    assert result["tuned"]["exact_match"] == pytest.approx(2 / 4)
    assert result["base"]["token_f1"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)
    assert result["tuned"]["token_f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)


def test_score_empty_is_null_not_zero():
    assert score([]) == {
        "rows": 0,
        "base": {"exact_match": None, "token_f1": None},
        "tuned": {"exact_match": None, "token_f1": None},
    }


def test_split_row_takes_last_assistant_turn():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    prompt, reference = split_row(messages)
    assert prompt == messages[:4]
    assert reference == "a2"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "u"}], "no assistant turn"),
        ([{"role": "assistant", "content": "a"}], "no prompt before it"),
    ],
)
def test_split_row_rejects_rows_without_prompt_and_answer(messages, reason):
    with pytest.raises(InputError, match=f"verification.jsonl:7: .*{reason}"):
        split_row(messages, "verification.jsonl:7")


def test_load_rows_names_file_and_line(tmp_path):
    path = tmp_path / "verification.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    path.write_text(json.dumps(good) + "\n\n" + "{broken\n")
    with pytest.raises(InputError, match=r"verification.jsonl:3: not a"):
        load_rows(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_rows(path) == [{"messages": [{"role": "user", "content": "q"}], "reference": "r"}]


def test_run_verification_batched_left_padding_matches_one_by_one(tiny_model, tmp_path):
    """Batched greedy generation (left padding) gives what one-at-a-time generation gives, for base and tuned."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a strong adapter, so tuned and base outputs differ
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    questions = ["hi", "What is the capital of France? Answer in one word.", "2+2?", "Tell me a long story " * 5]
    split = tmp_path / "verification.jsonl"
    split.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"ref {i}"}]}) + "\n"
        for i, q in enumerate(questions)
    ))

    batched = run_verification(model, tokenizer, split, tmp_path / "b.jsonl", max_new_tokens=6, batch_size=4)
    single = run_verification(model, tokenizer, split, tmp_path / "s.jsonl", max_new_tokens=6, batch_size=1)

    rows_b = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    rows_s = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows_b == rows_s
    assert batched == single and batched["rows"] == 4
    assert [r["reference"] for r in rows_b] == ["ref 0", "ref 1", "ref 2", "ref 3"]  # input order kept
    assert rows_b[1]["prompt"].endswith("<|im_start|>assistant\n") and "capital of France" in rows_b[1]["prompt"]
    assert any(r["base"] != r["tuned"] for r in rows_b)
    assert all(r["tuned"] for r in rows_b)
    assert tokenizer.padding_side == "right"  # restored for the exported tokenizer
