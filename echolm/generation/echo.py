"""A trivial, deterministic backend for pipeline benchmarks and wiring tests (``backend="echo"``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams, GenerationResult

ECHO_PREFIX = "echo: "
ECHO_CHARS = 64


class EchoGenerator:
    """Answers ``"echo: <first 64 characters of the last user message>"`` after an optional fixed delay.

    Token counts are whitespace-split word counts of the prompt and the answer: honest for what
    this backend does, and cheap. ``delay_s`` longer than ``timeout_s`` ends in GENERATION_TIMEOUT,
    like a real backend would.
    """

    def __init__(self, model: str = "echo", *, delay_s: float = 0.0, timeout_s: float | None = None) -> None:
        self._model = model
        self._delay_s = delay_s
        self._timeout_s = timeout_s

    @property
    def model_name(self) -> str:
        return self._model

    async def generate(
        self, messages: Sequence[ChatMessage], params: GenerationParams, *, request_id: str
    ) -> GenerationResult:
        started = time.monotonic()
        if self._delay_s > 0:
            if self._timeout_s is not None and self._delay_s > self._timeout_s:
                await asyncio.sleep(self._timeout_s)
                raise EchoLMError(
                    ErrorCode.GENERATION_TIMEOUT,
                    f"request {request_id}: echo delay {self._delay_s:g} s exceeds the {self._timeout_s:g} s limit",
                )
            await asyncio.sleep(self._delay_s)
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        text = ECHO_PREFIX + last_user[:ECHO_CHARS]
        words = text.split()
        finish_reason = "stop"
        if params.max_tokens is not None and len(words) > params.max_tokens:
            words = words[: params.max_tokens]
            text, finish_reason = " ".join(words), "length"
        return GenerationResult(
            text=text,
            model=self._model,
            prompt_tokens=sum(len(m.content.split()) for m in messages),
            completion_tokens=len(words),
            finish_reason=finish_reason,
            latency_s=time.monotonic() - started,
        )

    async def aclose(self) -> None:
        return None
