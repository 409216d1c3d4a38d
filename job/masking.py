"""Assistant-only loss labels for chat templates without `{% generation %}` markers (ChatML and the like).

trl's `assistant_only_loss` needs templates that mark assistant text with `{% generation %}`; most model
templates (SmolLM2's included) do not. Instead we find each assistant turn by rendering the conversation's
prefixes: the text added between `render(messages[:i], add_generation_prompt=True)` and
`render(messages[:i+1])` is turn i's reply. Its content plus the end-of-turn token (so the model learns to
stop) is trainable; everything else gets label -100. Tokens are mapped to characters with the fast
tokenizer's offsets, so the ids are exactly those of the whole rendered conversation.

Pure: takes a tokenizer and messages, no torch, no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from job.errors import InputError

IGNORE = -100
DROP_NO_ASSISTANT = "no_assistant_turn"
DROP_TRUNCATED = "assistant_truncated_away"


@dataclass
class MaskedDataset:
    """Tokenized rows ready for SFTTrainer plus what was dropped and how much is trainable."""

    rows: list[dict[str, list[int]]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    trainable_tokens: int = 0
    truncated_rows: int = 0


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool = False) -> str:
    """The chat template's text for these messages."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _end_marker(tokenizer: Any) -> str | None:
    """The end-of-turn text the model must learn to emit (`<|im_end|>` for ChatML): the tokenizer's eos token."""
    return tokenizer.eos_token or None


def assistant_spans(tokenizer: Any, messages: list[dict], where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return (text, [(start, end) character spans of trainable assistant text]).

    Each span covers the reply's content and the end-of-turn marker that follows it (not the newline after).
    Raises InputError when the template cannot be walked turn by turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("base_model: the tokenizer has no chat template, so assistant replies cannot be located")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tokenizer, messages)
    marker = _end_marker(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise InputError(
                f"{where}: the chat template renders earlier turns differently once later turns are added, "
                "so assistant replies cannot be located for assistant-only loss (use a model whose template is prefix-stable)"
            )
        segment = through[len(before) :]
        content = message["content"]
        at = segment.find(content)
        if at < 0:
            content = content.strip()
            at = segment.find(content)
        if at < 0 or not content:
            raise InputError(f"{where}: turn {i + 1}: the chat template does not render the assistant reply verbatim")
        end = at + len(content)
        if marker:
            m = segment.find(marker, end)
            # Only the marker right after the reply (whitespace aside) ends this turn.
            if m >= 0 and not segment[end:m].strip():
                end = m + len(marker)
        spans.append((len(before) + at, len(before) + end))
    return text, spans


def mask_conversation(tokenizer: Any, messages: list[dict], where: str = "conversation") -> dict[str, list[int]]:
    """Token ids of the rendered conversation and labels (-100 outside assistant replies), not truncated."""
    text, spans = assistant_spans(tokenizer, messages, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(input_ids)
    span_index = 0
    for t, (start, _end) in enumerate(encoded["offset_mapping"]):
        # A token belongs to the span its first character is in; spans are sorted and disjoint.
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[t] = input_ids[t]
    return {"input_ids": input_ids, "labels": labels}


def mask_dataset(
    tokenizer: Any, conversations: Iterable[list[dict]], max_length: int, source: str = "dataset"
) -> MaskedDataset:
    """Mask and truncate every conversation; rows left without a trainable token are dropped and counted by reason.

    Raises InputError if the tokenizer cannot give offsets, or if masking would silently be off: every token
    trainable, or no assistant token found in any row.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("base_model: assistant-only loss needs a fast tokenizer (tokenizer.json) for token offsets")
    out = MaskedDataset()
    dropped: Counter[str] = Counter()
    rows_seen = 0
    for n, messages in enumerate(conversations, start=1):
        rows_seen += 1
        where = f"{source}: row {n}"
        if not any(m.get("role") == "assistant" for m in messages):
            dropped[DROP_NO_ASSISTANT] += 1
            continue
        row = mask_conversation(tokenizer, messages, where)
        if len(row["input_ids"]) > max_length:
            out.truncated_rows += 1
            row = {k: v[:max_length] for k, v in row.items()}
        trainable = sum(1 for x in row["labels"] if x != IGNORE)
        if trainable == 0:
            dropped[DROP_TRUNCATED] += 1
            continue
        out.rows.append(row)
        out.tokens += len(row["input_ids"])
        out.trainable_tokens += trainable
    out.dropped = dict(dropped)
    if rows_seen and not out.rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(out.dropped.items()))
        raise InputError(
            f"{source}: no row has a trainable assistant token after masking and truncation ({reasons}); "
            "raise training.max_length or shorten the prompts"
        )
    if out.rows and out.trainable_tokens == out.tokens:
        raise InputError(
            f"{source}: assistant-only masking is off: every token of every row is trainable, so prompts would be "
            "trained on; the chat template must render user and system turns around the replies"
        )
    return out
