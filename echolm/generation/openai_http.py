"""Generation against any OpenAI-compatible ``/v1/chat/completions`` server.

Works with vLLM's ``vllm serve``, llama.cpp's servers and hosted APIs. One generator serves one tier:
at most ``tier.concurrency`` calls are in flight, and each call — retries and backoff included — ends
within ``tier.timeout_s``. Transient failures (connection errors, 408/429/5xx) are retried with
exponential backoff and jitter, honouring ``Retry-After``; everything else maps to an ``EchoLMError``
at once. The HTTP client is created on first use, inside the running event loop.

``tier.base_url`` is the API root including the version, as in the OpenAI SDK:
``http://vllm-small:8000/v1``. The API key comes from the environment only
(``ECHOLM_OPENAI_API_KEY``) and is sent as a bearer token.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams, GenerationResult
from echolm.settings import TierSettings

log = logging.getLogger(__name__)

# Connecting should never take long; a dead host must not use up the whole generation budget.
CONNECT_TIMEOUT_S = 10.0
MAX_MESSAGE_CHARS = 500
# Header values must be ASCII; OpenAI caps its client request id at 512 characters.
MAX_CLIENT_REQUEST_ID_CHARS = 512
# Stable namespace for deriving UUIDs from EchoLM request ids (see request_id_headers).
REQUEST_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "echolm:request-id")

# How servers say "the prompt does not fit": OpenAI and vLLM's server ("maximum context length"),
# vLLM's engine ("longer than the maximum model length"), llama.cpp ("exceeds the available context size").
_CONTEXT_LENGTH_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "context length",
    "context window",
    "context size",
    "maximum model length",
    "prompt is too long",
    "too many tokens",
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with capped exponential backoff and "equal jitter"."""

    max_attempts: int = 4
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    # A server asking for a longer pause than this is treated as down for this call.
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("delays must not be negative")

    def backoff_s(self, failed_attempt: int, jitter: float) -> float:
        """Pause after the ``failed_attempt``-th (1-based) failure; ``jitter`` is uniform in [0, 1).

        Half of the capped exponential step is fixed and half random, so retries from many
        workers spread out without ever collapsing to zero.
        """
        step = min(self.max_delay_s, self.base_delay_s * 2 ** (failed_attempt - 1))
        return step / 2 + step / 2 * jitter

    def delay_s(self, failed_attempt: int, jitter: float, retry_after_s: float | None) -> float | None:
        """The pause before the next attempt, or None when the server asked for too long a pause."""
        delay = self.backoff_s(failed_attempt, jitter)
        if retry_after_s is None:
            return delay
        if retry_after_s > self.max_retry_after_s:
            return None
        return max(delay, retry_after_s)


def is_retryable_status(status: int) -> bool:
    """Statuses worth another attempt: request timeout, rate limiting, and server-side errors."""
    return status in (408, 429) or status >= 500


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - now
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def server_message(status: int, body: bytes) -> str:
    """The human-readable reason a server gave, from OpenAI-style or FastAPI-style error bodies."""
    text = body.decode("utf-8", errors="replace").strip()
    message: Any = None
    if text.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict):
                message = error.get("message") or error.get("code")
            elif isinstance(error, str):
                message = error
            message = message or data.get("message") or data.get("detail")
    if message is None:
        message = text or f"HTTP {status} with an empty body"
    if not isinstance(message, str):
        message = str(message)
    return message[:MAX_MESSAGE_CHARS]


def mentions_context_overflow(message: str) -> bool:
    """Whether an error message says the prompt (plus the completion budget) does not fit the model."""
    lowered = message.lower()
    return any(marker in lowered for marker in _CONTEXT_LENGTH_MARKERS)


def is_context_length_error(status: int, message: str) -> bool:
    """Whether an HTTP client error is a context overflow (413 always is)."""
    if status == 413:
        return True
    return status in (400, 422) and mentions_context_overflow(message)


def request_id_headers(request_id: str) -> dict[str, str]:
    """Headers that carry an EchoLM request id to the server.

    ``X-Request-Id`` is what vLLM and most proxies log. llama-cpp-python's server rejects any value
    that is not a UUID (HTTP 400, empty body), so a non-UUID id is sent as a UUID derived from it
    (uuid5, stable: the same request always maps to the same value) and the original id travels in
    ``X-Client-Request-Id`` (OpenAI's header for caller-chosen ids) when it is a valid header value.
    """
    try:
        header_id = str(uuid.UUID(request_id))
    except ValueError:
        header_id = str(uuid.uuid5(REQUEST_ID_NAMESPACE, request_id))
    headers = {"X-Request-Id": header_id}
    if (
        request_id.isascii()
        and request_id.isprintable()
        and 0 < len(request_id) <= MAX_CLIENT_REQUEST_ID_CHARS
    ):
        headers["X-Client-Request-Id"] = request_id
    return headers


def chat_request_body(
    model: str, messages: Sequence[ChatMessage], params: GenerationParams, default_max_tokens: int
) -> dict[str, Any]:
    """The JSON body of one non-streaming chat completion request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "max_tokens": params.max_tokens if params.max_tokens is not None else default_max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": False,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def parse_chat_response(data: Any, model: str, latency_s: float) -> GenerationResult:
    """A ``GenerationResult`` from a chat completion body; malformed bodies are GENERATION_FAILED."""

    def malformed(why: str) -> EchoLMError:
        return EchoLMError(ErrorCode.GENERATION_FAILED, f"malformed chat completion from the server: {why}")

    if not isinstance(data, dict):
        raise malformed("body is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise malformed("no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise malformed("choice has no message")
    content = message.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise malformed("message content is not a string")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    return GenerationResult(
        text=content,
        model=model,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        # vLLM (with prefix caching) and OpenAI report the reused part of the prompt here.
        cached_prompt_tokens=_count(details.get("cached_tokens")),
        finish_reason=str(choice.get("finish_reason") or "stop"),
        latency_s=latency_s,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class OpenAIChatGenerator:
    """A ``Generator`` that calls an OpenAI-compatible chat completions endpoint for one tier."""

    def __init__(
        self,
        tier: TierSettings,
        *,
        api_key: str | None,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if not tier.base_url:
            raise ValueError(
                f"tier {tier.name}: the 'openai' backend needs base_url, e.g. http://vllm-small:8000/v1"
            )
        self._tier = tier
        self._url = tier.base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._retry = retry
        self._transport = transport
        self._sleep = sleep
        self._jitter = jitter
        self._slots = asyncio.Semaphore(tier.concurrency)
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatGenerator(tier={self._tier.name!r}, url={self._url!r}, model={self._tier.model!r})"

    @property
    def model_name(self) -> str:
        return self._tier.model

    @property
    def url(self) -> str:
        return self._url

    async def generate(
        self, messages: Sequence[ChatMessage], params: GenerationParams, *, request_id: str
    ) -> GenerationResult:
        body = chat_request_body(self._tier.model, messages, params, self._tier.max_tokens)
        headers = request_id_headers(request_id)
        started = time.monotonic()
        deadline = started + self._tier.timeout_s
        try:
            async with asyncio.timeout(self._tier.timeout_s):
                async with self._slots:
                    data = await self._post_with_retries(body, headers, deadline, request_id)
        except TimeoutError:
            raise self._timeout_error() from None
        return parse_chat_response(data, self.model_name, time.monotonic() - started)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                transport=self._transport,
                headers=headers,
                limits=httpx.Limits(
                    max_connections=self._tier.concurrency, max_keepalive_connections=self._tier.concurrency
                ),
            )
        return self._client

    def _timeout_error(self) -> EchoLMError:
        return EchoLMError(
            ErrorCode.GENERATION_TIMEOUT,
            f"tier {self._tier.name}: no answer from {self._url} within {self._tier.timeout_s:g} s",
        )

    async def _post_with_retries(
        self, body: Mapping[str, Any], headers: Mapping[str, str], deadline: float, request_id: str
    ) -> Any:
        failure = ""
        for attempt in range(1, self._retry.max_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout_error()
            retry_after_s: float | None = None
            try:
                response = await self._http().post(
                    self._url,
                    json=body,
                    headers=headers,
                    timeout=httpx.Timeout(remaining, connect=min(remaining, CONNECT_TIMEOUT_S)),
                )
            except httpx.TimeoutException as exc:
                # Only a connect timeout shorter than the remaining budget leaves time for another try.
                if not isinstance(exc, httpx.ConnectTimeout) or remaining <= CONNECT_TIMEOUT_S:
                    raise self._timeout_error() from exc
                failure = f"{type(exc).__name__} talking to {self._url}"
            except httpx.TransportError as exc:
                failure = f"cannot reach {self._url}: {type(exc).__name__}: {exc}"[:MAX_MESSAGE_CHARS]
            else:
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise EchoLMError(
                            ErrorCode.GENERATION_FAILED, f"{self._url} answered with a body that is not JSON"
                        ) from exc
                message = server_message(response.status_code, response.content)
                if not is_retryable_status(response.status_code):
                    if is_context_length_error(response.status_code, message):
                        raise EchoLMError(ErrorCode.PROMPT_TOO_LONG, message)
                    raise EchoLMError(
                        ErrorCode.GENERATION_FAILED, f"HTTP {response.status_code} from {self._url}: {message}"
                    )
                failure = f"HTTP {response.status_code} from {self._url}: {message}"
                retry_after_s = parse_retry_after(response.headers.get("retry-after"), time.time())
            if attempt == self._retry.max_attempts:
                break
            delay = self._retry.delay_s(attempt, self._jitter(), retry_after_s)
            if delay is None:
                raise EchoLMError(
                    ErrorCode.GENERATION_FAILED,
                    f"{failure} (the server asks to retry after {retry_after_s:g} s; giving up)",
                )
            if time.monotonic() + delay >= deadline:
                raise EchoLMError(
                    ErrorCode.GENERATION_FAILED,
                    f"{failure} (no time left to retry within {self._tier.timeout_s:g} s)",
                )
            log.warning(
                "request %s: attempt %d/%d failed (%s); retrying in %.2f s",
                request_id, attempt, self._retry.max_attempts, failure, delay,
            )
            await self._sleep(delay)
        raise EchoLMError(
            ErrorCode.GENERATION_FAILED, f"gave up after {self._retry.max_attempts} attempts: {failure}"
        )
