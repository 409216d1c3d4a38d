"""Verification: greedy generation on the verification split, base model against tuned, and its scores.

The scoring half (prompt/reference extraction, normalisation, exact match, token-F1) is pure Python;
torch is imported only inside `generate` and `run_verification`.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from job.errors import InputError

log = logging.getLogger(__name__)


def split_row(messages: list[dict[str, str]], where: str = "row") -> tuple[list[dict[str, str]], str]:
    """Turns before the last assistant turn (the prompt) and that turn's text (the reference); raises InputError."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            if i == 0:
                raise InputError(f"{where}: the assistant turn has no prompt before it")
            return messages[:i], messages[i].get("content", "")
    raise InputError(f"{where}: no assistant turn to verify against (each row needs one)")


def normalize_tokens(text: str) -> list[str]:
    """Lowercase, drop punctuation (any Unicode P* character), split on whitespace."""
    kept = (" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return "".join(kept).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference are equal after stripping surrounding whitespace, else 0.0."""
    return 1.0 if prediction.strip() == reference.strip() else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised whitespace tokens (bag of words); both empty counts as a perfect match."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not pred or not ref:
        return 1.0 if pred == ref else 0.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: Iterable[dict[str, str]]) -> dict[str, Any]:
    """Mean exact match and token-F1 of base and tuned outputs over prediction rows {reference, base, tuned}."""
    rows = list(predictions)
    result: dict[str, Any] = {"rows": len(rows)}
    for which in ("base", "tuned"):
        if not rows:
            result[which] = {"exact_match": None, "token_f1": None}
            continue
        result[which] = {
            "exact_match": sum(exact_match(r[which], r["reference"]) for r in rows) / len(rows),
            "token_f1": sum(token_f1(r[which], r["reference"]) for r in rows) / len(rows),
        }
    return result


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The verification split's rows as (prompt messages, reference); raises InputError naming file and line."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{path}:{n}: not a {{\"messages\": [...]}} row ({e})") from None
            prompt, reference = split_row(messages, f"{path}:{n}")
            rows.append({"messages": prompt, "reference": reference})
    return rows


def generate(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of already-templated prompts, batched with left padding, in the prompts' order."""
    import torch

    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models must see the prompt end right before new tokens
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop_ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        stop_ids.add(im_end)
    stop_ids.discard(None)
    # Sorting by length keeps padding (wasted compute) small; outputs are put back in order below.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(stop_ids),
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side  # the exported tokenizer keeps its own setting
    return outputs


def run_verification(
    model: Any, tokenizer: Any, split_path: Path, out_path: Path, *, max_new_tokens: int, batch_size: int
) -> dict[str, Any]:
    """Generate with the tuned model and (adapter disabled) the base model; write predictions.jsonl; return scores."""
    rows = load_rows(split_path)
    prompts = [
        tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows
    ]
    log.info("verification: %d rows, max_new_tokens=%d, batch_size=%d", len(rows), max_new_tokens, batch_size)
    tuned = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    with model.disable_adapter():  # the same weights without LoRA are the base model
        base = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    predictions = [
        {"prompt": p, "reference": r["reference"], "base": b, "tuned": t}
        for p, r, b, t in zip(prompts, rows, base, tuned)
    ]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    scores = score(predictions)
    log.info(
        "verification: exact match base %.3f -> tuned %.3f, token-F1 base %.3f -> tuned %.3f",
        scores["base"]["exact_match"] or 0.0,
        scores["tuned"]["exact_match"] or 0.0,
        scores["base"]["token_f1"] or 0.0,
        scores["tuned"]["token_f1"] or 0.0,
    )
    return scores
