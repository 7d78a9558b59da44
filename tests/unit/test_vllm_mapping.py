"""The vLLM backend's request/response mapping, and its orchestration around a stand-in engine.

vLLM needs a GPU and is never installed here: its objects are replaced by small stand-ins with the
same attributes (``RequestOutput.outputs[0].text`` etc.). The real engine runs in
tests/integration/test_vllm_engine_gpu.py where a GPU is present.
"""

from __future__ import annotations

import asyncio
import importlib.util
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from echolm.assets import MODELS
from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.generation import vllm_engine
from echolm.generation.hf_checkpoint import checkpoint_dir, export_hf_checkpoint
from echolm.generation.vllm_engine import (
    INSTALL_HINT,
    VllmEngineGenerator,
    chat_prompt_token_ids,
    check_prompt_fits,
    classify_engine_error,
    engine_args_kwargs,
    engine_request_id,
    result_from_output,
    sampling_kwargs,
    vllm_model_id,
)
from echolm.settings import TierSettings

MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "What is 2+2?")]


def _tier(**overrides: Any) -> TierSettings:
    values: dict[str, Any] = dict(name="small", backend="vllm", model="qwen2.5-coder-0.5b-instruct",
                                  relative_cost=1.0, concurrency=16, n_ctx=2048, max_tokens=64, timeout_s=5.0)
    values.update(overrides)
    return TierSettings(**values)


def _output(text: str = "4", prompt_ids=(1, 2, 3), token_ids=(9, 9), finish_reason: str | None = "stop",
            finished: bool = True) -> SimpleNamespace:
    completion = SimpleNamespace(text=text, token_ids=list(token_ids), finish_reason=finish_reason)
    return SimpleNamespace(outputs=[completion], prompt_token_ids=list(prompt_ids), finished=finished)


class Tokenizer:
    """Renders a chat the way a template would: one token per word, plus role markers."""

    chat_template = "{{ stand-in }}"

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def apply_chat_template(self, conversation, tokenize: bool, add_generation_prompt: bool):
        words = []
        for message in conversation:
            words += [f"<{message['role']}>", *message["content"].split()]
        if add_generation_prompt:
            words.append("<assistant>")
        return [self.vocab.setdefault(w, len(self.vocab)) for w in words] if tokenize else " ".join(words)


# ---------------------------------------------------------------------------------- pure mapping


def test_engine_args_keep_prefix_caching_on_and_follow_the_tier():
    kwargs = engine_args_kwargs(_tier())
    assert kwargs == {
        "model": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "served_model_name": "qwen2.5-coder-0.5b-instruct",
        "enable_prefix_caching": True, "max_model_len": 2048, "max_num_seqs": 16,
    }
    tuned = engine_args_kwargs(_tier(), {"gpu_memory_utilization": 0.4, "max_model_len": 1024})
    assert (tuned["gpu_memory_utilization"], tuned["max_model_len"]) == (0.4, 1024)


def test_the_tier_s_engine_options_apply_and_the_caller_s_win():
    tier = _tier(engine_options={"gpu_memory_utilization": 0.5, "enforce_eager": True})
    kwargs = engine_args_kwargs(tier, {"gpu_memory_utilization": 0.3})
    assert (kwargs["gpu_memory_utilization"], kwargs["enforce_eager"]) == (0.3, True)
    assert kwargs["enable_prefix_caching"] is True


def test_registry_names_map_to_checkpoints_and_other_names_pass_through():
    assert vllm_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert vllm_model_id("/models/my-finetune") == "/models/my-finetune"
    assert vllm_model_id("google/gemma-2-2b-it") == "google/gemma-2-2b-it"


def test_a_complete_export_of_the_pinned_gguf_is_preferred_to_the_hub(tmp_path):
    name = "smollm2-135m-instruct"
    directory = checkpoint_dir(name, tmp_path)
    directory.mkdir(parents=True)
    assert vllm_model_id(name, tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"  # unfinished: no marker
    (directory / "echolm-source.sha256").write_text("0" * 64 + "\n")
    assert vllm_model_id(name, tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"  # made from another GGUF
    (directory / "echolm-source.sha256").write_text(MODELS[name].sha256 + "\n")
    assert vllm_model_id(name, tmp_path) == str(directory)
    assert engine_args_kwargs(_tier(model=name), cache_dir=tmp_path)["model"] == str(directory)
    assert vllm_model_id("google/gemma-2-2b-it", tmp_path) == "google/gemma-2-2b-it"


def test_only_registry_models_are_exported(tmp_path):
    with pytest.raises(ValueError, match="not a registry model"):
        export_hf_checkpoint("google/gemma-2-2b-it", tmp_path)


def test_sampling_kwargs_use_the_tier_default_and_optional_fields():
    assert sampling_kwargs(GenerationParams(), 64) == {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "n": 1}
    full = sampling_kwargs(GenerationParams(max_tokens=8, temperature=0.7, top_p=0.9, stop=("END",), seed=3), 64)
    assert full == {"max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "n": 1, "stop": ["END"], "seed": 3}


def test_chat_prompt_is_tokenized_with_the_generation_prompt():
    tokenizer = Tokenizer()
    ids = chat_prompt_token_ids(tokenizer, MESSAGES)
    words = {v: k for k, v in tokenizer.vocab.items()}
    assert [words[i] for i in ids] == ["<system>", "be", "brief", "<user>", "What", "is", "2+2?", "<assistant>"]


def test_chat_prompt_accepts_a_batch_encoding_and_refuses_template_less_tokenizers():
    class DictTokenizer(Tokenizer):
        def apply_chat_template(self, conversation, tokenize, add_generation_prompt):
            return {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}

    assert chat_prompt_token_ids(DictTokenizer(), MESSAGES) == [5, 6, 7]
    bare = Tokenizer()
    bare.chat_template = None
    with pytest.raises(EchoLMError, match="no chat template"):
        chat_prompt_token_ids(bare, MESSAGES)


def test_a_prompt_must_leave_room_for_one_generated_token():
    check_prompt_fits(2047, 2048)
    with pytest.raises(EchoLMError) as caught:
        check_prompt_fits(2048, 2048)
    assert caught.value.code is ErrorCode.PROMPT_TOO_LONG and "2048" in caught.value.message


def test_request_ids_pass_through_unless_already_in_flight():
    assert engine_request_id("req-1", set()) == "req-1"
    assert engine_request_id("req-1", {"req-1"}) == "req-1#2"
    assert engine_request_id("req-1", {"req-1", "req-1#2"}) == "req-1#3"


def test_final_output_maps_to_a_generation_result():
    result = result_from_output(_output("four", prompt_ids=range(12), token_ids=range(3), finish_reason="length"),
                                "small-model", 0.25)
    assert (result.text, result.model, result.prompt_tokens, result.completion_tokens, result.finish_reason,
            result.latency_s) == ("four", "small-model", 12, 3, "length", 0.25)


@pytest.mark.parametrize("output, why", [
    (None, "without any output"),
    (SimpleNamespace(outputs=[], prompt_token_ids=[1], finished=True), "no completion"),
    (_output(finished=False), "unfinished"),
    (_output(finish_reason=None), "unfinished"),
    (_output(finish_reason="abort"), "aborted"),
])
def test_unusable_outputs_are_generation_failures(output, why):
    with pytest.raises(EchoLMError, match=why) as caught:
        result_from_output(output, "m", 0.1)
    assert caught.value.code is ErrorCode.GENERATION_FAILED


def test_engine_errors_are_classified():
    too_long = ValueError("The decoder prompt (length 5951) is longer than the maximum model length of 4096.")
    assert classify_engine_error(too_long).code is ErrorCode.PROMPT_TOO_LONG

    class EngineGenerateError(Exception):
        pass

    wrapped = EngineGenerateError()
    wrapped.__cause__ = RuntimeError("CUDA error: out of memory")
    error = classify_engine_error(wrapped)
    assert error.code is ErrorCode.GENERATION_FAILED and "RuntimeError: CUDA error: out of memory" in error.message

    class EngineDeadError(Exception):
        pass

    dead = classify_engine_error(EngineDeadError("EngineCore encountered an issue"))
    assert dead.code is ErrorCode.GENERATION_FAILED and "engine is dead" in dead.message
    own = EchoLMError(ErrorCode.GENERATION_TIMEOUT, "slow")
    assert classify_engine_error(own) is own


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_construction_says_how_to_install_it():
    with pytest.raises(ImportError) as caught:
        VllmEngineGenerator(_tier())
    assert INSTALL_HINT in str(caught.value)


# ---------------------------------------------------------------------------------- orchestration


@dataclass
class StandInEngine:
    """Mimics AsyncLLM.generate: yields RequestOutputs, and records aborts when cancelled."""

    delay_s: float = 0.0
    error: Exception | None = None
    seen: list[tuple[Any, dict, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    shut_down: bool = False

    def get_tokenizer(self):
        async def tokenizer():  # older vLLM releases return a coroutine
            return Tokenizer()
        return tokenizer()

    async def generate(self, prompt, sampling_params, request_id):
        self.seen.append((prompt, sampling_params, request_id))
        try:
            if self.error is not None:
                raise self.error
            await asyncio.sleep(self.delay_s)
            yield _output("partial", finished=False, finish_reason=None)
            yield _output("4", prompt_ids=prompt["prompt_token_ids"])
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise

    def shutdown(self):
        self.shut_down = True


def _stand_in_vllm(monkeypatch, engine: StandInEngine) -> list[dict]:
    built: list[dict] = []

    class AsyncLLM:
        @staticmethod
        def from_engine_args(args):
            built.append(args)
            return engine

    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: (
        AsyncLLM, lambda **kwargs: kwargs, lambda **kwargs: kwargs, SimpleNamespace(FINAL_ONLY="final-only")))
    return built


async def test_generate_builds_the_engine_once_and_passes_the_request_id(monkeypatch):
    engine = StandInEngine()
    built = _stand_in_vllm(monkeypatch, engine)
    generator = VllmEngineGenerator(_tier(), engine_options={"enforce_eager": True})
    first, second = await asyncio.gather(
        generator.generate(MESSAGES, GenerationParams(max_tokens=8), request_id="req-a"),
        generator.generate(MESSAGES, GenerationParams(), request_id="req-b"))
    await generator.aclose()
    assert len(built) == 1 and built[0]["enforce_eager"] is True and built[0]["enable_prefix_caching"] is True
    assert (first.text, first.prompt_tokens, first.completion_tokens) == ("4", 8, 2)
    assert first.model == "qwen2.5-coder-0.5b-instruct"
    prompts = {request_id: (prompt, params) for prompt, params, request_id in engine.seen}
    assert set(prompts) == {"req-a", "req-b"}
    assert prompts["req-a"][1] == {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "n": 1,
                                   "output_kind": "final-only"}
    assert prompts["req-b"][1]["max_tokens"] == 64
    assert engine.shut_down


async def test_a_redelivered_request_in_flight_gets_a_distinct_engine_id(monkeypatch):
    engine = StandInEngine(delay_s=0.05)
    _stand_in_vllm(monkeypatch, engine)
    generator = VllmEngineGenerator(_tier())
    await asyncio.gather(*(generator.generate(MESSAGES, GenerationParams(), request_id="req-x") for _ in range(3)))
    assert sorted(request_id for _, _, request_id in engine.seen) == ["req-x", "req-x#2", "req-x#3"]
    # Once finished, the id is free again.
    await generator.generate(MESSAGES, GenerationParams(), request_id="req-x")
    assert engine.seen[-1][2] == "req-x"


async def test_a_slow_generation_times_out_and_is_aborted_in_the_engine(monkeypatch):
    engine = StandInEngine(delay_s=10.0)
    _stand_in_vllm(monkeypatch, engine)
    generator = VllmEngineGenerator(_tier(timeout_s=0.1))
    with pytest.raises(EchoLMError) as caught:
        await generator.generate(MESSAGES, GenerationParams(), request_id="req-slow")
    assert caught.value.code is ErrorCode.GENERATION_TIMEOUT
    assert engine.aborted == ["req-slow"]


async def test_engine_failures_and_long_prompts_become_explicit_errors(monkeypatch):
    engine = StandInEngine(error=RuntimeError("CUDA error: an illegal memory access was encountered"))
    _stand_in_vllm(monkeypatch, engine)
    generator = VllmEngineGenerator(_tier(n_ctx=256))
    with pytest.raises(EchoLMError) as failed:
        await generator.generate(MESSAGES, GenerationParams(), request_id="req-1")
    assert failed.value.code is ErrorCode.GENERATION_FAILED and "illegal memory access" in failed.value.message
    with pytest.raises(EchoLMError) as too_long:
        await generator.generate([ChatMessage("user", "word " * 300)], GenerationParams(), request_id="req-2")
    assert too_long.value.code is ErrorCode.PROMPT_TOO_LONG
    assert [request_id for _, _, request_id in engine.seen] == ["req-1"]  # the long one never reached the engine


def test_the_factory_builds_the_vllm_backend(monkeypatch):
    from echolm.generation.factory import make_generator
    from echolm.settings import Settings

    _stand_in_vllm(monkeypatch, StandInEngine())
    tier = _tier()
    generator = make_generator(tier, Settings(tiers=[tier], admit_from_tiers=[]))
    assert isinstance(generator, VllmEngineGenerator) and generator.model_name == tier.model


def test_prefix_cached_prompt_tokens_are_reported():
    output = _output(prompt_ids=range(40))
    output.num_cached_tokens = 32  # vLLM's automatic prefix caching hit
    assert result_from_output(output, "m", 0.1).cached_prompt_tokens == 32
    assert result_from_output(_output(), "m", 0.1).cached_prompt_tokens == 0
