"""Plain, typed domain values shared by every part of EchoLM. No I/O here."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

# The ``tier`` of a response served verbatim from the example cache (echolm.routing.reuse): not a
# model tier, so no configured tier may take the name.
REUSE_TIER = "cache"


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


# Keys of a response's ``timings`` holding the generate stage's split (see ``GenerationResult``).
PREFILL_TIMING = "generate.prefill"
DECODE_TIMING = "generate.decode"


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_s: float
    cached_prompt_tokens: int = 0  # prompt tokens taken from the backend's prefix cache, not prefilled
    # The backend's own split of this request's compute: until the first generated token (prompt
    # evaluation) and after it. None where the backend does not time one request alone (a batching
    # engine, an HTTP server); the router's token costs then fall back to a regression.
    prefill_s: float | None = None
    decode_s: float | None = None

    def split_timings(self) -> dict[str, float]:
        """The prefill/decode split as entries of a response's ``timings`` (parts of ``generate``, not
        stages of their own); empty where the backend gives none."""
        if self.prefill_s is None or self.decode_s is None:
            return {}
        return {PREFILL_TIMING: self.prefill_s, DECODE_TIMING: self.decode_s}


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
class ExampleFeatures:
    """What the router knows about a request's selected examples. Values are already in [0, 1] or [-1, 1]."""

    count: int = 0
    max_similarity: float = 0.0
    mean_similarity: float = 0.0
    mean_helpfulness: float = 0.0
    mean_source_quality: float = 0.0

    @classmethod
    def from_retrieved(cls, examples: Sequence[RetrievedExample]) -> ExampleFeatures:
        """Summarise selected examples. A missing helpfulness falls back to the similarity (the proxy's
        cold start); a missing quality counts as a neutral 0.5."""
        if not examples:
            return cls()
        sims = [e.similarity for e in examples]
        helpful = [e.helpfulness if e.helpfulness is not None else e.similarity for e in examples]
        quality = [e.example.quality if e.example.quality is not None else 0.5 for e in examples]
        return cls(
            count=len(examples),
            max_similarity=max(sims),
            mean_similarity=sum(sims) / len(sims),
            mean_helpfulness=sum(helpful) / len(helpful),
            mean_source_quality=sum(quality) / len(quality),
        )


ROUTE_CONTEXT_VERSION = 1


@dataclass(frozen=True, slots=True)
class RoutedExample:
    """One selected example as the router saw it."""

    id: int
    similarity: float
    helpfulness: float | None = None
    quality: float | None = None


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What a router saw and computed when it chose a tier. It travels with the request
    (``RouteInfo.context``) and is stored with the answer (``responses.route_context``), so that
    training and calibration read the decision's own inputs instead of rebuilding them later.

    ``policy``: the routing policy that decided ("bandit", "bandit-cold-start", "similarity", ...);
    ``policy_version``: the stored router state's version (None when no learned state decided);
    ``utilities`` mu_i, ``scores`` S_i and ``costs`` C_i per tier; ``loads``: every tier's load as the
    router read it, ``load`` the value L of ``load_tier`` compared with ``load_threshold``, ``bias`` the
    resulting ``lambda0 * tanh(gamma * max(0, L - threshold))``; ``explore``: an epsilon-greedy draw, not
    the scores, chose ``tier``; ``prompt_chars`` / ``example_chars``: the sizes the costs were computed
    for; ``features``: exactly what the utility model was given about the examples. The request
    embedding is not kept: it is the embedding of the logged prompt text (deterministic per embedder).
    ``version`` changes when the meaning of a field does; readers ignore versions they do not know.
    """

    policy: str
    tier: str
    version: int = ROUTE_CONTEXT_VERSION
    policy_version: int | None = None
    explore: bool = False
    utilities: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    loads: dict[str, float] = field(default_factory=dict)
    load_tier: str | None = None
    load: float | None = None
    load_threshold: float | None = None
    bias: float = 0.0
    compare_with: str | None = None
    prompt_chars: int = 0
    example_chars: int = 0
    examples: tuple[RoutedExample, ...] = ()
    features: ExampleFeatures = ExampleFeatures()


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """``compare_with``: a second tier to also answer the request, for a pairwise comparison
    (selective feedback); its answer goes to the judge, never to the requester. ``context``: what the
    router saw and computed (learned routers give it; for the others the route stage fills in what
    every router sees)."""

    tier: str
    score: float
    reason: str
    use_examples: bool
    scores: dict[str, float] = field(default_factory=dict)
    compare_with: str | None = None
    context: RouteContext | None = None


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
