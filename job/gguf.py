"""`python -m job import-gguf SRC.gguf DEST`: dequantize a GGUF model into a trainable Hugging Face model directory.

LoRA training needs ordinary float weights, so the GGUF tensors are dequantized to float32 and saved as
safetensors together with the tokenizer (chat template included) and the generation config. The directory
appears under DEST only when complete: it is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from job.errors import InputError

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the import-gguf command line."""
    parser = argparse.ArgumentParser(
        prog="python -m job import-gguf", description="Dequantize a GGUF model into a Hugging Face model directory."
    )
    parser.add_argument("src", type=Path, help="the .gguf file")
    parser.add_argument("dest", type=Path, help="model directory to create")
    parser.add_argument("--force", action="store_true", help="replace DEST if it already exists")
    return parser.parse_args(argv)


def import_gguf(src: Path, dest: Path, *, force: bool = False) -> Path:
    """Dequantize SRC into a float32 model directory at DEST; raises InputError for a missing/unreadable file or an existing DEST."""
    if not src.is_file():
        raise InputError(f"{src}: GGUF file not found")
    if dest.exists() and not force:
        raise InputError(f"{dest}: already exists (pass --force to replace it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("reading %s", src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{src}: not a GGUF model transformers can read: {e}") from e
    # The weights are dequantized now; a kept quantization_config would make loaders look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = dest.name
    model.hf_quantizer = None
    model.is_quantized = False
    # GGUF metadata carries no usable limit; without one, truncation warnings and defaults are meaningless.
    tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _make_readable(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %d parameters)", dest, type(model).__name__, model.num_parameters())
    return dest


def _make_readable(root: Path) -> None:
    """mkdtemp and some writers create owner-only modes; give the tree the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def main(argv: list[str]) -> int:
    """Entry for `python -m job import-gguf`."""
    args = parse_args(argv)
    import_gguf(args.src, args.dest, force=args.force)
    return 0
