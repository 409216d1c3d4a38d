"""Assistant-only labels with SmolLM2's real ChatML tokenizer: exactly the replies and their end markers train."""

from __future__ import annotations

import pytest

from job.errors import InputError
from job.masking import DROP_NO_ASSISTANT, DROP_TRUNCATED, IGNORE, mask_conversation, mask_dataset

THREE_TURNS = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Grass is green."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    """SmolLM2's tokenizer with its ChatML template (no generation markers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    assert "{% generation %}" not in tok.chat_template
    return tok


def trainable_runs(labels: list[int]) -> list[list[int]]:
    """Consecutive runs of trainable label ids."""
    runs, current = [], []
    for x in labels:
        if x == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(x)
    return runs + ([current] if current else [])


def test_three_turn_conversation_trains_only_replies_and_end_markers(tokenizer):
    row = mask_conversation(tokenizer, THREE_TURNS)
    ids, labels = row["input_ids"], row["labels"]

    # The ids are the template's own tokenization of the whole conversation.
    assert ids == tokenizer.apply_chat_template(THREE_TURNS, tokenize=True, return_dict=True)["input_ids"]
    assert len(labels) == len(ids)
    # Every label is either ignored or equal to its input id (no shift, no foreign ids).
    assert all(lab in (IGNORE, tid) for lab, tid in zip(labels, ids, strict=True))

    runs = trainable_runs(labels)
    assert [tokenizer.decode(r) for r in runs] == ["The sky is blue.<|im_end|>", "Grass is green.<|im_end|>"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [r[-1] for r in runs] == [im_end, im_end]
    # Token by token: each run is exactly the reply's tokens followed by <|im_end|>.
    for run, reply in zip(runs, ["The sky is blue.", "Grass is green."], strict=True):
        assert run == tokenizer(reply, add_special_tokens=False)["input_ids"] + [im_end]

    # Nothing from the system or user turns, nor the role headers or the newline after <|im_end|>, trains.
    masked_text = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    assert masked_text == (
        "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nAnd grass?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_default_system_prompt_is_masked_when_the_row_has_none(tokenizer):
    row = mask_conversation(tokenizer, THREE_TURNS[1:3])
    runs = trainable_runs(row["labels"])
    assert [tokenizer.decode(r) for r in runs] == ["The sky is blue.<|im_end|>"]
    assert "SmolLM" in tokenizer.decode(row["input_ids"])  # the template added its default system turn


def test_truncation_drops_rows_left_without_reply_tokens_and_counts_them(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Short reply."}]
    short = THREE_TURNS[1:3]
    no_reply = [{"role": "user", "content": "hello"}]
    result = mask_dataset(tokenizer, [short, long_prompt, short, no_reply, long_prompt], max_length=64)

    assert result.dropped == {DROP_TRUNCATED: 2, DROP_NO_ASSISTANT: 1}
    assert len(result.rows) == 2
    assert result.truncated_rows == 2
    assert all(len(r["input_ids"]) <= 64 for r in result.rows)
    assert result.tokens == sum(len(r["input_ids"]) for r in result.rows)
    assert result.trainable_tokens == 2 * len(trainable_runs(result.rows[0]["labels"])[0])


def test_truncation_keeps_the_start_of_a_reply_that_still_fits(tokenizer):
    full = mask_conversation(tokenizer, THREE_TURNS)
    first_reply_end = full["labels"].index(tokenizer.convert_tokens_to_ids("<|im_end|>"), 30)
    cut = first_reply_end - 2  # mid-way through the first reply
    result = mask_dataset(tokenizer, [THREE_TURNS], max_length=cut)
    assert result.dropped == {}
    assert result.rows[0]["input_ids"] == full["input_ids"][:cut]
    assert result.rows[0]["labels"] == full["labels"][:cut]


def test_all_rows_truncated_away_is_an_input_error_naming_the_fix(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(InputError, match=r"train: no row has a trainable assistant token.*assistant_truncated_away: 2.*max_length"):
        mask_dataset(tokenizer, [long_prompt, long_prompt], max_length=32, source="train")


def test_masking_silently_off_is_an_input_error(tokenizer):
    # A template that renders only the replies: every token would be trainable, i.e. masking does nothing.
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    with pytest.raises(InputError, match="assistant-only masking is off: every token"):
        mask_dataset(tok, [THREE_TURNS, THREE_TURNS[1:3]], max_length=256, source="train")


def test_template_that_drops_replies_is_an_input_error(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(InputError, match="train: row 1: turn 3: the chat template does not render the assistant reply"):
        mask_dataset(tok, [THREE_TURNS], max_length=256, source="train")


def test_no_chat_template_is_an_input_error(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        mask_dataset(tok, [THREE_TURNS], max_length=256)
