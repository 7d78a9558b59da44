"""Plain, typed domain values shared by every part of EchoLM. No I/O here."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


def request_text(messages: Sequence[ChatMessage]) -> str:
    """The text a request is embedded and stored by: its user turns, in order.

    System prompts are excluded on purpose: deployments share one system prompt across unrelated
    requests, and it would pull every request towards every other one.
    """
    user_turns = [m.content for m in messages if m.role == "user"]
    return "\n\n".join(user_turns) if user_turns else "\n\n".join(m.content for m in messages)


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_s: float


@dataclass(frozen=True, slots=True)
class Example:
    """A cached (request, response) pair answered by a strong model, one version of a cache entry."""

    id: int
    tenant: str
    prompt: str
    response: str
    model: str
    tier: str
    quality: float | None = None
    version: int = 1


@dataclass(frozen=True, slots=True)
class RetrievedExample:
    example: Example
    similarity: float
    helpfulness: float | None = None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """``compare_with``: a second tier to also answer the request, for a pairwise comparison
    (selective feedback); its answer goes to the judge, never to the requester."""

    tier: str
    score: float
    reason: str
    use_examples: bool
    scores: dict[str, float] = field(default_factory=dict)
    compare_with: str | None = None


class ErrorCode(str, enum.Enum):
    """Why a request ended without a model answer. Stable strings: they are part of the output format."""

    INVALID_REQUEST = "invalid_request"
    PROMPT_TOO_LONG = "prompt_too_long"
    GENERATION_TIMEOUT = "generation_timeout"
    GENERATION_FAILED = "generation_failed"
    STAGE_FAILED = "stage_failed"
    INTERNAL = "internal_error"


class EchoLMError(Exception):
    """An error that ends one request with an explicit, user-facing reason."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"
