"""Retry, backoff and error mapping of the OpenAI-compatible backend, against httpx.MockTransport."""

from __future__ import annotations

import asyncio
import email.utils
import json
import uuid

import httpx
import pytest

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.generation.openai_http import (
    OpenAIChatGenerator,
    RetryPolicy,
    chat_request_body,
    is_context_length_error,
    parse_chat_response,
    parse_retry_after,
    request_id_headers,
    server_message,
)
from echolm.settings import TierSettings

MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "What is 2+2?")]


def _tier(**overrides) -> TierSettings:
    values = dict(name="small", backend="openai", model="served-small", relative_cost=1.0,
                  base_url="http://llm.test/v1", timeout_s=5.0, concurrency=2, max_tokens=32)
    values.update(overrides)
    return TierSettings(**values)


def _completion(text: str = "4", prompt_tokens: int = 11, completion_tokens: int = 1) -> dict:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "whatever-the-server-calls-it",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class Script:
    """A mock server answering from a list of responses (or exceptions), recording each request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class RecordedSleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _generator(script, *, tier: TierSettings | None = None, api_key: str | None = None,
               retry: RetryPolicy = RetryPolicy(max_attempts=4, base_delay_s=0.1, max_delay_s=1.0),
               sleeps: RecordedSleeps | None = None, jitter: float = 0.5) -> OpenAIChatGenerator:
    return OpenAIChatGenerator(
        tier or _tier(), api_key=api_key, retry=retry, transport=httpx.MockTransport(script),
        sleep=sleeps or RecordedSleeps(), jitter=lambda: jitter,
    )


# ---------------------------------------------------------------------------------- pure helpers


def test_backoff_doubles_up_to_the_cap_with_half_of_each_step_random():
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=3.0)
    assert [policy.backoff_s(n, 0.0) for n in (1, 2, 3, 4, 5)] == [0.25, 0.5, 1.0, 1.5, 1.5]
    assert [policy.backoff_s(n, 0.999999) for n in (1, 2, 3)] == pytest.approx([0.5, 1.0, 2.0])


def test_retry_after_extends_the_pause_and_a_too_long_one_means_give_up():
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=3.0, max_retry_after_s=30)
    assert policy.delay_s(1, 0.0, retry_after_s=None) == 0.25
    assert policy.delay_s(1, 0.0, retry_after_s=7.0) == 7.0
    assert policy.delay_s(3, 1.0, retry_after_s=0.1) == pytest.approx(2.0)
    assert policy.delay_s(1, 0.0, retry_after_s=31.0) is None


def test_retry_after_parses_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-4", now) == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 20, usegmt=True), now) == pytest.approx(20.0)
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("nan", now) is None


def test_server_message_reads_openai_and_fastapi_error_shapes():
    openai_style = json.dumps({"error": {"message": "model overloaded", "type": "server_error"}}).encode()
    assert server_message(503, openai_style) == "model overloaded"
    assert server_message(404, json.dumps({"detail": "Not Found"}).encode()) == "Not Found"
    assert server_message(400, json.dumps({"object": "error", "message": "bad stop"}).encode()) == "bad stop"
    assert server_message(502, b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert server_message(400, b"") == "HTTP 400 with an empty body"
    assert len(server_message(500, b"x" * 10_000)) == 500


def test_context_length_errors_are_recognised_only_on_client_errors():
    vllm = ("This model's maximum context length is 2048 tokens. However, you requested 3051 tokens "
            "(3031 in the messages, 20 in the completion).")
    assert is_context_length_error(400, vllm)
    assert is_context_length_error(400, "context_length_exceeded")
    assert is_context_length_error(413, "Payload Too Large")
    assert not is_context_length_error(400, "temperature must be non-negative")
    assert not is_context_length_error(500, vllm)


def test_request_ids_travel_as_uuid_plus_the_original():
    plain = request_id_headers("req-0a1b2c")
    assert plain["X-Client-Request-Id"] == "req-0a1b2c"
    assert uuid.UUID(plain["X-Request-Id"]).version == 5
    assert request_id_headers("req-0a1b2c") == plain  # stable across retries and redeliveries
    assert request_id_headers("req-0a1b2d")["X-Request-Id"] != plain["X-Request-Id"]
    already = str(uuid.uuid4())
    assert request_id_headers(already)["X-Request-Id"] == already
    # Header values must be ASCII: a non-ASCII id still gets its derived UUID, not the raw value.
    accented = request_id_headers("req-café")
    assert "X-Client-Request-Id" not in accented and uuid.UUID(accented["X-Request-Id"])


def test_request_body_uses_tier_default_max_tokens_and_optional_fields():
    body = chat_request_body("m", MESSAGES, GenerationParams(temperature=0.2), default_max_tokens=64)
    assert body == {
        "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "What is 2+2?"}],
        "max_tokens": 64, "temperature": 0.2, "top_p": 1.0, "stream": False,
    }
    full = chat_request_body("m", MESSAGES, GenerationParams(max_tokens=5, stop=("\n",), seed=7), 64)
    assert (full["max_tokens"], full["stop"], full["seed"]) == (5, ["\n"], 7)


def test_response_parsing_takes_usage_and_rejects_malformed_bodies():
    result = parse_chat_response(_completion("four", 12, 3), "served-small", 0.5)
    assert (result.text, result.model, result.prompt_tokens, result.completion_tokens, result.finish_reason) == (
        "four", "served-small", 12, 3, "stop")
    no_usage = parse_chat_response({"choices": [{"message": {"content": None}}]}, "m", 0.1)
    assert (no_usage.text, no_usage.prompt_tokens, no_usage.finish_reason) == ("", 0, "stop")
    for bad in ([], {"choices": []}, {"choices": [{"text": "legacy"}]}, {"choices": [{"message": {"content": 3}}]}):
        with pytest.raises(EchoLMError) as caught:
            parse_chat_response(bad, "m", 0.1)
        assert caught.value.code is ErrorCode.GENERATION_FAILED


def test_a_tier_without_base_url_is_refused():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIChatGenerator(_tier(base_url=None), api_key=None)


# ---------------------------------------------------------------------------------- client behaviour


async def test_success_sends_body_headers_and_key():
    script = Script(httpx.Response(200, json=_completion("4", 20, 1)))
    generator = _generator(script, api_key="sk-test")
    result = await generator.generate(MESSAGES, GenerationParams(max_tokens=8), request_id="req-42")
    await generator.aclose()
    assert (result.text, result.prompt_tokens, result.completion_tokens) == ("4", 20, 1)
    assert result.model == "served-small"
    [request] = script.requests
    assert str(request.url) == "http://llm.test/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["x-request-id"] == request_id_headers("req-42")["X-Request-Id"]
    assert request.headers["x-client-request-id"] == "req-42"
    sent = json.loads(request.content)
    assert (sent["model"], sent["max_tokens"], sent["messages"][1]["content"]) == ("served-small", 8, "What is 2+2?")
    assert "sk-test" not in repr(generator)


async def test_no_authorization_header_without_a_key():
    script = Script(httpx.Response(200, json=_completion()))
    generator = _generator(script, api_key=None)
    await generator.generate(MESSAGES, GenerationParams(), request_id="r")
    assert "authorization" not in script.requests[0].headers


async def test_429_and_5xx_are_retried_with_growing_backoff_then_succeed():
    sleeps = RecordedSleeps()
    script = Script(
        httpx.Response(429, json={"error": {"message": "slow down"}}),
        httpx.Response(503, text="overloaded"),
        httpx.ConnectError("connection refused"),
        httpx.Response(200, json=_completion("ok")),
    )
    generator = _generator(script, sleeps=sleeps, jitter=0.0)
    result = await generator.generate(MESSAGES, GenerationParams(), request_id="r1")
    assert result.text == "ok"
    assert len(script.requests) == 4
    assert sleeps.delays == pytest.approx([0.05, 0.1, 0.2])  # base 0.1, doubling, zero jitter half
    # Every attempt carries the same request id.
    assert len({r.headers["x-request-id"] for r in script.requests}) == 1


async def test_retry_after_is_honoured():
    sleeps = RecordedSleeps()
    script = Script(httpx.Response(429, headers={"Retry-After": "2"}, text=""),
                    httpx.Response(200, json=_completion()))
    await _generator(script, sleeps=sleeps).generate(MESSAGES, GenerationParams(), request_id="r")
    assert sleeps.delays == [2.0]


async def test_a_retry_after_beyond_the_deadline_fails_at_once_instead_of_sleeping():
    sleeps = RecordedSleeps()
    script = Script(httpx.Response(503, headers={"Retry-After": "30"}, json={"error": {"message": "busy"}}))
    with pytest.raises(EchoLMError) as caught:
        await _generator(script, tier=_tier(timeout_s=5.0), sleeps=sleeps).generate(
            MESSAGES, GenerationParams(), request_id="r")
    assert caught.value.code is ErrorCode.GENERATION_FAILED
    assert "busy" in caught.value.message and "no time left" in caught.value.message
    assert sleeps.delays == []


async def test_attempts_are_bounded_and_the_last_server_message_is_reported():
    sleeps = RecordedSleeps()
    script = Script(*[httpx.Response(500, json={"error": {"message": f"boom {i}"}}) for i in range(3)])
    generator = _generator(script, sleeps=sleeps, retry=RetryPolicy(max_attempts=3, base_delay_s=0.1))
    with pytest.raises(EchoLMError) as caught:
        await generator.generate(MESSAGES, GenerationParams(), request_id="r")
    assert caught.value.code is ErrorCode.GENERATION_FAILED
    assert "gave up after 3 attempts" in caught.value.message and "boom 2" in caught.value.message
    assert len(script.requests) == 3 and len(sleeps.delays) == 2


async def test_context_length_400_is_prompt_too_long_and_not_retried():
    script = Script(httpx.Response(400, json={"error": {
        "message": "This model's maximum context length is 2048 tokens. However, you requested 3051 tokens",
        "type": "invalid_request_error", "code": "context_length_exceeded"}}))
    with pytest.raises(EchoLMError) as caught:
        await _generator(script).generate(MESSAGES, GenerationParams(), request_id="r")
    assert caught.value.code is ErrorCode.PROMPT_TOO_LONG
    assert "2048" in caught.value.message
    assert len(script.requests) == 1


async def test_other_client_errors_fail_at_once_with_the_server_message():
    script = Script(httpx.Response(404, json={"error": {"message": "The model `nope` does not exist."}}))
    with pytest.raises(EchoLMError) as caught:
        await _generator(script).generate(MESSAGES, GenerationParams(), request_id="r")
    assert caught.value.code is ErrorCode.GENERATION_FAILED
    assert "HTTP 404" in caught.value.message and "does not exist" in caught.value.message
    assert len(script.requests) == 1


async def test_a_non_json_success_body_is_a_generation_failure():
    script = Script(httpx.Response(200, text="<html>proxy login</html>"))
    with pytest.raises(EchoLMError) as caught:
        await _generator(script).generate(MESSAGES, GenerationParams(), request_id="r")
    assert caught.value.code is ErrorCode.GENERATION_FAILED


async def test_a_read_timeout_is_a_generation_timeout_without_retry():
    script = Script(httpx.ReadTimeout("read timed out"))
    with pytest.raises(EchoLMError) as caught:
        await _generator(script).generate(MESSAGES, GenerationParams(), request_id="r")
    assert caught.value.code is ErrorCode.GENERATION_TIMEOUT
    assert len(script.requests) == 1


async def test_a_hanging_server_ends_within_the_tier_timeout():
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    generator = OpenAIChatGenerator(_tier(timeout_s=0.3), api_key=None, transport=httpx.MockTransport(hang))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(EchoLMError) as caught:
        await generator.generate(MESSAGES, GenerationParams(), request_id="r")
    assert caught.value.code is ErrorCode.GENERATION_TIMEOUT
    assert loop.time() - started < 1.5
    await generator.aclose()


async def test_concurrency_is_limited_to_the_tier_setting():
    in_flight = 0
    peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, json=_completion())

    generator = OpenAIChatGenerator(_tier(concurrency=3), api_key=None, transport=httpx.MockTransport(slow))
    results = await asyncio.gather(*(generator.generate(MESSAGES, GenerationParams(), request_id=f"r{i}")
                                     for i in range(10)))
    await generator.aclose()
    assert len(results) == 10
    assert peak == 3


def test_the_factory_builds_it_with_the_key_from_the_environment(monkeypatch):
    from echolm.generation.factory import make_generator
    from echolm.settings import Settings

    tier = _tier()
    monkeypatch.setenv("ECHOLM_OPENAI_API_KEY", "sk-from-env")
    generator = make_generator(tier, Settings(tiers=[tier], admit_from_tiers=[]))
    assert isinstance(generator, OpenAIChatGenerator) and generator.url == "http://llm.test/v1/chat/completions"
    assert generator._api_key == "sk-from-env"
    monkeypatch.setenv("ECHOLM_OPENAI_API_KEY", "")  # compose passes an unset secret as empty
    assert make_generator(tier, Settings(tiers=[tier], admit_from_tiers=[]))._api_key is None


def test_cached_prompt_tokens_come_from_the_usage_details():
    body = _completion("four", 1200, 3)
    body["usage"]["prompt_tokens_details"] = {"cached_tokens": 1024}
    assert parse_chat_response(body, "m", 0.1).cached_prompt_tokens == 1024
    assert parse_chat_response(_completion("four", 12, 3), "m", 0.1).cached_prompt_tokens == 0
