"""What the vLLM test modules share: the skip without vLLM, and the engine's memory on CPU vs GPU."""

from __future__ import annotations

import importlib.util

import pytest

# CPU: a small fixed KV cache instead of vLLM's default of most of the machine's memory.
CPU_KV_CACHE_BYTES = 1 << 30


def skip_without_vllm() -> None:
    """Skips the calling test module, with the reason, where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: `make test-vllm` runs these tests on vLLM's CPU build "
                    "(or pip install 'echolm[gpu]' on a CUDA machine)", allow_module_level=True)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
