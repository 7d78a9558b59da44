"""LlamaCppGenerator on the real SmolLM2-135M weights: answers, timeouts, context overflow."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from echolm.assets import resolve_model
from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.generation.factory import make_generator
from echolm.generation.llamacpp import LlamaCppGenerator
from echolm.settings import Settings, TierSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
QUESTION = [ChatMessage("user", "What is the capital of France? Answer in one short sentence.")]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return resolve_model(MODEL, Settings().model_cache_dir)


def _tier(**overrides: object) -> TierSettings:
    fields: dict[str, object] = {"name": "tiny", "model": MODEL, "relative_cost": 1.0, "n_ctx": 1024}
    fields.update(overrides)
    return TierSettings(**fields)


@pytest.fixture
async def generator(model_path: Path) -> AsyncIterator[LlamaCppGenerator]:
    gen = LlamaCppGenerator(_tier(), model_path)
    await gen.start()
    yield gen
    await gen.aclose()


async def test_answers_a_real_question_with_sane_token_counts(generator: LlamaCppGenerator) -> None:
    result = await generator.generate(QUESTION, GenerationParams(max_tokens=32), request_id="q1")

    assert "paris" in result.text.lower()
    assert result.model == MODEL
    assert result.prompt_tokens == generator.count_prompt_tokens(QUESTION)
    assert 0 < result.completion_tokens <= 32
    assert result.finish_reason in {"stop", "length"}
    assert 0 < result.latency_s < 60
    # The compute split the router's token costs are fitted on: both parts measured, within the call.
    assert result.prefill_s is not None and result.decode_s is not None
    assert result.prefill_s > 0 and result.decode_s > 0
    assert result.prefill_s + result.decode_s <= result.latency_s


async def test_concurrent_calls_are_serialised_and_all_answered(generator: LlamaCppGenerator) -> None:
    questions = [[ChatMessage("user", f"Say the number {n} and nothing else.")] for n in range(3)]

    results = await asyncio.gather(
        *(generator.generate(q, GenerationParams(max_tokens=8), request_id=f"c{i}") for i, q in enumerate(questions))
    )

    assert all(r.completion_tokens > 0 and r.text for r in results)
    assert [r.prompt_tokens for r in results] == [generator.count_prompt_tokens(q) for q in questions]


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([ChatMessage("user", "Write a very long story about dragons.")], id="while-decoding"),
        pytest.param([ChatMessage("user", "dragon " * 900)], id="while-reading-the-prompt"),
    ],
)
async def test_a_tiny_timeout_stops_generation_promptly(model_path: Path, messages: list[ChatMessage]) -> None:
    gen = LlamaCppGenerator(_tier(timeout_s=0.05, max_tokens=900), model_path)
    await gen.start()
    try:
        started = time.monotonic()
        with pytest.raises(EchoLMError) as caught:
            await gen.generate(messages, GenerationParams(max_tokens=900), request_id="slow")
        elapsed = time.monotonic() - started
    finally:
        await gen.aclose()

    assert caught.value.code is ErrorCode.GENERATION_TIMEOUT
    # The inner deadline stops llama.cpp itself, well before the outer 1 s backstop.
    assert elapsed < 0.9


class _CountingAbortChecks(LlamaCppGenerator):
    """Counts llama.cpp's calls of the abort callback (one per graph node while it is armed)."""

    checks = 0

    def _should_abort(self, _data: object) -> bool:
        self.checks += 1
        return super()._should_abort(_data)


async def test_the_abort_callback_runs_while_the_prompt_is_read_but_not_per_decoded_token(model_path: Path) -> None:
    # llama.cpp calls it after every graph node; a Python callback takes the GIL each time, so decoding
    # checks the deadline once per token instead (the module docstring).
    story = [ChatMessage("user", "Write a long story about dragons.")]
    params = GenerationParams(max_tokens=24, temperature=0.0)
    gen = _CountingAbortChecks(_tier(prefix_cache_mb=0), model_path)
    try:
        short = await gen.generate(story, GenerationParams(max_tokens=1, temperature=0.0), request_id="short")
        after_short = gen.checks
        long = await gen.generate(story, params, request_id="long")
        after_long = gen.checks - after_short
    finally:
        await gen.aclose()

    assert short.completion_tokens == 1 and long.completion_tokens > 10
    assert after_short > 100  # armed for the prompt: one check per node of its graph
    # The same prompt's checks, and none for the 10+ decoded tokens (armed, each would add as many as the
    # prompt's one graph).
    assert after_long < 2 * after_short


async def test_the_model_answers_normally_after_a_timeout(model_path: Path) -> None:
    # Reading ~1,800 prompt tokens takes several seconds on 2 cores, far past the limit; the short
    # question afterwards takes a fraction of it, even on a busy machine.
    gen = LlamaCppGenerator(_tier(timeout_s=3.0, n_ctx=2048), model_path)
    await gen.start()
    try:
        with pytest.raises(EchoLMError) as caught:
            await gen.generate([ChatMessage("user", "dragon " * 1800)], GenerationParams(max_tokens=8), request_id="long")
        assert caught.value.code is ErrorCode.GENERATION_TIMEOUT

        result = await gen.generate(QUESTION, GenerationParams(max_tokens=12), request_id="after")
    finally:
        await gen.aclose()

    assert "paris" in result.text.lower()


async def test_a_prompt_longer_than_the_context_is_refused_with_token_counts(model_path: Path) -> None:
    gen = LlamaCppGenerator(_tier(n_ctx=256), model_path)
    try:
        with pytest.raises(EchoLMError) as caught:
            await gen.generate([ChatMessage("user", "word " * 400)], GenerationParams(max_tokens=8), request_id="big")
    finally:
        await gen.aclose()

    assert caught.value.code is ErrorCode.PROMPT_TOO_LONG
    assert "256" in caught.value.message and "tokens" in caught.value.message


async def test_factory_builds_a_llamacpp_generator_for_a_registry_name(model_path: Path) -> None:
    settings = Settings(tiers=[_tier()], admit_from_tiers=["tiny"])

    gen = make_generator(settings.tier("tiny"), settings)
    try:
        assert isinstance(gen, LlamaCppGenerator)
        assert gen.model_name == MODEL
        result = await gen.generate(QUESTION, GenerationParams(max_tokens=12), request_id="f1")
    finally:
        await gen.aclose()
    assert result.text


SHARED_SYSTEM = ChatMessage("system", "You answer geography questions. Reference notes: " + " ".join(
    f"Note {n}: capitals are where governments sit." for n in range(20)))


async def test_prompts_sharing_a_prefix_reuse_the_kept_kv_state(model_path: Path) -> None:
    from echolm.generation.llamacpp import LlamaCppPromptTokenizer
    from echolm.prefix_index import common_prefix_length

    france = [SHARED_SYSTEM, ChatMessage("user", "What is the capital of France?")]
    spain = [SHARED_SYSTEM, ChatMessage("user", "What is the capital of Spain?")]
    tokenizer = LlamaCppPromptTokenizer(model_path)
    france_ids, spain_ids = tokenizer.prompt_tokens(france), tokenizer.prompt_tokens(spain)
    tokenizer.close()
    shared = common_prefix_length(france_ids, spain_ids)
    assert shared > 200  # the system prompt

    params = GenerationParams(max_tokens=12, temperature=0.0)
    cold = LlamaCppGenerator(_tier(prefix_cache_mb=0), model_path)
    cached = LlamaCppGenerator(_tier(prefix_cache_mb=64), model_path)
    try:
        reference = await cold.generate(france, params, request_id="cold")
        assert cold.prefix_stats is None
        first = await cached.generate(france, params, request_id="f1")
        await cached.generate(spain, params, request_id="s1")
        again = await cached.generate(france, params, request_id="f2")  # restores France's state (Spain's is live)
    finally:
        await cold.aclose()
        await cached.aclose()

    assert first.prompt_tokens == len(france_ids)  # the tokenizer sees what the generator prefills
    assert first.text == reference.text  # nothing kept yet: a full prefill, as with reuse off
    stats = cached.prefix_stats
    assert stats is not None
    assert stats.prompts == 3
    assert stats.restores == 1
    # Spain reuses the shared system prompt from the live context; France again all but its last token.
    assert stats.reused_tokens == shared + len(france_ids) - 1
    assert (first.cached_prompt_tokens, again.cached_prompt_tokens) == (0, len(france_ids) - 1)


async def test_tiers_on_a_shared_thread_answer_together_and_close_apart(model_path: Path) -> None:
    import threading

    from echolm.generation.llamacpp import shared_compute_thread

    shared = shared_compute_thread()
    first = LlamaCppGenerator(_tier(name="first"), model_path, executor=shared)
    second = LlamaCppGenerator(_tier(name="second"), model_path, executor=shared)
    threads: set[str] = set()

    def record_thread() -> None:
        threads.add(threading.current_thread().name)

    try:
        results = await asyncio.gather(
            first.generate(QUESTION, GenerationParams(max_tokens=16), request_id="a"),
            second.generate(QUESTION, GenerationParams(max_tokens=16), request_id="b"))
        assert all("paris" in r.text.lower() for r in results)
        # Both models ran on the one shared thread.
        await asyncio.get_running_loop().run_in_executor(shared, record_thread)
        assert threads == {next(t.name for t in threading.enumerate() if t.name.startswith("llama-shared"))}
    finally:
        await first.aclose()
    # Closing one tier leaves the shared thread to the other.
    result = await second.generate(QUESTION, GenerationParams(max_tokens=16), request_id="c")
    assert "paris" in result.text.lower()
    await second.aclose()
    assert shared_compute_thread() is shared



async def test_prompt_lookup_drafts_are_accepted_and_the_answer_is_the_models(model_path: Path) -> None:
    # A sentence to repeat: the model's answer copies it, so drafts taken from the prompt are accepted and
    # the answer needs fewer passes than it has tokens.
    messages = [ChatMessage("user", "Repeat the following sentence exactly: The quick brown fox jumps over "
                                    "the lazy dog near the river bank.")]
    params = GenerationParams(max_tokens=48)
    plain = LlamaCppGenerator(_tier(), model_path)
    drafting = LlamaCppGenerator(_tier(lookup_draft_tokens=3), model_path)
    try:
        expected = await plain.generate(messages, params, request_id="plain")
        assert drafting.lookup_stats is None  # not loaded yet
        got = await drafting.generate(messages, params, request_id="lookup")
        stats = drafting.lookup_stats
        assert plain.lookup_stats is None
    finally:
        await plain.aclose()
        await drafting.aclose()

    assert "quick brown fox jumps" in expected.text
    assert got.text == expected.text
    assert got.completion_tokens == expected.completion_tokens
    assert stats is not None and stats.drafted > 0
    # passes count decode batches after the prompt: every token but the first needs one without drafts
    assert 0 < stats.passes < got.completion_tokens - 1
