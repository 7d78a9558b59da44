"""The echo backend and the backend factory (no model involved)."""

from __future__ import annotations

import time

import pytest

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.generation.echo import EchoGenerator
from echolm.generation.factory import make_generator
from echolm.protocols import Generator
from echolm.settings import Settings, TierSettings


def _settings(*tiers: TierSettings) -> Settings:
    return Settings(tiers=list(tiers), admit_from_tiers=[tiers[0].name])


async def test_echo_repeats_the_start_of_the_last_user_message_with_word_counts() -> None:
    gen = EchoGenerator("echo")
    messages = [ChatMessage("system", "be brief"), ChatMessage("user", "first"), ChatMessage("user", "x" * 100)]

    result = await gen.generate(messages, GenerationParams(), request_id="r")

    assert result.text == "echo: " + "x" * 64
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (4, 2, "stop")
    assert isinstance(gen, Generator)


async def test_echo_respects_max_tokens() -> None:
    result = await EchoGenerator().generate(
        [ChatMessage("user", "one two three four")], GenerationParams(max_tokens=3), request_id="r"
    )
    assert (result.text, result.completion_tokens, result.finish_reason) == ("echo: one two", 3, "length")


async def test_echo_delay_and_timeout() -> None:
    started = time.monotonic()
    result = await EchoGenerator(delay_s=0.05).generate([ChatMessage("user", "hi")], GenerationParams(), request_id="r")
    assert time.monotonic() - started >= 0.05 and result.latency_s >= 0.05

    with pytest.raises(EchoLMError) as caught:
        await EchoGenerator(delay_s=5, timeout_s=0.01).generate([ChatMessage("user", "hi")], GenerationParams(), request_id="r")
    assert caught.value.code is ErrorCode.GENERATION_TIMEOUT


def test_factory_builds_echo_with_the_tier_s_simulated_latency() -> None:
    tier = TierSettings(name="fake", backend="echo", model="echo-model", relative_cost=1.0, simulated_latency_s=0.25)
    gen = make_generator(tier, _settings(tier))
    assert isinstance(gen, EchoGenerator) and gen.model_name == "echo-model"
    assert gen._delay_s == 0.25  # noqa: SLF001 - the factory's whole job here is to pass it on
