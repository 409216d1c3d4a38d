"""LoRA SFT with trl's SFTTrainer and peft, assistant-only loss, checkpoints mirrored to storage.

Contract with the pipeline (`job.run`):

    train(spec, splits_dir, model_dir, work_dir, *, checkpoint_uri, on_log=None, on_start=None) -> TrainResult

- trains on `splits_dir/train.jsonl` and computes eval loss on `splits_dir/test.jsonl` (one `{"messages": [...]}`
  per line) every `training.eval_every` steps and at the end;
- loss only on assistant replies (job.masking), rows left without a trainable token are dropped and counted
  (`TrainResult.rows_dropped`, reason -> count over both splits);
- every `training.logging_every` steps (and at the end) appends a record to `work_dir/metrics.jsonl` and calls
  `on_log(record)`; records are `{step, epoch, train_loss, eval_loss, learning_rate, grad_norm, tokens_per_second,
  time}` (eval records carry eval_loss and null train fields; NaN/inf are kept as JSON NaN/Infinity);
- checkpoints every `training.checkpoint_every` steps (and at the end) to `checkpoint_uri/step-N/` with a
  COMPLETE marker written last, uploaded in the background; on start it resumes from the newest complete
  checkpoint there, so the step count ends where an uninterrupted run would (metrics.jsonl gets the records
  saved with that checkpoint; on_log only sees new ones); the newest 2 complete checkpoints are kept;
  `checkpoint_uri=None` disables both;
- raises InputError (masking would be off, no trainable tokens, bad options), NonFiniteLossError
  (`code = "non_finite_loss"`, with `.step`) on a NaN/inf loss, StorageError when a checkpoint cannot be uploaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from job import checkpoints
from job.errors import InputError, JobError
from job.masking import IGNORE, MaskedDataset, mask_dataset
from job.model import choose_device
from job.spec import JobSpec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(JobError):
    """The training or eval loss became NaN or infinite; the run stops at that step."""

    code = "non_finite_loss"

    def __init__(self, step: int, which: str, value: float):
        """Name the step, the loss and how to fix it."""
        self.step, self.which, self.value = step, which, value
        super().__init__(
            f"{which} loss became {value} at step {step}: training diverged; lower training.learning_rate, "
            "check the base model's weights, or use precision fp32"
        )


@dataclass
class TrainResult:
    """What the pipeline needs after training."""

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    global_step: int
    total_steps: int
    resumed_from_step: int | None
    device: str
    dtype: str
    trainable_params: int
    total_params: int
    rows_dropped: dict[str, int] = field(default_factory=dict)
    metrics_path: Path | None = None
    train_runtime_s: float = 0.0


def read_conversations(path: Path) -> list[list[dict]]:
    """The `messages` of every row of a split file; raises InputError naming the file and line."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: split file not found (run the prepare stage first)") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = row["messages"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{n}: not a {{\"messages\": [...]}} row ({e})") from None
        rows.append(messages)
    return rows


def _finite(value: Any) -> float | None:
    """A float, or None when absent."""
    return None if value is None else float(value)


class MetricsLog(TrainerCallback):
    """Turns trainer logs into metrics.jsonl records and on_log calls; stops the run on a non-finite loss."""

    def __init__(self, path: Path, on_log: Callable[[dict], None] | None, on_start: Callable[[int], None] | None = None):
        """Append to `path`; `on_log` gets every record, `on_start` the total step count when training begins."""
        self.path = path
        self.on_log_fn = on_log
        self.on_start_fn = on_start
        self.failure: NonFiniteLossError | None = None
        self._last_time = time.time()
        self._last_tokens = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the tokens/s clock and announce the total step count (the plane's progress and ETA need it)."""
        self._last_time, self._last_tokens = time.time(), 0.0
        if self.on_start_fn is not None:
            try:
                self.on_start_fn(int(state.max_steps))
            except Exception:  # reporting must never stop training; logged, not swallowed
                log.warning("on_start failed; training goes on", exc_info=True)

    def on_save(self, args, state, control, **kwargs):
        """Checkpoint time is not training throughput either."""
        self._last_time = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        """Log the last step too, whatever the interval (trl's default flow already evaluates and saves there)."""
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Write one record per train or eval log; raise NonFiniteLossError after recording a NaN/inf loss."""
        logs = logs or {}
        now = time.time()
        if "loss" in logs:
            tokens = logs.get("num_tokens")
            rate = None
            if tokens is not None and tokens >= self._last_tokens and now > self._last_time:
                rate = (tokens - self._last_tokens) / (now - self._last_time)
            if tokens is not None:
                self._last_tokens, self._last_time = float(tokens), now
            record = {
                "step": state.global_step,
                "epoch": _finite(state.epoch),
                "train_loss": float(logs["loss"]),
                "eval_loss": None,
                "learning_rate": _finite(logs.get("learning_rate")),
                "grad_norm": _finite(logs.get("grad_norm")),
                "tokens_per_second": rate,
                "time": now,
            }
        elif "eval_loss" in logs:
            self._last_time = now  # evaluation time is not training throughput
            record = {
                "step": state.global_step,
                "epoch": _finite(state.epoch),
                "train_loss": None,
                "eval_loss": float(logs["eval_loss"]),
                "learning_rate": None,
                "grad_norm": None,
                "tokens_per_second": None,
                "time": now,
            }
        else:
            return  # the end-of-training summary and similar: not a point on the curve
        self.write(record)
        for which in ("train_loss", "eval_loss"):
            value = record[which]
            if value is not None and not math.isfinite(value):
                self.failure = NonFiniteLossError(state.global_step, which.split("_")[0], value)
                control.should_training_stop = True
                control.should_save = False  # never checkpoint diverged weights
                control.should_evaluate = False
                raise self.failure

    def write(self, record: dict) -> None:
        """Append a record to metrics.jsonl and hand it to on_log (whose errors are logged, never fatal)."""
        log.info(
            "step %d: %s", record["step"],
            ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "time") and v is not None),
        )
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.on_log_fn is not None:
            try:
                self.on_log_fn(record)
            except Exception:
                log.warning("on_log failed for step %s; training goes on", record["step"], exc_info=True)


class CheckpointUpload(TrainerCallback):
    """After each local save, mirror the checkpoint (and the metrics so far) to storage in the background."""

    def __init__(self, sync: checkpoints.CheckpointSync, output_dir: Path, metrics_path: Path):
        """Upload checkpoints the trainer writes under `output_dir`."""
        self.sync = sync
        self.output_dir = output_dir
        self.metrics_path = metrics_path

    def on_save(self, args, state, control, **kwargs):
        """Queue the upload of the checkpoint just written."""
        local = self.output_dir / f"checkpoint-{state.global_step}"
        self.sync.submit(state.global_step, local, {METRICS_FILE: self.metrics_path})

    def on_step_end(self, args, state, control, **kwargs):
        """Surface a failed upload at the next step instead of at the end."""
        error = self.sync.failed()
        if error is not None:
            raise error


def _masked_splits(tokenizer: Any, splits_dir: Path, max_length: int) -> tuple[MaskedDataset, MaskedDataset | None]:
    """Tokenize and mask the train and test splits."""
    train_rows = read_conversations(splits_dir / "train.jsonl")
    if not train_rows:
        raise InputError(f"{splits_dir / 'train.jsonl'}: the train split is empty")
    train = mask_dataset(tokenizer, train_rows, max_length, source="train.jsonl")
    test_path = splits_dir / "test.jsonl"
    test_rows = read_conversations(test_path) if test_path.exists() else []
    test = mask_dataset(tokenizer, test_rows, max_length, source="test.jsonl") if test_rows else None
    return train, test


def _sft_config(spec: JobSpec, output_dir: Path, device: str, dtype: str, with_eval: bool, save: bool):
    """trl's SFTConfig from the spec's training section."""
    from trl import SFTConfig

    t = spec.training
    # transformers 5 renamed gradient_checkpointing (trl defaults it to True, so it must be set either way).
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        max_length=t.max_length,
        packing=t.packing,
        packing_strategy="bfd",  # padding-free: rows keep their boundaries inside a packed sequence
        **{checkpointing: t.gradient_checkpointing},
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_every,
        logging_first_step=False,
        logging_nan_inf_filter=False,  # a NaN must reach our callback, not be averaged away
        eval_strategy="steps" if with_eval else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if save else "no",
        save_steps=t.checkpoint_every,
        save_total_limit=1,  # older local copies are already snapshotted for upload
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=True,
    )


def _restore_metrics(checkpoint_dir: Path, metrics_path: Path, step: int) -> None:
    """Carry the metrics logged before the checkpoint over into this run's metrics.jsonl."""
    saved = checkpoint_dir / METRICS_FILE
    lines = saved.read_text(encoding="utf-8").splitlines() if saved.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    saved.unlink(missing_ok=True)


def _check_labels_kept(dataset: Any, rows: list[dict[str, list[int]]], packing: bool, sample: int = 64) -> None:
    """Guard against trl re-tokenizing or dropping our labels (its API has changed before); checks a sample."""
    k = min(sample, len(dataset))
    labels = dataset.select(range(k))["labels"]
    if packing:
        # Packed rows are reordered; each must still mix masked prompt tokens and trainable reply tokens.
        kept = all(IGNORE in row and any(x != IGNORE for x in row) for row in labels)
    else:
        kept = labels == [r["labels"] for r in rows[:k]]
    if not kept:
        raise JobError(
            "internal: SFTTrainer changed the assistant-only labels of the prepared rows; this trl version is not supported"
        )


def train(
    spec: JobSpec,
    splits_dir: Path,
    model_dir: Path,
    work_dir: Path,
    *,
    checkpoint_uri: str | None,
    on_log: Callable[[dict], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> TrainResult:
    """LoRA SFT of the model in `model_dir` on the splits; see the module docstring for the contract and errors."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, set_seed
    from trl import SFTTrainer

    splits_dir, model_dir, work_dir = Path(splits_dir), Path(model_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    t = spec.training
    choice = choose_device(t.precision)
    set_seed(t.seed)
    # Cheap and the likeliest to fail (bucket, credentials): before loading anything heavy.
    resumed_from = checkpoints.latest_complete(checkpoint_uri) if checkpoint_uri else None

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set, test_set = _masked_splits(tokenizer, splits_dir, t.max_length)
    dropped = Counter(train_set.dropped)
    if test_set is not None:
        dropped.update(test_set.dropped)
    for name, masked in (("train", train_set), ("test", test_set)):
        if masked is not None:
            log.info(
                "%s: %d rows, %d tokens, %d trainable (%.1f%%), %d truncated, dropped %s",
                name, len(masked.rows), masked.tokens, masked.trainable_tokens,
                100 * masked.trainable_tokens / max(masked.tokens, 1), masked.truncated_rows, masked.dropped or "none",
            )

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, choice.dtype))
    peft_config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    output_dir = work_dir / "trainer"
    metrics_path = work_dir / METRICS_FILE
    sync = checkpoints.CheckpointSync(checkpoint_uri, work_dir / "upload") if checkpoint_uri else None

    resume_dir = None
    if resumed_from is not None:
        resume_dir = checkpoints.download(checkpoint_uri, resumed_from, work_dir / "resume" / f"checkpoint-{resumed_from}")
        _restore_metrics(resume_dir, metrics_path, resumed_from)
        log.info("resuming from checkpoint step %d (%s)", resumed_from, checkpoints.step_uri(checkpoint_uri, resumed_from))
    else:
        metrics_path.write_text("", encoding="utf-8")
    if output_dir.exists():
        shutil.rmtree(output_dir)  # stale local checkpoints of an earlier attempt must not be rotated or mixed in

    metrics_cb = MetricsLog(metrics_path, on_log, on_start)
    callbacks: list[TrainerCallback] = [metrics_cb]
    if sync is not None:
        callbacks.append(CheckpointUpload(sync, output_dir, metrics_path))
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(spec, output_dir, choice.device, choice.dtype, test_set is not None, sync is not None),
        train_dataset=Dataset.from_list(train_set.rows),
        eval_dataset=Dataset.from_list(test_set.rows) if test_set is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # MetricsLog logs one compact line per record instead
    _check_labels_kept(trainer.train_dataset, train_set.rows, t.packing)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("trainable params: %d of %d (%.3f%%)", trainable, total, 100 * trainable / total)

    started = time.monotonic()
    try:
        if resume_dir is not None and _finished(resume_dir):
            # The Trainer would take one extra step when resumed at its last step; just restore the adapter.
            _restore_finished(trainer, resume_dir)
        else:
            trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
        if sync is not None:
            sync.close()  # wait for the outstanding uploads; re-raises an upload failure
    except BaseException:
        if sync is not None:
            _close_quietly(sync)
        raise
    runtime = time.monotonic() - started
    state = trainer.state
    log.info("trained to step %d of %d in %.1f s", state.global_step, state.max_steps, runtime)
    return TrainResult(
        model=trainer.model,
        tokenizer=tokenizer,
        global_step=state.global_step,
        total_steps=state.max_steps,
        resumed_from_step=resumed_from,
        device=choice.device,
        dtype=choice.dtype,
        trainable_params=trainable,
        total_params=total,
        rows_dropped=dict(dropped),
        metrics_path=metrics_path,
        train_runtime_s=runtime,
    )


def _finished(checkpoint_dir: Path) -> bool:
    """True if the checkpoint was taken at the last step of its run."""
    state = json.loads((checkpoint_dir / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def _restore_finished(trainer: Any, checkpoint_dir: Path) -> None:
    """Load a finished run's adapter weights and trainer state without training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights = load_file(checkpoint_dir / "adapter_model.safetensors")
    result = set_peft_model_state_dict(trainer.model, weights)
    if getattr(result, "unexpected_keys", None):
        raise JobError(f"{checkpoint_dir}: checkpoint adapter does not match the model ({result.unexpected_keys[:3]} ...)")
    trainer.state = TrainerState.load_from_json(str(checkpoint_dir / "trainer_state.json"))
    log.info("checkpoint at step %d is the run's last step: nothing left to train", trainer.state.global_step)


def _close_quietly(sync: checkpoints.CheckpointSync) -> None:
    """Stop the uploader while another error is already propagating; its own failure is logged, not raised."""
    try:
        sync.close()
    except Exception:
        log.warning("checkpoint upload also failed while training was stopping", exc_info=True)
