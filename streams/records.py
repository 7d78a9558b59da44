"""Wire schemas of every topic: versioned JSON, validated at each stage's door. No pickle anywhere.

A request travels as one ``InFlightRequest`` that each stage enriches (embedding, examples, route),
so any stage can run in its own process. Every request ends as exactly one ``ResponseRecord`` on
the responses topic: an answer or an explicit error.

Compatibility: fields added to a version are optional, so records written before them still decode
(``ExampleRef.quality``, ``RouteInfo.context``), and readers ignore fields they do not know, so older
workers read newer records. A nested part with its own meaning carries its own version
(``RouteInfo.context.version``, see ``echolm.domain.RouteContext``).
"""

from __future__ import annotations

import base64
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from echolm.domain import ChatMessage, ErrorCode, GenerationParams, RouteContext

SCHEMA_VERSION = 1


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str

    def to_domain(self) -> ChatMessage:
        return ChatMessage(self.role, self.content)


class RequestRecord(BaseModel):
    """What producers put on the requests topic (``echolm produce``, ``echolm batch``, user code)."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(min_length=1, max_length=200)
    tenant: str = Field(default="default", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    custom_id: str | None = Field(default=None, max_length=500)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: list[str] | None = None
    seed: int | None = None
    submitted_at: float = Field(default_factory=time.time)

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "user" and m.content.strip() for m in messages):
            raise ValueError("messages must contain a non-empty user message")
        return messages

    def domain_messages(self) -> list[ChatMessage]:
        return [m.to_domain() for m in self.messages]

    def generation_params(self, default_max_tokens: int, default_temperature: float) -> GenerationParams:
        return GenerationParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
        )


class ExampleRef(BaseModel):
    """A retrieved example as carried to the generate stage (texts included, so it needs no lookup)."""

    id: int
    similarity: float
    prompt: str
    response: str
    model: str
    helpfulness: float | None = None
    quality: float | None = None


class RouteInfo(BaseModel):
    """The route decision; ``context``: what the router saw and computed (None in records written before
    it was logged)."""

    tier: str
    score: float
    reason: str
    use_examples: bool
    scores: dict[str, float] = Field(default_factory=dict)
    context: RouteContext | None = None


class InFlightRequest(BaseModel):
    """A request between stages; each stage fills its own part and adds its timing."""

    v: Literal[1] = SCHEMA_VERSION
    request: RequestRecord
    embedding_b64: str | None = None
    examples: list[ExampleRef] | None = None
    route: RouteInfo | None = None
    timings: dict[str, float] = Field(default_factory=dict)

    def with_embedding(self, vector: np.ndarray) -> InFlightRequest:
        return self.model_copy(update={"embedding_b64": encode_vector(vector)})

    def embedding(self) -> np.ndarray:
        if self.embedding_b64 is None:
            raise ValueError("request has no embedding yet: was it sent past the embed stage?")
        return decode_vector(self.embedding_b64)


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    stage: str


class ResponseRecord(BaseModel):
    """The one final record per request: an answer (``error`` is None) or an explicit error."""

    v: Literal[1] = SCHEMA_VERSION
    request_id: str
    tenant: str
    custom_id: str | None
    messages: list[Message]
    text: str | None = None
    tier: str | None = None
    model: str | None = None
    examples: list[ExampleRef] = Field(default_factory=list)
    route: RouteInfo | None = None
    prompt_tokens: int | None = None
    cached_prompt_tokens: int | None = None  # of prompt_tokens, taken from the tier's prefix cache
    completion_tokens: int | None = None
    finish_reason: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    embedding_b64: str | None = None
    error: ErrorInfo | None = None
    submitted_at: float
    finished_at: float = Field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.error is None


class DeadLetterRecord(BaseModel):
    """Why a request could not be served, kept for operators (its requester got an error response)."""

    v: Literal[1] = SCHEMA_VERSION
    request_id: str
    tenant: str
    stage: str
    code: ErrorCode
    reason: str
    raw_b64: str | None = Field(default=None, description="the undecodable bytes, when that was the problem")
    at: float = Field(default_factory=time.time)


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode("ascii")


def decode_vector(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype=np.float32)


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)
