"""The seams of EchoLM: every adapter implements one of these, every caller depends only on them.

Stages in ``streams/`` and the CLI receive these objects; they never import a concrete model
server, vector library or database driver. ``echolm.testing`` ships in-memory doubles of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

import numpy as np

from echolm.domain import (
    ChatMessage,
    Example,
    GenerationParams,
    GenerationResult,
    RetrievedExample,
    RouteContext,
    RouteDecision,
)


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors, so inner product = cosine similarity."""

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (len(texts), dimension). Blocking and CPU-bound: async callers use a thread."""
        ...


@runtime_checkable
class VectorIndex(Protocol):
    """Inner-product nearest-neighbour search over one tenant's examples, keyed by example id."""

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (n, k); missing neighbours have id -1."""
        ...

    def __len__(self) -> int: ...


@runtime_checkable
class Generator(Protocol):
    """One model tier's generation backend (llama.cpp in-process, an OpenAI-compatible server, vLLM)."""

    @property
    def model_name(self) -> str: ...

    async def generate(
        self, messages: Sequence[ChatMessage], params: GenerationParams, *, request_id: str
    ) -> GenerationResult:
        """Raises ``EchoLMError`` (timeout, prompt too long, backend failure); never hangs past its timeout."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RoutingContext:
    request_id: str
    tenant: str
    prompt_chars: int
    examples: Sequence[RetrievedExample]
    embedding: np.ndarray | None = None
    load: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Router(Protocol):
    def route(self, context: RoutingContext) -> RouteDecision: ...


@dataclass(frozen=True, slots=True)
class ExampleCandidate:
    """A finished request offered to the cache. Admission hooks may rewrite or reject it."""

    tenant: str
    source_request_id: str
    prompt: str
    response: str
    model: str
    tier: str
    embedding: np.ndarray
    quality: float | None = None


@runtime_checkable
class AdmissionHook(Protocol):
    """Called before an example enters the cache: return it (possibly scrubbed), or None to reject.

    This is the place for PII scrubbing and per-tenant content rules.
    """

    def __call__(self, candidate: ExampleCandidate) -> ExampleCandidate | None: ...


@dataclass(frozen=True, slots=True)
class ResponseLog:
    """Everything later stages (routing, replay, evaluation) need to know about one finished request."""

    request_id: str
    tenant: str
    custom_id: str | None
    messages: Sequence[ChatMessage]
    prompt_text: str
    response: str | None
    tier: str | None
    model: str | None
    example_ids: Sequence[int]
    example_similarities: Sequence[float]
    route_reason: str | None
    route_score: float | None
    timings: dict[str, float]
    prompt_tokens: int | None
    completion_tokens: int | None
    error_code: str | None
    error_message: str | None
    submitted_at: datetime
    finished_at: datetime
    route_context: RouteContext | None = None
    cached_prompt_tokens: int | None = None  # of prompt_tokens, taken from the tier's prefix cache


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """One change of the example cache, in commit order: retrievers replay these to stay current."""

    seq: int
    op: str  # "add" or "remove"
    example: Example
    embedding: np.ndarray | None


@runtime_checkable
class HistoryStore(Protocol):
    """The source of truth: response history and the example cache (PostgreSQL, or SQLite embedded)."""

    async def record_responses(self, logs: Sequence[ResponseLog]) -> None:
        """Idempotent upsert keyed by request id."""
        ...

    async def admit_examples(self, candidates: Sequence[ExampleCandidate]) -> list[int]:
        """Insert examples (idempotent per tenant + source request) and their 'add' cache events."""
        ...

    async def cache_events_since(self, seq: int, limit: int = 10_000) -> list[CacheEvent]: ...

    async def examples_by_id(self, ids: Sequence[int]) -> list[Example]: ...

    async def logged_request_ids(self, request_ids: Sequence[str]) -> set[str]: ...

    async def aclose(self) -> None: ...
